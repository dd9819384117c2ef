"""A replica's link to the adapter store: where cold adapters come from, and how updates arrive.

  - `resolve(adapter_id)` is the engine's resolver: the store's `locate` gives the serving
    version and an ObjectRef of its payload, read from the object store (zero-copy on this node,
    a transfer from another node), never from S3.
  - A thread long-polls the store's change feed, reporting this replica's warm set (and, per
    adapter, its version, slot, swap time, requests, tokens and last validation) each time,
    and hands every answer to the engine's residency (`AdapterResidency.follow_store`), which
    applies it (and the pins the store assigns this replica: `adapters_store.pins`): a new
    version of a warm adapter goes into its slot before its next batch, one only
    cached is dropped, a deleted one is removed; a full resync (first poll, store restarted,
    missed changes) does the same for every adapter the replica holds.
  - `report_rejected` tells the store at once that a version failed its check here (the engine's
    `on_rejected`), so it serves the previous good version.
If the store is down the thread retries with backoff; serving goes on from what is cached.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

import ray

from deployments.engine import Engine
from deployments.ray_errors import unwrap_ray_error
from lora_core.changes import AdapterDemand, ChangeBatch
from lora_core.checkpoint import LoraCheckpoint
from lora_core.errors import SourceUnavailableError
from lora_core.payload import checkpoint_from_payload

__all__ = ["StoreSubscription"]

logger = logging.getLogger(__name__)

POLL_TIMEOUT_S = 2.0  # also how stale this replica's warm-set report at the store may get
CALL_TIMEOUT_S = 60.0
FIRST_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 5.0


class StoreSubscription:
    def __init__(self, store, replica_id: str, current_engine: Callable[[], Optional[Engine]]) -> None:
        self._store = store
        self.replica_id = replica_id
        self._current_engine = current_engine
        self._epoch: Optional[str] = None
        self._seq = 0
        self._warm: dict[str, str] = {}  # what the last answer left warm: reported on the next poll
        self._stopped = threading.Event()
        self.polls_applied = 0
        self.pin_floor = 0  # the store's last word on the most replicas one adapter is pinned on
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
            raise unwrap_ray_error(wrapped) from None
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.ObjectLostError) as error:
            logger.warning("could not fetch %s from the adapter store: %s", adapter_id, error)
            raise SourceUnavailableError("the adapter store could not be reached: retry later") from None
        return checkpoint_from_payload(payload), version

    def adapter_demand(self, limit: int) -> AdapterDemand:
        """The store's most requested adapters and live replicas (what a new replica chooses its
        prewarm from); empty if it cannot say."""
        try:
            return ray.get(self._store.adapter_demand.remote(limit), timeout=CALL_TIMEOUT_S)
        except Exception as error:  # prewarming is an optimization: a replica starts without it
            logger.warning("could not ask the adapter store for the adapters' demand: %s", error)
            return AdapterDemand()

    def leave(self) -> None:
        """Stop polling and tell the store this replica is gone, so its pins move now."""
        self.stop()
        try:
            ray.get(self._store.leave.remote(self.replica_id), timeout=5)
        except Exception as error:
            logger.warning("could not tell the adapter store this replica leaves: %s", error)

    def report_rejected(self, adapter_id: str, version: str, reason: str) -> None:
        """Tell the store a version failed its check here; does not wait for the answer."""
        self._store.report_rejected.remote(adapter_id, version, reason, self.replica_id)

    def _run(self) -> None:
        delay = FIRST_RETRY_DELAY_S
        while not self._stopped.is_set():
            engine = self._current_engine()
            adapters = engine.residency.adapter_reports() if engine is not None else {}
            try:
                batch: ChangeBatch = ray.get(
                    self._store.poll.remote(self.replica_id, self._epoch, self._seq, self._warm, POLL_TIMEOUT_S,
                                            adapters),
                    timeout=POLL_TIMEOUT_S + CALL_TIMEOUT_S,
                )
            except Exception as error:
                if self._stopped.is_set():
                    return
                logger.warning("adapter store poll failed, retrying in %.1f s: %s", delay, error)
                self._stopped.wait(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)
                continue
            delay = FIRST_RETRY_DELAY_S
            engine = self._current_engine()  # now, not before the wait: it may have been built meanwhile
            if engine is not None:
                self._warm = engine.residency.follow_store(batch.versions(), complete=batch.resync, fetch=self.resolve)
                engine.residency.apply_store_pins(batch.pins)
                self.pin_floor = batch.pin_floor
                self.polls_applied += 1
            self._epoch, self._seq = batch.epoch, batch.seq
