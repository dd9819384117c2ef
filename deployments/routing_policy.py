"""Which replica should serve a request for an adapter: the adapter-affinity score.

Pure Python (stdlib only, no Ray, no torch), so the policy is tested and simulated with plain
inputs; `request_router.py` turns Ray's `RunningReplica`s into `ReplicaView`s and the ranked
ids back into Ray's ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_WEIGHTS",
    "AdapterLoadTracker",
    "ReplicaView",
    "RoutingWeights",
    "check_weight_overrides",
    "prewarm_order",
    "rank_replicas",
    "rendezvous_order",
]


@dataclass(frozen=True)
class ReplicaView:
    """What the router knows of one replica when it routes a request (possibly a little stale)."""

    replica_id: str
    warm: frozenset[str]
    """Adapters resident in this replica's slots (loaded or loading). Callers should add the
    adapters they routed here since the replica last reported, so that a burst of requests
    for a cold adapter follows the first one instead of loading it on several replicas."""
    free_slots: int
    """Empty slots: a cold adapter loads here without evicting anyone."""
    evictable_slots: int
    """Resident adapters no in-flight request holds: a cold adapter may evict one of them."""
    queue_len: int
    """Requests queued or in flight on the replica."""
    max_queue: int
    """The replica takes no request while `queue_len >= max_queue`."""
    victim: str | None = None
    """The adapter a miss here would evict (its least recently used resident that no request
    holds), or None when unknown or a slot is free."""
    pending_loads: int = 0
    """Adapter loads the replica must do before some of its queued requests run: each makes the
    wait `miss_cost` longer than a hit would (requests for one adapter share its load)."""
    pinned: frozenset[str] = frozenset()
    """Adapters an admin pinned here: warm for good, and home to their requests."""

    def __post_init__(self) -> None:
        if not isinstance(self.replica_id, str) or not self.replica_id:
            raise ValueError(f"replica_id must be a non-empty string, got {self.replica_id!r}")
        if not isinstance(self.warm, frozenset):
            raise ValueError(f"warm must be a frozenset of adapter ids, got {type(self.warm)}")
        for name in ("free_slots", "evictable_slots", "queue_len", "pending_loads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int):
            raise ValueError(f"max_queue must be an integer >= 1, got {self.max_queue!r}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {self.max_queue!r}")
        if self.pending_loads > self.queue_len:
            raise ValueError(
                f"pending_loads ({self.pending_loads}) cannot exceed queue_len ({self.queue_len})"
            )

    @property
    def has_room(self) -> bool:
        return self.queue_len < self.max_queue


@dataclass(frozen=True)
class RoutingWeights:
    """The score's constants. Costs are in queued requests: one unit = one request's wait.

    The defaults were tuned on `benchmarks/routing_sim.py`, where filling a slot takes 4 hit
    service times; set `miss_cost` to your own ratio of slot-fill time to service time.
    """

    miss_cost: float = 4.0
    """Filling a slot (fetch + copy) costs about this many requests' service time."""
    evict_cost: float = 16.0
    """Most that evicting a warm adapter can cost: its next requests miss, and its reload
    evicts another in turn. Scaled down by the victim's demand (see `victim_horizon`);
    charged in full when the victim is unknown."""
    victim_horizon: float = 100.0
    """Evicting an adapter of demand d costs `evict_cost * (1 - exp(-d * victim_horizon))`:
    the chance it is asked for again within about this many service times. So a cold adapter
    evicts a rarely used one rather than a popular one, and the slots keep more of the
    popular set."""
    away_cost: float = 2.0
    """For placing outside the adapter's home set: it duplicates the adapter and splits its
    requests, so both copies stay warm less often. Kept small so that, for a cold adapter,
    where an eviction does least harm matters more than which replica is its home."""
    busy_fraction: float = 0.5
    """A replica queued at or beyond this fraction of its `max_queue` is busy: an adapter's
    home set grows past it to the next replica in rendezvous order."""
    load_per_replica: float = 0.75
    """Each this many replicas' worth of an adapter's demand gives it one more home replica."""
    seed: int = 0
    """Salt of the rendezvous hash: a different seed gives a different (still stable) placement."""

    def __post_init__(self) -> None:
        for name in ("miss_cost", "evict_cost", "away_cost", "victim_horizon"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 < self.busy_fraction <= 1:
            raise ValueError(f"busy_fraction must be in (0, 1], got {self.busy_fraction!r}")
        if not math.isfinite(self.load_per_replica) or self.load_per_replica <= 0:
            raise ValueError(f"load_per_replica must be > 0, got {self.load_per_replica!r}")


DEFAULT_WEIGHTS = RoutingWeights()


def check_weight_overrides(weights: Mapping[str, float | int]) -> None:
    """ValueError unless `weights` are `RoutingWeights` fields with values it accepts (configs)."""
    known = {f.name for f in dataclasses.fields(RoutingWeights)}
    if unknown := sorted(set(weights) - known):
        raise ValueError(f"unknown routing weights {unknown}; known: {sorted(known)}")
    RoutingWeights(**weights)


def _rendezvous_weight(seed: int, adapter_id: str, replica_id: str) -> int:
    # blake2b, not hash(): Python salts str hashes per process, and every router process must
    # agree on the placement.
    key = f"{seed}\x00{adapter_id}\x00{replica_id}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def rendezvous_order(adapter_id: str, replica_ids: Iterable[str], *, seed: int = 0) -> list[str]:
    """Replica ids from most to least preferred for `adapter_id` (highest random weight first).

    Each (adapter, replica) pair gets a pseudo-random weight that depends on nothing else, so
    the order is the same on every call and in every router, does not depend on the order of
    `replica_ids`, and removing a replica only moves the adapters whose first choice it was.
    """
    return sorted(
        replica_ids,
        key=lambda replica_id: (-_rendezvous_weight(seed, adapter_id, replica_id), replica_id),
    )


def prewarm_order(
    requests: Mapping[str, int], replica_ids: Iterable[str], replica_id: str, limit: int,
    weights: RoutingWeights = DEFAULT_WEIGHTS,
) -> list[str]:
    """What a replica that joins `replica_ids` loads before it takes traffic: at most `limit`
    adapters, first those whose home set it joins (the routers will send them here), most
    requested first, then the most requested others (they spread to every replica when hot).

    An adapter's share of `requests` times the replica count is its demand in replicas' worth
    if the cluster is busy, which is when autoscaling adds a replica; its home set is then the
    first ceil(demand / `load_per_replica`) replicas of its rendezvous order (`rank_replicas`).
    """
    total = sum(requests.values())
    if limit <= 0 or total <= 0:
        return []
    members = sorted({*replica_ids, replica_id})
    popular = sorted((a for a, n in requests.items() if n > 0), key=lambda a: (-requests[a], a))
    homed = []
    for adapter_id in popular:
        spread = max(1, math.ceil(requests[adapter_id] / total * len(members) / weights.load_per_replica))
        if replica_id in rendezvous_order(adapter_id, members, seed=weights.seed)[:spread]:
            homed.append(adapter_id)
    chosen = homed[:limit]
    return chosen + [a for a in popular if a not in chosen][: limit - len(chosen)]


def _home_set(ordered: Sequence[ReplicaView], spread: int, weights: RoutingWeights) -> set[str]:
    """The shortest rendezvous prefix holding `spread` replicas that are neither busy nor full.

    Busy replicas inside the prefix stay in it (the adapter may be warm there), so a hot
    adapter's set only grows along its rendezvous order and shrinks back the same way.
    """
    home: set[str] = set()
    open_homes = 0
    for view in ordered:
        if open_homes >= spread:
            break
        home.add(view.replica_id)
        if view.has_room and view.queue_len < weights.busy_fraction * view.max_queue:
            open_homes += 1
    return home


def rank_replicas(
    replicas: Sequence[ReplicaView],
    adapter_id: str | None,
    *,
    demand: Mapping[str, float] | None = None,
    weights: RoutingWeights = DEFAULT_WEIGHTS,
) -> list[str]:
    """Replica ids that can take a request for `adapter_id`, best first; [] when none can.

    `demand` maps adapter ids to their recent demand in replicas' worth (1.0 = enough requests
    to keep one replica busy; `AdapterLoadTracker` measures it); missing ids count as 0.

    Algorithm:
      1. `adapter_id=None` (the base model) fits every replica: those with queue room, least
         loaded first, by wait (below) / `max_queue`, then wait, then id.
      2. For an adapter, a replica where it is not warm and that has no free or evictable
         slot is out (every slot is held by a request in flight).
      3. Otherwise the replicas are put in the adapter's rendezvous order (`rendezvous_order`,
         over every replica given, full ones too, so the order does not shift as queues fill).
         The adapter's home set is the shortest prefix of that order with `spread` replicas
         that are neither busy (`queue_len >= busy_fraction * max_queue`) nor full, where
         `spread` = ceil(demand / `load_per_replica`), at least 1; the replicas it is pinned
         on (`ReplicaView.pinned`) are in it too, and count as warm.
      4. cost = wait + slot cost + (`away_cost` outside the home set), where wait =
         queue_len + `miss_cost` x pending_loads. Slot cost: warm 0;
         free slot `miss_cost`; evictable slot `miss_cost` + the eviction's cost,
         `evict_cost * (1 - exp(-demand[victim] * victim_horizon))` (`evict_cost` if the
         victim is unknown). Sorted by cost, ties in rendezvous order, and cut before the
         first replica whose queue is full.

    Invariants (tested in tests/test_routing_policy.py):
      - deterministic, and independent of the order of `replicas`;
      - warm beats a free slot beats an evictable slot at equal queues, and a longer wait
        outweighs affinity only past the slot cost (plus `away_cost` if the other replica is
        outside the home set);
      - at equal queues and slot costs a cold adapter goes to the first non-busy replica of
        its rendezvous order; with `away_cost >= ceil(busy_fraction * max_queue) - 1` that
        holds whatever the queues, among replicas with the same slot cost;
      - a replica ranked below a full one is left out: waiting for the full replica (the
        caller retries after a backoff) is cheaper than what it would cost there, so an
        overloaded cluster waits for warm replicas instead of thrashing slots;
      - a hot adapter spreads along its rendezvous order only, so its copies stay few and
        stable, and adding or removing a replica moves only the adapters homed on it.
    """
    if adapter_id is not None and (not isinstance(adapter_id, str) or not adapter_id):
        raise ValueError(f"adapter_id must be a non-empty string or None, got {adapter_id!r}")
    by_id = {view.replica_id: view for view in replicas}
    if len(by_id) != len(replicas):
        raise ValueError("replica ids must be unique")

    if adapter_id is None:
        open_replicas = [view for view in replicas if view.has_room]
        def load(v: ReplicaView) -> tuple[float, float, str]:
            wait = _wait(v, weights)
            return (wait / v.max_queue, wait, v.replica_id)

        open_replicas.sort(key=load)
        return [view.replica_id for view in open_replicas]

    demand = demand or {}
    own_demand = demand.get(adapter_id, 0.0)
    if not math.isfinite(own_demand) or own_demand < 0:
        raise ValueError(f"demand of {adapter_id!r} must be a finite number >= 0")
    spread = max(1, math.ceil(own_demand / weights.load_per_replica))
    ordered = [by_id[rid] for rid in rendezvous_order(adapter_id, by_id, seed=weights.seed)]
    home = _home_set(ordered, spread, weights) | {view.replica_id for view in ordered if adapter_id in view.pinned}
    scored: list[tuple[float, int, str]] = []
    for position, view in enumerate(ordered):
        if adapter_id in view.warm or adapter_id in view.pinned:
            slot_cost = 0.0
        elif view.free_slots > 0:
            slot_cost = weights.miss_cost
        elif view.evictable_slots > 0:
            slot_cost = weights.miss_cost + _eviction_cost(view.victim, demand, weights)
        else:
            continue  # every slot is held by an in-flight request: it cannot load the adapter
        away = 0.0 if view.replica_id in home else weights.away_cost
        scored.append((_wait(view, weights) + slot_cost + away, position, view.replica_id))
    scored.sort()
    ranked = []
    for _, _, replica_id in scored:
        if not by_id[replica_id].has_room:
            break  # waiting for this full replica beats every replica ranked after it
        ranked.append(replica_id)
    return ranked


def _wait(view: ReplicaView, weights: RoutingWeights) -> float:
    return view.queue_len + view.pending_loads * weights.miss_cost


def _eviction_cost(
    victim: str | None, demand: Mapping[str, float], weights: RoutingWeights
) -> float:
    if victim is None:
        return weights.evict_cost
    return weights.evict_cost * -math.expm1(-demand.get(victim, 0.0) * weights.victim_horizon)


class AdapterLoadTracker(Mapping[str, float]):
    """Each adapter's recent demand, in replicas' worth: the `demand` `rank_replicas` takes.

    An exponentially decaying request count per adapter: rate = decayed count / `window_s`,
    demand = rate x `service_time_s` (1.0 = enough requests to keep one replica busy). A
    read-only mapping: `tracker[adapter_id]`, `tracker.get(adapter_id, 0.0)`. Bounded: `prune`
    forgets adapters whose count has decayed below `forget_below`. Single-threaded; the clock
    is injected for tests and simulations.
    """

    def __init__(
        self,
        service_time_s: float,
        window_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        forget_below: float = 1e-3,
    ) -> None:
        if not math.isfinite(service_time_s) or service_time_s <= 0:
            raise ValueError(f"service_time_s must be > 0, got {service_time_s!r}")
        if not math.isfinite(window_s) or window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        self._service_time_s = service_time_s
        self._window_s = window_s
        self._clock = clock
        self._forget_below = forget_below
        self._counts: dict[str, tuple[float, float]] = {}  # adapter -> (decayed count, at_s)

    def _count_at(self, adapter_id: str, now: float) -> float:
        count, at_s = self._counts[adapter_id]
        return count * math.exp(-(now - at_s) / self._window_s)

    def record(self, adapter_id: str) -> None:
        """Count one request for `adapter_id` now."""
        now = self._clock()
        previous = self._count_at(adapter_id, now) if adapter_id in self._counts else 0.0
        self._counts[adapter_id] = (previous + 1.0, now)

    def __getitem__(self, adapter_id: str) -> float:
        return self._count_at(adapter_id, self._clock()) / self._window_s * self._service_time_s

    def __iter__(self) -> Iterator[str]:
        return iter(self._counts)

    def __len__(self) -> int:
        return len(self._counts)

    def prune(self) -> None:
        """Forget adapters whose decayed count fell below `forget_below`."""
        now = self._clock()
        stale = [a for a in self._counts if self._count_at(a, now) < self._forget_below]
        for adapter_id in stale:
            del self._counts[adapter_id]
