"""What each deployment is built with (the application's `args`) and what `serve deploy` may change
in place (the deployment's `user_config`).

Serve treats the two differently. A change under `args` is a new code version: Serve replaces
every replica, a few at a time (its rolling update), so settings that need a new engine live
there: the base model, `max_rank`, `num_slots`, dtype, device, compile, KV sizes. A change of a
deployment's `user_config` (serve_config.yaml `deployments: [{name, user_config}]`) is handed to
its `reconfigure()` in the running replica: no restart, warm slots stay warm.

    Router       RouterUserConfig    tenants and keys
    LoraReplica  ReplicaUserConfig   adapters from folders, generation limits, routing weights,
                                     the store's settings (sources, interval, pins, ...)

Serve replaces a user_config whole, so every field here is optional and one left out keeps what
`args` say: an override that only names `tenants` keeps the store, the adapters and the limits.
Anything that would need a new engine is refused by name (`extra="forbid"`), never applied by
building a second engine beside the live one. Pure pydantic: no Ray, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.routing_policy import check_weight_overrides
from deployments.tenants import TenantsConfig
from lora_core.settings import LIVE_ENGINE_FIELDS, EngineConfig, StoreConfig

REQUEST_TIMEOUT_S = 600.0

__all__ = ["ReplicaSettings", "ReplicaUserConfig", "RouterSettings", "RouterUserConfig"]

class ReplicaSettings(EngineConfig):
    """A replica's settings as the application's `args.replica` gives them: the engine's, the
    adapter store to serve from, and adapters to serve from local folders without a store."""

    adapters: dict[str, str] = Field(
        default_factory=dict, description="adapter id -> local PEFT adapter folder, registered at start"
    )
    store: StoreConfig | None = Field(None, description="the adapter store actor; cold adapters load from it")
    routing_weights: dict[str, float | int] = Field(
        default_factory=dict, description="overrides of `routing_policy.RoutingWeights`, sent to the request "
        "routers with the replicas' routing stats")
    prewarm_adapters: int = Field(4, ge=0, le=1024, description="a new replica loads the store's this many most "
                                  "requested adapters into its slots (at most num_slots) before it takes traffic")

    @field_validator("routing_weights")
    @classmethod
    def _known_weights(cls, weights: dict[str, float | int]) -> dict[str, float | int]:
        check_weight_overrides(weights)
        return weights

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.model_dump(exclude={"adapters", "store", "routing_weights", "prewarm_adapters"}))


class ReplicaUserConfig(BaseModel):
    """LoraReplica's `user_config`: changes `serve deploy` applies to running replicas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapters: dict[str, str] | None = Field(None, description="replaces args' adapters from folders")
    store: dict[str, Any] | None = Field(None, description="changes to args' store settings, field by field "
                                         "(StoreConfig's fields but name and namespace), applied to the running "
                                         "actor; a new root replaces it, its manifest kept")
    max_new_tokens: int | None = Field(None, ge=1)
    batch_wait_ms: float | None = Field(None, ge=0, le=1000)
    prefill_chunk_tokens: int | None = Field(None, ge=1, le=65536)
    routing_weights: dict[str, float | int] | None = Field(None, description="replaces args' routing weights")

    @model_validator(mode="before")
    @classmethod
    def _no_restart_settings(cls, user_config: Any) -> Any:
        if isinstance(user_config, Mapping):
            if restart := sorted(set(user_config) & set(EngineConfig.model_fields) - set(LIVE_ENGINE_FIELDS)):
                raise ValueError(f"{', '.join(restart)} need a new engine: set them under args.replica, where a deploy "
                                 "is Serve's rolling update; LoraReplica's user_config changes "
                                 f"{', '.join(LIVE_ENGINE_FIELDS)}, adapters, routing_weights and store")
        return user_config

    @field_validator("store")
    @classmethod
    def _store_fields(cls, store: dict[str, Any] | None) -> dict[str, Any] | None:
        if store is None:
            return None
        if fixed := sorted({"name", "namespace"} & set(store)):
            raise ValueError(f"store {', '.join(fixed)} cannot change in place: the replicas and the ingress find "
                             "the store by them (set them under args.replica.store)")
        if unknown := sorted(set(store) - set(StoreConfig.model_fields)):
            raise ValueError(f"unknown store settings {unknown}; known: {sorted(StoreConfig.model_fields)}")
        return store

    def applied_to(self, settings: ReplicaSettings) -> ReplicaSettings:
        """`settings` (from args) with what this sets; ValueError (pydantic's ValidationError
        among them) for what cannot change here."""
        changes: dict[str, Any] = self.model_dump(exclude_none=True, exclude={"store"})
        if self.store is not None:
            if settings.store is None:
                raise ValueError("user_config changes the store but the application's args.replica has none: a "
                                 "store is added under args (a restart), then changed in place here")
            changes["store"] = StoreConfig.model_validate({**settings.store.model_dump(), **self.store})
        return ReplicaSettings.model_validate({**settings.model_dump(), **changes})


class RouterSettings(BaseModel):
    """The ingress's settings from the application's args."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model_name: str = Field(min_length=1, description="the `model` value that means no adapter")
    tenants: TenantsConfig
    store: StoreConfig | None = Field(None, description="the adapter store the admin API and /v1/models use")
    request_timeout_s: float = Field(REQUEST_TIMEOUT_S, gt=0, description="a completion's deadline: past it the "
                                     "caller gets 504 and its row is freed (a stream ends with a 504 error event)")
    queue_capacity: int | None = Field(None, ge=1, description="requests the replicas hold at most (running and "
                                       "queued: tenants' queue_share is of this); None: unbounded")


class RouterUserConfig(BaseModel):
    """Router's `user_config`: changes `serve deploy` applies to the running ingress."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenants: TenantsConfig | None = Field(None, description="replaces args' tenants and keys")
    request_timeout_s: float | None = Field(None, gt=0, description="replaces args' request_timeout_s")

    @model_validator(mode="before")
    @classmethod
    def _no_restart_settings(cls, user_config: Any) -> Any:
        if isinstance(user_config, Mapping) and (restart := sorted(set(user_config) & {"base_model_name", "store"})):
            raise ValueError(f"{', '.join(restart)} of the Router change under the application's args (a restart); "
                             "its user_config changes tenants and request_timeout_s")
        return user_config

    def applied_to(self, settings: RouterSettings) -> RouterSettings:
        changes = {name: value for name in ("tenants", "request_timeout_s")
                   if (value := getattr(self, name)) is not None}
        return settings.model_copy(update=changes)
