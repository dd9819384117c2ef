"""Train the demo adapters (`cluster.demo_adapters`) on a cluster node and push them to a store source.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m cluster.jobs.train_demo --to /srv/adapters

Trains `acme/pirate`, `globex/support` and `shared/json` (or reuses them while their recipe is
unchanged in `--out`), then pushes them like `cluster.jobs.push` does: validated against the
serve config's geometry, written to `<to>/<tenant>/<name>/`, and the running store syncs that
root. Training progress (step, loss) goes to the job's logs; the push's JSON summary is the last line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from cluster.demo_adapters import ensure_demo_adapters
from cluster.jobs.push import add_target_arguments, run_push

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.jobs.train_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to train (default: a temporary folder)")
    parser.add_argument("--base-model", default="smollm2-135m-instruct", help="base model (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per adapter (default: the recipe's)")
    add_target_arguments(parser)
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="demo-adapters-") as scratch:
        out = args.out or Path(scratch)
        ensure_demo_adapters(out, args.base_model, args.steps)
        return run_push(args, out)


if __name__ == "__main__":
    sys.exit(main())
