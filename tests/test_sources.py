"""Adapter sources: a local folder, S3 (moto's server over real HTTP) and the Hub (a local endpoint
that answers the calls huggingface_hub makes, so the real client library does the talking)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import boto3
import pytest
import torch
from botocore.config import Config
from safetensors.torch import save, save_file

from adapters_store.sources import (
    AdapterSource,
    FileHashCache,
    HubSource,
    LocalSource,
    RemoteAdapter,
    RetryPolicy,
    S3Source,
    source_for_uri,
)
from adapters_store.sources.base import publish_folder
from deployments.errors import (
    AdapterNotFoundError,
    InvalidAdapterError,
    InvalidAdapterIdError,
    InvalidRequestError,
    SourceUnavailableError,
)

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.02, total_timeout_s=2.0)
FILES = ("adapter_config.json", "adapter_model.safetensors")


# --- a tiny PEFT LoRA checkpoint ---------------------------------------------------------------

def adapter_files(r: int = 4, seed: int = 0, hidden: int = 16) -> dict[str, bytes]:
    """The two files of a valid PEFT LoRA adapter on q_proj/v_proj of one layer, as bytes."""
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "task_type": "CAUSAL_LM",
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in ("q_proj", "v_proj"):
        key = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, hidden, generator=gen)  # [r, in]
        tensors[f"{key}.lora_B.weight"] = torch.randn(hidden, r, generator=gen)  # [out, r]
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": save(tensors)}


def write_adapter(folder: Path, r: int = 4, seed: int = 0) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    files = adapter_files(r, seed)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(autouse=True, scope="module")
def no_threads_left_behind():
    """Servers, download pools and clients must all be gone when the module is done."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while (left := [t for t in threading.enumerate() if t not in before]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"threads left behind: {left}"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_safetensors_helper_matches_save_file(tmp_path):
    """The bytes helper writes what safetensors.torch.save_file would (so tests use real files)."""
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 3)}
    save_file(tensors, tmp_path / "a.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == save(tensors)


def test_public_surface_is_pinned():
    import adapters_store.sources as sources

    assert sorted(sources.__all__) == sorted([
        "AdapterSource", "FetchOutcome", "FileHashCache", "HubSource", "LocalSource", "RemoteAdapter",
        "RemoteFile", "RetryPolicy", "S3Source", "SOURCE_TYPES", "source_for_uri", "source_options"])
    assert sorted(sources.SOURCE_TYPES) == ["file", "hf", "s3"]


def test_sources_satisfy_the_protocol(tmp_path):
    assert isinstance(LocalSource(tmp_path), AdapterSource)
    assert isinstance(HubSource("org/repo", endpoint="http://127.0.0.1:1"), AdapterSource)
    assert isinstance(S3Source("bucket-x", endpoint_url="http://127.0.0.1:1"), AdapterSource)


def test_source_for_uri_picks_by_scheme_and_checks_options(tmp_path):
    assert isinstance(source_for_uri(str(tmp_path)), LocalSource)
    assert isinstance(source_for_uri(tmp_path.as_uri()), LocalSource)
    s3 = source_for_uri("s3://bucket-x/prod", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Source) and (s3.bucket, s3.prefix) == ("bucket-x", "prod")
    hub = source_for_uri("hf://org/repo/adapters@v2", token="hf_x")
    assert isinstance(hub, HubSource) and (hub.revision, hub.subfolder) == ("v2", "adapters")
    assert "hf_x" not in repr(hub)
    with pytest.raises(InvalidRequestError, match="endpoint_url"):
        source_for_uri(str(tmp_path), endpoint_url="http://x")
    with pytest.raises(InvalidRequestError, match="unsupported scheme"):
        source_for_uri("gs://bucket/x")


# --- shared pieces -----------------------------------------------------------------------------

def test_retry_policy_retries_transient_errors_with_growing_delays():
    sleeps: list[float] = []
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    policy = RetryPolicy(max_attempts=4, base_delay_s=1.0, max_delay_s=10.0, total_timeout_s=60.0)
    assert policy.call(flaky, lambda e: isinstance(e, ConnectionError), "op", sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0


def test_retry_policy_gives_up_on_permanent_errors_attempts_and_time():
    sleeps: list[float] = []
    with pytest.raises(ValueError):
        RetryPolicy().call(lambda: (_ for _ in ()).throw(ValueError("bad")), lambda e: False, "op", sleep=sleeps.append)
    assert sleeps == []

    def down():
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        RetryPolicy(max_attempts=3, base_delay_s=0.0).call(down, lambda e: True, "op", sleep=sleeps.append)
    assert len(sleeps) == 2
    now = [0.0]
    sleeps.clear()
    policy = RetryPolicy(max_attempts=100, base_delay_s=1.0, max_delay_s=1.0, total_timeout_s=5.0)

    def advance(s):
        sleeps.append(s)
        now[0] += s

    with pytest.raises(ConnectionError):
        policy.call(down, lambda e: True, "op", sleep=advance, clock=lambda: now[0])
    assert sum(sleeps) <= 5.0 and len(sleeps) < 12


def test_publish_folder_is_all_or_nothing(tmp_path):
    dest = tmp_path / "acme" / "bot"
    write_adapter(dest, seed=1)
    before = read_folder(dest)

    def half_written(tmp: Path) -> None:
        (tmp / "adapter_config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_folder(dest, half_written)
    assert read_folder(dest) == before
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bot"]  # no temp or old folders left

    publish_folder(dest, lambda tmp: (tmp / "adapter_config.json").write_text('{"new": 1}'))
    assert read_folder(dest) == {"adapter_config.json": b'{"new": 1}'}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bot"]


# --- LocalSource -------------------------------------------------------------------------------

@pytest.fixture
def local_root(tmp_path):
    root = tmp_path / "src"
    write_adapter(root / "acme" / "bot", seed=1)
    write_adapter(root / "shared" / "sql", r=8, seed=2)
    (root / "acme" / "empty").mkdir()  # no files yet: not an adapter
    write_adapter(root / "Bad Tenant" / "x")
    write_adapter(root / "acme" / "UPPER")
    write_adapter(root / ".staging" / "x")
    return root


def test_local_lists_valid_adapters_and_reports_skipped_ones(local_root):
    source = LocalSource(local_root)
    adapters = source.list_adapters()
    assert sorted(adapters) == ["acme/bot", "shared/sql"]
    bot = adapters["acme/bot"]
    assert bot.version.startswith("sha256:")
    assert [f.name for f in bot.files] == list(FILES)
    assert bot.size_bytes == sum(len(b) for b in adapter_files(seed=1).values())
    assert bot.files[1].etag == hashlib.sha256(adapter_files(seed=1)["adapter_model.safetensors"]).hexdigest()
    assert sorted(Path(p).name for p in source.skipped) == ["UPPER", "x"]
    assert any("uppercase" in reason for reason in source.skipped.values())
    assert source.version_of(bot) == bot.version
    assert pickle.loads(pickle.dumps(bot)) == bot  # records cross Ray actor boundaries


def test_local_version_follows_content_not_mtime(local_root):
    source = LocalSource(local_root)
    first = source.list_adapters()["acme/bot"]
    folder = local_root / "acme" / "bot"
    write_adapter(folder, seed=1)  # same bytes again, new mtime
    assert source.list_adapters()["acme/bot"].version == first.version
    write_adapter(folder, seed=99)  # same sizes, new weights
    changed = source.list_adapters()["acme/bot"]
    assert changed.version != first.version
    assert source.version_of(first) == changed.version
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 3}))
    assert source.list_adapters()["acme/bot"].version not in (first.version, changed.version)


def test_local_hash_cache_skips_rehashing_unchanged_files(local_root):
    old = time.time() - 3600
    for path in local_root.rglob("*"):
        os.utime(path, (old, old))
    cache = FileHashCache(max_entries=8)
    source = LocalSource(local_root, hash_cache=cache)
    first = source.list_adapters()
    assert (cache.misses, cache.hits) == (4, 0)
    assert source.list_adapters() == first
    assert (cache.misses, cache.hits) == (4, 4)
    small = FileHashCache(max_entries=2)
    assert LocalSource(local_root, hash_cache=small).list_adapters() == first
    assert len(small) == 2  # bounded


def test_local_hash_cache_rehashes_recently_written_files(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"a" * 10)
    cache = FileHashCache()
    first, _ = cache.sha256(path)
    stat = path.stat()
    path.write_bytes(b"b" * 10)  # same size; maybe the same mtime tick
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.sha256(path)[0] != first


def test_local_fetch_copies_both_files(local_root, tmp_path):
    source = LocalSource(local_root)
    bot = source.list_adapters()["acme/bot"]
    dest = source.fetch(bot, tmp_path / "dest" / "acme" / "bot")
    assert read_folder(dest) == adapter_files(seed=1)


def test_fetch_logs_each_file_with_its_size(local_root, tmp_path, caplog):
    source = LocalSource(local_root, show_progress=True)  # stderr is not a TTY here: log lines only
    bot = source.list_adapters()["acme/bot"]
    with caplog.at_level(logging.INFO, logger="adapters_store.sources"):
        source.fetch(bot, tmp_path / "dest")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith(f"fetched acme/bot/adapter_config.json ({bot.files[0].size_bytes} B) in ")
    assert lines[1].startswith("fetched acme/bot/adapter_model.safetensors (1.5 KB) in ")


def test_local_fetch_refuses_a_version_that_changed_after_listing(local_root, tmp_path):
    source = LocalSource(local_root)
    bot = source.list_adapters()["acme/bot"]
    write_adapter(local_root / "acme" / "bot", seed=5)
    with pytest.raises(SourceUnavailableError, match="changed since it was listed"):
        source.fetch(bot, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_local_missing_weights_and_pickles_are_refused_at_fetch(local_root, tmp_path):
    (local_root / "acme" / "nocfg").mkdir()
    (local_root / "acme" / "nocfg" / "adapter_model.safetensors").write_bytes(
        adapter_files()["adapter_model.safetensors"])
    (local_root / "acme" / "pickled").mkdir()
    (local_root / "acme" / "pickled" / "adapter_config.json").write_text("{}")
    (local_root / "acme" / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    source = LocalSource(local_root)
    adapters = source.list_adapters()
    with pytest.raises(InvalidAdapterError) as info:
        source.fetch(adapters["acme/pickled"], tmp_path / "d1")
    assert info.value.reason == "pickle_file"
    with pytest.raises(InvalidAdapterError) as info:
        source.fetch(adapters["acme/nocfg"], tmp_path / "d2")
    assert info.value.reason == "missing_file"
    outcome = source.fetch_many(adapters.values(), tmp_path / "many")
    assert sorted(outcome.fetched) == ["acme/bot", "shared/sql"]
    assert {k: v.reason for k, v in outcome.failed.items()} == {"acme/nocfg": "missing_file",
                                                                "acme/pickled": "pickle_file"}
    assert read_folder(tmp_path / "many" / "shared" / "sql") == adapter_files(r=8, seed=2)


def test_local_removed_adapter_and_missing_root(local_root, tmp_path):
    source = LocalSource(local_root)
    bot = source.list_adapters()["acme/bot"]
    for name in FILES:
        (local_root / "acme" / "bot" / name).unlink()
    with pytest.raises(AdapterNotFoundError):
        source.version_of(bot)
    with pytest.raises(SourceUnavailableError, match="does not exist"):
        LocalSource(tmp_path / "nowhere").list_adapters()


def test_local_symlink_out_of_the_root_is_skipped(local_root, tmp_path):
    outside = tmp_path / "outside"
    write_adapter(outside)
    (local_root / "acme" / "escape").symlink_to(outside, target_is_directory=True)
    source = LocalSource(local_root)
    assert "acme/escape" not in source.list_adapters()
    assert any("outside" in reason for reason in source.skipped.values())


# --- S3Source against moto's server ------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        # boto3's standard credential chain, fed by env; no profile or real AWS config is read.
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent",
                            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()
            inner = getattr(server, "_server", None)
            if inner is not None:
                inner.server_close()


@pytest.fixture
def s3(s3_endpoint):
    """A fresh bucket; `put(adapter_id, files, prefix=...)` uploads an adapter's files."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, config=Config(retries={"total_max_attempts": 1}))
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


def test_s3_missing_bucket_is_source_unavailable(s3):
    source = S3Source("no-such-bucket-here", endpoint_url=s3.endpoint, retry=FAST_RETRY)
    started = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="bucket does not exist") as info:
        source.list_adapters()
    assert time.monotonic() - started < 2
    assert info.value.status_code == 503


def test_s3_unreachable_endpoint_retries_then_gives_up_quickly(s3_endpoint, caplog):
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


# --- HubSource against a local Hub endpoint ----------------------------------------------------

class FakeHub:
    """The endpoints huggingface_hub 2.x calls for model_info and hf_hub_download.

    GET  /api/models/{org}/{repo}[/revision/{rev}]  -> {"id", "sha", "siblings": [...]}
    HEAD /{org}/{repo}/resolve/{rev}/{path}          -> X-Repo-Commit, ETag, Content-Length
    GET  /{org}/{repo}/resolve/{rev}/{path}          -> the bytes
    Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound) as the Hub's do.
    """

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> sha -> files
        self.refs: dict[str, dict[str, str]] = {}  # repo -> ref -> sha
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                hub._handle(self, head=False)

            def do_HEAD(self):
                hub._handle(self, head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def commit(self, repo: str, files: dict[str, bytes], ref: str = "main") -> str:
        """A new commit of `files` (the whole tree) on `ref`; returns its 40-hex sha."""
        sha = hashlib.sha1(f"{repo}{len(self.commits.get(repo, {}))}{uuid.uuid4()}".encode()).hexdigest()
        self.commits.setdefault(repo, {})[sha] = dict(files)
        self.refs.setdefault(repo, {})[ref] = sha
        return sha

    def _resolve(self, repo: str, rev: str) -> str | None:
        if rev in self.commits.get(repo, {}):
            return rev
        return self.refs.get(repo, {}).get(rev)

    @staticmethod
    def _etag(path: str, data: bytes) -> str:
        if path.endswith(".safetensors"):  # LFS files: sha256; git files: the git blob sha1
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def _handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        path = urlsplit(req.path).path
        self.requests.append((req.command, path, req.headers.get("authorization")))
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "models"]:
            repo = "/".join(parts[2:4])
            rev = parts[5] if len(parts) > 5 and parts[4] == "revision" else "main"
            if repo not in self.commits:
                return self._error(req, 404, "RepoNotFound")
            sha = self._resolve(repo, rev)
            if sha is None:
                return self._error(req, 404, "RevisionNotFound")
            siblings = []
            for name, data in sorted(self.commits[repo][sha].items()):
                entry = {"rfilename": name, "size": len(data), "blobId": self._etag(name, data)}
                if name.endswith(".safetensors"):
                    entry["lfs"] = {"size": len(data), "sha256": self._etag(name, data), "pointerSize": 134}
                siblings.append(entry)
            body = json.dumps({"id": repo, "sha": sha, "siblings": siblings}).encode()
            return self._send(req, 200, {"Content-Type": "application/json"}, body, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            if repo not in self.commits:
                return self._error(req, 404, "RepoNotFound")
            sha = self._resolve(repo, rev)
            if sha is None:
                return self._error(req, 404, "RevisionNotFound")
            data = self.commits[repo][sha].get(name)
            if data is None:
                return self._error(req, 404, "EntryNotFound", {"X-Repo-Commit": sha})
            headers = {"X-Repo-Commit": sha, "ETag": f'"{self._etag(name, data)}"',
                       "Content-Type": "application/octet-stream"}
            return self._send(req, 200, headers, data, head)
        return self._error(req, 404, "RepoNotFound")

    def _error(self, req, status, code, extra=None):
        self._send(req, status, {"X-Error-Code": code, **(extra or {})}, b'{"error": "%s"}' % code.encode(), False)

    @staticmethod
    def _send(req, status, headers, body, head):
        req.send_response(status)
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def fake_hub():
    with FakeHub() as hub:
        yield hub


@pytest.fixture
def hub(fake_hub, tmp_path, monkeypatch):
    """A fresh repo name on the fake Hub and a HubSource factory with its own cache.

    conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported, which reads it once into
    `constants`; these tests talk to a local endpoint, so they lift it there."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    repo = f"org/repo-{uuid.uuid4().hex[:8]}"

    def source(revision="main", subfolder="", **options) -> HubSource:
        options = {"endpoint": fake_hub.url, "cache_dir": tmp_path / "hf-cache", "token": "hf_test_token",
                   "retry": FAST_RETRY, **options}
        return HubSource(repo, revision, subfolder, **options)

    return SimpleNamespace(name=repo, server=fake_hub, source=source, cache=tmp_path / "hf-cache",
                           commit=lambda files, ref="main": fake_hub.commit(repo, files, ref))


def test_hub_single_adapter_at_the_root(hub, tmp_path):
    sha = hub.commit(adapter_files(seed=1))
    source = hub.source(adapter_id="acme/bot")
    adapters = source.list_adapters()
    assert list(adapters) == ["acme/bot"]
    bot = adapters["acme/bot"]
    assert bot.version == sha
    assert bot.location == f"hf://{hub.name}@{sha}"
    assert bot.files[1].etag == hashlib.sha256(adapter_files(seed=1)["adapter_model.safetensors"]).hexdigest()
    assert source.version_of(bot) == sha
    dest = source.fetch(bot, tmp_path / "out" / "acme" / "bot")
    assert read_folder(dest) == adapter_files(seed=1)
    auth = {a for (_, p, a) in hub.server.requests if hub.name in p}
    assert auth == {"Bearer hf_test_token"}
    # the default id is the repo id, lowercased
    assert list(hub.source().list_adapters()) == [hub.name]


def test_hub_several_adapters_in_subfolders(hub, tmp_path):
    files = {f"adapters/acme/bot/{k}": v for k, v in adapter_files(seed=1).items()}
    files |= {f"adapters/shared/sql/{k}": v for k, v in adapter_files(seed=2).items()}
    files |= {"adapters/Bad/x/adapter_config.json": b"{}", "README.md": b"# adapters"}
    sha = hub.commit(files)
    source = hub.source(subfolder="adapters")
    adapters = source.list_adapters()
    assert sorted(adapters) == ["acme/bot", "shared/sql"]
    assert {a.version for a in adapters.values()} == {sha}
    assert list(source.skipped) == ["adapters/Bad/x"]
    outcome = source.fetch_many(adapters.values(), tmp_path / "out", max_workers=2)
    assert not outcome.failed
    assert read_folder(outcome.fetched["shared/sql"]) == adapter_files(seed=2)
    assert read_folder(tmp_path / "out" / "acme" / "bot") == adapter_files(seed=1)


def test_hub_new_commit_is_a_new_version_and_revisions_pin(hub, tmp_path):
    old_sha = hub.commit(adapter_files(seed=1), ref="v1")
    hub.commit(adapter_files(seed=1))
    new_sha = hub.commit(adapter_files(seed=2))
    latest = hub.source(adapter_id="acme/bot")
    assert latest.list_adapters()["acme/bot"].version == new_sha
    for pinned in (hub.source("v1", adapter_id="acme/bot"), hub.source(old_sha, adapter_id="acme/bot")):
        bot = pinned.list_adapters()["acme/bot"]
        assert bot.version == old_sha
        assert read_folder(pinned.fetch(bot, tmp_path / pinned.revision)) == adapter_files(seed=1)


def test_hub_fetch_stays_on_the_listed_commit_when_the_branch_moves(hub, tmp_path):
    hub.commit(adapter_files(seed=1))
    source = hub.source(adapter_id="acme/bot")
    bot = source.list_adapters()["acme/bot"]
    hub.commit(adapter_files(seed=2))
    assert read_folder(source.fetch(bot, tmp_path / "out")) == adapter_files(seed=1)


def test_hub_offline_reads_a_prepared_cache(hub, tmp_path):
    from huggingface_hub import hf_hub_download
    from tqdm import tqdm

    class NoBar(tqdm):
        monitor_interval = 0  # else tqdm starts its monitor thread, even for a disabled bar

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    sha = hub.commit(adapter_files(seed=3))
    for name in FILES:  # prepared the way a user would, by the library itself
        hf_hub_download(hub.name, name, cache_dir=hub.cache, endpoint=hub.server.url, token=False, tqdm_class=NoBar)
    seen = len(hub.server.requests)
    offline = hub.source(adapter_id="acme/bot", local_files_only=True)
    bot = offline.list_adapters()["acme/bot"]
    assert bot.version == sha
    assert read_folder(offline.fetch(bot, tmp_path / "out")) == adapter_files(seed=3)
    assert len(hub.server.requests) == seen  # not one request
    empty = hub.source(adapter_id="acme/bot", local_files_only=True, cache_dir=tmp_path / "empty-cache")
    with pytest.raises(SourceUnavailableError, match="local cache"):
        empty.list_adapters()


def test_hub_online_fetch_prepares_the_cache_for_offline_use(hub, tmp_path):
    sha = hub.commit(adapter_files(seed=4))
    online = hub.source(adapter_id="acme/bot")
    online.fetch(online.list_adapters()["acme/bot"], tmp_path / "a")
    offline = hub.source(adapter_id="acme/bot", local_files_only=True, endpoint=f"http://127.0.0.1:{closed_port()}")
    bot = offline.list_adapters()["acme/bot"]
    assert bot.version == sha
    assert read_folder(offline.fetch(bot, tmp_path / "b")) == adapter_files(seed=4)


def test_hub_pickle_only_adapter_is_refused_at_fetch(hub, tmp_path):
    hub.commit({"adapter_config.json": b"{}", "adapter_model.bin": b"\x80\x04"})
    source = hub.source(adapter_id="acme/bot")
    with pytest.raises(InvalidAdapterError) as info:
        source.fetch(source.list_adapters()["acme/bot"], tmp_path / "out")
    assert info.value.reason == "pickle_file"


def test_hub_errors_are_source_unavailable(hub, fake_hub):
    hub.commit(adapter_files())
    with pytest.raises(SourceUnavailableError, match="revision 'nope' not found"):
        hub.source("nope").list_adapters()
    with pytest.raises(SourceUnavailableError, match="not found or not accessible"):
        HubSource("org/missing", endpoint=fake_hub.url, token=False, retry=FAST_RETRY).list_adapters()
    started = time.monotonic()
    down = HubSource("org/repo", endpoint=f"http://127.0.0.1:{closed_port()}", token=False, retry=FAST_RETRY)
    with pytest.raises(SourceUnavailableError, match="cannot reach the Hub"):
        down.list_adapters()
    assert time.monotonic() - started < 5


def test_fetch_refuses_an_adapter_from_another_source(hub, tmp_path):
    foreign = RemoteAdapter("acme/bot", "hf://other/repo@main", "x", ())
    with pytest.raises(InvalidRequestError):
        hub.source().fetch(foreign, tmp_path / "x")


# --- single-adapter mode: the URI is one adapter's folder --------------------------------------

def test_local_single_adapter_lists_fetches_and_follows_changes(tmp_path):
    folder = tmp_path / "bot"
    write_adapter(folder, seed=1)
    write_adapter(folder / "acme" / "nested", seed=2)  # below the folder: not part of it
    source = LocalSource(folder, adapter_id="acme/bot")
    assert "acme/bot" in repr(source)
    adapters = source.list_adapters()
    assert list(adapters) == ["acme/bot"]
    bot = adapters["acme/bot"]
    assert bot.location == folder.as_uri()
    assert [f.name for f in bot.files] == list(FILES)
    assert source.version_of(bot) == bot.version
    assert read_folder(source.fetch(bot, tmp_path / "out" / "acme" / "bot")) == adapter_files(seed=1)
    write_adapter(folder, seed=3)
    assert source.version_of(bot) != bot.version
    assert source.list_adapters()["acme/bot"].version == source.version_of(bot)
    with pytest.raises(SourceUnavailableError, match="changed since it was listed"):
        source.fetch(bot, tmp_path / "stale")
    outcome = source.fetch_many(source.list_adapters().values(), tmp_path / "many")
    assert read_folder(tmp_path / "many" / "acme" / "bot") == adapter_files(seed=3) and not outcome.failed
    # an adapter listed by a root source over a subfolder is not this source's
    nested = LocalSource(folder).list_adapters()["acme/nested"]
    with pytest.raises(InvalidRequestError, match="not in this source"):
        source.fetch(nested, tmp_path / "other")


def test_local_single_adapter_empty_missing_and_removed(tmp_path):
    folder = tmp_path / "bot"
    folder.mkdir()
    source = LocalSource(folder, adapter_id="shared/bot")
    assert source.list_adapters() == {}  # no adapter file yet
    write_adapter(folder)
    bot = source.list_adapters()["shared/bot"]
    for name in FILES:
        (folder / name).unlink()
    assert source.list_adapters() == {}
    with pytest.raises(AdapterNotFoundError):
        source.version_of(bot)
    with pytest.raises(SourceUnavailableError, match="does not exist"):
        LocalSource(tmp_path / "nowhere", adapter_id="acme/bot").list_adapters()


def test_local_single_adapter_file_linking_outside_is_skipped(tmp_path):
    outside = tmp_path / "outside"
    write_adapter(outside)
    folder = tmp_path / "bot"
    folder.mkdir()
    for name in FILES:
        (folder / name).symlink_to(outside / name)
    source = LocalSource(folder, adapter_id="acme/bot")
    assert source.list_adapters() == {}
    assert list(source.skipped) == [str(folder)] and "outside" in source.skipped[str(folder)]


@pytest.mark.parametrize("bad", ["acme", "Acme/bot", "acme/../bot", "acme/bot/x", "", "/acme/bot"])
def test_single_adapter_ids_are_validated(tmp_path, bad):
    with pytest.raises(InvalidAdapterIdError):
        LocalSource(tmp_path, adapter_id=bad)
    with pytest.raises(InvalidAdapterIdError):
        S3Source("bucket-x", "a", adapter_id=bad, endpoint_url="http://127.0.0.1:1")
    with pytest.raises(InvalidAdapterIdError):
        source_for_uri(tmp_path.as_uri(), adapter_id=bad)


def test_source_for_uri_takes_adapter_id_for_every_scheme(tmp_path):
    local = source_for_uri(tmp_path.as_uri(), adapter_id="acme/bot")
    assert isinstance(local, LocalSource) and local.adapter_id == "acme/bot"
    s3 = source_for_uri("s3://bucket-x/one/bot", adapter_id="acme/bot", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Source) and (s3.prefix, s3.adapter_id) == ("one/bot", "acme/bot")
    hub = source_for_uri("hf://org/repo", adapter_id="acme/bot")
    assert isinstance(hub, HubSource) and hub.root_adapter_id == "acme/bot"
    assert source_for_uri(str(tmp_path)).adapter_id is None  # default: a root of many adapters


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
    with pytest.raises(SourceUnavailableError, match="bucket does not exist"):
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
