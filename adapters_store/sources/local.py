"""LocalSource: adapters in a folder, `<root>/<tenant>/<name>/{adapter_config.json, adapter_model.safetensors}`.

Two layouts: a root of many adapters (above), or, with `adapter_id=`, one adapter whose files sit
directly in the folder the URI names (`<folder>/adapter_config.json`), listed under that id.

The embedded default (`make serve`). A version is a content hash, so copying the same files over
(new mtimes) is no new version. Hashes are cached per file by (size, mtime, ctime, inode) with git's
"racy" rule: a file modified in the last couple of seconds is always rehashed, because a rewrite
within one mtime tick would otherwise keep its old hash.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

from adapters_store.sources.base import KNOWN_FILES, ParallelFetch, Progress, RemoteAdapter, RemoteFile, files_to_fetch
from lora_core.adapter_ids import LocalUri, parse_adapter_id, parse_local_uri, validate_adapter_id
from lora_core.errors import AdapterNotFoundError, InvalidAdapterIdError, InvalidRequestError, SourceUnavailableError
from lora_core.files import publish_folder

_CHUNK_BYTES = 1 << 20


class FileHashCache:
    """sha256 of files keyed by path, trusted while (size, mtime_ns, ctime_ns, inode) are unchanged
    (ctime too, as git does: a copy that keeps the mtime, onto a reused inode, still moves it).

    Bounded (`max_entries`) and scan-proof: a listing reads every file in the same order each
    time, which an LRU smaller than the root turns into no hits at all, so a full cache keeps what
    it holds and skips new files, and `keep_only` (after each full listing) drops the files no
    longer there. Thread-safe, with hit/miss counters for metrics and tests."""

    def __init__(self, max_entries: int = 65536, racy_window_s: float = 2.0) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self.racy_window_ns = int(racy_window_s * 1e9)
        self.hits = 0
        self.misses = 0
        self._entries: dict[str, tuple[tuple[int, int, int, int], str]] = {}
        self._lock = threading.Lock()

    def sha256(self, path: Path) -> tuple[str, int]:
        """(hex digest, size in bytes) of `path`."""
        stat = path.stat()
        key = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
        with self._lock:
            cached = self._entries.get(str(path))
            if cached is not None and cached[0] == key:
                self.hits += 1
                return cached[1], stat.st_size
            self.misses += 1
        digest = _hash_file(path)
        if time.time_ns() - stat.st_mtime_ns > self.racy_window_ns:
            with self._lock:
                if str(path) in self._entries or len(self._entries) < self.max_entries:
                    self._entries[str(path)] = (key, digest)
        return digest, stat.st_size

    def keep_only(self, paths: set[str]) -> None:
        """Forget every file but `paths` (those the last full listing saw)."""
        with self._lock:
            self._entries = {path: entry for path, entry in self._entries.items() if path in paths}

    def __len__(self) -> int:
        return len(self._entries)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def combined_version(files: tuple[RemoteFile, ...]) -> str:
    """One sha256 over the files' names and hashes: changes when any file does."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0{f.etag}\n".encode())
    return "sha256:" + digest.hexdigest()


class LocalSource(ParallelFetch):
    """Adapters in a local folder. Folders whose names are not valid ids are skipped; the last
    listing's skipped paths and reasons are in `skipped`.

    `adapter_id=None`: `root` holds `<tenant>/<name>/` folders. `adapter_id="acme/bot"`: `root` is
    that one adapter's folder; the listing is `{adapter_id: ...}`, or `{}` while it holds no
    adapter file. Either way a missing `root` is a SourceUnavailableError."""

    def __init__(self, root: str | Path | LocalUri, *, adapter_id: str | None = None,
                 show_progress: bool = False, hash_cache: FileHashCache | None = None) -> None:
        uri = root if isinstance(root, LocalUri) else parse_local_uri(str(root))
        self.root = uri.path
        self.adapter_id = validate_adapter_id(adapter_id) if adapter_id is not None else None
        self.hash_cache = hash_cache if hash_cache is not None else FileHashCache()
        self.skipped: dict[str, str] = {}
        self._progress = Progress(show_progress)

    @classmethod
    def from_uri(cls, uri: LocalUri, **options: object) -> "LocalSource":
        return cls(uri, **options)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        single = f", adapter_id={self.adapter_id!r}" if self.adapter_id is not None else ""
        return f"LocalSource({str(self.root)!r}{single})"

    def list_adapters(self) -> dict[str, RemoteAdapter]:
        if not self.root.is_dir():
            raise SourceUnavailableError(f"local adapter folder {self.root} does not exist or is not a folder")
        if self.adapter_id is not None:
            return self._list_single(self.adapter_id)
        adapters: dict[str, RemoteAdapter] = {}
        skipped: dict[str, str] = {}
        hashed: set[str] = set()
        for tenant_dir in sorted(self.root.iterdir()):
            if tenant_dir.name.startswith(".") or not tenant_dir.is_dir():
                continue
            for folder in sorted(tenant_dir.iterdir()):
                if folder.name.startswith(".") or not folder.is_dir():
                    continue
                try:
                    adapter = self._describe(folder, f"{tenant_dir.name}/{folder.name}")
                except (InvalidAdapterIdError, InvalidRequestError) as error:
                    skipped[str(folder)] = str(error)
                    continue
                except FileNotFoundError:
                    continue  # removed while listing: gone next time too
                if adapter is not None:
                    adapters[adapter.adapter_id] = adapter
                    hashed.update(str(folder / file.name) for file in adapter.files)
        self.skipped = skipped
        self.hash_cache.keep_only(hashed)
        return adapters

    def _list_single(self, adapter_id: str) -> dict[str, RemoteAdapter]:
        """The one adapter whose files are directly in `root` (single-adapter mode)."""
        self.skipped = {}
        try:
            adapter = self._describe(self.root, adapter_id)
        except InvalidRequestError as error:  # a file links outside the folder
            self.skipped = {str(self.root): str(error)}
            return {}
        except FileNotFoundError:
            return {}  # a file removed while listing: gone next time too
        return {adapter_id: adapter} if adapter is not None else {}

    def _describe(self, folder: Path, adapter_id: str) -> RemoteAdapter | None:
        """The adapter in `folder`, or None when it holds no adapter file (yet)."""
        parse_adapter_id(adapter_id)
        if not folder.resolve().is_relative_to(self.root.resolve()):
            raise InvalidRequestError(f"{folder} links outside the source folder {self.root}")
        files = []
        for name in KNOWN_FILES:
            path = folder / name
            if path.is_file():
                if not path.resolve().is_relative_to(self.root.resolve()):
                    raise InvalidRequestError(f"{path} links outside the source folder {self.root}")
                digest, size = self.hash_cache.sha256(path)
                files.append(RemoteFile(name, size, digest))
        if not files:
            return None
        files_t = tuple(files)
        return RemoteAdapter(adapter_id, str(LocalUri(folder)), combined_version(files_t), files_t)

    def _folder_of(self, adapter: RemoteAdapter) -> Path:
        folder = parse_local_uri(adapter.location).path
        inside = folder == self.root if self.adapter_id is not None else folder.is_relative_to(self.root)
        if not inside:
            raise InvalidRequestError(f"{adapter.location} is not in this source ({self.root})")
        return folder

    def version_of(self, adapter: RemoteAdapter) -> str:
        folder = self._folder_of(adapter)
        try:
            current = self._describe(folder, adapter.adapter_id) if folder.is_dir() else None
        except FileNotFoundError:
            current = None
        if current is None:
            raise AdapterNotFoundError(f"adapter {adapter.adapter_id} is no longer in {self.root}")
        return current.version

    def fetch(self, adapter: RemoteAdapter, dest_dir: Path) -> Path:
        """Copy the two files, hashing as it copies; refuse a copy that is not the listed version."""
        folder = self._folder_of(adapter)
        wanted = files_to_fetch(adapter)

        def write(tmp: Path) -> None:
            for remote in wanted:
                digest = hashlib.sha256()
                label = f"{adapter.adapter_id}/{remote.name}"
                try:
                    with open(folder / remote.name, "rb") as src, open(tmp / remote.name, "wb") as dst:
                        with self._progress.file(label, remote.size_bytes) as advance:
                            while chunk := src.read(_CHUNK_BYTES):
                                digest.update(chunk)
                                dst.write(chunk)
                                advance(len(chunk))
                except FileNotFoundError as error:
                    raise SourceUnavailableError(
                        f"{folder / remote.name} disappeared while copying; sync again") from error
                if digest.hexdigest() != remote.etag:
                    raise SourceUnavailableError(
                        f"{folder / remote.name} changed since it was listed; sync again to pick up the new version")

        return publish_folder(dest_dir, write)

