"""Load a running app with streamed chat requests and report throughput and latency, as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m cluster.jobs.benchmark --url http://127.0.0.1:8000 --api-key sk-admin-demo --requests 64

`--requests` chat completions (greedy, `ignore_eos`, `--max-tokens` each) go to the models the key
may use (`GET /v1/models`, or `--models a,b`), spread evenly, all at once or as Poisson arrivals
at `--rate` per second; the client is `cluster.load_client`, the one `benchmarks.serving` uses.
The summary (completed, failed, output tok/s, TTFT/TPOT/latency p50 and p99, per model) is the
last line, as JSON. Exit 1 when any request failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter

import httpx

from cluster.load_client import Request, models_for, poisson_schedule, send, summarize

__all__ = ["main"]

logger = logging.getLogger("cluster.jobs.benchmark")

WORDS = ("the river runs past an old mill where a miller counts sacks of grain every morning before the "
         "sun comes up over the hills and the birds begin to sing").split()


def prompts(count: int, words: int) -> list[str]:
    """Different prompts of about `words` words each (a shared prefix would flatter a prefix cache)."""
    return [f"Request {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)) + ". Go on."
            for i in range(count)]


def served_models(url: str, api_key: str) -> list[str]:
    response = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    response.raise_for_status()
    return [card["id"] for card in response.json()["data"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.jobs.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the app, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    parser.add_argument("--requests", type=int, default=32, help="requests in all (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: all at once)")
    parser.add_argument("--models", default="all", help="comma-separated model ids, or all (default)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (default: %(default)s)")
    parser.add_argument("--prompt-words", type=int, default=48, help="words per prompt (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per request (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.max_tokens < 1 or (args.rate is not None and args.rate <= 0):
        parser.error("--requests and --max-tokens must be >= 1, --rate > 0")
    if not args.api_key:
        parser.error("give --api-key or set OPENAI_API_KEY")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = args.url.rstrip("/")
    try:
        available = served_models(url, args.api_key)
    except httpx.HTTPError as error:
        print(f"benchmark failed: cannot list the models at {url}: {error}", file=sys.stderr, flush=True)
        return 1
    models = available if args.models == "all" else args.models.split(",")
    if unknown := sorted(set(models) - set(available)):
        print(f"benchmark failed: {unknown} not among {available}", file=sys.stderr, flush=True)
        return 1
    os.environ["OPENAI_API_KEY"] = args.api_key  # the load client's bearer key
    chosen = models_for(args.requests, models, models[0], args.seed)
    texts = prompts(args.requests, args.prompt_words)
    requests = [Request(at_s, model, text, args.max_tokens)
                for at_s, model, text in zip(poisson_schedule(args.requests, args.rate, args.seed), chosen, texts)]
    logger.info("sending %d requests (%s) to %s over %s", args.requests,
                "at once" if args.rate is None else f"{args.rate}/s", url, dict(Counter(chosen)))
    outcomes = send(url, requests, args.timeout_s)
    summary = summarize(outcomes, args.requests)
    per_model = {model: summarize([o for o, r in zip(outcomes, requests) if r.model == model], count)
                 for model, count in Counter(chosen).items()}
    logger.info("completed %d, failed %d, %s output tok/s", summary["completed"], summary["failed"],
                summary["output_tok_s"])
    print(json.dumps({"url": url, **summary, "per_model": per_model}), flush=True)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
