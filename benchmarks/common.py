"""Shared pieces of the engine benchmarks: arguments, threads, base models, synthetic adapters,
timing helpers and the one JSON line each benchmark prints last on stdout.

Base models (`--model`):
    smollm2    SmolLM2-135M-Instruct through `load_base_model` (the product default; the first
               load converts the GGUF, ~20-60 s, then it is cached under .cache/models).
    llama-1b   a Llama-shaped ~0.85 B model built in code with fixed-seed random weights (hidden
               2048, 16 layers, 32 heads, 8 kv heads, intermediate 5632, vocab 32000) and the tiny
               byte-level tokenizer: for GPU runs, nothing to download.
    tiny       the 2-layer test model, for the benchmark tests.

Adapters are PEFT LoRA state dicts built in memory with PEFT's saved key names
(`base_model.model.<module>.lora_A.weight`), parsed with `checkpoint_from_state_dict`: exactly
what the engine reads from an `adapter_model.safetensors`, without the disk.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("smollm2", "llama-1b", "tiny")
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MIN_RANK, MAX_RANK = 4, 16


def set_environment() -> None:
    """Before torch is imported: the project's own inductor cache, offline Hub, quiet tokenizers."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO_ROOT / ".cache" / "inductor"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


set_environment()

import torch  # noqa: E402  (after the environment is set)

from cluster.load_client import percentile, rounded  # noqa: E402, F401  (one definition; benchmarks use common's)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a short run (under 2 minutes on a 2-core CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--model", choices=MODELS, default="smollm2")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    return p


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RunInfo:
    device: str
    model: str
    quick: bool
    threads: int
    dtype: torch.dtype

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "device_name": device_name(self.device),
            "model": self.model,
            "quick": self.quick,
            "dtype": str(self.dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "threads": self.threads,
            "cpu_count": os.cpu_count(),
            "load_avg_1m_start": _load_average(),
        }


def setup(args: argparse.Namespace) -> RunInfo:
    """Resolve device and dtype, set threads deliberately, log what the machine is doing."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    log(
        f"device={device} ({device_name(device)}) model={args.model} quick={args.quick} threads={threads} "
        f"torch={torch.__version__} load_avg_1m={_load_average()} inductor_cache={os.environ['TORCHINDUCTOR_CACHE_DIR']}"
    )
    return RunInfo(device=device, model=args.model, quick=args.quick, threads=threads, dtype=dtype)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu x{os.cpu_count()}"


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def emit(info: RunInfo, results: dict[str, Any], started_s: float) -> dict[str, Any]:
    """Print the benchmark's one JSON line, last on stdout; returns the dict printed."""
    line = {**info.to_json(), **results}
    line["load_avg_1m_end"] = _load_average()
    line["wall_s"] = round(time.perf_counter() - started_s, 1)
    print(json.dumps(line), flush=True)
    return line


# ---- base models -------------------------------------------------------------------------


def load_base(model: str, device: str, dtype: torch.dtype):
    """A freshly loaded base model (a `LoadedBaseModel`) on `device` in `dtype`."""
    from deployments.engine.base_model import SMOLLM2_NAME, TINY_NAME, BaseModelSpec, load_base_model

    if model == "llama-1b":
        return build_llama_1b(device, dtype)
    name = {"smollm2": SMOLLM2_NAME, "tiny": TINY_NAME}[model]
    return load_base_model(BaseModelSpec(name=name), device=device, dtype=dtype)


def build_llama_1b(device: str, dtype: torch.dtype, seed: int = 1234):
    """A Llama-shaped ~0.85 B model with fixed-seed random weights, built on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from deployments.engine.base_model import TINY_NAME, BaseModelSpec, LoadedBaseModel, load_base_model
    from lora_core.base_models import tiny_llama_config

    # The tiny tokenizer (259 tokens, eos/pad = 2) covers ids < 259; larger ids decode to nothing,
    # which is fine for throughput (rows count tokens, not text).
    tokenizer = load_base_model(BaseModelSpec(name=TINY_NAME)).tokenizer
    config = LlamaConfig(
        **tiny_llama_config(  # the tiny tokenizer's special token ids, at 1B sizes
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
        attn_implementation="sdpa",
    )
    config.name_or_path = "llama-1b-random"
    started = time.perf_counter()
    rng_devices = [torch.cuda.current_device()] if device == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.device(device):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(dtype=dtype).eval().requires_grad_(False)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    params = sum(p.numel() for p in model.parameters())
    log(f"built llama-1b ({params / 1e9:.2f} B params) in {time.perf_counter() - started:.1f} s")
    return LoadedBaseModel(model=model, tokenizer=tokenizer, name="llama-1b-random", dtype=dtype, device=device)


def clone_model(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy (slot layers and PEFT both modify the model they are given)."""
    return copy.deepcopy(model)


# ---- synthetic adapters ------------------------------------------------------------------


def target_shapes(model: torch.nn.Module, targets: tuple[str, ...] = TARGET_MODULES) -> dict[str, tuple[int, int]]:
    """module name -> (in_features, out_features) for every target Linear of a plain model."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }


@dataclass(frozen=True)
class SyntheticAdapter:
    rank: int
    alpha: float
    config: dict[str, Any]  # adapter_config.json as a dict
    state_dict: dict[str, torch.Tensor]  # PEFT's saved key names, fp32, CPU

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict.values())


def make_adapter(
    shapes: dict[str, tuple[int, int]], rank: int, seed: int, std: float = 0.02, alpha: float | None = None
) -> SyntheticAdapter:
    """A random rank-`rank` LoRA on every module in `shapes` (non-zero A and B, so it changes logits)."""
    alpha = float(alpha if alpha is not None else 2 * rank)
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, (in_features, out_features) in shapes.items():
        state_dict[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * std
        state_dict[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * std
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in shapes}),
        "bias": "none",
    }
    return SyntheticAdapter(rank=rank, alpha=alpha, config=config, state_dict=state_dict)


def mixed_ranks(count: int, seed: int, low: int = MIN_RANK, high: int = MAX_RANK) -> list[int]:
    """`count` ranks drawn from [low, high], always including both ends when count >= 2."""
    rng = random.Random(seed)
    ranks = [rng.randint(low, high) for _ in range(count)]
    if count >= 2:
        ranks[0], ranks[1] = high, low
    return ranks


def peft_lora_config(adapter: SyntheticAdapter):
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.rank, lora_alpha=adapter.alpha, target_modules=list(adapter.config["target_modules"]), bias="none"
    )


# ---- timing ------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process so far (first compiles and recompiles)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ---- adapters as files, and a local Ray + Serve for the store benchmarks -----------------


def adapter_files(adapter: SyntheticAdapter, base_model_name: str | None = None) -> dict[str, bytes]:
    """The two files of a PEFT adapter folder, as bytes: `adapter_config.json` and
    `adapter_model.safetensors` (PEFT's saved key names). `base_model_name` goes into
    `base_model_name_or_path` only when given: it must be the served model's name, or the
    store refuses the adapter (`base_model_mismatch`)."""
    from safetensors.torch import save

    from lora_core.peft_files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

    config = dict(adapter.config)
    if base_model_name is not None:
        config["base_model_name_or_path"] = base_model_name
    weights = save({k: v.contiguous() for k, v in adapter.state_dict.items()}, metadata={"format": "pt"})
    return {ADAPTER_CONFIG_FILE: json.dumps(config, indent=2).encode(), ADAPTER_WEIGHTS_FILE: weights}


def make_serve_config() -> dict:
    """serve_config.yaml as `make serve` deploys it (the serving benchmarks start from it)."""
    import yaml

    return yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())


def engine_model_name(model: str) -> str:
    """`--model` -> the EngineConfig.base_model the replicas serve (no llama-1b: it has no name there)."""
    from deployments.engine.base_model import SMOLLM2_NAME, TINY_NAME

    names = {"smollm2": SMOLLM2_NAME, "tiny": TINY_NAME}
    if model not in names:
        raise SystemExit(f"--model {model}: the Serve benchmarks run smollm2 or tiny")
    return names[model]


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll `predicate` until it returns something truthy (returned); SystemExit after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def ray_processes_left() -> list[str]:
    """This process's Ray children (raylet, gcs_server, workers) still alive: [] after a clean
    `ray.shutdown()`. Only our own descendants count: other sessions' clusters are not ours."""
    import psutil

    left = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{child.pid} {child.name()}")
        except psutil.Error:
            continue
    return left


def descendant_cpu_clock(marker: str):
    """A function returning the CPU seconds (user + system) used so far by this process's
    descendant whose command line contains `marker` (e.g. a Ray actor's `ray::ServeReplica:app:...`
    title), or None if there is none. CPU time, unlike wall time, does not count the time other
    processes on a shared machine hold the core (Ray workers run at nice 15)."""
    import psutil

    found = None
    for child in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(child.cmdline()):
                found = child
                break
        except psutil.Error:
            continue
    if found is None:
        return None

    def clock() -> float:
        times = found.cpu_times()
        return times.user + times.system

    return clock


def wait_for_ray_exit(timeout_s: float = 15.0) -> None:
    """After `ray.shutdown()`: wait for this process's Ray children to go, warn if some stay."""
    deadline = time.monotonic() + timeout_s
    while (left := ray_processes_left()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        log(f"warning: Ray processes still running after shutdown: {left}")


def shut_down_ray(store=None) -> None:
    """Serve, then the detached store actor (if any), then Ray; wait for its processes to go."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        if store is not None:
            try:
                ray.kill(store)
            except Exception:  # already dead or never started: nothing to stop
                pass
        ray.shutdown()
    wait_for_ray_exit()


def store_bench_engine(model: str):
    """(EngineConfig, target shapes) the store benchmarks' replicas run: 4 slots, compile off."""
    from lora_core.geometry import slot_geometry
    from lora_core.settings import EngineConfig

    engine_config = EngineConfig(
        base_model=engine_model_name(model), compile="off", num_slots=4, max_num_seqs=8,
        max_seq_len=128, max_new_tokens=16, device="cpu",
    )
    started = time.perf_counter()
    shapes = dict(slot_geometry(engine_config).module_shapes)
    log(f"{len(shapes)} target layers of {engine_config.base_model} ({time.perf_counter() - started:.1f} s)")
    return engine_config, shapes
