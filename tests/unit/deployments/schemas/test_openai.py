"""The OpenAI-compatible bodies: what they accept, refuse, and hand the replica."""

import pytest
from pydantic import ValidationError

from deployments.contracts import ChatTurn, GenerationRequest, SamplingParams
from deployments.request_limits import LIMITS
from deployments.schemas.openai import ChatCompletionRequest, CompletionRequest, ModelList

VALID = {"model": "acme/pirate", "prompt": "hi"}


def test_extra_openai_fields_are_ignored_and_defaults_follow_openai():
    request = CompletionRequest.model_validate({**VALID, "user": "u1", "logprobs": None, "presence_penalty": 0})
    assert request.max_tokens == 16 and request.temperature == 1.0 and request.n == 1 and not request.stream
    assert request.to_generation_request("acme/pirate") == GenerationRequest(
        "acme/pirate", SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0, seed=None, stop=()), prompt="hi"
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"model": ""},
        {"prompt": ""},
        {"prompt": ["a", "b"]},
        {"n": 2},
        {"max_tokens": 0},
        {"temperature": -0.1},
        {"temperature": 2.5},
        {"top_p": 0},
        {"seed": -1},
        {"stop": [""]},
        {"stop": [str(i) for i in range(9)]},
        {"stop": ["x" * (LIMITS.max_stop_string_chars + 1)]},
        {"stop_token_ids": list(range(LIMITS.max_stop_token_ids + 1))},
        {"prompt": "x" * (LIMITS.max_prompt_chars + 1)},
        {"model": "m" * (LIMITS.max_model_chars + 1)},
        {"max_tokens": -5},
    ],
)
def test_out_of_bounds_fields_are_refused(changes):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({**VALID, **changes})


@pytest.mark.parametrize("stop, expected", [(None, []), ("\n", ["\n"]), (["a", "b"], ["a", "b"])])
def test_stop_is_always_a_list(stop, expected):
    assert CompletionRequest.model_validate({**VALID, "stop": stop}).stop == expected


def test_chat_messages_become_template_messages():
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief", "name": "x"},
                {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]},
            ],
            "max_tokens": 5,
            "max_completion_tokens": 7,
        }
    )
    generation_request = request.to_generation_request(None)
    assert generation_request.messages == (ChatTurn("system", "be brief"), ChatTurn("user", "hello"))
    assert generation_request.params.max_tokens == 7 and generation_request.adapter_id is None
    assert generation_request.prompt is None and generation_request.prompt_ids is None
    bare = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert bare.to_generation_request(None).params.max_tokens is None


@pytest.mark.parametrize("body", [
    {"model": "m", "messages": []},
    {"model": "m", "messages": [{"role": "tool", "content": "x"}]},
    {"model": "m", "messages": [{"role": "user", "content": "x"}] * (LIMITS.max_messages + 1)},
    {"model": "m", "messages": [{"role": "user", "content": "x" * (LIMITS.max_prompt_chars // 2 + 1)}] * 2},
])
def test_bad_chat_bodies_are_refused(body):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_model_list_puts_the_base_model_first():
    listing = ModelList.of("base", ["globex/b", "acme/a"])
    assert [card.id for card in listing.data] == ["base", "acme/a", "globex/b"]
    assert [card.owned_by for card in listing.data] == ["lora-serve", "acme", "globex"]


BASE = {"model": "base", "prompt": "hi"}


def test_adapters_become_one_combination_in_a_canonical_order():
    request = CompletionRequest.model_validate(
        {**BASE, "adapters": [{"id": "shared/json", "weight": 0.3}, {"id": "acme/a", "weight": 0.7}]})
    combination = request.combination()
    assert combination.adapter_ids == ("acme/a", "shared/json")
    same = CompletionRequest.model_validate(
        {**BASE, "adapters": [{"id": "acme/a", "weight": 0.7}, {"id": "shared/json", "weight": 0.3}]})
    assert same.combination().key == combination.key
    other = CompletionRequest.model_validate(
        {**BASE, "adapters": [{"id": "acme/a", "weight": 0.6}, {"id": "shared/json", "weight": 0.4}]})
    assert other.combination().key != combination.key
    generation = request.to_generation_request(None, combination)
    assert generation.routing_key == combination.key and generation.adapter_id is None
    assert CompletionRequest.model_validate({**BASE, "adapters": [{"id": "acme/a"}]}).combination().parts[0].weight == 1


@pytest.mark.parametrize(
    "adapters",
    [
        [],
        [{"id": "acme/a", "weight": 0}],
        [{"id": "acme/a", "weight": "nan"}],
        [{"id": "acme/a", "weight": "inf"}],
        [{"id": "acme/a", "weight": 1e9}],
        [{"id": "acme/a", "weight": "heavy"}],
        [{"id": "acme/a"}, {"id": "acme/a", "weight": 0.5}],
        [{"id": f"acme/a{i}"} for i in range(9)],
        [{"id": "acme/a", "scale": 2}],
        [{"id": ""}],
        "acme/a",
    ],
)
def test_bad_adapter_lists_are_refused(adapters):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                              "adapters": adapters})
