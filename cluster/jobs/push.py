"""Push a local folder of adapters to a store source (a local root or S3), then have the store sync.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m cluster.jobs.push --from ./my-adapters --to s3://my-bucket/adapters --endpoint-url ...

`--from` holds `<tenant>/<name>/` PEFT folders. Each is validated first the way the store will
(`read_checkpoint` + `validate_checkpoint` against the geometry of serve_config.yaml's replicas),
so an adapter the store would reject is reported and not pushed; the others are written to
`<to>/<tenant>/<name>/` (a local folder is replaced in one rename; S3 objects are uploaded file by
file). Then the running adapter store syncs that root (and starts watching it when it is not one of
its sources yet), and its report is the job's last line, as JSON. Exit 1 when an adapter was refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError
from tqdm import tqdm

from adapters_store.sources.local import LocalSource
from cluster.jobs.settings import DEFAULT_CONFIG, load_settings
from lora_core.adapter_ids import adapter_dir, parse_source_uri
from lora_core.checkpoint import read_checkpoint, validate_checkpoint
from lora_core.errors import LoraServeError
from lora_core.files import publish_folder
from lora_core.geometry import SlotGeometry, slot_geometry
from lora_core.peft_files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PROBE_FILE
from lora_core.settings import EngineConfig, StoreConfig

__all__ = ["PushResult", "add_target_arguments", "main", "push_adapters", "push_and_sync", "sync_store"]

logger = logging.getLogger("cluster.jobs.push")

Uploader = Callable[[str, Path], str]
"""(adapter id, local folder) -> the URI it now has under the target root."""


@dataclass(frozen=True)
class PushResult:
    pushed: dict[str, str] = field(default_factory=dict)  # adapter id -> its URI at the target
    refused: dict[str, str] = field(default_factory=dict)  # adapter id or folder -> why


PUSHED_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PROBE_FILE)
"""What a source serves an adapter from (a trainer's README.md or checkpoints stay behind)."""


def local_uploader(root: Path) -> Uploader:
    def upload(adapter_id: str, folder: Path) -> str:
        destination = adapter_dir(root, adapter_id)
        shutil.rmtree(destination, ignore_errors=True)

        def write(tmp: Path) -> None:
            for name in PUSHED_FILES:
                if (folder / name).is_file():
                    shutil.copy2(folder / name, tmp / name)

        return str(publish_folder(destination, write))

    return upload


def s3_uploader(uri: str, options: dict[str, Any]) -> Uploader:
    from adapters_store.sources.s3 import S3Source

    source = S3Source.from_uri(parse_source_uri(uri), **options)
    return lambda adapter_id, folder: source.upload_adapter(adapter_id, folder, PUSHED_FILES)


def push_adapters(source_root: Path, geometry: SlotGeometry, upload: Uploader) -> PushResult:
    """Validate every `<tenant>/<name>/` folder under `source_root`; upload the ones that fit."""
    source = LocalSource(source_root)
    listing = source.list_adapters()
    result = PushResult(refused=dict(source.skipped))
    for adapter_id in tqdm(sorted(listing), desc="push", unit="adapter", file=sys.stderr):
        folder = adapter_dir(Path(source_root), adapter_id)
        try:
            validate_checkpoint(read_checkpoint(folder, max_size_bytes=geometry.max_size_bytes), geometry)
        except LoraServeError as error:
            result.refused[adapter_id] = str(error)
            logger.warning("%s refused, not pushed: %s", adapter_id, error)
            continue
        result.pushed[adapter_id] = upload(adapter_id, folder)
        logger.info("%s pushed to %s", adapter_id, result.pushed[adapter_id])
    return result


def sync_store(store_config: StoreConfig, uri: str, options: dict[str, Any]) -> dict:
    """Have the running store sync `uri` now (watching it from now on if it did not): its report."""
    import ray

    from adapters_store.client import StoreLookup
    from deployments.ray_errors import typed_ray_errors

    if not ray.is_initialized():
        ray.init(address="auto")
    store = StoreLookup(store_config).handle()
    canonical = str(parse_source_uri(uri))
    with typed_ray_errors("the adapter store"):
        watched = {source["uri"] for source in ray.get(store.status.remote())["sources"]}
        if canonical in watched:
            return ray.get(store.sync_now.remote())
        return ray.get(store.add_source.remote(uri, options))["sync"]


def push_and_sync(source_root: Path, to: str, options: dict[str, Any], engine_config: EngineConfig,
                  store_config: StoreConfig, sync: bool = True) -> tuple[PushResult, dict | None]:
    """Push `source_root`'s adapters to the root `to`, then sync the store (unless `sync` is off
    or nothing was pushed); (what was pushed and refused, the store's sync report)."""
    where = parse_source_uri(to)
    upload = s3_uploader(to, options) if str(where).startswith("s3://") else local_uploader(where.path)
    result = push_adapters(source_root, slot_geometry(engine_config), upload)
    report = sync_store(store_config, to, options) if sync and result.pushed else None
    return result, report


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """--to, --config, --endpoint-url, --region, --no-sync: shared with `cluster.jobs.train_demo`."""
    parser.add_argument("--to", required=True, help="a store source root: a local folder or s3://bucket/prefix")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="Serve config (default: %(default)s)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (kept as the source's option)")
    parser.add_argument("--region", help="S3 region (kept as the source's option)")
    parser.add_argument("--no-sync", action="store_true", help="push only; the store finds them on its next sync")


def run_push(args: argparse.Namespace, source_root: Path) -> int:
    """Push and sync as `args` say; the JSON summary is the last line. 1 when anything was refused."""
    options = {k: v for k, v in (("endpoint_url", args.endpoint_url), ("region", args.region)) if v}
    try:
        engine_config, store_config = load_settings(args.config)
        if not Path(source_root).is_dir():
            raise LoraServeError(f"{source_root} is not a folder")
        result, report = push_and_sync(Path(source_root), args.to, options, engine_config, store_config,
                                       sync=not args.no_sync)
    except (LoraServeError, ValidationError) as error:
        print(f"push failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps({**asdict(result), "sync": report}), flush=True)
    return 1 if result.refused else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.jobs.push", description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, required=True, help="a folder of <tenant>/<name>/ adapters")
    add_target_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_push(args, args.source)


if __name__ == "__main__":
    sys.exit(main())
