"""Supervisor strategies, restart types, start/stop order, with real pykka actors."""

from __future__ import annotations

import pykka
import pytest
from tests_threads import no_actor_threads_left  # noqa: F401  (autouse fixture)

import supervision as S

from supervision_helpers import Events, refs, wait_until, worker

FLAGS = dict(intensity=10, period=5.0)


def start(strategy, specs, **flags):
    return S.start_supervisor(S.SupFlags(strategy, **{**FLAGS, **flags}), specs)


def test_start_in_order_stop_in_reverse():
    ev = Events()
    sup = start(S.Strategy.ONE_FOR_ONE, [worker(n, ev) for n in "abc"])
    assert ev.take() == [("start", "a"), ("start", "b"), ("start", "c")]
    assert S.count_children(sup) == {"specs": 3, "active": 3, "supervisors": 0, "workers": 3}
    S.stop_supervisor(sup)
    assert ev.take() == [("stop", "c"), ("stop", "b"), ("stop", "a")]
    assert not sup.is_alive()


def test_one_for_one_restarts_only_the_crashed_child():
    ev = Events()
    sup = start(S.Strategy.ONE_FOR_ONE, [worker(n, ev) for n in "abc"])
    before = refs(sup)
    ev.take()
    before["b"].tell("crash")
    wait_until(lambda: refs(sup)["b"] not in (None, before["b"]), what="b restarted")
    after = refs(sup)
    assert after["a"] == before["a"] and after["c"] == before["c"]
    assert ev.take() == [("crash", "b"), ("start", "b")]
    S.stop_supervisor(sup)


def test_one_for_all_restarts_everyone_in_order():
    ev = Events()
    sup = start(S.Strategy.ONE_FOR_ALL, [worker(n, ev) for n in "abc"])
    before = refs(sup)
    ev.take()
    before["b"].tell("crash")
    wait_until(lambda: all(r is not None and r != before[k] for k, r in refs(sup).items()), what="all restarted")
    assert ev.take() == [("crash", "b"), ("stop", "c"), ("stop", "a"),
                         ("start", "a"), ("start", "b"), ("start", "c")]
    S.stop_supervisor(sup)


def test_rest_for_one_restarts_the_crashed_child_and_later_ones():
    ev = Events()
    sup = start(S.Strategy.REST_FOR_ONE, [worker(n, ev) for n in "abcd"])
    before = refs(sup)
    ev.take()
    before["b"].tell("crash")
    wait_until(lambda: refs(sup)["d"] not in (None, before["d"]), what="d restarted")
    after = refs(sup)
    assert after["a"] == before["a"]
    assert all(after[k] != before[k] for k in "bcd")
    assert ev.take() == [("crash", "b"), ("stop", "d"), ("stop", "c"),
                         ("start", "b"), ("start", "c"), ("start", "d")]
    S.stop_supervisor(sup)


def test_temporary_children_are_not_restarted_by_a_sibling_restart():
    ev = Events()
    sup = start(S.Strategy.ONE_FOR_ALL, [worker("a", ev), worker("t", ev, restart=S.Restart.TEMPORARY),
                                         worker("c", ev)])
    ev.take()
    refs(sup)["a"].tell("crash")
    wait_until(lambda: [c.id for c in S.which_children(sup)] == ["a", "c"]
               and all(c.ref is not None for c in S.which_children(sup)), what="restart without t")
    assert ("start", "t") not in ev.take()
    S.stop_supervisor(sup)


@pytest.mark.parametrize("restart, how, restarted", [
    (S.Restart.PERMANENT, "crash", True), (S.Restart.PERMANENT, "stop", True),
    (S.Restart.TRANSIENT, "crash", True), (S.Restart.TRANSIENT, "stop", False),
    (S.Restart.TEMPORARY, "crash", False), (S.Restart.TEMPORARY, "stop", False),
])
def test_restart_types(restart, how, restarted):
    ev = Events()
    sup = start(S.Strategy.ONE_FOR_ONE, [worker("w", ev, restart=restart), worker("z", ev)])
    old = refs(sup)["w"]
    ev.take()
    old.tell(how)
    wait_until(lambda: not old.is_alive(), what="w exited")
    if restarted:
        wait_until(lambda: refs(sup).get("w") not in (None, old), what="w restarted")
    else:
        # a restart would happen while the supervisor handles the exit; wait for that handling
        wait_until(lambda: refs(sup).get("w") != old, what="the supervisor to see w exit")
        kids = refs(sup)
        assert kids.get("w") is None
        assert ("w" in kids) == (restart is S.Restart.TRANSIENT)  # a static transient spec stays
    S.stop_supervisor(sup)


def test_exception_in_an_ask_is_returned_and_the_child_lives():
    ev = Events()
    sup = start(S.Strategy.ONE_FOR_ONE, [worker("w", ev)])
    ref = refs(sup)["w"]
    with pytest.raises(ValueError, match="bad request"):
        ref.ask("fail_ask")
    assert ref.ask("whoami")[1] == ref.actor_urn and refs(sup)["w"] == ref
    S.stop_supervisor(sup)


def test_exception_in_on_start_at_restart_is_retried_until_it_starts():
    ev = Events()
    # incarnation 2 fails in on_start; incarnation 3 comes up
    sup = start(S.Strategy.ONE_FOR_ONE, [worker("w", ev, plan={2: "fail_start"})], intensity=5)
    old = refs(sup)["w"]
    ev.take()
    old.tell("crash")
    wait_until(lambda: refs(sup)["w"] not in (None, old), what="w back")
    assert ev.take() == [("crash", "w"), ("start_failed", "w"), ("start", "w")]
    S.stop_supervisor(sup)


def test_static_start_failure_fails_the_supervisor_start():
    ev = Events()
    specs = [worker("a", ev), worker("b", ev, plan={1: "fail_start"}), worker("c", ev)]
    with pytest.raises(S.StartError, match="'b' failed to start") as info:
        start(S.Strategy.ONE_FOR_ONE, specs)
    assert isinstance(info.value.cause, RuntimeError) and "refuses" in str(info.value.cause)
    assert ev.take() == [("start", "a"), ("start_failed", "b"), ("stop", "a")]


def test_dynamic_children():
    ev = Events()
    from supervision_helpers import Worker

    tmpl = S.ChildSpec("w", lambda name: Worker.start(name, ev), restart=S.Restart.TRANSIENT)
    sup = S.start_supervisor(S.SupFlags(S.Strategy.SIMPLE_ONE_FOR_ONE, intensity=5), [tmpl])
    assert S.which_children(sup) == []
    r1 = S.start_child(sup, "one")
    r2 = S.start_child(sup, "two")
    assert [c.ref for c in S.which_children(sup)] == [r1, r2]
    assert S.count_children(sup) == {"specs": 1, "active": 2, "supervisors": 0, "workers": 2}
    r1.tell("crash")  # transient + abnormal: restarted with the same args
    wait_until(lambda: len(S.which_children(sup)) == 2 and r1 not in [c.ref for c in S.which_children(sup)]
               and all(c.ref for c in S.which_children(sup)), what="one restarted")
    new1 = [c.ref for c in S.which_children(sup) if c.ref != r2][0]
    assert new1.ask("whoami")[0] == "one"
    S.terminate_child(sup, r2)
    assert not r2.is_alive() and [c.ref for c in S.which_children(sup)] == [new1]
    new1.tell("stop")  # transient + normal: gone
    wait_until(lambda: S.which_children(sup) == [], what="one gone")
    with pytest.raises(LookupError):
        S.terminate_child(sup, r2)
    S.stop_supervisor(sup)


def test_static_child_management():
    ev = Events()
    sup = start(S.Strategy.ONE_FOR_ONE, [worker("a", ev)])
    ref = S.start_child(sup, worker("b", ev))
    assert [c.id for c in S.which_children(sup)] == ["a", "b"] and ref.is_alive()
    with pytest.raises(ValueError, match="already exists"):
        S.start_child(sup, worker("b", ev))
    S.terminate_child(sup, "b")
    assert not ref.is_alive() and refs(sup)["b"] is None
    with pytest.raises(ValueError, match="running"):
        S.delete_child(sup, "a")
    again = S.restart_child(sup, "b")
    assert again.is_alive() and again != ref
    S.terminate_child(sup, "b")
    S.delete_child(sup, "b")
    assert [c.id for c in S.which_children(sup)] == ["a"]
    with pytest.raises(S.StartError):
        S.start_child(sup, worker("bad", ev, plan={1: "fail_start"}))
    assert [c.id for c in S.which_children(sup)] == ["a"]
    S.stop_supervisor(sup)


def test_bad_specs_and_flags():
    with pytest.raises(ValueError, match="intensity"):
        S.SupFlags(intensity=-1)
    with pytest.raises(ValueError, match="period"):
        S.SupFlags(period=0)
    with pytest.raises(ValueError, match="callable"):
        S.ChildSpec("x", "not callable")
    with pytest.raises(ValueError, match="significant"):
        S.ChildSpec("x", lambda: None, significant=True)
    with pytest.raises(ValueError, match="shutdown"):
        S.ChildSpec("x", lambda: None, shutdown=-1)
    assert S.ChildSpec("x", lambda: None).shutdown == 5.0
    assert S.ChildSpec("x", lambda: None, type=S.ChildType.SUPERVISOR).shutdown is S.INFINITY
    ev = Events()
    with pytest.raises(S.StartError, match="not a pykka.ActorRef"):
        start(S.Strategy.ONE_FOR_ONE, [S.ChildSpec("x", lambda: 42)])
    with pytest.raises(S.StartError, match="not a supervision.Actor"):
        start(S.Strategy.ONE_FOR_ONE, [S.ChildSpec("x", pykka.ThreadingActor.start)])
    with pytest.raises(ValueError, match="duplicate"):
        S.Supervisor.start(S.SupFlags(), [worker("a", ev), worker("a", ev)])
