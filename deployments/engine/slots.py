"""Which adapter lives in which hotswap slot of one replica's engine.

The engine owns the tensors (`[slots + 1, r_max, ...]`, index 0 being the base model); this module
only decides the index, and `admission.py` which resident a miss evicts. It imports neither torch
nor Ray so the policy is tested with plain inputs and an injected clock.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from deployments.engine.admission import DEFAULT_ADMISSION, Admission, AdmissionPolicy, Candidate, make_admission
from lora_core.errors import SlotsExhaustedError

__all__ = ["BASE_SLOT", "SWAP_WINDOW", "PoolSnapshot", "SlotAssignment", "SlotPool"]

BASE_SLOT = 0
"""The slot of the base model (no adapter); `SlotPool` never hands it out."""

SWAP_WINDOW = 1024
"""How many recent swap durations the p50/p99 are computed over."""


@dataclass(frozen=True, slots=True)
class SlotAssignment:
    """The answer to `SlotPool.acquire`: after a miss (`hit=False`) the caller fills `slot`."""

    slot: int
    hit: bool
    evicted: str | None = None


@dataclass(frozen=True)
class PoolSnapshot:
    """A consistent copy of the pool's state and counters, taken under its lock."""

    num_slots: int
    warm: tuple[str, ...]
    """Resident adapter ids, most recently acquired first."""
    pinned: tuple[str, ...]
    free_slots: int
    evictable_slots: int
    """Resident, unpinned and held by no request: what a miss may evict right now."""
    in_flight: int
    hits: int
    misses: int
    evictions: int
    swaps: int
    swap_ms_p50: float | None
    swap_ms_p99: float | None
    last_used_s: Mapping[str, float] = field(default_factory=dict)
    """Clock reading of each warm adapter's latest `acquire`."""
    next_victim: str | None = None
    """What a miss would evict now (None while a slot is free or nothing is evictable)."""

    def to_dict(self) -> dict:
        return {
            "num_slots": self.num_slots,
            "warm": list(self.warm),
            "pinned": list(self.pinned),
            "free_slots": self.free_slots,
            "evictable_slots": self.evictable_slots,
            "in_flight": self.in_flight,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "swaps": self.swaps,
            "swap_ms_p50": self.swap_ms_p50,
            "swap_ms_p99": self.swap_ms_p99,
            "last_used_s": dict(self.last_used_s),
            "next_victim": self.next_victim,
        }


@dataclass(slots=True)
class _Resident:
    slot: int
    refs: int = 0
    pinned: bool = False
    last_used_s: float = 0.0
    in_window: bool = False
    """In the admission window (a newcomer) rather than the main segment (`admission.py`)."""


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile: always one of the recorded values, no interpolation."""
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


class SlotPool:
    """A map from adapter id to hotswap slot `1..num_slots`, with pins, in-flight refcounts and a
    pluggable eviction policy (`admission`).

    Algorithm: residents live in an `OrderedDict` ordered from least to most recently acquired.
    `acquire` on a resident adapter (a hit) moves it to the end. On a miss the pool takes the
    lowest empty slot; with none empty it asks the admission policy which resident that is
    neither pinned nor held by an in-flight request to evict, and reuses its slot. Every
    `acquire` adds one in-flight ref that the caller gives back with `release`, so the weights
    of an adapter a request is still decoding with are never overwritten.

    Policies (`admission.py`): "lru" evicts the least recently acquired resident. "tinylfu"
    (the default) is W-TinyLFU: a miss always gets a slot, but a newcomer lands in a small
    admission window, and a window resident only takes a main-segment resident's place if its
    adapter was asked for more often (counts per adapter id across versions, halved
    periodically), so a stream of one-off adapters does not evict a hot one. A hit is O(1); a
    miss that evicts is O(num_slots).

    Invariants, holding after every public call:
      - slot 0 (`BASE_SLOT`) is never assigned;
      - each resident adapter has exactly one slot, no two residents share one, and
        resident + free slots == `num_slots`;
      - an adapter with refs > 0 or pinned is never evicted;
      - at most `num_slots - 1` adapters are pinned, so a new adapter can be served once the
        in-flight requests finish;
      - at most `window_slots` residents are in the admission window, none of them pinned;
      - `snapshot().next_victim` is what the next miss evicts;
      - a refused call (`SlotsExhaustedError`, `ValueError`) changes nothing (frequency
        counts included).

    Thread-safe: one lock guards all state, because the engine's loop thread mutates the pool
    while the replica reads snapshots from another thread.
    """

    def __init__(
        self,
        num_slots: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        admission: Admission | AdmissionPolicy = DEFAULT_ADMISSION,
    ) -> None:
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be an integer >= 1, got {num_slots!r}")
        self._num_slots = num_slots
        self._clock = clock
        self._admission = make_admission(admission, num_slots) if isinstance(admission, str) else admission
        self._lock = threading.Lock()
        self._residents: OrderedDict[str, _Resident] = OrderedDict()
        # Lowest index first, so assignment is deterministic and tests can predict it.
        self._free: list[int] = list(range(BASE_SLOT + 1, num_slots + 1))
        self._pinned_count = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._swaps = 0
        self._swap_ms: deque[float] = deque(maxlen=SWAP_WINDOW)

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def admission(self) -> AdmissionPolicy:
        """The eviction policy, for tests and tools; it has no lock of its own (the pool calls it
        under the pool's lock), so read it only where no other thread uses the pool."""
        return self._admission

    def acquire(self, adapter_id: str) -> SlotAssignment:
        """Give `adapter_id` a slot and hold it for one request; pair with `release`.

        After a miss the caller must copy the weights into the slot, and `discard` the adapter
        if that copy fails, so a half-written slot is never reported as warm.
        """
        if not isinstance(adapter_id, str) or not adapter_id:
            raise ValueError(f"adapter_id must be a non-empty string, got {adapter_id!r}")
        with self._lock:
            now = self._clock()
            entry = self._residents.get(adapter_id)
            if entry is not None:
                self._residents.move_to_end(adapter_id)
                entry.refs += 1
                entry.last_used_s = now
                self._hits += 1
                self._admission.record(adapter_id)
                return SlotAssignment(slot=entry.slot, hit=True)

            evicted: str | None = None
            if self._free:
                slot = heapq.heappop(self._free)
            else:
                # Chosen before this request is counted, so it is what `next_victim` said.
                eviction = self._admission.choose(self._candidates())
                if eviction is None:
                    raise SlotsExhaustedError(self._exhausted_message())
                evicted = eviction.victim
                if eviction.promoted is not None:
                    self._residents[eviction.promoted].in_window = False
                slot = self._residents.pop(evicted).slot
                self._evictions += 1
            in_window = self._admission.window_slots > 0
            self._residents[adapter_id] = _Resident(slot=slot, refs=1, last_used_s=now, in_window=in_window)
            if in_window:
                self._trim_window()
            self._misses += 1
            self._admission.record(adapter_id)
            return SlotAssignment(slot=slot, hit=False, evicted=evicted)

    def release(self, adapter_id: str) -> None:
        """Give back one in-flight ref taken by `acquire`; the adapter stays warm."""
        with self._lock:
            entry = self._residents.get(adapter_id)
            if entry is None or entry.refs == 0:
                raise ValueError(
                    f"release({adapter_id!r}) without a matching acquire: the adapter is "
                    f"{'not resident' if entry is None else 'held by no request'}"
                )
            entry.refs -= 1

    def discard(self, adapter_id: str, *, force: bool = False) -> int | None:
        """Forget an adapter (its swap failed, or it was deleted); return the slot it freed.

        Refused while requests hold it, since their slot would be handed to another adapter
        mid-decode; `force=True` drops their refs too, and their later `release` calls then
        raise `ValueError`. Also drops a pin. Returns None if the adapter was not resident.
        """
        with self._lock:
            entry = self._residents.get(adapter_id)
            if entry is None:
                return None
            if entry.refs > 0 and not force:
                raise ValueError(
                    f"cannot discard {adapter_id!r}: {entry.refs} in-flight request(s) hold it; "
                    "release them first or pass force=True"
                )
            del self._residents[adapter_id]
            if entry.pinned:
                self._pinned_count -= 1
            heapq.heappush(self._free, entry.slot)
            return entry.slot

    def pin(self, adapter_id: str) -> None:
        """Keep a resident adapter from ever being evicted; pinning it again is a no-op."""
        with self._lock:
            entry = self._residents.get(adapter_id)
            if entry is None:
                raise ValueError(
                    f"cannot pin {adapter_id!r}: it is not resident; acquire it (load it into "
                    "a slot) first"
                )
            if entry.pinned:
                return
            limit = self._num_slots - 1
            if self._pinned_count >= limit:
                raise ValueError(
                    f"cannot pin {adapter_id!r}: at most {limit} of {self._num_slots} slots may "
                    "be pinned so a new adapter can always get one; unpin another adapter or "
                    "raise the slot count"
                )
            entry.pinned = True
            entry.in_window = False  # a pinned adapter takes no part in admission
            self._pinned_count += 1

    def unpin(self, adapter_id: str) -> None:
        """Make a resident adapter evictable again; unpinning an unpinned one is a no-op."""
        with self._lock:
            entry = self._residents.get(adapter_id)
            if entry is None:
                raise ValueError(f"cannot unpin {adapter_id!r}: it is not resident")
            if entry.pinned:
                entry.pinned = False
                self._pinned_count -= 1

    def slot_of(self, adapter_id: str) -> int | None:
        """The adapter's slot, or None; a lookup only, so no LRU bump and no hit counted."""
        with self._lock:
            entry = self._residents.get(adapter_id)
            return None if entry is None else entry.slot

    def in_use(self, adapter_id: str) -> bool:
        """Whether requests hold the adapter's slot now (it may not be discarded or rewritten)."""
        with self._lock:
            entry = self._residents.get(adapter_id)
            return entry is not None and entry.refs > 0

    def rename(self, old_id: str, new_id: str) -> int:
        """Give a resident's slot, pin, recency place and admission segment to another id (a new
        version written into the same slot); refused while requests hold it. Returns the slot."""
        with self._lock:
            entry = self._residents.get(old_id)
            if entry is None or new_id in self._residents:
                raise ValueError(f"cannot rename {old_id!r} to {new_id!r}: not resident, or the new id is")
            if entry.refs > 0:
                raise ValueError(f"cannot rename {old_id!r}: {entry.refs} in-flight request(s) hold it")
            order = list(self._residents)
            self._residents = OrderedDict((new_id if key == old_id else key, value) for key, value in
                                          ((key, self._residents[key]) for key in order))
            return entry.slot

    def slots(self) -> dict[str, int]:
        """adapter id -> slot of every resident adapter; a lookup only (no LRU bump, no hit)."""
        with self._lock:
            return {adapter_id: entry.slot for adapter_id, entry in self._residents.items()}

    def __contains__(self, adapter_id: object) -> bool:
        with self._lock:
            return adapter_id in self._residents

    def __len__(self) -> int:
        with self._lock:
            return len(self._residents)

    def record_swap(self, duration_ms: float) -> None:
        """Record how long the engine took to copy one adapter into its slot."""
        numeric = isinstance(duration_ms, (int, float)) and not isinstance(duration_ms, bool)
        if not numeric or not math.isfinite(duration_ms) or duration_ms < 0:
            raise ValueError(f"duration_ms must be a finite number >= 0, got {duration_ms!r}")
        with self._lock:
            self._swaps += 1
            self._swap_ms.append(float(duration_ms))

    def snapshot(self) -> PoolSnapshot:
        with self._lock:
            warm = tuple(reversed(self._residents))
            entries = self._residents
            ordered = sorted(self._swap_ms)
            return PoolSnapshot(
                num_slots=self._num_slots,
                warm=warm,
                pinned=tuple(a for a in warm if entries[a].pinned),
                free_slots=len(self._free),
                evictable_slots=sum(1 for e in entries.values() if e.refs == 0 and not e.pinned),
                in_flight=sum(e.refs for e in entries.values()),
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                swaps=self._swaps,
                swap_ms_p50=_percentile(ordered, 50) if ordered else None,
                swap_ms_p99=_percentile(ordered, 99) if ordered else None,
                last_used_s={a: entries[a].last_used_s for a in warm},
                next_victim=None if self._free else self._victim(),
            )

    def _candidates(self) -> list[Candidate]:
        return [
            Candidate(key, entry.in_window, entry.refs == 0 and not entry.pinned)
            for key, entry in self._residents.items()
        ]

    def _victim(self) -> str | None:
        eviction = self._admission.choose(self._candidates())
        return None if eviction is None else eviction.victim

    def _trim_window(self) -> None:
        """Move the least recent window residents into main until the window fits again (a
        newcomer overfills it while a slot is free, or while its other residents are held)."""
        window = [entry for entry in self._residents.values() if entry.in_window]
        for entry in window[: max(0, len(window) - self._admission.window_slots)]:
            entry.in_window = False

    def _exhausted_message(self) -> str:
        entries = self._residents.values()
        held = sum(1 for e in entries if e.refs > 0 and not e.pinned)
        pinned = sum(1 for e in entries if e.pinned)
        return (
            f"all {self._num_slots} adapter slots are busy: {held} held by in-flight requests, "
            f"{pinned} pinned; retry when a request finishes, unpin an adapter, or add slots"
        )
