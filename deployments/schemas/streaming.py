"""Streamed answers: OpenAI's chunk objects and the server-sent events that carry them.

    StreamFormat   a replica's `GenerationChunk` deltas -> OpenAI chunk objects, for one request
    sse_event      one `data: ...` event (a chunk, an error body, or the final `[DONE]`)
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel

from deployments.contracts import GenerationChunk
from deployments.schemas.openai import CompletionChoice, LoraServeInfo, Usage, new_id, now_s

__all__ = ["ChatChunkChoice", "ChatCompletionChunk", "ChatDelta", "CompletionChunk", "StreamFormat", "sse_event"]


def sse_event(payload: BaseModel | dict | Literal["[DONE]"]) -> str:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude_none=False)
    elif isinstance(payload, dict):
        data = json.dumps(payload)
    else:
        data = payload
    return f"data: {data}\n\n"


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (OpenAI reuses `text_completion` here)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    lora_serve: LoraServeInfo | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    lora_serve: LoraServeInfo | None = None


class StreamFormat:
    """Turns a replica's stream of `GenerationChunk` deltas into OpenAI's chunk objects for one request.

    Chat streams open with a delta that carries only the role, as OpenAI's do; with
    `include_usage`, one last chunk has `usage` and no choices.
    """

    def __init__(self, kind: Literal["completion", "chat"], model: str, include_usage: bool) -> None:
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = now_s()

    def opening(self) -> list[BaseModel]:
        if self.kind == "chat":
            return [self._chat([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])]
        return []

    def chunk(self, result: GenerationChunk) -> list[BaseModel]:
        """The chunks for one delta; the one that finishes carries `lora_serve` (combinations)."""
        finish = result.finish_reason
        info = LoraServeInfo.of(result) if finish is not None else None
        if self.kind == "chat":
            delta = ChatDelta(content=result.text or None)
            chunks: list[BaseModel] = [self._chat([ChatChunkChoice(delta=delta, finish_reason=finish)], lora_serve=info)]
        else:
            choice = CompletionChoice(text=result.text, finish_reason=finish)
            chunks = [CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice],
                                      lora_serve=info)]
        if finish is not None and self.include_usage:
            usage = Usage.of(result)
            if self.kind == "chat":
                chunks.append(self._chat([], usage))
            else:
                chunks.append(CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage))
        return chunks

    def _chat(self, choices: list[ChatChunkChoice], usage: Usage | None = None,
              lora_serve: LoraServeInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage,
                                   lora_serve=lora_serve)
