"""LoraReplica without a Ray cluster: the class behind the deployment, called in process."""

import asyncio

import pytest
from pydantic import ValidationError

from benchmarks.common import wait_until
from deployments.replica import LoraReplica
from lora_core.errors import AdapterNotFoundError, EngineClosedError, InvalidAdapterError, InvalidRequestError
from tests.support.leaks import no_new_threads
from tests.support.requests import request


def settings(adapters: dict, **changes) -> dict:
    base = {"base_model": "tiny-random-llama", "compile": "off", "num_slots": 2, "max_num_seqs": 2,
            "max_seq_len": 64, "max_new_tokens": 16, "torch_threads": 2, "adapters": adapters}
    return {**base, **changes}


@pytest.fixture
def folders(adapter_factory):
    return {f"acme/a{i}": str(adapter_factory(f"a{i}", seed=i)) for i in range(3)}


@pytest.fixture
def make_replica():
    """The deployment's class, made in process from args' settings; its engines' threads must be
    gone after `__del__`."""
    made = []

    def make(adapters: dict | None = None, **changes) -> LoraReplica:
        made.append(LoraReplica.func_or_class(settings(adapters or {}, **changes)))
        return made[-1]

    with no_new_threads():
        yield make
        for replica in made:
            replica.__del__()


def run(coroutine):
    return asyncio.run(coroutine)


async def collect(replica, request):
    return [chunk async for chunk in replica.stream(request)]


def test_a_deploy_of_adapters_only_keeps_the_engine(make_replica, folders):
    replica = make_replica({"acme/a0": folders["acme/a0"], "acme/a1": folders["acme/a1"]})
    engine = replica._engine
    replica.reconfigure({"adapters": {"acme/a1": folders["acme/a1"], "acme/a2": folders["acme/a2"]}})
    assert replica._engine is engine and replica.engine_builds == 1
    assert replica.list_adapters()["adapters"] == ["acme/a1", "acme/a2"]
    with pytest.raises(AdapterNotFoundError):
        run(replica.generate(request("hi", "acme/a0", max_tokens=2)))
    assert run(replica.generate(request("hi", "acme/a2", max_tokens=2))).completion_tokens >= 1
    replica.reconfigure({})  # the override dropped: back to args' adapters
    assert replica.list_adapters()["adapters"] == ["acme/a0", "acme/a1"]


def test_a_deploy_changes_generation_limits_in_place_and_refuses_what_needs_a_new_engine(make_replica, folders):
    replica = make_replica({"acme/a0": folders["acme/a0"]})
    engine = replica._engine
    with pytest.raises(InvalidRequestError, match="over the limit of 16"):
        run(replica.generate(request("hi", "acme/a0", max_tokens=20)))
    replica.reconfigure({"max_new_tokens": 24, "batch_wait_ms": 2.0, "prefill_chunk_tokens": 8})
    assert run(replica.generate(request("hi", "acme/a0", max_tokens=20, ignore_eos=True))).completion_tokens == 20
    assert engine.scheduler.settings.batch_wait_ms == 2.0 and engine.scheduler.settings.prefill_chunk_tokens == 8
    with pytest.raises(ValidationError, match="num_slots need a new engine"):  # under args, never here
        replica.reconfigure({"num_slots": 3})
    assert replica._engine is engine and engine.config.num_slots == 2 and engine.config.max_new_tokens == 24


def test_a_refused_adapter_leaves_the_registered_ones(make_replica, folders, tmp_path):
    replica = make_replica({"acme/a0": folders["acme/a0"]})
    with pytest.raises(InvalidAdapterError):
        replica.reconfigure({"adapters": {"acme/a0": folders["acme/a0"], "acme/bad": str(tmp_path)}})
    assert replica.list_adapters()["adapters"] == ["acme/a0"]
    with no_new_threads(), pytest.raises(InvalidAdapterError):  # a replica whose args fail builds nothing
        LoraReplica.func_or_class(settings({"acme/bad": str(tmp_path)}))


def test_stream_adds_up_to_generate_and_limits_raise_before_the_first_chunk(make_replica, folders):
    replica = make_replica({"acme/a0": folders["acme/a0"]})
    greedy = request("hello", "acme/a0", max_tokens=8)
    whole = run(replica.generate(greedy))
    chunks = run(collect(replica, greedy))
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason
    assert chunks[-1].completion_tokens == whole.completion_tokens and chunks[-1].prompt_tokens == 5
    with pytest.raises(InvalidRequestError):
        run(collect(replica, request("hello", "acme/a0", max_tokens=17)))


def test_chat_without_max_tokens_fills_what_the_prompt_leaves(make_replica):
    replica = make_replica(max_seq_len=40, max_new_tokens=30)
    messages = [{"role": "user", "content": "x" * 10}]
    prompt_tokens = len(replica._engine.encode(messages=messages))
    result = run(replica.generate(request(messages=messages)))  # no max_tokens
    assert result.prompt_tokens == prompt_tokens
    assert result.completion_tokens <= 40 - prompt_tokens


def test_a_stream_its_caller_abandons_frees_the_row(make_replica):
    """A client that disconnects closes the stream: its row leaves at the next step, and the
    next request gets the only lane."""
    replica = make_replica(max_num_seqs=1, max_new_tokens=16)

    async def abandon_then_ask() -> int:
        stream = replica.stream(request("a long one", None, max_tokens=16, ignore_eos=True))
        await anext(stream)
        await stream.aclose()  # what Serve does when the HTTP client goes away
        return (await replica.generate(request("next", None, max_tokens=2, ignore_eos=True))).completion_tokens

    assert run(abandon_then_ask()) == 2
    wait_until(lambda: replica._engine.scheduler.running == 0, 5, "the abandoned row to leave")
    assert replica._engine.stats()["tokens_generated"] < 16 + 2  # the long one stopped early


def test_the_health_check_fails_once_the_engine_loop_has_died(make_replica, monkeypatch):
    replica = make_replica()
    replica.check_health()  # alive
    scheduler = replica._engine.scheduler

    def broken_iteration():
        raise SystemError("a bug in the loop")

    monkeypatch.setattr(scheduler, "_iteration", broken_iteration)
    with pytest.raises(EngineClosedError):
        run(replica.generate(request("x", None, max_tokens=2)))
    wait_until(lambda: not scheduler.alive, 5, "the loop to be reported dead")
    with pytest.raises(EngineClosedError, match="not running"):
        replica.check_health()
