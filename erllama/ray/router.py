"""The Ray Serve request router of the engine deployment: :mod:`erllama.ray.routing`'s
scoring over what the replicas publish (``Engine.record_routing_stats``) and what this
router sent since (a request's prompt key is counted as held by the replica it went to,
until that replica's next published summary, so a conversation's next turn follows it
before the summary catches up).

A request carries its route (``model``, prompt ``tokens``, ``session``, ``namespace``)
from the ingress, which tokenized it with the model's own vocabulary and template.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from erllama.cache.key import KeyMeta, prefix_keys
from erllama.cache.policy import SavePolicy, cold_save_split
from erllama.model.request import request_key_meta
from erllama.ray import routing

__all__ = ["PrefixRouter", "decode_meta", "encode_meta", "short_key"]

KEY_BYTES = 8
"""A published key is the first 8 bytes of the cache key: 2**-64 odds of a false match."""

SESSIONS_KEPT = 10_000
SENT_TTL_S = 60.0
COLD = SavePolicy()


def short_key(key: bytes) -> str:
    """The published form of a cache key."""
    return key[:KEY_BYTES].hex()


def encode_meta(meta: KeyMeta) -> list[Any]:
    """A model's key metadata as published (plain values)."""
    return [meta.fingerprint.hex(), meta.quant, meta.ctx_params_hash.hex(),
            None if meta.namespace is None else meta.namespace.hex()]


def decode_meta(data: Any) -> KeyMeta:
    """The inverse of :func:`encode_meta`."""
    fp, quant, ctx, ns = data
    return KeyMeta(bytes.fromhex(fp), int(quant), bytes.fromhex(ctx), None if ns is None else bytes.fromhex(ns))


class PrefixRouter(RequestRouter):
    """Routes each request to the replica holding the longest prefix of its tokens, within
    a load-imbalance bound; sticky sessions; power of two choices otherwise
    (:func:`erllama.ray.routing.choose`). Knobs come from ``request_router_kwargs``:
    ``imbalance_abs``, ``imbalance_rel``, ``min_match_tokens``."""

    def initialize_state(self, **kwargs: Any) -> None:
        """Set the policy; start with no memory of sessions or sent prompts."""
        self.policy = routing.Policy(**kwargs)
        self.sessions: OrderedDict[str, str] = OrderedDict()  # session -> replica id
        # replica id -> {short key: (tokens, sent at)} of prompts sent since its last summary
        self.sent: dict[str, dict[str, tuple[int, float]]] = {}
        self.published: dict[str, tuple[Any, float]] = {}  # replica id -> (summary last seen, when)
        self.rng = random.Random()

    def _replica(self, r: RunningReplica, model: str | None) -> routing.Replica:
        rid = r.replica_id.unique_id
        stats = r.routing_stats or {}
        if self.published.get(rid, (None,))[0] is not stats:
            # a new summary covers what was sent before the previous one arrived
            since = self.published.get(rid, (None, 0.0))[1]
            self.published[rid] = (stats, time.monotonic())
            self.sent[rid] = {k: v for k, v in self.sent.get(rid, {}).items() if v[1] > since}
        rows: dict[Any, int] = {}
        entry = (stats.get("models") or {}).get(model) if model else None
        if entry:
            rows.update(entry["rows"])
        now = time.monotonic()
        rows.update({k: n for k, (n, at) in self.sent.get(rid, {}).items() if now - at < SENT_TTL_S})
        queue = self.replica_queue_len_cache.get(r.replica_id)
        return routing.Replica(rid, waiting=queue or 0, capacity=r.max_ongoing_requests, rows=rows,
                               sessions=frozenset(s for s, owner in self.sessions.items() if owner == rid))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Every candidate in its own rank, best first (Serve tries them in that order)."""
        route = _route_of(pending_request)
        model = route.get("model")
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        replicas = [self._replica(r, model) for r in candidate_replicas]
        meta = self._meta(candidate_replicas, model)
        tokens = route.get("tokens") or []

        def keys(lengths: Iterable[int]) -> Mapping[int, str]:
            if meta is None or not tokens:
                return {}
            km = request_key_meta(meta, route.get("namespace"))
            return {n: short_key(k) for n, k in prefix_keys(km, tokens, lengths)}

        order = routing.choose(replicas, keys, route.get("session"), self.policy, self.rng)
        if not order:  # every queue looks full: let Serve probe them all
            order = [r.id for r in replicas]
        return [[by_id[rid]] for rid in order]

    @staticmethod
    def _meta(replicas: list[RunningReplica], model: str | None) -> KeyMeta | None:
        for r in replicas:
            entry = ((r.routing_stats or {}).get("models") or {}).get(model) if model else None
            if entry and entry.get("meta"):
                return decode_meta(entry["meta"])
        return None

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        """Remember where the request went: its session, and its prompt's key as held there."""
        route = _route_of(pending_request)
        rid = replica_id.unique_id
        session = route.get("session")
        if session is not None:
            self.sessions[session] = rid
            self.sessions.move_to_end(session)
            while len(self.sessions) > SESSIONS_KEPT:
                self.sessions.popitem(last=False)
        tokens, model = route.get("tokens"), route.get("model")
        meta = self._meta(list(self.curr_replicas.values()), model)
        if tokens and meta is not None:
            # the whole prompt, and the prefix a cold save of it holds (default policy)
            km = request_key_meta(meta, route.get("namespace"))
            split = cold_save_split(COLD, tokens)
            lengths = [len(tokens)] + ([len(split[0])] if split is not None else [])
            now = time.monotonic()
            sent = self.sent.setdefault(rid, {})
            for n, key in prefix_keys(km, tokens, lengths):
                sent[short_key(key)] = (n, now)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        """Forget a dead replica's sessions and sent prompts."""
        super().on_replica_actor_died(replica_id)
        rid = replica_id.unique_id
        self.sent.pop(rid, None)
        self.published.pop(rid, None)
        for s in [s for s, owner in self.sessions.items() if owner == rid]:
            del self.sessions[s]


def _route_of(pending_request: PendingRequest | None) -> dict[str, Any]:
    if pending_request is None or not pending_request.args:
        return {}
    arg = pending_request.args[0]
    return arg.get("route") or {} if isinstance(arg, dict) else {}
