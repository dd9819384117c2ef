"""Pull adapters from a source into a local folder, with progress bars: the command-line (or
`ray job submit`) way to seed or mirror a local adapter folder the store can then watch.

    python -m adapters_store.pull s3://bucket/adapters /srv/adapters [--endpoint-url URL] [--workers 4]
    python -m adapters_store.pull hf://org/repo@main /srv/adapters [--adapter-id acme/bot]

Downloads run in parallel with the sources' retries and backoff; each adapter is read back with
the engine's checkpoint reader before it counts as pulled. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from adapters_store.sources import source_for_uri
from lora_core.checkpoint import read_checkpoint
from lora_core.errors import LoraServeError

__all__ = ["main", "pull"]


def pull(uri: str, dest: Path, *, workers: int = 4, show_progress: bool = True, **options) -> dict:
    source = source_for_uri(uri, show_progress=show_progress, **options)
    listing = source.list_adapters()
    outcome = source.fetch_many(listing.values(), dest, max_workers=workers)
    failed = {adapter_id: str(error) for adapter_id, error in outcome.failed.items()}
    pulled = {}
    for adapter_id, folder in sorted(outcome.fetched.items()):
        try:
            checkpoint = read_checkpoint(folder)
        except LoraServeError as error:
            failed[adapter_id] = str(error)
            continue
        pulled[adapter_id] = {"folder": str(folder), "rank": checkpoint.max_rank, "size_bytes": checkpoint.size_bytes}
    return {"source": uri, "dest": str(dest), "pulled": pulled, "failed": failed, "skipped": dict(source.skipped)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters_store.pull", description=__doc__.splitlines()[0])
    parser.add_argument("uri", help="s3://bucket/prefix, hf://org/repo[/sub]@rev, or a local folder")
    parser.add_argument("dest", type=Path, help="local folder; adapters land in <dest>/<tenant>/<name>/")
    parser.add_argument("--adapter-id", help="the URI is one adapter's folder; serve it under this id")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, moto, ...)")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    options = {}
    if args.adapter_id:
        options["adapter_id"] = args.adapter_id
    if args.endpoint_url:
        options["endpoint_url"] = args.endpoint_url
    try:
        result = pull(args.uri, args.dest, workers=args.workers, **options)
    except LoraServeError as error:
        print(json.dumps({"error": str(error)}))
        return 1
    print(json.dumps(result))
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
