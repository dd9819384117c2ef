"""Read PEFT LoRA checkpoints and validate them against the engine's slot geometry.

This is the one validation path: the engine runs it before a swap, the adapter store runs it
before it publishes a version. Everything is checked before anything is copied (PEFT's
hotswap "dry run first"), so a refused checkpoint leaves every slot as it was.

Only `adapter_model.safetensors` is ever read; pickle files (`.bin`, `.pt`) are refused, never
unpickled. No Ray, no HTTP: torch and safetensors only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from lora_core.errors import InvalidAdapterError
from lora_core.geometry import DEFAULT_MAX_SIZE_BYTES, SlotGeometry, normalize_model_name
from lora_core.peft_files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PICKLE_WEIGHT_FILES, PROBE_FILE
from lora_core.probe import AdapterProbe

logger = logging.getLogger("lora_core.checkpoint")

__all__ = [
    "LoraCheckpoint",
    "LoraModuleWeights",
    "PeftLoraConfig",
    "checkpoint_from_bytes",
    "checkpoint_from_state_dict",
    "parse_config",
    "read_checkpoint",
    "read_probe",
    "validate_checkpoint",
]

_KEY_PATTERN = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")


class PeftLoraConfig(BaseModel):
    """The fields of PEFT's `adapter_config.json` the engine needs; the rest is ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    peft_type: str
    r: int = Field(ge=1)
    lora_alpha: float = Field(gt=0)
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    target_modules: list[str] | str | None = None
    base_model_name_or_path: str | None = None
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layer_replication: list | None = None
    alora_invocation_tokens: list[int] | None = None

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, patterns: dict[str, float]) -> dict[str, float]:
        """PEFT matches each key as a regex and divides by each rank: a key that is not a regex
        or a value <= 0 would fail only later, mid-sync or mid-swap."""
        for pattern, value in patterns.items():
            if not value > 0:
                raise ValueError(f"pattern {pattern!r} has {value!r}; ranks and alphas must be > 0")
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {error}") from None
        return patterns

    def rank_for(self, module_name: str) -> int:
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, module_name), self.r)

    def scaling_for(self, module_name: str) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA, per-module patterns honoured."""
        rank = self.rank_for(module_name)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module_name), self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_key(patterns: Mapping[str, object], module_name: str) -> str:
    """PEFT's `get_pattern_key`: the first pattern that matches the module name's suffix."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return pattern
    return module_name


def read_probe(folder: str | Path) -> AdapterProbe | None:
    path = Path(folder) / PROBE_FILE
    if not path.is_file():
        return None
    try:
        return AdapterProbe.model_validate_json(path.read_bytes())
    except ValidationError as error:
        raise InvalidAdapterError(f"{PROBE_FILE} is invalid: {error}", "invalid_config") from None


@dataclass(frozen=True)
class LoraModuleWeights:
    lora_a: torch.Tensor  # [r, in_features]
    lora_b: torch.Tensor  # [out_features, r]
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass(frozen=True)
class LoraCheckpoint:
    """A parsed, not yet validated, PEFT LoRA checkpoint: module name -> its A, B and scaling."""

    config: PeftLoraConfig
    modules: Mapping[str, LoraModuleWeights]
    size_bytes: int
    sha256: str  # of adapter_model.safetensors
    version: str  # of the config and the weights together: a config-only change is a new version
    probe: AdapterProbe | None = None
    fingerprint: Mapping[str, tuple[float, float]] | None = None
    """What a slot must hold (`lora_core.fingerprint`), as the store computed it; None: not given."""

    @property
    def max_rank(self) -> int:
        return max(weights.rank for weights in self.modules.values())


def read_checkpoint(folder: str | Path, max_size_bytes: int = DEFAULT_MAX_SIZE_BYTES) -> LoraCheckpoint:
    """Read `adapter_config.json` and `adapter_model.safetensors` from a folder."""
    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG_FILE
    weights_path = folder / ADAPTER_WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = [name for name in PICKLE_WEIGHT_FILES if (folder / name).exists()]
        if pickles:
            raise InvalidAdapterError(
                f"{folder} holds {pickles[0]}, a pickle file; only {ADAPTER_WEIGHTS_FILE} is accepted "
                "(convert it with safetensors.torch.save_file)",
                "pickle_file",
            )
        raise InvalidAdapterError(f"{folder} has no {ADAPTER_WEIGHTS_FILE}", "missing_file")
    if not config_path.is_file():
        raise InvalidAdapterError(f"{folder} has no {ADAPTER_CONFIG_FILE}", "missing_file")
    size_bytes = weights_path.stat().st_size
    if size_bytes > max_size_bytes:
        raise InvalidAdapterError(
            f"{ADAPTER_WEIGHTS_FILE} is {size_bytes} bytes, over the limit of {max_size_bytes}", "too_large"
        )
    try:
        config_dict = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidAdapterError(f"{ADAPTER_CONFIG_FILE} is not valid JSON: {error}", "invalid_config") from None
    checkpoint = checkpoint_from_bytes(config_dict, weights_path.read_bytes())
    probe = read_probe(folder)
    return dataclasses.replace(checkpoint, probe=probe) if probe is not None else checkpoint


def checkpoint_from_bytes(config_dict: object, weights: bytes) -> LoraCheckpoint:
    """Parse a checkpoint from its config dict and the raw bytes of its safetensors file."""
    try:
        tensors = load_safetensors_bytes(weights)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise InvalidAdapterError(f"{ADAPTER_WEIGHTS_FILE} is not a readable safetensors file: {error}", "corrupt_file") from None
    checkpoint = checkpoint_from_state_dict(config_dict, tensors)
    weights_sha256 = hashlib.sha256(weights).hexdigest()
    return LoraCheckpoint(
        config=checkpoint.config,
        modules=checkpoint.modules,
        size_bytes=len(weights),
        sha256=weights_sha256,
        version=_version(config_dict, weights_sha256),
    )


def checkpoint_from_state_dict(config_dict: object, tensors: Mapping[str, torch.Tensor]) -> LoraCheckpoint:
    """Parse a checkpoint from PEFT's saved key names (`base_model.model.<module>.lora_A.weight`)."""
    config = parse_config(config_dict)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY_PATTERN.match(key)
        if match is None:
            raise InvalidAdapterError(
                f"tensor {key!r} is not a LoRA A/B weight (DoRA magnitudes, LoRA biases, embeddings and "
                "modules_to_save cannot be served from a slot)",
                "unsupported_feature",
            )
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise InvalidAdapterError("the checkpoint holds no LoRA weights", "corrupt_file")
    modules = {}
    for name, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            raise InvalidAdapterError(f"module {name!r} has lora_{''.join(pair)} but not both A and B", "corrupt_file")
        modules[name] = LoraModuleWeights(lora_a=pair["A"], lora_b=pair["B"], scaling=config.scaling_for(name))
    size_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    weights_sha256 = digest.hexdigest()
    return LoraCheckpoint(
        config=config, modules=modules, size_bytes=size_bytes, sha256=weights_sha256,
        version=_version(config_dict, weights_sha256),
    )


def _version(config_dict: dict, weights_sha256: str) -> str:
    config_json = json.dumps(config_dict, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{config_json}\n{weights_sha256}".encode()).hexdigest()


def _is_local_folder(name: str) -> bool:
    """A filesystem path rather than a Hub id (`org/name`, or a bare name)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def parse_config(config_dict: object) -> PeftLoraConfig:
    if not isinstance(config_dict, dict):
        raise InvalidAdapterError(f"{ADAPTER_CONFIG_FILE} must hold a JSON object", "invalid_config")
    peft_type = config_dict.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapterError(f"peft_type is {peft_type!r}; only LORA adapters can be served", "unsupported_peft_type")
    try:
        config = PeftLoraConfig.model_validate(config_dict)
    except ValidationError as error:
        raise InvalidAdapterError(f"{ADAPTER_CONFIG_FILE} is invalid: {error}", "invalid_config") from None
    refusals = {
        "use_dora": "DoRA adapters need a magnitude vector per module and cannot share a slot",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters do not fit Linear base layers",
        "lora_bias": "LoRA biases are not supported",
        "layer_replication": "layer_replication re-stacks the base model's layers, which are shared by every slot",
        "alora_invocation_tokens": "Activated LoRA applies the adapter from its invocation tokens on; slots apply it to every token",
    }
    for field, why in refusals.items():
        if getattr(config, field):
            raise InvalidAdapterError(f"{field}=true: {why}", "unsupported_feature")
    if config.bias != "none":
        raise InvalidAdapterError(f"bias={config.bias!r} trains base biases; only bias='none' is supported", "unsupported_feature")
    if config.modules_to_save:
        raise InvalidAdapterError(
            f"modules_to_save={config.modules_to_save} replaces whole base modules; it cannot be served from a slot",
            "unsupported_feature",
        )
    return config


def validate_checkpoint(checkpoint: LoraCheckpoint, geometry: SlotGeometry, check_values: bool = True) -> None:
    """Raise InvalidAdapterError naming the first reason the checkpoint does not fit; copy nothing.

    `check_values=False` skips the NaN/inf scan (half the cost on a replica) for weights the
    adapter store already scanned before it published them; shapes and ranks are always checked."""
    if checkpoint.size_bytes > geometry.max_size_bytes:
        raise InvalidAdapterError(
            f"the adapter is {checkpoint.size_bytes} bytes, over the limit of {geometry.max_size_bytes}", "too_large"
        )
    base_name = checkpoint.config.base_model_name_or_path
    named_elsewhere = (base_name and geometry.base_model_names
                       and normalize_model_name(base_name) not in geometry.base_model_names)
    if named_elsewhere and _is_local_folder(base_name):
        # Trained on a local copy (`/home/me/models/base`): the name says nothing about the
        # weights, so the shapes below decide.
        logger.warning("adapter trained on the local folder %r: served because its shapes fit this base model %s",
                       base_name, sorted(geometry.base_model_names))
    elif named_elsewhere:
        raise InvalidAdapterError(
            f"the adapter was trained on {base_name!r}; this server's base model is one of "
            f"{sorted(geometry.base_model_names)}",
            "base_model_mismatch",
        )
    for name, weights in checkpoint.modules.items():
        if name not in geometry.module_shapes:
            prepared = sorted({module.rsplit(".", 1)[-1] for module in geometry.module_shapes})
            raise InvalidAdapterError(
                f"the adapter targets {name!r}, which is not among the prepared target modules {prepared}",
                "unknown_target_module",
            )
        in_features, out_features = geometry.module_shapes[name]
        lora_a, lora_b = weights.lora_a, weights.lora_b
        if lora_a.ndim != 2 or lora_b.ndim != 2:
            raise InvalidAdapterError(f"{name}: LoRA weights must be matrices", "shape_mismatch")
        rank = lora_a.shape[0]
        if tuple(lora_a.shape) != (rank, in_features) or tuple(lora_b.shape) != (out_features, rank):
            raise InvalidAdapterError(
                f"{name}: lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} do not fit the base "
                f"layer ({in_features} -> {out_features}, expected A [r, {in_features}] and B [{out_features}, r])",
                "shape_mismatch",
            )
        if rank > geometry.max_rank:
            raise InvalidAdapterError(
                f"{name}: rank {rank} is larger than the server's max_rank {geometry.max_rank}; "
                "ask for a larger max_rank or retrain with a smaller r",
                "rank_too_large",
            )
        if rank != checkpoint.config.rank_for(name):
            raise InvalidAdapterError(
                f"{name}: the weights have rank {rank} but the config says r={checkpoint.config.rank_for(name)}",
                "invalid_config",
            )
        for part, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
            if not tensor.is_floating_point():
                raise InvalidAdapterError(f"{name}.{part} has dtype {tensor.dtype}, not a float type", "corrupt_file")
            if not check_values:
                continue
            checkable = tensor if tensor.element_size() > 1 else tensor.float()  # no isfinite for float8
            if not bool(torch.isfinite(checkable).all()):
                raise InvalidAdapterError(f"{name}.{part} holds NaN or infinite values", "non_finite")

