"""The cache index: quotas hold at every step, LRU order, refcounts, prefix lengths."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from erllama import errors
from erllama.cache.index import TIERS, AlreadyPresent, Conflict, Index, NoRoom, RowStatus

QUOTAS = {"ram": 1000, "ram_file": 2000, "disk": 4000}
G1, G2 = b"g1" * 16, b"g2" * 16


def k(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


def test_reserve_publish_lookup():
    idx = Index(QUOTAS)
    row = idx.reserve(k(1), G1, 10, "ram", 300)
    assert row.status is RowStatus.WRITING and idx.used["ram"] == 300
    assert idx.lookup_exact(k(1)) is None  # not visible while written
    with pytest.raises(Conflict):
        idx.reserve(k(1), G1, 10, "ram", 300)
    idx.publish(k(1), now=5.0, location="slab")
    assert idx.lookup_exact(k(1)).location == "slab"
    with pytest.raises(AlreadyPresent):
        idx.reserve(k(1), G1, 10, "disk", 300)
    with pytest.raises(NoRoom, match="ram has 700 of 1000"):
        idx.reserve(k(2), G1, 20, "ram", 701)
    assert idx.candidate_lengths(G1, 100) == [10] and idx.candidate_lengths(G1, 9) == []
    assert idx.candidate_lengths(G2, 100) == []
    with pytest.raises(errors.ConfigError, match="tier"):
        Index({"tape": 1})


def test_plan_room_takes_least_recent_unreferenced_rows():
    idx = Index(QUOTAS)
    for i, t in enumerate([1.0, 3.0, 2.0]):
        idx.insert_available(k(i), G1, 10 + i, "ram", 300, now=t)
    idx.checkout(k(0), now=0.5)  # referenced: never a victim
    assert [r.key for r in idx.plan_room("ram", 200)] == [k(2)]  # oldest unreferenced
    assert idx.plan_room("ram", 100) == []
    assert [r.key for r in idx.plan_room("ram", 700)] == [k(2), k(1)]
    assert idx.plan_room("ram", 701) is None  # would need the referenced row
    assert idx.plan_room("ram", 5000) is None
    idx.checkin(k(0))
    idx.checkin(k(0))  # never below zero
    assert idx.get(k(0)).refcount == 0


def test_persisted_hits_bias_recency():
    idx = Index(QUOTAS)
    idx.insert_available(k(1), G1, 10, "disk", 100, now=100.0, hits=30)
    idx.insert_available(k(2), G1, 11, "disk", 100, now=110.0, hits=0)
    assert idx.lru("disk") == [k(2), k(1)]  # 30 hits outweigh 10 s


def test_move_between_tiers():
    idx = Index(QUOTAS)
    idx.insert_available(k(1), G1, 10, "ram", 900, now=1.0)
    moving = idx.begin_move(k(1), "ram_file")
    assert moving.tier == "ram" and idx.lookup_exact(k(1)) is not None  # still readable
    assert idx.used == {"ram": 900, "ram_file": 900, "disk": 0}  # both charged while copying
    assert idx.plan_room("ram", 200) is None  # a moving row is no victim
    with pytest.raises(Conflict):
        idx.begin_move(k(1), "disk")
    moved = idx.finish_move(k(1), "/dev/shm/x")
    # the old copy stays charged until its file is reported deleted
    assert moved.tier == "ram_file" and idx.used == {"ram": 900, "ram_file": 900, "disk": 0}
    assert idx.leaving == {(k(1), "ram"): 900}
    with pytest.raises(Conflict):  # the key's old file in ram is still leaving
        idx.begin_move(k(1), "ram")
    assert idx.release(k(1), "ram") and not idx.release(k(1), "ram")
    assert idx.used == {"ram": 0, "ram_file": 900, "disk": 0}
    assert idx.lru("ram") == [] and idx.lru("ram_file") == [k(1)]
    assert idx.stats()["tiers"]["ram"]["moves_out"] == 1 and idx.stats()["tiers"]["ram_file"]["moves_in"] == 1
    assert idx.candidate_lengths(G1, 10) == [10]
    idx.insert_available(k(2), G1, 12, "disk", 3500, now=1.0)
    with pytest.raises(NoRoom):
        idx.begin_move(k(1), "disk")
    idx.begin_move(k(1), "ram")
    idx.abort_move(k(1))
    assert idx.used["ram"] == 0 and idx.get(k(1)).moving_to is None


class IndexMachine(RuleBasedStateMachine):
    """Random reserve/publish/cancel/remove/move/checkout/checkin sequences: the accounting
    always matches the rows and never exceeds a quota."""

    def __init__(self):
        super().__init__()
        self.idx = Index(QUOTAS)
        self.now = 0.0

    keys = st.integers(0, 15)
    tiers = st.sampled_from(TIERS)

    @rule(i=keys, tier=tiers, size=st.integers(0, 1500), n=st.integers(1, 50), g=st.sampled_from([G1, G2]))
    def reserve(self, i, tier, size, n, g):
        try:
            self.idx.reserve(k(i), g, n, tier, size)
        except (AlreadyPresent, Conflict, NoRoom):
            pass

    @rule(i=keys, shrink=st.integers(0, 100), hits=st.integers(0, 5))
    def publish(self, i, shrink, hits):
        row = self.idx.get(k(i))
        if row is not None and row.status is RowStatus.WRITING:
            self.now += 1
            self.idx.publish(k(i), now=self.now, size=max(0, row.size - shrink), hits=hits)

    @rule(i=keys)
    def cancel(self, i):
        self.idx.cancel(k(i))

    @rule(i=keys, hold=st.booleans(), reason=st.sampled_from(["evictions", "removed"]))
    def remove(self, i, hold, reason):
        self.idx.remove(k(i), reason=reason, hold=hold)

    @rule(i=keys, tier=tiers)
    def release(self, i, tier):
        self.idx.release(k(i), tier)

    @rule(tier=tiers, size=st.integers(0, 5000))
    def room(self, tier, size):
        room = self.idx.room(tier, size)
        if room is None:
            return
        need = self.idx.used[tier] + size - self.idx.quotas[tier]
        assert all(r.tier == tier and r.refcount == 0 and r.moving_to is None for r in room.victims)
        held = sum(r.size for r in self.idx.rows.values()
                   if r.tier == tier and r.refcount and r.status is RowStatus.AVAILABLE)
        freeable = self.idx.outgoing(tier) + self.idx.incoming(tier) + sum(r.size for r in room.victims) + held
        assert need <= 0 or freeable >= need
        assert room.wait == (need > 0 and not room.victims)

    @rule(i=keys, tier=tiers)
    def begin_move(self, i, tier):
        row = self.idx.lookup_exact(k(i))
        if row is not None and row.tier != tier:
            try:
                self.idx.begin_move(k(i), tier)
            except (NoRoom, Conflict):
                pass

    @rule(i=keys, finish=st.booleans())
    def end_move(self, i, finish):
        row = self.idx.get(k(i))
        if row is not None and row.moving_to is not None:
            if finish:
                self.idx.finish_move(k(i), None)
            else:
                self.idx.abort_move(k(i))

    @rule(i=keys)
    def checkout(self, i):
        if self.idx.lookup_exact(k(i)) is not None:
            self.now += 1
            self.idx.checkout(k(i), self.now)

    @rule(i=keys)
    def checkin(self, i):
        self.idx.checkin(k(i))

    @rule(tier=tiers, size=st.integers(0, 5000))
    def evict_for(self, tier, size):
        plan = self.idx.plan_room(tier, size)
        if plan is None:
            return
        for row in plan:
            assert row.refcount == 0 and row.status is RowStatus.AVAILABLE
            self.idx.remove(row.key)
        assert self.idx.used[tier] + size <= self.idx.quotas[tier]

    @invariant()
    def accounting(self):
        for tier in TIERS:
            rows = [r for r in self.idx.rows.values() if r.tier == tier]
            incoming = [r for r in self.idx.rows.values() if r.moving_to == tier]
            leaving = sum(n for (_, t), n in self.idx.leaving.items() if t == tier)
            assert self.idx.used[tier] == sum(r.size for r in rows) + sum(r.size for r in incoming) + leaving
            assert self.idx.used[tier] <= self.idx.quotas[tier]
            st_ = self.idx.stats()["tiers"][tier]
            assert st_["charged"] == st_["bytes"] + st_["reserved"] + st_["moving_in"] + st_["leaving"]
            assert st_["rows"] == (st_["adopted"] + st_["saves"] + st_["moves_in"] - st_["moves_out"]
                                   - st_["evictions"] - st_["removed"])
            per_group = self.idx.stats()["groups"]
            assert sum(g["rows"][tier] for g in per_group.values()) == st_["rows"]
            assert sum(g["bytes"][tier] for g in per_group.values()) == st_["bytes"]
            assert set(self.idx.lru(tier)) == {r.key for r in rows if r.status is RowStatus.AVAILABLE}
        assert all(r.refcount >= 0 for r in self.idx.rows.values())
        for g in (G1, G2):
            want = sorted({r.n_tokens for r in self.idx.rows.values()
                           if r.group == g and r.status is RowStatus.AVAILABLE}, reverse=True)
            assert self.idx.candidate_lengths(g, 10**9) == want


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
