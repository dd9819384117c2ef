"""The OpenAI-compatible HTTP bodies: requests in, responses and stream chunks out.

Requests are validated here, at the edge (pydantic; a bad body is a 422). Fields that OpenAI
clients send but this server does not act on (`user`, `logprobs`, `presence_penalty`, ...) are
ignored rather than refused, because the SDKs send many of them by default. Limits that depend on
the engine's settings (max_tokens against `max_new_tokens`, prompt length against `max_seq_len`)
are not known here: the engine checks them and answers 400.

Between the ingress and a replica a request travels as a plain dict (`EngineRequest`), built by
`to_engine_request`, so the replica needs no HTTP types and the dict pickles cheaply through Ray.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "CompletionChunk",
    "CompletionRequest",
    "CompletionResponse",
    "EngineRequest",
    "EngineResult",
    "ModelCard",
    "ModelList",
    "Usage",
]

MAX_STOP_STRINGS = 8


class EngineRequest(TypedDict, total=False):
    """What the ingress sends a replica (exactly one of `prompt` and `messages`)."""

    adapter_id: str | None  # None: the base model alone
    prompt: str
    messages: list[dict[str, str]]
    max_tokens: int | None  # None: as many as the engine allows for this prompt
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]


class EngineResult(TypedDict):
    """What a replica answers for a whole request, and (with `text` a delta) for each stream chunk."""

    text: str
    finish_reason: str | None  # "stop" | "length" | "cancelled"; None on all but the last chunk
    prompt_tokens: int
    completion_tokens: int


# ---- requests --------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, description="send one last chunk with `usage` and no choices")


class _SamplingFields(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="an adapter id, or the base model's name for no adapter")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="makes sampling reproducible")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP_STRINGS} strings that end the text")
    stream: bool = Field(False, description="answer with server-sent events, one chunk per text delta")
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="choices per request; only 1 is supported")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not stop for stop in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling(self, adapter_id: str | None, max_tokens: int | None) -> EngineRequest:
        return EngineRequest(
            adapter_id=adapter_id,
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=list(self.stop or []),
        )


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions`."""

    prompt: str = Field(min_length=1, description="the text to continue")
    max_tokens: int = Field(16, ge=1, description="tokens to generate at most (OpenAI's default: 16)")

    def to_engine_request(self, adapter_id: str | None) -> EngineRequest:
        request = self._sampling(adapter_id, self.max_tokens)
        request["prompt"] = self.prompt
        return request


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="text, or a list of text parts (joined)")

    def as_template_message(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        # The chat template knows "system"; OpenAI's newer "developer" role means the same.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content}


class ChatCompletionRequest(_SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most; default: up to the limit")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens; wins")

    def to_engine_request(self, adapter_id: str | None) -> EngineRequest:
        request = self._sampling(adapter_id, self.max_completion_tokens or self.max_tokens)
        request["messages"] = [message.as_template_message() for message in self.messages]
        return request


# ---- responses -------------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _now_s() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, result: EngineResult) -> "Usage":
        prompt, completion = result["prompt_tokens"], result["completion_tokens"]
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now_s)
    model: str
    choices: list[CompletionChoice]
    usage: Usage

    @classmethod
    def of(cls, model: str, result: EngineResult) -> "CompletionResponse":
        choice = CompletionChoice(text=result["text"], finish_reason=result["finish_reason"])
        return cls(model=model, choices=[choice], usage=Usage.of(result))


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (OpenAI reuses `text_completion` here)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now_s)
    model: str
    choices: list[ChatChoice]
    usage: Usage

    @classmethod
    def of(cls, model: str, result: EngineResult) -> "ChatCompletionResponse":
        choice = ChatChoice(message=AssistantMessage(content=result["text"]), finish_reason=result["finish_reason"])
        return cls(model=model, choices=[choice], usage=Usage.of(result))


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


class StreamFormat:
    """Turns a replica's stream of `EngineResult` deltas into OpenAI's chunk objects for one request.

    Chat streams open with a delta that carries only the role, as OpenAI's do; with
    `include_usage`, one last chunk has `usage` and no choices.
    """

    def __init__(self, kind: Literal["completion", "chat"], model: str, include_usage: bool) -> None:
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        self.id = _new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = _now_s()

    def opening(self) -> list[BaseModel]:
        if self.kind == "chat":
            return [self._chat([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])]
        return []

    def chunk(self, result: EngineResult) -> list[BaseModel]:
        finish = result["finish_reason"]
        if self.kind == "chat":
            delta = ChatDelta(content=result["text"] or None)
            chunks: list[BaseModel] = [self._chat([ChatChunkChoice(delta=delta, finish_reason=finish)])]
        else:
            choice = CompletionChoice(text=result["text"], finish_reason=finish)
            chunks = [CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])]
        if finish is not None and self.include_usage:
            usage = Usage.of(result)
            if self.kind == "chat":
                chunks.append(self._chat([], usage))
            else:
                chunks.append(CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage))
        return chunks

    def _chat(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)


# ---- models ----------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = Field(description="'lora-serve' for the base model; the tenant part of an adapter id")
    parent: str | None = Field(None, description="the base model an adapter applies to")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

    @classmethod
    def of(cls, base_model: str, adapter_ids: list[str]) -> "ModelList":
        cards = [ModelCard(id=base_model, owned_by="lora-serve")]
        for adapter_id in sorted(adapter_ids):
            owner = adapter_id.split("/", 1)[0] if "/" in adapter_id else "lora-serve"
            cards.append(ModelCard(id=adapter_id, owned_by=owner, parent=base_model))
        return cls(data=cards)


# ---- admin API bodies ------------------------------------------------------------------------


class RegisterAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter_id: str = Field(description="'<tenant>/<name>'")
    uri: str = Field(description="the adapter's folder: s3://bucket/key/prefix, hf://org/repo[/sub]@rev, or a local path")
    options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="source options such as endpoint_url, region; never credentials"
    )


class RegisterSourceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str = Field(description="a root of <tenant>/<name>/ adapter folders")
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)
