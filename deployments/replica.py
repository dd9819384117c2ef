"""LoraReplica: the Ray Serve deployment that holds one Engine (base model + LoRA slots).

Thin on purpose: batching, slots, swaps and limits live in `deployments.engine`; this class turns
the deployment's `user_config` into an engine and hands it the ingress's `GenerationRequest`s.

Lifecycle. Ray Serve calls `reconfigure(user_config)` right after `__init__` and again on every
`serve deploy` that changes only the user_config (the replica process stays up):
  - engine settings changed (or first call): build a new engine, register every adapter on it,
    then swap it in and close the old one. Requests already running on the old engine finish;
    ones still queued there get EngineClosedError (503) and can be retried.
  - only `adapters` changed: register the new or moved ones and delete the dropped ones on the
    running engine; no rebuild, no recompile, warm slots of the other adapters stay warm.

Threads. Ray sets OMP_NUM_THREADS to the replica's `num_cpus` (1 when unset) in its workers, so
torch starts with that many intra-op threads. We set it explicitly and deliberately to the same
allotment, floor(num_cpus) and at least 1, unless the engine settings name `torch_threads`:
replicas on one node then never oversubscribe the cores they were given (on 2 cores, two
replicas with 2 threads each made a 1.7 ms forward take 272 ms).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from typing import AsyncIterator

from pydantic import Field
from ray import serve

from adapters_store.store import get_or_create_store
from deployments.contracts import GenerationChunk, GenerationRequest
from deployments.engine import Engine
from deployments.metrics import ReplicaMetrics
from deployments.store_subscription import StoreSubscription
from lora_core.errors import EngineClosedError
from lora_core.settings import EngineConfig, StoreConfig

__all__ = ["LoraReplica", "ReplicaSettings", "cpu_allotment"]

logger = logging.getLogger(__name__)


class ReplicaSettings(EngineConfig):
    """The replica's `user_config`: the engine's settings, the adapter store to serve from, and
    adapters to serve from local folders without a store."""

    adapters: dict[str, str] = Field(
        default_factory=dict, description="adapter id -> local PEFT adapter folder, registered at (re)configure"
    )
    store: StoreConfig | None = Field(None, description="the adapter store actor; cold adapters load from it")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.model_dump(exclude={"adapters", "store"}))


def cpu_allotment() -> int:
    """floor(the CPUs Ray assigned this replica), at least 1; 1 outside Ray."""
    import ray

    if not ray.is_initialized():
        return 1
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU") or 1
    return max(1, math.floor(cpus))


@serve.deployment(name="LoraReplica")
class LoraReplica:
    """One engine per replica; sizes and resources come from `build_app`, never from this decorator."""

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._engine_config: EngineConfig | None = None  # as configured, before threads are filled in
        self._adapters: dict[str, str] = {}  # what is registered on the current engine
        self._reconfigure_lock = threading.Lock()  # Serve may run reconfigure beside requests
        self._subscription: StoreSubscription | None = None
        self._store_config: StoreConfig | None = None
        self._metrics = ReplicaMetrics()
        self.engine_builds = 0

    # ---- configuration (Serve calls this in a worker thread; it may block) ----------------------

    def reconfigure(self, user_config: dict) -> None:
        settings = ReplicaSettings.model_validate(user_config)
        engine_config = settings.engine_config()
        with self._reconfigure_lock:
            store_changed = settings.store != self._store_config
            if store_changed:
                self._subscribe(settings.store, engine_config)
            if self._engine is None or engine_config != self._engine_config or store_changed:
                self._rebuild(engine_config, settings.adapters)
            else:
                self._sync_adapters(self._engine, settings.adapters)

    def _subscribe(self, store_config: StoreConfig | None, engine_config: EngineConfig) -> None:
        if self._subscription is not None:
            self._subscription.stop()
            self._subscription = None
        self._store_config = store_config
        if store_config is not None:
            store = get_or_create_store(store_config, engine_config)
            replica_id = serve.get_replica_context().replica_id.unique_id
            self._subscription = StoreSubscription(store, replica_id, lambda: self._engine)
            self._subscription.start()

    def _rebuild(self, engine_config: EngineConfig, adapters: dict[str, str]) -> None:
        threads = engine_config.torch_threads or cpu_allotment()
        subscription = self._subscription
        engine = Engine(
            engine_config.model_copy(update={"torch_threads": threads}),
            resolver=subscription.resolve if subscription is not None else None,
            on_rejected=subscription.report_rejected if subscription is not None else None,
        )
        engine.residency.swap_observer = self._metrics.observe_swap
        try:
            for adapter_id, folder in adapters.items():
                engine.register_adapter(adapter_id, folder)
        except BaseException:
            engine.close()
            raise
        old, self._engine = self._engine, engine
        self._engine_config, self._adapters = engine_config, dict(adapters)
        self.engine_builds += 1
        logger.info(
            "engine %d ready: %s, %d slots, %d torch threads, adapters %s",
            self.engine_builds, engine_config.base_model, engine_config.num_slots, threads, sorted(adapters),
        )
        if old is not None:
            old.close()

    def _sync_adapters(self, engine: Engine, wanted: dict[str, str]) -> None:
        """Register new or moved adapters first, then delete dropped ones. Each registration
        validates its checkpoint before touching a slot, so a refused one leaves the others as
        they were; `_adapters` always says what is really registered."""
        for adapter_id, folder in wanted.items():
            if self._adapters.get(adapter_id) != folder:
                engine.register_adapter(adapter_id, folder)
                self._adapters[adapter_id] = folder
        for adapter_id in [a for a in self._adapters if a not in wanted]:
            engine.delete_adapter(adapter_id)
            del self._adapters[adapter_id]
        logger.info("adapters now %s", sorted(self._adapters))

    # ---- requests (called through a DeploymentHandle by the ingress) ----------------------------

    async def generate(self, request: GenerationRequest) -> GenerationChunk:
        handle = self._require_engine().submit(request)  # on the replica's event loop, which gets its events
        try:
            return await handle.aresult()
        except asyncio.CancelledError:  # the caller went away (Serve cancels us): stop the row
            handle.cancel()
            raise

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Yield text deltas; the last one has `finish_reason` and the token counts. Errors the
        engine finds at submit (limits, unknown adapter) raise before the first yield."""
        handle = self._require_engine().submit(request)
        finished = False
        try:
            async for chunk in handle.stream():
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            if not finished:  # cancelled or closed mid-stream: free the batch row
                handle.cancel()

    def list_adapters(self) -> dict:
        engine_config = self._require_engine().config
        return {"base_model": engine_config.base_model_path or engine_config.base_model, "adapters": sorted(self._adapters)}

    def stats(self) -> dict:
        import torch

        engine = self._require_engine()
        return {
            "replica_id": serve.get_replica_context().replica_id.unique_id,
            "engine_builds": self.engine_builds,
            "torch_threads": torch.get_num_threads(),
            "adapters": sorted(self._adapters),
            **engine.stats(),
        }

    def warm(self, adapter_id: str, pin: bool = False) -> dict:
        """Load an adapter into a slot now (from the host cache, else the store or its folder)."""
        started = time.perf_counter()
        slot = self._require_engine().warm(adapter_id, pin=pin)
        return {"adapter_id": adapter_id, "slot": slot, "load_ms": (time.perf_counter() - started) * 1000}

    def evict(self, adapter_id: str) -> None:
        """Drop an adapter from this replica's slot and host cache; its next use loads it again."""
        self._require_engine().evict(adapter_id)

    def record_routing_stats(self) -> dict:
        """Ray Serve polls this (`request_router_config.request_routing_stats_period_s`) and hands
        the dict to the request router as `RunningReplica.routing_stats`; Ray wants a dict, so the
        engine's `RoutingStats` travels as `to_dict()` and is parsed back with `from_dict`. The
        replica's gauges and slot counters (`deployments.metrics`) are updated here too."""
        engine = self._engine
        if engine is None:
            return {}
        stats = engine.routing_stats()
        self._metrics.update(engine.residency.pool_snapshot().to_dict(), engine.scheduler.running, stats.queue_len)
        return stats.to_dict()

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica (a dead engine loop)."""
        engine = self._require_engine()
        if not engine.scheduler.alive:
            raise EngineClosedError(f"the engine loop is not running: {engine.scheduler.death}")

    def __del__(self) -> None:  # Serve calls this on graceful shutdown
        subscription = getattr(self, "_subscription", None)
        if subscription is not None:
            subscription.stop()
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is not None:
            engine.close()

    # ---- internals ------------------------------------------------------------------------------

    def _require_engine(self) -> Engine:
        engine = self._engine
        if engine is None:
            raise EngineClosedError("this replica has no engine: deploy LoraReplica with a user_config")
        return engine
