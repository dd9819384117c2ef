"""Unit tests for `deployments.engine.slots.SlotPool`: pure Python, no torch, no Ray."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from deployments.engine.admission import LruAdmission, TinyLfuAdmission
from deployments.engine.slots import BASE_SLOT, SWAP_WINDOW, PoolSnapshot, SlotAssignment, SlotPool
from lora_core.errors import SlotsExhaustedError

REPO_ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self, start: float = 100.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float = 1.0) -> None:
        self.now += seconds


def _fill(pool: SlotPool, *ids: str, hold: bool = False) -> None:
    """Make each id resident, most recent last; released unless `hold`."""
    for adapter_id in ids:
        pool.acquire(adapter_id)
        if not hold:
            pool.release(adapter_id)


def _state(pool: SlotPool, ids: list[str]) -> tuple:
    snap = pool.snapshot()
    return snap, tuple(pool.slot_of(a) for a in ids), len(pool)


# ---- construction -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, "4", None, True])
def test_num_slots_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="num_slots"):
        SlotPool(bad)


def test_empty_pool_snapshot():
    snap = SlotPool(3).snapshot()
    assert snap == PoolSnapshot(
        num_slots=3,
        warm=(),
        pinned=(),
        free_slots=3,
        evictable_slots=0,
        in_flight=0,
        hits=0,
        misses=0,
        evictions=0,
        swaps=0,
        swap_ms_p50=None,
        swap_ms_p99=None,
        last_used_s={},
    )


def test_module_imports_neither_torch_nor_ray():
    code = (
        "import sys, deployments.engine.slots; "
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---- acquire: hits, misses, evictions -----------------------------------------------------


def test_first_acquire_is_a_miss_then_a_hit_on_the_same_slot():
    pool = SlotPool(2)
    first = pool.acquire("a")
    second = pool.acquire("a")
    assert first == SlotAssignment(slot=1, hit=False, evicted=None)
    assert second == SlotAssignment(slot=1, hit=True, evicted=None)
    snap = pool.snapshot()
    assert (snap.hits, snap.misses, snap.evictions) == (1, 1, 0)
    assert snap.in_flight == 2


def test_empty_slots_are_filled_lowest_first_and_slot_zero_is_never_used():
    pool = SlotPool(4)
    slots = [pool.acquire(f"a{i}").slot for i in range(4)]
    assert slots == [1, 2, 3, 4]
    assert BASE_SLOT == 0


def test_slot_zero_never_handed_out_under_churn():
    pool = SlotPool(3)
    seen = set()
    for i in range(200):
        assignment = pool.acquire(f"a{i % 7}")
        seen.add(assignment.slot)
        pool.release(f"a{i % 7}")
    assert seen == {1, 2, 3}


@pytest.mark.parametrize("bad", ["", None, 3])
def test_acquire_rejects_a_non_string_or_empty_id(bad):
    pool = SlotPool(1)
    with pytest.raises(ValueError, match="adapter_id"):
        pool.acquire(bad)
    assert len(pool) == 0


def test_counts_hits_misses_and_evictions():
    pool = SlotPool(2)
    _fill(pool, "a", "b")  # 2 misses
    _fill(pool, "a")  # hit
    result = pool.acquire("c")  # miss, evicts b
    pool.release("c")
    snap = pool.snapshot()
    assert result == SlotAssignment(slot=2, hit=False, evicted="b")
    assert (snap.hits, snap.misses, snap.evictions) == (1, 3, 1)
    assert "b" not in pool and pool.slot_of("b") is None


def test_lru_touched_adapter_survives_and_untouched_one_is_evicted():
    pool = SlotPool(3, admission="lru")
    _fill(pool, "a", "b", "c")
    _fill(pool, "a")  # a is now most recent; b is the least recent
    evicted = pool.acquire("d").evicted
    assert evicted == "b"
    assert pool.snapshot().warm == ("d", "a", "c")
    pool.release("d")
    assert pool.acquire("e").evicted == "c"


def test_evicted_adapter_slot_is_reused():
    pool = SlotPool(2, admission="lru")
    _fill(pool, "a", "b")
    slot_a = pool.slot_of("a")
    assignment = pool.acquire("c")
    assert assignment.evicted == "a"
    assert assignment.slot == slot_a


def test_in_flight_adapter_is_not_evicted():
    pool = SlotPool(2)
    pool.acquire("a")  # held by a request, and least recent
    _fill(pool, "b")
    assignment = pool.acquire("c")
    assert assignment.evicted == "b"
    assert pool.slot_of("a") == 1


def test_adapter_held_twice_needs_two_releases_before_eviction():
    pool = SlotPool(1)
    pool.acquire("a")
    pool.acquire("a")
    pool.release("a")
    with pytest.raises(SlotsExhaustedError):
        pool.acquire("b")
    pool.release("a")
    assert pool.acquire("b").evicted == "a"


def test_pinned_adapter_is_never_evicted():
    pool = SlotPool(3)
    _fill(pool, "p", "x", "y")
    pool.pin("p")  # pinned and least recent
    for i in range(50):
        assignment = pool.acquire(f"n{i}")
        assert assignment.evicted != "p"
        pool.release(f"n{i}")
    assert pool.slot_of("p") == 1
    assert pool.snapshot().pinned == ("p",)


def test_slots_exhausted_when_all_held_and_nothing_changes():
    clock = FakeClock()
    pool = SlotPool(2, clock=clock)
    pool.acquire("a")
    pool.acquire("b")
    ids = ["a", "b", "c"]
    before = _state(pool, ids)
    clock.advance(5)
    with pytest.raises(SlotsExhaustedError) as info:
        pool.acquire("c")
    assert _state(pool, ids) == before
    message = str(info.value)
    assert "2 adapter slots" in message and "2 held" in message and "0 pinned" in message
    assert info.value.status_code == 503


def test_slots_exhausted_message_counts_pinned_and_held():
    pool = SlotPool(3)
    _fill(pool, "p1", "p2")
    pool.pin("p1")
    pool.pin("p2")
    pool.acquire("h")
    with pytest.raises(SlotsExhaustedError, match=r"1 held by in-flight requests, 2 pinned"):
        pool.acquire("x")
    assert "x" not in pool


def test_slots_exhausted_error_pickles():
    pool = SlotPool(1)
    pool.acquire("a")
    with pytest.raises(SlotsExhaustedError) as info:
        pool.acquire("b")
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is SlotsExhaustedError and str(copy) == str(info.value)


def test_exhausted_pool_serves_again_after_release():
    pool = SlotPool(1)
    pool.acquire("a")
    with pytest.raises(SlotsExhaustedError):
        pool.acquire("b")
    pool.release("a")
    assert pool.acquire("b") == SlotAssignment(slot=1, hit=False, evicted="a")


# ---- release ------------------------------------------------------------------------------


def test_release_unknown_adapter_raises():
    pool = SlotPool(2)
    with pytest.raises(ValueError, match="not resident"):
        pool.release("nope")


def test_release_more_than_acquired_raises_and_keeps_refcount_at_zero():
    pool = SlotPool(2)
    pool.acquire("a")
    pool.release("a")
    with pytest.raises(ValueError, match="held by no request"):
        pool.release("a")
    snap = pool.snapshot()
    assert snap.in_flight == 0 and snap.evictable_slots == 1


def test_release_keeps_adapter_warm():
    pool = SlotPool(2)
    _fill(pool, "a")
    assert "a" in pool and pool.slot_of("a") == 1
    assert pool.acquire("a").hit


# ---- discard ------------------------------------------------------------------------------


def test_discard_frees_the_slot_for_the_next_miss():
    pool = SlotPool(2)
    _fill(pool, "a", "b")
    assert pool.discard("a") == 1
    assert "a" not in pool and len(pool) == 1
    assert pool.snapshot().free_slots == 1
    assert pool.acquire("c") == SlotAssignment(slot=1, hit=False, evicted=None)


def test_discard_after_failed_swap_keeps_the_miss_counted():
    pool = SlotPool(2)
    assignment = pool.acquire("bad")
    assert not assignment.hit
    assert pool.discard("bad", force=True) == assignment.slot
    snap = pool.snapshot()
    assert (snap.misses, snap.in_flight, snap.warm, snap.free_slots) == (1, 0, (), 2)


def test_discard_refuses_while_held_unless_forced():
    pool = SlotPool(2)
    pool.acquire("a")
    before = _state(pool, ["a"])
    with pytest.raises(ValueError, match="in-flight"):
        pool.discard("a")
    assert _state(pool, ["a"]) == before
    assert pool.discard("a", force=True) == 1
    with pytest.raises(ValueError):
        pool.release("a")  # the forced discard dropped the request's ref too


def test_discard_unknown_returns_none():
    pool = SlotPool(2)
    assert pool.discard("nope") is None
    assert pool.discard("nope", force=True) is None


def test_discard_drops_the_pin():
    pool = SlotPool(2)
    _fill(pool, "a")
    pool.pin("a")
    assert pool.discard("a") == 1
    assert pool.snapshot().pinned == ()
    _fill(pool, "b")
    pool.pin("b")  # the pin budget (1 of 2) was given back by the discard


# ---- pin / unpin --------------------------------------------------------------------------


def test_pin_requires_a_resident_adapter():
    pool = SlotPool(3)
    with pytest.raises(ValueError, match="not resident"):
        pool.pin("a")
    with pytest.raises(ValueError, match="not resident"):
        pool.unpin("a")


def test_at_most_num_slots_minus_one_pins():
    pool = SlotPool(3)
    _fill(pool, "a", "b", "c")
    pool.pin("a")
    pool.pin("b")
    with pytest.raises(ValueError, match="at most 2 of 3"):
        pool.pin("c")
    assert pool.snapshot().pinned == ("b", "a")
    pool.unpin("a")
    pool.pin("c")
    assert set(pool.snapshot().pinned) == {"b", "c"}


def test_single_slot_pool_allows_no_pins():
    pool = SlotPool(1)
    _fill(pool, "a")
    with pytest.raises(ValueError, match="at most 0 of 1"):
        pool.pin("a")


def test_pin_and_unpin_are_idempotent():
    pool = SlotPool(3)
    _fill(pool, "a", "b")
    pool.pin("a")
    pool.pin("a")  # does not spend a second pin
    pool.pin("b")
    assert len(pool.snapshot().pinned) == 2
    pool.unpin("a")
    pool.unpin("a")
    assert pool.snapshot().pinned == ("b",)


def test_pin_survives_release_and_unpin_makes_evictable():
    pool = SlotPool(2, admission="lru")
    pool.acquire("a")
    pool.pin("a")
    pool.release("a")
    _fill(pool, "b")
    assert pool.acquire("c").evicted == "b"
    pool.release("c")
    assert pool.snapshot().evictable_slots == 1  # c only; a is pinned
    pool.unpin("a")
    assert pool.snapshot().evictable_slots == 2
    assert pool.acquire("d").evicted == "a"  # a is the least recent


# ---- lookups ------------------------------------------------------------------------------


def test_slot_of_and_contains_do_not_bump_lru_or_count():
    pool = SlotPool(2, admission="lru")
    _fill(pool, "a", "b")
    before = pool.snapshot()
    assert pool.slot_of("a") == 1
    assert "a" in pool
    assert "zzz" not in pool and pool.slot_of("zzz") is None
    assert 42 not in pool
    assert pool.snapshot() == before
    assert pool.acquire("c").evicted == "a"


def test_len_counts_residents():
    pool = SlotPool(3)
    assert len(pool) == 0
    _fill(pool, "a", "b")
    assert len(pool) == 2
    pool.discard("a")
    assert len(pool) == 1


# ---- snapshot and swap stats --------------------------------------------------------------


def test_snapshot_fields():
    clock = FakeClock(10.0)
    pool = SlotPool(4, clock=clock)
    _fill(pool, "a")
    clock.advance(1)
    pool.acquire("b")  # held
    clock.advance(1)
    _fill(pool, "c")
    pool.pin("a")
    snap = pool.snapshot()
    assert snap.num_slots == 4
    assert snap.warm == ("c", "b", "a")
    assert snap.pinned == ("a",)
    assert snap.free_slots == 1
    assert snap.evictable_slots == 1  # c: b is held, a is pinned
    assert snap.in_flight == 1
    assert (snap.hits, snap.misses, snap.evictions, snap.swaps) == (0, 3, 0, 0)
    assert snap.last_used_s == {"a": 10.0, "b": 11.0, "c": 12.0}


def test_injected_clock_is_used_on_hits_too():
    clock = FakeClock(0.0)
    pool = SlotPool(2, clock=clock)
    _fill(pool, "a")
    clock.advance(7.5)
    _fill(pool, "a")
    assert pool.snapshot().last_used_s == {"a": 7.5}


def test_swap_percentiles_nearest_rank():
    pool = SlotPool(1)
    for ms in range(100, 0, -1):  # 100..1, out of order
        pool.record_swap(float(ms))
    snap = pool.snapshot()
    assert snap.swaps == 100
    assert snap.swap_ms_p50 == 50.0
    assert snap.swap_ms_p99 == 99.0


def test_swap_percentiles_single_sample():
    pool = SlotPool(1)
    pool.record_swap(3.25)
    snap = pool.snapshot()
    assert (snap.swaps, snap.swap_ms_p50, snap.swap_ms_p99) == (1, 3.25, 3.25)


def test_swap_window_is_bounded_but_count_is_not():
    pool = SlotPool(1)
    for _ in range(SWAP_WINDOW):
        pool.record_swap(1000.0)
    for _ in range(SWAP_WINDOW):
        pool.record_swap(1.0)  # pushes every 1000 ms sample out of the window
    snap = pool.snapshot()
    assert snap.swaps == 2 * SWAP_WINDOW
    assert snap.swap_ms_p50 == 1.0 and snap.swap_ms_p99 == 1.0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "5", None, True])
def test_record_swap_rejects_bad_durations(bad):
    pool = SlotPool(1)
    with pytest.raises(ValueError, match="duration_ms"):
        pool.record_swap(bad)
    assert pool.snapshot().swaps == 0


def test_to_dict_is_plain_and_complete():
    clock = FakeClock(1.0)
    pool = SlotPool(2, clock=clock, admission="lru")
    _fill(pool, "a")
    pool.record_swap(2.0)
    d = pool.snapshot().to_dict()
    assert d == {
        "num_slots": 2,
        "warm": ["a"],
        "pinned": [],
        "free_slots": 1,
        "evictable_slots": 1,
        "in_flight": 0,
        "hits": 0,
        "misses": 1,
        "evictions": 0,
        "swaps": 1,
        "swap_ms_p50": 2.0,
        "swap_ms_p99": 2.0,
        "last_used_s": {"a": 1.0},
        "next_victim": None,  # a slot is free
    }
    _fill(pool, "b")
    assert pool.snapshot().to_dict()["next_victim"] == "a"  # full: the least recently used goes next


def test_snapshot_is_a_copy():
    pool = SlotPool(2)
    _fill(pool, "a")
    snap = pool.snapshot()
    _fill(pool, "b")
    assert snap.warm == ("a",)
    assert set(snap.last_used_s) == {"a"}


# ---- concurrency --------------------------------------------------------------------------


def test_concurrent_acquire_release_keeps_counts_consistent():
    pool = SlotPool(4)
    errors: list[BaseException] = []
    per_thread = 2000

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(per_thread):
                adapter_id = f"a{rng.randrange(6)}"
                try:
                    pool.acquire(adapter_id)
                except SlotsExhaustedError:
                    continue
                pool.snapshot()
                pool.release(adapter_id)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    snap = pool.snapshot()
    assert snap.in_flight == 0
    assert snap.hits + snap.misses <= 4 * per_thread
    slots = [pool.slot_of(a) for a in snap.warm]
    assert len(set(slots)) == len(slots) and all(1 <= s <= 4 for s in slots)


# ---- randomized check against a reference model ------------------------------------------


class ReferenceModel:
    """The obvious, slow version of the pool: a list in LRU order and a few dicts."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.order: list[str] = []  # least recent first
        self.slot: dict[str, int] = {}
        self.refs: dict[str, int] = {}
        self.pinned: set[str] = set()
        self.last_used: dict[str, float] = {}
        self.free = set(range(1, num_slots + 1))
        self.hits = self.misses = self.evictions = 0
        self.swap_ms: list[float] = []

    def acquire(self, a: str, now: float):
        if a in self.slot:
            self.order.remove(a)
            self.order.append(a)
            self.refs[a] += 1
            self.last_used[a] = now
            self.hits += 1
            return SlotAssignment(self.slot[a], True, None)
        evicted = None
        if self.free:
            slot = min(self.free)
            self.free.remove(slot)
        else:
            victims = [x for x in self.order if self.refs[x] == 0 and x not in self.pinned]
            if not victims:
                return SlotsExhaustedError
            evicted = victims[0]
            slot = self.slot.pop(evicted)
            self.order.remove(evicted)
            del self.refs[evicted], self.last_used[evicted]
            self.evictions += 1
        self.slot[a] = slot
        self.refs[a] = 1
        self.last_used[a] = now
        self.order.append(a)
        self.misses += 1
        return SlotAssignment(slot, False, evicted)

    def release(self, a: str):
        if self.refs.get(a, 0) == 0:
            return ValueError
        self.refs[a] -= 1
        return None

    def discard(self, a: str, force: bool):
        if a not in self.slot:
            return None
        if self.refs[a] > 0 and not force:
            return ValueError
        slot = self.slot.pop(a)
        self.order.remove(a)
        del self.refs[a], self.last_used[a]
        self.pinned.discard(a)
        self.free.add(slot)
        return slot

    def pin(self, a: str):
        if a not in self.slot:
            return ValueError
        if a in self.pinned:
            return None
        if len(self.pinned) >= self.num_slots - 1:
            return ValueError
        self.pinned.add(a)
        return None

    def unpin(self, a: str):
        if a not in self.slot:
            return ValueError
        self.pinned.discard(a)
        return None

    def expected_snapshot(self) -> PoolSnapshot:
        warm = tuple(reversed(self.order))
        ordered = sorted(self.swap_ms[-SWAP_WINDOW:])

        def pct(q: float):
            if not ordered:
                return None
            k = max(0, -(-q * len(ordered) // 100) - 1)
            return ordered[int(k)]

        return PoolSnapshot(
            num_slots=self.num_slots,
            warm=warm,
            pinned=tuple(a for a in warm if a in self.pinned),
            free_slots=len(self.free),
            evictable_slots=sum(
                1 for a in self.order if self.refs[a] == 0 and a not in self.pinned
            ),
            in_flight=sum(self.refs.values()),
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
            swaps=len(self.swap_ms),
            swap_ms_p50=pct(50),
            swap_ms_p99=pct(99),
            last_used_s=dict(self.last_used),
            next_victim=None if self.free else next(
                (a for a in self.order if self.refs[a] == 0 and a not in self.pinned), None),
        )


def _call(fn, *args, **kwargs):
    """The result, or the exception class raised, so pool and model answers compare directly."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, SlotsExhaustedError) as exc:
        return type(exc)


def _check_invariants(pool: SlotPool, snap: PoolSnapshot, ids: list[str]) -> None:
    slots = {a: pool.slot_of(a) for a in snap.warm}
    assert all(1 <= s <= snap.num_slots for s in slots.values()), slots  # never slot 0
    assert len(set(slots.values())) == len(slots), slots  # one adapter per slot
    assert len(slots) + snap.free_slots == snap.num_slots == pool.num_slots
    assert len(pool) == len(snap.warm)
    assert len(snap.pinned) <= snap.num_slots - 1
    assert set(snap.pinned) <= set(snap.warm)
    for a in ids:
        assert (a in pool) == (a in slots)


@pytest.mark.parametrize("num_slots,seed", [(1, 0), (3, 1), (5, 2)])
def test_random_ops_match_reference_model(num_slots, seed):
    """The LRU policy, exactly; `test_random_ops_keep_tinylfu_invariants` checks tinylfu."""
    rng = random.Random(seed)
    clock = FakeClock(0.0)
    pool = SlotPool(num_slots, clock=clock, admission="lru")
    model = ReferenceModel(num_slots)
    ids = [f"ad{i}" for i in range(num_slots * 2 + 1)]
    ops = ["acquire"] * 6 + ["release"] * 5 + ["discard", "pin", "unpin", "swap", "slot_of"]
    hold_counts = {"exhausted": 0, "evicted": 0}

    for step in range(10_000):
        clock.advance(rng.choice((0.0, 0.5, 1.0)))
        op = rng.choice(ops)
        a = rng.choice(ids)
        pinned_before = {x for x in ids if x in model.pinned}
        held_before = {x for x in ids if model.refs.get(x, 0) > 0}
        if op == "acquire":
            got, want = _call(pool.acquire, a), model.acquire(a, clock.now)
            if want is SlotsExhaustedError:
                hold_counts["exhausted"] += 1
            elif want.evicted is not None:
                hold_counts["evicted"] += 1
                assert want.evicted not in pinned_before | held_before
        elif op == "release":
            got, want = _call(pool.release, a), model.release(a)
        elif op == "discard":
            force = rng.random() < 0.3
            got, want = _call(pool.discard, a, force=force), model.discard(a, force)
        elif op == "pin":
            got, want = _call(pool.pin, a), model.pin(a)
        elif op == "unpin":
            got, want = _call(pool.unpin, a), model.unpin(a)
        elif op == "swap":
            ms = round(rng.uniform(0.1, 50.0), 3)
            model.swap_ms.append(ms)
            got, want = pool.record_swap(ms), None
        else:
            got, want = pool.slot_of(a), model.slot.get(a)
        assert got == want, (step, op, a)

        snap = pool.snapshot()
        assert snap == model.expected_snapshot(), (step, op, a)
        _check_invariants(pool, snap, ids)

    # The run exercised the interesting paths, not just the easy ones.
    assert hold_counts["evicted"] > 50
    assert hold_counts["exhausted"] > 0


# ---- admission: W-TinyLFU (the default) -----------------------------------------------------


def _hot_pool(admission="tinylfu") -> SlotPool:
    """4 slots: h0 (3 requests), h1 (2), h2 (4) in main, a free slot; nothing held."""
    pool = SlotPool(4, admission=admission)
    _fill(pool, "h0", "h0", "h0", "h1", "h1", "h2", "h2", "h2", "h2")
    return pool


def test_default_admission_is_tinylfu_with_a_one_slot_window():
    pool = SlotPool(8)
    assert isinstance(pool.admission, TinyLfuAdmission) and pool.admission.window_slots == 1
    assert isinstance(SlotPool(8, admission="lru").admission, LruAdmission)


def test_unknown_admission_is_refused():
    with pytest.raises(ValueError, match="unknown admission 'fifo'"):
        SlotPool(2, admission="fifo")


@pytest.mark.parametrize("admission", ["lru", "tinylfu"])
def test_a_stream_of_one_offs_evicts_hot_adapters_only_under_lru(admission):
    pool = _hot_pool(admission)
    for i in range(50):
        _fill(pool, f"once{i}")
    hot_left = {"h0", "h1", "h2"} & set(pool.snapshot().warm)
    assert hot_left == ({"h0", "h1", "h2"} if admission == "tinylfu" else set())
    assert "once49" in pool  # every one-off still got its slot


def test_a_recurring_newcomer_wins_its_way_in_over_the_least_frequent():
    pool = _hot_pool()
    evicted_hot = []
    for i in range(10):
        for adapter_id in ("new", f"once{i}"):
            assignment = pool.acquire(adapter_id)
            pool.release(adapter_id)
            if assignment.evicted in {"h0", "h1", "h2"}:
                evicted_hot.append(assignment.evicted)
    assert evicted_hot == ["h1"]  # h1 had the fewest requests (2); new overtook it once
    assert {"new", "h0", "h2"} <= set(pool.snapshot().warm)


def test_held_window_makes_a_newcomer_take_the_least_frequent_slot_not_the_least_recent():
    pool = _hot_pool()
    pool.acquire("once0")  # held by a request: the window's only resident cannot go
    assert pool.snapshot().next_victim == "h1"
    assert pool.acquire("once1").evicted == "h1"  # h0 is less recent, but asked for more often
    lru = _hot_pool("lru")
    lru.acquire("once0")
    assert lru.acquire("once1").evicted == "h0"


def test_next_victim_is_what_the_next_miss_evicts_when_the_candidate_is_promoted():
    pool = _hot_pool()
    _fill(pool, "once0")  # fills the free slot, in the window
    for i in (1, 2):
        _fill(pool, "fresh", f"once{i}")  # fresh (1, then 2 requests) loses to h1 (2) each time
    _fill(pool, "fresh")  # its 3rd request: in the window, and now asked for more than h1
    assert pool.snapshot().next_victim == "h1"
    assert pool.acquire("once3").evicted == "h1"
    pool.release("once3")
    assert pool.snapshot().next_victim == "once3"  # fresh moved into main; the window goes next
    assert pool.acquire("once4").evicted == "once3"


@pytest.mark.parametrize("newcomer,loser", [("a@v2", "b@v1"), ("z@v1", "z@v1")])
def test_frequency_is_counted_per_adapter_so_a_new_version_inherits_it(newcomer, loser):
    pool = SlotPool(3)
    _fill(pool, *["a@v1"] * 4, *["b@v1"] * 3, *["c@v1"] * 2)  # main: a, b; window: c
    assert pool.acquire(newcomer).evicted == "c@v1"  # the newcomer lands in the window
    pool.release(newcomer)
    pool.discard("a@v1")  # as the residency frees the old version's slot
    _fill(pool, "d@v1")  # takes the free slot; the newcomer moves on into main
    pool.acquire("e@v1")  # held: the window cannot give its slot
    # a@v2 carries a@v1's 4 requests (5 now) past b's 3; a brand-new z has 1.
    assert pool.admission.frequency(newcomer) == (5 if newcomer == "a@v2" else 1)
    assert pool.acquire("f@v1").evicted == loser


def test_aging_lets_a_formerly_hot_adapter_be_evicted():
    def run(sample_size: int) -> tuple[SlotPool, list[int]]:
        pool = SlotPool(2, admission=TinyLfuAdmission(2, sample_size=sample_size))
        _fill(pool, *["old"] * 30)  # hot once, then never again
        counts = []
        for i in range(12):
            _fill(pool, "new", f"once{i}")
            counts.append(pool.admission.frequency("old"))
        return pool, counts

    aged, counts = run(sample_size=10)
    assert "old" not in aged and "new" in aged
    assert counts[0] > counts[-1] and counts == sorted(counts, reverse=True)
    unaged, _ = run(sample_size=10_000)  # the same traffic without halving
    assert "old" in unaged


def test_pinned_and_held_adapters_survive_one_offs_and_contests():
    pool = SlotPool(4)
    _fill(pool, "p")
    pool.pin("p")  # asked for once, pinned
    pool.acquire("h")  # asked for once, held by a long request
    for i in range(40):
        _fill(pool, "recurring", f"once{i}")
        assert "p" in pool and "h" in pool
    assert pool.slot_of("p") == 1 and pool.slot_of("h") == 2
    assert "recurring" in pool


def test_pinning_the_window_resident_frees_the_window_for_newcomers():
    pool = SlotPool(3)
    _fill(pool, "a", "a", "b", "b", "c")  # main: a, b; window: c
    pool.pin("c")
    assert pool.acquire("x").evicted == "a"  # the window is empty: main's weakest (a tie: least recent)
    pool.release("x")
    assert pool.acquire("y").evicted == "x"  # x landed in the window, c stays pinned
    assert "c" in pool


def test_a_refused_acquire_counts_no_request():
    pool = SlotPool(1)
    pool.acquire("a")
    with pytest.raises(SlotsExhaustedError):
        pool.acquire("b")
    assert pool.admission.frequency("b") == 0 and pool.admission.frequency("a") == 1


def test_rename_keeps_the_segment_and_the_adapter_count():
    pool = SlotPool(3)
    _fill(pool, *["a@v1"] * 4, "b@v1", "c@v1")  # main: a, b; window: c
    pool.rename("a@v1", "a@v2")
    assert pool.admission.frequency("a@v2") == 4
    _fill(pool, "d@v1")  # the window's c goes, not a@v2 (main, 4 requests)
    assert "a@v2" in pool and "c@v1" not in pool


@pytest.mark.parametrize("num_slots,seed", [(1, 3), (4, 4), (8, 5)])
def test_random_ops_keep_tinylfu_invariants(num_slots, seed):
    rng = random.Random(seed)
    policy = TinyLfuAdmission(num_slots, sample_size=7 * num_slots)  # halves often
    pool = SlotPool(num_slots, clock=FakeClock(0.0), admission=policy)
    ids = [f"ad{i}@v{v}" for i in range(num_slots * 2 + 1) for v in (1, 2)]
    held: dict[str, int] = {}
    evicted_from = {"window": 0, "main": 0}
    for step in range(4000):
        op = rng.choice(["acquire"] * 6 + ["release"] * 5 + ["discard", "pin", "unpin", "rename"])
        a = rng.choice(ids)
        before = pool.snapshot()
        if op == "acquire":
            window_before = {k for k, e in pool._residents.items() if e.in_window}
            try:
                assignment = pool.acquire(a)
            except SlotsExhaustedError:
                assert a not in pool and before.free_slots == 0 and before.next_victim is None
                assert pool.snapshot() == before
                continue
            held[a] = held.get(a, 0) + 1
            if assignment.hit:
                assert a in before.warm
            elif before.free_slots:
                assert assignment.evicted is None
            else:
                assert assignment.evicted == before.next_victim, step  # the router's view was right
                assert assignment.evicted not in held and assignment.evicted not in before.pinned
                evicted_from["window" if assignment.evicted in window_before else "main"] += 1
        elif op == "release":
            if held.get(a):
                pool.release(a)
                held[a] -= 1
                if not held[a]:
                    del held[a]
        elif op == "discard":
            if pool.discard(a, force=True) is not None:
                held.pop(a, None)
        elif op == "pin" and a in pool:
            try:
                pool.pin(a)
            except ValueError:
                pass
        elif op == "unpin" and a in pool:
            pool.unpin(a)
        elif op == "rename" and a in pool and a not in held:
            other = rng.choice(ids)
            if other not in pool:
                pool.rename(a, other)
        snap = pool.snapshot()
        _check_invariants(pool, snap, ids)
        window = [k for k, e in pool._residents.items() if e.in_window]
        assert len(window) <= policy.window_slots and not set(window) & set(snap.pinned)
        assert snap.in_flight == sum(held.values())
        assert len(policy.sketch) <= 2 * policy.sketch.sample_size
    assert evicted_from["window"] > 10
    if num_slots > 1:
        assert evicted_from["main"] > 10  # window residents won contests, or the window was held
