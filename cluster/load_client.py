"""A streaming load client for an OpenAI-compatible server: open-loop arrivals, per-request
TTFT, TPOT and latency, and their summary.

    outcomes = send("http://127.0.0.1:8000", [Request(at_s, model, prompt, max_tokens), ...], timeout_s=120)
    print(summarize(outcomes, len(outcomes)))

Each request is a streamed `/v1/chat/completions` (greedy, `ignore_eos`, usage in the last
chunk) sent at its `at_s` whatever the earlier ones are doing, with `OPENAI_API_KEY` as its
bearer key. Shared by `benchmarks.serving` (against this server and vLLM) and
`cluster.jobs.benchmark` (against a running app); httpx and the standard library only.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from dataclasses import dataclass

__all__ = ["Outcome", "Request", "models_for", "percentile", "poisson_schedule", "rounded", "send", "summarize"]


def percentile(values: list[float], q: float) -> float:
    """Nearest rank on the sorted values (always one of them)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100.0 * len(ordered))) - 1]


def rounded(value: float, digits: int = 3) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


@dataclass(frozen=True)
class Request:
    at_s: float
    model: str
    prompt: str
    max_tokens: int


@dataclass
class Outcome:
    ok: bool
    sent_s: float
    done_s: float
    ttft_s: float | None = None
    output_tokens: int = 0
    error: str | None = None
    cancelled: bool = False

    @property
    def latency_s(self) -> float:
        return self.done_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def _http_client(url: str, timeout_s: float):
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    headers = {"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'bench')}"}
    return httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits, headers=headers)


async def _stream_one(client, request: Request, outcome: Outcome) -> Outcome:
    """One streamed chat completion, filling `outcome` as it goes (a cancelled task keeps what it had)."""
    import httpx

    body = {
        "model": request.model, "messages": [{"role": "user", "content": request.prompt}],
        "max_tokens": request.max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks, usage_tokens = 0, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    payload = json.loads(data)
                    if "error" in payload:
                        outcome.error = json.dumps(payload)[:300]
                        break
                    for choice in payload.get("choices") or []:
                        if (choice.get("delta") or {}).get("content"):
                            chunks += 1
                            if outcome.ttft_s is None:
                                outcome.ttft_s = time.perf_counter() - outcome.sent_s
                    if payload.get("usage"):
                        usage_tokens = payload["usage"].get("completion_tokens")
    except (httpx.HTTPError, ValueError) as error:
        outcome.error = f"{type(error).__name__}: {str(error)[:300]}"
    outcome.done_s = time.perf_counter()
    outcome.output_tokens = usage_tokens if usage_tokens is not None else chunks
    outcome.ok = outcome.error is None and outcome.output_tokens > 0
    if outcome.ok is False and outcome.error is None:
        outcome.error = "no tokens"
    return outcome


async def _scheduled(client, request: Request, start_s: float) -> Outcome:
    await asyncio.sleep(max(0.0, start_s + request.at_s - time.perf_counter()))
    now = time.perf_counter()
    return await _stream_one(client, request, Outcome(ok=False, sent_s=now, done_s=now))


async def _drive(url: str, requests: list[Request], timeout_s: float) -> list[Outcome]:
    """Open loop: each request leaves at its `at_s`, whatever the earlier ones are doing."""
    async with _http_client(url, timeout_s) as client:
        start = time.perf_counter() + 0.05
        return list(await asyncio.gather(*(_scheduled(client, r, start) for r in requests)))


def send(url: str, requests: list[Request], timeout_s: float) -> list[Outcome]:
    return asyncio.run(_drive(url, requests, timeout_s))


def summarize(outcomes: list[Outcome], requests: int, client: str = "builtin") -> dict:
    ok = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    window = (max(o.done_s for o in outcomes) - min(o.sent_s for o in outcomes)) if outcomes else 0.0
    ms = lambda values, q: rounded(percentile(values, q) * 1000, 2) if values else None
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    tpot = [t for o in ok if (t := o.tpot_s) is not None]
    latency = [o.latency_s for o in ok]
    tokens = sum(o.output_tokens for o in ok)
    return {
        "client": client,
        "requests": requests,
        "completed": len(ok),
        "failed": len(failed),
        "output_tok_s": rounded(tokens / window, 2) if window > 0 else None,
        "ttft_p50_ms": ms(ttft, 50),
        "ttft_p99_ms": ms(ttft, 99),
        "tpot_p50_ms": ms(tpot, 50),
        "tpot_p99_ms": ms(tpot, 99),
        "latency_p50_ms": ms(latency, 50),
        "latency_p99_ms": ms(latency, 99),
        "output_tokens_mean": rounded(tokens / len(ok), 1) if ok else None,
        "duration_s": rounded(window, 2),
        "error_example": failed[0].error if failed else None,
    }


def poisson_schedule(count: int, rate: float | None, seed: int) -> list[float]:
    if rate is None:
        return [0.0] * count
    rng = random.Random(f"serving-arrivals:{seed}")
    now, times = 0.0, []
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times


def models_for(count: int, adapters: list[str] | None, base: str, seed: int) -> list[str]:
    if not adapters:
        return [base] * count
    rng = random.Random(f"serving-adapters:{seed}")
    return [rng.choice(adapters) for _ in range(count)]
