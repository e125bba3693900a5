"""The RAM tier: budget, the policies, pins and the hot set, reservations."""
from __future__ import annotations

import pytest

from engine import EngineError
from engine.cache import ROUTER_HALF_LIFE, RamCache, detect_vram


def _fill(c: RamCache, keys, size=10):
    for k in keys:
        c.touch(k)
        assert c.insert(k, f"v{k}", size)


def test_budget_is_never_exceeded_and_lru_evicts_the_oldest():
    c = RamCache(budget=30, policy="lru")
    _fill(c, "abc")
    c.touch("a")                      # a is now the most recent
    c.touch("d")
    assert c.insert("d", "vd", 10)
    assert set(c.entries) == {"a", "c", "d"} and c.used == 30
    assert c.lookup("b") is None and c.lookup("a") == "va"
    assert c.evictions == 1


def test_lfu_keeps_the_frequent_even_when_old():
    c = RamCache(budget=30, policy="lfu")
    _fill(c, "abc")
    for _ in range(3):
        c.touch("a")
    c.touch("b")
    c.touch("d")
    c.insert("d", "vd", 10)           # c has the fewest uses
    assert set(c.entries) == {"a", "b", "d"}


@pytest.mark.parametrize("policy, survivor", [("lfu-decay", "b"), ("lfu", "a")])
def test_lfu_decay_forgets_old_popularity(policy, survivor):
    c = RamCache(budget=20, policy=policy, half_life=2.0)
    _fill(c, "ab")
    for _ in range(30):               # a was very popular long ago ...
        c.touch("a")
    for _ in range(10):               # ... then ten steps pass in which only b is used
        c.step()
        c.touch("b")
    c.touch("c")
    c.insert("c", "vc", 10)
    # Decayed frequency keeps b, the recent favourite; plain LFU keeps a's stale count.
    assert set(c.entries) == {survivor, "c"}


def test_decayed_score_matches_the_definition():
    c = RamCache(half_life=4.0, policy="lfu-decay")
    d = 0.5 ** (1 / 4.0)
    steps = [0, 0, 1, 5, 9]
    for s in steps:
        while c.step_no < s:
            c.step()
        c.touch("x")
    while c.step_no < 12:
        c.step()
    assert c.score("x") == pytest.approx(sum(d ** (12 - s) for s in steps), rel=1e-12)


def test_pins_survive_pressure_and_unpin_releases_them():
    c = RamCache(budget=30)
    _fill(c, "abc")
    c.pin(["a"])
    for k in "defg":
        c.touch(k)
        c.insert(k, k, 10)
    assert "a" in c.entries and c.used <= 30
    assert c.stats()["pinned"] == 1
    c.unpin_all()
    for k in "hij":
        c.touch(k)
        c.insert(k, k, 10)
    assert "a" not in c.entries


def test_a_full_pinned_cache_refuses_without_evicting():
    c = RamCache(budget=20)
    _fill(c, "ab")
    c.pin(["a", "b"])
    assert not c.insert("c", "vc", 10)
    assert set(c.entries) == {"a", "b"} and c.evictions == 0


def test_shrinking_evicts_at_once_and_drops_pins_that_cannot_fit():
    c = RamCache(budget=50)
    _fill(c, "abcde")
    c.pin(["a", "b", "c"])
    c.set_budget(20)
    assert c.used <= 20
    assert list(c.pins) == ["a", "b"] and set(c.entries) == {"a", "b"}
    c.set_budget(None)                # unlimited: nothing more is evicted
    _fill(c, "xyz")
    assert c.used == 50


def test_reservations_count_against_the_budget_and_cancel_leaves_nothing():
    c = RamCache(budget=30)
    _fill(c, "ab")
    assert c.reserve("r", 10)         # room for a read in flight
    assert c.used == 30 and c.lookup("r") is None
    assert not c.reserve("s", 40)     # larger than the whole budget
    assert c.reserve("s", 20)         # evicts a and b, not the pending r
    assert set(c.entries) == {"r", "s"}
    c.cancel("r")
    assert "r" not in c.entries and c.used == 20
    assert c.fill("s", "vs", 20, prefetched=True) and c.lookup("s") == "vs"
    assert c.take_prefetched("s") and not c.take_prefetched("s")


def test_reservations_and_protected_bundles_are_never_evicted_to_make_room():
    # What may be evicted is counted from the reservations and the protected keys, not by walking every
    # entry: check it against the walk after each kind of change.
    c = RamCache(budget=60)

    def evictable_by_walk():
        return sum(e.nbytes for k, e in c.entries.items() if not e.pending and not c._protected(k))

    _fill(c, "abc")
    c.pin(["a", "zz"])                  # a pin on something absent protects nothing
    assert c.reserve("r", 10) and c.reserve("s", 10)
    assert c._evictable_bytes() == evictable_by_walk() == 20
    assert not c.reserve("t", 40)       # only b and c (20) could go: refused, nothing evicted
    assert set(c.entries) == {"a", "b", "c", "r", "s"}
    c.fill("r", "vr", 15)               # a conversion changed its size
    c.cancel("s")
    assert c._evictable_bytes() == evictable_by_walk() == 35
    c.unpin_all()
    assert c.reserve("t", 35) and c._evictable_bytes() == evictable_by_walk()
    assert c.used <= 60 and "t" in c.entries


def test_unused_prefetches_are_counted_as_wasted():
    c = RamCache(budget=20)
    c.insert("p", "vp", 10, prefetched=True)
    _fill(c, "ab")
    assert "p" not in c.entries and c.prefetch_wasted == 1


def test_hot_set_protects_the_hottest():
    c = RamCache(budget=40, policy="lru", hot_fraction=0.25)
    _fill(c, "abcd")
    for _ in range(5):
        c.touch("a")
    c.step()                          # the hot set is refreshed once per step
    assert c.hot == {"a"}
    for k in "efgh":                  # LRU alone would evict a (its last use is now the oldest)
        c.touch(k)
        c.insert(k, k, 10)
    assert "a" in c.entries


def test_heap_stays_bounded_under_many_touches():
    c = RamCache(budget=100)
    _fill(c, range(10))
    for i in range(10_000):
        c.touch(i % 10)
    assert len(c._heap) <= 2 * len(c.entries) + 65


def test_unknown_policy_is_named():
    with pytest.raises(EngineError, match="policy"):
        RamCache(policy="mru")
    with pytest.raises(EngineError, match="policy"):
        RamCache().set_policy("fifo")


def test_no_vram_tier_here():
    # This machine has no GPU; the tier interface exists but nothing pretends to be a VRAM tier.
    assert detect_vram() is None


def _observe_at(c: RamCache, step: int, layer: int, probs, picked=()):
    while c.step_no < step:
        c.step()
    c.observe(layer, probs, picked)


@pytest.mark.parametrize("step, victim", [(2, (1, 0)), (3, (0, 0))])
def test_router_ranks_by_decayed_probability(step, victim):
    # (0, 0) had probability 0.8 at step 0, (1, 0) has 0.5 at `step`: with a half-life of 4 steps,
    # 0.8 * 2^(-step/4) is still above 0.5 at step 2 and below it at step 3.
    assert ROUTER_HALF_LIFE == 4.0
    c = RamCache(budget=20, policy="router")
    _observe_at(c, 0, 0, [0.8, 0.2])
    _fill(c, [(0, 0)])
    _observe_at(c, step, 1, [0.5, 0.5])
    _fill(c, [(1, 0)])
    _fill(c, [(2, 0)])                     # needs room: the lower score goes
    assert set(c.entries) == {(0, 0), (1, 0), (2, 0)} - {victim}


def test_router_keeps_the_favourite_that_lru_drops():
    # Expert 0 has high probability at every step but was not picked at the last one; expert 2 was
    # picked once with a low one, a moment later.  LRU drops 0 (the older use), router drops 2.
    survivors = {}
    for policy in ("lru", "router"):
        c = RamCache(budget=30, policy=policy)
        _observe_at(c, 0, 0, [0.5, 0.4, 0.1, 0.0], [0, 1])
        _fill(c, [(0, 0), (0, 1)])
        _observe_at(c, 1, 0, [0.45, 0.1, 0.45, 0.0], [0, 2])
        c.touch((0, 0))
        _fill(c, [(0, 2)])
        _observe_at(c, 2, 0, [0.1, 0.45, 0.05, 0.4], [1, 3])
        c.touch((0, 1))
        _fill(c, [(0, 3)])
        survivors[policy] = set(c.entries)
    assert survivors["lru"] == {(0, 1), (0, 2), (0, 3)}
    assert survivors["router"] == {(0, 0), (0, 1), (0, 3)}


def test_router_prefetched_bundle_is_not_the_next_victim():
    # A prefetched bundle ranks as if picked now with its layer's usual pick probability; unused,
    # it ages like the rest.
    c = RamCache(budget=20, policy="router")
    _observe_at(c, 0, 0, [0.6, 0.3, 0.1], [0])
    _fill(c, [(0, 0)])
    assert c.insert((0, 1), "guess", 10, prefetched=True)   # p 0.3 now, but ranked as a pick (0.6)
    _observe_at(c, 1, 1, [0.5, 0.5], [0])
    c.touch((1, 0))
    assert c.insert((1, 0), "v", 10)
    assert (0, 1) in c.entries and (0, 0) not in c.entries   # both a step old: 0.6 < 0.3 + 0.6


def test_observe_is_kept_under_every_policy_so_a_switch_starts_informed():
    c = RamCache(budget=20, policy="lru")
    _observe_at(c, 0, 0, [0.1, 0.9])
    _fill(c, [(0, 1), (0, 0)])           # lru would drop (0, 1), the older
    c.set_policy("router")
    c.touch((1, 0))
    assert c.insert((1, 0), "v", 10)
    assert set(c.entries) == {(0, 1), (1, 0)}
