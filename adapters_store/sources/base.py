"""What every adapter source shares: the records it returns, its Protocol, retries, error mapping.

A source lists adapters with a version string that changes whenever their files change, and
fetches one adapter's two files into a folder. A fetched folder is published with one rename
(`lora_core.files.publish_folder`), so a reader sees the old complete folder, no folder, or the
new complete folder: never a half download and never a mix of an old and a new file.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Protocol, TypeVar, runtime_checkable

from tqdm import tqdm

from lora_core.adapter_ids import adapter_dir
from lora_core.errors import InvalidAdapterError, LoraServeError, SourceError, SourceUnavailableError
from lora_core.peft_files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PICKLE_WEIGHT_FILES, PROBE_FILE

logger = logging.getLogger("adapters_store.sources")

FETCHED_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
# Files that make a folder an adapter and count in its version. Pickles are listed (so the store
# can record why the adapter is refused) but never downloaded.
KNOWN_FILES = FETCHED_FILES + (PROBE_FILE,) + PICKLE_WEIGHT_FILES

T = TypeVar("T")


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size_bytes: int | None
    etag: str  # the source's own per-file version: sha256 (local), S3 ETag, Hub blob id or LFS sha256


@dataclass(frozen=True)
class RemoteAdapter:
    """One adapter as a source sees it. `location` is a source URI of its folder (round-trips
    through `parse_source_uri`; for the Hub it is pinned to the listed commit)."""

    adapter_id: str
    location: str
    version: str
    files: tuple[RemoteFile, ...]

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes or 0 for f in self.files)

    def file(self, name: str) -> RemoteFile | None:
        return next((f for f in self.files if f.name == name), None)


@dataclass(frozen=True)
class FetchOutcome:
    """`fetch_many`'s result: one adapter's failure does not lose the others' downloads."""

    fetched: Mapping[str, Path]
    failed: Mapping[str, LoraServeError]


@runtime_checkable
class AdapterSource(Protocol):
    # The last listing's folders that are not valid adapter ids: {where: why}, for the store to report.
    skipped: dict[str, str]

    def list_adapters(self) -> dict[str, RemoteAdapter]: ...

    def version_of(self, adapter: RemoteAdapter) -> str: ...

    def fetch(self, adapter: RemoteAdapter, dest_dir: Path) -> Path: ...

    def fetch_many(
        self, adapters: Iterable[RemoteAdapter], dest_root: Path, max_workers: int = 4
    ) -> FetchOutcome: ...


def files_to_fetch(adapter: RemoteAdapter) -> tuple[RemoteFile, ...]:
    """The config and safetensors weights (and the probe when there is one), or
    InvalidAdapterError naming what is missing.

    Raised before any download so the store can record the reason (`pickle_file` when the only
    weights are a pickle, which is never downloaded or unpickled)."""
    present = [adapter.file(name) for name in FETCHED_FILES]
    if present[1] is None:
        pickles = [f.name for f in adapter.files if f.name in PICKLE_WEIGHT_FILES]
        if pickles:
            raise InvalidAdapterError(
                f"{adapter.location} holds {pickles[0]}, a pickle file; save the adapter with "
                f"safetensors ({ADAPTER_WEIGHTS_FILE}) instead",
                "pickle_file",
            )
        raise InvalidAdapterError(f"{adapter.location} has no {ADAPTER_WEIGHTS_FILE}", "missing_file")
    if present[0] is None:
        raise InvalidAdapterError(f"{adapter.location} has no {ADAPTER_CONFIG_FILE}", "missing_file")
    probe = adapter.file(PROBE_FILE)
    return (*present, probe) if probe is not None else tuple(present)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter around transient errors, bounded in attempts and time.

    Delays grow base, 2*base, 4*base... up to max_delay_s, each scaled by a random factor in
    [0.5, 1]; no sleep starts that would end past `total_timeout_s` from the first attempt."""

    max_attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    total_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_delay_s < 0 or self.max_delay_s < 0 or self.total_timeout_s < 0:
            raise ValueError(f"invalid retry policy {self}")

    def call(
        self,
        fn: Callable[[], T],
        is_transient: Callable[[BaseException], bool],
        what: str,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> T:
        """Run `fn`, retrying transient errors; the last error propagates unchanged."""
        start = clock()
        delay = self.base_delay_s
        for attempt in range(1, self.max_attempts + 1):
            try:
                return fn()
            except Exception as error:
                pause = min(delay, self.max_delay_s) * (0.5 + random.random() / 2)
                if (
                    attempt == self.max_attempts
                    or not is_transient(error)
                    or clock() - start + pause > self.total_timeout_s
                ):
                    raise
                logger.warning("%s failed (attempt %d/%d): %s; retrying in %.2f s",
                               what, attempt, self.max_attempts, error, pause)
                sleep(pause)
                delay *= 2
        raise AssertionError("unreachable")


def call_source(
    retry: RetryPolicy,
    what: str,
    fn: Callable[[], T],
    is_transient: Callable[[BaseException], bool],
    translate: Callable[[str, Exception], SourceError | None],
) -> T:
    """Run one source operation under `retry`; a client library's error that escapes becomes the
    typed error `translate` gives (unreachable vs refused), so raw botocore or huggingface_hub
    errors never leave the sources. Typed errors raised inside `fn` pass through unchanged."""
    try:
        return retry.call(fn, is_transient, what)
    except LoraServeError:
        raise
    except Exception as error:
        typed = translate(what, error)
        if typed is None:
            raise
        raise typed from error


class Progress:
    """Per-file progress: an INFO log line per file always, a tqdm bar only when asked for and
    stderr is a terminal (a job or the CLI), so tests and actors stay quiet."""

    def __init__(self, show_progress: bool = False) -> None:
        self.bars = show_progress and sys.stderr.isatty()

    @contextmanager
    def file(self, label: str, size_bytes: int | None, bar: bool = True) -> Iterator[Callable[[int], object]]:
        """Yields a callback taking byte counts; `bar=False` when the library draws its own bar."""
        started = time.monotonic()
        if bar and self.bars:
            shown = tqdm(total=size_bytes, unit="B", unit_scale=True, desc=label, leave=False)
            try:
                yield shown.update
            finally:
                shown.close()
        else:
            # No tqdm object at all: even a disabled one starts tqdm's monitor thread.
            yield lambda n: None
        logger.info("fetched %s (%s) in %.2f s", label, human_bytes(size_bytes), time.monotonic() - started)


def human_bytes(size: int | None) -> str:
    if size is None:
        return "size unknown"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class ParallelFetch:
    """`fetch_many` for any source with a thread-safe `fetch`: downloads are I/O bound."""

    def fetch(self, adapter: RemoteAdapter, dest_dir: Path) -> Path:
        raise NotImplementedError

    def fetch_many(
        self, adapters: Iterable[RemoteAdapter], dest_root: Path, max_workers: int = 4
    ) -> FetchOutcome:
        """Fetch each adapter into `<dest_root>/<tenant>/<name>`, `max_workers` at a time.

        Typed errors (source down, missing file) are collected per adapter; anything else (a
        client library's own exception) is collected as the source being unavailable, so one
        adapter's download never stops the others'."""
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        adapters = list(adapters)
        fetched: dict[str, Path] = {}
        failed: dict[str, LoraServeError] = {}
        with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="adapter-fetch") as pool:
            futures = {
                a.adapter_id: pool.submit(self.fetch, a, adapter_dir(Path(dest_root), a.adapter_id))
                for a in adapters
            }
        for adapter_id, future in futures.items():
            try:
                fetched[adapter_id] = future.result()
            except LoraServeError as error:
                failed[adapter_id] = error
            except Exception as error:
                logger.exception("fetching %s failed", adapter_id)
                failed[adapter_id] = SourceUnavailableError(f"fetching {adapter_id} failed: {type(error).__name__}")
        return FetchOutcome(fetched, failed)
