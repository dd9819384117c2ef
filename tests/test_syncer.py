"""AdapterSyncer without Ray: real PEFT adapters in a local folder and in moto's S3 over HTTP,
validated against the tiny model's slot geometry; restarts read the manifest back."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_store.change_feed import AdapterChange
from adapters_store.syncer import AdapterSyncer, SourceInput, StoreConfig
from benchmarks.moto_s3 import moto_s3_server
from deployments.engine import EngineConfig, slot_geometry
from deployments.errors import AdapterNotFoundError, InvalidAdapterError, InvalidAdapterIdError, SourceUnavailableError
from tests.adapters import edit_adapter_config, make_peft_adapter

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def geometry():
    return slot_geometry(EngineConfig(base_model="tiny-random-llama", max_rank=8))


@pytest.fixture(scope="module")
def adapter_template(tmp_path_factory):
    """Two real PEFT adapters for the tiny model, made once and copied per test."""
    root = tmp_path_factory.mktemp("templates")
    return {seed: make_peft_adapter(root / f"seed{seed}", seed=seed) for seed in (0, 1)}


@pytest.fixture
def place(adapter_template):
    def place_adapter(folder: Path, seed: int = 0) -> Path:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(adapter_template[seed], folder)
        return folder

    return place_adapter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_syncer(tmp_path, geometry, sources=(), clock=None, **config) -> AdapterSyncer:
    settings = StoreConfig(root=str(tmp_path / "store"), sources=[SourceInput(**s) for s in sources], **config)
    return AdapterSyncer(settings, geometry, monotonic=clock or Clock())


def test_sync_registers_validates_and_reports_changes(tmp_path, geometry, place):
    place(tmp_path / "src" / "acme" / "pirate")
    place(tmp_path / "src" / "shared" / "french", seed=1)
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    report = syncer.sync()
    assert sorted(report.registered) == ["acme/pirate", "shared/french"]
    assert sorted(c.adapter_id for c in report.changes) == ["acme/pirate", "shared/french"]
    record = syncer.registry.get("acme/pirate")
    assert record.status == "ready" and record.serving.config.rank == 8
    assert record.serving.config.target_modules == ["q_proj", "v_proj"]
    version, config, checkpoint = syncer.serving_checkpoint("acme/pirate")
    assert version == record.serving.version and config["peft_type"] == "LORA"
    assert checkpoint.sha256 == record.serving.sha256
    assert syncer.sync().changes == []  # nothing changed: no download, no change
    assert syncer.status()["status"] == "ok"


def test_a_new_version_is_picked_up_and_a_bad_one_keeps_the_old_serving(tmp_path, geometry, place):
    folder = place(tmp_path / "src" / "acme" / "pirate")
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    syncer.sync()
    first = syncer.registry.get("acme/pirate").serving
    place(folder, seed=1)
    report = syncer.sync()
    second = syncer.registry.get("acme/pirate").serving
    assert report.changes == [AdapterChange("acme/pirate", second.version)] and second.version != first.version

    tensors = load_file(folder / WEIGHTS)
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, folder / WEIGHTS)
    report = syncer.sync()
    record = syncer.registry.get("acme/pirate")
    assert report.changes == [] and "NaN" in report.rejected["acme/pirate"]
    assert record.current.status == "rejected" and record.current.reason_code == "non_finite"
    assert record.serving == second  # the previous good version keeps serving
    assert syncer.serving_checkpoint("acme/pirate")[0] == second.version


@pytest.mark.parametrize("breakage, reason", [
    ("rank", "rank_too_large"),
    ("target", "unknown_target_module"),
    ("base_model", "base_model_mismatch"),
    ("pickle", "pickle_file"),
    ("no_config", "missing_file"),
    ("corrupt", "corrupt_file"),
])
def test_bad_checkpoints_are_recorded_with_their_reason(tmp_path, geometry, place, breakage, reason):
    folder = tmp_path / "src" / "acme" / "bad"
    if breakage == "rank":
        make_peft_adapter(folder, r=16)  # max_rank is 8
    elif breakage == "target":
        make_peft_adapter(folder, target_modules=["q_proj", "gate_proj"])
    else:
        place(folder)
        if breakage == "base_model":
            edit_adapter_config(folder, base_model_name_or_path="meta-llama/Llama-3.1-8B")
        elif breakage == "pickle":
            (folder / WEIGHTS).rename(folder / "adapter_model.bin")
        elif breakage == "no_config":
            (folder / "adapter_config.json").unlink()
        elif breakage == "corrupt":
            (folder / WEIGHTS).write_bytes(b"not safetensors at all")
    place(tmp_path / "src" / "acme" / "good")
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    report = syncer.sync()
    record = syncer.registry.get("acme/bad")
    assert record.status == "rejected" and record.current.reason_code == reason, record.current
    assert "acme/bad" in report.rejected
    assert syncer.registry.get("acme/good").status == "ready"  # one bad adapter spoils nothing else
    with pytest.raises(AdapterNotFoundError, match="no valid version"):
        syncer.serving_checkpoint("acme/bad")


def test_removed_adapters_are_deleted_and_bad_ids_skipped(tmp_path, geometry, place):
    place(tmp_path / "src" / "acme" / "pirate")
    place(tmp_path / "src" / "acme" / "Bad..Name")
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    report = syncer.sync()
    assert report.registered == ["acme/pirate"] and any("Bad..Name" in where for where in report.skipped)
    shutil.rmtree(tmp_path / "src" / "acme" / "pirate")
    report = syncer.sync()
    assert report.deleted == ["acme/pirate"] and report.changes == [AdapterChange("acme/pirate", None)]
    with pytest.raises(AdapterNotFoundError):
        syncer.registry.get("acme/pirate")
    assert syncer.registry.get("acme/pirate", include_deleted=True).deleted


def test_admin_delete_is_not_undone_by_the_next_sync(tmp_path, geometry, place):
    place(tmp_path / "src" / "acme" / "pirate")
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    syncer.sync()
    assert syncer.delete("acme/pirate") == [AdapterChange("acme/pirate", None)]
    assert syncer.sync().registered == []
    with pytest.raises(AdapterNotFoundError):
        syncer.registry.get("acme/pirate")
    with pytest.raises(AdapterNotFoundError):
        syncer.delete("acme/nobody")
    with pytest.raises(InvalidAdapterIdError):
        syncer.delete("../etc")


def test_a_restarted_syncer_loses_nothing(tmp_path, geometry, place):
    place(tmp_path / "src" / "acme" / "pirate")
    place(tmp_path / "single", seed=1)
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    syncer.sync()
    syncer.register("globex/support", str(tmp_path / "single"))
    before = syncer.registry.to_manifest()
    again = make_syncer(tmp_path, geometry)  # no sources in config: they come from the manifest
    assert again.registry.to_manifest() == before
    assert {s.key for s in again.sources()} == {s.key for s in syncer.sources()}
    assert again.serving_checkpoint("globex/support")[0] == before.records["globex/support"].serving.version
    assert again.sync().changes == []


def test_register_one_folder_and_refusals_change_nothing(tmp_path, geometry, place):
    place(tmp_path / "single")
    syncer = make_syncer(tmp_path, geometry)
    record, _ = syncer.register("acme/support", str(tmp_path / "single"))
    assert record.status == "ready"
    manifest = syncer.manifest_path.read_bytes()
    with pytest.raises(InvalidAdapterIdError):
        syncer.register("acme/../x", str(tmp_path / "single"))
    with pytest.raises(InvalidAdapterError, match="no adapter files"):
        (tmp_path / "empty").mkdir()
        syncer.register("acme/empty", str(tmp_path / "empty"))
    with pytest.raises(SourceUnavailableError):
        syncer.register("acme/missing", str(tmp_path / "missing"))
    assert syncer.manifest_path.read_bytes() == manifest
    assert [r.adapter_id for r in syncer.registry.list()] == ["acme/support"]


def test_a_corrupt_manifest_recovers_from_its_backup(tmp_path, geometry, place):
    place(tmp_path / "src" / "acme" / "pirate")
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    syncer.sync()
    place(tmp_path / "src" / "acme" / "parrot")
    syncer.sync()  # a second save leaves the first (with acme/pirate) as the .bak
    syncer.manifest_path.write_text("{ torn write")
    again = make_syncer(tmp_path, geometry)
    assert again.registry.get("acme/pirate").status == "ready"


def test_s3_down_means_degraded_with_backoff_and_serving_goes_on(tmp_path, geometry, place):
    clock = Clock()
    with moto_s3_server() as s3:
        bucket = f"adapters-{uuid.uuid4().hex[:8]}"
        s3.client.create_bucket(Bucket=bucket)
        files = {p.name: p.read_bytes() for p in place(tmp_path / "a").iterdir()}
        s3.put_adapter(bucket, "prod/acme/pirate", files)
        syncer = make_syncer(
            tmp_path, geometry, [{"uri": f"s3://{bucket}/prod", "options": {"endpoint_url": s3.endpoint}}],
            clock=clock, sync_interval_s=2.0, max_backoff_s=5.0,
        )
        assert syncer.sync().registered == ["acme/pirate"]
        serving = syncer.registry.get("acme/pirate").serving
        s3.stop()
        clock.now += 2.0
        assert syncer.due()
        report = syncer.sync(syncer.due())
        assert report.unavailable and report.changes == []
        status = syncer.status()
        assert status["status"] == "degraded" and status["sources"][0]["failures"] == 1
        assert syncer.registry.get("acme/pirate").serving == serving
        assert syncer.serving_checkpoint("acme/pirate")[0] == serving.version  # served from the copy
        assert syncer.next_due_in_s() == pytest.approx(2.0)
        clock.now += 2.0
        syncer.sync(syncer.due())
        assert syncer.next_due_in_s() == pytest.approx(4.0)  # backoff doubles
        clock.now += 4.0
        syncer.sync(syncer.due())
        assert syncer.next_due_in_s() == pytest.approx(5.0)  # up to max_backoff_s
        s3.start()
        s3.put_adapter(bucket, "prod/acme/pirate", {WEIGHTS: b"garbage, not safetensors"})
        clock.now += 5.0
        report = syncer.sync(syncer.due())
        assert report.unavailable == {} and syncer.status()["status"] == "ok"
        assert syncer.registry.get("acme/pirate").current.status == "rejected"
        assert syncer.registry.get("acme/pirate").serving == serving


def test_source_options_are_checked_and_secrets_refused(tmp_path, geometry):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="credentials"):
        SourceInput(uri="s3://bucket/x", options={"aws_secret_access_key": "x"}).spec()
    syncer = make_syncer(tmp_path, geometry)
    (tmp_path / "root").mkdir()
    from deployments.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="do not apply"):
        syncer.add_source(SourceInput(uri=str(tmp_path / "root"), options={"endpoint_url": "http://x"}))
    assert syncer.sources() == []
    assert json.loads(syncer.manifest_path.read_text())["sources"] == []


def test_pull_mirrors_a_bucket_into_a_folder_the_store_can_watch(tmp_path, geometry, place):
    from adapters_store.pull import main

    with moto_s3_server() as s3:
        bucket = f"adapters-{uuid.uuid4().hex[:8]}"
        s3.client.create_bucket(Bucket=bucket)
        for adapter_id, seed in (("acme/pirate", 0), ("shared/json", 1)):
            files = {p.name: p.read_bytes() for p in place(tmp_path / adapter_id.replace("/", "_"), seed).iterdir()}
            s3.put_adapter(bucket, f"prod/{adapter_id}", files)
        s3.put_adapter(bucket, "prod/acme/broken", {WEIGHTS: b"not safetensors"})
        assert main([f"s3://{bucket}/prod", str(tmp_path / "mirror"), "--endpoint-url", s3.endpoint]) == 1
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "mirror")}])
    assert sorted(syncer.sync().registered) == ["acme/pirate", "shared/json"]  # the broken one was not pulled
