"""The replica engine: one base model, N LoRA slots on one (optionally compiled) graph, batched
continuous batching across adapters. Usable without Ray:

    from deployments.engine import Engine
    from lora_core.settings import EngineConfig

    engine = Engine(EngineConfig(base_model="tiny-random-llama", compile="off"))

    engine        Engine: the facade (adapters, requests, stats)
    residency     AdapterResidency: which adapter version is where (slots, host cache, folders)
    scheduler     Scheduler: the loop thread: commands, then admit, prefill a chunk, decode a step
    handles       RequestHandle: stream, await or cancel one request
    kv_cache      LaneKVCache: one KV lane per running sequence, within a byte budget
    model_runner  ModelRunner: a prefill chunk or a decode step over the lanes, each row on its slot
    sampling      per-row temperature, top-p/top-k, repetition penalty and seeds, one call per step
    text_stream   TextStream: incremental detokenizing and stop strings for one request
    slot_lora     SlotLoraModel: stacked per-slot LoRA weights, swaps as in-place copies
    slots         SlotPool: the hotswap slots, W-TinyLFU admission by default (`admission`; pure Python)
    host_cache    HostCache: prepared adapters in host memory, bounded by bytes (pure Python)
    base_model    load the base model and tokenizer offline (SmolLM2, tiny, a local folder)
    devices       `auto` device, dtype and compile settings made concrete

Importing the package imports nothing: `Engine` is loaded on first use, so the pure modules
(`slots`, `host_cache`) stay free of torch and are tested alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deployments.engine.engine import Engine

__all__ = ["Engine"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from deployments.engine.engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
