"""The replica engine: one base model, N LoRA slots, an LRU over them, and batched generation.

One loop thread owns the model. It runs commands (swap a new version in, delete, pin) and
batches in turn, so a swap always lands between batches: a request never sees a half-swapped
adapter, in-flight requests finish on the version they started with, the next ones see the new
one. Requests that arrive within `batch_wait_ms` of each other share a batch whatever their
adapters, up to `max_batch_size` rows and `num_slots` distinct adapters.

A slot miss is served from the host cache (prepared tensors, a copy away from the slot); a host
miss loads the checkpoint through the resolver on a worker thread, once per adapter however many
requests wait for it, while other batches keep running.

    engine = Engine(EngineConfig(base_model="tiny-random-llama", compile="off"))
    engine.register_adapter("acme/pirate", "/path/to/peft/adapter")
    print(engine.generate("Hello", adapter_id="acme/pirate").text)
    engine.close()
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from adapters_store.checkpoint import LoraCheckpoint, SlotGeometry, normalize_model_name, read_checkpoint
from deployments.base_model import BaseModelSpec, LoadedBaseModel, default_cache_dir, load_base_model
from deployments.errors import (
    AdapterNotFoundError,
    EngineClosedError,
    InvalidRequestError,
    LoraServeError,
    SlotsExhaustedError,
)
from deployments.generation import BatchGenerator, GenerationRow, SamplingParams
from deployments.host_cache import CacheEntry, HostCache
from deployments.slot_lora import PreparedAdapter, SlotLoraModel
from deployments.slots import BASE_SLOT, SlotPool

logger = logging.getLogger(__name__)

AdapterResolver = Callable[[str], tuple[LoraCheckpoint, str]]
"""adapter id -> (checkpoint, version); raises AdapterNotFoundError for an unknown id. Its
checkpoints were scanned for NaN/inf by whoever published them (the adapter store); the engine
still checks their shapes, ranks and targets against its slots."""


class EngineConfig(BaseModel):
    """The engine's settings; the replica's `user_config` carries them from serve_config.yaml."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str = Field("smollm2-135m-instruct", description="a known base model name")
    base_model_path: str | None = Field(None, description="a local transformers causal-LM folder; wins over base_model")
    model_cache_dir: str | None = Field(None, description="where converted base models are cached")
    num_slots: int = Field(8, ge=1, le=1024, description="adapter slots (slot 0, the base model, comes on top)")
    max_rank: int = Field(16, ge=1, le=512, description="largest LoRA rank a slot holds; smaller ranks are padded")
    target_modules: tuple[str, ...] = Field(("q_proj", "k_proj", "v_proj", "o_proj"), min_length=1)
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile the decode step; auto = on CUDA")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: fp32 on CPU, bf16 on CUDA")
    max_batch_size: int = Field(8, ge=1, le=256)
    max_seq_len: int = Field(512, ge=16, le=32768, description="prompt + generated tokens per row")
    max_new_tokens: int = Field(256, ge=1)
    batch_wait_ms: float = Field(2.0, ge=0, le=1000)
    host_cache_bytes: int = Field(1 << 30, ge=0)
    max_adapter_bytes: int = Field(512 << 20, ge=1)
    torch_threads: int | None = Field(None, ge=1)

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self) -> torch.dtype | None:
        return None if self.dtype == "auto" else getattr(torch, self.dtype)

    def compile_enabled(self) -> bool:
        return self.compile == "on" or (self.compile == "auto" and self.resolved_device() == "cuda")


def _load_base(config: EngineConfig, device: str, dtype: torch.dtype | None) -> LoadedBaseModel:
    spec = BaseModelSpec(
        name=config.base_model, path=config.base_model_path, cache_dir=config.model_cache_dir or default_cache_dir()
    )
    return load_base_model(spec, device=device, dtype=dtype)


def _slot_model(base: LoadedBaseModel, config: EngineConfig, num_slots: int) -> SlotLoraModel:
    names = {normalize_model_name(base.name), normalize_model_name(getattr(base.model.config, "_name_or_path", "") or base.name)}
    return SlotLoraModel(
        base.model,
        config.target_modules,
        num_slots,
        config.max_rank,
        base_model_names=frozenset(names),
        max_adapter_bytes=config.max_adapter_bytes,
    )


def slot_geometry(config: EngineConfig) -> SlotGeometry:
    """What an adapter must fit to be served by engines with `config`, for the adapter store to
    validate with (loads the base model once on CPU to read its layer shapes)."""
    return _slot_model(_load_base(config, "cpu", torch.float32), config, 1).geometry


@dataclass(frozen=True)
class StreamChunk:
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" on the last chunk
    completion_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter_id: str | None


class RequestHandle:
    """What `Engine.submit` returns: iterate (sync or async) for chunks, or `result()` / `await`.

    The engine thread pushes events; an asyncio caller gets them through its own loop.
    """

    def __init__(self, adapter_id: str | None, prompt_ids: list[int], params: SamplingParams) -> None:
        self.adapter_id = adapter_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.submitted_s = time.monotonic()
        self._cancelled = False
        self._events: queue.Queue = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_events: asyncio.Queue | None = None
        try:
            self._loop = asyncio.get_running_loop()
            self._async_events = asyncio.Queue()
        except RuntimeError:
            pass

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _push(self, event: StreamChunk | BaseException) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._async_events.put_nowait, event)
        else:
            self._events.put(event)

    def __iter__(self) -> Iterator[StreamChunk]:
        while True:
            event = self._events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if event.finish_reason is not None:
                return

    async def stream(self):
        if self._async_events is None:
            raise RuntimeError("this request was submitted outside an event loop; iterate it synchronously")
        while True:
            event = await self._async_events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if event.finish_reason is not None:
                return

    def _collect(self, chunks: list[StreamChunk]) -> Completion:
        last = chunks[-1]
        return Completion(
            text="".join(chunk.text for chunk in chunks),
            finish_reason=last.finish_reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=last.completion_tokens,
            adapter_id=self.adapter_id,
        )

    def result(self) -> Completion:
        return self._collect(list(self))

    async def aresult(self) -> Completion:
        return self._collect([chunk async for chunk in self.stream()])


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        resolver: AdapterResolver | None = None,
        base: LoadedBaseModel | None = None,
    ) -> None:
        self.config = config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        if base is None:
            base = _load_base(config, config.resolved_device(), config.resolved_dtype())
        self.base = base
        self.tokenizer = base.tokenizer
        self.slot_model = _slot_model(base, config, config.num_slots)
        self.pool = SlotPool(config.num_slots)
        self._load_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="adapter-load")
        self.host_cache: HostCache[PreparedAdapter] = HostCache(config.host_cache_bytes, self._load_executor)
        self._local_adapters: dict[str, Path] = {}
        self._resolver = resolver
        self._slot_versions: dict[str, str] = {}
        self.generator = BatchGenerator(
            base.model,
            base.tokenizer,
            self.slot_model.set_slot_ids,
            max_batch_size=config.max_batch_size,
            max_seq_len=config.max_seq_len,
            compile_decode=config.compile_enabled(),
            compile_mode=config.compile_mode,
        )
        self._pending: deque[RequestHandle] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self.batches_run = 0
        self.rows_run = 0
        self.tokens_generated = 0
        self._running_rows = 0
        if config.compile_enabled():
            started = time.perf_counter()
            with torch.no_grad():
                self.generator.warm_up()
            logger.info("compiled decode for batch buckets %s in %.1f s", self.generator.buckets, time.perf_counter() - started)
        self._thread = threading.Thread(target=self._loop, name="lora-engine", daemon=True)
        self._thread.start()

    # ---- adapters -------------------------------------------------------------------------

    def register_adapter(self, adapter_id: str, folder: str | Path) -> str:
        """Validate a local PEFT adapter folder now and serve it as `adapter_id`; returns its version.

        Registering an id again with new weights swaps them into its slot between batches.
        """
        checkpoint, version = self._read_folder(folder)
        self.update_adapter(adapter_id, checkpoint, version)
        self._local_adapters[adapter_id] = Path(folder)
        return version

    def update_adapter(self, adapter_id: str, checkpoint: LoraCheckpoint, version: str, *, wait: bool = True,
                       check_values: bool = True) -> None:
        """Put a (new) version in the host cache and into its slot if warm; refused input changes nothing.

        `wait=False` returns once the version is in the host cache: a warm slot takes it before its
        next batch (`_acquire_slot` rewrites a slot whose version differs), without waiting here
        for the batch in flight to finish."""
        prepared = self.slot_model.prepare(checkpoint, check_values=check_values)
        if not wait:
            self.host_cache.put(adapter_id, prepared, version)
            with self._wake:
                self._wake.notify()
            return

        def swap_in() -> None:
            self.host_cache.put(adapter_id, prepared, version)
            slot = self.pool.slot_of(adapter_id)
            if slot is not None and self._slot_versions.get(adapter_id) != version:
                self.pool.record_swap(self.slot_model.write_slot(slot, prepared))
                self._slot_versions[adapter_id] = version

        self._call_in_loop(swap_in)

    def delete_adapter(self, adapter_id: str, missing_ok: bool = False) -> None:
        """Forget an adapter: its slot is zeroed and freed, queued requests for it fail with 404."""

        def delete() -> None:
            known = adapter_id in self.pool or adapter_id in self.host_cache or adapter_id in self._local_adapters
            if not known and not missing_ok:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
            self.host_cache.invalidate(adapter_id)
            slot = self.pool.discard(adapter_id, force=True)
            if slot is not None:
                self.slot_model.clear_slot(slot)
            self._slot_versions.pop(adapter_id, None)
            self._local_adapters.pop(adapter_id, None)
            with self._wake:
                doomed = [h for h in self._pending if h.adapter_id == adapter_id]
                for handle in doomed:
                    self._pending.remove(handle)
            for handle in doomed:
                handle._push(AdapterNotFoundError(f"adapter {adapter_id!r} was deleted"))

        self._call_in_loop(delete)

    def warm(self, adapter_id: str, pin: bool = False) -> int:
        """Load an adapter into a slot now (and pin it); returns the slot."""
        entry = self._host_entry(adapter_id)

        def load() -> int:
            slot = self._acquire_slot(adapter_id, entry)
            try:
                if pin:
                    self.pool.pin(adapter_id)
            finally:
                self.pool.release(adapter_id)
            return slot

        return self._call_in_loop(load)

    def unpin(self, adapter_id: str) -> None:
        self._call_in_loop(lambda: self.pool.unpin(adapter_id))

    def evict(self, adapter_id: str) -> None:
        """Take an adapter out of its slot and the host cache (between batches, so no row holds
        it); it stays registered and loads again on its next use."""

        def evict_now() -> None:
            slot = self.pool.discard(adapter_id)
            if slot is not None:
                self.slot_model.clear_slot(slot)
            self._slot_versions.pop(adapter_id, None)
            self.host_cache.invalidate(adapter_id)

        self._call_in_loop(evict_now)

    def invalidate_cached(self, adapter_id: str) -> None:
        """Drop an adapter's host copy (and any load in flight) but leave a warm slot alone: its
        next cold load then fetches the current version."""
        self.host_cache.invalidate(adapter_id)

    def resolved_adapters(self) -> dict[str, str]:
        """Adapters that came through the resolver (not `register_adapter`), warm or in the host
        cache: id -> the version held (the slot's when warm)."""
        held = {**self.host_cache.versions(), **self.warm_versions()}
        return {a: v for a, v in sorted(held.items()) if a not in self._local_adapters}

    def warm_versions(self) -> dict[str, str]:
        """adapter id -> the version its next batch runs, for every adapter in a slot."""
        cached = self.host_cache.versions()
        return {a: v for a in self.pool.snapshot().warm if (v := cached.get(a, self._slot_versions.get(a))) is not None}

    def adapter_version(self, adapter_id: str) -> str | None:
        """The version the adapter's next batch runs, or None when it is not warm."""
        return self.warm_versions().get(adapter_id)

    # ---- requests -------------------------------------------------------------------------

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages")
        if messages is not None:
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def submit(
        self,
        prompt: str | None = None,
        adapter_id: str | None = None,
        params: SamplingParams | None = None,
        messages: list[dict] | None = None,
        prompt_ids: list[int] | None = None,
    ) -> RequestHandle:
        if self._closed:
            raise EngineClosedError("the engine is shut down")
        params = params or SamplingParams()
        ids = prompt_ids if prompt_ids is not None else self.encode(prompt, messages)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if params.max_tokens > self.config.max_new_tokens:
            raise InvalidRequestError(f"max_tokens {params.max_tokens} is over the limit of {self.config.max_new_tokens}")
        if len(ids) + params.max_tokens > self.config.max_seq_len:
            raise InvalidRequestError(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"max_seq_len {self.config.max_seq_len}"
            )
        if adapter_id is not None and self._resolver is None and adapter_id not in self._local_adapters:
            if self.host_cache.get(adapter_id) is None:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
        handle = RequestHandle(adapter_id, ids, params)
        with self._wake:
            self._pending.append(handle)
            self._wake.notify()
        if adapter_id is not None and adapter_id not in self.host_cache:
            self._start_load(adapter_id)
        return handle

    def generate(self, prompt: str | None = None, adapter_id: str | None = None, **kwargs) -> Completion:
        messages = kwargs.pop("messages", None)
        return self.submit(prompt, adapter_id, SamplingParams(**kwargs), messages=messages).result()

    async def agenerate(self, prompt: str | None = None, adapter_id: str | None = None, **kwargs) -> Completion:
        messages = kwargs.pop("messages", None)
        return await self.submit(prompt, adapter_id, SamplingParams(**kwargs), messages=messages).aresult()

    def forward_logits(self, input_ids: torch.Tensor, adapter_ids: list[str | None]) -> torch.Tensor:
        """Full-sequence logits with each row on its adapter (no padding, no cache): for checks."""
        entries = {a: self._host_entry(a) for a in set(adapter_ids) if a is not None}

        def forward() -> torch.Tensor:
            held = []
            try:
                slots = []
                for adapter_id in adapter_ids:
                    if adapter_id is None:
                        slots.append(BASE_SLOT)
                    else:
                        slots.append(self._acquire_slot(adapter_id, entries[adapter_id]))
                        held.append(adapter_id)
                self.slot_model.set_slot_ids(torch.tensor(slots, device=self.slot_model.device))
                with torch.no_grad():
                    return self.base.model(input_ids=input_ids.to(self.slot_model.device)).logits.float().cpu()
            finally:
                for adapter_id in held:
                    self.pool.release(adapter_id)

        return self._call_in_loop(forward)

    def stats(self) -> dict:
        return {
            "slots": self.pool.snapshot().to_dict(),
            "host_cache": vars(self.host_cache.snapshot()),
            "batches_run": self.batches_run,
            "rows_run": self.rows_run,
            "tokens_generated": self.tokens_generated,
            "queued": len(self._pending),
        }

    def routing_stats(self) -> dict:
        """What a router needs to place the next request here (`routing_policy.ReplicaView`):
        adapters warm or loading, free and evictable slots, the next victim, the queue, and how
        many queued requests wait for an adapter load."""
        snapshot = self.pool.snapshot()
        with self._wake:
            pending = list(self._pending)
        waiting_for_load = [h.adapter_id for h in pending if h.adapter_id is not None and h.adapter_id not in self.host_cache]
        return {
            "warm": sorted(set(snapshot.warm) | set(waiting_for_load)),
            "free_slots": snapshot.free_slots,
            "evictable_slots": snapshot.evictable_slots,
            "next_victim": snapshot.next_victim,
            "queue_len": len(pending) + self._running_rows,
            "pending_loads": len(waiting_for_load),
            "num_slots": snapshot.num_slots,
        }

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout=30)
        self._load_executor.shutdown(wait=False, cancel_futures=True)
        for handle in list(self._pending):
            handle._push(EngineClosedError("the engine shut down before this request ran"))
        self._pending.clear()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ------------------------------------------------------------------------

    def _read_folder(self, folder: str | Path) -> tuple[LoraCheckpoint, str]:
        checkpoint = read_checkpoint(folder, max_size_bytes=self.config.max_adapter_bytes)
        return checkpoint, checkpoint.version

    def _resolve(self, adapter_id: str) -> tuple[LoraCheckpoint, str]:
        folder = self._local_adapters.get(adapter_id)
        if folder is not None:
            return self._read_folder(folder)
        if self._resolver is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
        return self._resolver(adapter_id)

    def _load_entry(self, adapter_id: str) -> CacheEntry[PreparedAdapter]:
        checkpoint, version = self._resolve(adapter_id)
        from_resolver = adapter_id not in self._local_adapters  # value-scanned by its publisher
        return CacheEntry(self.slot_model.prepare(checkpoint, check_values=not from_resolver), version)

    def _start_load(self, adapter_id: str) -> Future:
        future = self.host_cache.load(adapter_id, lambda: self._load_entry(adapter_id))
        future.add_done_callback(lambda f: self._on_loaded(adapter_id, f))
        return future

    def _on_loaded(self, adapter_id: str, future: Future) -> None:
        with self._wake:
            error = future.exception()
            failed = [h for h in self._pending if h.adapter_id == adapter_id] if error is not None else []
            for handle in failed:
                self._pending.remove(handle)
            self._wake.notify()
        for handle in failed:
            handle._push(error)

    def _host_entry(self, adapter_id: str) -> CacheEntry[PreparedAdapter]:
        entry = self.host_cache.get(adapter_id)
        return entry if entry is not None else self._start_load(adapter_id).result()

    def _acquire_slot(self, adapter_id: str, entry: CacheEntry[PreparedAdapter]) -> int:
        """Loop thread only: take the adapter's slot, swapping its weights in on a miss."""
        assignment = self.pool.acquire(adapter_id)
        if assignment.evicted is not None:
            self._slot_versions.pop(assignment.evicted, None)
        if not assignment.hit or self._slot_versions.get(adapter_id) != entry.version:
            try:
                self.pool.record_swap(self.slot_model.write_slot(assignment.slot, entry.value))
            except BaseException:
                self.pool.discard(adapter_id, force=True)
                raise
            self._slot_versions[adapter_id] = entry.version
        return assignment.slot

    def _call_in_loop(self, function: Callable[[], Any]) -> Any:
        if threading.current_thread() is self._thread:
            return function()
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            self._commands.append((function, future))
            self._wake.notify()
        return future.result()

    def _ready(self, handle: RequestHandle) -> bool:
        """Runnable now, or its adapter fell out of the host cache and `_run_batch` must reload it."""
        adapter_id = handle.adapter_id
        return adapter_id is None or adapter_id in self.host_cache or not self.host_cache.is_loading(adapter_id)

    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                with self._wake:
                    while not self._closed and not self._commands and not any(map(self._ready, self._pending)):
                        self._wake.wait(timeout=0.1)
                    if self._closed:
                        return
                    commands = list(self._commands)
                    self._commands.clear()
                for function, future in commands:
                    try:
                        future.set_result(function())
                    except BaseException as error:  # handed to the caller, who raises it
                        future.set_exception(error)
                if self._pending and self.config.batch_wait_ms and len(self._pending) < self.config.max_batch_size:
                    wait_s = self._pending[0].submitted_s + self.config.batch_wait_ms / 1000 - time.monotonic()
                    if wait_s > 0:
                        time.sleep(wait_s)
                self._run_batch()

    def _run_batch(self) -> None:
        rows: list[GenerationRow] = []
        held: list[str] = []
        with self._wake:
            candidates = list(self._pending)
        for handle in candidates:
            if len(rows) == self.config.max_batch_size:
                break
            if handle.cancelled:
                self._remove_pending(handle)
                handle._push(StreamChunk("", "cancelled"))
                continue
            slot = BASE_SLOT
            if handle.adapter_id is not None:
                entry = self.host_cache.get(handle.adapter_id)
                if entry is None:
                    if not self.host_cache.is_loading(handle.adapter_id):
                        self._start_load(handle.adapter_id)
                    continue
                try:
                    slot = self._acquire_slot(handle.adapter_id, entry)
                except SlotsExhaustedError:
                    continue
                except LoraServeError as error:
                    self._remove_pending(handle)
                    handle._push(error)
                    continue
                held.append(handle.adapter_id)
            self._remove_pending(handle)
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
                if adapter_id in self.pool:
                    self.pool.release(adapter_id)

    def _remove_pending(self, handle: RequestHandle) -> None:
        with self._wake:
            self._pending.remove(handle)

    def _row(self, handle: RequestHandle, slot: int) -> GenerationRow:
        def finish(reason: str, tokens: int) -> None:
            self.tokens_generated += tokens
            handle._push(StreamChunk("", reason, tokens))

        return GenerationRow(
            prompt_ids=handle.prompt_ids,
            params=handle.params,
            slot=slot,
            emit=lambda text, _token: handle._push(StreamChunk(text)),
            finish=finish,
            is_cancelled=lambda: handle.cancelled,
            fail=handle._push,
        )
