"""HubSource against a local Hub endpoint that answers the calls huggingface_hub makes, so the
real client library does the talking (the live Hub cannot be reached from here)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest

from adapters_store.sources import HubSource, RemoteAdapter
from lora_core.errors import InvalidAdapterError, InvalidRequestError, SourceRefusedError, SourceUnavailableError
from tests.support.adapter_files import FAST_RETRY, FILES, adapter_files, closed_port, read_folder


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

def test_hub_errors_are_refused_or_unavailable(hub, fake_hub):
    hub.commit(adapter_files())
    with pytest.raises(SourceRefusedError, match="revision 'nope' not found"):
        hub.source("nope").list_adapters()
    with pytest.raises(SourceRefusedError, match="not found or not accessible"):
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
