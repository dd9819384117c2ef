"""The engine end to end on the tiny model: batching, streaming, the slot LRU, swaps, errors."""

import asyncio
import dataclasses
import threading

import pytest
import torch

from deployments.contracts import GenerationRequest, SamplingParams
from lora_core.checkpoint import read_checkpoint
from lora_core.errors import AdapterNotFoundError, EngineClosedError, InvalidRequestError
from tests.support.requests import request


@pytest.fixture
def adapters(adapter_factory):
    return [adapter_factory(f"a{i}", seed=i, r=4 * (i % 3 + 1)) for i in range(4)]


def test_streamed_chunks_add_up_to_the_result(engine_factory, adapters):
    engine = engine_factory()
    engine.register_adapter("acme/a0", adapters[0])
    chunks = list(engine.submit(request("hello there", "acme/a0", max_tokens=10)))
    completion = engine.generate("hello there", "acme/a0", max_tokens=10, temperature=0)
    assert "".join(chunk.text for chunk in chunks) == completion.text
    assert chunks[-1].finish_reason == completion.finish_reason
    assert completion.completion_tokens == chunks[-1].completion_tokens
    assert 1 <= completion.completion_tokens <= 10
    assert completion.prompt_tokens == len(engine.encode("hello there"))
    if completion.finish_reason == "length":
        assert completion.completion_tokens == 10


def test_requests_that_arrive_together_share_one_batch_whatever_their_adapters(engine_factory, adapters):
    engine = engine_factory(batch_wait_ms=200)
    for index, folder in enumerate(adapters):
        engine.register_adapter(f"acme/a{index}", folder)
    handles = [engine.submit(request("hi", adapter, max_tokens=4)) for adapter in ["acme/a0", "acme/a1", None, "acme/a2"]]
    for handle in handles:
        handle.result()
    stats = engine.stats()
    assert stats["peak_rows"] == 4 and stats["rows_run"] == 4


def test_adapter_changes_the_output_and_base_rows_stay_base(engine_factory, adapters):
    engine = engine_factory(batch_wait_ms=100)
    engine.register_adapter("acme/a0", adapters[0])
    ids = torch.tensor([engine.encode("the quick brown fox")] * 2)
    logits = engine.forward_logits(ids, [None, "acme/a0"])
    base_only = engine.forward_logits(ids[:1], [None])
    torch.testing.assert_close(logits[0], base_only[0], rtol=0, atol=1e-5)
    assert (logits[1] - logits[0]).abs().max() > 1e-2


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(engine_factory, adapters):
    engine = engine_factory(batch_wait_ms=100)
    engine.register_adapter("acme/a0", adapters[0])
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    alone = engine.submit(GenerationRequest("acme/a0", params, prompt="once upon")).result().text
    crowd = [engine.submit(request("something else", None, max_tokens=12, temperature=1.0)) for _ in range(2)]
    together = engine.submit(GenerationRequest("acme/a0", params, prompt="once upon"))
    assert together.result().text == alone
    for handle in crowd:
        handle.result()
    other_seed = {engine.generate("once upon", "acme/a0", max_tokens=12, temperature=1.0, seed=s).text for s in range(5)}
    assert len(other_seed) > 1


def test_stop_string_ends_the_row(engine_factory):
    engine = engine_factory()
    full = engine.generate("abc", None, max_tokens=20, temperature=0).text
    assert len(full) >= 6, "the tiny model should produce some text"
    stop = full[3:5]
    stopped = engine.generate("abc", None, max_tokens=20, stop=(stop,), temperature=0)
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index(stop)]


def test_chat_messages_use_the_chat_template(engine_factory):
    engine = engine_factory()
    messages = [{"role": "user", "content": "hi"}]
    ids = engine.encode(messages=messages)
    assert engine.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert engine.generate(messages=messages, max_tokens=3, temperature=0).completion_tokens >= 1


def test_lru_evicts_the_least_recently_used_and_spares_pinned(engine_factory, adapters):
    engine = engine_factory(num_slots=2)
    for index, folder in enumerate(adapters):
        engine.register_adapter(f"acme/a{index}", folder)
    engine.warm("acme/a0", pin=True)
    for adapter in ["acme/a1", "acme/a2", "acme/a3", "acme/a1"]:
        engine.generate("x", adapter, max_tokens=2, temperature=0)
    slots = engine.stats()["slots"]
    assert "acme/a0" in slots["warm"] and slots["pinned"] == ["acme/a0"]
    assert slots["warm"][0] == "acme/a1"
    assert slots["evictions"] == 3 and slots["misses"] == 5 and slots["swaps"] == 5


def test_two_requests_for_one_cold_adapter_load_it_once(engine_factory, adapters):
    calls = []
    all_submitted = threading.Event()

    def held_resolver(adapter_id):
        """The load stays in flight until every request for the adapter is queued."""
        calls.append(adapter_id)
        assert all_submitted.wait(timeout=10)
        checkpoint = read_checkpoint(adapters[int(adapter_id[-1])])
        return checkpoint, checkpoint.version

    engine = engine_factory(resolver=held_resolver)
    handles = [engine.submit(request("x", "acme/a1", max_tokens=2)) for _ in range(3)]
    all_submitted.set()
    for handle in handles:
        handle.result()
    assert calls == ["acme/a1"]
    assert engine.stats()["slots"]["swaps"] == 1


def test_unknown_adapter_fails_with_not_found(engine_factory):
    with pytest.raises(AdapterNotFoundError):  # no resolver: refused at submit
        engine_factory().submit(request("x", "acme/nope"))

    def resolver(adapter_id):
        raise AdapterNotFoundError(f"no {adapter_id}")

    engine = engine_factory(resolver=resolver)
    with pytest.raises(AdapterNotFoundError):  # the resolver refuses: the request fails
        engine.submit(request("x", "acme/nope")).result()
    assert engine.generate("x", None, max_tokens=2, temperature=0).completion_tokens >= 1


def test_delete_zeroes_the_slot_and_refuses_later_requests(engine_factory, adapters):
    engine = engine_factory()
    engine.register_adapter("acme/a0", adapters[0])
    slot = engine.warm("acme/a0")
    layer = next(iter(engine.slot_model.layers.values()))
    assert layer.lora_a[slot].abs().sum() > 0
    engine.delete_adapter("acme/a0")
    assert engine.residency.placement("acme/a0") is None
    for layer in engine.slot_model.layers.values():
        assert not layer.lora_a[slot].any() and not layer.lora_b[slot].any()
    with pytest.raises(AdapterNotFoundError):
        engine.submit(request("x", "acme/a0"))
    with pytest.raises(AdapterNotFoundError):
        engine.delete_adapter("acme/a0")


def test_new_version_swaps_in_between_batches(engine_factory, adapters):
    engine = engine_factory()
    engine.register_adapter("acme/x", adapters[0])
    prompt, tokens = "version test", 40
    old_text = engine.generate(prompt, "acme/x", max_tokens=tokens, temperature=0).text
    engine.register_adapter("acme/x", adapters[1])
    new_text = engine.generate(prompt, "acme/x", max_tokens=tokens, temperature=0).text
    assert old_text != new_text
    engine.register_adapter("acme/x", adapters[0])

    running = engine.submit(request(prompt, "acme/x", max_tokens=tokens))
    chunks = iter(running)
    first = next(chunks)
    updater = threading.Thread(target=engine.register_adapter, args=("acme/x", adapters[1]))
    updater.start()
    in_flight_text = first.text + "".join(chunk.text for chunk in chunks)
    updater.join()
    assert in_flight_text == old_text
    assert engine.generate(prompt, "acme/x", max_tokens=tokens, temperature=0).text == new_text
    assert engine.residency.warm_versions().get("acme/x") == read_checkpoint(adapters[1]).version


def test_limits_are_refused_before_queueing(engine_factory):
    engine = engine_factory(max_seq_len=64, max_new_tokens=32)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.submit(request("x", None, max_tokens=33))
    with pytest.raises(InvalidRequestError, match="max_seq_len"):
        engine.submit(request("word " * 60, None, max_tokens=8))
    with pytest.raises(InvalidRequestError):
        engine.submit(request(""))
    assert engine.stats()["queued"] == 0


def test_cancel_stops_a_row(engine_factory):
    engine = engine_factory()
    handle = engine.submit(request("x", None, max_tokens=100))
    handle.cancel()
    assert handle.result().finish_reason == "cancelled"


def test_async_api_streams_and_collects(engine_factory, adapters):
    engine = engine_factory()
    engine.register_adapter("acme/a0", adapters[0])

    async def run():
        handle = engine.submit(request("hello", "acme/a0", max_tokens=6))
        streamed = [chunk.text async for chunk in handle.stream()]
        completion = await engine.agenerate("hello", "acme/a0", max_tokens=6, temperature=0)
        return "".join(streamed), completion.text

    streamed, collected = asyncio.run(run())
    assert streamed == collected


def test_closed_engine_refuses_work(engine_factory):
    engine = engine_factory()
    engine.close()
    with pytest.raises(EngineClosedError):
        engine.submit(request("x"))


def test_ignore_eos_runs_to_max_tokens(engine_factory):
    engine = engine_factory()
    engine.scheduler.settings = dataclasses.replace(  # every token ends a row
        engine.scheduler.settings, eos_ids=frozenset(range(len(engine.tokenizer))))
    stopped = engine.generate("hi", None, max_tokens=5, temperature=0)
    forced = engine.generate("hi", None, max_tokens=5, ignore_eos=True, temperature=0)
    assert stopped.finish_reason == "stop" and stopped.completion_tokens == 1
    assert forced.finish_reason == "length" and forced.completion_tokens == 5
