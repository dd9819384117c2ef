"""An adapter's probe: `probe.json` beside its files, checked by a replica on every new version.

Pydantic only (no torch), so the registry can record it in the manifest.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AdapterProbe"]


class AdapterProbe(BaseModel):
    """The adapter's greedy completion of `prompt` must start with `expected`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=4000)
    expected: str = Field(min_length=1, max_length=1000)
