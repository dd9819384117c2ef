"""LoraReplica: the Ray Serve deployment that holds one Engine (base model + LoRA slots).

Thin on purpose: batching, slots, swaps and limits live in `deployments.engine`; this class turns
its settings into an engine and hands it the ingress's `GenerationRequest`s.

Lifecycle (`deployments.deploy_config`). The engine is built once, in `__init__`, from the
application's `args.replica` (its init argument). Serve calls `reconfigure(user_config)` right
after and again on every `serve deploy` that changes only the user_config (the process stays up):
adapters from folders are registered or deleted, generation limits and routing weights change,
the store's settings are applied to the running actor, all on the running engine: no rebuild,
no recompile, warm slots stay warm. What needs a new engine changes under `args`, where Serve
replaces the replica (its rolling update).

Threads. Ray sets OMP_NUM_THREADS to the replica's `num_cpus` (1 when unset) in its workers, so
torch starts with that many intra-op threads. We set it explicitly and deliberately to the same
allotment, floor(num_cpus) and at least 1, unless the engine settings name `torch_threads`:
replicas on one node then never oversubscribe the cores they were given (on 2 cores, two
replicas with 2 threads each made a 1.7 ms forward take 272 ms).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from typing import AsyncIterator

import ray
from ray import serve

from adapters_store.store import get_or_create_store
from deployments.contracts import GenerationChunk, GenerationRequest
from deployments.deploy_config import ReplicaSettings, ReplicaUserConfig
from deployments.engine import Engine
from deployments.metrics import ReplicaMetrics
from deployments.routing_policy import RoutingWeights, prewarm_order
from deployments.scaling import ReplicaLoad
from deployments.store_subscription import StoreSubscription
from lora_core.checkpoint import LoraCheckpoint
from lora_core.errors import EngineClosedError, LoraServeError, SourceUnavailableError
from lora_core.settings import StoreConfig

__all__ = ["LoraReplica", "cpu_allotment"]

logger = logging.getLogger(__name__)

PREWARM_CANDIDATES = 256
"""The most requested adapters a starting replica chooses its prewarm from."""


def cpu_allotment() -> int:
    """floor(the CPUs Ray assigned this replica), at least 1; 1 outside Ray."""
    if not ray.is_initialized():
        return 1
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU") or 1
    return max(1, math.floor(cpus))


@serve.deployment(name="LoraReplica")
class LoraReplica:
    """One engine per replica; sizes and resources come from `build_app`, never from this decorator."""

    def __init__(self, settings: dict) -> None:
        self._args = ReplicaSettings.model_validate(settings)
        self.settings = self._args
        self._adapters: dict[str, str] = {}  # what is registered on the engine
        self._reconfigure_lock = threading.Lock()  # Serve may run reconfigure beside requests
        self._subscription: StoreSubscription | None = None
        self._store_config: StoreConfig | None = None
        self._metrics = ReplicaMetrics()
        self._engine: Engine | None = None  # the subscription's thread may look before it is built
        self._subscribe(self._args.store)
        engine_config = self._args.engine_config()
        threads = engine_config.torch_threads or cpu_allotment()
        engine = Engine(
            engine_config.model_copy(update={"torch_threads": threads}),
            resolver=self._resolve if self._args.store is not None else None,
            on_rejected=self._report_rejected,
        )
        engine.residency.swap_observer = self._metrics.observe_swap
        try:
            self._sync_adapters(engine, self._args.adapters)
        except BaseException:
            engine.close()
            self._unsubscribe()
            raise
        self._engine = engine
        self.engine_builds = 1
        logger.info("engine ready: %s, %d slots, %d torch threads, adapters %s",
                    engine_config.base_model, engine_config.num_slots, threads, sorted(self._adapters))
        self.prewarmed = self._prewarm(min(self._args.prewarm_adapters, engine_config.num_slots))
        self._misses_when_ready = engine.residency.pool_snapshot().misses  # the prewarm's loads are misses too
        self._miss_counts = (0, 0)  # slot (hits, misses) at the last autoscaling report

    # ---- configuration (Serve calls this in a worker thread; it may block) ----------------------

    def reconfigure(self, user_config: dict | None) -> None:
        """Apply a `serve deploy`'s user_config to the running engine (`deploy_config`). A bad one
        raises before anything changes, except adapters: each registration validates first, so a
        refused folder leaves the others as they were."""
        settings = ReplicaUserConfig.model_validate(user_config or {}).applied_to(self._args)
        engine = self._require_engine()
        with self._reconfigure_lock:
            if settings.store != self._store_config:
                self._subscribe(settings.store)
            engine.apply_live_settings(settings.engine_config())
            self._sync_adapters(engine, settings.adapters)
            self.settings = settings

    def _subscribe(self, store_config: StoreConfig | None) -> None:
        """Follow the store `store_config` names (its settings applied to the running actor)."""
        store = get_or_create_store(store_config, self._args.engine_config()) if store_config is not None else None
        self._unsubscribe()
        self._store_config = store_config
        if store is not None:
            replica_id = serve.get_replica_context().replica_id.unique_id
            self._subscription = StoreSubscription(store, replica_id, lambda: self._engine)
            self._subscription.start()

    def _unsubscribe(self) -> None:
        if self._subscription is not None:
            self._subscription.stop()
            self._subscription = None

    def _prewarm(self, limit: int) -> list[str]:
        """Load what the routers will send here before Serve sends this replica traffic: the
        requested adapters whose home it becomes, then the most requested (`prewarm_order`), so
        a replica that autoscaling adds takes its share without a cold miss each."""
        subscription, engine = self._subscription, self._engine
        if subscription is None or engine is None or limit == 0:
            return []
        demand = subscription.adapter_demand(PREWARM_CANDIDATES)
        weights = RoutingWeights(**self._args.routing_weights)
        warmed = []
        for adapter_id in prewarm_order(demand.requests, demand.replica_ids, subscription.replica_id, limit, weights):
            try:
                engine.warm(adapter_id)
                warmed.append(adapter_id)
            except LoraServeError as error:  # gone or disabled meanwhile: requests will say so
                logger.warning("could not prewarm %s: %s", adapter_id, error)
        if warmed:
            logger.info("prewarmed %s", warmed)
        return warmed

    def _resolve(self, adapter_id: str) -> tuple[LoraCheckpoint, str]:
        """The engine's resolver, through whichever subscription is current (a deploy may replace it)."""
        subscription = self._subscription
        if subscription is None:
            raise SourceUnavailableError("this replica is not connected to the adapter store")
        return subscription.resolve(adapter_id)

    def _report_rejected(self, adapter_id: str, version: str, reason: str) -> None:
        subscription = self._subscription
        if subscription is not None:
            subscription.report_rejected(adapter_id, version, reason)

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
        request = await self._tokenized(request)
        handle = self._require_engine().submit(request)  # on the replica's event loop, which gets its events
        try:
            return await handle.aresult()
        except asyncio.CancelledError:  # the caller went away (Serve cancels us): stop the row
            handle.cancel()
            raise

    async def _tokenized(self, request: GenerationRequest) -> GenerationRequest:
        """The request with its prompt tokenized on a worker thread: a 200,000-character prompt
        takes tens of milliseconds to tokenize, and on the event loop it would stall every other
        row's tokens and the routing stats."""
        if request.prompt_ids is not None or (request.prompt is None) == (request.messages is None):
            return request  # the engine's own check answers a malformed one
        ids = await asyncio.to_thread(self._require_engine().encode, request.prompt, request.messages)
        return dataclasses.replace(request, prompt=None, messages=None, prompt_ids=tuple(ids))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Yield text deltas; the last one has `finish_reason` and the token counts. Errors the
        engine finds at submit (limits, unknown adapter) raise before the first yield."""
        request = await self._tokenized(request)
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
            "replica_actor_id": ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None,
            "engine_builds": self.engine_builds,
            "torch_threads": torch.get_num_threads(),
            "adapters": sorted(self._adapters),
            "num_slots": engine.config.num_slots,
            "max_new_tokens": engine.config.max_new_tokens,
            "routing_weights": self.settings.routing_weights,
            "prewarmed": self.prewarmed,
            "cold_misses": engine.residency.pool_snapshot().misses - self._misses_when_ready,
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
        weights = tuple(sorted(self.settings.routing_weights.items()))
        return dataclasses.replace(stats, routing_weights=weights).to_dict()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaler asks every `metrics_interval_s`: this replica's `scaling.ReplicaLoad`,
        averaged by Serve over its look-back window for `autoscaling_policy.AdapterAwarePolicy`."""
        engine = self._engine
        if engine is None:
            return {}
        snapshot = engine.residency.pool_snapshot()
        hits, misses = snapshot.hits - self._miss_counts[0], snapshot.misses - self._miss_counts[1]
        self._miss_counts = (snapshot.hits, snapshot.misses)
        subscription = self._subscription
        load = ReplicaLoad(
            ongoing_requests=float(engine.scheduler.queue_len),
            kv_fraction=engine.scheduler.running / max(1, engine.kv_cache.lanes),
            slot_fraction=1 - snapshot.free_slots / max(1, snapshot.num_slots),
            cold_miss_ratio=misses / (hits + misses) if hits + misses else 0.0,
            pin_floor=float(subscription.pin_floor if subscription is not None else 0),
        )
        return dataclasses.asdict(load)

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica (a dead engine loop)."""
        engine = self._require_engine()
        if not engine.scheduler.alive:
            raise EngineClosedError(f"the engine loop is not running: {engine.scheduler.death}")

    def __del__(self) -> None:  # Serve calls this on graceful shutdown
        subscription = getattr(self, "_subscription", None)
        if subscription is not None:
            subscription.leave()
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is not None:
            engine.close()

    # ---- internals ------------------------------------------------------------------------------

    def _require_engine(self) -> Engine:
        engine = self._engine
        if engine is None:
            raise EngineClosedError("this replica has no engine: deploy LoraReplica with a user_config")
        return engine
