"""The adapter registry: lifecycle, validation, tenant visibility and a manifest that never resets."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from adapters_store.registry import (
    MANIFEST_FORMAT_VERSION,
    AdapterConfigSummary,
    AdapterRecord,
    AdapterVersion,
    Manifest,
    ManifestCorruptError,
    ManifestVersionError,
    Registry,
    backup_path,
    load_manifest,
    manifest_from_bytes,
    manifest_to_bytes,
    save_manifest,
)
from lora_core.errors import AdapterNotFoundError, InvalidAdapterIdError, InvalidRequestError

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64
SUMMARY = AdapterConfigSummary(rank=16, alpha=32.0, target_modules=["v_proj", "q_proj"], base_model_name="SmolLM2")


class FakeClock:
    """Advances one second per reading, so every change has its own timestamp."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock) -> Registry:
    return Registry(clock=clock)


def populated(clock: FakeClock) -> Registry:
    registry = Registry(clock=clock)
    registry.register("acme/bot", "s3://bucket/adapters")
    registry.record_ready("acme/bot", "etag-1", SHA_A, 1024, SUMMARY)
    registry.register("acme/bad", "/srv/adapters/acme/bad")
    registry.record_rejected("acme/bad", "v1", "rank 64 > max_rank 16", reason_code="rank_too_large")
    registry.register("shared/sql", "hf://org/sql-lora@abc123")
    registry.record_ready("shared/sql", "abc123", SHA_B, 2048, SUMMARY)
    registry.register("other/gone", "file:///srv/other/gone")
    registry.mark_deleted("other/gone")
    registry.register("other/new", "s3://bucket")
    return registry


# --- lifecycle -----------------------------------------------------------------------------------


def test_lifecycle_keeps_serving_the_last_good_version(registry):
    record = registry.register("acme/bot", "s3://bucket/prefix")
    assert record.status is None and record.current is None and record.serving is None

    record = registry.record_ready("acme/bot", "v1", SHA_A, 100, SUMMARY)
    assert record.status == "ready"
    assert record.current.version == record.serving.version == "v1"

    record = registry.record_rejected("acme/bot", "v2", "NaN weights in q_proj", reason_code="non_finite")
    assert record.current.version == "v2" and record.current.status == "rejected"
    assert record.current.reason == "NaN weights in q_proj" and record.current.reason_code == "non_finite"
    assert record.serving.version == "v1" and record.serving.sha256 == SHA_A
    assert record.status == "ready"  # still serving v1

    record = registry.record_ready("acme/bot", "v3", SHA_B, 200, SUMMARY)
    assert record.current.version == record.serving.version == "v3"
    assert record.serving.size_bytes == 200

    record = registry.mark_deleted("acme/bot")
    assert record.deleted and record.status == "deleted" and record.serving is None
    assert record.current.version == "v3"  # kept for the audit trail
    with pytest.raises(AdapterNotFoundError):
        registry.get("acme/bot")
    assert registry.get("acme/bot", include_deleted=True) == record
    assert "acme/bot" not in registry and len(registry) == 0


def test_disable_keeps_the_record_and_enable_restores_it(registry):
    registry.register("acme/bot", "s3://bucket/prefix")
    ready = registry.record_ready("acme/bot", "v1", SHA_A, 100, SUMMARY)
    record = registry.set_disabled("acme/bot", "none")
    assert record.status == "disabled" and record.served is None and record.serving == ready.serving
    assert registry.set_disabled("acme/bot", "none") == record  # the same state: nothing changes
    record = registry.set_disabled("acme/bot", "base")
    assert record.disabled.fallback == "base"
    record = registry.record_ready("acme/bot", "v2", SHA_B, 100, SUMMARY)  # versions still move while disabled
    assert record.status == "disabled" and record.serving.version == "v2"
    record = registry.set_disabled("acme/bot", None)
    assert record.status == "ready" and record.served.version == "v2" and record.disabled is None
    with pytest.raises(AdapterNotFoundError):
        registry.set_disabled("acme/nobody", "none")


def test_a_format_1_manifest_is_read_with_nothing_disabled(clock):
    manifest = populated(clock).to_manifest()
    old = json.loads(manifest_to_bytes(manifest))
    old["format_version"] = 1
    for record in old["records"].values():
        del record["disabled"]
    loaded = manifest_from_bytes(json.dumps(old).encode())
    assert loaded.records == manifest.records
    assert all(record.disabled is None for record in loaded.records.values())


def test_first_version_rejected_serves_nothing(registry):
    registry.register("acme/bot", "s3://bucket")
    record = registry.record_rejected("acme/bot", "v1", "config has no peft_type")
    assert record.serving is None and record.status == "rejected"


def test_rejecting_the_serving_version_stops_serving_it(registry):
    registry.register("acme/bot", "s3://bucket")
    registry.record_ready("acme/bot", "v1", SHA_A, 1, SUMMARY)
    record = registry.record_rejected("acme/bot", "v1", "base model changed")
    assert record.serving is None and record.status == "rejected"


def test_record_ready_again_is_a_no_op(registry, clock):
    registry.register("acme/bot", "s3://bucket")
    first = registry.record_ready("acme/bot", "v1", SHA_A, 1, SUMMARY)
    again = registry.record_ready("acme/bot", "v1", SHA_A, 1, SUMMARY)
    assert again == first and again.updated_at == first.updated_at


def test_register_is_idempotent_and_follows_a_moved_source(registry):
    first = registry.register("acme/bot", "hf://org/repo@v1")
    assert registry.register("acme/bot", "hf://org/repo@v1") == first
    moved = registry.register("acme/bot", "hf://org/repo@v2")
    assert moved.source_uri == "hf://org/repo@v2" and moved.created_at == first.created_at
    assert moved.updated_at > first.updated_at


def test_registering_a_deleted_id_starts_fresh(registry):
    registry.register("acme/bot", "s3://bucket")
    registry.record_ready("acme/bot", "v1", SHA_A, 1, SUMMARY)
    registry.mark_deleted("acme/bot")
    assert registry.mark_deleted("acme/bot").deleted  # idempotent
    record = registry.register("acme/bot", "s3://bucket")
    assert not record.deleted and record.current is None and registry.get("acme/bot") == record


def test_changes_to_unknown_or_deleted_adapters_are_refused(registry):
    with pytest.raises(AdapterNotFoundError):
        registry.record_ready("acme/nope", "v1", SHA_A, 1, SUMMARY)
    with pytest.raises(AdapterNotFoundError):
        registry.record_rejected("acme/nope", "v1", "bad")
    with pytest.raises(AdapterNotFoundError):
        registry.mark_deleted("acme/nope")
    with pytest.raises(AdapterNotFoundError):
        registry.get("acme/nope")
    registry.register("acme/bot", "s3://bucket")
    registry.mark_deleted("acme/bot")
    with pytest.raises(AdapterNotFoundError):
        registry.record_ready("acme/bot", "v1", SHA_A, 1, SUMMARY)


def test_timestamps_come_from_the_injected_clock(clock):
    registry = Registry(clock=clock)
    record = registry.register("acme/bot", "s3://bucket")
    assert record.created_at == record.updated_at == T0 + timedelta(seconds=1)
    record = registry.record_ready("acme/bot", "v1", SHA_A, 1, SUMMARY)
    assert record.created_at == T0 + timedelta(seconds=1)
    assert record.updated_at == record.current.created_at == T0 + timedelta(seconds=2)
    record = registry.record_rejected("acme/bot", "v2", "bad")
    assert record.updated_at == record.current.updated_at == T0 + timedelta(seconds=3)
    assert record.serving.updated_at == T0 + timedelta(seconds=2)
    assert record.created_at.tzinfo is not None and record.created_at.utcoffset() == timedelta(0)


def test_clock_offsets_are_normalised_to_utc_and_naive_clocks_refused():
    paris = timezone(timedelta(hours=1))
    registry = Registry(clock=lambda: datetime(2026, 1, 1, 13, 0, tzinfo=paris))
    record = registry.register("acme/bot", "s3://bucket")
    assert record.created_at == T0 and record.created_at.tzinfo == timezone.utc
    naive = Registry(clock=lambda: datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        naive.register("acme/bot", "s3://bucket")


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["../etc", "acme/../x", "acme", "/acme/x", "Acme/x", "acme/x/y", "acme\\x", ""])
def test_bad_ids_are_refused(registry, bad_id):
    with pytest.raises(InvalidAdapterIdError):
        registry.register(bad_id, "s3://bucket")
    assert registry.list() == []


@pytest.mark.parametrize("bad_uri", ["ftp://host/x", "relative/path", "s3://B", "hf://org", "s3://bucket/../x", ""])
def test_bad_source_uris_are_refused(registry, bad_uri):
    with pytest.raises(InvalidRequestError):
        registry.register("acme/bot", bad_uri)
    assert registry.list() == []


def test_source_uris_are_stored_canonical(registry):
    assert registry.register("acme/a", "/srv/adapters/a").source_uri == "file:///srv/adapters/a"
    assert registry.register("acme/b", "hf://org/repo").source_uri == "hf://org/repo@main"
    assert registry.register("acme/c", "s3://bucket/prefix/").source_uri == "s3://bucket/prefix"


def test_record_model_validates_id_and_uri_directly():
    with pytest.raises(InvalidAdapterIdError):
        AdapterRecord(adapter_id="acme/..", source_uri="s3://bucket", created_at=T0, updated_at=T0)
    with pytest.raises(InvalidRequestError):
        AdapterRecord(adapter_id="acme/bot", source_uri="gopher://x", created_at=T0, updated_at=T0)


def test_version_fields_must_match_status():
    with pytest.raises(ValidationError, match="no reason"):
        AdapterVersion(version="v1", status="rejected", created_at=T0, updated_at=T0)
    with pytest.raises(ValidationError, match="no reason"):
        AdapterVersion(version="v1", status="rejected", reason="  ", created_at=T0, updated_at=T0)
    with pytest.raises(ValidationError, match="sha256, size_bytes, config"):
        AdapterVersion(version="v1", status="ready", created_at=T0, updated_at=T0)
    with pytest.raises(ValidationError):
        AdapterVersion(version="v1", status="deleted", reason="x", created_at=T0, updated_at=T0)
    with pytest.raises(ValidationError):  # not a sha256 hex digest
        AdapterVersion(version="v1", status="ready", sha256="xyz", size_bytes=1, config=SUMMARY,
                       created_at=T0, updated_at=T0)
    with pytest.raises(ValidationError, match="timezone-aware"):
        AdapterVersion(version="v1", status="rejected", reason="r", created_at=datetime(2026, 1, 1),
                       updated_at=T0)


def test_record_invariants():
    rejected = AdapterVersion(version="v1", status="rejected", reason="bad", created_at=T0, updated_at=T0)
    with pytest.raises(ValidationError, match="not ready"):
        AdapterRecord(adapter_id="acme/bot", source_uri="s3://bucket", current=rejected, serving=rejected,
                      created_at=T0, updated_at=T0)
    with pytest.raises(ValidationError, match="updated before"):
        AdapterRecord(adapter_id="acme/bot", source_uri="s3://bucket", created_at=T0,
                      updated_at=T0 - timedelta(seconds=1))


def test_models_are_frozen(registry):
    record = registry.register("acme/bot", "s3://bucket")
    with pytest.raises(ValidationError):
        record.deleted = True  # type: ignore[misc]


# --- tenant visibility ---------------------------------------------------------------------------


def test_tenants_see_their_own_and_shared_adapters(clock):
    registry = populated(clock)
    ids = lambda records: [r.adapter_id for r in records]  # noqa: E731
    assert ids(registry.list()) == ["acme/bad", "acme/bot", "other/new", "shared/sql"]
    assert ids(registry.list(include_deleted=True)) == ["acme/bad", "acme/bot", "other/gone", "other/new", "shared/sql"]
    assert ids(registry.list(tenant="acme")) == ["acme/bad", "acme/bot", "shared/sql"]
    assert ids(registry.list(tenant="other")) == ["other/new", "shared/sql"]
    assert ids(registry.list(tenant="other", include_deleted=True)) == ["other/gone", "other/new", "shared/sql"]
    assert ids(registry.list(tenant="nobody")) == ["shared/sql"]
    assert registry.get("shared/sql", tenant="acme").adapter_id == "shared/sql"
    with pytest.raises(AdapterNotFoundError):
        registry.get("acme/bot", tenant="other")
    with pytest.raises(InvalidAdapterIdError):
        registry.list(tenant="../acme")


# --- summaries -----------------------------------------------------------------------------------


def test_config_summary_from_peft_config_and_module_names():
    from lora_core.checkpoint import PeftLoraConfig

    config = PeftLoraConfig(peft_type="LORA", r=8, lora_alpha=16, use_rslora=True,
                            target_modules=["q_proj", "v_proj", "o_proj"], base_model_name_or_path="base/model")
    modules = ["model.layers.1.self_attn.v_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    summary = AdapterConfigSummary.from_config(config, modules)
    assert summary == AdapterConfigSummary(rank=8, alpha=16.0, target_modules=["q_proj", "v_proj"],
                                           use_rslora=True, base_model_name="base/model")
    assert AdapterConfigSummary.from_config(config).target_modules == ["o_proj", "q_proj", "v_proj"]
    single = PeftLoraConfig(peft_type="LORA", r=4, lora_alpha=4, target_modules="q_proj")
    assert AdapterConfigSummary.from_config(single).target_modules == ["q_proj"]


def test_config_summary_from_a_real_checkpoint(adapter_factory):
    from lora_core.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(adapter_factory("a"))
    summary = AdapterConfigSummary.from_checkpoint(checkpoint)
    assert summary.rank == checkpoint.config.r and summary.alpha == checkpoint.config.lora_alpha
    assert summary.target_modules == sorted({m.rsplit(".", 1)[-1] for m in checkpoint.modules})
    registry = Registry()
    registry.register("acme/a", "/tmp/a")
    record = registry.record_ready("acme/a", checkpoint.version, checkpoint.sha256, checkpoint.size_bytes, summary)
    assert record.serving.config == summary


# --- persistence ---------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, clock):
    manifest = populated(clock).to_manifest()
    path = tmp_path / "store" / "manifest.json"
    save_manifest(manifest, path)
    loaded = load_manifest(path)
    assert loaded == manifest
    assert json.loads(path.read_text())["format_version"] == MANIFEST_FORMAT_VERSION
    restored = Registry(loaded, clock=clock)
    assert restored.get("acme/bot").serving.version == "etag-1"
    assert restored.get("acme/bad").current.reason_code == "rank_too_large"
    assert restored.get("other/gone", include_deleted=True).deleted
    assert manifest_from_bytes(manifest_to_bytes(manifest)) == manifest
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # no temp files left behind


def test_missing_manifest_is_empty(tmp_path):
    assert load_manifest(tmp_path / "manifest.json") == Manifest()


def test_each_save_keeps_the_previous_manifest_as_backup(tmp_path, clock):
    path = tmp_path / "manifest.json"
    registry = Registry(clock=clock)
    registry.register("acme/bot", "s3://bucket")
    first = registry.to_manifest()
    save_manifest(first, path)
    assert not backup_path(path).exists()
    registry.record_ready("acme/bot", "v1", SHA_A, 1, SUMMARY)
    second = registry.to_manifest()
    save_manifest(second, path)
    assert load_manifest(path) == second
    assert manifest_from_bytes(backup_path(path).read_bytes()) == first


def test_crash_before_replace_leaves_the_old_manifest(tmp_path, clock, monkeypatch):
    path = tmp_path / "manifest.json"
    registry = populated(clock)
    old = registry.to_manifest()
    save_manifest(old, path)
    registry.record_ready("acme/bot", "etag-2", SHA_C, 4096, SUMMARY)

    real_replace = os.replace

    def crash_on_main(src, dst):
        if Path(dst) == path:
            assert Path(src).parent == path.parent  # temp file in the same folder: atomic rename
            assert manifest_from_bytes(Path(src).read_bytes()) == registry.to_manifest()  # fully written
            raise OSError("simulated crash between the temp write and the replace")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_main)
    with pytest.raises(OSError, match="simulated crash"):
        save_manifest(registry.to_manifest(), path)
    monkeypatch.undo()
    assert load_manifest(path) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "manifest.json.bak"]


def test_a_left_over_temp_file_is_ignored(tmp_path, clock):
    path = tmp_path / "manifest.json"
    manifest = populated(clock).to_manifest()
    save_manifest(manifest, path)
    (tmp_path / ".manifest.json.abc123.tmp").write_bytes(b'{"format_version": 1, "rec')  # a real crash
    assert load_manifest(path) == manifest


@pytest.mark.parametrize(
    "garbage",
    [b"", b"{not json", b"\xff\xfe", b"[]", b'{"records": {}}', b'{"format_version": 0, "records": {}}',
     b'{"format_version": 1, "records": {"acme/x": {"adapter_id": "acme/y"}}}'],
)
def test_corrupt_main_file_falls_back_to_backup(tmp_path, clock, caplog, garbage):
    path = tmp_path / "manifest.json"
    registry = populated(clock)
    good = registry.to_manifest()
    save_manifest(good, path)
    registry.register("acme/newer", "s3://bucket")
    save_manifest(registry.to_manifest(), path)  # `good` is now the backup
    path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="adapters_store.registry"):
        assert load_manifest(path) == good
    assert "recovered the registry" in caplog.text


def test_corrupt_file_without_backup_raises(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_bytes(b"{truncated")
    with pytest.raises(ManifestCorruptError, match="no backup"):
        load_manifest(path)
    with pytest.raises(ManifestCorruptError, match="not valid JSON"):
        manifest_from_bytes(b"{truncated")


def test_a_corrupt_main_file_never_overwrites_the_backup(tmp_path, clock):
    path = tmp_path / "manifest.json"
    registry = populated(clock)
    good = registry.to_manifest()
    save_manifest(good, path)
    save_manifest(good, path)  # identical bytes: no backup needed
    registry.register("acme/newer", "s3://bucket")
    save_manifest(registry.to_manifest(), path)
    path.write_bytes(b"garbage")
    newest = Registry(load_manifest(path), clock=clock)  # recovered from the backup
    newest.register("acme/again", "s3://bucket")
    save_manifest(newest.to_manifest(), path)
    assert manifest_from_bytes(backup_path(path).read_bytes()) == good  # garbage was not backed up
    assert load_manifest(path) == newest.to_manifest()


def test_missing_main_file_recovers_from_backup(tmp_path, clock):
    path = tmp_path / "manifest.json"
    good = populated(clock).to_manifest()
    save_manifest(Manifest(), path)
    save_manifest(good, path)
    save_manifest(good.model_copy(update={"records": {}}), path)
    path.unlink()
    assert load_manifest(path) == good


def test_newer_format_is_refused_not_reset(tmp_path, clock):
    path = tmp_path / "manifest.json"
    good = populated(clock).to_manifest()
    save_manifest(good, path)
    save_manifest(good, path)
    newer = json.loads(manifest_to_bytes(good))
    newer["format_version"] = MANIFEST_FORMAT_VERSION + 1
    path.write_text(json.dumps(newer))
    backup_path(path).write_bytes(manifest_to_bytes(good))
    with pytest.raises(ManifestVersionError, match="newer"):
        load_manifest(path)
    assert json.loads(path.read_text())["format_version"] == MANIFEST_FORMAT_VERSION + 1  # untouched


# --- Ray boundaries and imports ------------------------------------------------------------------


def test_models_and_errors_pickle(clock):
    registry = populated(clock)
    manifest = registry.to_manifest()
    assert pickle.loads(pickle.dumps(manifest)) == manifest
    for record in manifest.records.values():
        assert pickle.loads(pickle.dumps(record)) == record
        assert pickle.loads(pickle.dumps(record)).status == record.status
    version = registry.get("acme/bad").current
    assert pickle.loads(pickle.dumps(version)) == version
    assert pickle.loads(pickle.dumps(SUMMARY)) == SUMMARY
    for error in (ManifestCorruptError("broken"), ManifestVersionError("too new")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and copy.status_code == 500


def test_registry_imports_neither_torch_nor_ray():
    code = "import sys, adapters_store.registry; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["False", "False"]


def test_reads_are_consistent_while_another_thread_registers():
    """The store's sync thread inserts records while request threads list them: every read takes
    the registry's lock (an unguarded `len()` raised "dictionary changed size during iteration")."""
    registry = Registry()
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        try:
            while not done.is_set():
                len(registry)
                registry.list(tenant="acme")
                "acme/a0" in registry  # noqa: B015
        except BaseException as error:  # surfaced below
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    readers = [threading.Thread(target=read) for _ in range(2)]
    try:
        for reader in readers:
            reader.start()
        for index in range(3000):
            registry.register(f"acme/a{index}", f"s3://bucket/acme/a{index}")
    finally:
        done.set()
        for reader in readers:
            reader.join(timeout=10)
        sys.setswitchinterval(interval)
    assert not errors, errors[0]
    assert len(registry) == 3000


def test_a_pin_count_is_kept_and_refused_when_negative(registry):
    registry.register("acme/bot", "s3://bucket/prefix")
    record = registry.set_pin("acme/bot", 2)
    assert record.pin_replicas == 2 and registry.set_pin("acme/bot", 2) == record
    assert registry.set_pin("acme/bot", 0).pin_replicas == 0
    with pytest.raises(InvalidRequestError):
        registry.set_pin("acme/bot", -1)
    with pytest.raises(AdapterNotFoundError):
        registry.set_pin("acme/nobody", 1)
