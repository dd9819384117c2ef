"""Writes that a crash or a concurrent reader never sees half done, and a lock across processes.

    file_lock(path)                 an exclusive flock; the kernel drops it if the holder dies
    write_atomic(path, data)        temp file + fsync + os.replace + fsync of the folder
    publish_folder(dest, write)     `write` fills a hidden sibling folder, which then replaces `dest`
    remove_partial_folders(dest)    the hidden folders dead writers left (call it under a lock)

A published folder is the old complete folder, no folder (for an instant between two renames),
or the new complete folder: never a mix. Pure module: stdlib only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["file_lock", "fsync_dir", "publish_folder", "remove_partial_folders", "write_atomic"]

_PARTIAL_SUFFIX = ".partial"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` across processes; the kernel releases it if the holder dies,
    so a crash never wedges later starts."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder (so the rename is atomic), fsync, os.replace, fsync the folder.

    A crash before os.replace leaves the old file as it was (plus a hidden temp file that is
    removed here on an exception)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_folder(dest_dir: Path, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a temporary sibling folder, then rename it to `dest_dir`.

    The temp folder sits next to `dest_dir` (same file system, so the rename is atomic) and is
    hidden (a leading '.'), so folder scans skip it. An existing `dest_dir` is moved aside first:
    between the two renames a reader finds no folder, which reads as "not there yet", not as mixed.
    If another writer published the same folder in between, its folder stays and this raises."""
    dest_dir = Path(dest_dir)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", suffix=_PARTIAL_SUFFIX, dir=dest_dir.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        old = dest_dir.with_name(f".{dest_dir.name}.{uuid.uuid4().hex[:8]}.old{_PARTIAL_SUFFIX}")
        try:
            os.rename(dest_dir, old)
        except FileNotFoundError:
            old = None
        try:
            os.rename(tmp, dest_dir)  # fails if a concurrent writer of the same folder won the race
        except OSError:
            if old is not None and not dest_dir.exists():
                os.rename(old, dest_dir)  # put the previous complete folder back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left on failure
    return dest_dir


def remove_partial_folders(dest_dir: Path) -> None:
    """Delete the hidden temp folders of `publish_folder(dest_dir, ...)` that dead writers left.
    Only safe while holding the lock every writer of `dest_dir` takes."""
    dest_dir = Path(dest_dir)
    for leftover in dest_dir.parent.glob(f".{dest_dir.name}.*{_PARTIAL_SUFFIX}"):
        shutil.rmtree(leftover, ignore_errors=True)
