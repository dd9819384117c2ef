"""Which resident a slot miss evicts: plain LRU, or W-TinyLFU admission by request frequency.

A request cannot run without a slot, so "not admitting" a one-off adapter cannot mean refusing
it. W-TinyLFU (Einziger, Friedman & Manes, "TinyLFU: A Highly Efficient Cache Admission Policy",
2017; Caffeine's default) gives newcomers a small admission *window* of slots and keeps the rest
as the *main* segment. A newcomer always gets a slot, in the window; when a miss must evict, the
window's least recently used resident (the candidate) competes with the main segment's least
frequent one (the victim) by estimated frequency: the candidate moves into main and the victim is
evicted only if the candidate was asked for more often; otherwise the candidate is evicted. So a
stream of one-offs churns through the window instead of evicting a hot adapter, while an adapter
that keeps coming back wins its way into main. When every window resident is held by in-flight
requests, a newcomer still needs a slot: it takes the least frequent main resident's.

Frequency is counted per adapter id (the slot key's part before "@", see `adapter_of`), so a
new version of an adapter inherits its popularity. Counts are exact and halved every
`sample_size` recorded requests (TinyLFU's reset): that is the aging that lets a formerly hot
adapter lose its place, and it bounds the table to about `2 * sample_size` ids.

Pure Python, no lock: `SlotPool` calls it under its own lock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = [
    "ADMISSION_POLICIES",
    "DEFAULT_ADMISSION",
    "FREQUENCY_SAMPLE_PER_SLOT",
    "WINDOW_FRACTION",
    "Admission",
    "AdmissionPolicy",
    "Candidate",
    "Eviction",
    "FrequencySketch",
    "LruAdmission",
    "TinyLfuAdmission",
    "adapter_of",
    "make_admission",
]

Admission = Literal["lru", "tinylfu"]

DEFAULT_ADMISSION: Admission = "tinylfu"
"""Measured with `python -m benchmarks.routing_sim` (30,000 requests, seeds 0-2): at 90%
utilization affinity routing's hit rate goes from 0.551 (lru) to 0.594 (tinylfu), drops from
~3,100 to ~1,800, p50 from 4.4 s to 3.7 s; at 50% from 0.574 to 0.634. The oracle is 0.686."""

WINDOW_FRACTION = 0.1
"""Share of a pool's slots in the admission window (at least 1; a 1-slot pool is all window,
which is LRU)."""

FREQUENCY_SAMPLE_PER_SLOT = 10
"""Counts are halved after this many recorded requests per slot (TinyLFU's sample size W; Caffeine
 also uses 10): longer remembers a stable popularity better, shorter follows a shifting one sooner."""

KEY_SEPARATOR = "@"
"""Slot keys are `<adapter id>@<version>` (`residency.slot_key`); an adapter id never holds "@"."""


def adapter_of(key: str) -> str:
    """The adapter id a slot key counts for: versions of one adapter share one frequency."""
    return key.partition(KEY_SEPARATOR)[0]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One resident as the policy sees it; the pool lists them least recently acquired first."""

    key: str
    in_window: bool
    evictable: bool
    """Neither pinned nor held by an in-flight request."""


@dataclass(frozen=True, slots=True)
class Eviction:
    """The policy's answer for a miss with no free slot."""

    victim: str
    promoted: str | None = None
    """A window resident that beat `victim` and moves into the main segment."""


class AdmissionPolicy(Protocol):
    """What `SlotPool` asks on a miss; the pool keeps the residents and their segment."""

    @property
    def window_slots(self) -> int:
        """How many residents the window holds; newcomers land there (0: no window)."""
        ...

    def record(self, key: str) -> None:
        """One request acquired `key` (hit or miss)."""
        ...

    def frequency(self, key: str) -> int:
        """The estimated recent request count of `key`'s adapter."""
        ...

    def choose(self, residents: Sequence[Candidate]) -> Eviction | None:
        """Whom a miss evicts now; None when no resident is evictable. Must not change state,
        so that `SlotPool.snapshot().next_victim` can ask the same question."""
        ...


class FrequencySketch:
    """Exact request counts per adapter id, all halved every `sample_size` records.

    Exact rather than a count-min sketch: a replica sees hundreds of adapters, not millions, and
    exact counts keep every decision predictable in tests. Halving drops ids whose count falls
    to 0, so at most about `2 * sample_size` ids are kept.
    """

    def __init__(self, sample_size: int) -> None:
        if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1:
            raise ValueError(f"sample_size must be an integer >= 1, got {sample_size!r}")
        self._sample_size = sample_size
        self._counts: dict[str, int] = {}
        self._since_reset = 0
        self._resets = 0

    @property
    def sample_size(self) -> int:
        return self._sample_size

    @property
    def resets(self) -> int:
        """How many times the counts were halved."""
        return self._resets

    def record(self, adapter_id: str) -> None:
        self._counts[adapter_id] = self._counts.get(adapter_id, 0) + 1
        self._since_reset += 1
        if self._since_reset >= self._sample_size:
            self._halve()

    def estimate(self, adapter_id: str) -> int:
        return self._counts.get(adapter_id, 0)

    def __len__(self) -> int:
        return len(self._counts)

    def _halve(self) -> None:
        self._counts = {a: c // 2 for a, c in self._counts.items() if c > 1}
        self._since_reset = 0
        self._resets += 1


class LruAdmission:
    """Today's policy: no window, the least recently acquired evictable resident goes."""

    window_slots = 0

    def record(self, key: str) -> None:
        pass

    def frequency(self, key: str) -> int:
        return 0

    def choose(self, residents: Sequence[Candidate]) -> Eviction | None:
        victim = next((r.key for r in residents if r.evictable), None)
        return None if victim is None else Eviction(victim)


class TinyLfuAdmission:
    """W-TinyLFU (module docstring) over `num_slots` slots.

    On a miss with no free slot: candidate = the window's least recent evictable resident;
    victim = the main segment's evictable resident with the lowest frequency (least recent
    first among equals). Both exist: evict the victim and promote the candidate if the
    candidate's frequency is higher, else evict the candidate (ties keep main as it is). Only
    one exists: evict it (e.g. every window slot is held by in-flight requests, so a newcomer
    takes the least popular main resident's slot, not the least recent one's).

    Why main's victim is its least frequent resident, not its least recent one (Caffeine's
    choice): in the routing simulation a request holds its slot while queued, so under load the
    window's one-off is usually still held when the next one-off arrives, and the eviction falls
    to main. With an
    LRU main that is LRU again: the routing simulation at 90% gave 0.552, as plain LRU.
    """

    def __init__(self, num_slots: int, *, window_slots: int | None = None, sample_size: int | None = None) -> None:
        if window_slots is None:
            window_slots = max(1, round(WINDOW_FRACTION * num_slots))
        if isinstance(window_slots, bool) or not isinstance(window_slots, int) or not 1 <= window_slots <= num_slots:
            raise ValueError(f"window_slots must be an integer in [1, num_slots={num_slots}], got {window_slots!r}")
        self._window_slots = window_slots
        self._sketch = FrequencySketch(sample_size or FREQUENCY_SAMPLE_PER_SLOT * num_slots)

    @property
    def window_slots(self) -> int:
        return self._window_slots

    @property
    def sketch(self) -> FrequencySketch:
        return self._sketch

    def record(self, key: str) -> None:
        self._sketch.record(adapter_of(key))

    def frequency(self, key: str) -> int:
        return self._sketch.estimate(adapter_of(key))

    def choose(self, residents: Sequence[Candidate]) -> Eviction | None:
        candidate: str | None = None
        victim: str | None = None
        victim_frequency = 0
        for resident in residents:
            if not resident.evictable:
                continue
            if resident.in_window:
                if candidate is None:
                    candidate = resident.key
            else:
                frequency = self.frequency(resident.key)
                if victim is None or frequency < victim_frequency:
                    victim, victim_frequency = resident.key, frequency
        if candidate is None:
            return None if victim is None else Eviction(victim)
        if victim is not None and self.frequency(candidate) > victim_frequency:
            return Eviction(victim, promoted=candidate)
        return Eviction(candidate)


_POLICIES: dict[str, Callable[[int], AdmissionPolicy]] = {
    "lru": lambda num_slots: LruAdmission(),
    "tinylfu": lambda num_slots: TinyLfuAdmission(num_slots),
}
ADMISSION_POLICIES: tuple[str, ...] = tuple(_POLICIES)


def make_admission(admission: Admission, num_slots: int) -> AdmissionPolicy:
    """The policy named `admission` for a pool of `num_slots` slots."""
    factory = _POLICIES.get(admission)
    if factory is None:
        raise ValueError(f"unknown admission {admission!r}; choose one of {ADMISSION_POLICIES}")
    return factory(num_slots)
