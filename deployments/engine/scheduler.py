"""The engine's loop thread: it owns the model and runs commands and batches in turn.

Commands (swap a version in, delete, pin, evict: `call`) run between batches, so a swap always
lands between batches: a request never sees a half-swapped adapter, requests in flight finish on
the version they started with, the next ones see the new one. Requests that arrive within
`batch_wait_ms` of each other share a batch whatever their adapters, up to `max_batch_size` rows
and `num_slots` distinct adapters. A request whose adapter is not in the host cache waits while
a loader thread brings it (once however many wait for it) and other batches keep running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

import torch

from deployments.engine.generation import BatchGenerator, GenerationRow
from deployments.engine.handles import RequestHandle
from deployments.engine.residency import AdapterResidency
from deployments.engine.slots import BASE_SLOT
from lora_core.errors import EngineClosedError, LoraServeError, SlotsExhaustedError

__all__ = ["Scheduler"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
IDLE_WAIT_S = 0.1


class Scheduler:
    """Implements `residency.ModelLoop` for the residency it serves (`start(residency)`)."""

    def __init__(self, generator: BatchGenerator, max_batch_size: int, batch_wait_ms: float) -> None:
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.batch_wait_ms = batch_wait_ms
        self.residency: AdapterResidency | None = None
        self._pending: deque[RequestHandle] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._running_rows = 0
        self.batches_run = 0
        self.rows_run = 0
        self.tokens_generated = 0
        self._thread = threading.Thread(target=self._run, name="lora-engine", daemon=True)

    def start(self, residency: AdapterResidency) -> None:
        self.residency = residency
        self._thread.start()

    # ---- ModelLoop ------------------------------------------------------------------------------

    def call(self, function: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return function()
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            self._commands.append((function, future))
            self._wake.notify()
        return future.result()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def fail_waiting(self, adapter_id: str, error: BaseException) -> None:
        with self._wake:
            doomed = [h for h in self._pending if h.adapter_id == adapter_id]
            for handle in doomed:
                self._pending.remove(handle)
        for handle in doomed:
            handle.fail(error)

    # ---- requests -------------------------------------------------------------------------------

    def enqueue(self, handle: RequestHandle) -> None:
        with self._wake:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            self._pending.append(handle)
            self._wake.notify()
        adapter_id = handle.adapter_id
        if adapter_id is not None and not self.residency.is_cached(adapter_id):
            self._start_load(adapter_id)

    def pending(self) -> list[RequestHandle]:
        with self._wake:
            return list(self._pending)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queue_len(self) -> int:
        """Requests queued or running."""
        with self._wake:
            return len(self._pending) + self._running_rows

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        with self._wake:
            left, self._pending = list(self._pending), deque()
        for handle in left:
            handle.fail(EngineClosedError("the engine shut down before this request ran"))

    # ---- the loop -------------------------------------------------------------------------------

    def _start_load(self, adapter_id: str) -> None:
        future = self.residency.start_load(adapter_id)
        future.add_done_callback(lambda done: self._on_loaded(adapter_id, done))

    def _on_loaded(self, adapter_id: str, future: Future) -> None:
        error = future.exception()
        if error is not None:
            self.fail_waiting(adapter_id, error)
        else:
            self.wake()

    def _ready(self, handle: RequestHandle) -> bool:
        """Runnable now, or its adapter fell out of the host cache and `_run_batch` must reload it."""
        adapter_id = handle.adapter_id
        return adapter_id is None or self.residency.is_cached(adapter_id) or not self.residency.is_loading(adapter_id)

    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self._wake:
                    while not self._closed and not self._commands and not any(map(self._ready, self._pending)):
                        self._wake.wait(timeout=IDLE_WAIT_S)
                    if self._closed:
                        return
                    commands = list(self._commands)
                    self._commands.clear()
                for function, future in commands:
                    try:
                        future.set_result(function())
                    except BaseException as error:  # handed to the caller, who raises it
                        future.set_exception(error)
                if self._pending and self.batch_wait_ms and len(self._pending) < self.max_batch_size:
                    wait_s = self._pending[0].submitted_s + self.batch_wait_ms / 1000 - time.monotonic()
                    if wait_s > 0:
                        time.sleep(wait_s)
                self._run_batch()

    def _run_batch(self) -> None:
        residency = self.residency
        rows: list[GenerationRow] = []
        held: list[str] = []
        for handle in self.pending():
            if len(rows) == self.max_batch_size:
                break
            if handle.cancelled:
                self._remove(handle)
                handle.finish("cancelled", 0)
                continue
            slot = BASE_SLOT
            if handle.adapter_id is not None:
                entry = residency.cached(handle.adapter_id)
                if entry is None:
                    if not residency.is_loading(handle.adapter_id):
                        self._start_load(handle.adapter_id)
                    continue
                try:
                    slot = residency.acquire(handle.adapter_id, entry)
                except SlotsExhaustedError:
                    continue
                except LoraServeError as error:
                    self._remove(handle)
                    handle.fail(error)
                    continue
                held.append(handle.adapter_id)
            self._remove(handle)
            rows.append(self._row(handle, slot))
        if not rows:
            return
        self.batches_run += 1
        self.rows_run += len(rows)
        self._running_rows = len(rows)
        try:
            self.generator.run(rows)
        except Exception as error:
            logger.exception("batch of %d rows failed", len(rows))
            for row in rows:
                if not row.done:
                    row.done = True
                    row.fail(error)
        finally:
            self._running_rows = 0
            for adapter_id in held:
                residency.release(adapter_id)

    def _remove(self, handle: RequestHandle) -> None:
        with self._wake:
            self._pending.remove(handle)

    def _row(self, handle: RequestHandle, slot: int) -> GenerationRow:
        def finish(reason: str, tokens: int) -> None:
            self.tokens_generated += tokens
            handle.finish(reason, tokens)

        return GenerationRow(
            prompt_ids=handle.prompt_ids,
            params=handle.params,
            slot=slot,
            emit=lambda text, _token: handle.emit(text),
            finish=finish,
            is_cancelled=lambda: handle.cancelled,
            fail=handle.fail,
        )
