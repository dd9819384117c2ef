"""A replica's link to the adapter store: where cold adapters come from, and how updates arrive.

  - `resolve(adapter_id)` is the engine's resolver: the store's `locate` gives the serving
    version and an ObjectRef of its payload, read from the object store (zero-copy on this node,
    a transfer from another node), never from S3.
  - A thread long-polls the store's change feed, reporting this replica's warm set each time.
    A new version of an adapter that is warm here is swapped into its slot between batches
    (`Engine.update_adapter`); one that is only in the host cache is dropped from it, so its next
    use loads the new version; a deleted one is removed everywhere.
  - A full resync (first poll, store restarted, missed changes) applies the same rules to every
    adapter this replica holds, against the store's list of serving versions.
If the store is down the thread retries with backoff; serving goes on from what is cached.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

import ray

from adapters_store.change_feed import AdapterChange, ChangeBatch
from adapters_store.checkpoint import LoraCheckpoint
from adapters_store.payload import checkpoint_from_payload
from deployments.engine import Engine
from deployments.errors import AdapterNotFoundError, SourceUnavailableError
from deployments.router import unwrap_replica_error

__all__ = ["StoreSubscription"]

logger = logging.getLogger(__name__)

POLL_TIMEOUT_S = 2.0  # also how stale this replica's warm-set report at the store may get
CALL_TIMEOUT_S = 60.0
MAX_RETRY_DELAY_S = 5.0


class StoreSubscription:
    def __init__(self, store, replica_id: str, current_engine: Callable[[], Optional[Engine]]) -> None:
        self._store = store
        self.replica_id = replica_id
        self._current_engine = current_engine
        self._epoch: Optional[str] = None
        self._seq = 0
        self._stopped = threading.Event()
        self.changes_applied = 0
        self._thread = threading.Thread(target=self._run, name="store-subscription", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def resolve(self, adapter_id: str) -> tuple[LoraCheckpoint, str]:
        """The engine's resolver: the serving version's weights from the object store."""
        try:
            version, [ref] = ray.get(self._store.locate.remote(adapter_id), timeout=CALL_TIMEOUT_S)
            payload = ray.get(ref, timeout=CALL_TIMEOUT_S)
        except ray.exceptions.RayTaskError as wrapped:
            raise unwrap_replica_error(wrapped) from None
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.ObjectLostError) as error:
            raise SourceUnavailableError(f"the adapter store could not be reached: {error}") from None
        return checkpoint_from_payload(payload), version

    # ---- the poll loop ------------------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.5
        while not self._stopped.is_set():
            engine = self._current_engine()
            warm = engine.warm_versions() if engine is not None else {}
            try:
                batch: ChangeBatch = ray.get(
                    self._store.poll.remote(self.replica_id, self._epoch, self._seq, warm, POLL_TIMEOUT_S),
                    timeout=POLL_TIMEOUT_S + CALL_TIMEOUT_S,
                )
            except Exception as error:
                if self._stopped.is_set():
                    return
                logger.warning("adapter store poll failed, retrying in %.1f s: %s", delay, error)
                self._stopped.wait(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)
                continue
            delay = 0.5
            engine = self._current_engine()  # now, not before the wait: it may have been built meanwhile
            if engine is not None:
                self.apply(engine, batch)
            self._epoch, self._seq = batch.epoch, batch.seq

    def apply(self, engine: Engine, batch: ChangeBatch) -> None:
        if batch.resync:
            held = engine.resolved_adapters()
            changes = [AdapterChange(a, batch.serving.get(a)) for a, v in held.items() if v != batch.serving.get(a)]
        else:
            changes = list(batch.changes)
        for change in changes:
            try:
                self._apply_one(engine, change)
            except Exception:  # one adapter's failure must not stop the others' updates
                logger.exception("applying %s failed", change)

    def _apply_one(self, engine: Engine, change: AdapterChange) -> None:
        if change.version is None:
            engine.delete_adapter(change.adapter_id, missing_ok=True)
        elif engine.adapter_version(change.adapter_id) not in (None, change.version):
            try:
                checkpoint, version = self.resolve(change.adapter_id)
            except AdapterNotFoundError:
                engine.delete_adapter(change.adapter_id, missing_ok=True)
                return
            started = time.perf_counter()
            engine.update_adapter(change.adapter_id, checkpoint, version, wait=False, check_values=False)
            logger.info("%s: version %s ready for the next batch in %.1f ms", change.adapter_id, version,
                        (time.perf_counter() - started) * 1000)
        elif engine.resolved_adapters().get(change.adapter_id) != change.version:  # also stales a load in flight
            engine.invalidate_cached(change.adapter_id)
        self.changes_applied += 1
