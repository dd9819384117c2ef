"""`GenerationRequest`s for tests, written the way the engine's Python API reads."""

from __future__ import annotations

from deployments.contracts import GenerationRequest, SamplingParams
from deployments.engine.engine import chat_turns


def request(prompt: str | None = None, adapter_id: str | None = None, *, messages=None, prompt_ids=None,
            combination=None, **sampling) -> GenerationRequest:
    """`sampling` are SamplingParams fields; greedy unless `temperature` is given."""
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(
        adapter_id=adapter_id,
        params=SamplingParams(**sampling),
        prompt=prompt,
        messages=None if messages is None else chat_turns(messages),
        prompt_ids=None if prompt_ids is None else tuple(prompt_ids),
        combination=combination,
    )
