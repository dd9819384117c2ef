"""Continuous batching: the engine's loop thread, which owns the model.

Each iteration, in order:
  1. commands (swap a version in, delete, pin, evict: `call`) run, between steps;
  2. cancelled rows leave;
  3. waiting requests join while a KV lane and a slot are free, whatever their adapters (a request
     whose adapter is not in the host cache waits while a loader thread brings it, once however
     many wait for it);
  4. one prefill chunk: up to `prefill_chunk_tokens` prompt tokens of the rows being prefilled,
     together, in lane order; a row whose prompt is complete samples its first token and starts
     decoding;
  5. one decode step for every decoding row; rows that finish leave at once.
So no request waits for another to finish, and a long prompt costs the running rows at most one
chunk per step. A request holds its lane and its adapter's slot (that version) from admission to
its last token.

Lanes stay packed (decoding rows in `[0, D)`, rows being prefilled in `[D, D + P)`): a row that
leaves is replaced by the last decoding row, and that gap by the last prefilling row (`move`
copies only the positions in use). So both forwards read their lanes as views.

Failures are as small as they can be: one row's error (its sampling, its text, its adapter's load)
ends that row alone; a forward that fails as a whole fails only the rows in it; the loop goes on.
If the loop itself ever dies, `alive` turns false (the replica's health check fails and Serve
replaces it) and every waiting and running request gets EngineClosedError (503).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

from deployments.engine.fair_share import fair_order
from deployments.engine.handles import RequestHandle
from deployments.engine.kv_cache import LaneKVCache
from deployments.engine.model_runner import ModelRunner
from deployments.engine.residency import AdapterResidency
from deployments.engine.sampling import RowSampler, sample_tokens
from deployments.engine.slots import BASE_SLOT
from deployments.engine.text_stream import TextStream
from lora_core.errors import EngineClosedError, LoraServeError, SlotsExhaustedError, SwapValidationError

__all__ = ["Scheduler", "SchedulerSettings"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
IDLE_WAIT_S = 0.1


@dataclass(frozen=True)
class SchedulerSettings:
    max_seq_len: int
    prefill_chunk_tokens: int
    batch_wait_ms: float
    pad_id: int
    eos_ids: frozenset[int]


@dataclass(eq=False)
class Row:
    """A running request: its lane, its slot, and how far it has got."""

    handle: RequestHandle
    lane: int
    slot: int
    slot_key: str | None  # what the row holds in the residency; None on the base model
    sampler: RowSampler
    stream: TextStream
    prefilled: int = 0  # prompt tokens in the lane
    length: int = 0  # tokens in the lane (prompt + fed generated ones)
    last_token: int | None = None  # sampled, fed at the next decode step
    done: bool = field(default=False)

    @property
    def prompt_left(self) -> int:
        return len(self.handle.prompt_ids) - self.prefilled


class Scheduler:
    """Implements `residency.ModelLoop` for the residency it serves (`start(residency)`)."""

    def __init__(self, runner: ModelRunner, tokenizer, settings: SchedulerSettings) -> None:
        self.runner = runner
        self.kv_cache: LaneKVCache = runner.kv_cache
        self.tokenizer = tokenizer
        self.settings = settings
        self.residency: AdapterResidency | None = None
        self._waiting: deque[RequestHandle] = deque()
        self._decoding: list[Row] = []  # lane i holds self._decoding[i]
        self._prefilling: list[Row] = []  # lane len(decoding) + i holds self._prefilling[i]
        self._last_admitted: dict[str | None, int] = {}  # tenant -> rows_admitted when its last row joined
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self.death: BaseException | None = None
        self.steps_run = 0
        self.prefill_chunks_run = 0
        self.rows_admitted = 0
        self.tokens_generated = 0
        self.peak_rows = 0
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
            self._check_open()
            self._commands.append((function, future))
            self._wake.notify()
        return future.result()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def fail_waiting(self, adapter_id: str, error: BaseException) -> None:
        """Queued requests for `adapter_id` fail; running ones finish on what they hold."""
        with self._wake:
            doomed = [h for h in self._waiting if h.adapter_id == adapter_id]
            for handle in doomed:
                self._waiting.remove(handle)
        for handle in doomed:
            handle.fail(error)

    # ---- requests -------------------------------------------------------------------------------

    def enqueue(self, handle: RequestHandle) -> None:
        with self._wake:
            self._check_open()
            self._waiting.append(handle)
            self._wake.notify()
        adapter_id = handle.adapter_id
        if adapter_id is not None and not self.residency.is_cached(adapter_id):
            self._start_load(adapter_id)

    def waiting(self) -> list[RequestHandle]:
        with self._wake:
            return list(self._waiting)

    @property
    def running(self) -> int:
        return len(self._decoding) + len(self._prefilling)

    @property
    def queue_len(self) -> int:
        """Requests waiting or running."""
        with self._wake:
            return len(self._waiting) + self.running

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.death is None

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._fail_everything(EngineClosedError("the engine shut down before this request ended"))

    # ---- the loop -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed or self.death is not None:
            raise EngineClosedError("the engine is shut down" if self._closed else f"the engine loop died: {self.death}")

    def _run(self) -> None:
        try:
            with torch.no_grad():
                while True:
                    with self._wake:
                        while not self._closed and not self._commands and not self._has_work():
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
                    self._iteration()
        except BaseException as error:  # a bug in the loop itself: nothing can run any more
            logger.exception("the engine loop died")
            self.death = error
            self._fail_everything(EngineClosedError(f"the engine loop died: {type(error).__name__}: {error}"))

    def _has_work(self) -> bool:
        if self._decoding or self._prefilling:
            return True
        residency = self.residency
        return any(
            h.cancelled or h.adapter_id is None or residency.is_cached(h.adapter_id) or not residency.is_loading(h.adapter_id)
            for h in self._waiting
        )

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self._prefilling:
            self._guarded(self._prefill_chunk, self._prefill_rows_in_flight)
        if self._decoding:
            self._guarded(self._decode_step, lambda: list(self._decoding))

    def _guarded(self, step: Callable[[], None], rows: Callable[[], list[Row]]) -> None:
        """Run a forward step; if it fails as a whole, its rows fail (500) and the engine goes on."""
        involved = rows()
        try:
            step()
        except Exception as error:
            logger.exception("a step of %d rows failed", len(involved))
            failure = error if isinstance(error, LoraServeError) else LoraServeError(
                f"the engine step failed: {type(error).__name__}: {error}")
            for row in involved:
                if not row.done:
                    self._retire(row, error=failure)

    # ---- joining --------------------------------------------------------------------------------

    def _admit(self) -> None:
        free_lanes = self.kv_cache.lanes - self.running
        if not free_lanes or not self._waiting:
            return
        self._batch_wait(free_lanes)
        residency = self.residency
        running = Counter(row.handle.tenant for row in (*self._decoding, *self._prefilling))
        waiting = self.waiting()
        present = {*running, *(h.tenant for h in waiting)}
        self._last_admitted = {t: seq for t, seq in self._last_admitted.items() if t in present}  # bounded
        for handle in fair_order(waiting, lambda h: h.tenant, running, self._last_admitted):
            if self.running >= self.kv_cache.lanes:
                return
            if handle.cancelled:
                if self._unqueue(handle):
                    handle.finish("cancelled", 0)
                continue
            slot, key = BASE_SLOT, None
            if handle.adapter_id is not None:
                entry = residency.cached(handle.adapter_id)
                if entry is None:
                    if not residency.is_loading(handle.adapter_id):
                        self._start_load(handle.adapter_id)
                    continue
                handle.combination = entry.value.combination
                try:
                    slot, key = residency.acquire(handle.adapter_id, entry)
                except SlotsExhaustedError:
                    continue  # its turn comes when a running row gives a slot back
                except SwapValidationError:  # that version is rejected: wait for the one the store serves
                    if not residency.is_loading(handle.adapter_id):
                        self._start_load(handle.adapter_id)
                    continue
                except LoraServeError as error:
                    if self._unqueue(handle):
                        handle.fail(error)
                    continue
            if not self._unqueue(handle):  # failed from another thread meanwhile (`fail_waiting`)
                if key is not None:
                    residency.release(key)
                continue
            sampler = RowSampler.for_request(handle.params, handle.prompt_ids, self.settings.eos_ids)
            stream = TextStream(self.tokenizer, handle.params.stop)
            self._prefilling.append(Row(handle, self.running, slot, key, sampler, stream))
            self.rows_admitted += 1
            self._last_admitted[handle.tenant] = self.rows_admitted

    def _batch_wait(self, free_lanes: int) -> None:
        """An idle engine waits up to `batch_wait_ms` after the first arrival, so requests sent
        together start together."""
        wait_ms = self.settings.batch_wait_ms
        if not wait_ms or self.running or len(self._waiting) >= free_lanes:
            return
        wait_s = self._waiting[0].submitted_s + wait_ms / 1000 - time.monotonic()
        if wait_s > 0:
            time.sleep(wait_s)

    def _unqueue(self, handle: RequestHandle) -> bool:
        """Take `handle` off the queue; False when it is no longer there (`fail_waiting` ended it
        from a loader thread after this step's snapshot of the queue)."""
        with self._wake:
            try:
                self._waiting.remove(handle)
            except ValueError:
                return False
            return True

    # ---- prefill --------------------------------------------------------------------------------

    def _prefill_rows_in_flight(self) -> list[Row]:
        budget, rows = self.settings.prefill_chunk_tokens, []
        for row in self._prefilling:
            if budget <= 0:
                break
            rows.append(row)
            budget -= row.prompt_left
        return rows

    def _prefill_chunk(self) -> None:
        budget = self.settings.prefill_chunk_tokens
        chunk: list[tuple[Row, int]] = []
        for row in self._prefilling:
            if budget <= 0:
                break
            take = min(row.prompt_left, budget)
            chunk.append((row, take))
            budget -= take
        batch = self.runner.batch(len(chunk), max(take for _, take in chunk), self.settings.pad_id)
        for index, (row, take) in enumerate(chunk):
            batch.set_row(index, row.handle.prompt_ids[row.prefilled: row.prefilled + take], row.prefilled, row.slot)
        logits = self.runner.run(chunk[0][0].lane, batch)
        self.prefill_chunks_run += 1
        complete = []
        for index, (row, take) in enumerate(chunk):
            row.prefilled += take
            row.length = row.prefilled
            if row.prompt_left == 0:
                complete.append(index)
        started = [chunk[index][0] for index in complete]
        for row in started:  # they are the first rows of the prefill region: lanes len(decoding)...
            self._prefilling.remove(row)
            self._decoding.append(row)
        if started:
            self._take_tokens(started, logits[complete])

    # ---- decode ---------------------------------------------------------------------------------

    def _decode_step(self) -> None:
        rows = list(self._decoding)
        batch = self.runner.batch(len(rows), 1, self.settings.pad_id)
        for index, row in enumerate(rows):
            batch.set_row(index, [row.last_token], row.length, row.slot)
        logits = self.runner.run(0, batch)[: len(rows)]
        self.steps_run += 1
        self.peak_rows = max(self.peak_rows, len(rows))
        for row in rows:
            row.length += 1
        self._take_tokens(rows, logits)

    def _take_tokens(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Sample each row's next token, stream it, and let the rows that finished leave."""
        tokens, failures = sample_tokens(logits, [row.sampler for row in rows])
        failed = {failure.index: failure.error for failure in failures}
        finished: list[tuple[Row, str | None, BaseException | None]] = []
        for index, row in enumerate(rows):
            if index in failed:
                finished.append((row, None, failed[index]))
                continue
            try:
                reason = self._advance(row, tokens[index])
            except Exception as error:  # this row's text or limits: this row only
                finished.append((row, None, error))
                continue
            if reason is not None:
                finished.append((row, reason, None))
        for row, reason, error in sorted(finished, key=lambda item: -item[0].lane):
            self._retire(row, reason=reason, error=error)

    def _advance(self, row: Row, token: int) -> str | None:
        """Take one sampled token; the finish reason if the row is done, else None."""
        sampler, params = row.sampler, row.handle.params
        sampler.record(token)
        if token in sampler.end_ids:
            self._flush(row)
            return "stop"
        text, stopped = row.stream.push(token)
        if text:
            row.handle.emit(text)
        if stopped:
            return "stop"
        if sampler.generated >= params.max_tokens or row.length >= self.settings.max_seq_len:
            self._flush(row)
            return "length"
        row.last_token = token
        return None

    @staticmethod
    def _flush(row: Row) -> None:
        """Send the text held back for a possible stop string."""
        tail = row.stream.flush()
        if tail:
            row.handle.emit(tail)

    # ---- leaving --------------------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        cancelled = [row for row in (*self._decoding, *self._prefilling) if row.handle.cancelled]
        for row in sorted(cancelled, key=lambda row: -row.lane):
            self._retire(row, reason="cancelled")

    def _retire(self, row: Row, reason: str | None = None, error: BaseException | None = None) -> None:
        """End a row (finished, cancelled or failed), give its slot back and pack the lanes."""
        row.done = True
        generated = row.sampler.generated
        self.tokens_generated += generated
        if error is not None:
            if not isinstance(error, LoraServeError):
                logger.error("a row of %s failed: %r", row.handle.adapter_id, error)
                error = LoraServeError(f"this request failed in the engine ({type(error).__name__})")
            row.handle.fail(error)
        else:
            row.handle.finish(reason or "stop", generated)
        if row.slot_key is not None:
            self.residency.release(row.slot_key)
            self.residency.record_served(row.handle.adapter_id, generated)
        if row in self._decoding:
            last = self._decoding[-1]
            if last is not row:
                self._move(last, row.lane)
                self._decoding[row.lane] = last
            self._decoding.pop()
            gap = len(self._decoding)
            if self._prefilling:
                moved = self._prefilling.pop()
                self._move(moved, gap)
                self._prefilling.insert(0, moved)
        else:
            position = self._prefilling.index(row)
            last = self._prefilling.pop()
            if last is not row:
                self._move(last, row.lane)
                self._prefilling[position] = last

    def _move(self, row: Row, lane: int) -> None:
        self.kv_cache.move(row.lane, lane, row.length)
        row.lane = lane

    def _fail_everything(self, error: BaseException) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        running = [*self._decoding, *self._prefilling]
        self._decoding, self._prefilling = [], []
        for handle in waiting:
            handle.fail(error)
        for row in running:
            if not row.done:
                row.done = True
                row.handle.fail(error)

    # ---- adapter loads --------------------------------------------------------------------------

    def _start_load(self, adapter_id: str) -> None:
        future = self.residency.start_load(adapter_id)
        future.add_done_callback(lambda done: self._on_loaded(adapter_id, done))

    def _on_loaded(self, adapter_id: str, future: Future) -> None:
        error = future.exception()
        if error is not None:
            self.fail_waiting(adapter_id, error)
        else:
            self.wake()
