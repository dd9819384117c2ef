"""AdapterSyncer: the adapter store's logic, without Ray.

It watches sources (`SourceSpec`: a root of `<tenant>/<name>/` folders, or one adapter's folder),
and on each sync of a source: registers new ids, downloads changed versions in parallel, validates
them with the engine's own checks (`read_checkpoint` + `validate_checkpoint` against the replicas'
`SlotGeometry`), keeps a validated copy of each serving version under `<root>/versions/`, and marks
ids that left the source deleted. It returns `AdapterChange`s for the store to broadcast.

Invariants:
  - A refused version is recorded with its reason and the previous good version keeps serving;
    a source that cannot be reached changes nothing (the source is "degraded", and is retried
    with exponential backoff up to `max_backoff_s`).
  - The registry and the watched sources live in one manifest (`<root>/manifest.json`), saved
    atomically after every change: a restarted store starts from exactly what was recorded. A
    version folder is removed only after a manifest that no longer names it is saved.
  - One bad adapter never stops a sync: any exception while reading or validating it rejects
    that adapter (the reason recorded) and the others go on.
  - A listing that loses more than `max_loss_share` of a source's adapters at once (an empty
    listing, an unmounted folder, a copy in progress) is held as suspect: nothing is deleted and
    they keep serving until the next listing confirms the same loss.
  - A disabled adapter is still synced and validated, but serves nothing (`serving_versions`
    leaves it out, `serving_checkpoint` refuses it with 409) until it is enabled.
  - One adapter id has one owner: the first source that listed it, or an explicit registration
    (which takes it over from a root). An admin delete of an id that a root still lists puts it
    on that root's `excluded` list, so the next sync does not bring it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

from adapters_store.merge_spec import MERGE_RECIPE_FILE, MergeSpec
from adapters_store.merging import merge_adapters
from adapters_store.registry import (
    AdapterConfigSummary,
    AdapterRecord,
    AdapterVersion,
    Clock,
    Fallback,
    Manifest,
    Registry,
    SourceSpec,
    load_manifest,
    save_manifest,
    utc_now,
)
from adapters_store.sources import AdapterSource, RetryPolicy, source_for_uri, source_options
from adapters_store.sources.base import FetchOutcome, RemoteAdapter
from lora_core.adapter_ids import LocalUri, adapter_dir, parse_source_uri, validate_adapter_id
from lora_core.changes import AdapterChange
from lora_core.checkpoint import LoraCheckpoint, read_checkpoint, validate_checkpoint
from lora_core.errors import (
    AdapterDisabledError,
    AdapterExistsError,
    AdapterNotFoundError,
    InvalidAdapterError,
    InvalidRequestError,
    LoraServeError,
    SourceError,
    SourceRefusedError,
    SourceUnavailableError,
)
from lora_core.files import publish_folder
from lora_core.geometry import SlotGeometry
from lora_core.peft_files import ADAPTER_CONFIG_FILE
from lora_core.settings import SourceInput, StoreConfig

__all__ = ["AdapterSyncer", "SyncReport"]

logger = logging.getLogger("adapters_store.syncer")

MERGED_FOLDER = "merged"
"""Under the store's root: named merges, `<tenant>/<name>/`, each registered as its own source."""

STORE_RETRY = RetryPolicy(max_attempts=3, base_delay_s=0.2, max_delay_s=2.0, total_timeout_s=5.0)


@dataclass
class SourceHealth:
    failures: int = 0
    last_error: Optional[str] = None
    last_success_at: Optional[datetime] = None
    next_attempt_s: float = 0.0  # monotonic clock


@dataclass
class SyncReport:
    registered: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # source key -> why (unreachable or refused)
    source_errors: dict[str, SourceError] = field(default_factory=dict)  # the same, typed
    skipped: dict[str, str] = field(default_factory=dict)  # where -> why (bad ids, owner conflicts)
    suspect: dict[str, list[str]] = field(default_factory=dict)  # source key -> ids its listing lost, held
    changes: list[AdapterChange] = field(default_factory=list)
    duration_s: float = 0.0

    def to_dict(self) -> dict:
        return {
            "registered": self.registered, "updated": self.updated, "rejected": self.rejected,
            "deleted": self.deleted, "unavailable": self.unavailable, "skipped": self.skipped,
            "suspect": self.suspect,
            "duration_s": round(self.duration_s, 3),
        }


def _version_folder_name(version: str) -> str:
    return hashlib.sha256(version.encode()).hexdigest()[:24]


def is_suspect_loss(listed_before: int, lost: int, max_loss_share: float) -> bool:
    """A listing that lost more than `max_loss_share` of what the source listed before."""
    return lost > 0 and lost > max_loss_share * listed_before


def _as_invalid(error: Exception) -> InvalidAdapterError:
    """Any failure to read or check one checkpoint, as the rejection it leads to."""
    if isinstance(error, InvalidAdapterError):
        return error
    return InvalidAdapterError(f"the checkpoint cannot be read: {type(error).__name__}: {error}", "unreadable")


class AdapterSyncer:
    """Thread-safe. `_sync_lock` runs one sync (or registration, or merge) at a time; `_lock`
    guards the state and is not held across a listing or a download, so a delete, a pin or a
    status waits for no download. A merge is the exception: it holds `_lock` while it reads its
    inputs' copies and registers the result, so none of them is deleted under it. Reads take the
    registry's own lock. Callers (the store actor) use these methods, never `registry` itself."""

    def __init__(
        self,
        config: StoreConfig,
        geometry: SlotGeometry,
        *,
        clock: Clock = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        source_factory: Callable[..., AdapterSource] = source_for_uri,
    ) -> None:
        self.config = config
        self.geometry = geometry
        self.root = config.resolved_root()
        self.manifest_path = self.root / "manifest.json"
        self._versions_root = self.root / "versions"
        self._staging_root = self.root / "staging"
        self._monotonic = monotonic
        self._source_factory = source_factory
        self._sync_lock = threading.RLock()  # always taken before `_lock`, never after
        self._lock = threading.RLock()
        manifest = load_manifest(self.manifest_path)
        self.registry = Registry(manifest, clock, keep_versions=config.keep_versions)
        self._specs: dict[str, SourceSpec] = {spec.key: spec for spec in manifest.sources}
        for source in config.sources:
            spec = SourceSpec.of(source)
            self._specs.setdefault(spec.key, spec)
        self._sources: dict[str, AdapterSource] = {}
        self._health: dict[str, SourceHealth] = {key: SourceHealth() for key in self._specs}
        self._suspect: dict[str, frozenset[str]] = {}  # source key -> the ids its last listing lost, held
        self._doomed: list[Path] = []  # version folders to remove once the manifest is saved
        shutil.rmtree(self._staging_root, ignore_errors=True)
        self._save()

    # ---- what the store asks ----------------------------------------------------------------

    def sources(self) -> list[SourceSpec]:
        with self._lock:
            return list(self._specs.values())

    # Reads go through the registry's own lock, not the syncer's: each is a consistent copy, and
    # none waits for a sync in progress (one that downloads can hold the syncer's lock for seconds).

    def records(self, tenant: Optional[str] = None, include_deleted: bool = False) -> list[AdapterRecord]:
        """The registry's records (see `Registry.list`)."""
        return self.registry.list(tenant=tenant, include_deleted=include_deleted)

    def record(self, adapter_id: str, tenant: Optional[str] = None, include_deleted: bool = False) -> AdapterRecord:
        """One record (see `Registry.get`: AdapterNotFoundError when unknown or not visible)."""
        return self.registry.get(adapter_id, tenant=tenant, include_deleted=include_deleted)

    def adapter_count(self) -> int:
        return len(self.registry)

    def serving_version(self, adapter_id: str) -> Optional[str]:
        """The version one adapter's requests run on, or None (unknown, deleted, disabled or
        nothing valid)."""
        try:
            record = self.registry.get(adapter_id, include_deleted=True)
        except AdapterNotFoundError:
            return None
        return record.served.version if record.served is not None else None

    def serving_versions(self) -> dict[str, str]:
        """adapter id -> the version requests run on, for every adapter served now (not disabled)."""
        with self._lock:
            return {r.adapter_id: r.served.version for r in self.registry.list() if r.served is not None}

    def disabled_adapters(self) -> dict[str, Fallback]:
        """adapter id -> what its requests get, for every disabled adapter."""
        return {r.adapter_id: r.disabled.fallback for r in self.registry.list() if r.disabled is not None}

    def due(self) -> list[str]:
        """Keys of the sources whose next sync time has come."""
        now = self._monotonic()
        with self._lock:
            return [key for key in self._specs if self._health[key].next_attempt_s <= now]

    def next_due_in_s(self) -> float:
        now = self._monotonic()
        with self._lock:
            times = [health.next_attempt_s for health in self._health.values()]
        return max(0.0, min(times) - now) if times else self.config.sync_interval_s

    def status(self) -> dict:
        with self._lock:
            sources = []
            for key, spec in self._specs.items():
                health = self._health[key]
                sources.append({
                    "uri": spec.uri, "adapter_id": spec.adapter_id, "adapters": len(spec.adapters),
                    "reachable": health.failures == 0, "failures": health.failures,
                    "suspect_missing": len(self._suspect.get(key, ())),
                    "last_error": health.last_error,
                    "last_success_at": health.last_success_at.isoformat() if health.last_success_at else None,
                })
            degraded = any(not s["reachable"] or s["suspect_missing"] for s in sources)
            return {
                "status": "degraded" if degraded else "ok",
                "adapters": len(self.registry),
                "serving": sum(1 for r in self.registry.list() if r.serving is not None),
                "sync_interval_s": self.config.sync_interval_s,
                "sources": sources,
            }

    # ---- changes ----------------------------------------------------------------------------

    def apply_config(self, config: StoreConfig) -> list[str]:
        """A `serve deploy` changed the store's settings: apply them to this running syncer and
        return the fields that changed. Sources it does not watch yet are watched (none is
        dropped: an admin may have added it); the root cannot change here (the store actor is
        replaced instead, `store.get_or_create_store`)."""
        if config.resolved_root() != self.root:
            raise InvalidRequestError(f"the store's root is {self.root}; a new root needs a new store actor")
        with self._lock:
            changed = [name for name in StoreConfig.model_fields if getattr(config, name) != getattr(self.config, name)]
            for source in config.sources:
                spec = SourceSpec.of(source)
                if spec.key not in self._specs:
                    self._specs[spec.key] = spec
                    self._health[spec.key] = SourceHealth()
            self.config = config
            self.registry.keep_versions = config.keep_versions
            for health in self._health.values():  # a shorter interval takes effect now, not after the old one
                health.next_attempt_s = min(health.next_attempt_s, self._monotonic() + config.sync_interval_s)
            self._save()
        if changed:
            logger.info("store settings changed: %s", ", ".join(changed))
        return changed

    def add_source(self, source: SourceInput) -> tuple[SourceSpec, SyncReport]:
        """Watch a new source and sync it now. An unreachable source is refused (nothing kept)."""
        spec = SourceSpec.of(source)
        with self._sync_lock:
            with self._lock:
                known = spec.key in self._specs
                if not known:
                    self._source_for(spec)  # unknown options fail here, before anything is kept
                    self._specs[spec.key] = spec
                    self._health[spec.key] = SourceHealth()
            report = self.sync([spec.key])
            with self._lock:
                if not known and spec.key in report.source_errors:
                    self._forget_spec(spec.key)
                    raise _about(spec, report.source_errors[spec.key])
                return self._specs.get(spec.key, spec), report

    def register(self, adapter_id: str, uri: str, options: Optional[dict[str, Any]] = None) -> tuple[AdapterRecord, SyncReport]:
        """Serve the adapter in the folder at `uri` as `adapter_id`: fetched and validated now.

        Refused input (bad id or URI, unreachable source, no adapter there) registers nothing;
        a checkpoint that fails validation is recorded as rejected (HTTP callers get 422)."""
        adapter_id = validate_adapter_id(adapter_id)
        spec = SourceSpec.of(SourceInput(uri=uri, adapter_id=adapter_id, options=options or {}))
        with self._sync_lock:
            with self._lock:
                source = self._source_for(spec)
            listing = source.list_adapters()
            if adapter_id not in listing:
                skipped = "; ".join(getattr(source, "skipped", {}).values())  # e.g. a file linking out
                raise InvalidAdapterError(f"{spec.uri} holds no adapter files" + (f" ({skipped})" if skipped else ""),
                                          "missing_file")
            with self._lock:
                self._release(adapter_id, keep=spec.key)  # registered again from elsewhere: the new place wins
                self._specs[spec.key] = spec
                self._health.setdefault(spec.key, SourceHealth())
            report = self.sync([spec.key], force=True)
            if spec.key in report.source_errors:
                raise _about(spec, report.source_errors[spec.key])
            return self.registry.get(adapter_id), report

    def delete(self, adapter_id: str) -> list[AdapterChange]:
        adapter_id = validate_adapter_id(adapter_id)
        with self._lock:
            record = self.registry.get(adapter_id)
            self.registry.mark_deleted(adapter_id)
            self._release(adapter_id)
            self._doomed.append(adapter_dir(self._versions_root, adapter_id))
            if record.merge_recipe is not None:  # the merge's own files: nothing else reads them
                self._remove_merged(record)
            self._save()
            logger.info("deleted adapter %s (was %s)", adapter_id, record.status)
            return [AdapterChange(adapter_id, None)]

    def pin(self, adapter_id: str, replicas: int) -> AdapterRecord:
        """Keep the adapter warm on `replicas` replicas (0: unpin); replicas hear of it when they poll."""
        with self._lock:
            record = self.registry.set_pin(adapter_id, replicas)
            self._save()
            return record

    def pins(self) -> dict[str, int]:
        """adapter id -> replicas it is pinned on, for every pinned adapter served now: the
        larger of its admin pin and the config's `pins`."""
        configured = self.config.pins
        pins = {r.adapter_id: max(r.pin_replicas or 0, configured.get(r.adapter_id, 0))
                for r in self.registry.list() if r.served is not None}
        return {adapter_id: replicas for adapter_id, replicas in pins.items() if replicas}

    def disable(self, adapter_id: str, fallback: Fallback = "none") -> tuple[AdapterRecord, list[AdapterChange]]:
        """Stop serving an adapter but keep it registered; replicas drop it from their slots."""
        with self._lock:
            before = self.registry.get(adapter_id)
            record = self.registry.set_disabled(adapter_id, fallback)
            self._save()
            if before.served is None:
                return record, []
            logger.info("disabled adapter %s (fallback %s)", adapter_id, fallback)
            return record, [AdapterChange(record.adapter_id, None)]

    def enable(self, adapter_id: str) -> tuple[AdapterRecord, list[AdapterChange]]:
        with self._lock:
            before = self.registry.get(adapter_id)
            record = self.registry.set_disabled(adapter_id, None)
            self._save()
            if before.disabled is None or record.served is None:
                return record, []
            logger.info("enabled adapter %s", adapter_id)
            return record, [self._served_change(record)]

    def report_rejected(self, adapter_id: str, version: str, reason: str) -> list[AdapterChange]:
        """A replica found `version` bad after it landed (`reason`): reject it, and if it was
        serving, serve the previous good version. A report about a version no longer serving
        (another replica reported it first) changes nothing."""
        with self._lock:
            record = self.registry.get(adapter_id)
            if record.serving is None or record.serving.version != version:
                return []
            record = self.registry.record_rejected(adapter_id, version, reason, "swap_validation",
                                                   sha256=record.serving.sha256, size_bytes=record.serving.size_bytes)
            self._save()
            return [self._served_change(record)]

    def rollback(self, adapter_id: str) -> tuple[AdapterRecord, list[AdapterChange]]:
        """Serve the previous good version again; InvalidRequestError when there is none."""
        with self._lock:
            record = self.registry.roll_back(adapter_id)
            self._save()
            logger.info("adapter %s rolled back to version %s", adapter_id, record.serving.version)
            return record, [self._served_change(record)]

    @staticmethod
    def _served_change(record: AdapterRecord) -> AdapterChange:
        return AdapterChange(record.adapter_id, record.served.version if record.served is not None else None)

    def sync(self, keys: Optional[list[str]] = None, force: bool = False) -> SyncReport:
        """Sync the given sources (default: all). `force` re-downloads versions already seen."""
        started = time.monotonic()
        report = SyncReport()
        with self._sync_lock:
            with self._lock:
                keys = list(keys if keys is not None else self._specs)
            for key in keys:
                with self._lock:
                    spec = self._specs.get(key)
                if spec is None:
                    continue
                attempt_s = self._monotonic()
                try:
                    self._sync_spec(spec, force, report)
                except SourceError as error:  # refused too: a bucket or a permission may come later
                    with self._lock:
                        self._record_failure(spec, error, report)
                else:
                    with self._lock:
                        health = self._health.get(key, SourceHealth())  # a delete may have dropped it
                        if health.failures:
                            logger.info("source %s reachable again", spec.uri)
                        health.failures, health.last_error = 0, None
                        health.last_success_at = utc_now()
                        # a fixed rate: a slow sync (downloads) does not push the next one back
                        health.next_attempt_s = max(self._monotonic(), attempt_s + self.config.sync_interval_s)
            with self._lock:
                self._save()
        report.duration_s = time.monotonic() - started
        return report

    def _record_failure(self, spec: SourceSpec, error: SourceError, report: SyncReport) -> None:
        health = self._health.get(spec.key, SourceHealth())
        health.failures += 1
        health.last_error = str(error)
        delay = min(self.config.max_backoff_s, self.config.sync_interval_s * 2 ** (health.failures - 1))
        health.next_attempt_s = self._monotonic() + delay
        report.unavailable[spec.key] = str(error)
        report.source_errors[spec.key] = error
        logger.warning("source %s %s (%d in a row), retry in %.1f s: %s", spec.uri,
                       "refused" if isinstance(error, SourceRefusedError) else "unavailable",
                       health.failures, delay, error)

    # ---- serving ----------------------------------------------------------------------------

    def serving_checkpoint(self, adapter_id: str) -> tuple[str, dict, LoraCheckpoint]:
        """(version, adapter_config.json, checkpoint) of the serving version, from the validated
        copy; a missing copy (a store moved to another node) is fetched again first."""
        version, folder = self._serving_copy(adapter_id)
        with self._lock:
            try:
                checkpoint = read_checkpoint(folder, max_size_bytes=self.geometry.max_size_bytes)
            except FileNotFoundError:  # deleted or replaced since
                raise SourceUnavailableError(f"the stored copy of {adapter_id!r} changed; retry shortly") from None
            if checkpoint.sha256 != version.sha256:
                raise SourceUnavailableError(f"the stored copy of {adapter_id!r} does not match its recorded sha256")
            config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
            return version.version, config, checkpoint

    def merge(self, spec: MergeSpec) -> tuple[AdapterRecord, SyncReport]:
        """Build `spec.name` from the serving versions of `spec.adapters` (PEFT's merge, see
        `merging`), write it with its recipe to `<merged_uri>/<tenant>/<name>/` (a local folder,
        default `<root>/merged`, or S3), and register it like any adapter folder; the record
        keeps the recipe. Unknown inputs: 404; a disabled one: 409; a name already registered: 409."""
        with self._sync_lock, self._lock:
            try:
                self.registry.get(spec.name)
            except AdapterNotFoundError:
                pass
            else:
                raise AdapterExistsError(f"adapter {spec.name!r} already exists; delete it first or pick another name")
            folders = [self._serving_copy(item.id)[1] for item in spec.adapters]
            ranks = [read_checkpoint(folder, max_size_bytes=self.geometry.max_size_bytes).max_rank for folder in folders]

            def write(folder: Path) -> None:
                with tempfile.TemporaryDirectory(prefix=".merge-", dir=self.root) as scratch:
                    merged = merge_adapters(spec, folders, ranks, self.geometry, Path(scratch))
                    for file in merged.folder.iterdir():
                        shutil.copy2(file, folder / file.name)
                (folder / MERGE_RECIPE_FILE).write_text(spec.model_dump_json(indent=2))

            merged_uri = self.config.merged_uri
            if merged_uri is not None and merged_uri.startswith("s3://"):
                with tempfile.TemporaryDirectory(prefix=".merge-", dir=self.root) as scratch:
                    write(Path(scratch))
                    uri = self._merge_target().upload_adapter(spec.name, Path(scratch))
                options = dict(self.config.merged_options)
            else:
                destination = adapter_dir(Path(merged_uri) if merged_uri else self.root / MERGED_FOLDER, spec.name)
                shutil.rmtree(destination, ignore_errors=True)  # a leftover of a merge deleted since
                publish_folder(destination, write)
                uri, options = str(destination), {}
            logger.info("merged %s from %s (%s) into %s", spec.name, [i.id for i in spec.adapters],
                        spec.combination_type, uri)
            _, report = self.register(spec.name, uri, options)
            record = self.registry.set_recipe(spec.name, spec)
            self._save()
            return record, report

    def _merge_target(self) -> Any:
        """The S3 source named merges are uploaded to (`merged_uri`, with `merged_options`)."""
        return self._source_factory(self.config.merged_uri, **self.config.merged_options)

    def _remove_merged(self, record: AdapterRecord) -> None:
        where = parse_source_uri(record.source_uri)
        if isinstance(where, LocalUri):
            shutil.rmtree(where.path, ignore_errors=True)
            return
        try:
            self._merge_target().delete_adapter(record.adapter_id)
        except SourceError as error:
            logger.warning("could not remove the merged files of %s: %s", record.adapter_id, error)

    def _serving_copy(self, adapter_id: str) -> tuple[AdapterVersion, Path]:
        """(the serving version's record, its validated local copy), fetched again if missing
        (outside `_lock` unless the caller holds it)."""
        with self._lock:
            record, folder = self._serving_record(adapter_id)
            if folder.is_dir():
                return record.serving, folder
            owner = self._owner(adapter_id)
            if owner is None:
                raise SourceUnavailableError(f"the stored copy of {adapter_id!r} is gone and it has no source")
            self._health[owner.key].next_attempt_s = 0.0
        self._fetch_serving_again(record, owner.options)
        with self._lock:
            record, folder = self._serving_record(adapter_id)
            if not folder.is_dir():
                raise SourceUnavailableError(f"the stored copy of {adapter_id!r} changed; retry shortly")
            return record.serving, folder

    def _serving_record(self, adapter_id: str) -> tuple[AdapterRecord, Path]:
        record = self.registry.get(adapter_id)
        if record.disabled is not None:
            raise AdapterDisabledError(f"adapter {adapter_id!r} is disabled")
        if record.serving is None:
            why = f": {record.current.reason}" if record.current is not None and record.current.reason else ""
            raise AdapterNotFoundError(f"adapter {adapter_id!r} has no valid version to serve{why}")
        return record, self._version_folder(adapter_id, record.serving.version)

    def _fetch_serving_again(self, record: AdapterRecord, options: dict[str, Any]) -> None:
        """Fetch the serving version's copy (gone: a store moved to another node) from its own
        location only, never a whole root, into its own staging folder (a sync may be fetching
        the same adapter). A source that now holds another version gets its next sync at once,
        which registers and announces it; this caller gets 503. The message names only this
        adapter: a tenant reads it."""
        adapter_id, version = record.adapter_id, record.serving.version
        retry = f"the stored copy of {adapter_id!r} is being fetched again; retry shortly"
        self._staging_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".refetch-", dir=self._staging_root))
        try:
            try:
                source = self._build_source(record.source_uri, options, adapter_id)
                remote = source.list_adapters().get(adapter_id)
                if remote is None or remote.version != version:
                    raise SourceUnavailableError(f"{record.source_uri} holds another version than {version}")
                outcome = source.fetch_many([remote], staging, max_workers=1)
            except (LoraServeError, OSError) as error:
                logger.warning("could not fetch the serving copy of %s again: %s", adapter_id, error)
                raise SourceUnavailableError(retry) from None
            if adapter_id not in outcome.fetched:
                logger.warning("could not fetch the serving copy of %s again: %s", adapter_id,
                               outcome.failed.get(adapter_id))
                raise SourceUnavailableError(retry)
            folder = outcome.fetched[adapter_id]
            try:
                checkpoint = self._checked(folder)
                if checkpoint.sha256 != record.serving.sha256:
                    raise InvalidAdapterError("its files differ from the recorded sha256", "corrupt_file")
            except Exception as error:
                logger.warning("the serving copy of %s fetched again is refused: %s", adapter_id, error)
                raise SourceUnavailableError(retry) from None
            with self._lock:
                if self.serving_version(adapter_id) == version:  # not replaced or deleted meanwhile
                    self._keep_copy(adapter_id, version, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # ---- internals ----------------------------------------------------------------------------

    def _sync_spec(self, spec: SourceSpec, force: bool, report: SyncReport) -> None:
        """List and fetch without `_lock` (a delete or a pin meanwhile waits for no download);
        what changed meanwhile (the source forgotten, an adapter deleted or moved) wins."""
        with self._lock:
            source = self._source_for(spec)
        listing = source.list_adapters()
        if spec.adapter_id is not None:
            listing = {k: v for k, v in listing.items() if k == spec.adapter_id}
        with self._lock:
            for where, why in getattr(source, "skipped", {}).items():
                report.skipped[where] = why
            accepted, to_fetch = self._plan(spec.key, listing, force, report)
        outcome = source.fetch_many(to_fetch, self._staging_root, max_workers=self.config.fetch_workers)
        with self._lock:
            spec = self._specs.get(spec.key)
            accepted = {adapter_id: remote for adapter_id, remote in accepted.items()
                        if spec is not None and self._ours(spec, adapter_id)}
            for adapter_id, folder in outcome.fetched.items():
                if adapter_id not in accepted:
                    shutil.rmtree(folder, ignore_errors=True)
            if spec is not None:
                self._apply(spec, accepted, outcome, report)

    def _plan(self, key: str, listing: dict[str, RemoteAdapter], force: bool,
              report: SyncReport) -> tuple[dict[str, RemoteAdapter], list[RemoteAdapter]]:
        """(the listed adapters this source serves, those to download). Call with `_lock` held."""
        spec = self._specs.get(key)
        if spec is None:
            return {}, []
        accepted: dict[str, RemoteAdapter] = {}
        for adapter_id, remote in sorted(listing.items()):
            if adapter_id in spec.excluded:
                continue
            owner = self._owner(adapter_id)
            if owner is not None and owner.key != spec.key:
                report.skipped[remote.location] = f"{adapter_id} is already served from {owner.uri}"
                continue
            accepted[adapter_id] = remote
        to_fetch = []
        for adapter_id, remote in accepted.items():
            known = adapter_id in self.registry
            record = self.registry.register(adapter_id, remote.location)
            if not known:
                report.registered.append(adapter_id)
            current = record.current
            if force or current is None or current.version != remote.version:
                to_fetch.append(remote)
        return accepted, to_fetch

    def _ours(self, spec: SourceSpec, adapter_id: str) -> bool:
        owner = self._owner(adapter_id)
        return adapter_id not in spec.excluded and (owner is None or owner.key == spec.key)

    def _apply(self, spec: SourceSpec, accepted: dict[str, RemoteAdapter], outcome: FetchOutcome,
               report: SyncReport) -> None:
        """Record what a listing and its downloads found. Call with `_lock` held."""
        # A download that failed with anything but a checkpoint's fault is retried at the next
        # sync (backoff); it never stops the others.
        unavailable, retryable = [], False
        for adapter_id, error in sorted(outcome.failed.items()):
            if adapter_id not in accepted:
                continue
            if isinstance(error, InvalidAdapterError):
                self._reject(adapter_id, accepted[adapter_id].version, error, report)
            else:
                unavailable.append(f"{adapter_id}: {error}")
                retryable = retryable or not isinstance(error, SourceRefusedError)
        for adapter_id, folder in sorted(outcome.fetched.items()):
            if adapter_id in accepted:
                self._validate(adapter_id, accepted[adapter_id].version, folder, report)
        gone = sorted(set(spec.adapters) - set(accepted))
        held = self._hold_suspect_loss(spec, gone, report)
        for adapter_id in () if held else gone:
            owner = self._owner(adapter_id)
            if adapter_id in self.registry and owner is not None and owner.key == spec.key:
                self.registry.mark_deleted(adapter_id)
                self._doomed.append(adapter_dir(self._versions_root, adapter_id))
                report.deleted.append(adapter_id)
                report.changes.append(AdapterChange(adapter_id, None))
        listed = sorted({*accepted, *gone}) if held else sorted(accepted)
        self._specs[spec.key] = spec.model_copy(update={"adapters": listed})
        if unavailable:
            raise (SourceUnavailableError if retryable else SourceRefusedError)("; ".join(unavailable))

    def _checked(self, folder: Path) -> LoraCheckpoint:
        """The checkpoint in a fetched folder, read and validated against the slots."""
        checkpoint = read_checkpoint(folder, max_size_bytes=self.geometry.max_size_bytes)
        validate_checkpoint(checkpoint, self.geometry)
        return checkpoint

    def _keep_copy(self, adapter_id: str, version: str, folder: Path) -> None:
        """Move a checked folder to where that version's validated copy lives (replacing one)."""
        destination = self._version_folder(adapter_id, version)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(destination, ignore_errors=True)
        folder.rename(destination)

    def _hold_suspect_loss(self, spec: SourceSpec, gone: list[str], report: SyncReport) -> bool:
        """True while a mass loss waits for the next listing to confirm it (the same ids gone)."""
        lost = frozenset(gone)
        if not is_suspect_loss(len(spec.adapters), len(lost), self.config.max_loss_share):
            self._suspect.pop(spec.key, None)
            return False
        if self._suspect.get(spec.key) == lost:
            logger.warning("source %s: the loss of %d adapters is confirmed by a second listing", spec.uri, len(lost))
            self._suspect.pop(spec.key)
            return False
        self._suspect[spec.key] = lost
        report.suspect[spec.key] = sorted(lost)
        logger.warning("source %s lists %d of its %d adapters: held as suspect (nothing deleted) until the next "
                       "listing confirms it", spec.uri, len(spec.adapters) - len(lost), len(spec.adapters))
        return True

    def _validate(self, adapter_id: str, version: str, folder: Path, report: SyncReport) -> None:
        try:
            checkpoint = self._checked(folder)
            summary = AdapterConfigSummary.from_checkpoint(checkpoint)
        except Exception as error:  # one bad checkpoint rejects itself, never the rest of the sync
            if not isinstance(error, InvalidAdapterError):
                logger.exception("adapter %s: version %s could not be read", adapter_id, version)
            shutil.rmtree(folder, ignore_errors=True)
            self._reject(adapter_id, version, _as_invalid(error), report)
            return
        self._keep_copy(adapter_id, version, folder)
        before = self.registry.get(adapter_id).serving
        record = self.registry.record_ready(
            adapter_id, version, checkpoint.sha256, checkpoint.size_bytes, summary,
            probe=checkpoint.probe,
        )
        self._remove_unkept_versions(record)
        if before is None or before.version != version or before.sha256 != checkpoint.sha256:
            report.updated.append(adapter_id)
            if record.disabled is None:  # a disabled one is announced when enabled
                report.changes.append(AdapterChange(adapter_id, version))
            logger.info("adapter %s: version %s ready", adapter_id, version)

    def _reject(self, adapter_id: str, version: str, error: LoraServeError, report: SyncReport) -> None:
        before = self.registry.get(adapter_id).serving
        record = self.registry.record_rejected(adapter_id, version, str(error), getattr(error, "reason", None))
        report.rejected[adapter_id] = str(error)
        logger.warning("adapter %s: version %s rejected: %s", adapter_id, version, error)
        if before is not None and record.serving is None and record.disabled is None:
            report.changes.append(AdapterChange(adapter_id, None))

    def _remove_unkept_versions(self, record: AdapterRecord) -> None:
        """Version folders other than the serving one and the `previous` a rollback may need."""
        kept = {_version_folder_name(v.version) for v in [record.serving, *record.previous] if v is not None}
        folder = adapter_dir(self._versions_root, record.adapter_id)
        for old in folder.iterdir() if folder.is_dir() else ():
            if old.name not in kept:
                self._doomed.append(old)

    def _version_folder(self, adapter_id: str, version: str) -> Path:
        return adapter_dir(self._versions_root, adapter_id) / _version_folder_name(version)

    def _owner(self, adapter_id: str) -> Optional[SourceSpec]:
        single = next((s for s in self._specs.values() if s.adapter_id == adapter_id), None)
        if single is not None:
            return single
        return next((s for s in self._specs.values() if adapter_id in s.adapters), None)

    def _source_for(self, spec: SourceSpec) -> AdapterSource:
        source = self._sources.get(spec.key)
        if source is None:
            source = self._build_source(spec.uri, spec.options, spec.adapter_id)
            self._sources[spec.key] = source
        return source

    def _build_source(self, uri: str, spec_options: dict[str, Any], adapter_id: Optional[str]) -> AdapterSource:
        options: dict[str, Any] = dict(spec_options)
        scheme = uri.split("://", 1)[0] if "://" in uri else "file"
        accepted = source_options(scheme)
        if "retry" in accepted:
            options.setdefault("retry", STORE_RETRY)
        if "show_progress" in accepted:
            options.setdefault("show_progress", self.config.show_progress)
        if adapter_id is not None:
            options["adapter_id"] = adapter_id
        return self._source_factory(uri, **options)

    def _release(self, adapter_id: str, keep: Optional[str] = None) -> None:
        """No source but `keep` serves `adapter_id` any more: its single-adapter spec is dropped,
        and a root that lists it excludes it from now on."""
        for key, spec in list(self._specs.items()):
            if key == keep:
                continue
            if spec.adapter_id == adapter_id:
                self._forget_spec(key)
            elif adapter_id in spec.adapters:
                self._specs[key] = spec.model_copy(update={
                    "adapters": [a for a in spec.adapters if a != adapter_id],
                    "excluded": sorted({*spec.excluded, adapter_id}),
                })

    def _forget_spec(self, key: str) -> None:
        self._specs.pop(key, None)
        self._health.pop(key, None)
        self._sources.pop(key, None)

    def _save(self) -> None:
        """The manifest, then the version folders it no longer names (a crash in between leaves
        only unused folders, never a manifest pointing at nothing)."""
        manifest = Manifest(records=self.registry.to_manifest().records, sources=list(self._specs.values()))
        save_manifest(manifest, self.manifest_path)
        doomed, self._doomed = self._doomed, []
        for folder in doomed:
            shutil.rmtree(folder, ignore_errors=True)


def _about(spec: SourceSpec, error: SourceError) -> SourceError:
    """The same error type, saying which source it is about."""
    if isinstance(error, SourceRefusedError):
        return SourceRefusedError(f"{spec.uri} refused: {error}")
    return SourceUnavailableError(f"{spec.uri} cannot be reached: {error}")
