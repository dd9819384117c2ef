"""An adapter's validated weights in the form the Ray object store shares between processes.

Each tensor travels as a flat uint8 numpy array plus its dtype and shape: numpy arrays are read
zero-copy from the object store on every node, and a byte view carries any dtype (bf16 has no
numpy type). A replica turns a payload back into a `LoraCheckpoint` without parsing a file or
hashing it again: the store checked the checkpoint before it published the payload.

No Ray here: the store puts payloads, replicas get them; both ends are tested without a cluster.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from lora_core.checkpoint import LoraCheckpoint, LoraModuleWeights, parse_config
from lora_core.fingerprint import fingerprint
from lora_core.probe import AdapterProbe

__all__ = ["AdapterPayload", "checkpoint_from_payload", "payload_from_checkpoint"]


@dataclass(frozen=True)
class PayloadTensor:
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    data: np.ndarray  # uint8, flat


@dataclass(frozen=True)
class AdapterPayload:
    adapter_id: str
    version: str
    config: Mapping[str, object]  # adapter_config.json as read
    sha256: str
    size_bytes: int
    tensors: Mapping[str, tuple[PayloadTensor, PayloadTensor]]  # module name -> (A, B)
    fingerprint: Mapping[str, tuple[float, float]]  # what a slot must hold (lora_core.fingerprint)
    probe: AdapterProbe | None = None


def _pack(tensor: torch.Tensor) -> PayloadTensor:
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return PayloadTensor(str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), flat.numpy())


def _unpack(packed: PayloadTensor) -> torch.Tensor:
    with warnings.catch_warnings():  # object-store arrays are read-only; nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(packed.data)
    return data.view(getattr(torch, packed.dtype)).reshape(packed.shape)


def payload_from_checkpoint(
    adapter_id: str, version: str, config: Mapping[str, object], checkpoint: LoraCheckpoint
) -> AdapterPayload:
    tensors = {name: (_pack(w.lora_a), _pack(w.lora_b)) for name, w in checkpoint.modules.items()}
    return AdapterPayload(adapter_id, version, dict(config), checkpoint.sha256, checkpoint.size_bytes, tensors,
                          fingerprint(checkpoint), checkpoint.probe)


def checkpoint_from_payload(payload: AdapterPayload) -> LoraCheckpoint:
    """The checkpoint back; its tensors alias the payload's buffers (no copy)."""
    config = parse_config(dict(payload.config))
    modules = {
        name: LoraModuleWeights(lora_a=_unpack(a), lora_b=_unpack(b), scaling=config.scaling_for(name))
        for name, (a, b) in payload.tensors.items()
    }
    return LoraCheckpoint(
        config=config, modules=modules, size_bytes=payload.size_bytes, sha256=payload.sha256, version=payload.version,
        probe=payload.probe, fingerprint=payload.fingerprint,
    )
