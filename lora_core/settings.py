"""The settings models that cross process boundaries, validated where they enter.

    EngineConfig    a replica engine: base model, slots, ranks, batching, limits (serve_config.yaml
                    `args.replica`, which Serve hands each replica as its `user_config`)
    StoreConfig     the adapter store actor (`args.replica.store`)
    SourceInput     one watched source of adapters, as configured or registered

Pure pydantic: no torch (turning `device: auto` into a device is the engine's business), so the
ingress, the store and the CLI read these without importing the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lora_core.adapter_ids import parse_adapter_id
from lora_core.errors import InvalidAdapterIdError
from lora_core.paths import default_store_root

__all__ = ["LIVE_ENGINE_FIELDS", "EngineConfig", "SourceInput", "SourceOptions", "StoreConfig"]

SourceOptions = dict[str, str | int | float | bool]


LIVE_ENGINE_FIELDS = ("max_new_tokens", "batch_wait_ms", "prefill_chunk_tokens")
"""EngineConfig fields a running engine takes (`Engine.apply_live_settings`); the others need a new one."""


class EngineConfig(BaseModel):
    """The engine's settings; the replica's `user_config` carries them from serve_config.yaml."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str = Field("smollm2-135m-instruct", description="a known base model name")
    base_model_path: str | None = Field(None, description="a local transformers causal-LM folder; wins over base_model")
    model_cache_dir: str | None = Field(None, description="where converted base models are cached")
    num_slots: int = Field(8, ge=1, le=1024, description="adapter slots (slot 0, the base model, comes on top)")
    max_rank: int = Field(16, ge=1, le=512, description="largest LoRA rank a slot holds; smaller ranks are padded")
    target_modules: tuple[str, ...] = Field(("q_proj", "k_proj", "v_proj", "o_proj"), min_length=1)
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile the decode step; auto = on CUDA")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: fp32 on CPU, bf16 on CUDA")
    max_num_seqs: int = Field(
        32, ge=1, le=1024, description="requests decoded together (continuous batching); each holds a KV lane"
    )
    max_seq_len: int = Field(512, ge=16, le=32768, description="prompt + generated tokens per request")
    max_new_tokens: int = Field(256, ge=1)
    kv_cache_bytes: int = Field(
        2 << 30, ge=1, description="KV cache budget; lanes = min(max_num_seqs, budget // bytes of a max_seq_len lane)"
    )
    prefill_chunk_tokens: int = Field(
        256, ge=1, le=65536, description="prompt tokens prefilled per step: what a long prompt may cost a step"
    )
    slot_admission: Literal["lru", "tinylfu"] = Field(
        "tinylfu", description="which resident a slot miss evicts: W-TinyLFU (one-off adapters do not evict hot "
        "ones) or plain LRU (deployments.engine.admission)")
    batch_wait_ms: float = Field(0.0, ge=0, le=1000, description="an idle engine waits this long for more arrivals")
    host_cache_bytes: int = Field(1 << 30, ge=0)
    max_adapter_bytes: int = Field(512 << 20, ge=1)
    torch_threads: int | None = Field(None, ge=1)


class SourceInput(BaseModel):
    """A source as configured or registered: the store's `SourceSpec` without its bookkeeping."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    adapter_id: Optional[str] = None
    options: SourceOptions = Field(default_factory=dict)


class StoreConfig(BaseModel):
    """The adapter store's settings (serve_config.yaml: `args.replica.store`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("lora-serve-adapter-store", min_length=1, description="the detached actor's name")
    namespace: str = Field("lora-serve", min_length=1, description="the Ray namespace it lives in")
    root: Optional[str] = Field(None, description="manifest + validated copies; default <repo>/.cache/adapter-store")
    sources: list[SourceInput] = Field(default_factory=list, description="watched from the start")
    sync_interval_s: float = Field(5.0, gt=0, le=86400, description="each source is listed this often")
    max_backoff_s: float = Field(60.0, gt=0, description="longest wait before retrying an unreachable source")
    max_loss_share: float = Field(0.5, ge=0, le=1, description="a listing that loses more than this share of a "
                                  "source's adapters at once is held as suspect, and they keep serving, until "
                                  "the next listing confirms the loss (an unmounted folder, a copy in progress)")
    fetch_workers: int = Field(4, ge=1, le=64, description="parallel downloads per sync")
    show_progress: bool = Field(False, description="progress bars for downloads (a terminal: the CLI, a job)")
    keep_versions: int = Field(2, ge=1, le=100, description="good versions kept per adapter: the serving one and "
                               "the ones a rollback goes back to")
    merged_uri: Optional[str] = Field(None, description="where named merges are written, <tenant>/<name>/ under "
                                      "it: a local folder or s3://bucket/prefix; default <root>/merged")
    merged_options: SourceOptions = Field(default_factory=dict, description="its source options (endpoint_url, "
                                          "region); credentials come from the environment")
    allowed_roots: list[SourceInput] = Field(default_factory=list, description="where the admin API may register "
                                             "adapters and sources, beside sources, root and merged_uri; each "
                                             "root's options (endpoint_url, ...) are used for what lies under it")
    pins: dict[str, int] = Field(default_factory=dict, description="adapter id -> replicas it is kept warm on "
                                 "(never evicted there), beside the admin API's pins: the larger count wins")

    @field_validator("pins")
    @classmethod
    def _pins_name_adapters(cls, pins: dict[str, int]) -> dict[str, int]:
        for adapter_id, replicas in pins.items():
            try:
                parse_adapter_id(adapter_id)
            except InvalidAdapterIdError as error:
                raise ValueError(str(error)) from None
            if isinstance(replicas, bool) or replicas < 1:
                raise ValueError(f"pins[{adapter_id!r}] must be a replica count >= 1, got {replicas!r}")
        return pins

    def resolved_root(self) -> Path:
        return Path(self.root or default_store_root()).resolve()
