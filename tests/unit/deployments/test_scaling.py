"""The adapter-aware autoscaling decision, and the policy Serve calls with it (a real
`AutoscalingContext`, no cluster)."""

import pytest
from pydantic import ValidationError
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.app import AppArgs
from deployments.autoscaling_policy import POLICY_PATH, AdapterAwarePolicy
from deployments.scaling import REPORTED_METRICS, ReplicaLoad, ScalingSettings, desired_replicas


def test_queue_depth_asks_for_replicas_like_serves_default():
    loads = [ReplicaLoad(ongoing_requests=12), ReplicaLoad(ongoing_requests=12)]
    assert desired_replicas(loads, 2, target_ongoing_requests=8) == pytest.approx(3.0)
    assert desired_replicas([ReplicaLoad(ongoing_requests=1)] * 3, 3, 8) == pytest.approx(3 / 8)


def test_kv_pressure_scales_up_even_when_the_queue_looks_short():
    loads = [ReplicaLoad(ongoing_requests=2, kv_fraction=1.0)] * 2
    assert desired_replicas(loads, 2, 8, ScalingSettings(target_kv_fraction=0.8)) == pytest.approx(2.5)


def test_cold_misses_on_busy_full_slots_add_one_replica_at_a_time():
    thrashing = ReplicaLoad(ongoing_requests=2, slot_fraction=1.0, cold_miss_ratio=0.6)
    assert desired_replicas([thrashing] * 2, 2, 100) == 3.0
    idle = ReplicaLoad(ongoing_requests=0, slot_fraction=1.0, cold_miss_ratio=0.6)  # nobody waits on it
    assert desired_replicas([idle] * 2, 2, 100) == 0.0
    room = ReplicaLoad(ongoing_requests=2, slot_fraction=0.5, cold_miss_ratio=0.6)  # a free slot: no eviction
    assert desired_replicas([room] * 2, 2, 100) < 1


def test_scale_in_never_goes_under_the_most_replicas_an_adapter_is_pinned_on():
    assert desired_replicas([ReplicaLoad(pin_floor=3)] * 4, 4, 8) == 3.0
    assert desired_replicas([], 2, 8) == 2.0  # no report yet: stay


def test_a_bad_report_is_refused():
    with pytest.raises(ValueError, match="kv_fraction"):
        ReplicaLoad(kv_fraction=float("nan"))
    with pytest.raises(ValidationError):
        ScalingSettings(target_kv_fraction=0)


def context(metrics: dict[str, dict], current: int, total_requests: float = 0.0) -> AutoscalingContext:
    deployment = DeploymentID(name="LoraReplica", app_name="lora-serve")
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=deployment) for i in range(current)]
    by_replica = {name: {replicas[i]: value for i, value in per.items()} for name, per in metrics.items()}
    return AutoscalingContext(
        deployment_id=deployment, deployment_name="LoraReplica", app_name="lora-serve",
        current_num_replicas=current, target_num_replicas=current, running_replicas=replicas,
        total_num_requests=total_requests, total_queued_requests=0.0, aggregated_metrics=by_replica, raw_metrics={},
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=0.0,
        config=AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=4),
    )


def test_the_policy_reads_the_replicas_reports_from_serves_context():
    policy = AdapterAwarePolicy(target_kv_fraction=0.5)
    busy = context({"ongoing_requests": {0: 6.0, 1: 6.0}, "kv_fraction": {0: 0.5, 1: 0.5}, "pin_floor": {0: 1.0}}, 2)
    assert policy(busy) == (pytest.approx(3.0), {})
    pinned = context({"ongoing_requests": {0: 0.0, 1: 0.0}, "pin_floor": {0: 2.0, 1: 2.0}}, 2)
    assert policy(pinned)[0] == 2.0
    assert policy(context({}, 2, total_requests=40))[0] == 2.0  # nothing reported yet
    assert set(REPORTED_METRICS) == {"ongoing_requests", "kv_fraction", "slot_fraction", "cold_miss_ratio", "pin_floor"}
    with pytest.raises(ValidationError):
        AdapterAwarePolicy(target_kv_fractoin=0.5)


OPEN = {"tenants": {"auth": "none"}}


def test_app_args_give_serve_an_autoscaling_config_with_the_policy():
    args = AppArgs.model_validate({**OPEN, "autoscaling": {"min_replicas": 1, "max_replicas": 3,
                                                   "policy_settings": {"max_cold_miss_ratio": 0.5}}})
    config = AutoscalingConfig(**args.autoscaling.serve_config(max_num_seqs=16))
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (1, 3, 16.0)
    assert config.policy.policy_function == POLICY_PATH
    assert config.policy.policy_kwargs["max_cold_miss_ratio"] == 0.5
    plain = AppArgs.model_validate({**OPEN, "autoscaling": {"policy": "queue_length", "target_ongoing_requests": 4}})
    assert AutoscalingConfig(**plain.autoscaling.serve_config(16)).policy.is_default_policy_function()
    with pytest.raises(ValidationError, match="not both"):
        AppArgs.model_validate({**OPEN, "num_replicas": 2, "autoscaling": {}})
    with pytest.raises(ValidationError, match="min_replicas <= initial_replicas"):
        AppArgs.model_validate({**OPEN, "autoscaling": {"min_replicas": 3, "max_replicas": 2}})
