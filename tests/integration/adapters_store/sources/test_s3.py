"""S3Source against moto's S3 server over real HTTP (boto3 does the talking)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from types import SimpleNamespace

import pytest

from adapters_store.sources import S3Source, source_for_uri
from benchmarks.moto_s3 import moto_s3_server
from lora_core.errors import AdapterNotFoundError, SourceRefusedError, SourceUnavailableError
from tests.support.adapter_files import FAST_RETRY, FILES, adapter_files, closed_port, read_folder


@pytest.fixture(scope="module")
def s3_server():
    with moto_s3_server() as server:
        yield server


@pytest.fixture
def s3(s3_server):
    """A fresh bucket; `put(adapter_id, files, prefix=...)` uploads an adapter's files."""
    client, s3_endpoint = s3_server.client, s3_server.endpoint
    bucket = f"adapters-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)

    def put(adapter_id: str, files: dict[str, bytes], prefix: str = "prod") -> None:
        for name, data in files.items():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{adapter_id}/{name}", Body=data)

    def source(prefix: str = "prod", **options) -> S3Source:
        return S3Source(bucket, prefix, endpoint_url=s3_endpoint, retry=FAST_RETRY, botocore_max_attempts=1,
                        **options)

    return SimpleNamespace(name=bucket, client=client, put=put, source=source, endpoint=s3_endpoint)

def test_s3_lists_the_prefix_layout_with_etag_versions(s3):
    s3.put("acme/bot", adapter_files(seed=1))
    s3.put("shared/sql", adapter_files(seed=2))
    s3.put("acme/other-prefix", adapter_files(seed=3), prefix="staging")
    s3.client.put_object(Bucket=s3.name, Key="prod/acme/bot/README.md", Body=b"ignored")
    s3.client.put_object(Bucket=s3.name, Key="prod/acme/too/deep/adapter_config.json", Body=b"{}")
    s3.client.put_object(Bucket=s3.name, Key="prod/Bad Tenant/x/adapter_config.json", Body=b"{}")
    source = s3.source()
    adapters = source.list_adapters()
    assert sorted(adapters) == ["acme/bot", "shared/sql"]
    assert list(source.skipped) == [f"s3://{s3.name}/prod/Bad Tenant/x/"]
    bot = adapters["acme/bot"]
    assert bot.location == f"s3://{s3.name}/prod/acme/bot"
    etags = [s3.client.head_object(Bucket=s3.name, Key=f"prod/acme/bot/{n}")["ETag"].strip('"') for n in FILES]
    assert bot.version == "+".join(etags)
    assert [f.size_bytes for f in bot.files] == [len(b) for b in adapter_files(seed=1).values()]
    assert sorted(s3.source("staging").list_adapters()) == ["acme/other-prefix"]
    assert sorted(s3.source("").list_adapters()) == []  # the bucket root has <prefix>/<tenant>/<name>/... only

def test_s3_version_changes_on_reupload(s3):
    s3.put("acme/bot", adapter_files(seed=1))
    source = s3.source()
    first = source.list_adapters()["acme/bot"]
    s3.put("acme/bot", adapter_files(seed=1))  # same bytes: same ETags
    assert source.version_of(first) == first.version
    s3.put("acme/bot", adapter_files(seed=2))
    assert source.version_of(first) != first.version
    assert source.list_adapters()["acme/bot"].version == source.version_of(first)
    s3.client.delete_objects(Bucket=s3.name, Delete={"Objects": [{"Key": f"prod/acme/bot/{n}"} for n in FILES]})
    with pytest.raises(AdapterNotFoundError):
        source.version_of(first)

def test_s3_fetch_downloads_the_listed_version(s3, tmp_path):
    s3.put("acme/bot", adapter_files(seed=1))
    source = s3.source()
    bot = source.list_adapters()["acme/bot"]
    dest = source.fetch(bot, tmp_path / "acme" / "bot")
    assert read_folder(dest) == adapter_files(seed=1)
    s3.put("acme/bot", adapter_files(seed=2))
    with pytest.raises(SourceUnavailableError, match="changed since it was listed"):
        source.fetch(bot, dest)
    assert read_folder(dest) == adapter_files(seed=1)  # the complete old copy is untouched
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bot"]

def test_s3_fetch_many_downloads_in_parallel(s3, tmp_path):
    ids = [f"tenant{i}/bot" for i in range(6)]
    for i, adapter_id in enumerate(ids):
        s3.put(adapter_id, adapter_files(seed=i))
    s3.put("acme/pickled", {"adapter_config.json": b"{}", "adapter_model.bin": b"\x80\x04"})
    barrier = threading.Barrier(2, timeout=5)

    class ProvesOverlap(S3Source):
        """Two fetches must be in flight together to pass the barrier: serial code would time out."""

        def fetch(self, adapter, dest_dir):
            if adapter.adapter_id in ("tenant0/bot", "tenant1/bot"):
                barrier.wait()
            return super().fetch(adapter, dest_dir)

    source = ProvesOverlap(s3.name, "prod", endpoint_url=s3.endpoint, retry=FAST_RETRY)
    outcome = source.fetch_many(source.list_adapters().values(), tmp_path, max_workers=4)
    assert sorted(outcome.fetched) == ids
    assert outcome.failed["acme/pickled"].reason == "pickle_file"
    for i, adapter_id in enumerate(ids):
        assert read_folder(tmp_path / adapter_id) == adapter_files(seed=i)

def test_s3_missing_bucket_is_refused_not_retried(s3, caplog):
    source = S3Source("no-such-bucket-here", endpoint_url=s3.endpoint, retry=FAST_RETRY)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="adapters_store.sources"):
        with pytest.raises(SourceRefusedError, match="bucket does not exist") as info:
            source.list_adapters()
    assert time.monotonic() - started < 2
    assert not isinstance(info.value, SourceUnavailableError)
    assert info.value.status_code == 400
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]  # permanent: no retries

def test_s3_unreachable_endpoint_retries_then_gives_up_quickly(s3_server, caplog):
    source = S3Source("adapters", endpoint_url=f"http://127.0.0.1:{closed_port()}", retry=FAST_RETRY,
                      botocore_max_attempts=1, connect_timeout_s=1)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="adapters_store.sources"):
        with pytest.raises(SourceUnavailableError, match="Could not connect") as info:
            source.list_adapters()
    assert time.monotonic() - started < 5
    assert "botocore" not in type(info.value).__module__
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == FAST_RETRY.max_attempts - 1

def test_s3_source_from_uri(s3, tmp_path):
    s3.put("acme/bot", adapter_files(seed=4), prefix="team/a")
    source = source_for_uri(f"s3://{s3.name}/team/a", endpoint_url=s3.endpoint, retry=FAST_RETRY)
    (bot,) = source.list_adapters().values()
    assert read_folder(source.fetch(bot, tmp_path / "x")) == adapter_files(seed=4)

def test_s3_single_adapter_lists_fetches_and_follows_changes(s3, tmp_path):
    s3.put("bot", adapter_files(seed=1), prefix="one")  # s3://bucket/one/bot/<files>
    s3.put("acme/nested", adapter_files(seed=2), prefix="one/bot")  # deeper: not part of it
    s3.client.put_object(Bucket=s3.name, Key="one/bot/README.md", Body=b"ignored")
    source = s3.source("one/bot", adapter_id="acme/bot")
    assert "acme/bot" in repr(source)
    adapters = source.list_adapters()
    assert list(adapters) == ["acme/bot"] and source.skipped == {}
    bot = adapters["acme/bot"]
    assert bot.location == f"s3://{s3.name}/one/bot"
    etags = [s3.client.head_object(Bucket=s3.name, Key=f"one/bot/{n}")["ETag"].strip('"') for n in FILES]
    assert bot.version == "+".join(etags)
    assert source.version_of(bot) == bot.version
    assert read_folder(source.fetch(bot, tmp_path / "acme" / "bot")) == adapter_files(seed=1)
    s3.put("bot", adapter_files(seed=3), prefix="one")
    assert source.version_of(bot) != bot.version
    assert source.list_adapters()["acme/bot"].version == source.version_of(bot)
    with pytest.raises(SourceUnavailableError, match="changed since it was listed"):
        source.fetch(bot, tmp_path / "stale")
    s3.client.delete_objects(Bucket=s3.name, Delete={"Objects": [{"Key": f"one/bot/{n}"} for n in FILES]})
    assert source.list_adapters() == {}
    with pytest.raises(AdapterNotFoundError):
        source.version_of(bot)

def test_s3_single_adapter_empty_prefix_bucket_root_and_missing_bucket(s3, tmp_path):
    assert s3.source("nothing/here", adapter_id="acme/bot").list_adapters() == {}
    for name, data in adapter_files(seed=5).items():
        s3.client.put_object(Bucket=s3.name, Key=name, Body=data)  # at the bucket root
    at_root = source_for_uri(f"s3://{s3.name}", adapter_id="acme/bot", endpoint_url=s3.endpoint, retry=FAST_RETRY)
    (bot,) = at_root.list_adapters().values()
    assert bot.location == f"s3://{s3.name}"
    assert read_folder(at_root.fetch(bot, tmp_path / "x")) == adapter_files(seed=5)
    missing = S3Source("no-such-bucket-here", "a", adapter_id="acme/bot", endpoint_url=s3.endpoint, retry=FAST_RETRY)
    with pytest.raises(SourceRefusedError, match="bucket does not exist"):
        missing.list_adapters()

def test_s3_root_of_many_adapters_at_the_bucket_root(s3, tmp_path):
    """With no prefix, adapters sit at `<tenant>/<name>/` in the bucket (keys have no leading '/')."""
    for name, data in adapter_files(seed=6).items():
        s3.client.put_object(Bucket=s3.name, Key=f"acme/bot/{name}", Body=data)
    source = s3.source("")
    bot = source.list_adapters()["acme/bot"]
    assert bot.location == f"s3://{s3.name}/acme/bot"
    assert source.version_of(bot) == bot.version
    assert read_folder(source.fetch(bot, tmp_path / "acme" / "bot")) == adapter_files(seed=6)
