"""Export an adapter merged into the base model: a standard transformers folder anyone can load
without PEFT or this server (PEFT's `merge_and_unload`, then `save_pretrained`), checked first.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m cluster.jobs.export --adapter acme/pirate --out /tmp/pirate-merged
    python -m cluster.jobs.export --adapter-folder ./my-adapter --out s3://bucket/models/pirate
    python -m cluster.jobs.export --recipe pirate-json.json --out /tmp/pirate-json-merged

The base model and slot limits come from serve_config.yaml (`--config`), so the export is of
what the server serves. `--adapter` reads the serving version from the running adapter store
(through Ray's object store, the only part that needs Ray); `--recipe` merges its inputs with
the store's own `merge_adapters`. The check: the saved folder, loaded fresh with
`AutoModelForCausalLM`, must give the serving engine's logits (and unmerged PEFT's) on the probe
prompts within LOGIT_ATOL; otherwise nothing is published and the job exits 3. An s3:// out is
written and checked locally, then uploaded. The last line on stdout is a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from pydantic import ValidationError
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from adapters_store.merge_spec import MergeSpec
from adapters_store.merging import merge_adapters
from cluster.jobs.settings import DEFAULT_CONFIG, load_settings
from lora_core.adapter_ids import adapter_dir, parse_s3_uri, validate_adapter_id
from lora_core.checkpoint import LoraCheckpoint, read_checkpoint, validate_checkpoint
from lora_core.errors import LoraServeError, ServiceUnavailableError
from lora_core.files import publish_folder
from lora_core.geometry import SlotGeometry, slot_geometry
from lora_core.payload import AdapterPayload, checkpoint_from_payload
from lora_core.peft_files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from lora_core.settings import EngineConfig, StoreConfig

__all__ = [
    "DEFAULT_PROBES", "LOGIT_ATOL", "ExportCheckError", "ExportError", "ExportOptions",
    "ExportResult", "FetchAdapter", "adapter_to_export", "export_folder", "load_settings", "main", "run", "save_merged",
    "store_fetcher", "upload_folder", "write_payload_folder",
]

logger = logging.getLogger("cluster.jobs.export")

LOGIT_ATOL = 1e-4  # fp32: merged vs unmerged differ by rounding only
DEFAULT_PROBES = ("What is the capital of France?", "Write one sentence about the sea.", "List three colors.")
EXPORT_ADAPTER_ID = "export/adapter"
EXIT_FAILED, EXIT_CHECK_FAILED = 1, 3

FetchAdapter = Callable[[str], Path]
"""adapter id -> a local PEFT folder of its serving version (`store_fetcher`, or a test's dict)."""
S3ClientFactory = Callable[[str | None], Any]
"""endpoint URL or None -> a boto3-like S3 client (`upload_file(Filename, Bucket, Key, Callback=)`)."""


class ExportError(RuntimeError):
    """The export was refused or failed; the message says why."""


class ExportCheckError(ExportError):
    """The saved model does not reproduce the served adapter: it must not be published."""

    def __init__(self, message: str, max_abs_logit_diff: float | None = None) -> None:
        super().__init__(message, max_abs_logit_diff)
        self.message, self.max_abs_logit_diff = message, max_abs_logit_diff

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class ExportOptions:
    """The command line: exactly one of adapter / adapter_folder / recipe."""

    out: str
    adapter: str | None = None
    adapter_folder: Path | None = None
    recipe: Path | None = None
    config: Path = DEFAULT_CONFIG
    probes: tuple[str, ...] = DEFAULT_PROBES
    max_shard_size: str = "2GB"
    s3_endpoint_url: str | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.adapter, self.adapter_folder, self.recipe)) != 1:
            raise ExportError("give exactly one of --adapter, --adapter-folder and --recipe")
        if not self.probes or not all(p.strip() for p in self.probes):
            raise ExportError("probe prompts must be non-empty")


@dataclass(frozen=True)
class ExportResult:
    adapter: str
    out: str
    files: tuple[str, ...]
    max_abs_logit_diff: float
    seconds: float

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "files": list(self.files)})


def write_payload_folder(payload: AdapterPayload, folder: Path) -> Path:
    """A store payload as a PEFT folder, with PEFT's saved key names."""
    from safetensors.torch import save_file

    checkpoint = checkpoint_from_payload(payload)
    tensors = {}
    for name, weights in checkpoint.modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = weights.lora_a.clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = weights.lora_b.clone()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(dict(payload.config), indent=2))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def store_fetcher(store_config: StoreConfig, scratch_dir: Path) -> FetchAdapter:
    """`fetch(adapter_id)` from the running adapter store: the one part of the job that needs Ray.
    It connects on the first fetch, so refused input is reported without a cluster."""
    lookups: list[Any] = []

    def fetch(adapter_id: str) -> Path:
        import ray

        from adapters_store.client import StoreLookup
        from deployments.ray_errors import unwrap_ray_error

        if not ray.is_initialized():
            try:
                ray.init(address="auto")
            except ConnectionError as error:
                raise ServiceUnavailableError(f"no Ray cluster to reach the adapter store ({error}); submit this "
                                              "with `ray job submit`, or export a local --adapter-folder") from None
        if not lookups:
            lookups.append(StoreLookup(store_config))
        try:
            version, [ref] = ray.get(lookups[0].handle().locate.remote(adapter_id))
            payload = ray.get(ref)
        except ray.exceptions.RayTaskError as wrapped:
            raise unwrap_ray_error(wrapped) from None
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as error:
            raise ServiceUnavailableError(f"the adapter store could not be reached: {error}") from None
        logger.info("fetched %s version %s from the adapter store", adapter_id, version[:12])
        return write_payload_folder(payload, adapter_dir(scratch_dir, adapter_id))

    return fetch


def _checked(folder: Path, geometry: SlotGeometry) -> LoraCheckpoint:
    checkpoint = read_checkpoint(folder, max_size_bytes=geometry.max_size_bytes)
    validate_checkpoint(checkpoint, geometry)
    return checkpoint


def adapter_to_export(options: ExportOptions, fetch: FetchAdapter | None, geometry: SlotGeometry,
                      scratch_dir: Path) -> tuple[str, Path]:
    """(what is exported, its validated PEFT folder); a recipe is merged here first."""
    if options.adapter_folder is not None:
        _checked(options.adapter_folder, geometry)
        return str(options.adapter_folder), Path(options.adapter_folder)
    if fetch is None:
        raise ExportError("--adapter and --recipe need a fetch function (the adapter store's, by default)")
    if options.adapter is not None:
        folder = fetch(validate_adapter_id(options.adapter))
        _checked(folder, geometry)
        return options.adapter, folder
    recipe = Path(options.recipe)
    if not recipe.is_file():
        raise ExportError(f"no recipe at {recipe}")
    spec = MergeSpec.model_validate_json(recipe.read_text())
    folders = [fetch(item.id) for item in spec.adapters]
    ranks = [_checked(folder, geometry).max_rank for folder in folders]
    merged = merge_adapters(spec, folders, ranks, geometry, scratch_dir / "merge")
    logger.info("merged %s from %s (%s, rank %d)", spec.name, [i.id for i in spec.adapters],
                spec.combination_type, merged.rank)
    _checked(merged.folder, geometry)
    return spec.name, merged.folder


class _Steps:
    """One log line and one tick of a progress bar (stderr: `ray job logs` shows it) per step."""

    def __init__(self, total: int) -> None:
        self.bar = tqdm(total=total, desc="export", unit="step", file=sys.stderr, mininterval=0)

    def __enter__(self) -> "_Steps":
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        logger.info("%s ...", what)
        self.bar.set_postfix_str(what)
        started_s = time.perf_counter()
        yield
        self.bar.update(1)
        logger.info("%s: done in %.1f s", what, time.perf_counter() - started_s)


def save_merged(model: Any, tokenizer: Any, out_dir: Path, max_shard_size: str) -> None:
    """The merged model, its tokenizer and generation config, as `from_pretrained` reads them.
    transformers 5 writes safetensors only (it has no `safe_serialization` switch any more)."""
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    if not (out_dir / "generation_config.json").is_file():
        model.generation_config.save_pretrained(out_dir)
    for path in out_dir.iterdir():
        path.chmod(0o644)  # shards come out 0o600: a server running as another user could not read them


def _max_diff(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max((a.float() - e.float()).abs().max().item() for a, e in zip(actual, expected))


@torch.no_grad()
def _logits(model: Any, prompts_ids: list[list[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in prompts_ids]


def export_folder(folder: Path, out_dir: Path, engine_config: EngineConfig, probes: Sequence[str] = DEFAULT_PROBES,
                  max_shard_size: str = "2GB") -> float:
    """Merge the PEFT adapter `folder` into the base model, save it to `out_dir` and check it;
    returns the largest logit difference against the references, or raises ExportCheckError."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deployments.engine import Engine
    from deployments.engine.engine import load_engine_base

    turns = [[{"role": "user", "content": probe}] for probe in probes]
    with _Steps(total=5) as steps:
        with steps.step("load the base model (fp32, CPU)"):
            base = load_engine_base(engine_config, device="cpu", dtype=torch.float32)
        with steps.step("reference logits from the serving engine"):
            serving = engine_config.model_copy(update={
                "compile": "off", "num_slots": 1, "max_num_seqs": 1, "device": "cpu", "dtype": "float32"})
            with Engine(serving) as engine:
                engine.register_adapter(EXPORT_ADAPTER_ID, folder)
                prompts_ids = [engine.encode(messages=t) for t in turns]
                references = {"serving engine": [
                    engine.forward_logits(torch.tensor([ids]), [EXPORT_ADAPTER_ID])[0] for ids in prompts_ids]}
            del engine  # its own copy of the base model
        with steps.step("reference logits from PEFT (unmerged)"):
            peft_model = PeftModel.from_pretrained(base.model, str(folder))
            peft_model.eval()
            references["unmerged PEFT model"] = _logits(peft_model, prompts_ids)
        with steps.step(f"merge_and_unload and save (shards of at most {max_shard_size})"):
            merged = peft_model.merge_and_unload()
            save_merged(merged, base.tokenizer, out_dir, max_shard_size)
            del merged, peft_model, base
        with steps.step("check: the saved folder, loaded fresh, gives the references' logits"):
            tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
            for probe, turn, ids in zip(probes, turns, prompts_ids):
                again = tokenizer.apply_chat_template(turn, add_generation_prompt=True, return_dict=False)
                if list(again) != ids:
                    raise ExportCheckError(f"the saved tokenizer encodes the probe {probe!r} unlike the server's")
            model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, local_files_only=True)
            model.eval()
            exported = _logits(model, prompts_ids)
    diffs = {what: _max_diff(exported, logits) for what, logits in references.items()}
    worst = max(diffs.values())
    said = ", ".join(f"{what} {diff:.3g}" for what, diff in diffs.items())
    if not math.isfinite(worst) or worst > LOGIT_ATOL:
        raise ExportCheckError(f"the exported model's logits differ from the served adapter's by up to {worst:.3g} "
                               f"(limit {LOGIT_ATOL:g}; max |exported - reference|: {said})", worst)
    logger.info("check passed: max |exported - reference| logits: %s (limit %g)", said, LOGIT_ATOL)
    return worst


def upload_folder(folder: Path, s3_uri: str, client: Any) -> list[str]:
    """Every file of `folder` to `<prefix>/<file name>`; returns the keys."""
    target = parse_s3_uri(s3_uri)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    keys = []
    with tqdm(total=sum(p.stat().st_size for p in files), desc="upload", unit="B", unit_scale=True,
              file=sys.stderr) as bar:
        for path in files:
            key = f"{target.prefix}/{path.name}" if target.prefix else path.name
            client.upload_file(Filename=str(path), Bucket=target.bucket, Key=key, Callback=bar.update)
            keys.append(key)
    logger.info("uploaded %d files to %s", len(keys), target)
    return keys


def _local_out(out: str) -> Path:
    """A new or empty folder, or an earlier export: whatever is there is replaced whole."""
    path = Path(out).expanduser().resolve()
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / "config.json").is_file())):
        raise ExportError(f"--out {path} exists and is not an earlier export (no config.json); it would be "
                          "replaced whole, so name a new folder")
    return path


def _boto3_client(endpoint_url: str | None) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url)


def run(options: ExportOptions, fetch: FetchAdapter | None = None,
        s3_client_factory: S3ClientFactory = _boto3_client) -> ExportResult:
    """The whole job; `fetch` defaults to the running adapter store (Ray) for --adapter/--recipe."""
    started_s = time.perf_counter()
    engine_config, store_config = load_settings(options.config)
    geometry = slot_geometry(engine_config)
    to_s3 = options.out.startswith("s3://")
    if to_s3:
        parse_s3_uri(options.out)  # a bad URI fails before any work
    else:
        out_dir = _local_out(options.out)
    with tempfile.TemporaryDirectory(prefix="lora-export-") as scratch:
        scratch_dir = Path(scratch)
        if fetch is None and options.adapter_folder is None:
            fetch = store_fetcher(store_config, scratch_dir / "fetched")
        label, folder = adapter_to_export(options, fetch, geometry, scratch_dir)
        diffs: list[float] = []

        def write(into: Path) -> None:
            diffs.append(export_folder(folder, into, engine_config, options.probes, options.max_shard_size))

        if to_s3:
            local_dir = scratch_dir / "model"
            local_dir.mkdir()
            write(local_dir)
            files = tuple(sorted(p.name for p in local_dir.iterdir()))
            upload_folder(local_dir, options.out, s3_client_factory(options.s3_endpoint_url))
        else:
            publish_folder(out_dir, write)
            files = tuple(sorted(p.name for p in out_dir.iterdir()))
    return ExportResult(label, options.out, files, diffs[0], round(time.perf_counter() - started_s, 2))


def _parse_args(argv: list[str] | None) -> ExportOptions:
    parser = argparse.ArgumentParser(prog="python -m cluster.jobs.export", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="an adapter id the running adapter store serves, e.g. acme/pirate")
    source.add_argument("--adapter-folder", type=Path, help="a local PEFT adapter folder")
    source.add_argument("--recipe", type=Path, help="a JSON merge spec (POST /v1/adapters/merge's body)")
    parser.add_argument("--out", required=True, help="a local folder (replaced if it exists), or s3://bucket/prefix")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config (default: %(default)s)")
    parser.add_argument("--probe", action="append", dest="probes", help="a probe prompt for the check (repeatable)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest weights file (default: %(default)s)")
    parser.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: boto3's, e.g. AWS_ENDPOINT_URL)")
    args = parser.parse_args(argv)
    try:
        return ExportOptions(out=args.out, adapter=args.adapter, adapter_folder=args.adapter_folder, recipe=args.recipe,
                             config=args.config, probes=tuple(args.probes or DEFAULT_PROBES),
                             max_shard_size=args.max_shard_size, s3_endpoint_url=args.s3_endpoint_url)
    except ExportError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None, fetch: FetchAdapter | None = None,
         s3_client_factory: S3ClientFactory = _boto3_client) -> int:
    """0 and a JSON line on stdout; 1 for refused input or a failed fetch, 3 for a failed check."""
    options = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        with logging_redirect_tqdm():
            result = run(options, fetch, s3_client_factory)
    except ExportCheckError as error:
        print(f"\nEXPORT CHECK FAILED, nothing was published: {error}", file=sys.stderr, flush=True)
        return EXIT_CHECK_FAILED
    except (ExportError, LoraServeError, ValidationError) as error:
        print(f"\nexport failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    print(result.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
