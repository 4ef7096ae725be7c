"""Timing erllama's token streams, shared by ``throughput.py`` and
``compare_llama_cpp_python.py``: one stream iterated by the caller, or several started at
once with every event timed in the model actor's thread."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpuload import LoadMeter

try:
    import erllama
except ImportError:  # run from a checkout without an installed erllama
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import erllama


@dataclass
class Timed:
    """One stream: when it started (``t0``), when each generated token arrived (``stamps``,
    with its ``ids``), its text, when its last event arrived (``end``), its cache hit (or
    ``"error: ..."``) and its completion (None after an error)."""

    t0: float
    stamps: list[float] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    end: float = 0.0
    hit: str = ""
    completion: Any = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def ttft_ms(self) -> float:
        return (self.stamps[0] - self.t0) * 1e3

    def take(self, ev: Any, now: float) -> None:
        """Record one event of the stream."""
        if isinstance(ev, erllama.Token):
            if ev.id >= 0:
                self.stamps.append(now)
                self.ids.append(ev.id)
            self.parts.append(ev.text)
        elif isinstance(ev, erllama.Done):
            self.end, self.hit, self.completion = now, ev.completion.cache_hit, ev.completion
        else:
            self.end, self.hit = now, f"error: {ev!r}"


def timed_stream(mid: str, prompt: list[int], max_tokens: int) -> tuple[Timed, float | None]:
    """Iterate one ``erllama.infer`` stream; returns it and the other processes' CPU load."""
    with LoadMeter() as load:
        out = Timed(time.perf_counter())
        for ev in erllama.infer(mid, prompt, max_tokens=max_tokens):
            out.take(ev, time.perf_counter())
    return out, load.other


def timed_streams(mid: str, prompts: list[list[int]], max_tokens: int) -> tuple[list[Timed], float | None]:
    """Start one stream per prompt at once and wait for all; each event is timed in the
    sink (no polling loop: a waking thread would steal a core from ggml)."""
    finished = threading.Event()
    with LoadMeter() as load:
        t0 = time.perf_counter()
        runs = [Timed(t0) for _ in prompts]

        def sink_for(run: Timed):
            def sink(ev: Any) -> None:
                run.take(ev, time.perf_counter())
                if all(r.end for r in runs):
                    finished.set()
            return sink

        for run, p in zip(runs, prompts):
            erllama.infer(mid, p, sink=sink_for(run), max_tokens=max_tokens)
        finished.wait()
    return runs, load.other
