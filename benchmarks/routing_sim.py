"""Policy simulation of replica choice for LoRA adapters: hit rate and latency, no Ray, no torch.

    python -m benchmarks.routing_sim [--quick] [--seed N] [--admission {lru,tinylfu}]

One seeded arrival trace per utilization is replayed through the same replicas under four
routers, so the only difference between runs is the router's choice.

Workload: Zipf(1.0) popularity over 200 adapters, Poisson arrivals, 4 replicas x 8 slots.
Utilization is the busy fraction the oracle's placement would see: arrival rate =
utilization x replicas / (SERVICE_TIME_S + oracle miss share x MISS_PENALTY_S). A router that
misses more than the oracle runs its replicas hotter than that, so misses show up as queueing,
latency and drops, not only as a hit rate.

Replica model (the same for every router): a FIFO server with at most MAX_QUEUE requests
queued or in service, and SLOTS_PER_REPLICA slots kept by the engine's own
`deployments.engine.slots.SlotPool`, with its admission policy (`--admission`; the engine's
default, W-TinyLFU, unless told otherwise; the figures under "lru" are printed alongside). A
request takes its slot when it reaches the replica (a hit if the adapter is resident, or
loading for an earlier request); a miss adds MISS_PENALTY_S to that request's service time (the
fetch + copy into the slot), and requests queued behind it for the same adapter ride on the
load. A slot held by a queued request is never evicted. The oracle's replicas instead hold
their 8 adapters pinned and serve anything else through a scratch slot, always as a miss.

What routers see: exact queue lengths (Ray probes them and counts its own sends), but each
replica's warm set and free/evictable slot counts only as of its last report; a replica
reports at the next REPORT_INTERVAL_S tick after its slots change (Ray's
PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S = 0.1 s). A router that finds no replica retries with
Ray's backoff (no sleep, then 25 ms doubling to 500 ms); a request not placed within
ROUTER_WAIT_LIMIT_S is dropped.

Routers:
  affinity     `deployments.routing_policy.rank_replicas` on the replicas' reports (with each
               one's next victim, `PoolSnapshot.next_victim`) and queues (with how many queued
               requests will load), demand from `AdapterLoadTracker` (LOAD_WINDOW_S), and,
               counted as warm, the adapters it sent to a replica since that replica's report.
               It returns no replica, and so waits, when a full warm replica beats every open one.
  ray_default  Ray Serve 2.60's PowerOfTwoChoicesRequestRouter with MultiplexMixin
               (ray/serve/_private/request_router/{pow_2_router,request_router}.py).
               Reproduced: each attempt calls `apply_multiplex_routing`: within the matching
               timeout (redrawn each attempt, uniform in [1 s, 2 s], measured from the first
               attempt) the first attempt takes the replicas reporting the model, or, if none
               does and no other request for the model fell back yet, those with the fewest
               models; every later attempt within the timeout takes the fewest-models
               replicas; after the timeout, fewest-models once, then all replicas. From the
               candidates it samples two (one if only one) and takes the shorter queue among
               those below max_ongoing_requests (= MAX_QUEUE), first sampled on ties. The
               backoff schedule between attempts is Ray's (see above).
               Simplified: one router (no queue-length cache staleness, no probe deadlines),
               each request routes itself (FIFOMixin's hand-off of a found replica to the
               oldest pending request is left out), no locality (one node), and the replicas
               are this project's (Ray's `@serve.multiplexed` wrapper loads one model at a time
               per replica and may evict a model in use; ours keep held slots).
  random       a uniformly random replica with queue space.
  oracle       the best static placement knowing the popularity: the 32 most popular
               adapters pinned 8 per replica, balanced by popularity (largest first onto the
               lightest replica); their requests go to their replica (waiting while it is
               full), others to the replica with the shortest queue (and miss). Its replicas
               never let a one-off adapter evict a popular one, and its one-off requests take
               no slot while they wait. Under LRU most of the gap between affinity and oracle
               was one-offs evicting popular adapters; with W-TinyLFU what remains is mostly
               slots held by queued one-off requests (a one-off must get a slot to run).

Metrics, after the first WARMUP_FRACTION of requests: hit rate (slot hit when the request
reaches its replica, over requests placed), p50/p99 latency from arrival to completion (sim
time, ms), requests dropped. Deterministic for a seed. Keys ending `_lru` are affinity and
Ray's default at 90% on LRU replicas (Ray's own `@serve.multiplexed` is an LRU): the
comparison the admission policy is chosen by.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import heapq
import itertools
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from deployments.engine.admission import ADMISSION_POLICIES, DEFAULT_ADMISSION
from deployments.engine.slots import SlotPool
from deployments.routing_policy import DEFAULT_WEIGHTS, AdapterLoadTracker, ReplicaView, RoutingWeights, rank_replicas

__all__ = ["POLICIES", "SimConfig", "run_simulation", "simulate_policy", "main"]

NUM_ADAPTERS = 200
ZIPF_EXPONENT = 1.0
NUM_REPLICAS = 4
SLOTS_PER_REPLICA = 8
MAX_QUEUE = 8
"""Requests queued or in service per replica (Ray's max_ongoing_requests)."""
SERVICE_TIME_S = 0.25
"""One request's service time when its adapter is warm (a short completion)."""
MISS_PENALTY_S = 1.0
"""Added to a request that loads its adapter into a slot: fetch + copy, 4x a hit's service."""
REPORT_INTERVAL_S = 0.1
"""A replica's changed warm set reaches the routers at the next tick of this period."""
RAY_MATCHING_TIMEOUT_S = 1.0
"""RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S; Ray draws uniform(t, 2t) per check."""
BACKOFF_INITIAL_S = 0.025
BACKOFF_MULTIPLIER = 2
BACKOFF_MAX_S = 0.5
ROUTER_WAIT_LIMIT_S = 2.0
"""A request no replica took within this long is dropped (the client gives up)."""
LOAD_WINDOW_S = 120.0
"""Decay window of the affinity router's per-adapter demand estimate."""
UTILIZATIONS = (0.5, 0.9)
LRU_COMPARED = ("affinity", "ray_default")
"""Policies also run at the top utilization on LRU replicas (`sim_*_lru` keys)."""
FULL_REQUESTS = 30_000
QUICK_REQUESTS = 4_000
WARMUP_FRACTION = 0.1

POLICIES = ("affinity", "ray_default", "random", "oracle")


@dataclass(frozen=True)
class SimConfig:
    num_adapters: int = NUM_ADAPTERS
    zipf_exponent: float = ZIPF_EXPONENT
    num_replicas: int = NUM_REPLICAS
    slots_per_replica: int = SLOTS_PER_REPLICA
    max_queue: int = MAX_QUEUE
    service_time_s: float = SERVICE_TIME_S
    miss_penalty_s: float = MISS_PENALTY_S
    num_requests: int = FULL_REQUESTS
    seed: int = 0
    affinity_weights: RoutingWeights = DEFAULT_WEIGHTS
    admission: str = DEFAULT_ADMISSION
    """The replicas' slot policy (`deployments.engine.admission`); the oracle pins instead."""

    def __post_init__(self) -> None:
        if self.admission not in ADMISSION_POLICIES:
            raise ValueError(f"unknown admission {self.admission!r}; choose one of {ADMISSION_POLICIES}")
        if self.max_queue > self.slots_per_replica:
            # Each queued request holds a slot; more requests than slots could find none.
            raise ValueError("max_queue must be <= slots_per_replica")

    def popularity(self) -> list[float]:
        weights = [1.0 / (rank + 1) ** self.zipf_exponent for rank in range(self.num_adapters)]
        total = sum(weights)
        return [w / total for w in weights]

    def arrival_rate(self, utilization: float) -> float:
        """Requests/s at which the oracle's placement keeps replicas `utilization` busy."""
        pinned = self.num_replicas * self.slots_per_replica
        oracle_miss_share = sum(self.popularity()[pinned:])
        mean_service_s = self.service_time_s + oracle_miss_share * self.miss_penalty_s
        return utilization * self.num_replicas / mean_service_s


def adapter_name(rank: int) -> str:
    return f"adapter-{rank:03d}"


def make_trace(config: SimConfig, utilization: float) -> list[tuple[float, str]]:
    """(arrival time s, adapter id) pairs: Poisson arrivals, Zipf adapters, seeded."""
    rng = random.Random(f"trace:{config.seed}:{utilization}")
    cumulative = list(itertools.accumulate(config.popularity()))
    rate = config.arrival_rate(utilization)
    now = 0.0
    trace = []
    for _ in range(config.num_requests):
        now += rng.expovariate(rate)
        rank = min(bisect.bisect_left(cumulative, rng.random()), config.num_adapters - 1)
        trace.append((now, adapter_name(rank)))
    return trace


@dataclass(slots=True)
class _Request:
    index: int
    adapter_id: str
    arrival_s: float
    failures: int = 0
    hit: bool | None = None
    done_s: float | None = None
    dropped: bool = False
    # Ray's per-request routing context.
    ray_start_s: float | None = None
    ray_tried_first: bool = False
    ray_tried_fewest: bool = False


@dataclass(frozen=True)
class _Report:
    """What a replica last told the routers about its slots."""

    warm: frozenset[str] = frozenset()
    free_slots: int = 0
    evictable_slots: int = 0
    victim: str | None = None


class _PoolSlots:
    """A replica's slots: the engine's own `SlotPool`, with the admission policy under test."""

    def __init__(self, num_slots: int, admission: str) -> None:
        self._pool = SlotPool(num_slots, admission=admission)

    def acquire(self, adapter_id: str) -> bool:
        return self._pool.acquire(adapter_id).hit

    def release(self, adapter_id: str) -> None:
        self._pool.release(adapter_id)

    def report(self) -> _Report:
        snapshot = self._pool.snapshot()
        return _Report(
            frozenset(snapshot.warm), snapshot.free_slots, snapshot.evictable_slots, snapshot.next_victim
        )


class _PinnedSlots:
    """The oracle's replica: its pinned adapters, plus a scratch slot that keeps nothing."""

    def __init__(self, pinned: frozenset[str]) -> None:
        self._pinned = pinned

    def acquire(self, adapter_id: str) -> bool:
        return adapter_id in self._pinned

    def release(self, adapter_id: str) -> None:
        pass

    def report(self) -> _Report:
        return _Report(self._pinned, 0, 0, None)


@dataclass
class _Replica:
    replica_id: str
    slots: _PoolSlots | _PinnedSlots
    max_queue: int
    queue: deque = field(default_factory=deque)
    report: _Report = _Report()
    report_pending: bool = False
    routed_since_report: set[str] = field(default_factory=set)
    """Adapters the affinity router sent here since the last report: it counts them as warm."""

    def refresh_report(self) -> None:
        self.report = self.slots.report()
        self.report_pending = False
        self.routed_since_report.clear()

    @property
    def has_room(self) -> bool:
        return len(self.queue) < self.max_queue


Chooser = Callable[[_Request, float], "int | None"]


class _Simulation:
    def __init__(self, config: SimConfig, trace: list[tuple[float, str]], policy: str) -> None:
        self.config = config
        self.trace = trace
        self.now = 0.0
        self._events: list = []
        self._sequence = itertools.count()
        self.rng = random.Random(f"policy:{config.seed}:{policy}")
        self.oracle_home: dict[str, int] = {}
        if policy == "oracle":
            self.replicas = self._oracle_replicas()
        else:
            self.replicas = [
                _Replica(f"replica-{i}", _PoolSlots(config.slots_per_replica, config.admission), config.max_queue)
                for i in range(config.num_replicas)
            ]
        self.index_of = {r.replica_id: i for i, r in enumerate(self.replicas)}
        for replica in self.replicas:
            replica.refresh_report()
        self.choose: Chooser = {
            "affinity": self._choose_affinity,
            "ray_default": self._choose_ray_default,
            "random": self._choose_random,
            "oracle": self._choose_oracle,
        }[policy]
        self.load_tracker = AdapterLoadTracker(
            config.service_time_s, window_s=LOAD_WINDOW_S, clock=lambda: self.now
        )
        self.ray_fallback_match: set[str] = set()

    # -- the oracle's static placement ------------------------------------------------------
    def _oracle_replicas(self) -> list[_Replica]:
        config = self.config
        popularity = config.popularity()
        loads = [0.0] * config.num_replicas
        pinned: list[set[str]] = [set() for _ in range(config.num_replicas)]
        for rank in range(config.num_replicas * config.slots_per_replica):
            open_replicas = [
                i for i in range(config.num_replicas) if len(pinned[i]) < config.slots_per_replica
            ]
            target = min(open_replicas, key=lambda i: (loads[i], i))
            pinned[target].add(adapter_name(rank))
            loads[target] += popularity[rank]
            self.oracle_home[adapter_name(rank)] = target
        return [
            _Replica(f"replica-{i}", _PinnedSlots(frozenset(pinned[i])), config.max_queue)
            for i in range(config.num_replicas)
        ]

    # -- routers ----------------------------------------------------------------------------
    def _choose_affinity(self, request: _Request, now: float) -> int | None:
        views = [
            ReplicaView(
                replica_id=r.replica_id,
                warm=r.report.warm | r.routed_since_report,
                free_slots=r.report.free_slots,
                evictable_slots=r.report.evictable_slots,
                queue_len=len(r.queue),
                max_queue=r.max_queue,
                victim=r.report.victim,
                pending_loads=sum(1 for queued in r.queue if not queued.hit),
            )
            for r in self.replicas
        ]
        ranked = rank_replicas(
            views,
            request.adapter_id,
            demand=self.load_tracker,
            weights=self.config.affinity_weights,
        )
        if not ranked:
            return None
        choice = self.index_of[ranked[0]]
        self.replicas[choice].routed_since_report.add(request.adapter_id)
        return choice

    def _choose_random(self, request: _Request, now: float) -> int | None:
        open_replicas = [i for i, r in enumerate(self.replicas) if r.has_room]
        return self.rng.choice(open_replicas) if open_replicas else None

    def _choose_oracle(self, request: _Request, now: float) -> int | None:
        home = self.oracle_home.get(request.adapter_id)
        if home is not None:
            return home if self.replicas[home].has_room else None
        open_replicas = [i for i, r in enumerate(self.replicas) if r.has_room]
        if not open_replicas:
            return None
        return min(open_replicas, key=lambda i: (len(self.replicas[i].queue), i))

    def _ray_fewest_models(self) -> list[int]:
        fewest = min(len(r.report.warm) for r in self.replicas)
        return [i for i, r in enumerate(self.replicas) if len(r.report.warm) == fewest]

    def _choose_ray_default(self, request: _Request, now: float) -> int | None:
        # MultiplexMixin.apply_multiplex_routing, step for step.
        model_id = request.adapter_id
        if request.ray_start_s is None:
            request.ray_start_s = now
        timeout_s = self.rng.uniform(RAY_MATCHING_TIMEOUT_S, 2 * RAY_MATCHING_TIMEOUT_S)
        if now - request.ray_start_s < timeout_s:
            candidates = [i for i, r in enumerate(self.replicas) if model_id in r.report.warm]
            if (
                not candidates and model_id not in self.ray_fallback_match
            ) or request.ray_tried_first:
                candidates = self._ray_fewest_models()
                self.ray_fallback_match.add(model_id)
            elif candidates:
                self.ray_fallback_match.discard(model_id)
            request.ray_tried_first = True
        elif not request.ray_tried_fewest:
            candidates = self._ray_fewest_models()
            request.ray_tried_fewest = True
        else:
            candidates = list(range(len(self.replicas)))
        if not candidates:
            return None
        # PowerOfTwoChoicesRequestRouter.choose_replicas: two distinct at random.
        if len(candidates) == 1:
            chosen = candidates
        else:
            chosen = self.rng.sample(candidates, 2)
        # RequestRouter._select_from_candidate_replicas: shortest queue below the limit.
        best, best_len = None, math.inf
        for i in chosen:
            queue_len = len(self.replicas[i].queue)
            if queue_len < self.replicas[i].max_queue and queue_len < best_len:
                best, best_len = i, queue_len
        return best

    # -- the event loop ---------------------------------------------------------------------
    def _schedule(self, at_s: float, handler: Callable, *args) -> None:
        heapq.heappush(self._events, (at_s, next(self._sequence), handler, args))

    def _route(self, request: _Request) -> None:
        if request.failures == 0:
            self.load_tracker.record(request.adapter_id)
        choice = self.choose(request, self.now)
        if choice is not None:
            self._admit(self.replicas[choice], request)
            return
        request.failures += 1
        if request.failures == 1:
            delay_s = 0.0
        else:
            delay_s = min(
                BACKOFF_INITIAL_S * BACKOFF_MULTIPLIER ** (request.failures - 2), BACKOFF_MAX_S
            )
        if self.now + delay_s - request.arrival_s > ROUTER_WAIT_LIMIT_S:
            request.dropped = True
            return
        self._schedule(self.now + delay_s, self._route, request)

    def _admit(self, replica: _Replica, request: _Request) -> None:
        request.hit = replica.slots.acquire(request.adapter_id)
        self._report_later(replica)
        replica.queue.append(request)
        if len(replica.queue) == 1:
            self._start_next(replica)

    def _report_later(self, replica: _Replica) -> None:
        """Coalesce slot changes into one report at the next tick, as Ray's pusher does."""
        if not replica.report_pending:
            replica.report_pending = True
            tick_s = (math.floor(self.now / REPORT_INTERVAL_S) + 1) * REPORT_INTERVAL_S
            self._schedule(tick_s, replica.refresh_report)

    def _start_next(self, replica: _Replica) -> None:
        request = replica.queue[0]
        service_s = self.config.service_time_s
        if not request.hit:
            service_s += self.config.miss_penalty_s
        self._schedule(self.now + service_s, self._complete, replica)

    def _complete(self, replica: _Replica) -> None:
        request = replica.queue.popleft()
        replica.slots.release(request.adapter_id)
        self._report_later(replica)
        request.done_s = self.now
        if replica.queue:
            self._start_next(replica)

    def run(self) -> list[_Request]:
        requests = [_Request(i, adapter, at_s) for i, (at_s, adapter) in enumerate(self.trace)]
        for request in requests:
            self._schedule(request.arrival_s, self._route, request)
        while self._events:
            self.now, _, handler, args = heapq.heappop(self._events)
            handler(*args)
        return requests


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest rank: always one of the recorded values."""
    return ordered[max(1, math.ceil(q / 100.0 * len(ordered))) - 1]


def simulate_policy(config: SimConfig, policy: str, utilization: float) -> dict:
    """One policy on the trace for `utilization`; the metrics after warm-up."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
    trace = make_trace(config, utilization)
    requests = _Simulation(config, trace, policy).run()
    measured = requests[int(len(requests) * WARMUP_FRACTION) :]
    placed = [r for r in measured if r.hit is not None]
    latencies_ms = sorted((r.done_s - r.arrival_s) * 1000.0 for r in placed)
    hits = sum(1 for r in placed if r.hit)
    return {
        "hit_rate": round(hits / len(placed), 4) if placed else 0.0,
        "p50_ms": round(_percentile(latencies_ms, 50), 1) if latencies_ms else None,
        "p99_ms": round(_percentile(latencies_ms, 99), 1) if latencies_ms else None,
        "dropped": sum(1 for r in measured if r.dropped),
        "placed": len(placed),
    }


def _record(results: dict, policy: str, suffix: str, metrics: dict) -> None:
    results[f"sim_hit_rate_{policy}{suffix}"] = metrics["hit_rate"]
    results[f"sim_p50_ms_{policy}{suffix}"] = metrics["p50_ms"]
    results[f"sim_p99_ms_{policy}{suffix}"] = metrics["p99_ms"]
    results[f"sim_dropped_{policy}{suffix}"] = metrics["dropped"]


def run_simulation(quick: bool = False, seed: int = 0, admission: str = DEFAULT_ADMISSION) -> dict:
    """Every policy at every utilization; flat `sim_*` keys (no suffix = 90%, `_50` = 50%,
    `_lru` = 90% on LRU replicas)."""
    config = SimConfig(num_requests=QUICK_REQUESTS if quick else FULL_REQUESTS, seed=seed, admission=admission)
    started = time.perf_counter()
    results: dict = {}
    for utilization in UTILIZATIONS:
        suffix = "" if utilization == max(UTILIZATIONS) else f"_{round(utilization * 100)}"
        for policy in POLICIES:
            _record(results, policy, suffix, simulate_policy(config, policy, utilization))
    lru = dataclasses.replace(config, admission="lru")
    for policy in LRU_COMPARED:
        if admission == "lru":
            metrics = {name: results[f"sim_{name}_{policy}"] for name in ("hit_rate", "p50_ms", "p99_ms", "dropped")}
        else:
            metrics = simulate_policy(lru, policy, max(UTILIZATIONS))
        _record(results, policy, "_lru", metrics)
    affinity, oracle = results["sim_hit_rate_affinity"], results["sim_hit_rate_oracle"]
    ray_default = results["sim_hit_rate_ray_default"]
    results["sim_goal_within_5_points_of_oracle"] = oracle - affinity <= 0.05
    results["sim_goal_10_points_above_ray_default"] = affinity - ray_default >= 0.10
    results["sim_admission"] = admission
    results["sim_requests_per_run"] = config.num_requests
    results["sim_seed"] = seed
    results["sim_wall_s"] = round(time.perf_counter() - started, 2)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, fewer requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--admission", choices=ADMISSION_POLICIES, default=DEFAULT_ADMISSION,
        help="the replicas' slot admission policy (default: the engine's, %(default)s)",
    )
    args = parser.parse_args(argv)
    results = run_simulation(quick=args.quick, seed=args.seed, admission=args.admission)
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
