"""`python -m adapters_store.pull`: mirror a bucket into a folder the store can watch."""

from __future__ import annotations

import uuid

from adapters_store.pull import main
from benchmarks.moto_s3 import moto_s3_server
from tests.support.fixtures import make_syncer

WEIGHTS = "adapter_model.safetensors"


def test_pull_mirrors_a_bucket_into_a_folder_the_store_can_watch(tmp_path, geometry, place):

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
