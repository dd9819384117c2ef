"""The adapter-affinity RequestRouter: Ray's objects in, Ray's ranks out.

Unit tests drive the router with fake `RunningReplica`s and an injected clock (no cluster), as
Ray's own router tests do; one integration test serves `LoraReplica` on a local Ray and checks
that each adapter loads on one replica only.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter

from deployments.contracts import RoutingStats
from deployments.request_router import (
    ROUTER_CLASS_PATH,
    AdapterAffinityRouter,
    AffinityRouterSettings,
    affinity_request_router_config,
)
from deployments.routing_policy import rendezvous_order

T = TypeVar("T")
DEPLOYMENT = DeploymentID(name="LoraReplica", app_name="test")
MAX_ONGOING = 8


class FakeRunningReplica:
    """What the router reads of Ray's `RunningReplica`; `queue_len` answers Ray's probes."""

    def __init__(self, name: str, stats: dict | None = None, queue_len: int = 0) -> None:
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self.routing_stats = stats or {}
        self.queue_len = queue_len
        self.max_ongoing_requests = MAX_ONGOING
        self.multiplexed_model_ids: set[str] = set()
        self.node_id = "node"
        self.availability_zone = None
        self.is_cross_language = False

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def stats(warm: tuple[str, ...] = (), free: int = 2, queue: int = 0) -> dict:
    """A replica's report as Ray carries it (`RoutingStats.to_dict()`): 2 slots, nothing evictable."""
    return RoutingStats(warm=tuple(warm), free_slots=free, queue_len=queue, num_slots=2).to_dict()


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(scenario())


def make_router(replicas: list[FakeRunningReplica], clock: FakeClock, **kwargs: Any) -> AdapterAffinityRouter:
    """Built the way Ray builds it (`_private/router.py`); call inside a running event loop."""
    router = AdapterAffinityRouter(
        deployment_id=DEPLOYMENT,
        handle_source=DeploymentHandleSource.UNKNOWN,
        use_replica_queue_len_cache=True,
        get_curr_time_s=clock,
        self_node_id="node",
        prefer_local_node_routing=False,
    )
    router.initialize_state(**kwargs)
    router.update_replicas(replicas)
    return router


def request(adapter_id: str = "") -> PendingRequest:
    metadata = RequestMetadata(
        request_id="r", internal_request_id=uuid.uuid4().hex, multiplexed_model_id=adapter_id
    )
    return PendingRequest(args=[], kwargs={}, metadata=metadata)


async def choose(router: AdapterAffinityRouter, adapter_id: str = "") -> list[str]:
    """The replica names in rank order (each rank holds one replica)."""
    pending = request(adapter_id)
    ranks = await router.choose_replicas(router._replicas_list, pending)
    assert pending.routing_context.should_backoff, "without it Ray retries an empty answer in a busy loop"
    assert all(len(rank) == 1 for rank in ranks)
    return [rank[0].replica_id.unique_id for rank in ranks]


async def route(router: AdapterAffinityRouter, adapter_id: str) -> str:
    """What Ray does with the ranks: take the first, count it in its queue cache, confirm it."""
    pending = request(adapter_id)
    chosen = (await router.choose_replicas(router._replicas_list, pending))[0][0]
    router.on_send_request(chosen.replica_id)
    router.on_request_routed(pending, chosen.replica_id, result=None)
    return chosen.replica_id.unique_id


def by_rendezvous(adapter_id: str) -> tuple[str, str]:
    first, second = rendezvous_order(adapter_id, ["a", "b"])
    return first, second


# ---- translation: Ray's replicas -> views -> ranks --------------------------------------------


@pytest.mark.parametrize("holder", ["a", "b"])
def test_the_replica_with_the_adapter_warm_comes_first(holder):
    async def scenario() -> list[str]:
        replicas = [
            FakeRunningReplica(name, stats(warm=("acme/pirate",) if name == holder else ()))
            for name in ("a", "b")
        ]
        return await choose(make_router(replicas, FakeClock()), "acme/pirate")

    ranked = run(scenario)
    assert ranked[0] == holder
    assert sorted(ranked) == ["a", "b"]


def test_a_burst_for_a_cold_adapter_follows_its_first_request():
    async def scenario() -> tuple[list[str], list[str]]:
        router = make_router([FakeRunningReplica("a", stats()), FakeRunningReplica("b", stats())], FakeClock())
        burst = [await route(router, "cold/one") for _ in range(5)]
        views = [router._view(replica, router._get_curr_time_s()) for replica in router._replicas_list]
        return burst, [view.replica_id for view in views if "cold/one" in view.warm]

    burst, warm_on = run(scenario)
    assert burst == [by_rendezvous("cold/one")[0]] * 5
    assert warm_on == [burst[0]]


def test_the_burst_follows_the_choice_before_ray_confirms_it():
    """Concurrent routing tasks choose before the first request's accept arrives."""

    async def scenario() -> list[str]:
        router = make_router([FakeRunningReplica("a", stats()), FakeRunningReplica("b", stats())], FakeClock())
        chosen = []
        for _ in range(5):
            first = (await choose(router, "cold/two"))[0]
            router.on_send_request(ReplicaID(unique_id=first, deployment_id=DEPLOYMENT))
            chosen.append(first)
        return chosen

    assert run(scenario) == [by_rendezvous("cold/two")[0]] * 5


def test_an_adapter_sent_since_the_report_takes_a_free_slot():
    """Four cold adapters fill the 2 x 2 slots before any report: a fifth fits nowhere yet."""

    async def scenario() -> tuple[list[str], list[str]]:
        router = make_router([FakeRunningReplica("a", stats()), FakeRunningReplica("b", stats())], FakeClock())
        placed = [await route(router, adapter_id) for adapter_id in ("x/1", "x/2", "x/3", "x/4")]
        return placed, await choose(router, "x/5")

    placed, fifth = run(scenario)
    assert sorted(placed) == ["a", "a", "b", "b"]
    assert fifth == []


def test_a_newer_report_replaces_what_the_router_noted():
    async def scenario() -> tuple[bool, bool, bool]:
        clock = FakeClock()
        first, _ = by_rendezvous("acme/pirate")
        replicas = [FakeRunningReplica("a", stats()), FakeRunningReplica("b", stats())]
        router = make_router(replicas, clock)
        holder = next(r for r in replicas if r.replica_id.unique_id == first)
        await route(router, "acme/pirate")

        def noted() -> bool:
            return "acme/pirate" in router._view(holder, clock()).warm

        clock.now_s += 0.2  # a report taken before the request arrived: keep the note
        holder.routing_stats = stats(queue=1)
        router.update_replicas(replicas)
        kept = noted()
        clock.now_s += 5  # a later report without the adapter (evicted, or the request failed)
        holder.routing_stats = stats(queue=0)
        router.update_replicas(replicas)
        forgotten = not noted()
        holder.routing_stats = stats(warm=("acme/pirate",))
        router.update_replicas(replicas)
        return kept, forgotten, noted()

    assert run(scenario) == (True, True, True)


def test_replicas_without_stats_are_usable_and_count_as_empty():
    async def scenario() -> tuple[list[str], list[str], list[str]]:
        fresh = make_router([FakeRunningReplica("a"), FakeRunningReplica("b")], FakeClock())
        # a's slots are all held by requests in flight; b has not reported yet
        mixed = make_router(
            [FakeRunningReplica("a", stats(warm=("p", "q"), free=0)), FakeRunningReplica("b")], FakeClock()
        )
        return await choose(fresh, "cold/adapter"), await choose(fresh), await choose(mixed, "cold/adapter")

    cold, base, mixed = run(scenario)
    assert cold == list(by_rendezvous("cold/adapter"))
    assert sorted(base) == ["a", "b"]
    assert mixed == ["b"]


def test_base_model_requests_go_to_the_least_loaded_replica():
    async def scenario() -> tuple[list[str], list[str]]:
        reported = make_router(
            [FakeRunningReplica("a", stats(queue=5)), FakeRunningReplica("b", stats(queue=2))], FakeClock()
        )
        from_reports = await choose(reported)
        # Ray's queue-length cache (sends, completions, probes) is fresher than b's report
        reported.on_new_queue_len_info(reported._replicas_list[1].replica_id, 6)
        return from_reports, await choose(reported)

    from_reports, from_cache = run(scenario)
    assert from_reports == ["b", "a"]
    assert from_cache == ["a", "b"]


def test_a_burst_balances_even_when_rays_queue_cache_lags():
    """Probes answer with what a replica has received; under a burst that is 0 while every request
    is still on its way. The router's own in-flight count keeps the queues it routes by honest."""

    async def scenario() -> tuple[dict[str, int], dict[str, int]]:
        replicas = [FakeRunningReplica("a", stats(free=2)), FakeRunningReplica("b", stats(free=2))]
        for replica in replicas:
            replica.max_ongoing_requests = 64
        router = make_router(replicas, FakeClock())
        pendings: list[tuple[PendingRequest, ReplicaID]] = []
        counts = {"a": 0, "b": 0}
        for index in range(32):
            pending = request(f"acme/a{index % 2}")
            chosen = (await router.choose_replicas(router._replicas_list, pending))[0][0]
            router.on_send_request(chosen.replica_id)
            router.on_request_routed(pending, chosen.replica_id, result=None)
            for replica in replicas:  # a stale probe reply overwrites the sends Ray counted
                router.on_new_queue_len_info(replica.replica_id, 0)
            pendings.append((pending, chosen.replica_id))
            counts[chosen.replica_id.unique_id] += 1
        for pending, replica_id in pendings:  # all done: the in-flight counts go back to zero
            router.on_request_completed(replica_id, pending.metadata.internal_request_id)
        after = {"a": 0, "b": 0}
        for _ in range(8):
            after[(await route(router, ""))] += 1
        return counts, after

    during, after = run(scenario)
    assert abs(during["a"] - during["b"]) <= 8, during  # affinity may pull a few, never the whole burst
    assert after == {"a": 4, "b": 4}, after


def test_a_request_that_completes_before_ray_confirms_it_is_not_counted_forever():
    """Ray registers the completion callback before the accept reply: a short request can end
    first. It must not stay in the in-flight count (it would push every later request away)."""

    async def scenario() -> tuple[int, list[str]]:
        replicas = [FakeRunningReplica("a", stats(free=2)), FakeRunningReplica("b", stats(free=2))]
        router = make_router(replicas, FakeClock())
        for _ in range(5):
            pending = request("")
            router.on_request_completed(replicas[0].replica_id, pending.metadata.internal_request_id)
            router.on_request_routed(pending, replicas[0].replica_id, result=None)
        rejected = request("")  # completed, never routed: remembered, but bounded
        router.on_request_completed(replicas[1].replica_id, rejected.metadata.internal_request_id)
        return len(router._in_flight.get(replicas[0].replica_id, ())), await choose(router)

    in_flight, order = run(scenario)
    assert in_flight == 0
    assert order == ["a", "b"]  # a is not "busy" with 5 requests long gone


def test_full_replicas_are_offered_for_a_probe_and_ray_backs_off():
    async def scenario() -> tuple[list[str], list[str]]:
        replicas = [
            FakeRunningReplica("a", stats(warm=("acme/pirate",), free=1), queue_len=MAX_ONGOING),
            FakeRunningReplica("b", stats(), queue_len=5),
        ]
        router = make_router(replicas, FakeClock())
        for replica in replicas:  # what Ray's probes and rejection replies write into its cache
            router.on_new_queue_len_info(replica.replica_id, replica.queue_len)
        warm_but_full = await choose(router, "acme/pirate")
        no_slot = make_router([FakeRunningReplica("a", stats(warm=("p", "q"), free=0))], FakeClock())
        return warm_but_full, await choose(no_slot, "cold/adapter")

    warm_but_full, no_slot = run(scenario)
    assert warm_but_full == ["a"]  # wait for the warm replica (Ray probes it), do not load on b
    assert no_slot == []


def test_a_malformed_report_counts_as_no_report():
    async def scenario() -> list[str]:
        replicas = [FakeRunningReplica("a", {"warm": "oops"}), FakeRunningReplica("b", stats())]
        router = make_router(replicas, FakeClock())
        return await choose(router, "acme/pirate")

    assert sorted(run(scenario)) == ["a", "b"]


def test_demand_is_counted_once_per_routed_request():
    async def scenario() -> float:
        router = make_router(
            [FakeRunningReplica("a", stats())], FakeClock(), service_time_s=2.0, demand_window_s=10.0
        )
        for _ in range(3):
            await route(router, "hot/adapter")
        await choose(router, "hot/adapter")  # a retry or a choice alone is not a request served
        return router._demand["hot/adapter"]

    assert run(scenario) == pytest.approx(3 / 10.0 * 2.0)


# ---- configuration -----------------------------------------------------------------------------


def test_the_config_names_this_router_and_its_settings():
    config = affinity_request_router_config(0.25, settings=AffinityRouterSettings(weights={"miss_cost": 3.0}))
    assert config.request_router_class == ROUTER_CLASS_PATH
    assert config.request_routing_stats_period_s == 0.25
    assert config.request_router_kwargs["weights"] == {"miss_cost": 3.0}
    router_class = config.get_request_router_class()
    assert router_class.__name__ == "AdapterAffinityRouter" and issubclass(router_class, RequestRouter)


def test_the_yaml_form_loads_the_same_router():
    as_in_yaml = {
        "request_router_class": ROUTER_CLASS_PATH,
        "request_router_kwargs": {"service_time_s": 0.5, "weights": {"seed": 7}},
        "request_routing_stats_period_s": 0.5,
    }
    config = RequestRouterConfig(**as_in_yaml)
    assert config.get_request_router_class().__name__ == "AdapterAffinityRouter"
    settings = AffinityRouterSettings.model_validate(config.request_router_kwargs)
    assert settings.routing_weights().seed == 7 and isinstance(settings.routing_weights().seed, int)


@pytest.mark.parametrize(
    "kwargs",
    [{"weights": {"miss_kost": 1.0}}, {"weights": {"busy_fraction": 2.0}}, {"service_time_s": 0}, {"typo": 1}],
)
def test_bad_router_kwargs_are_refused(kwargs):
    with pytest.raises(ValueError):
        AffinityRouterSettings.model_validate(kwargs)


def weighted(weights: dict) -> dict:
    return {**stats(), "routing_weights": weights}


def test_the_replicas_routing_weights_reach_the_router_once_they_agree():
    """A `serve deploy` changes LoraReplica's `routing_weights`: the replicas report them and
    every router uses them over its own kwargs, but not while replicas still disagree."""
    clock = FakeClock()

    async def scenario():
        a, b = FakeRunningReplica("a", weighted({})), FakeRunningReplica("b", weighted({}))
        router = make_router([a, b], clock, weights={"miss_cost": 3.0, "seed": 5})
        seen = [router._weights]
        a.routing_stats = weighted({"miss_cost": 9.0})
        router.update_replicas([a, b])
        seen.append(router._weights)
        b.routing_stats = weighted({"miss_cost": 9.0})
        router.update_replicas([a, b])
        seen.append(router._weights)
        return seen

    kwargs_only, mixed, agreed = run(scenario)
    assert (kwargs_only.miss_cost, kwargs_only.seed) == (3.0, 5)
    assert mixed == kwargs_only
    assert (agreed.miss_cost, agreed.seed) == (9.0, 5)
