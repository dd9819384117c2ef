"""The types that cross Ray on the data path: one definition of sampling limits and defaults,
requests and chunks that pickle, and the routing report's strict round trip."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from deployments.contracts import (
    DEFAULT_TEMPERATURE,
    MAX_STOP_STRINGS,
    ChatTurn,
    GenerationChunk,
    GenerationRequest,
    RoutingStats,
    SamplingParams,
)
from deployments.schemas.openai import ChatCompletionRequest, CompletionRequest


@pytest.mark.parametrize(
    "options",
    [
        {"max_tokens": 0},
        {"temperature": -1},
        {"temperature": 2.5},
        {"top_p": 0},
        {"top_p": 1.5},
        {"seed": -1},
        {"stop": ("",)},
        {"stop": tuple("abcdefghi")},
    ],
)
def test_bad_sampling_settings_are_refused(options):
    with pytest.raises(ValidationError):
        SamplingParams(**options)


def test_the_edge_and_the_engine_share_one_default_and_one_limit():
    edge = CompletionRequest(model="m", prompt="hi").to_generation_request(None).params
    assert edge.temperature == SamplingParams().temperature == DEFAULT_TEMPERATURE
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], stop=["s"] * (MAX_STOP_STRINGS + 1))
    ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], stop=["s"] * MAX_STOP_STRINGS)
    with pytest.raises(ValidationError):
        SamplingParams(stop=("s",) * (MAX_STOP_STRINGS + 1))


def test_requests_and_chunks_pickle_as_they_cross_ray():
    request = GenerationRequest(
        "acme/a", SamplingParams(max_tokens=3, temperature=0.5, seed=7, stop=("x",)),
        messages=(ChatTurn("user", "hi"),),
    )
    assert pickle.loads(pickle.dumps(request)) == request
    chunk = GenerationChunk("text", "stop", 4, 2, "acme/a")
    assert pickle.loads(pickle.dumps(chunk)) == chunk


def test_routing_stats_round_trip_through_the_dict_ray_carries():
    stats = RoutingStats(warm=("acme/a", "acme/b"), free_slots=1, evictable_slots=2, next_victim="acme/b",
                         queue_len=5, pending_loads=1, num_slots=4, routing_weights=(("miss_cost", 3.0),))
    wire = stats.to_dict()
    assert wire["warm"] == ["acme/a", "acme/b"] and wire["routing_weights"] == {"miss_cost": 3.0}
    assert RoutingStats.from_dict(wire) == stats


@pytest.mark.parametrize(
    "change",
    [
        {"queue_len": -1},
        {"queue_len": "3"},
        {"free_slots": True},
        {"warm": "acme/a"},
        {"warm": [1]},
        {"next_victim": 3},
        {"extra": 1},
        {"routing_weights": [["miss_cost", 3.0]]},
        {"routing_weights": {"miss_cost": "3"}},
    ],
)
def test_a_malformed_report_is_refused(change):
    wire = {**RoutingStats().to_dict(), **change}
    with pytest.raises((TypeError, ValueError)):
        RoutingStats.from_dict(wire)


def test_a_report_missing_a_field_is_refused():
    wire = RoutingStats().to_dict()
    del wire["free_slots"]
    with pytest.raises(ValueError, match="free_slots"):
        RoutingStats.from_dict(wire)
