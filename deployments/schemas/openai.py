"""The OpenAI-compatible HTTP bodies: completion and chat requests in, whole responses out, the
model list.

Requests are validated here, at the edge (pydantic; a bad body is a 422). Besides OpenAI's fields,
vLLM's extensions that serving clients send are taken: `ignore_eos`, `min_tokens`, `top_k`,
`repetition_penalty`, `stop_token_ids`. Fields that clients send but this server does not act on
(`user`, `logprobs`, `presence_penalty`, ...) are ignored rather than refused, because the SDKs
send many of them by default. Sampling fields take
their bounds and defaults from `deployments.contracts` (one definition each). Limits that depend
on the engine's settings (max_tokens against `max_new_tokens`, prompt length against
`max_seq_len`) are not known here: the engine checks them and answers 400.

This server's own extension: `adapters: [{"id", "weight"}]` (with `model` the base model's name)
runs the request on a weighted combination of adapters (`contracts.Combination`), and the
response says how it was built in `lora_serve.combination`.

A request leaves as one `GenerationRequest` (`to_generation_request`), built here and nowhere
else; what comes back is `GenerationChunk`s.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from deployments.contracts import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_COMBINED_ADAPTERS,
    MAX_STOP_STRINGS,
    ChatTurn,
    Combination,
    CombinationKind,
    GenerationChunk,
    GenerationRequest,
    MinTokens,
    RepetitionPenalty,
    SamplingParams,
    Seed,
    StopStrings,
    StopTokenIds,
    Temperature,
    TopK,
    TopP,
)
from deployments.request_limits import LIMITS

__all__ = [
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "CompletionChoice",
    "CompletionRequest",
    "CompletionResponse",
    "LoraServeInfo",
    "ModelCard",
    "ModelList",
    "Usage",
    "new_id",
    "now_s",
]

_STOP_STRINGS = TypeAdapter(StopStrings)


# ---- requests --------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, description="send one last chunk with `usage` and no choices")


class AdapterWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=256, description="an adapter id, <tenant>/<name>")
    weight: float = Field(1.0, description="finite and not 0; a negative weight subtracts the adapter")


class SamplingFields(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=LIMITS.max_model_chars,
                       description="an adapter id, or the base model's name for no adapter")
    temperature: Temperature = DEFAULT_TEMPERATURE
    top_p: TopP = DEFAULT_TOP_P
    seed: Seed | None = None
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP_STRINGS} strings that end the text")
    stream: bool = Field(False, description="answer with server-sent events, one chunk per text delta")
    # vLLM's extensions, which its clients (and `vllm bench serve`) send
    ignore_eos: bool = Field(False, description="run to max_tokens even past end of sequence")
    min_tokens: MinTokens = 0
    top_k: TopK = 0
    repetition_penalty: RepetitionPenalty = 1.0
    stop_token_ids: StopTokenIds | None = None
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=LIMITS.max_choices, description="choices per request; only 1 is supported")
    adapters: list[AdapterWeight] | None = Field(
        None, min_length=1, max_length=MAX_COMBINED_ADAPTERS,
        description="run on these adapters at once, each delta times its weight (`model`: the base model's name)",
    )

    @model_validator(mode="after")
    def _check_combination(self) -> "SamplingFields":
        if self.adapters is not None:
            self.combination()  # its ValueError (duplicate ids, bad weights) is a 422
        return self

    def combination(self) -> Combination | None:
        """The combination `adapters` asks for, ids as sent (the router checks who may use them)."""
        if self.adapters is None:
            return None
        ids = [item.id for item in self.adapters]
        if len(set(ids)) != len(ids):
            raise ValueError(f"`adapters` names each adapter once, got {ids}")
        return Combination.of({item.id: item.weight for item in self.adapters})

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        return list(_STOP_STRINGS.validate_python(tuple(stops)))

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling(self, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
            stop=tuple(self.stop or ()), ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, top_k=self.top_k,
            repetition_penalty=self.repetition_penalty, stop_token_ids=tuple(self.stop_token_ids or ()),
        )


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`."""

    prompt: str = Field(min_length=1, max_length=LIMITS.max_prompt_chars, description="the text to continue")
    max_tokens: int = Field(16, ge=1, description="tokens to generate at most (OpenAI's default: 16)")

    def to_generation_request(self, adapter_id: str | None, combination: Combination | None = None) -> GenerationRequest:
        return GenerationRequest(adapter_id, self._sampling(self.max_tokens), prompt=self.prompt, combination=combination)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="text, or a list of text parts (joined)")

    def to_turn(self) -> ChatTurn:
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        # The chat template knows "system"; OpenAI's newer "developer" role means the same.
        return ChatTurn(role="system" if self.role == "developer" else self.role, content=content)


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=LIMITS.max_messages,
                                        description="the conversation so far")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most; default: up to the limit")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens; wins")

    @field_validator("messages")
    @classmethod
    def _text_within_the_limit(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        chars = sum(len(message.to_turn().content) for message in messages)
        if chars > LIMITS.max_prompt_chars:
            raise ValueError(f"the messages hold {chars} characters; at most {LIMITS.max_prompt_chars}")
        return messages

    def to_generation_request(self, adapter_id: str | None, combination: Combination | None = None) -> GenerationRequest:
        sampling = self._sampling(self.max_completion_tokens or self.max_tokens)
        messages = tuple(message.to_turn() for message in self.messages)
        return GenerationRequest(adapter_id, sampling, messages=messages, combination=combination)


# ---- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, result: GenerationChunk) -> "Usage":
        prompt, completion = result.prompt_tokens, result.completion_tokens
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class LoraServeInfo(BaseModel):
    """This server's extension of a response (only on combination requests)."""

    combination: CombinationKind = Field(description="exact: ranks side by side; svd: reduced to max_rank")

    @classmethod
    def of(cls, result: GenerationChunk) -> "LoraServeInfo | None":
        return cls(combination=result.combination) if result.combination is not None else None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now_s)
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    lora_serve: LoraServeInfo | None = None

    @classmethod
    def of(cls, model: str, result: GenerationChunk) -> "CompletionResponse":
        choice = CompletionChoice(text=result.text, finish_reason=result.finish_reason)
        return cls(model=model, choices=[choice], usage=Usage.of(result), lora_serve=LoraServeInfo.of(result))


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now_s)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    lora_serve: LoraServeInfo | None = None

    @classmethod
    def of(cls, model: str, result: GenerationChunk) -> "ChatCompletionResponse":
        choice = ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)
        return cls(model=model, choices=[choice], usage=Usage.of(result), lora_serve=LoraServeInfo.of(result))


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
