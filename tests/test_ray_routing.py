"""The prefix-aware router's scoring (``erllama.ray.routing``) as properties, without Ray:
never a dead or full replica, the longest cached prefix under equal load, the session's
replica, and a bounded imbalance."""

from __future__ import annotations

import hashlib
import random

from hypothesis import given
from hypothesis import strategies as st

from erllama.ray.routing import Policy, Replica, choose, matched_tokens

POLICY = Policy(imbalance_abs=2, imbalance_rel=1.5, min_match_tokens=4)


def key(tokens) -> bytes:
    return hashlib.sha256(repr(tuple(tokens)).encode()).digest()


def keys_of(prompt):
    return lambda lengths: {n: key(prompt[:n]) for n in lengths if 0 < n <= len(prompt)}


prompts = st.lists(st.integers(0, 50), min_size=1, max_size=40)


@st.composite
def cluster(draw):
    prompt = draw(prompts)
    n = draw(st.integers(1, 6))
    replicas = []
    for i in range(n):
        rows = {}
        for length in draw(st.lists(st.integers(1, len(prompt)), max_size=3)):  # prefixes of this prompt
            rows[key(prompt[:length])] = length
        for other in draw(st.lists(prompts, max_size=2)):  # rows of other prompts
            rows[key(other)] = len(other)
        replicas.append(Replica(f"r{i}", alive=draw(st.booleans()) or i == 0, running=draw(st.integers(0, 8)),
                                waiting=draw(st.integers(0, 5)), capacity=draw(st.integers(1, 6)), rows=rows,
                                sessions=frozenset(draw(st.sets(st.sampled_from(["a", "b"]), max_size=1)))))
    return prompt, replicas


def bound(replicas):
    eligible = [r for r in replicas if r.eligible]
    low = min(r.load for r in eligible)
    return max(low * POLICY.imbalance_rel, low + POLICY.imbalance_abs)


@given(cluster(), st.sampled_from([None, "a", "b"]), st.integers(0, 2**32))
def test_only_eligible_replicas_each_once_the_first_within_the_imbalance_bound(c, session, seed):
    prompt, replicas = c
    ranked = choose(replicas, keys_of(prompt), session, POLICY, random.Random(seed))
    eligible = {r.id for r in replicas if r.eligible}
    assert sorted(ranked) == sorted(eligible)  # never a dead or full replica, each eligible one once
    if ranked:
        first = next(r for r in replicas if r.id == ranked[0])
        assert first.load <= bound(replicas)


@given(cluster(), st.integers(0, 2**32))
def test_under_equal_load_the_longest_cached_prefix_wins(c, seed):
    prompt, replicas = c
    replicas = [Replica(r.id, alive=r.alive, capacity=6, rows=r.rows) for r in replicas]  # all at load 0
    ranked = choose(replicas, keys_of(prompt), None, POLICY, random.Random(seed))
    keys = keys_of(prompt)(range(1, len(prompt) + 1))
    best = max((matched_tokens(r, keys) for r in replicas if r.eligible), default=0)
    first = next(r for r in replicas if r.id == ranked[0])
    if best >= POLICY.min_match_tokens:
        assert matched_tokens(first, keys) == best


@given(cluster(), st.integers(0, 2**32))
def test_the_sessions_replica_is_chosen_unless_overloaded(c, seed):
    prompt, replicas = c
    ranked = choose(replicas, keys_of(prompt), "a", POLICY, random.Random(seed))
    holders = [r for r in replicas if r.eligible and "a" in r.sessions and r.load <= bound(replicas)]
    if holders:
        assert ranked[0] in {r.id for r in holders}


def test_a_hot_prefix_stays_on_its_holder_until_it_is_overloaded():
    prompt = list(range(40))
    hot = {key(prompt[:32]): 32}
    calm_holder = [Replica("holder", running=2, rows=hot), Replica("idle")]
    assert choose(calm_holder, keys_of(prompt), policy=POLICY)[0] == "holder"  # load 2 <= max(0 * 1.5, 0 + 2)
    busy_holder = [Replica("holder", running=3, rows=hot), Replica("idle")]
    assert choose(busy_holder, keys_of(prompt), policy=POLICY)[0] == "idle"  # over the bound: it spreads


def test_no_replica_can_take_it():
    assert choose([Replica("a", alive=False), Replica("b", waiting=3, capacity=3)], keys_of([1])) == []


def test_real_rows_and_prompt_keys_route_a_conversation_to_its_replica(tmp_path, tiny_path):
    """On the tiny model: what a replica publishes (``erllama.cache.rows_of``) and the
    request's keys (``erllama.prompt_keys``) make the router pick the replica holding the
    conversation's prefix over an idle one holding nothing; another namespace's keys miss."""
    import erllama

    with erllama.running(cache_dir=str(tmp_path / "c"), ram_file_dir=str(tmp_path / "shm"),
                         policy={"min_tokens": 16, "cold_min_tokens": 16}):
        mid = erllama.load_model(tiny_path, n_ctx=1024, n_seq_max=2, n_threads=1, isolation="none")
        first = erllama.tokenize(mid, "the cat and the dog " * 10)
        erllama.complete(mid, first, max_tokens=8)
        assert erllama.cache.current().flush(30)
        rows = erllama.cache.rows_of(mid)
        assert rows and all(isinstance(k, bytes) and n > 0 for k, n in rows.items())
        follow_up = first + erllama.tokenize(mid, " and the bird", add_special=False)

        def keys(lengths):
            return erllama.prompt_keys(mid, follow_up, list(lengths))

        holder, idle = Replica("holder", running=1, rows=rows), Replica("idle")
        assert choose([idle, holder], keys, policy=POLICY)[0] == "holder"
        # the whole first prompt was saved; the finish row (prompt + answer) is not a prefix of the follow-up
        assert matched_tokens(holder, keys(rows.values())) == len(first)
        other_ns = erllama.prompt_keys(mid, follow_up, list(rows.values()), namespace=b"tenant")
        assert matched_tokens(holder, other_ns) == 0
