"""`build_app(args)`: the application `serve run` / `serve deploy` import (`deployments.app:build_app`).

Wires the HTTP ingress (`Router`) to the `LoraReplica` deployment. The replicas' `user_config` is
`args.replica` (engine settings + adapters): Ray Serve hands it to `LoraReplica.reconfigure`.

Note for `serve deploy`: a change to the application's `args` is a new code version, so Serve
restarts every replica. To change adapters in place (reconfigure, no restart), override the
replicas' user_config in the deploy config instead; it replaces `args.replica` as a whole:

    applications:
      - import_path: deployments.app:build_app
        args: {...}
        deployments:
          - name: LoraReplica
            user_config: {base_model: ..., adapters: {acme/pirate: /path/to/adapter}}
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from deployments.replica import LoraReplica, ReplicaSettings
from deployments.request_router import affinity_request_router_config
from deployments.router import Router
from deployments.tenants import TenantsConfig
from lora_core.paths import default_demo_adapters_dir
from lora_core.settings import SourceInput, StoreConfig

__all__ = ["AppArgs", "build_app"]

ROUTER_MAX_ONGOING_REQUESTS = 1000  # the ingress only awaits replicas; it is never the bottleneck


class AppArgs(BaseModel):
    """The application's `args` in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(2, ge=1, le=1024, description="LoraReplica replicas")
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
        default_factory=lambda: TenantsConfig(auth="none"),
        description="API keys -> tenants; default: no access control (serve_config.yaml sets demo tenants)",
    )
    routing_stats_period_s: float = Field(
        0.5, gt=0, description="how often replicas report their warm slots and queues to the adapter-affinity router"
    )
    demo_adapters: bool = Field(
        False, description="train (once, cached) the demo adapters and serve them through the store (make serve)"
    )
    replica: ReplicaSettings = Field(default_factory=ReplicaSettings, description="the replicas' user_config")

    def with_demo_adapters(self) -> "AppArgs":
        """The demo adapters trained or found in their cache, their folder added to the store's sources.

        Training is the `cluster.demo_adapters` CLI, run as its own process: it is a job, not part
        of serving, and the memory it takes is given back when it ends."""
        if self.replica.base_model_path is not None:
            raise ValueError("demo_adapters are trained for a named base_model, not base_model_path; set demo_adapters: false")
        folder = default_demo_adapters_dir()
        command = [sys.executable, "-m", "cluster.demo_adapters", "--out", str(folder),
                   "--base-model", self.replica.base_model, "--no-compare"]
        subprocess.run(command, check=True, stdin=subprocess.DEVNULL)
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


def build_app(args: dict | None = None) -> Application:
    settings = AppArgs.model_validate(args or {})
    if settings.demo_adapters:
        settings = settings.with_demo_adapters()
    replicas = LoraReplica.options(
        num_replicas=settings.num_replicas,
        max_ongoing_requests=settings.max_ongoing_requests or 2 * settings.replica.max_num_seqs,
        ray_actor_options={"num_cpus": settings.replica_num_cpus, "num_gpus": settings.replica_num_gpus},
        max_queued_requests=settings.max_queued_requests,
        user_config=settings.replica.model_dump(mode="json"),
        request_router_config=affinity_request_router_config(settings.routing_stats_period_s),
    )
    router = Router.options(
        num_replicas=1,
        max_ongoing_requests=ROUTER_MAX_ONGOING_REQUESTS,
        ray_actor_options={"num_cpus": 0},
    )
    router_settings = {
        "base_model_name": settings.base_model_name(),
        "tenants": settings.tenants.model_dump(mode="json"),
        "store": settings.replica.store.model_dump(mode="json") if settings.replica.store else None,
    }
    return router.bind(replicas.bind(), router_settings)
