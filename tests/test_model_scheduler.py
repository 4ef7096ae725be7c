"""The batch planner's properties, and a simulation that every sequence finishes."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from erllama.model.scheduler import SeqWork, plan_tick, short_prefill


@st.composite
def workloads(draw):
    n = draw(st.integers(0, 12))
    seqs = draw(st.permutations(range(n)))
    work = []
    for order, seq in enumerate(seqs):
        decode = draw(st.booleans())
        work.append(SeqWork(seq, order, decode, 0 if decode else draw(st.integers(0, 3000))))
    return work, draw(st.integers(1, 600)), draw(st.one_of(st.none(), st.integers(1, 700))), draw(st.integers(0, 50))


@settings(max_examples=500, deadline=None)
@given(workloads())
def test_plan_properties(case):
    work, n_batch, chunk, tick = case
    plan = plan_tick(work, n_batch, chunk, tick)
    by_seq = {w.seq_id: w for w in work}
    seqs = [s for s, _ in plan]
    assert len(seqs) == len(set(seqs))  # each sequence at most once
    assert sum(n for _, n in plan) <= n_batch
    has_work = any(w.decode or w.prefill for w in work)
    assert bool(plan) == has_work  # progress whenever there is work
    kinds = [by_seq[s].decode for s in seqs]
    assert kinds == sorted(kinds, reverse=True)  # decode rows first
    for s, n in plan:
        w = by_seq[s]
        assert n == 1 if w.decode else 1 <= n <= min(w.prefill, chunk or w.prefill)
    decodes = [w for w in work if w.decode]
    if len(decodes) <= n_batch:
        assert {s for s, _ in plan if by_seq[s].decode} == {w.seq_id for w in decodes}
        # prefill rows: the short ones, then the others, each in admission order, none skipped
        short = short_prefill(n_batch, chunk)
        waiting = sorted((w for w in work if not w.decode and w.prefill), key=lambda w: (w.prefill > short, w.order))
        planned = [s for s, _ in plan if not by_seq[s].decode]
        assert planned == [w.seq_id for w in waiting[: len(planned)]]
        # a tick with a short prefill carries no long one
        if any(by_seq[s].prefill <= short for s in planned):
            assert all(by_seq[s].prefill <= short for s in planned)
        # only the last planned prefill may be cut by the budget
        for s, n in plan[:-1]:
            if not by_seq[s].decode:
                assert n == min(by_seq[s].prefill, chunk or by_seq[s].prefill)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 16))
def test_more_decodes_than_budget_rotate_fairly(n_seqs, n_batch):
    work = [SeqWork(i, i, decode=True) for i in range(n_seqs)]
    served = set()
    rounds = math.ceil(n_seqs / n_batch)
    for tick in range(rounds):
        served |= {s for s, _ in plan_tick(work, n_batch, tick=tick)}
    assert served == set(range(n_seqs))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 2000), min_size=1, max_size=6), st.integers(1, 512),
       st.one_of(st.none(), st.integers(1, 256)), st.integers(1, 40))
def test_simulation_every_request_finishes(prompts, n_batch, chunk, gen):
    """Prefill each prompt, then generate ``gen`` tokens each: all finish within a bound."""
    state = {i: {"prefill": p, "gen": gen} for i, p in enumerate(prompts)}
    ticks = 0
    while any(s["prefill"] or s["gen"] for s in state.values()):
        work = [SeqWork(i, i, decode=s["prefill"] == 0 and s["gen"] > 0, prefill=s["prefill"])
                for i, s in state.items()]
        plan = plan_tick(work, n_batch, chunk, ticks)
        assert plan
        for seq, n in plan:
            if state[seq]["prefill"]:
                state[seq]["prefill"] -= n
            else:
                state[seq]["gen"] -= 1
        ticks += 1
        bound = sum(math.ceil(p / min(n_batch, chunk or n_batch)) for p in prompts) + gen * len(prompts) + 1
        assert ticks <= bound


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4000), st.integers(1, 2048), st.integers(8, 2048), st.one_of(st.none(), st.integers(1, 700)),
       st.integers(0, 3))
def test_short_prefill_is_not_queued_behind_a_long_one(long, tail, n_batch, chunk, decodes):
    """A cache hit's short tail admitted after a long cold prompt is planned whole in the
    next tick, alone among the prefills (the tick stays short); the long prompt goes on in
    the tick after."""
    short = short_prefill(n_batch, chunk)
    tail = min(tail, short)
    work = [SeqWork(10 + i, i, decode=True) for i in range(min(decodes, n_batch - short))]
    work += [SeqWork(0, 100, prefill=long + short), SeqWork(1, 101, prefill=tail)]
    plan = dict(plan_tick(work, n_batch, chunk))
    assert plan[1] == tail and 0 not in plan
    after = [w for w in work if w.seq_id != 1]
    assert dict(plan_tick(after, n_batch, chunk))[0] == min(long + short, n_batch - len(after) + 1, chunk or n_batch)


def test_short_prefill_threshold():
    assert short_prefill(512) == 64
    assert short_prefill(512, 16) == 16
    assert short_prefill(4) == 1
