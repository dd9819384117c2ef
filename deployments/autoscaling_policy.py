"""The adapter-aware autoscaling policy Serve calls for LoraReplica (Ray 2.60's custom `policy`):
thin glue from Serve's `AutoscalingContext` to `deployments.scaling.desired_replicas`.

    autoscaling_config:
      policy: {policy_function: "deployments.autoscaling_policy:AdapterAwarePolicy",
               policy_kwargs: {target_kv_fraction: 0.8, max_cold_miss_ratio: 0.25}}

Serve instantiates the class once with `policy_kwargs` (`scaling.ScalingSettings`) and calls it
every control-loop tick in its controller; it wraps the answer with min/max replicas, the
up/down delays and scaling factors. The per-replica metrics are what `LoraReplica.
record_autoscaling_stats` reports, averaged by Serve over `look_back_period_s`.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.config import AutoscalingContext

from deployments.scaling import REPORTED_METRICS, ReplicaLoad, ScalingSettings, desired_replicas

__all__ = ["POLICY_PATH", "AdapterAwarePolicy"]

logger = logging.getLogger(__name__)

POLICY_PATH = "deployments.autoscaling_policy:AdapterAwarePolicy"


class AdapterAwarePolicy:
    def __init__(self, **kwargs: Any) -> None:
        self.settings = ScalingSettings.model_validate(kwargs)

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        loads = [
            ReplicaLoad(**{name: float(metrics.get(name, {}).get(replica_id) or 0.0) for name in REPORTED_METRICS})
            for replica_id in ctx.running_replicas
            if any(replica_id in metrics.get(name, {}) for name in REPORTED_METRICS)
        ]
        desired = desired_replicas(loads, ctx.current_num_replicas, ctx.config.get_target_ongoing_requests(),
                                   self.settings)
        if round(desired) != ctx.target_num_replicas:
            logger.info("LoraReplica wants %.2f replicas (now %d): %s", desired, ctx.current_num_replicas, loads)
        return desired, {}
