"""AdapterSyncer against moto's S3 over HTTP: a bucket that goes down and comes back."""

from __future__ import annotations

import uuid

import pytest

from benchmarks.moto_s3 import moto_s3_server
from lora_core.errors import SourceRefusedError, SourceUnavailableError
from lora_core.settings import SourceInput
from tests.support.fixtures import Clock, make_syncer

WEIGHTS = "adapter_model.safetensors"


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
        serving = syncer.record("acme/pirate").serving
        s3.stop()
        clock.now += 2.0
        assert syncer.due()
        report = syncer.sync(syncer.due())
        assert report.unavailable and report.changes == []
        assert [type(e) for e in report.source_errors.values()] == [SourceUnavailableError]
        status = syncer.status()
        assert status["status"] == "degraded" and status["sources"][0]["failures"] == 1
        assert syncer.record("acme/pirate").serving == serving
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
        assert syncer.record("acme/pirate").current.status == "rejected"
        assert syncer.record("acme/pirate").serving == serving


def test_an_unreachable_source_is_retryable_and_a_refusing_one_is_not(tmp_path, geometry):
    with moto_s3_server() as s3:
        syncer = make_syncer(tmp_path, geometry)
        options = {"endpoint_url": s3.endpoint}
        with pytest.raises(SourceRefusedError, match="bucket does not exist") as refused:
            syncer.add_source(SourceInput(uri="s3://no-such-bucket/prod", options=options))
        assert refused.value.status_code == 400
        with pytest.raises(SourceRefusedError):
            syncer.register("acme/pirate", "s3://no-such-bucket/prod/acme/pirate", options)
        assert syncer.sources() == [] and syncer.records() == []  # nothing kept
        s3.stop()
        with pytest.raises(SourceUnavailableError) as unavailable:
            syncer.add_source(SourceInput(uri="s3://bucket/prod", options=options))
        assert unavailable.value.status_code == 503
        assert syncer.sources() == []


def test_a_named_merge_is_written_to_s3_when_merged_uri_says_so(tmp_path, geometry, place):
    from adapters_store.merge_spec import MergeSpec

    with moto_s3_server() as s3:
        bucket = f"adapters-{uuid.uuid4().hex[:8]}"
        s3.client.create_bucket(Bucket=bucket)
        for adapter_id, seed in (("acme/pirate", 0), ("shared/french", 1)):
            s3.put_adapter(bucket, f"prod/{adapter_id}", {p.name: p.read_bytes() for p in place(tmp_path / adapter_id, seed).iterdir()})
        options = {"endpoint_url": s3.endpoint}
        syncer = make_syncer(tmp_path, geometry, [{"uri": f"s3://{bucket}/prod", "options": options}],
                             merged_uri=f"s3://{bucket}/merged", merged_options=options)
        syncer.sync()
        spec = MergeSpec(name="acme/blend", combination_type="linear",
                         adapters=[{"id": "acme/pirate", "weight": 0.5}, {"id": "shared/french", "weight": 0.5}])
        record, _ = syncer.merge(spec)
        assert record.source_uri == f"s3://{bucket}/merged/acme/blend" and record.status == "ready"
        keys = {o["Key"] for o in s3.client.list_objects_v2(Bucket=bucket, Prefix="merged/")["Contents"]}
        assert keys == {f"merged/acme/blend/{name}" for name in
                        ("adapter_config.json", "adapter_model.safetensors", "merge_recipe.json")}
        assert syncer.record("acme/blend").merge_recipe == spec
        assert not (tmp_path / "store" / "merged").exists()  # nothing left on the store's disk but its copy
        syncer.delete("acme/blend")
        assert s3.client.list_objects_v2(Bucket=bucket, Prefix="merged/").get("KeyCount") == 0
