"""`build_app(args)`: the application `serve run` / `serve deploy` import (`deployments.app:build_app`).

Wires the HTTP ingress (`Router`) to the `LoraReplica` deployment. Each is built with its part of
`args` (init arguments) and an empty `user_config`; a `serve deploy` changes them two ways
(`deployments.deploy_config`):

  - under `args`: a new code version. Serve replaces every replica, a few at a time (its rolling
    update): the base model, max_rank, num_slots, dtype, resources.
  - a deployment's `user_config` (serve_config.yaml `deployments:`): applied in place by its
    `reconfigure()`, no restart. Router: tenants and keys. LoraReplica: adapters from folders,
    generation limits, routing weights, the store's settings (sources, interval, pins). A field
    left out keeps what `args` say. Serve's own lightweight options (num_replicas,
    autoscaling_config, max_ongoing_requests, max_queued_requests) apply in place too.

    applications:
      - import_path: deployments.app:build_app
        args: {...}
        deployments:
          - name: Router
            user_config: {tenants: {tenants: {acme: {key_sha256: [...]}}, admin_key_sha256: [...]}}
          - name: LoraReplica
            user_config: {max_new_tokens: 128, store: {sync_interval_s: 30, sources: [...]}}
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve import Application

from deployments.autoscaling_policy import POLICY_PATH
from deployments.deploy_config import REQUEST_TIMEOUT_S, ReplicaSettings
from deployments.replica import LoraReplica
from deployments.request_router import affinity_request_router_config
from deployments.router import Router
from deployments.scaling import ScalingSettings
from deployments.tenants import PLAINTEXT_KEYS_WARNING, PlaintextKeys, TenantsConfig, uses_demo_keys
from lora_core.paths import REPO_ROOT, default_demo_adapters_dir
from lora_core.settings import SourceInput, StoreConfig

__all__ = ["AppArgs", "AutoscalingArgs", "build_app"]

logger = logging.getLogger(__name__)

ROUTER_MAX_ONGOING_REQUESTS = 1000  # the ingress only awaits replicas; it is never the bottleneck


class AutoscalingArgs(BaseModel):
    """`args.autoscaling`: Serve's `autoscaling_config` for LoraReplica, with the adapter-aware
    policy (`deployments.autoscaling_policy`) unless `policy: queue_length` (Serve's default)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1, le=1024)
    max_replicas: int = Field(4, ge=1, le=1024)
    initial_replicas: int | None = Field(None, ge=1, le=1024)
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="requests running or queued per replica to aim for; default max_num_seqs")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    look_back_period_s: float = Field(10.0, gt=0, description="the window Serve averages the replicas' metrics over")
    metrics_interval_s: float = Field(2.0, gt=0, description="how often replicas report them")
    policy: Literal["adapter_aware", "queue_length"] = "adapter_aware"
    policy_settings: ScalingSettings = Field(default_factory=ScalingSettings)

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingArgs":
        initial = self.initial_replicas if self.initial_replicas is not None else self.min_replicas
        if not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(f"need min_replicas <= initial_replicas <= max_replicas, got {self.min_replicas}, "
                             f"{initial}, {self.max_replicas}")
        return self

    def serve_config(self, max_num_seqs: int) -> dict:
        """Serve's `autoscaling_config` dict."""
        config = self.model_dump(exclude={"policy", "policy_settings", "target_ongoing_requests"}, exclude_none=True)
        config["target_ongoing_requests"] = self.target_ongoing_requests or float(max_num_seqs)
        if self.policy == "adapter_aware":
            config["policy"] = {"policy_function": POLICY_PATH, "policy_kwargs": self.policy_settings.model_dump()}
        return config


class AppArgs(BaseModel):
    """The application's `args` in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(2, ge=1, le=1024, description="LoraReplica replicas (without `autoscaling`)")
    autoscaling: AutoscalingArgs | None = Field(None, description="scale LoraReplica with the load instead")
    replica_num_cpus: float = Field(1.0, ge=0, description="CPUs per replica; also its torch thread count")
    replica_num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (1 on a GPU node)")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="requests a replica takes at once; default 2 x max_num_seqs: a full batch running, one more waiting"
    )
    served_model_name: str | None = Field(
        None, min_length=1, description="the `model` value that means the base model; default: its name"
    )
    max_queued_requests: int = Field(
        64, ge=-1, description="requests waiting for a replica before callers get 503 + Retry-After (-1: no limit)"
    )
    tenants: TenantsConfig = Field(
        default_factory=TenantsConfig,
        description="API keys -> tenants; required: an app with no key refuses to start unless auth: none is set",
    )
    request_timeout_s: float = Field(
        REQUEST_TIMEOUT_S, gt=0, description="a completion's deadline: 504 past it, and its row is freed")
    routing_stats_period_s: float = Field(
        0.5, gt=0, description="how often replicas report their warm slots and queues to the adapter-affinity router"
    )
    demo_adapters: bool = Field(
        False, description="train (once, cached) the demo adapters and serve them through the store (make serve)"
    )
    replica: ReplicaSettings = Field(default_factory=ReplicaSettings, description="the replicas' settings; "
                                     "LoraReplica's user_config changes some in place (deploy_config)")

    @model_validator(mode="after")
    def _fail_closed(self) -> "AppArgs":
        if not self.tenants.names_a_key():
            raise ValueError(
                "no API key is configured (tenants): add tenants' key_sha256, admin_key_sha256 or keys_env, "
                "or set tenants: {auth: none} explicitly for a server where every caller is an admin")
        return self

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> "AppArgs":
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("set num_replicas or autoscaling, not both (autoscaling has min/max/initial_replicas)")
        return self

    def replica_max_ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 2 * self.replica.max_num_seqs

    def queue_capacity(self) -> int | None:
        """Requests the replicas take at once plus those Serve queues for them (the Router is the
        one caller, `max_queued_requests` is per caller); None when Serve queues without limit.
        With autoscaling, at `max_replicas`."""
        if self.max_queued_requests < 0:
            return None
        replicas = self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas
        return replicas * self.replica_max_ongoing_requests() + self.max_queued_requests

    def with_demo_adapters(self) -> "AppArgs":
        """The demo adapters trained or found in their cache, their folder added to the store's sources.

        Training is the `cluster.demo_adapters` CLI, run as its own process: it is a job, not part
        of serving, and the memory it takes is given back when it ends."""
        if self.replica.base_model_path is not None:
            raise ValueError("demo_adapters are trained for a named base_model, not base_model_path; set demo_adapters: false")
        folder = default_demo_adapters_dir()
        command = [sys.executable, "-m", "cluster.demo_adapters", "--out", str(folder),
                   "--base-model", self.replica.base_model, "--no-compare"]
        subprocess.run(command, check=True, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
        store = self.replica.store or StoreConfig()
        demo = SourceInput(uri=str(folder))
        if demo not in store.sources:
            store = store.model_copy(update={"sources": [*store.sources, demo]})
        return self.model_copy(update={"replica": self.replica.model_copy(update={"store": store})})

    def base_model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.replica.base_model_path:
            return Path(self.replica.base_model_path).name
        return self.replica.base_model


class _ArgsKeys(BaseModel):
    """The args' tenants as given: `AppArgs` hashes their keys, Ray keeps them as they were."""

    tenants: PlaintextKeys = PlaintextKeys()


def build_app(args: dict | None = None) -> Application:
    settings = AppArgs.model_validate(args or {})
    if _ArgsKeys.model_validate(args or {}).tenants.any() and not uses_demo_keys(settings.tenants):
        logger.warning(PLAINTEXT_KEYS_WARNING)
    if settings.demo_adapters:
        settings = settings.with_demo_adapters()
    scaling = ({"autoscaling_config": settings.autoscaling.serve_config(settings.replica.max_num_seqs)}
               if settings.autoscaling is not None else {"num_replicas": settings.num_replicas})
    replicas = LoraReplica.options(
        **scaling,
        max_ongoing_requests=settings.replica_max_ongoing_requests(),
        ray_actor_options={"num_cpus": settings.replica_num_cpus, "num_gpus": settings.replica_num_gpus},
        max_queued_requests=settings.max_queued_requests,
        user_config={},  # so a deploy that drops its override hands reconfigure {}: back to args
        request_router_config=affinity_request_router_config(settings.routing_stats_period_s),
    )
    router = Router.options(
        num_replicas=1,
        max_ongoing_requests=ROUTER_MAX_ONGOING_REQUESTS,
        ray_actor_options={"num_cpus": 0},
        user_config={},
    )
    router_settings = {
        "base_model_name": settings.base_model_name(),
        "queue_capacity": settings.queue_capacity(),
        "tenants": settings.tenants.model_dump(mode="json"),
        "request_timeout_s": settings.request_timeout_s,
        "store": settings.replica.store.model_dump(mode="json") if settings.replica.store else None,
    }
    return router.bind(replicas.bind(settings.replica.model_dump(mode="json")), router_settings)
