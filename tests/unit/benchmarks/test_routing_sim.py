"""The routing policy simulation: deterministic, faithful to its models, and telling them apart."""

from __future__ import annotations

import json

import pytest

import benchmarks.routing_sim as routing_sim
from benchmarks.routing_sim import POLICIES, SimConfig, run_simulation, simulate_policy
from deployments.engine.admission import LruAdmission, TinyLfuAdmission
from deployments.engine.slots import SlotPool

SMALL = SimConfig(num_requests=1500)


@pytest.fixture(scope="module")
def quick_results() -> dict:
    return run_simulation(quick=True)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_seed_gives_the_same_figures_twice(policy: str) -> None:
    assert simulate_policy(SMALL, policy, 0.9) == simulate_policy(SMALL, policy, 0.9)


def test_a_different_seed_gives_a_different_trace() -> None:
    other = SimConfig(num_requests=1500, seed=1)
    assert routing_sim.make_trace(SMALL, 0.9) != routing_sim.make_trace(other, 0.9)


def test_quick_run_reports_every_policy_at_both_utilizations(quick_results: dict) -> None:
    for policy in POLICIES:
        for suffix in ("", "_50"):
            assert 0.0 <= quick_results[f"sim_hit_rate_{policy}{suffix}"] <= 1.0
            assert quick_results[f"sim_p50_ms_{policy}{suffix}"] > 0
            p99 = quick_results[f"sim_p99_ms_{policy}{suffix}"]
            assert p99 >= quick_results[f"sim_p50_ms_{policy}{suffix}"]
            dropped = quick_results[f"sim_dropped_{policy}{suffix}"]
            assert isinstance(dropped, int) and 0 <= dropped < quick_results["sim_requests_per_run"]
        assert quick_results[f"sim_dropped_{policy}_50"] == 0  # at half load no queue overflows


def test_affinity_hits_more_than_random(quick_results: dict) -> None:
    for suffix in ("", "_50"):
        affinity = quick_results[f"sim_hit_rate_affinity{suffix}"]
        assert affinity > quick_results[f"sim_hit_rate_random{suffix}"] + 0.15


def test_affinity_beats_ray_default_when_loaded(quick_results: dict) -> None:
    assert quick_results["sim_hit_rate_affinity"] > quick_results["sim_hit_rate_ray_default"]
    assert quick_results["sim_dropped_affinity"] < quick_results["sim_dropped_ray_default"]


def test_oracle_hit_rate_is_the_popularity_share_it_pins(quick_results: dict) -> None:
    config = SimConfig()
    pinned_share = sum(config.popularity()[: config.num_replicas * config.slots_per_replica])
    assert quick_results["sim_hit_rate_oracle_50"] == pytest.approx(pinned_share, abs=0.03)


def test_oracle_pins_the_top_adapters_eight_per_replica_balanced() -> None:
    simulation = routing_sim._Simulation(SMALL, [], "oracle")
    homes = simulation.oracle_home
    assert set(homes) == {routing_sim.adapter_name(rank) for rank in range(32)}
    assert sorted(list(homes.values()).count(i) for i in range(4)) == [8, 8, 8, 8]
    popularity = SMALL.popularity()
    loads = [0.0] * 4
    for name, replica in homes.items():
        loads[replica] += popularity[int(name.split("-")[1])]
    assert max(loads) - min(loads) < popularity[0] / 2


def test_arrival_rate_keeps_the_oracle_at_the_target_utilization() -> None:
    config = SimConfig()
    pinned_share = sum(config.popularity()[:32])
    mean_service_s = config.service_time_s + (1 - pinned_share) * config.miss_penalty_s
    rate = config.arrival_rate(0.9)
    assert rate * mean_service_s / config.num_replicas == pytest.approx(0.9)


def test_config_refuses_more_queue_than_slots() -> None:
    with pytest.raises(ValueError, match="max_queue"):
        SimConfig(max_queue=9, slots_per_replica=8)


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        simulate_policy(SMALL, "round_robin", 0.5)


def _ray_simulation() -> routing_sim._Simulation:
    simulation = routing_sim._Simulation(SMALL, [], "ray_default")
    for i, replica in enumerate(simulation.replicas):
        warm = {f"filler-{i}-{k}" for k in range(8)}
        replica.report = routing_sim._Report(warm=frozenset(warm))
    return simulation


def test_ray_model_tries_the_replica_holding_the_model_first() -> None:
    simulation = _ray_simulation()
    holder = simulation.replicas[2]
    holder.report = routing_sim._Report(warm=holder.report.warm | {"m"})
    request = routing_sim._Request(0, "m", arrival_s=0.0)
    assert simulation._choose_ray_default(request, now=0.0) == 2


def test_ray_model_falls_back_to_fewest_models_when_the_holder_is_full() -> None:
    simulation = _ray_simulation()
    holder = simulation.replicas[2]
    holder.report = routing_sim._Report(warm=holder.report.warm | {"m"})
    holder.queue.extend([None] * holder.max_queue)
    request = routing_sim._Request(0, "m", arrival_s=0.0)
    assert simulation._choose_ray_default(request, now=0.0) is None  # the holder refused
    # The next attempt, still within the matching timeout, goes to the fewest-models replicas:
    # every replica but the holder, which now has one model more.
    choices = {simulation._choose_ray_default(request, now=0.0) for _ in range(50)}
    assert choices <= {0, 1, 3} and len(choices) > 1


def test_main_prints_one_json_line_last(monkeypatch, capsys) -> None:
    monkeypatch.setattr(
        routing_sim, "run_simulation", lambda quick, seed, admission: {"quick": quick, "admission": admission}
    )
    assert routing_sim.main(["--quick"]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == {"quick": True, "admission": "tinylfu"}
    assert routing_sim.main(["--quick", "--admission", "lru"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["admission"] == "lru"


# ---- the replicas' slots are the engine's SlotPool, with its admission policy ---------------


@pytest.mark.parametrize("admission,policy_class", [("lru", LruAdmission), ("tinylfu", TinyLfuAdmission)])
def test_replicas_use_the_engine_slot_pool_with_the_configured_admission(admission, policy_class) -> None:
    simulation = routing_sim._Simulation(SimConfig(num_requests=10, admission=admission), [], "affinity")
    for replica in simulation.replicas:
        assert isinstance(replica.slots._pool, SlotPool)
        assert isinstance(replica.slots._pool.admission, policy_class)


def test_config_refuses_an_unknown_admission() -> None:
    with pytest.raises(ValueError, match="unknown admission"):
        SimConfig(admission="fifo")


def test_reported_victim_is_the_pools_next_victim() -> None:
    slots = routing_sim._PoolSlots(2, "tinylfu")
    for adapter_id in ("hot", "hot", "hot", "once"):
        slots.acquire(adapter_id)
        slots.release(adapter_id)
    assert slots.report().victim == "once"  # under LRU it would be "hot", the least recent


def test_quick_run_reports_the_lru_comparison(quick_results: dict) -> None:
    assert quick_results["sim_admission"] == "tinylfu"
    for policy in routing_sim.LRU_COMPARED:
        assert 0.0 <= quick_results[f"sim_hit_rate_{policy}_lru"] <= 1.0
        assert quick_results[f"sim_p99_ms_{policy}_lru"] >= quick_results[f"sim_p50_ms_{policy}_lru"] > 0
        assert isinstance(quick_results[f"sim_dropped_{policy}_lru"], int)
    # One-off adapters no longer evict hot ones: more hits, fewer drops than on LRU replicas.
    assert quick_results["sim_hit_rate_affinity"] > quick_results["sim_hit_rate_affinity_lru"] + 0.02
    assert quick_results["sim_dropped_affinity"] < quick_results["sim_dropped_affinity_lru"]


def test_lru_keys_are_an_lru_run_of_the_same_trace(quick_results: dict) -> None:
    config = SimConfig(num_requests=routing_sim.QUICK_REQUESTS, admission="lru")
    metrics = simulate_policy(config, "affinity", max(routing_sim.UTILIZATIONS))
    assert quick_results["sim_hit_rate_affinity_lru"] == metrics["hit_rate"]
    assert quick_results["sim_dropped_affinity_lru"] == metrics["dropped"]
