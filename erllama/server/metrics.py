"""Prometheus metrics of the server (``GET /metrics``), with ``prometheus_client``.

Everything is recorded in the host process: request outcomes by the routes, the cache and
the models read from erllama at scrape time (``erllama.cache.counters()``,
``erllama.cache.stats()``, ``erllama.list_models()``), so a model under
``isolation="process"`` reports through its host like any other. Every family is present
from the start; a model's series appear at zero when it is loaded. Names are prefixed
``erllama_``; the table is in ``docs/guides/server.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

import erllama
import erllama.cache
from erllama.types import Completion

__all__ = ["CACHE_RESULTS", "FINISH_REASONS", "Metrics", "REJECT_REASONS"]

REJECT_REASONS = ("queue_full", "restarting", "loading")
FINISH_REASONS = ("stop", "length", "cancelled", "disconnected", "error")
CACHE_RESULTS = ("exact", "partial", "sticky", "cold")
SOURCES = ("computed", "context", "resident", "ram", "ram_file", "disk")
RESIDENT = ("hits", "kept", "evictions", "demotions")
SAVE_REASONS = ("cold", "continued", "finish", "evict", "shutdown")
LOOKUPS = {"exact": "hits_exact", "resume": "hits_resume", "longest_prefix": "hits_longest_prefix",
           "miss": "misses"}
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class Metrics:
    """The server's metrics in a registry of its own (several servers in one process do
    not share counts)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("erllama_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.rejected_total = Counter("erllama_requests_rejected", "requests refused before any work (503)",
                                      ["model", "reason"], registry=r)
        self.finished_total = Counter("erllama_requests_finished", "requests ended, by reason", ["model", "reason"],
                                      registry=r)
        self.ttft = Histogram("erllama_time_to_first_token_seconds", "time to first token, by cache result",
                              ["model", "cache"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("erllama_inter_token_latency_seconds", "time between generated tokens", ["model"],
                             buckets=ITL_BUCKETS, registry=r)
        self.queue_time = Histogram("erllama_queue_time_seconds", "time waiting for a sequence", ["model"],
                                    buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("erllama_prompt_tokens", "prompt tokens by source: computed, or restored "
                                     "from a live context or a cache tier", ["model", "source"], registry=r)
        self.generation_tokens = Counter("erllama_generation_tokens", "generated tokens", ["model"], registry=r)
        self.in_flight: dict[str, int] = {}
        self._seen: set[str] = set()
        r.register(_Live(self))

    def _model(self, model: str) -> None:
        """Create a model's series at zero (once)."""
        if model in self._seen:
            return
        self._seen.add(model)
        for reason in REJECT_REASONS:
            self.rejected_total.labels(model, reason)
        for reason in FINISH_REASONS:
            self.finished_total.labels(model, reason)
        for cache in CACHE_RESULTS:
            self.ttft.labels(model, cache)
        for source in SOURCES:
            self.prompt_tokens.labels(model, source)
        self.itl.labels(model)
        self.queue_time.labels(model)
        self.generation_tokens.labels(model)

    def request(self, endpoint: str, status: int) -> None:
        """One HTTP request answered."""
        self.requests.labels(endpoint, str(status)).inc()

    def rejected(self, model: str, reason: str) -> None:
        """A request refused at admission."""
        self._model(model)
        self.rejected_total.labels(model, reason).inc()

    def finished(self, model: str, reason: str) -> None:
        """A request that ended without a completion (disconnected, failed)."""
        self._model(model)
        self.finished_total.labels(model, reason).inc()

    def completed(self, model: str, done: Completion) -> None:
        """A request that ran to its ``Done``."""
        self._model(model)
        self.finished_total.labels(model, done.finish_reason if done.finish_reason in FINISH_REASONS else "stop").inc()
        st = done.stats
        if st.completion_tokens:
            self.ttft.labels(model, done.cache_hit if done.cache_hit in CACHE_RESULTS else "cold").observe(
                st.ttft_ms / 1e3)
        if st.completion_tokens > 1:
            gap = st.generation_ms / 1e3 / (st.completion_tokens - 1)
            child = self.itl.labels(model)
            for _ in range(st.completion_tokens - 1):
                child.observe(gap)
        self.queue_time.labels(model).observe(st.queued_ms / 1e3)
        read = done.cache_delta.read
        if read:
            self.prompt_tokens.labels(model, done.cache_delta.tier or "context").inc(read)
        self.prompt_tokens.labels(model, "computed").inc(max(0, st.prompt_tokens - read))
        self.generation_tokens.labels(model).inc(st.completion_tokens)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        try:
            for m in erllama.list_models():
                self._model(m.id)
        except erllama.errors.ErllamaError:
            pass
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Live:
    """What erllama knows at scrape time: requests running and waiting, models, the cache."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return list(self._families(live=False))

    def collect(self) -> Iterator[Any]:
        yield from self._families(live=True)

    def _families(self, live: bool) -> Iterator[Any]:
        running = GaugeMetricFamily("erllama_requests_running", "requests holding a sequence", labels=["model"])
        waiting = GaugeMetricFamily("erllama_requests_waiting", "requests waiting for a sequence", labels=["model"])
        restarts = CounterMetricFamily("erllama_model_restarts", "model actor restarts", labels=["model"])
        loaded = GaugeMetricFamily("erllama_models_loaded", "models loaded")
        rows = GaugeMetricFamily("erllama_cache_rows", "cache rows per tier", labels=["tier"])
        size = GaugeMetricFamily("erllama_cache_bytes", "cache bytes per tier", labels=["tier"])
        quota = GaugeMetricFamily("erllama_cache_quota_bytes", "cache quota per tier", labels=["tier"])
        lookups = CounterMetricFamily("erllama_cache_lookups", "cache lookups by result", labels=["result"])
        saves = CounterMetricFamily("erllama_cache_saves", "cache saves by reason", labels=["reason"])
        dropped = CounterMetricFamily("erllama_cache_saves_dropped", "saves dropped (writer queue full)")
        evictions = CounterMetricFamily("erllama_cache_evictions", "rows evicted from the slowest tier")
        demotions = CounterMetricFamily("erllama_cache_demotions", "rows moved to a slower tier")
        failed = CounterMetricFamily("erllama_cache_restore_failures", "hits whose state did not restore")
        resident = CounterMetricFamily("erllama_cache_resident", "resident tier events (rows kept in spare "
                                       "sequences)", labels=["event"])
        if live:
            n = 0
            try:
                models = erllama.list_models()
            except erllama.errors.ErllamaError:
                models = []
            for m in models:
                n += 1
                waiting.add_metric([m.id], m.pending_len)
                running.add_metric([m.id], max(0, self.metrics.in_flight.get(m.id, 0) - m.pending_len))
                restarts.add_metric([m.id], m.restarts)
            loaded.add_metric([], n)
            try:
                c = erllama.cache.counters()
                st = erllama.cache.stats()
            except erllama.errors.ErllamaError:
                c, st = {}, {"tiers": {}}
            for tier, t in st["tiers"].items():
                rows.add_metric([tier], t["rows"])
                size.add_metric([tier], t["bytes"])
                quota.add_metric([tier], t["quota"])
            for result, name in LOOKUPS.items():
                lookups.add_metric([result], c.get(name, 0))
            for reason in SAVE_REASONS:
                saves.add_metric([reason], c.get(f"saves_{reason}", 0))
            dropped.add_metric([], c.get("saves_dropped", 0))
            evictions.add_metric([], c.get("evictions", 0))
            demotions.add_metric([], c.get("demotions", 0))
            failed.add_metric([], c.get("restores_failed", 0))
            for event in RESIDENT:
                resident.add_metric([event], c.get("hits_resident" if event == "hits" else f"resident_{event}", 0))
        yield from (running, waiting, restarts, loaded, rows, size, quota, lookups, saves, dropped, evictions,
                    demotions, failed, resident)
