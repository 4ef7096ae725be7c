"""Memory-pressure poller (SPEC 5): config validation, decide(), sources, the actor."""

from __future__ import annotations

import math
import subprocess
import threading
from fractions import Fraction
from types import SimpleNamespace

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

import supervision as S
from erllama import errors
from erllama.cache import pressure as P
from erllama.cache.pressure import (
    CheckNow,
    Enable,
    PressureConfig,
    PressurePoller,
    Status,
    decide,
    nvidia_smi_source,
    system_source,
)

from supervision_helpers import wait_until

MiB = 1024 * 1024


# --- config validation --------------------------------------------------------------------


def test_defaults():
    cfg = PressureConfig()
    assert cfg.enabled is False
    assert cfg.source == "system"
    assert cfg.interval_s == 5.0
    assert (cfg.high, cfg.low) == (0.85, 0.75)
    assert cfg.min_evict_bytes == MiB
    assert cfg.evict_tiers == ("ram", "ram_file")


@pytest.mark.parametrize(
    ("field", "kwargs", "shown"),
    [
        ("enabled", {"enabled": "yes"}, "'yes'"),
        ("source", {"source": "gpu"}, "'gpu'"),
        ("source", {"source": 42}, "42"),
        ("interval_s", {"interval_s": 0}, "0"),
        ("interval_s", {"interval_s": -1.5}, "-1.5"),
        ("interval_s", {"interval_s": float("nan")}, "nan"),
        ("interval_s", {"interval_s": True}, "True"),
        ("high", {"high": 1.5}, "1.5"),
        ("high", {"high": 0.0, "low": 0.0}, "0.0"),
        ("high", {"high": float("inf")}, "inf"),
        ("low", {"low": -0.1}, "-0.1"),
        ("low", {"low": 0.9}, "0.9"),  # low >= high (0.85)
        ("low", {"low": 0.5, "high": 0.5}, "0.5"),  # low == high
        ("low", {"low": "0.1"}, "'0.1'"),
        ("min_evict_bytes", {"min_evict_bytes": -1}, "-1"),
        ("min_evict_bytes", {"min_evict_bytes": 1.5}, "1.5"),
        ("min_evict_bytes", {"min_evict_bytes": False}, "False"),
        ("evict_tiers", {"evict_tiers": ()}, "()"),
        ("evict_tiers", {"evict_tiers": ("ram", "tape")}, "'tape'"),
        ("evict_tiers", {"evict_tiers": "ram"}, "'ram'"),
        ("evict_tiers", {"evict_tiers": None}, "None"),
    ],
)
def test_validation_names_field_and_value(field, kwargs, shown):
    with pytest.raises(errors.ConfigError) as ei:
        PressureConfig(**kwargs)
    msg = str(ei.value)
    assert field in msg
    assert shown in msg


def test_valid_variants():
    cfg = PressureConfig(evict_tiers=["disk", "ram", "disk"], high=1.0, low=0.0, min_evict_bytes=0)
    assert cfg.evict_tiers == ("disk", "ram")
    assert isinstance(cfg.evict_tiers, tuple)
    for name in ("system", "nvidia_smi", "noop"):
        assert PressureConfig(source=name).source_name == name

    def my_source():
        return (1, 2)

    assert "my_source" in PressureConfig(source=my_source).source_name


# --- decide -------------------------------------------------------------------------------


@st.composite
def configs(draw):
    high = draw(st.floats(0.01, 1.0, allow_nan=False))
    low = draw(st.floats(0.0, high, allow_nan=False, exclude_max=True))
    return PressureConfig(high=high, low=low, min_evict_bytes=draw(st.integers(0, 2**32)))


@st.composite
def below_high(draw):
    """A config and a sample below its high watermark (or with no total), drawn directly."""
    cfg = draw(configs())
    total = draw(st.integers(-10, 2**50))
    if total <= 0:
        return (draw(st.integers(0, 100)), total), cfg
    limit = math.ceil(Fraction(cfg.high) * total) - 1  # the largest used with used/total < high
    return (draw(st.integers(0, max(0, limit))), total), cfg


@given(below_high())
def test_decide_zero_below_high(case):
    (used, total), cfg = case
    if total > 0 and Fraction(used, total) >= Fraction(cfg.high):
        return  # high so close to 0 that no used byte is below it (used = 0 at total = 1)
    assert decide(used, total, cfg) == 0


@st.composite
def above_high(draw):
    """A config and a sample at or above its high watermark, drawn directly (no filtering)."""
    cfg = draw(configs())
    total = draw(st.integers(1, 2**50))
    first = math.ceil(Fraction(cfg.high) * total)
    used = draw(st.integers(first, max(first, total) * 2 + 10))
    return (used, total), cfg


@given(above_high())
def test_decide_above_high_reaches_low(case):
    (used, total), cfg = case
    assert used / total >= cfg.high or Fraction(used, total) >= Fraction(cfg.high)
    n = decide(used, total, cfg)
    assert isinstance(n, int)
    assert n >= cfg.min_evict_bytes
    assert n > 0 or cfg.min_evict_bytes == 0
    low_bytes = Fraction(cfg.low) * total
    if used - low_bytes >= cfg.min_evict_bytes:
        # enough to get back to the low watermark, and not a whole byte more
        assert used - n <= low_bytes
        assert used - n > low_bytes - 1
    else:
        assert n == cfg.min_evict_bytes


@pytest.mark.parametrize(
    ("used", "total", "min_evict", "expected"),
    [
        (90, 100, 1, 15),  # back to 75; the original's fixed chunk would be 10
        (86, 100, 1, 11),
        (85, 100, 1, 10),  # exactly at high
        (84, 100, 1, 0),
        (86, 100, 50, 50),  # min_evict_bytes wins
        (100, 100, 1, 25),
        (10, 0, 1, 0),  # no total
        (10, -5, 1, 0),
    ],
)
def test_decide_cases(used, total, min_evict, expected):
    cfg = PressureConfig(high=0.85, low=0.75, min_evict_bytes=min_evict)
    assert decide(used, total, cfg) == expected


def test_decide_ignores_enabled_flag():
    assert decide(95, 100, PressureConfig(enabled=False, min_evict_bytes=1)) == 20


# --- sources ------------------------------------------------------------------------------


class FakeRun:
    """Stands in for subprocess.run; records the calls."""

    def __init__(self, stdout="", returncode=0, exc=None):
        self.stdout, self.returncode, self.exc = stdout, returncode, exc
        self.calls = []

    def __call__(self, cmd, **kw):
        self.calls.append((cmd, kw))
        if self.exc is not None:
            raise self.exc
        return SimpleNamespace(stdout=self.stdout, stderr="", returncode=self.returncode)


def test_nvidia_smi_sums_gpus():
    run = FakeRun("1024, 8192\n512, 4096\n")
    assert nvidia_smi_source(run=run) == (1536 * MiB, 12288 * MiB)
    (cmd, kw), = run.calls
    assert cmd[0] == "nvidia-smi"
    assert "--query-gpu=memory.used,memory.total" in cmd
    assert "--format=csv,noheader,nounits" in cmd
    assert kw.get("timeout")


def test_nvidia_smi_skips_unparsable_lines():
    run = FakeRun("[N/A], [N/A]\n\n  100 ,  200  \ngarbage\n")
    assert nvidia_smi_source(run=run) == (100 * MiB, 200 * MiB)


@pytest.mark.parametrize(
    "run",
    [
        FakeRun(exc=FileNotFoundError(2, "No such file or directory", "nvidia-smi")),
        FakeRun(exc=subprocess.TimeoutExpired("nvidia-smi", 10)),
        FakeRun(exc=RuntimeError("anything")),
        FakeRun(""),
        FakeRun(None),
        FakeRun("[N/A], [N/A]\n"),
        FakeRun("1024, 8192\n", returncode=9),
    ],
    ids=["missing", "timeout", "raises", "empty", "none", "na", "failed"],
)
def test_nvidia_smi_never_raises(run):
    assert nvidia_smi_source(run=run) == (0, 1)


def test_nvidia_smi_real_binary_does_not_raise():
    used, total = nvidia_smi_source()
    assert 0 <= used <= total and total > 0


def test_system_source_is_sane():
    used, total = system_source()
    assert isinstance(used, int) and isinstance(total, int)
    assert 0 < used <= total
    assert total == psutil.virtual_memory().total


def test_noop_source():
    assert P.noop_source() == (0, 1)


# --- the actor ----------------------------------------------------------------------------


class FakeSource:
    """A source whose reading the test sets; can be made to raise."""

    def __init__(self, used=0, total=100):
        self.lock = threading.Lock()
        self.value = (used, total)
        self.exc = None
        self.calls = 0

    def __call__(self):
        with self.lock:
            self.calls += 1
            if self.exc is not None:
                raise self.exc
            return self.value


class FakeEvict:
    """Records evict(n_bytes, tiers) calls; frees what it is asked for in one row."""

    def __init__(self, result=None):
        self.lock = threading.Lock()
        self.calls = []
        self.result = result
        self.exc = None

    def __call__(self, n, tiers):
        with self.lock:
            self.calls.append((n, tiers))
            if self.exc is not None:
                raise self.exc
            return self.result if self.result is not None else (1, n)

    def count(self):
        with self.lock:
            return len(self.calls)


def non_daemon_threads():
    return {t for t in threading.enumerate() if not t.daemon and t.is_alive()}


def timer_threads():
    return {t for t in threading.enumerate() if t.name == P.TIMER_THREAD_NAME and t.is_alive()}


@pytest.fixture
def start_poller():
    refs = []

    def start(cfg, evict):
        ref = PressurePoller.start(cfg, evict)
        refs.append(ref)
        return ref

    yield start
    for ref in refs:
        if ref.is_alive():
            ref.stop()


def cfg_with(source, **kw):
    base = {"enabled": True, "source": source, "interval_s": 60.0, "high": 0.85, "low": 0.75,
            "min_evict_bytes": 1}
    base.update(kw)
    return PressureConfig(**base)


def test_evicts_above_high(start_poller):
    src, ev = FakeSource(90, 100), FakeEvict()
    ref = start_poller(cfg_with(src, evict_tiers=("ram", "disk")), ev)
    out = ref.proxy().check_now().get()
    assert out["action"] == "evicted"
    assert out["reason"] == "above_watermark"
    assert (out["rows"], out["bytes"]) == (1, 15)
    assert ev.calls == [(15, ("ram", "disk"))]
    st_ = ref.proxy().status().get()
    assert st_["last_used"] == 90 and st_["last_total"] == 100
    assert st_["last_ratio"] == pytest.approx(0.9)
    assert st_["last_evicted_bytes"] == 15
    assert st_["sampled_at"] is not None and st_["last_evicted_at"] is not None
    assert st_["last_error"] is None


def test_skips_below_high(start_poller):
    src, ev = FakeSource(80, 100), FakeEvict()
    ref = start_poller(cfg_with(src), ev)
    out = ref.ask(CheckNow())
    assert out["action"] == "skipped" and out["reason"] == "below_watermark"
    assert (out["rows"], out["bytes"]) == (0, 0)
    assert ev.calls == []
    st_ = ref.ask(Status())
    assert st_["last_used"] == 80 and st_["last_evicted_bytes"] == 0
    assert st_["last_evicted_at"] is None


def test_zero_total_is_below_watermark(start_poller):
    src, ev = FakeSource(10, 0), FakeEvict()
    ref = start_poller(cfg_with(src), ev)
    assert ref.ask(CheckNow())["reason"] == "below_watermark"
    assert ev.calls == []


def test_nothing_to_evict(start_poller):
    src, ev = FakeSource(95, 100), FakeEvict(result=(0, 0))
    ref = start_poller(cfg_with(src), ev)
    out = ref.ask(CheckNow())
    assert out["action"] == "skipped" and out["reason"] == "nothing_to_evict"
    assert ev.count() == 1
    assert ref.ask(Status())["last_evicted_at"] is None


def test_disabled_skips_and_is_default(start_poller):
    src, ev = FakeSource(99, 100), FakeEvict()
    ref = start_poller(PressureConfig(source=src, min_evict_bytes=1), ev)
    st_ = ref.proxy().status().get()
    assert st_["enabled"] is False
    assert st_["source"].endswith("FakeSource") or "FakeSource" in st_["source"]
    out = ref.proxy().check_now().get()
    assert out["action"] == "skipped" and out["reason"] == "disabled"
    assert ev.calls == [] and src.calls == 0
    ref.ask(Enable(True))
    assert ref.ask(Status())["enabled"] is True
    assert ref.ask(CheckNow())["action"] == "evicted"
    ref.proxy().enable(False).get()
    assert ref.ask(CheckNow())["reason"] == "disabled"


def test_status_reports_config(start_poller):
    cfg = PressureConfig(source="noop", interval_s=2.5, high=0.9, low=0.5, min_evict_bytes=7,
                         evict_tiers=("disk",))
    ref = start_poller(cfg, FakeEvict())
    st_ = ref.ask(Status())
    for key in ("enabled", "source", "interval_s", "high", "low", "min_evict_bytes", "evict_tiers",
                "last_used", "last_total", "last_ratio", "last_evicted_bytes", "sampled_at",
                "last_evicted_at", "last_error"):
        assert key in st_
    assert st_["source"] == "noop"
    assert (st_["interval_s"], st_["high"], st_["low"]) == (2.5, 0.9, 0.5)
    assert st_["min_evict_bytes"] == 7 and st_["evict_tiers"] == ("disk",)


def test_enable_rejects_non_bool(start_poller):
    ref = start_poller(cfg_with(FakeSource()), FakeEvict())
    with pytest.raises(errors.InvalidParameter, match="flag"):
        ref.proxy().enable("yes").get()
    assert ref.is_alive()


def test_periodic_ticks_and_stop_cancels_timer():
    threads_before = non_daemon_threads()
    timers_before = timer_threads()
    src, ev = FakeSource(95, 100), FakeEvict()
    ref = PressurePoller.start(cfg_with(src, interval_s=0.05), ev)
    try:
        wait_until(lambda: ev.count() >= 2, what=lambda: f"two evict calls (only {ev.count()})")
        assert len(non_daemon_threads() - threads_before) == 1  # the actor's thread
    finally:
        ref.stop()
    n = ev.count()
    wait_until(lambda: non_daemon_threads() == threads_before,
               what=lambda: f"the actor's thread to end ({non_daemon_threads() - threads_before})")
    wait_until(lambda: timer_threads() <= timers_before,
               what=lambda: f"the timer threads to end ({timer_threads() - timers_before})")
    # nothing is left that could tick: the actor exited normally and its timer was cancelled
    assert S.exit_reason(ref).kind == "normal" and ev.count() == n


def test_stop_cancels_a_pending_timer():
    timers_before = timer_threads()
    ref = PressurePoller.start(cfg_with(FakeSource(), interval_s=60.0), FakeEvict())
    try:
        assert wait_until(lambda: len(timer_threads() - timers_before) == 1)
    finally:
        ref.stop()
    # a cancelled timer thread ends at once; an uncancelled one would wait 60 s
    assert wait_until(lambda: timer_threads() <= timers_before, timeout=2.0)


def test_disable_cancels_the_pending_timer(start_poller):
    timers_before = timer_threads()
    ref = start_poller(cfg_with(FakeSource(), interval_s=60.0), FakeEvict())
    assert wait_until(lambda: len(timer_threads() - timers_before) == 1)
    ref.ask(Enable(False))
    assert wait_until(lambda: timer_threads() <= timers_before, timeout=2.0)
    ref.ask(Enable(True))
    assert wait_until(lambda: len(timer_threads() - timers_before) == 1)


def test_disable_stops_ticks_and_enable_rearms(start_poller):
    timers_before = timer_threads()
    src, ev = FakeSource(95, 100), FakeEvict()
    ref = start_poller(cfg_with(src, interval_s=0.05), ev)
    assert wait_until(lambda: ev.count() >= 1)
    ref.ask(Enable(False))
    n = ev.count()
    # disabled: the pending timer is cancelled (its thread ends) and a tick already told is stale
    wait_until(lambda: timer_threads() <= timers_before, what="the cancelled timer's thread to end")
    assert ref.ask(Status())["enabled"] is False and ev.count() == n
    ref.ask(Enable(True))
    ref.ask(Enable(True))  # idempotent: still one timer
    assert wait_until(lambda: ev.count() >= n + 2)
    assert len(timer_threads()) <= 1


def test_no_ticks_when_disabled():
    src, ev = FakeSource(95, 100), FakeEvict()
    timers_before = timer_threads()
    ref = PressurePoller.start(PressureConfig(source=src, interval_s=0.02), ev)
    try:
        # started disabled: no timer is ever armed, so nothing can tick
        assert ref.ask(Status())["enabled"] is False and timer_threads() <= timers_before
        assert src.calls == 0 and ev.calls == []
    finally:
        ref.stop()


def test_raising_source_does_not_kill_actor(start_poller):
    src, ev = FakeSource(95, 100), FakeEvict()
    src.exc = RuntimeError("boom")
    ref = start_poller(cfg_with(src, interval_s=0.05), ev)
    # periodic ticks keep coming despite the failures
    assert wait_until(lambda: src.calls >= 3)
    assert ref.is_alive()
    out = ref.ask(CheckNow())
    assert out["action"] == "skipped" and out["reason"] == "source_error"
    st_ = ref.ask(Status())
    assert "boom" in st_["last_error"] and st_["last_error"].startswith("source")
    assert ev.calls == []
    src.exc = None
    assert wait_until(lambda: ev.count() >= 1)
    assert ref.ask(CheckNow())["action"] == "evicted"


def test_garbage_source_is_an_error(start_poller):
    ref = start_poller(cfg_with(lambda: None), FakeEvict())
    assert ref.ask(CheckNow())["reason"] == "source_error"
    assert ref.ask(Status())["last_error"] is not None
    assert ref.is_alive()


def test_raising_evict_does_not_kill_actor(start_poller):
    src, ev = FakeSource(95, 100), FakeEvict()
    ev.exc = OSError("disk gone")
    ref = start_poller(cfg_with(src, interval_s=0.05), ev)
    assert wait_until(lambda: ev.count() >= 3)
    assert ref.is_alive()
    out = ref.proxy().check_now().get()
    assert out["action"] == "skipped" and out["reason"] == "evict_error"
    st_ = ref.proxy().status().get()
    assert "disk gone" in st_["last_error"] and st_["last_error"].startswith("evict")
    assert st_["last_used"] == 95  # the sample was still recorded
    ev.exc = None
    assert ref.ask(CheckNow())["action"] == "evicted"


def test_stop_exit_is_normal():
    ref = PressurePoller.start(cfg_with(FakeSource(), interval_s=0.05), FakeEvict())
    ref.stop()
    assert S.exit_reason(ref).kind == "normal"


def test_runs_under_a_supervisor():
    timers_before = timer_threads()
    src, ev = FakeSource(95, 100), FakeEvict()
    sup = S.start_supervisor(S.SupFlags(), [P.child_spec(cfg_with(src, interval_s=0.05), ev)])
    try:
        (child,) = S.which_children(sup)
        assert child.id == "pressure"
        assert wait_until(lambda: ev.count() >= 2)
        assert child.ref.ask(Status())["enabled"] is True
    finally:
        S.stop_supervisor(sup)
    n = ev.count()
    # the supervisor stopped the poller, whose stop cancelled its timer: nothing can tick
    assert not child.ref.is_alive() and S.exit_reason(child.ref).kind == "shutdown"
    wait_until(lambda: timer_threads() <= timers_before, what="the poller's timer thread to end")
    assert ev.count() == n
