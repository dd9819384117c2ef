"""Which adapter version lives where on one engine: its slot, the host cache, local folders.

`AdapterResidency` is the one owner of adapter state on a replica:
  - the slot pool (`slots.SlotPool`: which adapter holds which slot, pins, in-flight refs),
  - the host cache (`host_cache.HostCache`: prepared copies, one load in flight per adapter),
  - the version written into each slot, and the local folders adapters were registered from,
and `placements()` is the one answer to "which version is where". The adapter store's changes
come in through one method, `follow_store`.

Combinations. A request may name several adapters with weights (`contracts.Combination`): its
recipe is defined here under the combination's key, and the first request's load builds the
derived adapter on a loader thread (`combinations.combine_checkpoints`) from its parts' current
versions, into the host cache and a slot like any adapter. A new version or the deletion of any
part drops the derived adapter, so the next request rebuilds it (running ones finish on theirs).

Versions. A slot holds one version of one adapter (the pool's key is `<adapter id>@<version>`),
and a running request holds its slot from admission to its last token, so it runs start to
finish on one version. A new version goes into the host cache at once; the next request admitted
for the adapter takes it (into the old version's slot when no request holds that one, else into
another slot), while the requests already running finish on the old one, whose slot is freed
when the last of them ends. A swap never waits for the longest running request. A deleted adapter
works the same way: running requests finish, queued ones fail with 404, the slot is zeroed when
freed.

Validation (PEFT's hotswap workflow, last step). The first time a version lands in a slot here,
its slot rows are checked against its fingerprint (`lora_core.fingerprint`: the store's, sent
with the payload), so a partial, misplaced or mis-scaled copy is caught before a row runs on it;
and a version with a probe (`probe.json`) answers it, greedy, on a temporary slot before it
becomes visible. A version that fails is never served: its slot is zeroed, the store is told
(`on_rejected`), and the requests waiting for the adapter get the version the store serves
instead (the previous good one), or SwapValidationError when none comes within
`REJECTED_WAIT_S`.

Threads. Slot tensors are written only on the engine's loop thread, between steps (so a row
never sees a half-written slot): methods marked "loop thread" are called there by the scheduler,
and the others hand slot work to the loop (`ModelLoop.call`). Host-cache work runs on any thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from deployments.contracts import Combination
from deployments.engine.combinations import combination_version, combine_checkpoints
from deployments.engine.host_cache import CacheEntry, HostCache
from deployments.engine.slot_lora import PreparedAdapter, SlotLoraModel
from deployments.engine.slots import PoolSnapshot, SlotPool
from lora_core.changes import AdapterOnReplica
from lora_core.checkpoint import LoraCheckpoint, read_checkpoint, validate_checkpoint
from lora_core.errors import AdapterNotFoundError, LoraServeError, SwapValidationError
from lora_core.probe import AdapterProbe

__all__ = ["AdapterResidency", "AdapterResolver", "ModelLoop", "Placement", "slot_key"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

AdapterResolver = Callable[[str], tuple[LoraCheckpoint, str]]
"""adapter id -> (checkpoint, version); raises AdapterNotFoundError for an unknown id. Its
checkpoints were scanned for NaN/inf by whoever published them (the adapter store); the engine
still checks their shapes, ranks and targets against its slots."""

LOAD_WORKERS = 4
REJECTED_WAIT_S = 5.0
"""How long a load waits for the store to stop serving a version this replica rejected."""
MAX_VALIDATED = 4096
"""Slot keys remembered per set (validated, probed, rejected here); the oldest is forgotten."""
MAX_COMBINATIONS = 1024
"""Recipes remembered per engine; the oldest unused one is forgotten (a request defines it again)."""
_KEY_SEPARATOR = "@"  # never in an adapter id (lora_core.adapter_ids)
_PROBE_PREFIX = "probe:"  # never in an adapter id either


def _remember(seen: OrderedDict[str, None], key: str) -> None:
    seen[key] = None
    while len(seen) > MAX_VALIDATED:
        seen.popitem(last=False)


def slot_key(adapter_id: str, version: str) -> str:
    """The slot pool's key for one version of one adapter."""
    return f"{adapter_id}{_KEY_SEPARATOR}{version}"


def _split(key: str) -> tuple[str, str]:
    adapter_id, _, version = key.partition(_KEY_SEPARATOR)
    return adapter_id, version


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
    origin: Literal["local", "store", "combination", "probe"]
    """`local`: registered from a folder; `store`: resolved through the adapter store;
    `combination`: derived from other adapters for combination requests; `probe`: a new
    version's temporary copy while its probe runs."""


Prober = Callable[[str, PreparedAdapter, AdapterProbe], str]
"""(temporary adapter id, prepared version, probe) -> its greedy answer (the engine runs it)."""
RejectionReporter = Callable[[str, str, str], None]
"""(adapter id, version, reason): tell the store; must not block."""


class AdapterResidency:
    def __init__(
        self,
        slot_model: SlotLoraModel,
        num_slots: int,
        host_cache_bytes: int,
        max_adapter_bytes: int,
        loop: ModelLoop,
        resolver: AdapterResolver | None = None,
        on_rejected: RejectionReporter | None = None,
        admission: str = "tinylfu",
    ) -> None:
        self.slot_model = slot_model
        self.on_rejected = on_rejected
        self.prober: Prober | None = None  # set by the engine, which can run a request
        self.swap_observer: Callable[[float], None] | None = None  # each slot write's ms (the replica's metrics)
        self.pool = SlotPool(num_slots, admission=admission)
        self._executor = ThreadPoolExecutor(max_workers=LOAD_WORKERS, thread_name_prefix="adapter-load")
        self.host_cache: HostCache[PreparedAdapter] = HostCache(host_cache_bytes, self._executor)
        self._max_adapter_bytes = max_adapter_bytes
        self._loop = loop
        self._resolver = resolver
        self._local_folders: dict[str, Path] = {}
        self._retiring: set[str] = set()  # slot keys to free once no request holds them (loop thread)
        self._combinations: OrderedDict[str, Combination] = OrderedDict()  # key -> recipe
        self._built_from: dict[str, dict[str, str]] = {}  # combination key -> part id -> version built from
        self._combinations_lock = threading.Lock()
        self._validated: OrderedDict[str, None] = OrderedDict()  # slot keys checked here (loop thread)
        self._probed: OrderedDict[str, None] = OrderedDict()  # slot keys whose probe answered right here
        self._rejected: OrderedDict[str, None] = OrderedDict()  # slot keys that failed here: never served again
        self._reports: dict[str, AdapterOnReplica] = {}
        self._store_pins: set[str] = set()  # what the store asked this replica to keep pinned
        self._reports_lock = threading.Lock()

    # ---- which version is where ---------------------------------------------------------------

    def placements(self) -> dict[str, Placement]:
        """Every adapter this engine holds (a slot or the host cache) or was registered from a
        folder, sorted by id."""
        cached = self.host_cache.versions()
        warm = self._warm_keys()
        local = dict(self._local_folders)
        placements = {}
        for adapter_id in sorted({*cached, *warm, *local}):
            slot, slot_version = warm.get(adapter_id, (None, None))
            version = cached.get(adapter_id) or slot_version
            origin = "local" if adapter_id in local else self._derived_origin(adapter_id) or "store"
            placements[adapter_id] = Placement(adapter_id, slot, version, origin)
        return placements

    def _warm_keys(self) -> dict[str, tuple[int, str]]:
        """adapter id -> (slot, version) of its newest version in a slot (versions being retired
        after their last request are left out unless nothing newer is warm)."""
        warm: dict[str, tuple[int, str]] = {}
        for key, slot in self.pool.slots().items():
            adapter_id, version = _split(key)
            if adapter_id not in warm or key not in self._retiring:
                warm[adapter_id] = (slot, version)
        return warm

    def placement(self, adapter_id: str) -> Placement | None:
        return self.placements().get(adapter_id)

    def warm_versions(self) -> dict[str, str]:
        """adapter id -> the version its next batch runs, for every adapter in a slot (combinations
        left out: the store knows only their parts)."""
        return {
            a: p.version for a, p in self.placements().items()
            if p.slot is not None and p.version is not None and p.origin in ("local", "store")
        }

    def adapter_reports(self) -> dict[str, AdapterOnReplica]:
        """Per adapter held here (combinations left out): its version and slot, its last swap,
        the requests and tokens it served, its last validation."""
        placements = {a: p for a, p in self.placements().items() if p.origin in ("local", "store")}
        pinned = set(self.pool_snapshot().pinned)
        with self._reports_lock:
            return {
                adapter_id: dataclasses.replace(self._reports.get(adapter_id, AdapterOnReplica()),
                                                version=placement.version, slot=placement.slot,
                                                pinned=adapter_id in pinned)
                for adapter_id, placement in placements.items()
            }

    def apply_store_pins(self, adapter_ids: frozenset[str]) -> None:
        """Keep exactly these store-assigned adapters pinned (warmed first when cold); pins that
        were not the store's are left alone. One adapter's failure does not stop the others."""
        for adapter_id in sorted(adapter_ids - self._store_pins):
            try:
                self.warm(adapter_id, pin=True)
                self._store_pins.add(adapter_id)
                logger.info("%s pinned here by the store", adapter_id)
            except Exception as error:
                logger.warning("could not pin %s: %s", adapter_id, error)
        for adapter_id in sorted(self._store_pins - adapter_ids):
            self.unpin(adapter_id)
            self._store_pins.discard(adapter_id)

    def record_served(self, adapter_id: str, tokens: int) -> None:
        """Loop thread: one request on `adapter_id` ended with `tokens` generated."""
        if self._derived_origin(adapter_id) is not None:
            return
        with self._reports_lock:
            report = self._reports.get(adapter_id, AdapterOnReplica())
            self._reports[adapter_id] = dataclasses.replace(
                report, requests=report.requests + 1, tokens=report.tokens + tokens)

    def _note(self, adapter_id: str, **fields) -> None:
        with self._reports_lock:
            self._reports[adapter_id] = dataclasses.replace(self._reports.get(adapter_id, AdapterOnReplica()), **fields)

    def pool_snapshot(self) -> PoolSnapshot:
        """The slot pool's state with adapter ids where the pool has slot keys."""
        snapshot = self.pool.snapshot()
        ids = lambda keys: tuple(dict.fromkeys(_split(key)[0] for key in keys))  # noqa: E731
        last_used: dict[str, float] = {}
        for key, when in snapshot.last_used_s.items():
            adapter_id = _split(key)[0]
            last_used[adapter_id] = max(when, last_used.get(adapter_id, when))
        return dataclasses.replace(
            snapshot,
            warm=ids(snapshot.warm),
            pinned=ids(snapshot.pinned),
            last_used_s=last_used,
            next_victim=_split(snapshot.next_victim)[0] if snapshot.next_victim else None,
        )

    def knows(self, adapter_id: str) -> bool:
        """Whether a request for `adapter_id` can be served without asking the store."""
        if self._is_combination(adapter_id):
            return all(self.knows(part) for part in self._combinations[adapter_id].adapter_ids)
        return adapter_id in self._local_folders or adapter_id in self.host_cache or adapter_id in self._warm_keys()

    # ---- combinations -----------------------------------------------------------------------------

    def define_combination(self, combination: Combination) -> str:
        """Remember a combination's recipe; returns the key its requests run under."""
        key = combination.key
        with self._combinations_lock:
            self._combinations[key] = combination
            self._combinations.move_to_end(key)
            while len(self._combinations) > MAX_COMBINATIONS:
                forgotten, _ = self._combinations.popitem(last=False)
                self._built_from.pop(forgotten, None)
        return key

    def _is_combination(self, adapter_id: str) -> bool:
        return adapter_id in self._combinations

    def _derived_origin(self, adapter_id: str) -> Literal["combination", "probe"] | None:
        if self._is_combination(adapter_id):
            return "combination"
        return "probe" if adapter_id.startswith(_PROBE_PREFIX) else None

    def _combinations_using(self, adapter_id: str) -> list[str]:
        with self._combinations_lock:
            return [key for key, combination in self._combinations.items() if adapter_id in combination.adapter_ids]

    def _stale_combinations(self, versions: Mapping[str, str | None], complete: bool) -> list[str]:
        """Combinations built from a store part whose serving version is no longer the one they used
        (local parts change through `update`)."""
        with self._combinations_lock:
            built = list(self._built_from.items())
        changed = lambda part, version: (  # noqa: E731
            part not in self._local_folders and (complete or part in versions) and versions.get(part) != version)
        return [key for key, parts in built if any(changed(part, version) for part, version in parts.items())]

    def _drop_combinations_using(self, adapter_id: str) -> None:
        for key in self._combinations_using(adapter_id):
            self._drop(key)

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
        stale = self._stale_combinations(versions, complete)
        if stale:
            self._loop.call(lambda: [self._drop(key) for key in stale])
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
            entry = self._checked_entry(adapter_id, checkpoint, fetched, scanned=True)  # SwapValidationError: kept out
            self.host_cache.put(adapter_id, entry.value, entry.version)
            self._loop.call(lambda: self._drop_combinations_using(adapter_id))
            self._loop.wake()
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

    def update(self, adapter_id: str, checkpoint: LoraCheckpoint, version: str, *, check_values: bool = True) -> None:
        """A (new) version into the host cache, and once it returns, a warm adapter's slot holds it
        (validated; refused input changes nothing): the old
        version's slot is rewritten in place when no request holds it (else running requests
        finish on it and the next one admitted takes the new version into another slot)."""
        prepared = self.slot_model.prepare(checkpoint, check_values=check_values)

        def swap_in() -> None:
            new_key = slot_key(adapter_id, version)
            if new_key in self.pool:
                self.host_cache.put(adapter_id, prepared, version)
                return
            for key in self._keys_of(adapter_id):
                if not self.pool.in_use(key):
                    slot = self.pool.rename(key, new_key)
                    self._retiring.discard(key)
                    try:
                        self._write(new_key, slot, prepared)
                    except BaseException:
                        self.pool.discard(new_key, force=True)
                        raise
                    break
            self.host_cache.put(adapter_id, prepared, version)
            self._retire_versions(adapter_id, keep=new_key)
            self._drop_combinations_using(adapter_id)

        self._loop.call(swap_in)

    def delete(self, adapter_id: str, missing_ok: bool = False) -> None:
        """Forget an adapter: its slot is zeroed and freed, queued requests for it fail with 404."""

        def delete_now() -> None:
            if not self.knows(adapter_id) and not missing_ok:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
            self._drop(adapter_id)
            self._drop_combinations_using(adapter_id)
            self._local_folders.pop(adapter_id, None)
            with self._reports_lock:
                self._reports.pop(adapter_id, None)
            self._loop.fail_waiting(adapter_id, AdapterNotFoundError(f"adapter {adapter_id!r} was deleted"))

        self._loop.call(delete_now)

    def evict(self, adapter_id: str) -> None:
        """Out of its slots (once no request holds them) and the host cache; it stays registered
        and loads again on its next use."""
        self._loop.call(lambda: self._drop(adapter_id))

    def warm(self, adapter_id: str, pin: bool = False) -> int:
        """Load an adapter into a slot now (and pin it); returns the slot."""
        entry = self.host_entry(adapter_id)

        def load() -> int:
            slot, key = self.acquire(adapter_id, entry)
            try:
                if pin:
                    self.pool.pin(key)
            finally:
                self.release(key)
            return slot

        return self._loop.call(load)

    def unpin(self, adapter_id: str) -> None:
        def unpin_now() -> None:
            for key in self._keys_of(adapter_id):
                self.pool.unpin(key)

        self._loop.call(unpin_now)

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
        combination = self._combinations.get(adapter_id)
        if combination is not None:
            return self._build_combination(adapter_id, combination)
        if adapter_id.startswith(_PROBE_PREFIX):  # a probe's copy is put in the cache, never loaded
            raise SwapValidationError(f"{adapter_id} did not land intact: the version is rejected")
        deadline_s = time.monotonic() + REJECTED_WAIT_S
        while True:
            checkpoint, version, scanned = self._checkpoint(adapter_id)
            if slot_key(adapter_id, version) not in self._rejected:
                try:
                    return self._checked_entry(adapter_id, checkpoint, version, scanned)
                except SwapValidationError:
                    if adapter_id in self._local_folders:
                        raise
            if adapter_id in self._local_folders or time.monotonic() > deadline_s:
                raise SwapValidationError(
                    f"version {version} of {adapter_id!r} failed validation here and no other version is served yet")
            time.sleep(0.1)  # the store has been told: it serves the previous good version shortly

    def _checked_entry(self, adapter_id: str, checkpoint: LoraCheckpoint, version: str,
                       scanned: bool) -> CacheEntry[PreparedAdapter]:
        """The prepared version, after its probe (if it has one) answered right on a temporary
        slot; SwapValidationError (reported) otherwise."""
        prepared = self.slot_model.prepare(checkpoint, check_values=not scanned)
        probe, key = checkpoint.probe, slot_key(adapter_id, version)
        if probe is not None and self.prober is not None and key not in self._probed:
            try:
                answer = self.prober(f"{_PROBE_PREFIX}{adapter_id}#{version}", prepared, probe)
            except LoraServeError:
                if key in self._rejected:  # its slot check failed on the probe's slot (reported there)
                    raise SwapValidationError(f"version {version} of {adapter_id!r} did not land intact") from None
                raise
            if not answer.strip().startswith(probe.expected.strip()):
                self._reject(adapter_id, version, f"probe answered {answer[:80]!r}, expected {probe.expected[:80]!r}")
                raise SwapValidationError(f"version {version} of {adapter_id!r} failed its probe")
            _remember(self._probed, key)
            self._note(adapter_id, validation="ok")
        return CacheEntry(prepared, version)

    def _reject(self, adapter_id: str, version: str, reason: str) -> None:
        """Never serve this version here again, and tell the store."""
        _remember(self._rejected, slot_key(adapter_id, version))
        if self.host_cache.versions().get(adapter_id) == version:
            self.host_cache.invalidate(adapter_id)
        self._note(adapter_id, validation=f"version {version} rejected: {reason}")
        logger.error("%s: version %s rejected after its swap: %s", adapter_id, version, reason)
        if self.on_rejected is not None and adapter_id not in self._local_folders:
            self.on_rejected(adapter_id, version, reason)

    def _checkpoint(self, adapter_id: str) -> tuple[LoraCheckpoint, str, bool]:
        """(checkpoint, version, whether its values were already scanned) from its folder or the store."""
        folder = self._local_folders.get(adapter_id)
        if folder is not None:
            checkpoint = read_checkpoint(folder, max_size_bytes=self._max_adapter_bytes)
            return checkpoint, checkpoint.version, False
        if self._resolver is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
        checkpoint, version = self._resolver(adapter_id)
        return checkpoint, version, True  # value-scanned by the store

    def _build_combination(self, key: str, combination: Combination) -> CacheEntry[PreparedAdapter]:
        parts, recipe = [], []
        for part in combination.parts:
            checkpoint, version, scanned = self._checkpoint(part.adapter_id)
            validate_checkpoint(checkpoint, self.slot_model.geometry, check_values=not scanned)  # each part fits alone
            parts.append((checkpoint, part.weight))
            recipe.append((part.adapter_id, version, part.weight))
        version = combination_version(recipe)
        combined = combine_checkpoints(parts, self.slot_model.max_rank, version)
        prepared = self.slot_model.prepare(combined.checkpoint, check_values=False)
        with self._combinations_lock:
            self._built_from[key] = {adapter_id: part_version for adapter_id, part_version, _ in recipe}
        logger.info("combination %s of %s built (%s)", key, list(combination.adapter_ids), combined.kind)
        return CacheEntry(dataclasses.replace(prepared, combination=combined.kind), version)

    # ---- slots (loop thread) ----------------------------------------------------------------------

    def acquire(self, adapter_id: str, entry: CacheEntry[PreparedAdapter]) -> tuple[int, str]:
        """Loop thread: hold a slot with `entry`'s version for one request, writing the weights in
        on a miss; returns (slot, key) and the caller gives the key back with `release` when the
        request ends. SlotsExhaustedError when every slot is held or pinned."""
        key = slot_key(adapter_id, entry.version)
        self._retiring.discard(key)
        assignment = self.pool.acquire(key)
        if assignment.evicted is not None:
            self._retiring.discard(assignment.evicted)
        if not assignment.hit:
            try:
                self._write(key, assignment.slot, entry.value)
            except BaseException:
                self.pool.discard(key, force=True)
                raise
            self._retire_versions(adapter_id, keep=key)
        return assignment.slot, key

    def release(self, key: str) -> None:
        """Loop thread: give back what `acquire` took; a retired version's slot is freed (zeroed)
        when its last request ends. A no-op for a key that is gone."""
        if key not in self.pool:
            return
        self.pool.release(key)
        if key in self._retiring and not self.pool.in_use(key):
            self._free(key)

    def _write(self, key: str, slot: int, prepared: PreparedAdapter) -> None:
        """Copy into the slot; the first landing of a version here is checked before any row runs
        on it (a mismatch zeroes the slot, rejects the version and raises SwapValidationError)."""
        swap_ms = self.slot_model.write_slot(slot, prepared)
        self.pool.record_swap(swap_ms)
        if self.swap_observer is not None:
            self.swap_observer(swap_ms)
        adapter_id, version = _split(key)
        if adapter_id.startswith(_PROBE_PREFIX):  # a probe's temporary copy: `probe:<adapter id>#<version>`
            adapter_id, _, version = adapter_id.removeprefix(_PROBE_PREFIX).partition("#")
        self._note(adapter_id, last_swap_ms=swap_ms)
        if key in self._validated:
            return
        problem = self.slot_model.check_slot(slot, prepared)
        if problem is not None:
            self.slot_model.clear_slot(slot)
            if self._derived_origin(_split(key)[0]) == "probe":
                self.host_cache.invalidate(_split(key)[0])  # the probe's request then fails: nothing to retry
            self._reject(adapter_id, version, f"slot check failed: {problem}")
            raise SwapValidationError(f"version {version} of {adapter_id!r} did not land intact in slot {slot}")
        _remember(self._validated, key)
        if self._derived_origin(_split(key)[0]) is None:
            self._note(adapter_id, validation="ok")

    def _keys_of(self, adapter_id: str) -> list[str]:
        return [key for key in self.pool.slots() if _split(key)[0] == adapter_id]

    def _retire_versions(self, adapter_id: str, keep: str) -> None:
        """Every other version of the adapter: freed now if idle, else when its last request ends.
        A pin moves to the kept version."""
        pinned = set(self.pool.snapshot().pinned)
        for key in self._keys_of(adapter_id):
            if key == keep:
                continue
            if key in pinned:
                self.pool.unpin(key)
                self.pool.pin(keep)
            if self.pool.in_use(key):
                self._retiring.add(key)
            else:
                self._free(key)

    def _free(self, key: str) -> None:
        slot = self.pool.discard(key)
        if slot is not None:
            self.slot_model.clear_slot(slot)
        self._retiring.discard(key)

    def _drop(self, adapter_id: str) -> None:
        self.host_cache.invalidate(adapter_id)
        for key in self._keys_of(adapter_id):
            self.pool.unpin(key)
            if self.pool.in_use(key):
                self._retiring.add(key)  # its running requests finish first
            else:
                self._free(key)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

