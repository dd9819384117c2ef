"""The admin API's request bodies (`/admin/...`, admin key only)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DisableRequest", "PinRequest", "RegisterAdapterRequest", "RegisterSourceRequest"]


class RegisterAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "2" or true for a number is an error, not a 2

    adapter_id: str = Field(description="'<tenant>/<name>'")
    uri: str = Field(description="the adapter's folder: s3://bucket/key/prefix, hf://org/repo[/sub]@rev, or a local path")
    options: dict[str, Any] = Field(default_factory=dict, description="only what `adapters_store.allowlist` lets "
                                    "an API call set; the rest comes from the allowed root's configured options")


class RegisterSourceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "2" or true for a number is an error, not a 2

    uri: str = Field(description="a root of <tenant>/<name>/ adapter folders, under an allowed root")
    options: dict[str, Any] = Field(default_factory=dict, description="as for RegisterAdapterRequest")


class DisableRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "2" or true for a number is an error, not a 2

    fallback: Literal["none", "base"] = Field(
        "none", description="none: its requests answer 409 adapter_disabled; base: the base model answers them")


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "2" or true for a number is an error, not a 2

    replicas: int = Field(1, ge=1, le=1024, description="replicas that keep it warm and never evict it")
