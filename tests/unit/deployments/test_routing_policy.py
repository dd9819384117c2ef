"""The adapter-affinity score: pure inputs, no Ray."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest

from deployments.routing_policy import (
    AdapterLoadTracker,
    ReplicaView,
    RoutingWeights,
    prewarm_order,
    rank_replicas,
    rendezvous_order,
)

NO_AWAY = RoutingWeights(away_cost=0.0)


def view(
    replica_id: str,
    *,
    warm: tuple[str, ...] = (),
    free: int = 0,
    evictable: int = 8,
    queue: int = 0,
    max_queue: int = 8,
    victim: str | None = None,
    pending_loads: int = 0,
) -> ReplicaView:
    return ReplicaView(
        replica_id=replica_id,
        warm=frozenset(warm),
        free_slots=free,
        evictable_slots=evictable,
        queue_len=queue,
        max_queue=max_queue,
        victim=victim,
        pending_loads=pending_loads,
    )


def idle_replicas(count: int) -> list[ReplicaView]:
    return [view(f"replica-{i}", free=8, evictable=0) for i in range(count)]


@dataclass(frozen=True)
class Case:
    name: str
    replicas: list[ReplicaView]
    expected: list[str]
    adapter_id: str | None = "a"
    demand: dict[str, float] = field(default_factory=dict)
    weights: RoutingWeights = RoutingWeights()


CASES = [
    Case(
        "warm beats free beats evictable at equal queues",
        [view("evict"), view("free", free=1), view("warm", warm=("a",))],
        ["warm", "free", "evict"],
    ),
    Case(
        "a shorter queue breaks a tie between warm replicas",
        [view("w3", warm=("a",), queue=3), view("w1", warm=("a",), queue=1)],
        ["w1", "w3"],
        weights=NO_AWAY,
    ),
    Case(
        "queued adapter loads count as longer waits",
        [
            view("q2-loading", warm=("a",), queue=2, pending_loads=2),
            view("q4", warm=("a",), queue=4),
        ],
        ["q4", "q2-loading"],
        weights=NO_AWAY,
    ),
    Case(
        "a lightly loaded warm replica still beats an idle cold one",
        [view("warm", warm=("a",), queue=3), view("cold", free=1)],
        ["warm", "cold"],
        weights=NO_AWAY,
    ),
    Case(
        "a very loaded warm replica loses to an idle one with a free slot",
        [view("warm", warm=("a",), queue=7), view("cold", free=1)],
        ["cold", "warm"],
        weights=NO_AWAY,
    ),
    Case(
        "a full queue is excluded",
        [view("full", warm=("a",), queue=8), view("cold", free=1)],
        ["cold"],
    ),
    Case(
        "waiting for a full warm replica beats evicting a popular adapter elsewhere",
        [view("full", warm=("a",), queue=8), view("cold", victim="popular")],
        [],
        demand={"popular": 0.5},
    ),
    Case(
        "no free or evictable slot: only a replica where the adapter is warm fits",
        [view("held", evictable=0), view("held-warm", warm=("a",), evictable=0, queue=2)],
        ["held-warm"],
    ),
    Case(
        "a cold adapter evicts a rarely used adapter rather than a popular one",
        [view("evicts-popular", victim="popular"), view("evicts-rare", victim="rare")],
        ["evicts-rare", "evicts-popular"],
        demand={"popular": 0.2, "rare": 0.0001},
        weights=NO_AWAY,
    ),
    Case(
        "an unknown victim is charged in full",
        [view("unknown"), view("evicts-rare", victim="rare")],
        ["evicts-rare", "unknown"],
        demand={"rare": 0.0001},
        weights=NO_AWAY,
    ),
    Case(
        "base-model requests go to the least loaded replica, full ones excluded",
        [view("q3", queue=3), view("q1", queue=1), view("full", queue=8), view("q2", queue=2)],
        ["q1", "q2", "q3"],
        adapter_id=None,
    ),
    Case(
        "base-model load is relative to each replica's max_queue",
        [view("half-of-4", queue=2, max_queue=4), view("3-of-8", queue=3, max_queue=8)],
        ["3-of-8", "half-of-4"],
        adapter_id=None,
    ),
    Case("no replicas, no choice", [], []),
    Case("every queue full", [view("x", warm=("a",), queue=8), view("y", queue=8)], []),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_ranking(case: Case) -> None:
    ranked = rank_replicas(
        case.replicas, case.adapter_id, demand=case.demand, weights=case.weights
    )
    assert ranked == case.expected


def test_ranking_does_not_depend_on_replica_order() -> None:
    rng = random.Random(7)
    adapters = [f"adapter-{i}" for i in range(20)]
    for _ in range(200):
        replicas = [
            view(
                f"replica-{i}",
                warm=tuple(rng.sample(adapters, 3)),
                free=rng.choice([0, 0, 1]),
                evictable=rng.randint(0, 3),
                queue=rng.randint(0, 8),
                victim=rng.choice([None, *adapters]),
            )
            for i in range(5)
        ]
        adapter_id = rng.choice([None, *adapters])
        demand = {a: rng.random() for a in adapters}
        expected = rank_replicas(replicas, adapter_id, demand=demand)
        shuffled = replicas[:]
        rng.shuffle(shuffled)
        assert rank_replicas(shuffled, adapter_id, demand=demand) == expected
        assert all(r.queue_len < r.max_queue for r in replicas if r.replica_id in expected)


def test_cold_adapter_goes_to_its_rendezvous_first_choice_every_time() -> None:
    replicas = idle_replicas(4)
    ids = [r.replica_id for r in replicas]
    for i in range(50):
        adapter_id = f"adapter-{i}"
        first = rendezvous_order(adapter_id, ids)[0]
        for _ in range(3):
            shuffled = replicas[:]
            random.Random(i).shuffle(shuffled)
            assert rank_replicas(shuffled, adapter_id)[0] == first


def test_rendezvous_order_is_stable_and_spreads_adapters() -> None:
    ids = [f"replica-{i}" for i in range(4)]
    homes = [rendezvous_order(f"adapter-{i}", ids)[0] for i in range(400)]
    assert homes == [rendezvous_order(f"adapter-{i}", reversed(ids))[0] for i in range(400)]
    for replica_id in ids:
        assert 0.15 < homes.count(replica_id) / len(homes) < 0.35
    reseeded = [rendezvous_order(f"adapter-{i}", ids, seed=1)[0] for i in range(400)]
    assert reseeded != homes


def test_removing_a_replica_moves_only_the_adapters_homed_on_it() -> None:
    replicas = idle_replicas(4)
    removed = "replica-2"
    remaining = [r for r in replicas if r.replica_id != removed]
    moved = 0
    for i in range(200):
        adapter_id = f"adapter-{i}"
        before = rank_replicas(replicas, adapter_id)[0]
        after = rank_replicas(remaining, adapter_id)[0]
        if before == removed:
            moved += 1
            # It moves to its second choice, the same one every router computes.
            order = rendezvous_order(adapter_id, [r.replica_id for r in replicas])
            assert after == order[1]
        else:
            assert after == before
    assert moved > 0


@pytest.mark.parametrize("count_own_routing", [True, False])
def test_a_burst_for_a_cold_adapter_lands_on_one_replica(count_own_routing: bool) -> None:
    """Requests routed before any replica reports the adapter warm still agree."""
    replicas = {r.replica_id: r for r in idle_replicas(4)}
    # Without counting its own routing as warm, the router relies on away_cost alone.
    weights = RoutingWeights() if count_own_routing else RoutingWeights(away_cost=3.0)
    chosen = set()
    for _ in range(4):  # up to the busy threshold (4 of 8)
        target = rank_replicas(list(replicas.values()), "burst", weights=weights)[0]
        chosen.add(target)
        old = replicas[target]
        warm = old.warm | {"burst"} if count_own_routing else old.warm
        replicas[target] = view(
            target, warm=tuple(warm), free=old.free_slots, evictable=0, queue=old.queue_len + 1
        )
    assert len(chosen) == 1


def test_hot_adapter_spreads_to_its_second_rendezvous_replica_when_home_is_busy() -> None:
    ids = [f"replica-{i}" for i in range(4)]
    first, second, *_ = rendezvous_order("hot", ids)
    replicas = [
        view(rid, warm=("hot",) if rid == first else (), free=1, queue=6 if rid == first else 0)
        for rid in ids
    ]
    assert rank_replicas(replicas, "hot")[0] == second
    # Once warm there too, it stays on those two rather than wandering.
    replicas = [
        view(rid, warm=("hot",) if rid in (first, second) else (), free=1, queue=q)
        for rid, q in zip(ids, [6 if rid == first else 2 if rid == second else 0 for rid in ids])
    ]
    assert rank_replicas(replicas, "hot")[0] == second


def test_hot_adapter_stays_on_its_home_while_home_has_room_to_spare() -> None:
    ids = [f"replica-{i}" for i in range(4)]
    first = rendezvous_order("hot", ids)[0]
    replicas = [
        view(rid, warm=("hot",) if rid == first else (), free=1, queue=2 if rid == first else 0)
        for rid in ids
    ]
    assert rank_replicas(replicas, "hot")[0] == first


def test_demand_beyond_one_replica_adds_the_next_rendezvous_replica_to_the_home_set() -> None:
    ids = [f"replica-{i}" for i in range(4)]
    first, second, third, _ = rendezvous_order("hot", ids)
    queues = {first: 2, second: 1, third: 0}
    replicas = [
        view(rid, warm=("hot",) if rid == first else (), free=1, queue=queues.get(rid, 3))
        for rid in ids
    ]
    calm = rank_replicas(replicas, "hot", demand={"hot": 0.1})
    assert calm.index(third) < calm.index(second)  # both away: the shorter queue wins
    hot = rank_replicas(replicas, "hot", demand={"hot": 1.0})  # > load_per_replica (0.75)
    assert hot[0] == first
    assert hot.index(second) < hot.index(third)  # the second is home now: no away cost


@pytest.mark.parametrize(
    "kwargs",
    [
        {"replica_id": ""},
        {"free_slots": -1},
        {"evictable_slots": True},
        {"queue_len": 1.5},
        {"max_queue": 0},
        {"warm": {"a"}},
        {"queue_len": 1, "pending_loads": 2},
    ],
)
def test_replica_view_refuses_bad_fields(kwargs: dict) -> None:
    fields = dict(
        replica_id="r", warm=frozenset(), free_slots=0, evictable_slots=0, queue_len=0, max_queue=1
    )
    fields.update(kwargs)
    with pytest.raises(ValueError):
        ReplicaView(**fields)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"miss_cost": -1.0},
        {"evict_cost": math.inf},
        {"busy_fraction": 0.0},
        {"busy_fraction": 1.5},
        {"load_per_replica": 0.0},
        {"victim_horizon": -1.0},
    ],
)
def test_routing_weights_refuse_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RoutingWeights(**kwargs)


def test_rank_replicas_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="unique"):
        rank_replicas([view("x"), view("x")], "a")
    with pytest.raises(ValueError, match="adapter_id"):
        rank_replicas([view("x")], "")
    with pytest.raises(ValueError, match="demand"):
        rank_replicas([view("x")], "a", demand={"a": -1.0})


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_load_tracker_measures_demand_in_replicas_worth_and_decays() -> None:
    clock = FakeClock()
    tracker = AdapterLoadTracker(service_time_s=0.5, window_s=10.0, clock=clock)
    for _ in range(10):
        tracker.record("a")
    assert tracker["a"] == pytest.approx(10 / 10.0 * 0.5)
    assert tracker.get("never-seen", 0.0) == 0.0
    with pytest.raises(KeyError):
        tracker["never-seen"]
    clock.now = 10.0
    assert tracker["a"] == pytest.approx(0.5 * math.exp(-1))
    tracker.record("b")
    assert set(tracker) == {"a", "b"} and len(tracker) == 2
    clock.now = 200.0
    tracker.prune()
    assert len(tracker) == 0


def test_load_tracker_feeds_rank_replicas() -> None:
    clock = FakeClock()
    tracker = AdapterLoadTracker(service_time_s=1.0, window_s=1.0, clock=clock)
    tracker.record("popular")
    replicas = [view("evicts-popular", victim="popular"), view("evicts-rare", victim="rare")]
    assert rank_replicas(replicas, "new", demand=tracker, weights=NO_AWAY)[0] == "evicts-rare"


def test_load_tracker_refuses_bad_settings() -> None:
    with pytest.raises(ValueError):
        AdapterLoadTracker(service_time_s=0.0)
    with pytest.raises(ValueError):
        AdapterLoadTracker(service_time_s=1.0, window_s=-1.0)


def test_a_pinned_adapter_goes_to_the_replicas_it_is_pinned_on() -> None:
    """A cold replica first in the adapter's rendezvous order loses to the one it is pinned on,
    which is home (no away cost) and warm (no slot cost) even before its report says warm."""
    ids = [f"replica-{i}" for i in range(4)]
    first, *_, last = rendezvous_order("pinned", ids)
    replicas = [
        ReplicaView(rid, frozenset(), free_slots=1, evictable_slots=0, queue_len=1 if rid == last else 0,
                    max_queue=8, pinned=frozenset({"pinned"}) if rid == last else frozenset())
        for rid in ids
    ]
    assert rank_replicas(replicas, "pinned")[0] == last
    unpinned = [view(rid, free=1, evictable=0, queue=1 if rid == last else 0) for rid in ids]
    assert rank_replicas(unpinned, "pinned")[0] == first


# ---- prewarm_order: what a joining replica loads first -----------------------------------------


def test_a_joining_replica_prewarms_the_adapters_it_becomes_home_for_then_the_most_requested():
    others = ["r1", "r2"]
    requests = {f"acme/a{i}": 100 // (i + 1) for i in range(12)}
    order = prewarm_order(requests, others, "new", limit=6)
    members = ["new", *others]
    total = sum(requests.values())

    def homed(adapter_id: str) -> bool:
        spread = max(1, math.ceil(requests[adapter_id] / total * 3 / 0.75))
        return "new" in rendezvous_order(adapter_id, members)[:spread]

    expected_homed = [a for a in sorted(requests, key=lambda a: -requests[a]) if homed(a)]
    assert len(order) == 6 and len(set(order)) == 6
    assert order[:len(expected_homed[:6])] == expected_homed[:6]
    rest = [a for a in sorted(requests, key=lambda a: -requests[a]) if a not in expected_homed[:6]]
    assert order[len(expected_homed[:6]):] == rest[: 6 - len(expected_homed[:6])]
    assert "acme/a0" in order  # the hottest spreads to every replica's prewarm when it fits


def test_prewarm_order_is_empty_without_demand_or_room_and_ignores_unrequested_ids():
    assert prewarm_order({}, ["r1"], "new", limit=4) == []
    assert prewarm_order({"acme/a": 3}, ["r1"], "new", limit=0) == []
    assert prewarm_order({"acme/a": 3, "acme/b": 0}, [], "new", limit=4) == ["acme/a"]
