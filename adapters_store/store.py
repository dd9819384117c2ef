"""AdapterStore: the detached, named Ray actor that owns the adapter registry.

    store = get_or_create_store(StoreConfig(...), engine_config)   # joins it if it exists
    ray.get(store.register.remote("acme/pirate", "s3://bucket/adapters/acme/pirate"))

Replicas create it (`get_or_create_store`); the HTTP ingress only looks it up by name
(`adapters_store.client`), so the ingress never imports this module or the sources below it.

Thin glue around `AdapterSyncer` (the logic, no Ray) and `ChangeFeed` (the long-poll):
  - a sync thread lists each source every `sync_interval_s` (backing off while one is down);
    `sync_now` runs one at once;
  - a validated serving version is put into the object store once (`locate` hands out its
    ObjectRef), so replicas on any node read the weights from there, never from S3;
  - replicas long-poll `poll`, which also carries their warm set back, so `list_adapters` can
    say which replicas have an adapter warm.

Threaded actor (`max_concurrency`): long polls hold a thread each while they wait. Created with
`lifetime="detached"` and `max_restarts=-1`: Ray restarts a dead store, which reloads its
manifest; `max_task_retries=-1` makes callers' pending calls wait for the restart instead of
failing. A new epoch tells every replica to resync.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional

import ray

from adapters_store.change_feed import ChangeFeed
from adapters_store.merge_spec import MergeSpec
from adapters_store.pins import assign_pins
from adapters_store.registry import AdapterRecord, utc_now
from adapters_store.syncer import AdapterSyncer, SyncReport
from lora_core.changes import AdapterChange, AdapterDemand, AdapterOnReplica, ChangeBatch
from lora_core.errors import InvalidAdapterError, ServiceUnavailableError
from lora_core.geometry import slot_geometry
from lora_core.payload import payload_from_checkpoint
from lora_core.settings import EngineConfig, SourceInput, StoreConfig

__all__ = ["AdapterStore", "get_or_create_store", "get_store"]

logger = logging.getLogger("adapters_store.store")

MAX_POLL_S = 30.0
REPLICA_REPORT_TTL_S = 15.0  # replicas poll every POLL_TIMEOUT_S (2 s): one silent this long is gone
PIN_LIVENESS_S = 10.0
"""A replica that has not polled for this long loses its pins to the next ones (they poll every
few seconds), so a dead replica's pinned adapters are warmed again elsewhere."""
STORE_MAX_CONCURRENCY = 256
STORE_REPLACE_TIMEOUT_S = 60.0


@dataclass
class ReplicaReport:
    warm: dict[str, str]  # adapter id -> version in its slot
    seen_s: float
    adapters: dict[str, AdapterOnReplica]  # per adapter it holds: version, slot, swaps, requests, validation


class AdapterStore:
    def __init__(self, config: dict, engine_config: dict) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = StoreConfig.model_validate(config)
        geometry = slot_geometry(EngineConfig.model_validate(engine_config))  # from file headers: no weights
        self.syncer = AdapterSyncer(self.config, geometry)
        self.feed = ChangeFeed(self.syncer.serving_versions)
        self._payloads: dict[str, tuple[str, Any]] = {}  # adapter id -> (version, ObjectRef)
        self._payload_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._replicas: dict[str, ReplicaReport] = {}
        self._wake = threading.Event()
        self._metrics = StoreMetrics()
        threading.Thread(target=self._sync_loop, name="adapter-sync", daemon=True).start()
        logger.info("adapter store up: %s, %d sources, %d adapters", self.syncer.root,
                    len(self.syncer.sources()), self.syncer.adapter_count())

    # ---- the admin surface ---------------------------------------------------------------------

    def status(self) -> dict:
        replicas = {rid: sorted(report.warm) for rid, report in self._live_reports().items()}
        return {**self.syncer.status(), "epoch": self.feed.epoch, "seq": self.feed.seq, "replicas": replicas}

    def register(self, adapter_id: str, uri: str, options: Optional[dict] = None) -> dict:
        record, report = self.syncer.register(adapter_id, uri, options)
        self._publish(report.changes)
        return self._served(record)

    def merge(self, spec: dict) -> dict:
        """A named merge (`merge_spec.MergeSpec` as JSON), registered as a new adapter; its record."""
        record, report = self.syncer.merge(MergeSpec.model_validate(spec))
        self._publish(report.changes)
        return self._served(record)

    def apply_config(self, config: dict) -> list[str]:
        """New settings from a deploy, applied while running (see `AdapterSyncer.apply_config`)."""
        changed = self.syncer.apply_config(StoreConfig.model_validate(config))
        if changed:
            self._wake.set()
        return changed

    def root(self) -> str:
        return str(self.syncer.root)

    def add_source(self, uri: str, options: Optional[dict] = None) -> dict:
        spec, report = self.syncer.add_source(SourceInput(uri=uri, options=options or {}))
        self._publish(report.changes)
        return {"source": spec.model_dump(mode="json"), "sync": report.to_dict()}

    def list_adapters(self, tenant: Optional[str] = None, include_deleted: bool = False) -> list[dict]:
        return [self._describe(r) for r in self.syncer.records(tenant=tenant, include_deleted=include_deleted)]

    def get(self, adapter_id: str, tenant: Optional[str] = None) -> dict:
        return self._describe(self.syncer.record(adapter_id, tenant=tenant))

    def delete(self, adapter_id: str) -> dict:
        self._publish(self.syncer.delete(adapter_id))
        return self._describe(self.syncer.record(adapter_id, include_deleted=True))

    def disable(self, adapter_id: str, fallback: str = "none") -> dict:
        record, changes = self.syncer.disable(adapter_id, fallback)
        self._publish(changes)
        return self._describe(record)

    def enable(self, adapter_id: str) -> dict:
        record, changes = self.syncer.enable(adapter_id)
        self._publish(changes)
        return self._describe(record)

    def disabled_adapters(self) -> dict[str, str]:
        """adapter id -> fallback ("none" or "base") for every disabled adapter: the ingress asks."""
        return self.syncer.disabled_adapters()

    def sync_now(self) -> dict:
        report = self.syncer.sync()
        self._publish(report.changes)
        self._metrics.observe(report, self.syncer.status())
        return report.to_dict()

    # ---- the replicas' surface -----------------------------------------------------------------

    def locate(self, adapter_id: str) -> tuple[str, list]:
        """(serving version, [ObjectRef of its AdapterPayload]); the ref is put once per version.
        Locks exist only for adapters that serve: an id any caller sends must not leave one behind."""
        if self.syncer.serving_version(adapter_id) is None:
            self.syncer.serving_checkpoint(adapter_id)  # its typed error: unknown, disabled or nothing valid
        with self._lock:
            lock = self._payload_locks.setdefault(adapter_id, threading.Lock())
        with lock:  # one put per version however many replicas ask at once
            version = self.syncer.serving_version(adapter_id)
            cached = self._payloads.get(adapter_id)
            if cached is not None and cached[0] == version:
                return version, [cached[1]]
            version, config, checkpoint = self.syncer.serving_checkpoint(adapter_id)
            ref = ray.put(payload_from_checkpoint(adapter_id, version, config, checkpoint))
            self._payloads[adapter_id] = (version, ref)
            return version, [ref]

    def poll(self, replica_id: str, epoch: Optional[str], since: int, warm: dict[str, str], timeout_s: float,
             adapters: Optional[dict[str, AdapterOnReplica]] = None) -> ChangeBatch:
        """Long-poll for changes after `since`; `warm` is what the replica has in its slots now,
        `adapters` what it says about each adapter it holds."""
        with self._lock:
            self._replicas[replica_id] = ReplicaReport(dict(warm), time.monotonic(), dict(adapters or {}))
        batch = self.feed.poll(epoch, since, min(max(timeout_s, 0.0), MAX_POLL_S))
        pins = self.syncer.pins()
        return dataclasses.replace(batch, pins=self._pins_for(replica_id, pins), pin_floor=max(pins.values(), default=0))

    def adapter_demand(self, limit: int) -> AdapterDemand:
        """The `limit` adapters live replicas served most requests of, served now and not
        disabled, and those replicas' ids: what a new replica chooses its prewarm from."""
        reports = self._live_reports()
        requests: dict[str, int] = {}
        for report in reports.values():
            for adapter_id, on_replica in report.adapters.items():
                requests[adapter_id] = requests.get(adapter_id, 0) + on_replica.requests
        disabled = self.syncer.disabled_adapters()
        servable = {r.adapter_id for r in self.syncer.records() if r.served is not None and r.adapter_id not in disabled}
        ranked = sorted((a for a, n in requests.items() if n > 0 and a in servable), key=lambda a: (-requests[a], a))
        return AdapterDemand({a: requests[a] for a in ranked[:max(0, limit)]}, tuple(sorted(reports)))

    def leave(self, replica_id: str) -> None:
        """A replica is stopping (scale-in, a deploy): its pins go to the others at their next poll."""
        with self._lock:
            self._replicas.pop(replica_id, None)

    def pin(self, adapter_id: str, replicas: int) -> dict:
        return self._describe(self.syncer.pin(adapter_id, replicas))

    def unpin(self, adapter_id: str) -> dict:
        return self._describe(self.syncer.pin(adapter_id, 0))

    def _pins_for(self, replica_id: str, pins: dict[str, int]) -> frozenset[str]:
        now = time.monotonic()
        with self._lock:
            live = [rid for rid, report in self._replicas.items() if now - report.seen_s < PIN_LIVENESS_S]
        return assign_pins(pins, [*live, replica_id]).get(replica_id, frozenset())

    def report_rejected(self, adapter_id: str, version: str, reason: str, replica_id: str) -> None:
        """A replica found `version` bad after it landed: rejected, the previous good one serves."""
        logger.warning("replica %s rejected %s version %s: %s", replica_id, adapter_id, version, reason)
        self._publish(self.syncer.report_rejected(adapter_id, version, f"replica {replica_id}: {reason}"))

    def rollback(self, adapter_id: str) -> dict:
        record, changes = self.syncer.rollback(adapter_id)
        self._publish(changes)
        return self._describe(record)

    def replica_versions(self, replica_id: str) -> dict[str, str]:
        """What a replica last reported warm: adapter id -> the version in its slot."""
        with self._lock:
            report = self._replicas.get(replica_id)
            return dict(report.warm) if report is not None else {}

    # ---- internals --------------------------------------------------------------------------

    def _live_reports(self) -> dict[str, ReplicaReport]:
        """replica id -> its last report, for replicas heard from within the TTL."""
        now = time.monotonic()
        with self._lock:
            return {rid: r for rid, r in self._replicas.items() if now - r.seen_s < REPLICA_REPORT_TTL_S}

    def _served(self, record: AdapterRecord) -> dict:
        current = record.current
        if current is not None and current.status == "rejected":  # whatever served before still does
            raise InvalidAdapterError(current.reason or "refused", current.reason_code or "invalid_config")
        return self._describe(record)

    def _describe(self, record: AdapterRecord) -> dict:
        """The record, the replicas it is warm on, and what each replica holding it reports."""
        reports = self._live_reports()
        warm_on = sorted(rid for rid, report in reports.items() if record.adapter_id in report.warm)
        on_replicas = [
            {"replica_id": rid, **dataclasses.asdict(report.adapters[record.adapter_id])}
            for rid, report in sorted(reports.items()) if record.adapter_id in report.adapters
        ]
        return {**record.model_dump(mode="json"), "status": record.status, "warm_on": warm_on, "replicas": on_replicas}

    def _publish(self, changes: list[AdapterChange]) -> None:
        if not changes:
            return
        for change in changes:
            self._payloads.pop(change.adapter_id, None)
            if change.version is None:
                with self._lock:
                    self._payload_locks.pop(change.adapter_id, None)
        for change in changes:  # put new versions now: warm replicas fetch them right away
            if change.version is not None:
                try:
                    self.locate(change.adapter_id)
                except Exception as error:  # the replicas' own locate reports it
                    logger.warning("could not publish %s: %s", change.adapter_id, error)
        self.feed.publish(changes)

    def _sync_loop(self) -> None:
        while True:
            self._wake.wait(timeout=self.syncer.next_due_in_s())
            self._wake.clear()
            keys = self.syncer.due()
            if not keys:
                continue
            try:
                report = self.syncer.sync(keys)
                self._publish(report.changes)
                self._metrics.observe(report, self.syncer.status())
            except Exception:
                logger.exception("sync failed")
                time.sleep(1.0)


class StoreMetrics:
    """The store's Prometheus metrics (`ray.util.metrics`, exported with Ray's; `source` is a
    configured or registered source URI, so the labels stay few):
        lora_serve_store_sync_seconds                  one sync of the sources that were due
        lora_serve_store_sync_failures_total{source}   a source that could not be listed or fetched
        lora_serve_store_source_lag_seconds{source}    since the source's last good sync
        lora_serve_store_adapters_serving              adapters with a version to serve"""

    def __init__(self) -> None:
        from ray.util import metrics

        self.sync_s = metrics.Histogram("lora_serve_store_sync_seconds", "One sync of the due sources",
                                        boundaries=[0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300])
        self.failures = metrics.Counter("lora_serve_store_sync_failures", "Source syncs that failed",
                                        tag_keys=("source",))
        self.lag_s = metrics.Gauge("lora_serve_store_source_lag_seconds", "Seconds since a source's last good sync",
                                   tag_keys=("source",))
        self.serving = metrics.Gauge("lora_serve_store_adapters_serving", "Adapters with a version to serve")

    def observe(self, report: SyncReport, status: dict) -> None:
        self.sync_s.observe(report.duration_s)
        failed = {key.split("#", 1)[0] for key in report.unavailable}  # a source key is its URI (#id)
        for source in status["sources"]:
            if source["uri"] in failed:
                self.failures.inc(1, {"source": source["uri"]})
            last = source["last_success_at"]
            lag_s = (utc_now() - datetime.fromisoformat(last)).total_seconds() if last else 0.0
            self.lag_s.set(lag_s, {"source": source["uri"]})
        self.serving.set(status["serving"])


def _actor_class():
    return ray.remote(AdapterStore)


def get_or_create_store(config: StoreConfig, engine_config: EngineConfig):
    """The store's handle, creating the detached actor if no one has yet (race-free: get_if_exists).

    A store that is already up gets `config` applied (new sources watched, new intervals used);
    one on another root is replaced by a store on the new root (the old root's manifest stays
    where it is, so going back to it finds everything)."""
    wanted_root = str(config.resolved_root())
    store = _create_or_join(config, engine_config)
    if ray.get(store.root.remote()) != wanted_root:
        logger.warning("the adapter store moves to %s: replacing the running actor", wanted_root)
        ray.kill(store, no_restart=True)
        deadline_s = time.monotonic() + STORE_REPLACE_TIMEOUT_S
        while True:  # joins the dying actor until its name is free, then creates (or joins) the new one
            store = _create_or_join(config, engine_config)
            try:
                if ray.get(store.root.remote(), timeout=10) == wanted_root:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            if time.monotonic() > deadline_s:
                raise ServiceUnavailableError(f"the adapter store could not be moved to {wanted_root}")
            time.sleep(0.2)
    ray.get(store.apply_config.remote(config.model_dump(mode="json")))
    return store


def _create_or_join(config: StoreConfig, engine_config: EngineConfig):
    return _actor_class().options(
        name=config.name,
        namespace=config.namespace,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        max_task_retries=-1,
        max_concurrency=STORE_MAX_CONCURRENCY,
        num_cpus=0,
    ).remote(config.model_dump(mode="json"), engine_config.model_dump(mode="json"))


def get_store(config: StoreConfig):
    return ray.get_actor(config.name, namespace=config.namespace)
