"""How many LoraReplicas the load asks for: the adapter-aware autoscaling decision, pure Python.

Each replica reports `ReplicaLoad` (`LoraReplica.record_autoscaling_stats`); Serve averages each
over its look-back window and the policy (`deployments.autoscaling_policy`, the Ray glue) asks
`desired_replicas`. Three pressures, each turned into "replicas that would bring it to its
target", and the largest wins:

  - queue depth: requests running or waiting, over `target_ongoing_requests` per replica (what
    Serve's default policy does);
  - KV pressure: the share of KV lanes in use, over `target_kv_fraction`: rows past the lanes
    wait for one, however short the queue looks;
  - slot pressure: cold misses (a request whose adapter had to be loaded) over all requests,
    past `max_cold_miss_ratio` on busy replicas whose slots are full: more replicas are more
    slots, so hot adapters stop evicting each other. One replica more at a time.

Never fewer than `pin_floor`, the most replicas one pinned adapter is pinned on: scaling in
under it would drop a pin. Serve then applies min/max, the up/down delays and factors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["REPORTED_METRICS", "ReplicaLoad", "ScalingSettings", "desired_replicas"]


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's load, as Serve's window averages it."""

    ongoing_requests: float = 0.0
    kv_fraction: float = 0.0
    """KV lanes in use / lanes."""
    slot_fraction: float = 0.0
    """Slots holding an adapter (or loading one) / slots."""
    cold_miss_ratio: float = 0.0
    """Of the requests that started lately, the share whose adapter was not in a slot."""
    pin_floor: float = 0.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


REPORTED_METRICS = tuple(ReplicaLoad.__dataclass_fields__)
"""The names `record_autoscaling_stats` reports, one per `ReplicaLoad` field."""


class ScalingSettings(BaseModel):
    """The policy's own knobs (its `policy_kwargs`); Serve's `autoscaling_config` has the rest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_kv_fraction: float = Field(0.8, gt=0, le=1, description="KV lanes in use per replica to aim for")
    max_cold_miss_ratio: float = Field(0.25, ge=0, le=1, description="cold misses per request tolerated with "
                                       "full slots before adding a replica")
    full_slot_fraction: float = Field(0.9, gt=0, le=1, description="slots this full count as full")


def desired_replicas(
    loads: Iterable[ReplicaLoad], current_replicas: int, target_ongoing_requests: float,
    settings: ScalingSettings = ScalingSettings(),
) -> float:
    """Replicas the reported load asks for (a float: Serve rounds after its scaling factors).
    With no report yet, the current count stands."""
    loads = list(loads)
    if current_replicas <= 0 or not loads:
        return float(current_replicas)
    if target_ongoing_requests <= 0:
        raise ValueError(f"target_ongoing_requests must be > 0, got {target_ongoing_requests!r}")
    count = len(loads)
    by_queue = sum(load.ongoing_requests for load in loads) / target_ongoing_requests
    by_kv = current_replicas * (sum(load.kv_fraction for load in loads) / count) / settings.target_kv_fraction
    by_slots = 0.0
    full = [load for load in loads if load.slot_fraction >= settings.full_slot_fraction and load.ongoing_requests >= 1]
    if full and settings.max_cold_miss_ratio < 1:
        miss_ratio = sum(load.cold_miss_ratio for load in full) / len(full)
        if miss_ratio > settings.max_cold_miss_ratio:
            by_slots = current_replicas + 1.0  # one more at a time: its slots change the miss ratio
    pin_floor = max(load.pin_floor for load in loads)
    return max(by_queue, by_kv, by_slots, pin_floor)
