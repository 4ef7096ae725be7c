"""The KV-state cache: token-exact keys, three tiers with quotas, a sole-writer index,
asynchronous crash-safe saves. Payloads are opaque bytes here; no model is needed.

The module functions act on the store the application started (:func:`attach`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from erllama import errors
from erllama.cache.counters import counters as _counters
from erllama.cache.key import KeyMeta, group_of

if TYPE_CHECKING:
    from erllama.cache.store import CacheStore

__all__ = ["attach", "counters", "current", "detach", "evict_bytes", "gc", "key_meta_of", "longest_prefix",
           "reset_counters", "rows_of", "stats"]

_store: CacheStore | None = None
_prefix_of: Callable[[str, Sequence[int]], int] | None = None
_metas_of: Callable[[], Mapping[str, KeyMeta | None]] | None = None


def attach(store: CacheStore, prefix_of: Callable[[str, Sequence[int]], int] | None = None,
           metas_of: Callable[[], Mapping[str, KeyMeta | None]] | None = None) -> None:
    """Make ``store`` the one these functions act on (the application does this);
    ``prefix_of(model_id, tokens)`` answers :func:`longest_prefix` for a model's key;
    ``metas_of()`` maps each loaded model id to its current key metadata (:func:`stats`,
    :func:`key_meta_of`)."""
    global _store, _prefix_of, _metas_of
    _store, _prefix_of, _metas_of = store, prefix_of, metas_of


def detach() -> None:
    """Forget the current store (at application stop)."""
    global _store, _prefix_of, _metas_of
    _store, _prefix_of, _metas_of = None, None, None


def _groups_of() -> dict[str, bytes | None]:
    metas = _metas_of() if _metas_of is not None else {}
    return {mid: (group_of(m) if m is not None else None) for mid, m in metas.items()}


def key_meta_of(model_id: str) -> KeyMeta | None:
    """The model's current cache key metadata (``None`` for a model without a cache): with
    ``erllama.cache.key.prefix_keys`` it gives a prompt's keys anywhere, as a router does."""
    metas = _metas_of() if _metas_of is not None else {}
    if model_id not in metas:
        raise errors.ModelNotFound(f"no model {model_id!r} is loaded")
    return metas[model_id]


def stats() -> dict[str, Any]:
    """The cache at one moment (``CacheStore.stats``): per tier ``rows``, ``bytes``,
    ``quota``, ``charged`` (= ``bytes`` + ``reserved`` + ``moving_in`` + ``leaving``, never
    above the quota), the flows since start (``adopted``, ``saves``, ``moves_in``,
    ``moves_out``, ``evictions``, ``removed``; ``rows`` always equals ``adopted + saves +
    moves_in - moves_out - evictions - removed``) and ``hits``; ``reservations``;
    ``writer`` (threads, busy, queued, queued_bytes); ``groups`` by key group; and
    ``models``: for each loaded model, the ``rows``, ``bytes`` and ``hits`` per tier of
    its current key (rows are shared by models loaded from the same file with the same
    key parameters)."""
    out = current().stats()
    empty = {k: dict.fromkeys(out["tiers"], 0) for k in ("rows", "bytes", "hits")}
    models = {}
    for model_id, group in _groups_of().items():
        per = out["groups"].get(group.hex()) if group is not None else None
        models[model_id] = {k: {t: (per[k][t] if per else 0) for t in out["tiers"]} for k in empty}
    out["models"] = models
    return out


def rows_of(model_id: str) -> dict[bytes, int]:
    """The available rows under the model's current key (all its namespaces' rows share
    none: a namespaced request's rows are another group) as ``{key: tokens}``: what a
    replica publishes for prefix-aware routing (``erllama.ray.routing``). A lock-free read."""
    from erllama.cache.index import RowStatus

    groups = _groups_of()
    if model_id not in groups:
        raise errors.ModelNotFound(f"no model {model_id!r} is loaded")
    group = groups[model_id]
    return {r.key: r.n_tokens for r in list(current().index.rows.values())
            if r.group == group and r.status is RowStatus.AVAILABLE}


def longest_prefix(model_id: str, tokens: Sequence[int]) -> int:
    """Length of the longest cached prefix of ``tokens`` under the model's current key
    (model fingerprint, adapters, context shape, namespace); counts no hit."""
    current()
    if _prefix_of is None:
        raise errors.CacheError("no application is attached to resolve model ids")
    return _prefix_of(model_id, tokens)


def current() -> CacheStore:
    """The running store; ``errors.CacheError`` when none is attached."""
    if _store is None:
        raise errors.CacheError("the cache is not running: start it with erllama.start()")
    return _store


def counters() -> dict[str, int]:
    """All cache counters: hits, misses, saves by reason, drops, evictions, demotions,
    corrupt files, timings and bytes per tier."""
    return _counters.snapshot()


def reset_counters() -> None:
    """Zero the counters (the per-tier byte gauges keep their values)."""
    _counters.reset()


def gc() -> int:
    """Evict every row no reader holds; returns how many."""
    return current().gc()


def evict_bytes(n: int, tiers: list[str] | tuple[str, ...] | None = None) -> tuple[int, int]:
    """Evict least recently used unreferenced rows of ``tiers`` until ``n`` bytes are freed;
    returns ``(rows, bytes)``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise errors.InvalidParameter(f"n must be an int >= 0 (bytes), got {n!r}")
    if tiers is not None:
        from erllama.cache.index import TIERS

        bad = [t for t in tiers if t not in TIERS]
        if bad:
            raise errors.InvalidParameter(f"unknown tiers {bad}; tiers are ram, ram_file, disk")
    return current().evict_bytes(n, tuple(tiers) if tiers else None)
