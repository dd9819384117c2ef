"""The admin API's request bodies (`/admin/...`, admin key only)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lora_core.settings import SourceOptions

__all__ = ["DisableRequest", "PinRequest", "RegisterAdapterRequest", "RegisterSourceRequest"]


class RegisterAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter_id: str = Field(description="'<tenant>/<name>'")
    uri: str = Field(description="the adapter's folder: s3://bucket/key/prefix, hf://org/repo[/sub]@rev, or a local path")
    options: SourceOptions = Field(
        default_factory=dict, description="source options such as endpoint_url, region; never credentials"
    )


class RegisterSourceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str = Field(description="a root of <tenant>/<name>/ adapter folders")
    options: SourceOptions = Field(default_factory=dict)


class DisableRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fallback: Literal["none", "base"] = Field(
        "none", description="none: its requests answer 409 adapter_disabled; base: the base model answers them")


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=1, le=1024, description="replicas that keep it warm and never evict it")
