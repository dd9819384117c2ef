"""Adapter-affinity replica choice for `LoraReplica`: a Ray Serve `RequestRouter`.

Thin glue around `routing_policy.py`, which holds the whole score. Per routing attempt it turns
Ray's `RunningReplica`s into `ReplicaView`s, asks `rank_replicas`, and gives the order back to
Ray as one replica per rank; Ray then takes the first rank whose replica has queue room.

What a view is made of, freshest source first:
  - queue length: the larger of the requests this router has in flight there (counted from
    `on_request_routed` to `on_request_completed`) and Ray's queue-length cache (sends,
    completions, probes and rejection replies), else the replica's last report;
    `max_ongoing_requests` is the limit. Ray's cache alone lags under a burst (a probe answers
    with what the replica has received, not what is still on its way): 64 requests sent at once
    went 46/18 over two replicas, 39/25 with the in-flight count, and about even (38/36 with the
    warm-up's 10) once replicas report pending loads per adapter rather than per request;
  - slots: the replica's last `routing_stats` report (`LoraReplica.record_routing_stats`, polled
    every `request_routing_stats_period_s`; a `RoutingStats` as a dict, parsed back here), plus
    the adapters this router sent there since that report, so a burst for a cold adapter follows
    its first request instead of loading it on every replica; a replica that has not reported yet
    counts as empty.

The request's adapter is its `multiplexed_model_id` (the ingress sets it with
`handle.options(multiplexed_model_id=...)`; empty for the base model).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import takewhile
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from deployments.contracts import RoutingStats
from deployments.routing_policy import (
    AdapterLoadTracker,
    ReplicaView,
    RoutingWeights,
    check_weight_overrides,
    rank_replicas,
)

__all__ = [
    "ROUTER_CLASS_PATH",
    "AdapterAffinityRouter",
    "AffinityRouterSettings",
    "affinity_request_router_config",
]

logger = logging.getLogger(__name__)

ROUTER_CLASS_PATH = "deployments.request_router:AdapterAffinityRouter"

COMPLETED_FIRST_LIMIT = 4096
"""Request ids remembered as completed before Ray confirmed their routing (or never routed)."""

UNREPORTED_FREE_SLOTS = 1
"""Free slots assumed on a replica that has not reported: `rank_replicas` only asks whether
one is free, and a replica that just started has every slot free."""


class AffinityRouterSettings(BaseModel):
    """The router's knobs: the `request_router_kwargs` of the deployment's `request_router_config`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service_time_s: float = Field(
        1.0, gt=0, description="a request's typical time on a replica; turns request rates into demand"
    )
    demand_window_s: float = Field(120.0, gt=0, description="how long an adapter's past requests count as demand")
    report_lag_s: float = Field(
        1.0,
        ge=0,
        description="how long after a request was sent its adapter may still be missing from the replica's report",
    )
    routed_ttl_s: float = Field(
        30.0, gt=0, description="forget an adapter sent to a replica that no report confirmed after this long"
    )
    weights: dict[str, float | int] = Field(
        default_factory=dict, description="overrides of `routing_policy.RoutingWeights` fields"
    )

    @field_validator("weights")
    @classmethod
    def _weights_are_routing_weights(cls, weights: dict[str, float | int]) -> dict[str, float | int]:
        check_weight_overrides(weights)
        return weights

    def routing_weights(self) -> RoutingWeights:
        return RoutingWeights(**self.weights)


def affinity_request_router_config(
    stats_period_s: float = 0.5, *, settings: AffinityRouterSettings | None = None
) -> RequestRouterConfig:
    """The `request_router_config` for `LoraReplica.options(...)`: this router, with replicas
    reporting their slots every `stats_period_s` (Ray's default, 10 s, is too stale for slots)."""
    settings = settings or AffinityRouterSettings()
    return RequestRouterConfig(
        request_router_class=ROUTER_CLASS_PATH,
        request_router_kwargs=settings.model_dump(),
        request_routing_stats_period_s=stats_period_s,
    )


class AdapterAffinityRouter(RequestRouter):
    """Routes each request to the replica `rank_replicas` puts first, given what slots hold.

    Choice per attempt: views of the candidates (module docstring) -> `rank_replicas` -> one
    replica per rank, best first. The top one is noted as holding the adapter at once, because
    the next requests of a burst are routed before Ray confirms the first (`on_request_routed`,
    which notes the replica really used and counts the request's demand).

    When nothing can take the request now, Ray backs off and retries. We then offer the full
    replicas that `rank_replicas` would wait for, best first: Ray only probes replicas it is given,
    and its cached queue length can read "full" for up to RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S
    (10 s) after another router's requests there finished.

    Requests are matched to replicas by request (Ray's default), not FIFO: `FIFOMixin` gives the
    replica chosen for one adapter's request to the oldest pending request, whose adapter may be
    cold there. No locality mixin: a warm slot saves more than a same-node hop.

    State is per router (each handle has one) and touched only on the router's event loop.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initialize_state()

    def initialize_state(self, **kwargs: Any) -> None:
        """Ray calls this with `request_router_kwargs` (see `AffinityRouterSettings`)."""
        self._settings = AffinityRouterSettings.model_validate(kwargs)
        self._weights = self._settings.routing_weights()
        self._demand = AdapterLoadTracker(
            self._settings.service_time_s, self._settings.demand_window_s, clock=self._get_curr_time_s
        )
        self._reports: dict[ReplicaID, RoutingStats | None] = {}
        self._routed: dict[ReplicaID, dict[str, float]] = {}  # adapter -> when sent, since the last report
        self._in_flight: dict[ReplicaID, set[str]] = {}  # internal request ids sent there, not completed
        self._completed_first: OrderedDict[str, None] = OrderedDict()  # see on_request_completed
        self._bad_reports_logged: set[ReplicaID] = set()

    # ---- Ray's hooks ----------------------------------------------------------------------

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Ray retries without sleeping unless this is set (the mixins set it for the default
            # router): an empty answer would make it call us again at once, forever.
            pending_request.routing_context.should_backoff = True
        adapter_id = _adapter_of(pending_request)
        now = self._get_curr_time_s()
        by_id = {_view_id(replica): replica for replica in candidate_replicas}
        views = [self._view(replica, now) for replica in candidate_replicas]
        ranked = rank_replicas(views, adapter_id, demand=self._demand, weights=self._weights)
        if not ranked:
            ranked = self._replicas_to_wait_for(views, adapter_id)
        elif adapter_id is not None:
            self._note_routed(by_id[ranked[0]].replica_id, adapter_id, now)
        return [[by_id[replica_id]] for replica_id in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: object) -> None:
        request_id = pending_request.metadata.internal_request_id
        if request_id in self._completed_first:  # it already ended
            del self._completed_first[request_id]
        else:
            self._in_flight.setdefault(replica_id, set()).add(request_id)
        adapter_id = _adapter_of(pending_request)
        if adapter_id is not None:
            self._demand.record(adapter_id)
            self._note_routed(replica_id, adapter_id, self._get_curr_time_s())

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """Ray registers the completion callback before it learns the replica accepted, so a
        short request can complete before `on_request_routed`; it is remembered (bounded: a
        rejected request completes and is never routed) so that it is not counted forever."""
        super().on_request_completed(replica_id, internal_request_id)
        in_flight = self._in_flight.get(replica_id)
        if in_flight is not None and internal_request_id in in_flight:
            in_flight.discard(internal_request_id)
            return
        self._completed_first[internal_request_id] = None
        while len(self._completed_first) > COMPLETED_FIRST_LIMIT:
            self._completed_first.popitem(last=False)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Ray calls this when the replica set or a replica's `routing_stats` changes."""
        now = self._get_curr_time_s()
        reports: dict[ReplicaID, RoutingStats | None] = {}
        for replica in replicas:
            report = self._stats_of(replica)
            reports[replica.replica_id] = report
            if report != self._reports.get(replica.replica_id):
                self._forget_reported(replica.replica_id, report, now)
        self._reports = reports
        self._follow_reported_weights(reports.values())
        self._routed = {replica_id: sent for replica_id, sent in self._routed.items() if replica_id in reports}
        self._in_flight = {replica_id: sent for replica_id, sent in self._in_flight.items() if replica_id in reports}
        self._bad_reports_logged.intersection_update(reports)
        self._demand.prune()
        super().update_replicas(replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._routed.pop(replica_id, None)
        self._reports.pop(replica_id, None)
        self._in_flight.pop(replica_id, None)

    def _follow_reported_weights(self, reports: Iterable[RoutingStats | None]) -> None:
        """Use the replicas' `routing_weights` (over this router's own) once every reporting
        replica says the same: during a `serve deploy` some report the old ones for a moment."""
        reported = {report.routing_weights for report in reports if report is not None}
        if len(reported) == 1:
            weights = RoutingWeights(**{**self._settings.weights, **dict(reported.pop())})
            if weights != self._weights:
                logger.info("routing weights now %s", weights)
                self._weights = weights

    # ---- translation ----------------------------------------------------------------------

    def _stats_of(self, replica: RunningReplica) -> RoutingStats | None:
        """The replica's last report, or None before its first (or for one that does not parse:
        logged once per replica)."""
        report = replica.routing_stats
        if not report:
            return None
        try:
            return RoutingStats.from_dict(report)
        except (TypeError, ValueError) as error:
            if replica.replica_id not in self._bad_reports_logged:
                self._bad_reports_logged.add(replica.replica_id)
                logger.warning("ignoring routing stats of %s (%r): %s", replica.replica_id, report, error)
            return None

    def _view(self, replica: RunningReplica, now: float) -> ReplicaView:
        report = self._stats_of(replica)
        cached_queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        in_flight = len(self._in_flight.get(replica.replica_id, ()))
        sent = self._routed.get(replica.replica_id, {})
        routed = frozenset(a for a, at in sent.items() if now - at <= self._settings.routed_ttl_s)
        if report is not None:
            return _reported_view(replica, report, routed, cached_queue_len, in_flight)
        return ReplicaView(
            replica_id=_view_id(replica),
            warm=routed,
            free_slots=UNREPORTED_FREE_SLOTS,
            evictable_slots=0,
            queue_len=max(cached_queue_len or 0, in_flight),
            max_queue=replica.max_ongoing_requests,
        )

    def _replicas_to_wait_for(self, views: Sequence[ReplicaView], adapter_id: str | None) -> list[str]:
        """The full replicas `rank_replicas` stopped at, best first (see the class docstring)."""
        has_room = {view.replica_id: view.has_room for view in views}
        with_room = [
            dataclasses.replace(
                view,
                queue_len=min(view.queue_len, view.max_queue - 1),
                pending_loads=min(view.pending_loads, view.max_queue - 1),
            )
            for view in views
        ]
        order = rank_replicas(with_room, adapter_id, demand=self._demand, weights=self._weights)
        return list(takewhile(lambda replica_id: not has_room[replica_id], order))

    def _note_routed(self, replica_id: ReplicaID, adapter_id: str, now: float) -> None:
        sent = self._routed.setdefault(replica_id, {})
        for stale in [a for a, at in sent.items() if now - at > self._settings.routed_ttl_s]:
            del sent[stale]
        sent[adapter_id] = now

    def _forget_reported(self, replica_id: ReplicaID, report: RoutingStats | None, now: float) -> None:
        """A new report covers the adapters it lists and those sent more than `report_lag_s` ago."""
        sent = self._routed.get(replica_id)
        if not sent:
            return
        warm = frozenset(report.warm) if report is not None else frozenset()  # no report confirms nothing
        oldest_kept = now - self._settings.report_lag_s
        self._routed[replica_id] = {
            adapter_id: at for adapter_id, at in sent.items() if adapter_id not in warm and at > oldest_kept
        }


def _reported_view(
    replica: RunningReplica, report: RoutingStats, routed: frozenset[str], cached_queue_len: int | None,
    in_flight: int,
) -> ReplicaView:
    """A replica as its last report (`Engine.routing_stats`) describes it, with the adapters
    sent since (`routed`) added, Ray's fresher queue length when it has one, and never fewer
    requests than this router has in flight there."""
    reported_warm = frozenset(report.warm)
    routed = routed - reported_warm
    queue_len = max(cached_queue_len if cached_queue_len is not None else report.queue_len, in_flight)
    return ReplicaView(
        replica_id=_view_id(replica),
        warm=reported_warm | routed,
        free_slots=max(0, report.free_slots - len(routed)),  # each routed adapter took one, if left
        evictable_slots=report.evictable_slots,
        queue_len=queue_len,
        max_queue=replica.max_ongoing_requests,
        victim=report.next_victim,
        pending_loads=min(report.pending_loads, queue_len),
        pinned=frozenset(report.pinned),
    )


def _adapter_of(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None:
        return None
    return pending_request.metadata.multiplexed_model_id or None


def _view_id(replica: RunningReplica) -> str:
    """Stable across processes, so every router computes the same rendezvous order."""
    return replica.replica_id.unique_id
