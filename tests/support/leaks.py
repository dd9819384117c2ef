"""Teardown checks: what a fixture started must be gone when it is done."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from benchmarks.common import wait_until


@contextlib.contextmanager
def no_new_threads(timeout_s: float = 5.0) -> Iterator[None]:
    """Every thread started inside the block (servers, pools, engine loops) has ended by its exit."""
    before = set(threading.enumerate())
    yield
    _wait_gone(lambda: [t.name for t in _new_threads(before)], timeout_s)


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.is_alive()]


def _wait_gone(left: Callable[[], list[str]], timeout_s: float) -> None:
    try:
        wait_until(lambda: not left(), timeout_s, "threads to end")
    except TimeoutError:
        raise AssertionError(f"threads left behind: {left()}") from None
