"""Every limit on what a caller sends, in one model: the HTTP bodies' schemas, the ingress's body
size check and the README's "Limits and errors" table read it from here.

Limits that depend on the engine (prompt tokens against `max_seq_len`, `max_tokens` against
`max_new_tokens`) are the engine's settings and are checked by the engine (400). The rest are
fixed here, sized so that a body under them costs a replica at most milliseconds to parse and
tokenize. Pure module: pydantic only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["LIMITS", "RequestLimits"]


class RequestLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(1 << 20, description="a request body (413 above it)")
    max_prompt_chars: int = Field(200_000, description="a completion's prompt, or all of a chat's message text")
    max_messages: int = Field(256, description="messages in one chat request")
    max_model_chars: int = Field(256, description="the `model` value")
    max_stop_strings: int = Field(8, description="`stop` strings")
    max_stop_string_chars: int = Field(256, description="one `stop` string")
    max_stop_token_ids: int = Field(64, description="`stop_token_ids`")
    max_combined_adapters: int = Field(8, description="`adapters` in one request")
    max_choices: int = Field(1, description="`n`: only one choice per request")


LIMITS = RequestLimits()
