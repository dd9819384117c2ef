"""The locust users of `benchmarks.load`, run by locust in its own process (gevent must not share a
process with Ray). One user class per tenant, from $LOAD_USERS ("tenant:users:wait_s,..."), keys
from $LOAD_KEYS ("tenant:key,..."). Every answer is recorded by tenant and status (503 with
`Retry-After` apart) and written as JSON to $LOAD_OUT when locust quits."""

from __future__ import annotations

import json
import os
import time

from locust import HttpUser, constant, events, task

MAX_TOKENS = int(os.environ.get("LOAD_MAX_TOKENS", "16"))
KEYS = dict(entry.split(":", 1) for entry in os.environ["LOAD_KEYS"].split(","))
RESULTS: dict[str, dict] = {}


def record(tenant: str, status: int, elapsed_ms: float, retry_after: bool) -> None:
    result = RESULTS.setdefault(tenant, {"status_counts": {}, "latencies_ms": [], "retry_after_503": 0})
    result["status_counts"][str(status)] = result["status_counts"].get(str(status), 0) + 1
    if status == 200:
        result["latencies_ms"].append(round(elapsed_ms, 2))
    if status == 503 and retry_after:
        result["retry_after_503"] += 1


class TenantUser(HttpUser):
    abstract = True
    tenant = ""

    @task
    def complete(self) -> None:
        body = {"model": f"{self.tenant}/a", "prompt": "Once upon a time", "max_tokens": MAX_TOKENS,
                "ignore_eos": True, "temperature": 0}
        started = time.perf_counter()
        with self.client.post("/v1/completions", json=body, name=self.tenant, catch_response=True,
                              headers={"Authorization": f"Bearer {KEYS[self.tenant]}"}) as response:
            record(self.tenant, response.status_code, (time.perf_counter() - started) * 1000,
                   "Retry-After" in response.headers)
            response.success()  # judged by the benchmark, not by locust


for entry in os.environ["LOAD_USERS"].split(","):
    name, users, wait_s = entry.split(":")
    globals()[f"User_{name}"] = type(f"User_{name}", (TenantUser,), {
        "tenant": name, "fixed_count": int(users), "wait_time": constant(float(wait_s))})


@events.quitting.add_listener
def write_results(environment, **kwargs) -> None:
    with open(os.environ["LOAD_OUT"], "w") as out:
        json.dump(RESULTS, out)
