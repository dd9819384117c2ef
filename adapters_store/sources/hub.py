"""HubSource: adapters in a Hugging Face Hub model repo, through huggingface_hub.

Layouts: one adapter at the repo root (or at `subfolder`), its id given as `adapter_id` (default:
the repo id, lowercased); and/or several adapters at `<subfolder>/<tenant>/<name>/`. The version
of every adapter is the commit sha the revision resolves to, so a commit anywhere in the repo is a
new version (the files' blob ids, in `RemoteAdapter.files`, tell whether an adapter's bytes moved).

A fetch is pinned to the listed commit (commits are immutable, so the two files always match the
listed version); the first file is also asked for by revision so that huggingface_hub records
`refs/<revision>` in its cache, which offline listing needs. Files land in huggingface_hub's cache
(`cache_dir`), so an unchanged blob is never downloaded twice, and are copied from there.
With `local_files_only=True` (or HF_HUB_OFFLINE=1) listing and fetching read that cache only.

Retries: `RetryPolicy` wraps every call, but `hf_hub_download` also retries a failed metadata
request by itself (5 times, 1-8 s apart, not configurable): a Hub that goes down between listing
and fetching makes a fetch fail after about 23 s, not after `retry.total_timeout_s`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, TypeVar

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    FileMetadataError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm import tqdm

from adapters_store.sources.base import (
    KNOWN_FILES,
    ParallelFetch,
    Progress,
    RemoteAdapter,
    RemoteFile,
    RetryPolicy,
    call_source,
    files_to_fetch,
)
from lora_core.adapter_ids import HubUri, parse_adapter_id, parse_hub_uri, validate_adapter_id
from lora_core.errors import (
    AdapterNotFoundError,
    InvalidAdapterIdError,
    InvalidRequestError,
    SourceError,
    SourceRefusedError,
    SourceUnavailableError,
)
from lora_core.files import publish_folder

T = TypeVar("T")
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_REFUSED_STATUS = {401, 403}


class _SilentTqdm(tqdm):
    """huggingface_hub takes a vanilla tqdm class as is; this one never draws, and starts no
    monitor thread (tqdm starts one in `__new__`, even for a disabled bar, unless the interval is 0)."""

    monitor_interval = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, httpx2.TransportError):
        return True
    status = getattr(getattr(error, "response", None), "status_code", None)
    return isinstance(error, HfHubHTTPError) and status in _TRANSIENT_STATUS


class HubSource(ParallelFetch):
    """`token=None` uses huggingface_hub's own lookup (HF_TOKEN, then the saved login); `False`
    sends none. `endpoint=None` uses HF_ENDPOINT. `timeout_s` bounds each metadata request."""

    def __init__(
        self,
        repo_id: str,
        revision: str = "main",
        subfolder: str = "",
        *,
        adapter_id: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        endpoint: str | None = None,
        local_files_only: bool = False,
        retry: RetryPolicy = RetryPolicy(),
        timeout_s: float = 10.0,
        show_progress: bool = False,
    ) -> None:
        uri = parse_hub_uri(str(HubUri(repo_id, revision, subfolder)))  # same checks as a URI in config
        self.repo_id, self.revision, self.subfolder = uri.repo_id, uri.revision, uri.subfolder
        self.root_adapter_id = validate_adapter_id(adapter_id) if adapter_id is not None else None
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.local_files_only = local_files_only or constants.HF_HUB_OFFLINE
        self.retry = retry
        self.timeout_s = timeout_s
        self.skipped: dict[str, str] = {}
        self._token = token  # never in repr or logs
        self._api = HfApi(endpoint=self.endpoint, token=token)
        self._progress = Progress(show_progress)
        self._tqdm_class = None if self._progress.bars else _SilentTqdm

    @classmethod
    def from_uri(cls, uri: HubUri, **options: Any) -> "HubSource":
        return cls(uri.repo_id, uri.revision, uri.subfolder, **options)

    def __repr__(self) -> str:
        return f"HubSource({str(HubUri(self.repo_id, self.revision, self.subfolder))!r})"

    def _where(self) -> str:
        return f"hf://{self.repo_id}@{self.revision} on {self.endpoint or constants.ENDPOINT}"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one Hub operation under the retry policy; what escapes becomes a typed error."""
        return call_source(self.retry, what, fn, _is_transient, self._translate)

    def _translate(self, what: str, error: Exception) -> SourceError | None:
        if isinstance(error, RevisionNotFoundError):
            return SourceRefusedError(f"{what}: revision {self.revision!r} not found in {self.repo_id}")
        if isinstance(error, RepositoryNotFoundError):  # also gated repos
            return SourceRefusedError(
                f"{what}: repo {self.repo_id} not found or not accessible (check the name and the token)")
        if isinstance(error, RemoteEntryNotFoundError):
            return SourceUnavailableError(f"{what}: the file is gone; sync again")
        if isinstance(error, LocalEntryNotFoundError):
            return SourceUnavailableError(
                f"{what}: not in the local cache and the Hub was not asked or not reachable: {error}")
        if isinstance(error, (httpx2.TransportError, ConnectionError)):
            return SourceUnavailableError(f"{what}: cannot reach the Hub: {error}")
        if isinstance(error, HfHubHTTPError) and getattr(error.response, "status_code", None) in _REFUSED_STATUS:
            return SourceRefusedError(f"{what}: the Hub refused the token: {error}")
        if isinstance(error, (HfHubHTTPError, FileMetadataError, OSError)):
            return SourceUnavailableError(f"{what}: {type(error).__name__}: {error}")
        return None

    def _snapshot(self) -> tuple[str, dict[str, RemoteFile]]:
        """(commit sha, files by repo path) for the revision, from the Hub or the local cache."""
        if self.local_files_only:
            folder = Path(self._call(f"reading the cached snapshot of {self._where()}", lambda: snapshot_download(
                self.repo_id, revision=self.revision, cache_dir=self.cache_dir, local_files_only=True)))
            files = {}
            for path in folder.rglob("*"):
                if path.is_file():
                    blob = path.resolve()
                    etag = blob.name if blob.parent.name == "blobs" else ""
                    rel = path.relative_to(folder).as_posix()
                    files[rel] = RemoteFile(path.name, blob.stat().st_size, etag)
            return folder.name, files
        info = self._call(f"reading {self._where()}", lambda: self._api.model_info(
            self.repo_id, revision=self.revision, files_metadata=True, timeout=self.timeout_s))
        files = {
            s.rfilename: RemoteFile(
                s.rfilename.rsplit("/", 1)[-1], s.size, s.lfs.sha256 if s.lfs else (s.blob_id or ""))
            for s in info.siblings or []
        }
        if not info.sha:
            raise SourceUnavailableError(f"{self._where()} answered without a commit sha")
        return info.sha, files

    def _group(self, sha: str, files: dict[str, RemoteFile]) -> dict[str, RemoteAdapter]:
        base = f"{self.subfolder}/" if self.subfolder else ""
        found: dict[tuple[str, str], dict[str, RemoteFile]] = {}  # (adapter id, folder) -> files
        skipped: dict[str, str] = {}
        for path, remote in files.items():
            if not path.startswith(base) or remote.name not in KNOWN_FILES:
                continue
            parts = path[len(base):].split("/")
            if len(parts) == 1:
                adapter_id, folder = self.root_adapter_id or self.repo_id.lower(), self.subfolder
            elif len(parts) == 3:
                adapter_id, folder = f"{parts[0]}/{parts[1]}", base + f"{parts[0]}/{parts[1]}"
            else:
                continue
            try:
                parse_adapter_id(adapter_id)
            except InvalidAdapterIdError as error:
                skipped[folder or self.repo_id] = f"{error}" + (
                    "; pass adapter_id= for an adapter at the repo root" if len(parts) == 1 else "")
                continue
            found.setdefault((adapter_id, folder), {})[remote.name] = remote
        self.skipped = skipped
        adapters = {}
        for (adapter_id, folder), by_name in found.items():
            ordered = tuple(by_name[name] for name in KNOWN_FILES if name in by_name)
            location = str(HubUri(self.repo_id, sha, folder))
            adapters[adapter_id] = RemoteAdapter(adapter_id, location, sha, ordered)
        return adapters

    def list_adapters(self) -> dict[str, RemoteAdapter]:
        return self._group(*self._snapshot())

    def version_of(self, adapter: RemoteAdapter) -> str:
        """One model-info call: the sha the revision points at now."""
        current = self.list_adapters().get(adapter.adapter_id)
        if current is None:
            raise AdapterNotFoundError(f"adapter {adapter.adapter_id} is no longer in {self._where()}")
        return current.version

    def fetch(self, adapter: RemoteAdapter, dest_dir: Path) -> Path:
        where = parse_hub_uri(adapter.location)
        if where.repo_id != self.repo_id:
            raise InvalidRequestError(f"{adapter.location} is not in repo {self.repo_id}")
        wanted = files_to_fetch(adapter)

        def download(name: str, revision: str) -> Path:
            label = f"{adapter.adapter_id}/{name}"
            return Path(self._call(f"downloading {label} from {self._where()}", lambda: hf_hub_download(
                self.repo_id, name, subfolder=where.subfolder or None, revision=revision,
                cache_dir=self.cache_dir, token=self._token, endpoint=self.endpoint, etag_timeout=self.timeout_s,
                local_files_only=self.local_files_only, tqdm_class=self._tqdm_class)))

        def write(tmp: Path) -> None:
            for index, remote in enumerate(wanted):
                with self._progress.file(f"{adapter.adapter_id}/{remote.name}", remote.size_bytes, bar=False):
                    # The first file by revision, so huggingface_hub records refs/<revision> (offline
                    # listing reads it); if the revision moved since listing, again by the listed sha.
                    cached = download(remote.name, self.revision if index == 0 else where.revision)
                    snapshot = cached.parents[len(where.subfolder.split("/")) if where.subfolder else 0]
                    if snapshot.name != where.revision:
                        cached = download(remote.name, where.revision)
                shutil.copyfile(cached, tmp / remote.name)

        return publish_folder(dest_dir, write)

