"""Prometheus metrics of the ingress and the replicas, through Ray Serve's metrics API.

Ray exports them with every other Ray metric on each node's metrics port (`ray start
--metrics-export-port`; Serve adds `deployment`, `replica` and `application` labels), as
`ray_<name>`; cluster/grafana-dashboard.json charts them.

    lora_serve_requests_total{tenant, adapter, status}        completion and chat requests past authentication
                                                              and body validation (499: the client left a stream)
    lora_serve_tokens_total{tenant, adapter, kind}            prompt / completion tokens of those served
    lora_serve_ttft_seconds{tenant}                           time to the first token (streamed requests)
    lora_serve_time_per_output_token_seconds{tenant}          after the first token (streamed requests)
    lora_serve_request_latency_seconds{tenant}                whole requests
    lora_serve_slot_{hits,misses,evictions}_total             a replica's slot pool
    lora_serve_swap_ms                                         an adapter copy into a slot
    lora_serve_slots_in_use, lora_serve_kv_lanes_in_use, lora_serve_queue_depth   a replica, now

Bounded labels: `adapter` is an adapter id only for a request that found its adapter (any
answer but 404), else `unknown`; `base` for the base model, `combination` for a combination;
`tenant` is the caller's tenant, `admin`, or `anonymous` before authentication.
The adapter store's own metrics live in `adapters_store.store` (it imports no Serve).
"""

from __future__ import annotations

from ray.serve import metrics

from deployments.contracts import GenerationRequest

__all__ = ["IngressMetrics", "ReplicaMetrics", "adapter_label"]

LATENCY_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TOKEN_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
SWAP_BOUNDARIES_MS = [0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0]


def adapter_label(request: GenerationRequest | None, status: int) -> str:
    if request is None or status == 404:
        return "unknown"
    if request.combination is not None:
        return "combination"
    return request.adapter_id or "base"


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "lora_serve_requests", "Completion and chat requests, by tenant, adapter and HTTP status",
            tag_keys=("tenant", "adapter", "status"))
        self.tokens = metrics.Counter(
            "lora_serve_tokens", "Prompt and completion tokens of served requests", tag_keys=("tenant", "adapter", "kind"))
        self.ttft = metrics.Histogram(
            "lora_serve_ttft_seconds", "Time to the first token of a streamed request",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("tenant",))
        self.tpot = metrics.Histogram(
            "lora_serve_time_per_output_token_seconds", "Time per output token after the first, streamed requests",
            boundaries=TOKEN_BOUNDARIES_S, tag_keys=("tenant",))
        self.latency = metrics.Histogram(
            "lora_serve_request_latency_seconds", "Whole requests, from the ingress's view",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("tenant",))

    def request_done(self, tenant: str, adapter: str, status: int, latency_s: float, prompt_tokens: int = 0,
                     completion_tokens: int = 0, ttft_s: float | None = None) -> None:
        self.requests.inc(1, {"tenant": tenant, "adapter": adapter, "status": str(status)})
        self.latency.observe(latency_s, {"tenant": tenant})
        if status != 200:
            return
        for kind, count in (("prompt", prompt_tokens), ("completion", completion_tokens)):
            if count:
                self.tokens.inc(count, {"tenant": tenant, "adapter": adapter, "kind": kind})
        if ttft_s is not None:
            self.ttft.observe(ttft_s, {"tenant": tenant})
            if completion_tokens > 1:
                self.tpot.observe((latency_s - ttft_s) / (completion_tokens - 1), {"tenant": tenant})


class ReplicaMetrics:
    """Updated from the engine's own counters each time Serve polls the replica's routing stats
    (counters as deltas since the last poll), and per swap."""

    def __init__(self) -> None:
        self.hits = metrics.Counter("lora_serve_slot_hits", "Requests whose adapter was in a slot already")
        self.misses = metrics.Counter("lora_serve_slot_misses", "Requests whose adapter had to be copied into a slot")
        self.evictions = metrics.Counter("lora_serve_slot_evictions", "Adapters evicted from a slot")
        self.swap_ms = metrics.Histogram("lora_serve_swap_ms", "An adapter copied into a slot, milliseconds",
                                         boundaries=SWAP_BOUNDARIES_MS)
        self.slots_in_use = metrics.Gauge("lora_serve_slots_in_use", "Slots holding an adapter")
        self.kv_lanes_in_use = metrics.Gauge("lora_serve_kv_lanes_in_use", "KV cache lanes held by running requests")
        self.queue_depth = metrics.Gauge("lora_serve_queue_depth", "Requests queued or running on the replica")
        self._seen = {"hits": 0, "misses": 0, "evictions": 0}

    def observe_swap(self, swap_ms: float) -> None:
        self.swap_ms.observe(swap_ms)

    def update(self, slots: dict, running: int, queue_len: int) -> None:
        """`slots` is the pool snapshot's `to_dict()` (its cumulative hits, misses, evictions)."""
        for name, counter in (("hits", self.hits), ("misses", self.misses), ("evictions", self.evictions)):
            total = int(slots.get(name, 0))
            if total > self._seen[name]:
                counter.inc(total - self._seen[name])
            self._seen[name] = total
        self.slots_in_use.set(len(slots.get("warm", ())))
        self.kv_lanes_in_use.set(running)
        self.queue_depth.set(queue_len)
