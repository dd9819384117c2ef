"""Batched generation where each row has its own adapter slot, sampling settings and stop strings.

One batch runs to completion on a static KV cache (transformers' `StaticCache`), so every decode
step has the same shapes: batches are padded to a bucket size (>= 2, powers of two up to the
maximum), prompts are left-padded, and the attention mask is a full 4D mask over the cache length.
Prefill runs eagerly (its length varies); the decode step is the compiled graph, one per batch
bucket, and the slot indices are a tensor input, so new adapters, swaps and new mixes of adapters
never recompile it.

Why not transformers' `generate()` or its continuous-batching manager: both take one generation
config per batch, and neither carries a per-row slot index into the LoRA layers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import StaticCache

from deployments.contracts import SamplingParams
from deployments.engine.slots import BASE_SLOT
from lora_core.errors import InvalidRequestError


class TextStream:
    """Turns generated token ids into text deltas that are safe to send.

    Held back: a trailing partial UTF-8 character, and any tail that could still grow into a stop
    string. When a stop string appears, the text before it is final and the rest is dropped.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text to send now, whether a stop string ended the row)."""
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        stop_at = self._stop_index()
        if stop_at is not None:
            self.text = self.text[:stop_at]
            return self._send(len(self.text)), True
        safe = len(self.text.rstrip("\ufffd"))
        for stop in self.stop:
            for length in range(min(len(stop) - 1, safe), 0, -1):
                if self.text[:safe].endswith(stop[:length]):
                    safe -= length
                    break
        return self._send(max(safe, self.sent)), False

    def flush(self) -> str:
        return self._send(len(self.text))

    def _stop_index(self) -> int | None:
        indexes = [i for i in (self.text.find(stop, max(0, self.sent - len(stop))) for stop in self.stop) if i >= 0]
        return min(indexes) if indexes else None

    def _send(self, end: int) -> str:
        delta = self.text[self.sent : end]
        self.sent = end
        return delta


@dataclass
class GenerationRow:
    """One sequence in a batch. `emit(text, token_id)` streams; `finish(reason, tokens)` ends it;
    `fail(error)` ends it when the batch itself failed."""

    prompt_ids: list[int]
    params: SamplingParams
    slot: int
    emit: Callable[[str, int], None]
    finish: Callable[[str, int], None]
    is_cancelled: Callable[[], bool] = lambda: False
    fail: Callable[[BaseException], None] = lambda error: None
    generated: int = field(default=0, init=False)
    done: bool = field(default=False, init=False)


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Padded batch sizes: powers of two from 2 (a batch of 1 would need its own graph) up to the max."""
    sizes, size = [], 2
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    sizes.append(max(2, max_batch_size))
    return tuple(sizes)


class BatchGenerator:
    """Runs batches on a causal LM with per-row slots; `set_slot_ids` feeds the slot LoRA layers."""

    def __init__(
        self,
        model,
        tokenizer,
        set_slot_ids: Callable[[torch.Tensor], None],
        max_batch_size: int,
        max_seq_len: int,
        compile_decode: bool,
        compile_mode: str = "default",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.set_slot_ids = set_slot_ids
        self.buckets = batch_buckets(max_batch_size)
        self.max_seq_len = max_seq_len
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = _eos_ids(model, tokenizer)
        self._caches: dict[int, StaticCache] = {}
        self.decode_calls = 0
        self.compiled = compile_decode
        self._decode = (
            torch.compile(self._decode_step, dynamic=False, mode=compile_mode) if compile_decode else self._decode_step
        )

    def bucket_for(self, rows: int) -> int:
        for size in self.buckets:
            if rows <= size:
                return size
        raise ValueError(f"{rows} rows exceed the largest batch bucket {self.buckets[-1]}")

    def warm_up(self) -> None:
        """Compile the decode graph of every bucket now, not on a user's request."""
        for size in self.buckets:
            rows = [
                GenerationRow([self.pad_id], SamplingParams(max_tokens=3, temperature=0.0), BASE_SLOT, lambda *_: None, lambda *_: None)
                for _ in range(size)
            ]
            self.run(rows)

    def _decode_step(self, input_ids, position_ids, attention_mask, slot_ids, cache):
        self.set_slot_ids(slot_ids)
        return self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1, :]

    def _cache(self, batch_size: int) -> StaticCache:
        cache = self._caches.get(batch_size)
        if cache is None:
            cache = StaticCache(config=self.model.config, max_cache_len=self.max_seq_len)
            self._caches[batch_size] = cache
        for layer in cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.zero_()
        return cache

    @torch.no_grad()
    def run(self, rows: list[GenerationRow]) -> None:
        """Generate until every row has finished (eos, stop string, max_tokens, cancel)."""
        batch = self.bucket_for(len(rows))
        prompt_len = max(len(row.prompt_ids) for row in rows)
        budget = max(row.params.max_tokens for row in rows)
        if prompt_len + budget > self.max_seq_len:
            raise InvalidRequestError(
                f"prompt ({prompt_len} tokens) + max_tokens ({budget}) exceeds max_seq_len {self.max_seq_len}"
            )
        device, cache_len = self.device, self.max_seq_len
        input_ids = torch.full((batch, prompt_len), self.pad_id, dtype=torch.long)
        key_valid = torch.zeros((batch, cache_len), dtype=torch.bool)
        for index in range(batch):
            ids = rows[index].prompt_ids if index < len(rows) else [self.pad_id]
            input_ids[index, prompt_len - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            key_valid[index, prompt_len - len(ids) : prompt_len] = True
        slot_ids = torch.tensor([row.slot for row in rows] + [BASE_SLOT] * (batch - len(rows)), device=device)
        position_ids = (key_valid[:, :prompt_len].long().cumsum(1) - 1).clamp(min=0)
        causal = torch.ones(prompt_len, cache_len, dtype=torch.bool).tril()
        prefill_mask = (causal[None] & key_valid[:, None, :]) | torch.eye(prompt_len, cache_len, dtype=torch.bool)[None]
        key_valid, input_ids, position_ids = key_valid.to(device), input_ids.to(device), position_ids.to(device)
        cache = self._cache(batch)

        self.set_slot_ids(slot_ids)
        logits = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=prefill_mask[:, None].to(device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :]
        next_positions = position_ids[:, -1:] + 1
        samplers = [_RowSampler(row.params) for row in rows]
        streams = [TextStream(self.tokenizer, row.params.stop) for row in rows]
        step = 0
        while True:
            tokens = self._pick_tokens(logits, samplers)
            for index, row in enumerate(rows):
                if not row.done:
                    self._advance(row, streams[index], tokens[index], prompt_len + step)
            if all(row.done for row in rows):
                return
            key_valid[:, prompt_len + step] = True
            token_column = torch.full((batch, 1), self.pad_id, dtype=torch.long)
            token_column[: len(rows), 0] = torch.tensor(tokens, dtype=torch.long)
            logits = self._decode(
                token_column.to(device), next_positions, key_valid[:, None, None, :], slot_ids, cache
            )
            self.decode_calls += 1
            next_positions = next_positions + 1
            step += 1

    def _advance(self, row: GenerationRow, stream: TextStream, token: int, position: int) -> None:
        row.generated += 1
        if row.is_cancelled():
            row.done = True
            row.finish("cancelled", row.generated)
            return
        if token in self.eos_ids and not row.params.ignore_eos:
            self._end(row, stream, token, "stop")
            return
        text, stopped = stream.push(token)
        if text:
            row.emit(text, token)
        if stopped:
            row.done = True
            row.finish("stop", row.generated)
        elif row.generated >= row.params.max_tokens or position + 1 >= self.max_seq_len:
            self._end(row, stream, token, "length")

    @staticmethod
    def _end(row: GenerationRow, stream: TextStream, token: int, reason: str) -> None:
        """Finish a row, sending first the text held back for a possible stop string."""
        row.done = True
        tail = stream.flush()
        if tail:
            row.emit(tail, token)
        row.finish(reason, row.generated)

    @staticmethod
    def _pick_tokens(logits: torch.Tensor, samplers: list[_RowSampler]) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        return [
            sampler.sample(logits[index]) if sampler.samples else greedy[index]
            for index, sampler in enumerate(samplers)
        ]


class _RowSampler:
    """Temperature and nucleus sampling with the row's own generator, so a seed reproduces a row
    whatever else shares its batch."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.samples = params.temperature > 0
        if self.samples:
            self.generator = torch.Generator().manual_seed(
                params.seed if params.seed is not None else random.getrandbits(63)
            )

    def sample(self, logits: torch.Tensor) -> int:
        probs = torch.softmax(logits.float().cpu() / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < self.params.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process; a recompile adds one."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
