"""The adapter registry: what the store knows about every adapter, and its manifest on disk.

A record per adapter id holds its source URI, `current` (the newest version seen, good or bad) and
`serving` (the last version that passed validation, or None). The invariants:

* `serving`, when set, is a version whose status is "ready"; a rejected new version never moves it,
  so the previous good version keeps serving. `previous` holds the good versions before it,
  newest first (at most `keep_versions - 1`): rejecting the very version that serves (a replica's
  failed validation) or an admin's rollback moves `serving` back to `previous[0]` (with none
  left, nothing serves).
* A deleted record keeps `current` for the audit trail but serves nothing; `get` and `list` hide
  it unless asked. Registering the id again starts a fresh record.
* A disabled record keeps everything (new versions are still synced and validated) but nothing
  serves it until it is enabled: `serving` says what will serve then.
* Every timestamp is a timezone-aware UTC datetime from the registry's injected clock.

The manifest is JSON with a `format_version`. `save_manifest` writes it atomically (a temp file in
the same folder, fsync, `os.replace`, fsync of the folder) after copying the previous good manifest
to `<name>.bak`; `load_manifest` falls back to the `.bak` when the main file is corrupt (with a
warning) and refuses a newer format with ManifestVersionError: a store never resets itself
silently. Pure module: pydantic and the standard library, no Ray, no torch.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Iterable, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapters_store.merge_spec import MergeSpec
from lora_core.adapter_ids import AdapterId, parse_adapter_id, parse_source_uri, validate_adapter_id
from lora_core.errors import (
    AdapterNotFoundError,
    InvalidRequestError,
    LoraServeError,
    ManifestCorruptError,
    ManifestError,
    ManifestVersionError,
)
from lora_core.files import write_atomic
from lora_core.probe import AdapterProbe
from lora_core.settings import SourceInput

if TYPE_CHECKING:  # checkpoint.py imports torch; the registry must not
    from lora_core.checkpoint import LoraCheckpoint, PeftLoraConfig

__all__ = [
    "MANIFEST_FORMAT_VERSION",
    "AdapterConfigSummary",
    "AdapterRecord",
    "AdapterStatus",
    "AdapterVersion",
    "Clock",
    "Disabled",
    "Fallback",
    "Manifest",
    "ManifestCorruptError",
    "ManifestError",
    "ManifestVersionError",
    "Registry",
    "SourceSpec",
    "backup_path",
    "load_manifest",
    "manifest_from_bytes",
    "manifest_to_bytes",
    "save_manifest",
    "utc_now",
]

logger = logging.getLogger("adapters_store.registry")

MANIFEST_FORMAT_VERSION = 2
"""2: records carry `disabled`, `previous`, `pin_replicas` and `merge_recipe`, versions their `probe`. Format 1 files are read as
they are (nothing disabled, no earlier versions kept)."""

AdapterStatus = Literal["ready", "rejected", "deleted", "disabled"]
Fallback = Literal["none", "base"]
VersionStatus = Literal["ready", "rejected"]
Clock = Callable[[], datetime]


# --- models --------------------------------------------------------------------------------------


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _to_utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamps must be timezone-aware (the clock must return UTC datetimes)")
    return value.astimezone(timezone.utc)


UtcDatetime = Annotated[datetime, AfterValidator(_to_utc)]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class AdapterConfigSummary(BaseModel):
    """The five PEFT fields an operator needs to see, reduced at the edge from a PeftLoraConfig."""

    model_config = _FROZEN

    rank: int = Field(ge=1, description="the config's r (rank_pattern overrides are not summarised)")
    alpha: float = Field(gt=0, description="lora_alpha")
    target_modules: list[str] = Field(description="short module names the weights target, sorted, unique")
    use_rslora: bool = Field(default=False, description="scaling alpha/sqrt(r) instead of alpha/r")
    base_model_name: Optional[str] = Field(default=None, description="base_model_name_or_path, as written")

    @field_validator("target_modules")
    @classmethod
    def _sorted_unique(cls, value: list[str]) -> list[str]:
        return sorted(set(value))

    @classmethod
    def from_config(cls, config: "PeftLoraConfig", module_names: Iterable[str] = ()) -> "AdapterConfigSummary":
        """Summarise `config`; targets are the last segment of the checkpoint's module names
        (`model.layers.0.self_attn.q_proj` -> `q_proj`), or the config's own `target_modules`
        when no module names are given."""
        targets = {name.rsplit(".", 1)[-1] for name in module_names}
        if not targets:
            configured = config.target_modules
            targets = {configured} if isinstance(configured, str) else set(configured or ())
        return cls(
            rank=config.r,
            alpha=config.lora_alpha,
            target_modules=sorted(targets),
            use_rslora=config.use_rslora,
            base_model_name=config.base_model_name_or_path,
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: "LoraCheckpoint") -> "AdapterConfigSummary":
        return cls.from_config(checkpoint.config, checkpoint.modules.keys())


class AdapterVersion(BaseModel):
    """One version of an adapter as validated: ready (with its hash, size and config) or rejected
    (with a reason; hash and size are known only if it was downloaded before being refused)."""

    model_config = _FROZEN

    version: str = Field(min_length=1, description="S3 ETag, Hub commit sha or content hash")
    status: VersionStatus
    sha256: Optional[str] = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="of the safetensors file")
    size_bytes: Optional[int] = Field(default=None, ge=0)
    config: Optional[AdapterConfigSummary] = None
    reason: Optional[str] = Field(default=None, description="why it was rejected, how to fix it")
    reason_code: Optional[str] = Field(default=None, description="InvalidAdapterError.reason, when there is one")
    probe: Optional[AdapterProbe] = Field(default=None, description="probe.json, checked by replicas on each swap-in")
    created_at: UtcDatetime
    updated_at: UtcDatetime

    @model_validator(mode="after")
    def _fields_match_status(self) -> "AdapterVersion":
        if self.status == "rejected" and not (self.reason and self.reason.strip()):
            raise ValueError(f"version {self.version!r} is rejected but has no reason")
        if self.status == "ready":
            missing = [name for name in ("sha256", "size_bytes", "config") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"version {self.version!r} is ready but has no {', '.join(missing)}")
            if self.reason is not None or self.reason_code is not None:
                raise ValueError(f"version {self.version!r} is ready but carries a rejection reason")
        if self.updated_at < self.created_at:
            raise ValueError(f"version {self.version!r} was updated before it was created")
        return self


class Disabled(BaseModel):
    """An admin's disable: what its requests get meanwhile, and since when."""

    model_config = _FROZEN

    fallback: Fallback = Field(default="none", description="none: 409 adapter_disabled; base: the base model answers")
    since: UtcDatetime


class AdapterRecord(BaseModel):
    """Everything the registry knows about one adapter id; see the module docstring's invariants."""

    model_config = _FROZEN

    adapter_id: str = Field(description="canonical '<tenant>/<name>'")
    source_uri: str = Field(description="canonical source URI (s3://, hf://...@rev or file:///)")
    current: Optional[AdapterVersion] = Field(default=None, description="the newest version seen")
    serving: Optional[AdapterVersion] = Field(default=None, description="the last good version")
    previous: list[AdapterVersion] = Field(default_factory=list, description="good versions before it, newest first")
    deleted: bool = False
    disabled: Optional[Disabled] = Field(default=None, description="set while an admin has it disabled")
    pin_replicas: int = Field(default=0, ge=0, description="replicas that keep it warm and never evict it")
    merge_recipe: Optional[MergeSpec] = Field(default=None, description="for a named merge: what it was made from")
    created_at: UtcDatetime
    updated_at: UtcDatetime

    @field_validator("adapter_id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        return validate_adapter_id(value)  # InvalidAdapterIdError propagates as itself

    @field_validator("source_uri")
    @classmethod
    def _valid_uri(cls, value: str) -> str:
        return str(parse_source_uri(value))  # InvalidRequestError propagates as itself

    @model_validator(mode="after")
    def _invariants(self) -> "AdapterRecord":
        if self.serving is not None:
            if self.serving.status != "ready":
                raise ValueError(f"{self.adapter_id}: the serving version {self.serving.version!r} is not ready")
            if self.deleted:
                raise ValueError(f"{self.adapter_id}: a deleted adapter serves nothing")
        if self.serving is not None and self.current is None:
            raise ValueError(f"{self.adapter_id}: serving a version but has no current version")
        for old in self.previous:
            if old.status != "ready" or (self.serving is not None and old.version == self.serving.version):
                raise ValueError(f"{self.adapter_id}: previous version {old.version!r} is not an earlier good one")
        if self.updated_at < self.created_at:
            raise ValueError(f"{self.adapter_id}: updated before it was created")
        return self

    @property
    def id(self) -> AdapterId:
        return parse_adapter_id(self.adapter_id)

    @property
    def served(self) -> Optional[AdapterVersion]:
        """The version requests run on now: the serving one, unless the adapter is disabled."""
        return self.serving if self.disabled is None else None

    @property
    def status(self) -> Optional[AdapterStatus]:
        """deleted, disabled, ready (something serves), rejected (nothing good yet), or None (not
        synced yet)."""
        if self.deleted:
            return "deleted"
        if self.disabled is not None:
            return "disabled"
        if self.serving is not None:
            return "ready"
        return self.current.status if self.current is not None else None


SECRET_OPTIONS = ("token", "session", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")


class SourceSpec(BaseModel):
    """A source the store watches: a root of `<tenant>/<name>/` folders, or (with `adapter_id`)
    one adapter's folder. Persisted in the manifest, so credentials never go in `options`: they
    come from the standard chains (AWS_*/~/.aws, HF_TOKEN/the saved login)."""

    model_config = _FROZEN

    uri: str = Field(description="s3://bucket/prefix, hf://org/repo[/sub]@revision, or a local folder")
    adapter_id: Optional[str] = Field(default=None, description="set: the URI is this one adapter's folder")
    options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="source options, e.g. endpoint_url, region, cache_dir, endpoint"
    )
    adapters: list[str] = Field(default_factory=list, description="the ids it listed last time, sorted")
    excluded: list[str] = Field(default_factory=list, description="ids deleted by an admin: not re-registered")

    @field_validator("uri")
    @classmethod
    def _valid_uri(cls, value: str) -> str:
        return str(parse_source_uri(value))

    @field_validator("adapter_id")
    @classmethod
    def _valid_id(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else validate_adapter_id(value)

    @field_validator("options")
    @classmethod
    def _no_secrets(cls, value: dict) -> dict:
        secret = sorted(set(value) & set(SECRET_OPTIONS))
        if secret:
            raise ValueError(
                f"options {secret} are credentials and would be written to the manifest; "
                "use the environment (AWS_* variables, HF_TOKEN) or the default credential files")
        return value

    @classmethod
    def of(cls, source: SourceInput) -> "SourceSpec":
        """A newly configured or registered source, with no bookkeeping yet."""
        return cls(uri=source.uri, adapter_id=source.adapter_id, options=source.options)

    @property
    def key(self) -> str:
        """What identifies the spec: its URI, plus the adapter id in single-adapter mode."""
        return f"{self.uri}#{self.adapter_id}" if self.adapter_id else self.uri


class Manifest(BaseModel):
    """The persisted registry: `format_version` guards against reading a newer writer's file."""

    model_config = _FROZEN

    format_version: int = Field(default=MANIFEST_FORMAT_VERSION, ge=1)
    records: dict[str, AdapterRecord] = Field(default_factory=dict)
    sources: list[SourceSpec] = Field(default_factory=list, description="what the store watches")

    @model_validator(mode="after")
    def _keys_match_ids(self) -> "Manifest":
        for key, record in self.records.items():
            if key != record.adapter_id:
                raise ValueError(f"manifest key {key!r} holds the record of {record.adapter_id!r}")
        return self


def _replace(model: BaseModel, **changes: object):
    """A validated copy (pydantic's model_copy(update=...) skips validation)."""
    return type(model).model_validate({**dict(model), **changes})


# --- the registry --------------------------------------------------------------------------------


class Registry:
    """The adapter records, changed only through these methods, each of which validates.

    Methods return the new (immutable) record; one lock makes each change atomic, and each read a
    consistent copy, when the actor runs them from threads. Nothing here does I/O: the caller saves `to_manifest()` after a change.
    """

    def __init__(self, manifest: Optional[Manifest] = None, clock: Clock = utc_now, keep_versions: int = 2) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be >= 1")
        self._records: dict[str, AdapterRecord] = dict(manifest.records) if manifest else {}
        self._clock = clock
        self.keep_versions = keep_versions
        self._lock = threading.RLock()

    def _now(self) -> datetime:
        return _to_utc(self._clock())

    def register(self, adapter_id: str, source_uri: object) -> AdapterRecord:
        """Add an adapter, or update the source of a known one (a Hub location is pinned to a
        commit, so it changes with each version). Registering a deleted id starts a fresh record."""
        adapter_id = validate_adapter_id(adapter_id)
        uri = str(parse_source_uri(source_uri))
        with self._lock:
            now = self._now()
            old = self._records.get(adapter_id)
            if old is not None and not old.deleted:
                if old.source_uri == uri:
                    return old
                logger.info("adapter %s moves from %s to %s", adapter_id, old.source_uri, uri)
                record = _replace(old, source_uri=uri, updated_at=now)
            else:
                record = AdapterRecord(adapter_id=adapter_id, source_uri=uri, created_at=now, updated_at=now)
            self._records[adapter_id] = record
            return record

    def record_ready(
        self, adapter_id: str, version: str, sha256: str, size_bytes: int, summary: AdapterConfigSummary,
        probe: Optional[AdapterProbe] = None,
    ) -> AdapterRecord:
        """`version` passed validation: it becomes current and serving. Recording the serving
        version again with the same hash changes nothing (not even timestamps)."""
        with self._lock:
            record = self._live(adapter_id)
            now = self._now()
            current = record.current
            if (
                current is not None
                and current.version == version
                and current.status == "ready"
                and current.sha256 == sha256
                and record.serving == current
            ):
                return record
            created = current.created_at if current is not None and current.version == version else now
            ready = AdapterVersion(
                version=version, status="ready", sha256=sha256, size_bytes=size_bytes, config=summary, probe=probe,
                created_at=created, updated_at=now,
            )
            previous = self._previous_after(record, ready)
            return self._put(_replace(record, current=ready, serving=ready, previous=previous, updated_at=now))

    def _previous_after(self, record: AdapterRecord, new: AdapterVersion) -> list[AdapterVersion]:
        """The good versions to keep behind `new` once it serves."""
        older = ([record.serving] if record.serving is not None else []) + list(record.previous)
        kept = [v for v in older if v.version != new.version]
        return kept[: self.keep_versions - 1]

    def roll_back(self, adapter_id: str) -> AdapterRecord:
        """Serve the previous good version again (an admin's call); InvalidRequestError when there is none."""
        with self._lock:
            record = self._live(adapter_id)
            if not record.previous:
                raise InvalidRequestError(f"adapter {adapter_id!r} has no earlier good version to roll back to")
            back, *rest = record.previous
            return self._put(_replace(record, serving=back, previous=rest, updated_at=self._now()))

    def record_rejected(
        self,
        adapter_id: str,
        version: str,
        reason: str,
        reason_code: Optional[str] = None,
        sha256: Optional[str] = None,
        size_bytes: Optional[int] = None,
    ) -> AdapterRecord:
        """`version` was refused: it becomes current, `serving` stays on the previous good version
        (unless the refused version is the serving one, which then serves no more)."""
        with self._lock:
            record = self._live(adapter_id)
            now = self._now()
            current = record.current
            created = current.created_at if current is not None and current.version == version else now
            rejected = AdapterVersion(
                version=version, status="rejected", sha256=sha256, size_bytes=size_bytes,
                reason=reason, reason_code=reason_code, created_at=created, updated_at=now,
            )
            serving, previous = record.serving, list(record.previous)
            if serving is not None and serving.version == version:
                serving = previous.pop(0) if previous else None
                logger.warning("adapter %s: its serving version %s is now rejected (%s); serving %s", adapter_id,
                               version, reason, serving.version if serving is not None else "nothing")
            previous = [v for v in previous if v.version != version]
            return self._put(_replace(record, current=rejected, serving=serving, previous=previous, updated_at=now))

    def mark_deleted(self, adapter_id: str) -> AdapterRecord:
        """Hide the adapter and stop serving it; idempotent. Unknown ids raise AdapterNotFoundError."""
        adapter_id = validate_adapter_id(adapter_id)
        with self._lock:
            record = self._records.get(adapter_id)
            if record is None:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
            if record.deleted:
                return record
            return self._put(_replace(record, deleted=True, serving=None, previous=[], updated_at=self._now()))

    def set_disabled(self, adapter_id: str, fallback: Optional[Fallback]) -> AdapterRecord:
        """Disable (`fallback` given) or enable (None) a live adapter; the same state again changes nothing."""
        with self._lock:
            record = self._live(adapter_id)
            if fallback is None:
                if record.disabled is None:
                    return record
                return self._put(_replace(record, disabled=None, updated_at=self._now()))
            if record.disabled is not None and record.disabled.fallback == fallback:
                return record
            now = self._now()
            return self._put(_replace(record, disabled=Disabled(fallback=fallback, since=now), updated_at=now))

    def set_recipe(self, adapter_id: str, recipe: MergeSpec) -> AdapterRecord:
        """Record the named merge a live adapter was made from."""
        with self._lock:
            record = self._live(adapter_id)
            return self._put(_replace(record, merge_recipe=recipe, updated_at=self._now()))

    def set_pin(self, adapter_id: str, replicas: int) -> AdapterRecord:
        """Keep a live adapter pinned on `replicas` replicas (0: unpin); the same count changes nothing."""
        if replicas < 0:
            raise InvalidRequestError(f"replicas must be >= 0, got {replicas}")
        with self._lock:
            record = self._live(adapter_id)
            if record.pin_replicas == replicas:
                return record
            return self._put(_replace(record, pin_replicas=replicas, updated_at=self._now()))

    def get(self, adapter_id: str, include_deleted: bool = False, tenant: Optional[str] = None) -> AdapterRecord:
        """The record, or AdapterNotFoundError when unknown, deleted (unless `include_deleted`) or
        not visible to `tenant` (when given): the error does not say which, so ids do not leak."""
        parsed = parse_adapter_id(adapter_id)
        with self._lock:
            record = self._records.get(str(parsed))
        if (
            record is None
            or (record.deleted and not include_deleted)
            or (tenant is not None and not parsed.visible_to(_valid_tenant(tenant)))
        ):
            raise AdapterNotFoundError(f"adapter {str(parsed)!r} is not registered")
        return record

    def list(self, tenant: Optional[str] = None, include_deleted: bool = False) -> list[AdapterRecord]:
        """Records sorted by id; a tenant sees its own adapters and `shared/*`, None sees all."""
        tenant = _valid_tenant(tenant) if tenant is not None else None
        with self._lock:
            records = sorted(self._records.values(), key=lambda r: r.adapter_id)
        return [
            r for r in records
            if (include_deleted or not r.deleted) and (tenant is None or r.id.visible_to(tenant))
        ]

    def to_manifest(self) -> Manifest:
        with self._lock:
            return Manifest(records=dict(self._records))

    def __contains__(self, adapter_id: object) -> bool:
        with self._lock:
            record = self._records.get(adapter_id) if isinstance(adapter_id, str) else None
        return record is not None and not record.deleted

    def __len__(self) -> int:
        with self._lock:
            return sum(not r.deleted for r in self._records.values())

    def _live(self, adapter_id: str) -> AdapterRecord:
        adapter_id = validate_adapter_id(adapter_id)
        record = self._records.get(adapter_id)
        if record is None or record.deleted:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered; register it first")
        return record

    def _put(self, record: AdapterRecord) -> AdapterRecord:
        self._records[record.adapter_id] = record
        return record


def _valid_tenant(tenant: str) -> str:
    """A tenant name follows the id part rules (InvalidAdapterIdError otherwise)."""
    return AdapterId(tenant, "x").tenant


# --- persistence ---------------------------------------------------------------------------------


def manifest_to_bytes(manifest: Manifest) -> bytes:
    return manifest.model_dump_json(indent=2).encode() + b"\n"


def manifest_from_bytes(data: bytes, where: str = "manifest") -> Manifest:
    """Parse a manifest; ManifestVersionError for a newer format, ManifestCorruptError otherwise."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestCorruptError(f"{where} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ManifestCorruptError(f"{where} must hold a JSON object, not {type(raw).__name__}")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestCorruptError(f"{where} has no valid format_version (got {version!r})")
    if version > MANIFEST_FORMAT_VERSION:
        raise ManifestVersionError(
            f"{where} has format_version {version}, newer than this build's {MANIFEST_FORMAT_VERSION}; "
            "run a newer lora-serve (the file is left untouched)"
        )
    try:
        return Manifest.model_validate(raw)
    except (ValidationError, LoraServeError) as error:
        raise ManifestCorruptError(f"{where} does not hold a valid manifest: {error}") from None


def backup_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".bak")


def save_manifest(manifest: Manifest, path: str | Path) -> None:
    """Write `manifest` to `path` atomically, first copying the previous manifest to `.bak` if it
    is a good one (a corrupt file never overwrites the last good backup)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = manifest_to_bytes(manifest)
    try:
        previous = path.read_bytes()
    except FileNotFoundError:
        previous = None
    if previous is not None and previous != data:
        try:
            manifest_from_bytes(previous, str(path))
        except ManifestError as error:
            logger.warning("not backing up %s: %s", path, error)
        else:
            write_atomic(backup_path(path), previous)
    write_atomic(path, data)


def load_manifest(path: str | Path) -> Manifest:
    """The manifest at `path`; an empty one if neither it nor its `.bak` exists.

    A corrupt main file falls back to the `.bak` with a warning; with no good backup it raises
    ManifestCorruptError. A newer format raises ManifestVersionError and is never replaced by the
    backup (that would drop what the newer writer recorded)."""
    path = Path(path)
    backup = backup_path(path)
    try:
        return manifest_from_bytes(path.read_bytes(), str(path))
    except FileNotFoundError:
        if not backup.exists():
            return Manifest()
        logger.warning("%s is missing; recovering the registry from %s", path, backup)
        return manifest_from_bytes(backup.read_bytes(), str(backup))
    except ManifestCorruptError as error:
        try:
            data = backup.read_bytes()
        except FileNotFoundError:
            raise ManifestCorruptError(f"{error}; no backup at {backup} to recover from") from None
        manifest = manifest_from_bytes(data, str(backup))
        logger.warning("%s; recovered the registry from %s", error, backup)
        return manifest
