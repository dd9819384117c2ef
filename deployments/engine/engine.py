"""The replica engine: one base model, N LoRA slots, an LRU over them, continuous batching.

    engine = Engine(EngineConfig(base_model="tiny-random-llama", compile="off"))
    engine.register_adapter("acme/pirate", "/path/to/peft/adapter")
    print(engine.generate("Hello", adapter_id="acme/pirate", temperature=0).text)
    engine.close()

A facade over the pieces, each in its own module: the base model (`base_model`), the slot LoRA
layers (`slot_lora`), adapter residency (`residency`: slot pool + host cache + versions), the KV
cache (`kv_cache`: a lane per running request), the forward (`model_runner`), and the loop thread
that admits, prefills and decodes (`scheduler`), sampling (`sampling`) and text (`text_stream`).
Per-request limits are checked here, at submit: a request valid alone is valid in any batch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from deployments.contracts import (
    ChatTurn,
    Combination,
    GenerationChunk,
    GenerationRequest,
    RoutingStats,
    SamplingParams,
)
from deployments.engine.base_model import BaseModelSpec, LoadedBaseModel, load_base_model
from deployments.engine.devices import compile_enabled, resolve_device, resolve_dtype
from deployments.engine.handles import RequestHandle
from deployments.engine.kv_cache import LaneKVCache
from deployments.engine.model_runner import ModelRunner
from deployments.engine.residency import AdapterResidency, AdapterResolver, RejectionReporter
from deployments.engine.scheduler import Scheduler, SchedulerSettings
from deployments.engine.slot_lora import PreparedAdapter, SlotLoraModel
from deployments.engine.slots import BASE_SLOT
from lora_core.checkpoint import LoraCheckpoint
from lora_core.errors import AdapterNotFoundError, EngineClosedError, InvalidRequestError
from lora_core.geometry import normalize_model_name
from lora_core.probe import AdapterProbe
from lora_core.settings import LIVE_ENGINE_FIELDS, EngineConfig

__all__ = ["Engine", "chat_turns", "load_engine_base", "slot_model_for"]

logger = logging.getLogger(__name__)


def load_engine_base(config: EngineConfig, device: str | None = None, dtype: torch.dtype | None = None) -> LoadedBaseModel:
    spec = BaseModelSpec(name=config.base_model, path=config.base_model_path, cache_dir=config.model_cache_dir)
    return load_base_model(spec, device=device or resolve_device(config), dtype=dtype or resolve_dtype(config))


def slot_model_for(base: LoadedBaseModel, config: EngineConfig, num_slots: int) -> SlotLoraModel:
    """`base` with slot LoRA layers on `config`'s target modules (it modifies `base.model`)."""
    configured_name = getattr(base.model.config, "_name_or_path", "") or base.name
    return SlotLoraModel(
        base.model,
        config.target_modules,
        num_slots,
        config.max_rank,
        base_model_names=frozenset({normalize_model_name(base.name), normalize_model_name(configured_name)}),
        max_adapter_bytes=config.max_adapter_bytes,
    )


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        resolver: AdapterResolver | None = None,
        base: LoadedBaseModel | None = None,
        on_rejected: RejectionReporter | None = None,
    ) -> None:
        self.config = config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.base = base if base is not None else load_engine_base(config)
        self.tokenizer = self.base.tokenizer
        self.slot_model = slot_model_for(self.base, config, config.num_slots)
        self.kv_cache = _kv_cache_for(self.base, config)
        self.runner = ModelRunner(
            self.base.model, self.slot_model.set_slot_ids, self.kv_cache,
            compile_decode=compile_enabled(config), compile_mode=config.compile_mode, max_rows=self.kv_cache.lanes,
        )
        self.eos_ids = eos_ids(self.base.model, self.tokenizer)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.scheduler = Scheduler(self.runner, self.tokenizer, SchedulerSettings(
            max_seq_len=config.max_seq_len, prefill_chunk_tokens=config.prefill_chunk_tokens,
            batch_wait_ms=config.batch_wait_ms, pad_id=pad_id, eos_ids=self.eos_ids,
        ))
        self.residency = AdapterResidency(
            self.slot_model, config.num_slots, config.host_cache_bytes, config.max_adapter_bytes,
            loop=self.scheduler, resolver=resolver, on_rejected=on_rejected, admission=config.slot_admission,
        )
        self.residency.prober = self._answer_probe
        if self.runner.compiled:
            started = time.perf_counter()
            with torch.no_grad():
                self.runner.warm_up(pad_id)
            logger.info("compiled decode for row buckets %s in %.1f s", self.runner.buckets, time.perf_counter() - started)
        self.scheduler.start(self.residency)

    def apply_live_settings(self, config: EngineConfig) -> None:
        """Take `config`'s `LIVE_ENGINE_FIELDS` (generation limits, scheduling) from the next
        request and step on; any other difference needs a new engine (ValueError)."""
        live = set(LIVE_ENGINE_FIELDS)
        current = self.config.model_copy(update={"torch_threads": config.torch_threads})
        if needs_restart := [f for f in EngineConfig.model_fields if f not in live
                             and getattr(config, f) != getattr(current, f)]:
            raise ValueError(f"{', '.join(needs_restart)} cannot change in a running engine: set them under the "
                             "application's args (Serve replaces the replicas)")
        self.config = self.config.model_copy(update={f: getattr(config, f) for f in live})
        self.scheduler.settings = dataclasses.replace(
            self.scheduler.settings, prefill_chunk_tokens=config.prefill_chunk_tokens, batch_wait_ms=config.batch_wait_ms)

    # ---- adapters (see `residency` for how they move between folder, host cache and slot) --------

    def register_adapter(self, adapter_id: str, folder: str | Path) -> str:
        """Validate a local PEFT adapter folder now and serve it as `adapter_id`; returns its version.

        Registering an id again with new weights swaps them into its slot between batches."""
        return self.residency.register_folder(adapter_id, folder)

    def update_adapter(self, adapter_id: str, checkpoint: LoraCheckpoint, version: str) -> None:
        """A new version into the host cache and, between batches, into its slot if warm."""
        self.residency.update(adapter_id, checkpoint, version)

    def delete_adapter(self, adapter_id: str, missing_ok: bool = False) -> None:
        self.residency.delete(adapter_id, missing_ok=missing_ok)

    def warm(self, adapter_id: str, pin: bool = False) -> int:
        return self.residency.warm(adapter_id, pin=pin)

    def unpin(self, adapter_id: str) -> None:
        self.residency.unpin(adapter_id)

    def evict(self, adapter_id: str) -> None:
        self.residency.evict(adapter_id)

    # ---- requests -------------------------------------------------------------------------------

    def encode(
        self, prompt: str | None = None, messages: Sequence[ChatTurn | Mapping[str, str]] | None = None
    ) -> list[int]:
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages")
        if messages is not None:
            turns = [{"role": turn.role, "content": turn.content} for turn in chat_turns(messages)]
            return list(self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False))
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; errors it can be refused for (limits, unknown adapter) raise here."""
        if self.scheduler.closed:
            raise EngineClosedError("the engine is shut down")
        ids = self._prompt_ids(request)
        params = self._checked_params(request.params, len(ids))
        vocab = self.base.model.config.vocab_size
        if any(not 0 <= token < vocab for token in (*ids, *params.stop_token_ids)):
            raise InvalidRequestError(f"token ids must be within [0, {vocab}) for this model")
        adapter_id = request.adapter_id
        if request.combination is not None:
            adapter_id = self.residency.define_combination(request.combination)
            unknown = [a for a in request.combination.adapter_ids if not self.residency.knows(a)]
            if unknown and not self.residency.has_resolver:
                raise AdapterNotFoundError(f"adapter {unknown[0]!r} is not registered")
        elif adapter_id is not None and not self.residency.has_resolver and not self.residency.knows(adapter_id):
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
        handle = RequestHandle(adapter_id, ids, params, tenant=request.tenant)
        self.scheduler.enqueue(handle)
        return handle

    def generate(self, prompt: str | None = None, adapter_id: str | None = None, *,
                 messages: Sequence[ChatTurn | Mapping[str, str]] | None = None,
                 combination: Combination | None = None, **sampling) -> GenerationChunk:
        """Run one request to the end; `sampling` are `SamplingParams` fields."""
        return self.submit(_request(prompt, adapter_id, messages, sampling, combination)).result()

    async def agenerate(self, prompt: str | None = None, adapter_id: str | None = None, *,
                        messages: Sequence[ChatTurn | Mapping[str, str]] | None = None, **sampling) -> GenerationChunk:
        return await self.submit(_request(prompt, adapter_id, messages, sampling)).aresult()

    def forward_logits(self, input_ids: torch.Tensor, adapter_ids: list[str | None]) -> torch.Tensor:
        """Full-sequence logits with each row on its adapter (no padding, no cache): for checks."""
        residency = self.residency
        entries = {a: residency.host_entry(a) for a in set(adapter_ids) if a is not None}

        def forward() -> torch.Tensor:
            held = []
            try:
                slots = []
                for adapter_id in adapter_ids:
                    if adapter_id is None:
                        slots.append(BASE_SLOT)
                    else:
                        slot, key = residency.acquire(adapter_id, entries[adapter_id])
                        slots.append(slot)
                        held.append(key)
                self.slot_model.set_slot_ids(torch.tensor(slots), input_ids.shape[1], loop_rows=True)
                with torch.no_grad():
                    return self.base.model(input_ids=input_ids.to(self.slot_model.device)).logits.float().cpu()
            finally:
                for key in held:
                    residency.release(key)

        return self.scheduler.call(forward)

    def _answer_probe(self, probe_id: str, prepared: PreparedAdapter, probe: AdapterProbe) -> str:
        """A new version's greedy answer to its probe, from a temporary slot under `probe_id`
        (so no request for the adapter runs on it before it answered right)."""
        self.residency.host_cache.put(probe_id, prepared, probe_id)
        try:
            expected_tokens = len(self.tokenizer.encode(probe.expected, add_special_tokens=False))
            params = SamplingParams(max_tokens=expected_tokens + 2, temperature=0.0)
            return self.submit(GenerationRequest(probe_id, params, prompt=probe.prompt)).result().text
        finally:
            self.residency.evict(probe_id)

    # ---- what it reports ------------------------------------------------------------------------

    def stats(self) -> dict:
        scheduler = self.scheduler
        return {
            "slots": self.residency.pool_snapshot().to_dict(),
            "host_cache": vars(self.residency.host_cache.snapshot()),
            "steps_run": scheduler.steps_run,
            "prefill_chunks_run": scheduler.prefill_chunks_run,
            "rows_run": scheduler.rows_admitted,
            "peak_rows": scheduler.peak_rows,
            "tokens_generated": scheduler.tokens_generated,
            "queued": len(scheduler.waiting()),
            "running": scheduler.running,
            "kv_lanes": self.kv_cache.lanes,
            "kv_cache_bytes": self.kv_cache.size_bytes,
        }

    def routing_stats(self) -> RoutingStats:
        """What a router needs to place the next request here (`routing_policy.ReplicaView`)."""
        snapshot = self.residency.pool_snapshot()
        pending = self.scheduler.waiting()
        waiting_for_load = {
            h.adapter_id for h in pending if h.adapter_id is not None and not self.residency.is_cached(h.adapter_id)
        }  # one load each, however many requests wait for it
        return RoutingStats(
            warm=tuple(sorted(set(snapshot.warm) | waiting_for_load)),
            free_slots=snapshot.free_slots,
            evictable_slots=snapshot.evictable_slots,
            next_victim=snapshot.next_victim,
            queue_len=self.scheduler.queue_len,
            pending_loads=len(waiting_for_load),
            num_slots=snapshot.num_slots,
            pinned=tuple(sorted(snapshot.pinned)),
        )

    def close(self) -> None:
        self.scheduler.close()
        self.residency.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ------------------------------------------------------------------------------

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        forms = [form is not None for form in (request.prompt, request.messages, request.prompt_ids)]
        if sum(forms) != 1:
            raise InvalidRequestError("give exactly one of prompt, messages and prompt_ids")
        if request.prompt_ids is not None:
            ids = list(request.prompt_ids)
        else:
            ids = self.encode(request.prompt, request.messages)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        return ids

    def _checked_params(self, params: SamplingParams, prompt_tokens: int) -> SamplingParams:
        """`params` with `max_tokens` filled in (as many as the prompt leaves room for), or a 400."""
        limit, context = self.config.max_new_tokens, self.config.max_seq_len
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=max(1, min(limit, context - prompt_tokens)))
        if params.max_tokens > limit:
            raise InvalidRequestError(f"max_tokens {params.max_tokens} is over the limit of {limit}")
        if params.min_tokens > params.max_tokens:
            raise InvalidRequestError(f"min_tokens {params.min_tokens} is over max_tokens {params.max_tokens}")
        if prompt_tokens + params.max_tokens > context:
            raise InvalidRequestError(
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"max_seq_len {context}"
            )
        return params


def eos_ids(model, tokenizer) -> frozenset[int]:
    """Every id the model's generation config, its config or its tokenizer calls end of sequence."""
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def _kv_cache_for(base: LoadedBaseModel, config: EngineConfig) -> LaneKVCache:
    model_config = base.model.config
    kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    layers = model_config.num_hidden_layers
    lane_bytes = LaneKVCache.lane_bytes(layers, kv_heads, head_dim, config.max_seq_len, base.dtype)
    lanes = min(config.max_num_seqs, config.kv_cache_bytes // lane_bytes)
    if lanes < 1:
        raise ValueError(
            f"kv_cache_bytes {config.kv_cache_bytes} holds no lane of max_seq_len {config.max_seq_len} "
            f"({lane_bytes} bytes each); raise kv_cache_bytes or lower max_seq_len")
    return LaneKVCache(layers, kv_heads, head_dim, config.max_seq_len, lanes, base.dtype, base.device)


def chat_turns(messages: Sequence[ChatTurn | Mapping[str, str]]) -> tuple[ChatTurn, ...]:
    """Chat messages as `ChatTurn`s; Python callers may pass OpenAI-style {"role", "content"} dicts."""
    return tuple(m if isinstance(m, ChatTurn) else ChatTurn(role=m["role"], content=m["content"]) for m in messages)


def _request(prompt: str | None, adapter_id: str | None, messages, sampling: dict,
             combination: Combination | None = None) -> GenerationRequest:
    turns = None if messages is None else chat_turns(messages)
    return GenerationRequest(adapter_id=adapter_id, params=SamplingParams(**sampling), prompt=prompt, messages=turns,
                             combination=combination)
