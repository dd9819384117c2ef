"""What crosses Ray on the data path, as frozen types with one definition each.

    SamplingParams      how to sample one request; the defaults and limits live here, once, and the
                        HTTP bodies (`deployments.schemas.openai`) reuse them
    ChatTurn            one message of a chat prompt
    Combination         several adapters with weights, served as one derived adapter (per request)
    GenerationRequest   what the ingress sends a replica: adapter or combination, prompt (text, chat
                        or token ids), sampling; built once at the HTTP edge
    GenerationChunk     what comes back: a text delta while streaming (the last one carries
                        `finish_reason`), or the whole text of a finished request
    RoutingStats        what a replica reports to the adapter-affinity request router

`SamplingParams` is a pydantic dataclass, so a value out of bounds is refused wherever one is built
(pydantic's ValidationError: a 422 at the edge, a ValueError for Python callers). Ray's
`record_routing_stats` must answer a dict, so `RoutingStats` is turned into one at the replica
(`to_dict`) and back in the request router (`from_dict`), and nowhere else. No torch, no HTTP.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass as validated_dataclass

from deployments.request_limits import LIMITS

__all__ = [
    "DEFAULT_TEMPERATURE",
    "DEFAULT_TOP_P",
    "MAX_REPETITION_PENALTY",
    "MAX_SEED",
    "MAX_STOP_STRINGS",
    "MAX_STOP_TOKEN_IDS",
    "MAX_TEMPERATURE",
    "MAX_COMBINATION_WEIGHT",
    "MAX_COMBINED_ADAPTERS",
    "ChatTurn",
    "Combination",
    "CombinationKind",
    "FinishReason",
    "GenerationChunk",
    "GenerationRequest",
    "MinTokens",
    "RepetitionPenalty",
    "RoutingStats",
    "SamplingParams",
    "Seed",
    "StopStrings",
    "Temperature",
    "StopTokenIds",
    "TokenCount",
    "TopK",
    "TopP",
    "WeightedAdapter",
]

MAX_STOP_STRINGS = LIMITS.max_stop_strings
MAX_STOP_TOKEN_IDS = LIMITS.max_stop_token_ids
MAX_TEMPERATURE = 2.0
MAX_REPETITION_PENALTY = 10.0
MAX_SEED = 2**63 - 1
MAX_COMBINED_ADAPTERS = LIMITS.max_combined_adapters
MAX_COMBINATION_WEIGHT = 100.0
DEFAULT_TEMPERATURE = 1.0  # OpenAI's and vLLM's; pass 0 for greedy decoding
DEFAULT_TOP_P = 1.0

Temperature = Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE, description="0 is greedy decoding")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, description="nucleus sampling mass")]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="makes sampling reproducible")]
TokenCount = Annotated[int, Field(ge=1)]
StopString = Annotated[str, Field(min_length=1, max_length=LIMITS.max_stop_string_chars)]
StopStrings = Annotated[tuple[StopString, ...], Field(max_length=MAX_STOP_STRINGS)]
TopK = Annotated[int, Field(ge=-1, description="keep the k most likely tokens; 0 or -1: all (vLLM's)")]
MinTokens = Annotated[int, Field(ge=0, description="tokens generated before an end token or stop id may end the row")]
RepetitionPenalty = Annotated[
    float, Field(gt=0.0, le=MAX_REPETITION_PENALTY, description="> 1 discourages tokens already seen (vLLM's)")
]
StopTokenIds = Annotated[tuple[Annotated[int, Field(ge=0)], ...], Field(max_length=MAX_STOP_TOKEN_IDS)]
FinishReason = Literal["stop", "length", "cancelled"]
CombinationKind = Literal["exact", "svd"]
"""How a combination was built: `exact`, its adapters' ranks side by side (PEFT's `cat`); `svd`,
reduced to the engine's `max_rank` by truncated SVD because the summed rank did not fit."""
_COMBINATION_PREFIX = "combination:"


@validated_dataclass(frozen=True)
class SamplingParams:
    max_tokens: TokenCount | None = None
    """Tokens to generate at most; None: as many as the prompt leaves room for, up to the
    engine's `max_new_tokens`."""
    temperature: Temperature = DEFAULT_TEMPERATURE
    top_p: TopP = DEFAULT_TOP_P
    seed: Seed | None = None
    stop: StopStrings = ()
    ignore_eos: bool = False
    """Run to max_tokens (benchmarks; vLLM's option of the same name)."""
    min_tokens: MinTokens = 0
    top_k: TopK = 0
    repetition_penalty: RepetitionPenalty = 1.0
    stop_token_ids: StopTokenIds = ()
    """Token ids that end the row like eos does (vLLM's); the id itself is not in the text."""


@dataclass(frozen=True)
class ChatTurn:
    role: str  # "system" | "user" | "assistant", as the chat template reads them
    content: str


@dataclass(frozen=True)
class WeightedAdapter:
    adapter_id: str
    weight: float


@dataclass(frozen=True)
class Combination:
    """Several adapters active at once, each delta times its weight (a negative weight subtracts
    one): PEFT's `cat` combination, built on the replica as a derived adapter. Its parts are kept sorted by id, so the same recipe
    in any order is one cache entry and one routing key."""

    parts: tuple[WeightedAdapter, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.parts) <= MAX_COMBINED_ADAPTERS:
            raise ValueError(f"a combination has 1 to {MAX_COMBINED_ADAPTERS} adapters, got {len(self.parts)}")
        ids = [part.adapter_id for part in self.parts]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a combination names each adapter once, got {ids}")
        for part in self.parts:
            if not math.isfinite(part.weight) or part.weight == 0 or abs(part.weight) > MAX_COMBINATION_WEIGHT:
                raise ValueError(f"the weight of {part.adapter_id!r} must be a finite number other than 0 with "
                                 f"|weight| <= {MAX_COMBINATION_WEIGHT:g}, got {part.weight}")
        object.__setattr__(self, "parts", tuple(sorted(self.parts, key=lambda part: part.adapter_id)))

    @classmethod
    def of(cls, weights: Mapping[str, float]) -> "Combination":
        return cls(tuple(WeightedAdapter(adapter_id, float(weight)) for adapter_id, weight in weights.items()))

    @property
    def adapter_ids(self) -> tuple[str, ...]:
        return tuple(part.adapter_id for part in self.parts)

    @property
    def key(self) -> str:
        """The derived adapter's id on a replica and its routing key: never a valid adapter id."""
        recipe = ";".join(f"{part.adapter_id}*{part.weight!r}" for part in self.parts)
        return _COMBINATION_PREFIX + hashlib.sha256(recipe.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class GenerationRequest:
    """Exactly one of `prompt`, `messages` and `prompt_ids` (the engine refuses anything else
    with a 400); at most one of `adapter_id` and `combination`."""

    adapter_id: str | None  # None: the base model alone, or the combination
    params: SamplingParams = SamplingParams()
    prompt: str | None = None
    messages: tuple[ChatTurn, ...] | None = None
    prompt_ids: tuple[int, ...] | None = None
    combination: Combination | None = None
    tenant: str | None = None  # who sent it: the engine shares rows fairly across tenants

    def __post_init__(self) -> None:
        if self.adapter_id is not None and self.combination is not None:
            raise ValueError("a request names one adapter or one combination, not both")

    @property
    def routing_key(self) -> str:
        """What the request router places by: the adapter, the combination, or '' for the base."""
        if self.combination is not None:
            return self.combination.key
        return self.adapter_id or ""


@dataclass(frozen=True)
class GenerationChunk:
    text: str
    finish_reason: FinishReason | None = None
    """None on every chunk of a stream but the last."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Tokens generated so far (the total, on the last chunk)."""
    adapter_id: str | None = None
    combination: CombinationKind | None = None
    """Set for a combination request: how its derived adapter was built."""


@dataclass(frozen=True)
class RoutingStats:
    """A replica's slots and queue as the request router sees them (`routing_policy.ReplicaView`)."""

    warm: tuple[str, ...] = ()
    """Adapters in a slot, or waiting for a load that will put them in one."""
    free_slots: int = 0
    evictable_slots: int = 0
    next_victim: str | None = None
    """What a miss would evict now (None while a slot is free or nothing is evictable)."""
    queue_len: int = 0
    """Requests queued or running."""
    pending_loads: int = 0
    """Adapters that queued requests wait for (one load each, however many requests)."""
    num_slots: int = 0
    pinned: tuple[str, ...] = ()
    """Adapters pinned in a slot here (an admin's pin): never evicted, so requests belong here."""
    routing_weights: tuple[tuple[str, float], ...] = ()
    """The replicas' `routing_weights` setting, sorted (name, value) pairs: how a `serve deploy`
    reaches the request routers, which live in the callers' processes."""

    def __post_init__(self) -> None:
        if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                   and isinstance(p[1], (int, float)) and not isinstance(p[1], bool) for p in self.routing_weights):
            raise TypeError(f"routing stats 'routing_weights' must be (name, number) pairs, got {self.routing_weights!r}")
        for name in ("warm", "pinned"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(a, str) for a in value):
                raise TypeError(f"routing stats {name!r} must be a tuple of adapter ids, got {value!r}")
        for name in ("free_slots", "evictable_slots", "queue_len", "pending_loads", "num_slots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"routing stats {name!r} must be an integer >= 0, got {value!r}")
        if self.next_victim is not None and not isinstance(self.next_victim, str):
            raise TypeError(f"routing stats 'next_victim' must be an adapter id or None, got {self.next_victim!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "warm": list(self.warm), "pinned": list(self.pinned),
                "routing_weights": dict(self.routing_weights)}

    @classmethod
    def from_dict(cls, report: Mapping[str, Any]) -> "RoutingStats":
        """Parse a replica's report; TypeError or ValueError if it is not one."""
        if not isinstance(report, Mapping):
            raise TypeError(f"routing stats must be a mapping, got {type(report).__name__}")
        fields = set(cls.__dataclass_fields__)
        if unknown := set(report) - fields:
            raise ValueError(f"unknown routing stats fields {sorted(unknown)}")
        if missing := fields - set(report):
            raise ValueError(f"routing stats lack {sorted(missing)}")
        lists = {}
        for name in ("warm", "pinned"):
            value = report.get(name, ())
            if not isinstance(value, (list, tuple)):
                raise TypeError(f"routing stats {name!r} must be a list of adapter ids, got {value!r}")
            lists[name] = tuple(value)
        weights = report.get("routing_weights", {})
        if not isinstance(weights, Mapping):
            raise TypeError(f"routing stats 'routing_weights' must be a mapping, got {weights!r}")
        return cls(**{**report, **lists, "routing_weights": tuple(sorted(weights.items()))})
