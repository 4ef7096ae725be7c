"""Restart intensity, escalation through nested supervisors, shutdown timeouts, monitors,
the name registry and auto-shutdown."""

from __future__ import annotations

import threading
import time

import pykka
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests_threads import no_actor_threads_left  # noqa: F401  (autouse fixture)

import supervision as S

from supervision_helpers import Events, Worker, refs, wait_until, worker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def crash_and_wait(sup, child_id):
    old = refs(sup)[child_id]
    old.tell("crash")
    wait_until(lambda: not old.is_alive(), what=f"{child_id} exited")
    return old


# ---- the pure window ------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(intensity=st.integers(0, 6), period=st.floats(0.5, 20),
       gaps=st.lists(st.floats(0, 10), min_size=1, max_size=40))
def test_window_matches_brute_force(intensity, period, gaps):
    window = S.RestartWindow(intensity, period)
    now, times = 0.0, []
    for gap in gaps:
        now += gap
        times.append(now)
        in_window = [t for t in times if t > now - period]
        assert window.add(now) == (len(in_window) <= intensity)
        assert len(window) == len(in_window)


# ---- escalation ---------------------------------------------------------------------------

def test_intensity_exceeded_escalates_and_stops_everything():
    ev = Events()
    downs = []
    sup = S.start_supervisor(S.SupFlags(S.Strategy.ONE_FOR_ONE, intensity=2, period=5.0),
                             [worker("a", ev), worker("b", ev)])
    S.monitor(sup, downs.append)
    for _ in range(2):
        old = crash_and_wait(sup, "a")
        wait_until(lambda: refs(sup)["a"] not in (None, old), what="a restarted")
    b = refs(sup)["b"]
    refs(sup)["a"].tell("crash")  # the third restart within 5 s: more than intensity 2
    wait_until(lambda: downs, what="supervisor down")
    (down,) = downs
    assert down.reason.abnormal and isinstance(down.reason.error, S.RestartIntensityExceeded)
    assert "more than 2 restarts within 5.0 s" in str(down.reason.error)
    assert not sup.is_alive() and not b.is_alive()
    assert ("stop", "b") in ev.take()


def test_crashes_spread_beyond_the_period_do_not_escalate():
    ev = Events()
    clock = FakeClock()
    sup = S.start_supervisor(S.SupFlags(S.Strategy.ONE_FOR_ONE, intensity=2, period=5.0),
                             [worker("a", ev)], clock=clock)
    for _ in range(8):
        old = crash_and_wait(sup, "a")
        wait_until(lambda: refs(sup)["a"] not in (None, old), what="a restarted")
        clock.now += 2.6  # two restarts per 5.2 s: never more than 2 within 5 s
    assert sup.is_alive()
    clock.now += 0.1
    for _ in range(2):  # now three inside one window
        old = crash_and_wait(sup, "a")
        if _ == 0:
            wait_until(lambda: refs(sup)["a"] not in (None, old), what="a restarted")
    wait_until(lambda: not sup.is_alive(), what="supervisor gave up")


def test_start_failures_of_dynamic_children_consume_no_intensity():
    ev = Events()
    sup = S.start_supervisor(S.SupFlags(S.Strategy.ONE_FOR_ONE, intensity=1, period=60.0), [worker("a", ev)])
    for i in range(5):
        with pytest.raises(S.StartError):
            S.start_child(sup, worker(f"bad{i}", ev, plan={1: "fail_start"}))
    old = crash_and_wait(sup, "a")  # one restart is still allowed
    wait_until(lambda: refs(sup)["a"] not in (None, old), what="a restarted")
    assert sup.is_alive()
    S.stop_supervisor(sup)


def test_a_child_that_cannot_restart_escalates_instead_of_spinning():
    ev = Events()
    downs = []
    plan = {n: "fail_start" for n in range(2, 100)}
    sup = S.start_supervisor(S.SupFlags(S.Strategy.ONE_FOR_ONE, intensity=3, period=30.0),
                             [worker("a", ev, plan=plan)])
    S.monitor(sup, downs.append)
    t0 = time.monotonic()
    refs(sup)["a"].tell("crash")
    wait_until(lambda: downs, timeout=10, what="escalation")
    attempts = [e for e in ev.take() if e[0] == "start_failed"]
    # 1 restart + retries with backoff, each counted: intensity 3 allows 3, the 4th escalates
    assert len(attempts) == 3, attempts
    assert time.monotonic() - t0 > 0.05 + 0.1  # backoff between attempts, no busy loop
    assert isinstance(downs[0].reason.error, S.RestartIntensityExceeded)


def test_nested_escalation_handled_by_parent_and_orderly_stop():
    ev = Events()
    inner = [worker("x", ev), worker("y", ev)]
    inner_spec = S.ChildSpec(
        "inner", lambda: S.Supervisor.start(S.SupFlags(S.Strategy.ONE_FOR_ONE, intensity=0, period=5.0), inner),
        type=S.ChildType.SUPERVISOR)
    root = S.start_supervisor(S.SupFlags(S.Strategy.ONE_FOR_ONE, intensity=3, period=5.0),
                              [worker("w0", ev), inner_spec, worker("w2", ev)])
    assert ev.take() == [("start", "w0"), ("start", "x"), ("start", "y"), ("start", "w2")]
    before = refs(root)
    inner_ref = before["inner"]
    x = refs(inner_ref)["x"]
    x.tell("crash")  # intensity 0: the inner supervisor gives up at once
    wait_until(lambda: refs(root)["inner"] not in (None, inner_ref), what="inner restarted by root")
    after = refs(root)
    assert after["w0"] == before["w0"] and after["w2"] == before["w2"]
    assert ev.take() == [("crash", "x"), ("stop", "y"), ("start", "x"), ("start", "y")]
    assert S.count_children(root) == {"specs": 3, "active": 3, "supervisors": 1, "workers": 2}
    S.stop_supervisor(root)
    assert ev.take() == [("stop", "w2"), ("stop", "y"), ("stop", "x"), ("stop", "w0")]


# ---- shutdown ---------------------------------------------------------------------------------

def test_a_child_hanging_in_stop_is_abandoned_after_its_timeout():
    ev = Events()
    sup = S.start_supervisor(S.SupFlags(), [worker("slow", ev, stop_delay=2.5, shutdown=0.2), worker("b", ev)])
    slow = refs(sup)["slow"]
    t0 = time.monotonic()
    S.terminate_child(sup, "slow")
    elapsed = time.monotonic() - t0
    assert 0.2 <= elapsed < 2.0  # shutdown 0.2 s + the kill grace, not the 2.5 s on_stop
    assert S.count_children(sup)["active"] == 1  # the supervisor carries on
    assert refs(sup)["slow"] is None
    S.stop_supervisor(sup)
    ev.wait_for(("stop", "slow"), timeout=5)  # the abandoned thread ends on its own
    assert not slow.is_alive()


def test_brutal_kill_skips_on_stop_and_fails_queued_asks():
    ev = Events()
    sup = S.start_supervisor(S.SupFlags(), [worker("k", ev, shutdown=S.BRUTAL_KILL)])
    k = refs(sup)["k"]
    busy = k.ask(("sleep", 0.3), block=False)
    queued = k.ask("whoami", block=False)
    ev.wait_for(("busy", "k"))  # the sleep is the current message, "whoami" waits behind it
    S.terminate_child(sup, "k")
    assert busy.get(timeout=2) == "slept"  # the current message finishes
    with pytest.raises(pykka.ActorDeadError):
        queued.get(timeout=2)
    assert ("stop", "k") not in ev.take()
    assert S.exit_reason(k).kind == "killed"
    S.stop_supervisor(sup)


def test_infinity_waits_for_a_slow_stop():
    ev = Events()
    sup = S.start_supervisor(S.SupFlags(), [worker("s", ev, stop_delay=0.3, shutdown=S.INFINITY)])
    t0 = time.monotonic()
    S.stop_supervisor(sup)
    assert time.monotonic() - t0 >= 0.3 and ("stop", "s") in ev.take()


# ---- monitors ----------------------------------------------------------------------------------

def test_monitor_reports_why():
    ev = Events()
    got = []
    a = Worker.start("m1", ev)
    b = Worker.start("m2", ev)
    S.monitor(a, got.append)
    S.monitor(b, got.append)
    m3 = S.monitor(b, got.append)
    S.demonitor(m3)
    a.tell("crash")
    b.stop()
    wait_until(lambda: len(got) == 2, what="two downs")
    by_ref = {d.actor_ref: d.reason for d in got}
    assert by_ref[a].kind == "error" and isinstance(by_ref[a].error, RuntimeError)
    assert by_ref[b].kind == "normal" and not by_ref[b].abnormal
    late = []
    S.monitor(a, late.append)  # already dead
    assert late and late[0].reason.kind in ("error", "noproc")


def test_monitor_delivers_to_an_actor():
    class Watcher(S.Actor):
        def __init__(self):
            super().__init__()
            self.seen = []

        def on_receive(self, message):
            if isinstance(message, S.Down):
                self.seen.append(message.reason.kind)
            elif message == "seen":
                return list(self.seen)

    ev = Events()
    watcher = Watcher.start()
    target = Worker.start("m3", ev)
    S.monitor(target, watcher)
    target.tell("crash")
    wait_until(lambda: watcher.ask("seen") == ["error"], what="watcher told")
    watcher.stop()


def test_on_start_failure_is_an_abnormal_exit():
    ev = Events()
    Worker.incarnations.pop("f", None)
    ref = Worker.start("f", ev, {1: "fail_start"})
    wait_until(lambda: not ref.is_alive(), what="exit")
    reason = S.exit_reason(ref)
    assert reason.kind == "error" and "refuses" in str(reason.error)


# ---- the name registry ---------------------------------------------------------------------------

def test_a_name_follows_restarts():
    ev = Events()
    sup = S.start_supervisor(S.SupFlags(intensity=5), [worker("a", ev, name="svc")])
    first = S.registry.ask("svc", "whoami")[1]
    S.registry.tell("svc", "crash")
    second = S.registry.ask("svc", "whoami")[1]  # reaches the restarted actor
    assert first != second
    assert S.registry.whereis("svc").actor_urn == second
    S.stop_supervisor(sup)
    with pytest.raises(S.NameNotFound):
        S.registry.whereis("svc")


def test_lookup_during_a_slow_restart_waits_or_fails_clearly():
    ev = Events()
    sup = S.start_supervisor(S.SupFlags(intensity=5),
                             [worker("a", ev, name="slow", plan={2: ("slow_start", 0.4), 3: ("slow_start", 1.0)})])
    old = S.registry.whereis("slow")
    old.tell("crash")
    wait_until(lambda: not old.is_alive(), what="exit")
    t0 = time.monotonic()
    new = S.registry.whereis("slow", timeout=3)
    assert new != old and new.is_alive() and time.monotonic() - t0 < 3
    new.tell("crash")
    wait_until(lambda: not new.is_alive(), what="exit")
    with pytest.raises(S.NameUnavailable, match="restarting"):
        S.registry.whereis("slow", timeout=0.1)
    assert S.registry.whereis("slow", timeout=3).is_alive()
    S.stop_supervisor(sup)


def test_a_name_of_a_child_not_restarted_goes_away():
    ev = Events()
    sup = S.start_supervisor(S.SupFlags(), [worker("t", ev, name="tmp", restart=S.Restart.TEMPORARY)])
    S.registry.whereis("tmp").tell("crash")
    wait_until(lambda: "tmp" not in S.registry.names(), what="name dropped")
    with pytest.raises(S.NameNotFound):
        S.registry.whereis("tmp")
    S.stop_supervisor(sup)


def test_registry_rules():
    ev = Events()
    a = Worker.start("r1", ev)
    b = Worker.start("r2", ev)
    S.registry.register("plain", a)
    with pytest.raises(S.NameTaken):
        S.registry.register("plain", b)
    a.stop()
    with pytest.raises(S.NameNotFound):  # unsupervised: gone with its actor
        S.registry.whereis("plain")
    S.registry.register("plain", b)
    assert S.registry.whereis("plain") == b
    S.registry.unregister("plain")
    b.stop()


# ---- auto shutdown -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, stops_after", [(S.AutoShutdown.ANY_SIGNIFICANT, 1),
                                               (S.AutoShutdown.ALL_SIGNIFICANT, 2)])
def test_auto_shutdown_on_significant_children(mode, stops_after):
    ev = Events()
    downs = []
    specs = [worker("s1", ev, restart=S.Restart.TRANSIENT, significant=True),
             worker("s2", ev, restart=S.Restart.TRANSIENT, significant=True), worker("w", ev)]
    sup = S.start_supervisor(S.SupFlags(auto_shutdown=mode), specs)
    S.monitor(sup, downs.append)
    for i, name in enumerate(["s1", "s2"], start=1):
        ref = refs(sup)[name]
        ref.tell("stop")
        wait_until(lambda: not ref.is_alive(), what=f"{name} stopped")
        if i < stops_after:
            # the supervisor handled the exit (kept the transient spec, not restarted) and lives on
            wait_until(lambda: refs(sup)[name] is None, what=f"the supervisor to see {name} exit")
            assert sup.is_alive() and S.count_children(sup)["active"] == 2
        else:
            wait_until(lambda: downs, what="supervisor shut down")
            assert not downs[0].reason.abnormal
            break
    wait_until(lambda: ("stop", "w") in ev.items, what="w stopped")


# ---- regressions found in review -------------------------------------------------------------

def test_brutal_kill_ends_an_idle_child():
    ev = Events()
    sup = S.start_supervisor(S.SupFlags(), [worker("idle", ev, shutdown=S.BRUTAL_KILL)])
    ref = refs(sup)["idle"]
    t0 = time.monotonic()
    S.terminate_child(sup, "idle")
    assert time.monotonic() - t0 < 0.5 and not ref.is_alive()
    assert S.exit_reason(ref).kind == "killed" and ("stop", "idle") not in ev.take()
    S.stop_supervisor(sup)


def test_a_name_clash_is_a_start_error_and_leaks_nothing():
    ev = Events()
    holder = Worker.start("holder", ev)
    S.registry.register("clash", holder)
    try:
        with pytest.raises(S.StartError, match="clash"):
            S.start_supervisor(S.SupFlags(), [worker("a", ev), worker("b", ev, name="clash")])
        items = ev.take()
        assert ("stop", "a") in items  # the started sibling was stopped
        assert S.registry.whereis("clash") == holder
    finally:
        S.registry.unregister("clash")
        holder.stop()


def test_a_failed_group_restart_resumes_in_order():
    ev = Events()
    sup = S.start_supervisor(S.SupFlags(S.Strategy.REST_FOR_ONE, intensity=5),
                             [worker("a", ev), worker("b", ev, plan={2: "fail_start"}), worker("c", ev)])
    ev.take()
    old_c = refs(sup)["c"]
    refs(sup)["b"].tell("crash")
    wait_until(lambda: refs(sup)["c"] not in (None, old_c), what="c restarted")
    assert ev.take() == [("crash", "b"), ("stop", "c"), ("start_failed", "b"), ("start", "b"), ("start", "c")]
    S.stop_supervisor(sup)


def test_terminate_child_cancels_a_pending_restart():
    ev = Events()
    plan = {n: "fail_start" for n in range(2, 50)}
    sup = S.start_supervisor(S.SupFlags(intensity=20, period=60.0), [worker("a", ev, plan=plan)])
    refs(sup)["a"].tell("crash")
    ev.wait_for(("start_failed", "a"))
    S.terminate_child(sup, "a")
    n = len(ev.take())
    # the pending retry's timer fires and tells the supervisor, which handles that message
    # before the which_children below and ignores it: no start attempt follows
    retries = [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.args[:1] == (sup,)]
    wait_until(lambda: not any(t.is_alive() for t in retries), what="the pending backoff to fire")
    assert refs(sup)["a"] is None and ev.take() == [] and n >= 1
    S.stop_supervisor(sup)


def test_a_stray_message_does_not_kill_the_supervisor():
    sup = S.start_supervisor(S.SupFlags(), [])
    sup.tell("junk")
    assert S.count_children(sup)["active"] == 0 and sup.is_alive()
    S.stop_supervisor(sup)


def test_registry_ask_does_not_resend_to_a_live_actor():
    calls = []

    class Raiser(S.Actor):
        def on_receive(self, message):
            calls.append(message)
            raise pykka.ActorDeadError("my own answer")

    ref = Raiser.start()
    S.registry.register("raiser", ref)
    try:
        with pytest.raises(pykka.ActorDeadError, match="my own answer"):
            S.registry.ask("raiser", "hello", timeout=1)
        assert calls == ["hello"]
    finally:
        S.registry.unregister("raiser")
        ref.stop()


def test_tells_left_in_the_inbox_reach_on_undelivered():
    seen = []
    gate = threading.Event()

    class Busy(S.Actor):
        def on_receive(self, message):
            if message == "block":
                gate.wait(5)
                raise RuntimeError("dies with tells queued")

        def on_undelivered(self, message):
            seen.append(message)

    ref = Busy.start()
    ref.tell("block")
    ref.tell("late-1")
    ref.tell("late-2")
    gate.set()
    wait_until(lambda: not ref.is_alive() and S.exit_reason(ref) is not None, what="exit")
    wait_until(lambda: seen == ["late-1", "late-2"], what="undelivered tells")
