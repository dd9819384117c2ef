"""Which adapter version lives where on one engine: its slot, the host cache, local folders.

`AdapterResidency` is the one owner of adapter state on a replica:
  - the slot pool (`slots.SlotPool`: which adapter holds which slot, pins, in-flight refs),
  - the host cache (`host_cache.HostCache`: prepared copies, one load in flight per adapter),
  - the version written into each slot, and the local folders adapters were registered from,
and `placements()` is the one answer to "which version is where". The adapter store's changes
come in through one method, `follow_store`.

Threads. Slot tensors are written only on the engine's loop thread, between batches (so a row
never sees a half-written slot): methods marked "loop thread" are called there by the scheduler,
and the others hand slot work to the loop (`ModelLoop.call`). Host-cache work runs on any thread.
A version put into the host cache while its adapter is warm is written into the slot before the
adapter's next batch (`acquire` rewrites a slot whose version differs), so a new version never
waits for the batch in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from deployments.engine.host_cache import CacheEntry, HostCache
from deployments.engine.slot_lora import PreparedAdapter, SlotLoraModel
from deployments.engine.slots import PoolSnapshot, SlotPool
from lora_core.checkpoint import LoraCheckpoint, read_checkpoint
from lora_core.errors import AdapterNotFoundError

__all__ = ["AdapterResidency", "AdapterResolver", "ModelLoop", "Placement"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

AdapterResolver = Callable[[str], tuple[LoraCheckpoint, str]]
"""adapter id -> (checkpoint, version); raises AdapterNotFoundError for an unknown id. Its
checkpoints were scanned for NaN/inf by whoever published them (the adapter store); the engine
still checks their shapes, ranks and targets against its slots."""

LOAD_WORKERS = 4


class ModelLoop(Protocol):
    """The engine's loop thread, as the residency uses it (the scheduler implements it)."""

    def call(self, function: Callable[[], T]) -> T:
        """Run `function` on the loop thread between batches; its result or error comes back."""

    def wake(self) -> None:
        """Something a queued request waits for may have changed."""

    def fail_waiting(self, adapter_id: str, error: BaseException) -> None:
        """End the queued requests for `adapter_id` with `error`."""


@dataclass(frozen=True)
class Placement:
    """Where one adapter is on this engine."""

    adapter_id: str
    slot: int | None
    """Its slot while warm, else None."""
    version: str | None
    """The version its next batch runs: the host copy's, else the slot's; None when only its
    folder is known (a local adapter not loaded since)."""
    origin: Literal["local", "store"]
    """`local`: registered from a folder; `store`: resolved through the adapter store."""


class AdapterResidency:
    def __init__(
        self,
        slot_model: SlotLoraModel,
        num_slots: int,
        host_cache_bytes: int,
        max_adapter_bytes: int,
        loop: ModelLoop,
        resolver: AdapterResolver | None = None,
    ) -> None:
        self.slot_model = slot_model
        self.pool = SlotPool(num_slots)
        self._executor = ThreadPoolExecutor(max_workers=LOAD_WORKERS, thread_name_prefix="adapter-load")
        self.host_cache: HostCache[PreparedAdapter] = HostCache(host_cache_bytes, self._executor)
        self._max_adapter_bytes = max_adapter_bytes
        self._loop = loop
        self._resolver = resolver
        self._local_folders: dict[str, Path] = {}
        self._slot_versions: dict[str, str] = {}  # written on the loop thread only

    # ---- which version is where ---------------------------------------------------------------

    def placements(self) -> dict[str, Placement]:
        """Every adapter this engine holds (a slot or the host cache) or was registered from a
        folder, sorted by id."""
        cached = self.host_cache.versions()
        slots = self.pool.slots()
        local = dict(self._local_folders)
        placements = {}
        for adapter_id in sorted({*cached, *slots, *local}):
            slot = slots.get(adapter_id)
            version = cached.get(adapter_id) or (self._slot_versions.get(adapter_id) if slot is not None else None)
            origin = "local" if adapter_id in local else "store"
            placements[adapter_id] = Placement(adapter_id, slot, version, origin)
        return placements

    def placement(self, adapter_id: str) -> Placement | None:
        return self.placements().get(adapter_id)

    def warm_versions(self) -> dict[str, str]:
        """adapter id -> the version its next batch runs, for every adapter in a slot."""
        return {a: p.version for a, p in self.placements().items() if p.slot is not None and p.version is not None}

    def pool_snapshot(self) -> PoolSnapshot:
        return self.pool.snapshot()

    def knows(self, adapter_id: str) -> bool:
        """Whether a request for `adapter_id` can be served without asking the store."""
        return adapter_id in self._local_folders or adapter_id in self.host_cache or adapter_id in self.pool

    @property
    def has_resolver(self) -> bool:
        return self._resolver is not None

    # ---- the adapter store's changes ------------------------------------------------------------

    def follow_store(
        self, versions: Mapping[str, str | None], *, complete: bool, fetch: AdapterResolver
    ) -> dict[str, str]:
        """Apply the store's serving versions (None: deleted); returns the warm versions after.

        `complete=True` (a resync): `versions` is every adapter the store serves, so a held store
        adapter missing from it is deleted. Per adapter: deleted -> removed everywhere; a new
        version of a warm one -> fetched into the host cache, which its slot takes before its
        next batch; of one only cached -> dropped (with any load in flight), so its next use
        loads the new one. One adapter's failure does not stop the others."""
        if complete:
            held = {a: p.version for a, p in self.placements().items() if p.origin == "store"}
            changes = {a: versions.get(a) for a, version in held.items() if version != versions.get(a)}
        else:
            changes = dict(versions)
        for adapter_id, version in changes.items():
            try:
                self._follow_one(adapter_id, version, fetch)
            except Exception:
                logger.exception("applying version %s of %s failed", version, adapter_id)
        return self.warm_versions()

    def _follow_one(self, adapter_id: str, version: str | None, fetch: AdapterResolver) -> None:
        placement = self.placement(adapter_id)
        if version is None:
            self.delete(adapter_id, missing_ok=True)
        elif placement is not None and placement.slot is not None and placement.version != version:
            try:
                checkpoint, fetched = fetch(adapter_id)
            except AdapterNotFoundError:
                self.delete(adapter_id, missing_ok=True)
                return
            self.put(adapter_id, checkpoint, fetched, check_values=False)
            logger.info("%s: version %s ready for its next batch", adapter_id, fetched)
        elif placement is None or placement.version != version:
            self.host_cache.invalidate(adapter_id)  # also stales a load in flight

    # ---- registering, updating, removing ----------------------------------------------------------

    def register_folder(self, adapter_id: str, folder: str | Path) -> str:
        """Validate a local PEFT adapter folder now and serve it as `adapter_id`; returns its version."""
        checkpoint = read_checkpoint(folder, max_size_bytes=self._max_adapter_bytes)
        self.update(adapter_id, checkpoint, checkpoint.version)
        self._local_folders[adapter_id] = Path(folder)
        return checkpoint.version

    def put(self, adapter_id: str, checkpoint: LoraCheckpoint, version: str, *, check_values: bool = True) -> None:
        """A (new) version into the host cache; a warm slot takes it before its next batch.
        Refused input (validation) changes nothing."""
        prepared = self.slot_model.prepare(checkpoint, check_values=check_values)
        self.host_cache.put(adapter_id, prepared, version)
        self._loop.wake()

    def update(self, adapter_id: str, checkpoint: LoraCheckpoint, version: str, *, check_values: bool = True) -> None:
        """Like `put`, and wait until a warm slot holds the new version (between batches)."""
        prepared = self.slot_model.prepare(checkpoint, check_values=check_values)

        def swap_in() -> None:
            self.host_cache.put(adapter_id, prepared, version)
            slot = self.pool.slot_of(adapter_id)
            if slot is not None and self._slot_versions.get(adapter_id) != version:
                self.pool.record_swap(self.slot_model.write_slot(slot, prepared))
                self._slot_versions[adapter_id] = version

        self._loop.call(swap_in)

    def delete(self, adapter_id: str, missing_ok: bool = False) -> None:
        """Forget an adapter: its slot is zeroed and freed, queued requests for it fail with 404."""

        def delete_now() -> None:
            if not self.knows(adapter_id) and not missing_ok:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
            self._drop(adapter_id, force=True)
            self._local_folders.pop(adapter_id, None)
            self._loop.fail_waiting(adapter_id, AdapterNotFoundError(f"adapter {adapter_id!r} was deleted"))

        self._loop.call(delete_now)

    def evict(self, adapter_id: str) -> None:
        """Out of its slot and the host cache (between batches, so no row holds it); it stays
        registered and loads again on its next use."""
        self._loop.call(lambda: self._drop(adapter_id, force=False))

    def warm(self, adapter_id: str, pin: bool = False) -> int:
        """Load an adapter into a slot now (and pin it); returns the slot."""
        entry = self.host_entry(adapter_id)

        def load() -> int:
            slot = self.acquire(adapter_id, entry)
            try:
                if pin:
                    self.pool.pin(adapter_id)
            finally:
                self.pool.release(adapter_id)
            return slot

        return self._loop.call(load)

    def unpin(self, adapter_id: str) -> None:
        self._loop.call(lambda: self.pool.unpin(adapter_id))

    # ---- loading ----------------------------------------------------------------------------------

    def cached(self, adapter_id: str) -> CacheEntry[PreparedAdapter] | None:
        return self.host_cache.get(adapter_id)

    def is_loading(self, adapter_id: str) -> bool:
        return self.host_cache.is_loading(adapter_id)

    def is_cached(self, adapter_id: str) -> bool:
        return adapter_id in self.host_cache

    def start_load(self, adapter_id: str) -> Future:
        """Start (or join) the load of an adapter into the host cache, on a loader thread."""
        return self.host_cache.load(adapter_id, lambda: self._load_entry(adapter_id))

    def host_entry(self, adapter_id: str) -> CacheEntry[PreparedAdapter]:
        """The host copy, loading it first (and waiting) when it is not cached."""
        entry = self.host_cache.get(adapter_id)
        return entry if entry is not None else self.start_load(adapter_id).result()

    def _load_entry(self, adapter_id: str) -> CacheEntry[PreparedAdapter]:
        folder = self._local_folders.get(adapter_id)
        if folder is not None:
            checkpoint = read_checkpoint(folder, max_size_bytes=self._max_adapter_bytes)
            return CacheEntry(self.slot_model.prepare(checkpoint), checkpoint.version)
        if self._resolver is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
        checkpoint, version = self._resolver(adapter_id)
        return CacheEntry(self.slot_model.prepare(checkpoint, check_values=False), version)  # value-scanned by the store

    # ---- slots (loop thread) ----------------------------------------------------------------------

    def acquire(self, adapter_id: str, entry: CacheEntry[PreparedAdapter]) -> int:
        """Loop thread: take the adapter's slot for one request, writing its weights in on a miss
        or when the slot holds another version; pair with `release`."""
        assignment = self.pool.acquire(adapter_id)
        if assignment.evicted is not None:
            self._slot_versions.pop(assignment.evicted, None)
        if not assignment.hit or self._slot_versions.get(adapter_id) != entry.version:
            try:
                self.pool.record_swap(self.slot_model.write_slot(assignment.slot, entry.value))
            except BaseException:
                self.pool.discard(adapter_id, force=True)
                raise
            self._slot_versions[adapter_id] = entry.version
        return assignment.slot

    def release(self, adapter_id: str) -> None:
        """Loop thread: give back what `acquire` took (a no-op if the adapter was deleted since)."""
        if adapter_id in self.pool:
            self.pool.release(adapter_id)

    def _drop(self, adapter_id: str, force: bool) -> None:
        self.host_cache.invalidate(adapter_id)
        slot = self.pool.discard(adapter_id, force=force)
        if slot is not None:
            self.slot_model.clear_slot(slot)
        self._slot_versions.pop(adapter_id, None)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

