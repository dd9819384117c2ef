"""AdapterSyncer without Ray: real PEFT adapters in a local folder,
validated against the tiny model's slot geometry; restarts read the manifest back."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import threading

import pytest
from safetensors.torch import load_file, save_file

from adapters_store.registry import SourceSpec
from adapters_store.sources import source_for_uri
from lora_core.changes import AdapterChange
from lora_core.errors import AdapterNotFoundError, InvalidAdapterError, InvalidAdapterIdError, SourceUnavailableError
from lora_core.settings import SourceInput
from tests.support.adapters import edit_adapter_config, make_peft_adapter
from tests.support.fixtures import make_syncer

WEIGHTS = "adapter_model.safetensors"


def test_sync_registers_validates_and_reports_changes(tmp_path, geometry, place):
    place(tmp_path / "src" / "acme" / "pirate")
    place(tmp_path / "src" / "shared" / "french", seed=1)
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    report = syncer.sync()
    assert sorted(report.registered) == ["acme/pirate", "shared/french"]
    assert sorted(c.adapter_id for c in report.changes) == ["acme/pirate", "shared/french"]
    record = syncer.record("acme/pirate")
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
    first = syncer.record("acme/pirate").serving
    place(folder, seed=1)
    report = syncer.sync()
    second = syncer.record("acme/pirate").serving
    assert report.changes == [AdapterChange("acme/pirate", second.version)] and second.version != first.version

    tensors = load_file(folder / WEIGHTS)
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, folder / WEIGHTS)
    report = syncer.sync()
    record = syncer.record("acme/pirate")
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
    ("rank_pattern_zero", "invalid_config"),
    ("rank_pattern_not_a_regex", "invalid_config"),
    ("not_utf8", "invalid_config"),
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
        elif breakage == "rank_pattern_zero":
            edit_adapter_config(folder, rank_pattern={"q_proj": 0})
        elif breakage == "rank_pattern_not_a_regex":
            edit_adapter_config(folder, rank_pattern={"q_proj(": 4})
        elif breakage == "not_utf8":
            (folder / "adapter_config.json").write_bytes(b"\xff\xfe not UTF-8 {")
    place(tmp_path / "src" / "acme" / "good")
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    report = syncer.sync()
    record = syncer.record("acme/bad")
    assert record.status == "rejected" and record.current.reason_code == reason, record.current
    assert "acme/bad" in report.rejected
    assert syncer.record("acme/good").status == "ready"  # one bad adapter spoils nothing else
    with pytest.raises(AdapterNotFoundError, match="no valid version"):
        syncer.serving_checkpoint("acme/bad")

def test_an_unexpected_exception_rejects_only_its_adapter_and_the_sync_goes_on(tmp_path, geometry, place, monkeypatch):
    import adapters_store.syncer as syncer_module

    place(tmp_path / "src" / "acme" / "bad")
    place(tmp_path / "src" / "acme" / "good", seed=1)
    real = syncer_module.validate_checkpoint

    def flaky(checkpoint, geometry):
        if checkpoint.sha256 == bad_sha[0]:
            raise KeyError("a bug in a check")
        return real(checkpoint, geometry)

    bad_sha = [syncer_module.read_checkpoint(tmp_path / "src" / "acme" / "bad").sha256]
    monkeypatch.setattr(syncer_module, "validate_checkpoint", flaky)
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    report = syncer.sync()
    assert syncer.record("acme/bad").current.reason_code == "unreadable" and "KeyError" in report.rejected["acme/bad"]
    assert syncer.record("acme/good").status == "ready" and [c.adapter_id for c in report.changes] == ["acme/good"]
    assert syncer.sync().rejected == {}  # the rejected version is not fetched again every sync


def test_removed_adapters_are_deleted_and_bad_ids_skipped(tmp_path, geometry, place):
    place(tmp_path / "src" / "acme" / "pirate")
    place(tmp_path / "src" / "acme" / "Bad..Name")
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    report = syncer.sync()
    assert report.registered == ["acme/pirate"] and any("Bad..Name" in where for where in report.skipped)
    shutil.rmtree(tmp_path / "src" / "acme" / "pirate")
    held = syncer.sync()  # the only adapter gone: suspect until a second listing says the same
    assert held.deleted == [] and list(held.suspect.values()) == [["acme/pirate"]]
    assert syncer.record("acme/pirate").status == "ready" and syncer.status()["status"] == "degraded"
    report = syncer.sync()
    assert report.deleted == ["acme/pirate"] and report.changes == [AdapterChange("acme/pirate", None)]
    with pytest.raises(AdapterNotFoundError):
        syncer.record("acme/pirate")
    assert syncer.record("acme/pirate", include_deleted=True).deleted
    assert syncer.status()["status"] == "ok"


def test_an_empty_listing_deletes_nothing_until_confirmed_and_a_partial_loss_is_not_held(tmp_path, geometry, place):
    """An unmounted folder or an `rm -rf && cp` in progress lists (nearly) nothing: held, every
    adapter serving; the folder back, nothing happened. Losing one of four is a real delete."""
    names = ["a", "b", "c", "d"]
    for seed, name in enumerate(names):
        place(tmp_path / "src" / "acme" / name, seed=seed % 2)
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    syncer.sync()
    (tmp_path / "src").rename(tmp_path / "away")
    (tmp_path / "src").mkdir()
    held = syncer.sync()
    assert held.deleted == [] and held.changes == [] and held.suspect
    assert all(syncer.serving_checkpoint(f"acme/{n}") for n in names)  # copies kept and serving
    (tmp_path / "src").rmdir()
    (tmp_path / "away").rename(tmp_path / "src")
    back = syncer.sync()
    assert back.deleted == [] and back.changes == [] and not back.suspect
    shutil.rmtree(tmp_path / "src" / "acme" / "d")
    assert syncer.sync().deleted == ["acme/d"]  # 1 of 4 is under max_loss_share: not held
    for name in ["a", "b", "c"]:
        shutil.rmtree(tmp_path / "src" / "acme" / name)
    assert syncer.sync().deleted == [] and syncer.sync().deleted == ["acme/a", "acme/b", "acme/c"]


def test_version_folders_are_removed_only_after_the_manifest_is_saved(tmp_path, geometry, place, monkeypatch):
    """A crash while saving the manifest leaves the old folders: the manifest on disk still
    points at something."""
    import adapters_store.syncer as syncer_module

    folder = place(tmp_path / "src" / "acme" / "pirate")
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}], keep_versions=1)
    syncer.sync()
    first = syncer.record("acme/pirate").serving.version
    first_folder = syncer._version_folder("acme/pirate", first)
    place(folder, seed=1)

    def crash(manifest, path):
        raise OSError("disk full")

    monkeypatch.setattr(syncer_module, "save_manifest", crash)
    with pytest.raises(OSError, match="disk full"):
        syncer.sync()
    assert first_folder.is_dir()  # what the saved manifest names is still there
    monkeypatch.undo()
    syncer.sync()
    assert not first_folder.is_dir() and syncer.serving_checkpoint("acme/pirate")[0] != first

def test_admin_delete_is_not_undone_by_the_next_sync(tmp_path, geometry, place):
    place(tmp_path / "src" / "acme" / "pirate")
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    syncer.sync()
    assert syncer.delete("acme/pirate") == [AdapterChange("acme/pirate", None)]
    assert syncer.sync().registered == []
    with pytest.raises(AdapterNotFoundError):
        syncer.record("acme/pirate")
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
    assert [r.adapter_id for r in syncer.records()] == ["acme/support"]

def test_a_corrupt_manifest_recovers_from_its_backup(tmp_path, geometry, place):
    place(tmp_path / "src" / "acme" / "pirate")
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    syncer.sync()
    place(tmp_path / "src" / "acme" / "parrot")
    syncer.sync()  # a second save leaves the first (with acme/pirate) as the .bak
    syncer.manifest_path.write_text("{ torn write")
    again = make_syncer(tmp_path, geometry)
    assert again.registry.get("acme/pirate").status == "ready"

def test_source_options_are_checked_and_secrets_refused(tmp_path, geometry):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="credentials"):
        SourceSpec.of(SourceInput(uri="s3://bucket/x", options={"aws_secret_access_key": "x"}))
    syncer = make_syncer(tmp_path, geometry)
    (tmp_path / "root").mkdir()
    from lora_core.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="do not apply"):
        syncer.add_source(SourceInput(uri=str(tmp_path / "root"), options={"endpoint_url": "http://x"}))
    assert syncer.sources() == []
    assert json.loads(syncer.manifest_path.read_text())["sources"] == []


def test_a_named_merge_is_written_with_its_recipe_and_registered(tmp_path, geometry, place):
    from adapters_store.merge_spec import MERGE_RECIPE_FILE, MergeSpec
    from lora_core.errors import AdapterExistsError, InvalidRequestError

    place(tmp_path / "src" / "acme" / "pirate")
    place(tmp_path / "src" / "shared" / "french", seed=1)
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    syncer.sync()
    spec = MergeSpec(name="acme/blend", combination_type="ties", density=0.5,
                     adapters=[{"id": "acme/pirate", "weight": 0.6}, {"id": "shared/french", "weight": 0.4}])
    record, report = syncer.merge(spec)
    assert record.status == "ready" and record.serving.config.rank == 8
    assert [c.adapter_id for c in report.changes] == ["acme/blend"]
    folder = tmp_path / "store" / "merged" / "acme" / "blend"
    assert MergeSpec.model_validate_json((folder / MERGE_RECIPE_FILE).read_text()) == spec
    assert syncer.serving_checkpoint("acme/blend")[2].max_rank == 8

    with pytest.raises(AdapterExistsError):
        syncer.merge(spec)
    with pytest.raises(AdapterNotFoundError):
        syncer.merge(spec.model_copy(update={"name": "acme/other", "adapters": (spec.adapters[0].model_copy(update={"id": "acme/nope"}),)}))
    too_big = MergeSpec(name="acme/big", combination_type="cat",  # 8 + 8 > the geometry's max_rank 8
                        adapters=[{"id": "acme/pirate"}, {"id": "shared/french"}])
    with pytest.raises(InvalidRequestError, match="rank would be 16"):
        syncer.merge(too_big)
    assert sorted(p.name for p in (tmp_path / "store" / "merged" / "acme").iterdir()) == ["blend"]  # no leftovers
    assert not [p for p in (tmp_path / "store").iterdir() if p.name.startswith(".merge-")]
    assert sorted(r.adapter_id for r in syncer.records()) == ["acme/blend", "acme/pirate", "shared/french"]
    assert syncer.record("acme/blend").merge_recipe == spec  # the manifest records the recipe
    assert make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}]).record("acme/blend").merge_recipe == spec
    syncer.delete("acme/blend")
    assert not folder.exists()  # the merge's files go with it
    assert syncer.merge(spec)[0].status == "ready"  # and the name can be merged again


def test_a_disabled_adapter_stays_registered_serves_nothing_and_comes_back_when_enabled(tmp_path, geometry, place):
    from adapters_store.merge_spec import MergeSpec
    from lora_core.errors import AdapterDisabledError

    place(tmp_path / "src" / "acme" / "pirate")
    place(tmp_path / "src" / "shared" / "french", seed=1)
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    syncer.sync()
    version = syncer.serving_version("acme/pirate")
    record, changes = syncer.disable("acme/pirate", "base")
    assert record.status == "disabled" and record.disabled.fallback == "base" and record.serving.version == version
    assert changes == [AdapterChange("acme/pirate", None)]  # the replicas drop it
    assert "acme/pirate" not in syncer.serving_versions() and syncer.serving_version("acme/pirate") is None
    assert syncer.disabled_adapters() == {"acme/pirate": "base"}
    with pytest.raises(AdapterDisabledError):
        syncer.serving_checkpoint("acme/pirate")
    with pytest.raises(AdapterDisabledError):  # a disabled input to a named merge
        syncer.merge(MergeSpec(name="acme/blend", adapters=[{"id": "acme/pirate"}, {"id": "shared/french"}]))
    assert syncer.disable("acme/pirate", "base")[1] == []  # again: nothing changes

    place(tmp_path / "src" / "acme" / "pirate", seed=1)  # a new version while disabled: synced, not announced
    report = syncer.sync()
    assert report.updated == ["acme/pirate"] and report.changes == []
    new_version = syncer.record("acme/pirate").serving.version
    assert new_version != version

    restarted = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])  # the state is in the manifest
    assert restarted.disabled_adapters() == {"acme/pirate": "base"}
    record, changes = restarted.enable("acme/pirate")
    assert record.status == "ready" and changes == [AdapterChange("acme/pirate", new_version)]
    assert restarted.serving_versions()["acme/pirate"] == new_version
    assert restarted.enable("acme/pirate")[1] == []
    with pytest.raises(AdapterNotFoundError):
        restarted.disable("acme/nobody")


def test_the_last_good_versions_are_kept_and_a_replicas_rejection_rolls_back(tmp_path, geometry, place):
    folder = place(tmp_path / "src" / "acme" / "pirate")
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}], keep_versions=2)
    syncer.sync()
    v1 = syncer.serving_version("acme/pirate")
    place(folder, seed=1)
    syncer.sync()
    v2 = syncer.serving_version("acme/pirate")
    copies = tmp_path / "store" / "versions" / "acme" / "pirate"
    assert len(list(copies.iterdir())) == 2  # v2 and v1, for a rollback
    assert [v.version for v in syncer.record("acme/pirate").previous] == [v1]

    assert syncer.report_rejected("acme/pirate", "not-serving", "late report") == []  # nothing changes
    changes = syncer.report_rejected("acme/pirate", v2, "replica r1: slot check failed")
    assert changes == [AdapterChange("acme/pirate", v1)]
    record = syncer.record("acme/pirate")
    assert record.serving.version == v1 and record.current.status == "rejected"
    assert record.current.reason_code == "swap_validation" and "slot check" in record.current.reason
    assert syncer.serving_checkpoint("acme/pirate")[0] == v1  # its copy was kept
    assert syncer.sync().changes == []  # the rejected version is not fetched again

    edit_adapter_config(folder, lora_alpha=8)  # v3, good
    syncer.sync()
    v3 = syncer.serving_version("acme/pirate")
    record, changes = syncer.rollback("acme/pirate")
    assert record.serving.version == v1 and changes == [AdapterChange("acme/pirate", v1)]
    from lora_core.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="no earlier good version"):
        syncer.rollback("acme/pirate")
    assert v3 not in {v1, v2} and syncer.sync().changes == []  # rolled back stays rolled back


def test_a_probe_file_is_fetched_and_recorded(tmp_path, geometry, place):
    folder = place(tmp_path / "src" / "acme" / "pirate")
    (folder / "probe.json").write_text(json.dumps({"prompt": "Hi", "expected": "Arr"}))
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    syncer.sync()
    assert syncer.record("acme/pirate").serving.probe.expected == "Arr"
    assert syncer.serving_checkpoint("acme/pirate")[2].probe.prompt == "Hi"
    (folder / "probe.json").write_text("{not json")
    report = syncer.sync()
    assert "acme/pirate" in report.rejected and syncer.record("acme/pirate").serving.probe.expected == "Arr"


def test_config_pins_join_admin_pins_the_larger_count_winning_and_follow_a_deploy(tmp_path, geometry, place):
    place(tmp_path / "src" / "acme" / "pirate")
    place(tmp_path / "src" / "acme" / "poet", seed=1)
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}], pins={"acme/pirate": 2, "acme/gone": 1})
    syncer.sync()
    assert syncer.pins() == {"acme/pirate": 2}  # an id not served is not pinned
    syncer.pin("acme/pirate", 3)
    syncer.pin("acme/poet", 1)
    assert syncer.pins() == {"acme/pirate": 3, "acme/poet": 1}
    syncer.pin("acme/pirate", 0)  # the admin's unpin leaves the config's pin
    assert syncer.pins() == {"acme/pirate": 2, "acme/poet": 1}
    assert syncer.apply_config(syncer.config.model_copy(update={"pins": {}})) == ["pins"]
    assert syncer.pins() == {"acme/poet": 1}


def test_a_lost_serving_copy_is_fetched_from_its_own_folder_never_a_whole_root(tmp_path, geometry, place):
    """A store moved to another node has no copies: a cold request fetches that one adapter.
    Another adapter's new version is left for the sync, which announces it."""
    place(tmp_path / "src" / "acme" / "pirate")
    other = place(tmp_path / "src" / "globex" / "secret", seed=1)
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}])
    syncer.sync()
    secret_before = syncer.record("globex/secret").serving.version
    shutil.rmtree(tmp_path / "store" / "versions")
    place(other, seed=0)  # a new version of globex/secret waits in the source
    version, _, checkpoint = syncer.serving_checkpoint("acme/pirate")
    assert version == syncer.record("acme/pirate").serving.version
    assert checkpoint.sha256 == syncer.record("acme/pirate").serving.sha256
    assert syncer.record("globex/secret").serving.version == secret_before  # not synced behind the caller's back
    with pytest.raises(SourceUnavailableError) as refused:
        syncer.serving_checkpoint("globex/secret")  # its source holds another version now
    assert "globex/secret" in str(refused.value) and str(tmp_path) not in str(refused.value)
    assert "src" in syncer.due()[0]  # that source syncs at once, and the sync announces the new version
    report = syncer.sync()
    assert [c.adapter_id for c in report.changes] == ["globex/secret"]
    assert syncer.serving_checkpoint("globex/secret")[0] != secret_before


class GatedDownloads:
    """A source factory whose downloads wait at a gate (open until `close()`), to see what the
    syncer answers while one is in progress."""

    def __init__(self) -> None:
        self.downloading, self._gate = threading.Event(), threading.Event()
        self._gate.set()

    def close(self) -> None:
        self._gate.clear()

    def open(self) -> None:
        self._gate.set()

    def __call__(self, uri, **options):
        source = source_for_uri(uri, **options)
        fetch_many = source.fetch_many

        def held(adapters, dest_root, max_workers=4):
            adapters = list(adapters)
            if adapters and not self._gate.is_set():
                self.downloading.set()
                assert self._gate.wait(30)
            return fetch_many(adapters, dest_root, max_workers=max_workers)

        source.fetch_many = held
        return source


def meanwhile(work, gated: GatedDownloads, calls):
    """Run `work` in the background held at the gate, then each of `calls` (blocked behind the
    download: TimeoutError); their answers."""
    background = threading.Thread(target=work)
    gated.close()
    background.start()
    try:
        assert gated.downloading.wait(10)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return [pool.submit(call).result(timeout=5) for call in calls]
    finally:
        gated.open()
        background.join(10)
        assert not background.is_alive()


def test_a_sync_downloading_holds_no_lock_that_deletes_and_status_wait_for(tmp_path, geometry, place):
    """A download of a new version is held at a gate: meanwhile status, pin and a delete answer,
    and the deleted adapter is not brought back by the sync that fetched it."""
    folder = place(tmp_path / "src" / "acme" / "pirate")
    place(tmp_path / "src" / "shared" / "french", seed=1)
    gated = GatedDownloads()
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}], source_factory=gated)
    syncer.sync()
    place(folder, seed=1)
    place(tmp_path / "src" / "shared" / "french", seed=0)
    status, pinned, deleted = meanwhile(syncer.sync, gated, [
        syncer.status, lambda: syncer.pin("shared/french", 1), lambda: syncer.delete("acme/pirate")])
    assert status["adapters"] == 2 and pinned.pin_replicas == 1
    assert deleted == [AdapterChange("acme/pirate", None)]
    with pytest.raises(AdapterNotFoundError):
        syncer.record("acme/pirate")
    assert syncer.record("shared/french").status == "ready"
    assert not (tmp_path / "store" / "staging" / "acme" / "pirate").exists()


def test_a_registration_downloading_holds_no_lock_that_status_and_pins_wait_for(tmp_path, geometry, place):
    place(tmp_path / "src" / "shared" / "french")
    extra = place(tmp_path / "extra", seed=1)
    gated = GatedDownloads()
    syncer = make_syncer(tmp_path, geometry, [{"uri": str(tmp_path / "src")}], source_factory=gated)
    syncer.sync()
    status, pinned = meanwhile(lambda: syncer.register("acme/extra", str(extra)), gated, [
        syncer.status, lambda: syncer.pin("shared/french", 1)])
    assert status["adapters"] == 2 and pinned.pin_replicas == 1
    assert syncer.record("acme/extra").status == "ready"


def test_a_registration_whose_weights_link_out_of_the_folder_says_so(tmp_path, geometry, place):
    outside = place(tmp_path / "outside" / "acme" / "pirate")
    folder = tmp_path / "src" / "acme" / "pirate"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_bytes((outside / "adapter_config.json").read_bytes())
    (folder / WEIGHTS).symlink_to(outside / WEIGHTS)
    syncer = make_syncer(tmp_path, geometry)
    with pytest.raises(InvalidAdapterError, match="links outside the source folder") as refused:
        syncer.register("acme/pirate", str(folder))
    assert refused.value.reason == "missing_file"
    assert syncer.records() == []
