"""Continuous batching on the tiny model: requests join and leave between steps, a short request
never waits for a long one, limits are per request, the KV budget bounds what runs, versions and
deletes follow running requests, and failures stay with the request they belong to."""

from __future__ import annotations

import random
import threading

import pytest

from benchmarks.common import wait_until
from deployments.engine import scheduler as scheduler_module
from deployments.engine.kv_cache import LaneKVCache
from deployments.engine.text_stream import TextStream
from lora_core.errors import AdapterNotFoundError, EngineClosedError, LoraServeError
from tests.support.requests import request


@pytest.fixture
def adapters(adapter_factory):
    return [adapter_factory(f"a{i}", seed=i, r=4 * (i % 3 + 1)) for i in range(4)]


def alone(engine_factory, adapters, prompt: str, adapter: str | None, max_tokens: int, **settings) -> str:
    engine = engine_factory(max_num_seqs=1, **settings)
    for index, folder in enumerate(adapters):
        engine.register_adapter(f"acme/a{index}", folder)
    return engine.generate(prompt, adapter, max_tokens=max_tokens, temperature=0).text


def running(engine, count: int = 1) -> None:
    """Wait until `count` requests are decoding (the tiny model's text may arrive only at the end)."""
    wait_until(lambda: engine.stats()["running"] >= count and engine.stats()["steps_run"] > 0, 10, "decoding")


def test_a_short_request_sent_after_a_long_one_finishes_first(engine_factory):
    engine = engine_factory(max_num_seqs=4, max_seq_len=4096, max_new_tokens=2000)
    long = engine.submit(request("tell me a long story", max_tokens=2000, ignore_eos=True))
    running(engine)
    short = engine.submit(request("hi", max_tokens=4, ignore_eos=True))
    assert short.result().completion_tokens == 4
    assert engine.stats()["running"] == 1  # the long one is still running
    long.cancel()
    assert long.result().completion_tokens < 2000


def test_rows_joining_and_leaving_mid_way_write_what_they_write_alone(engine_factory, adapters):
    """Greedy text of each request equals the text it writes alone, while requests of other
    lengths and adapters join and leave around it."""
    rng = random.Random(7)
    cases = [(f"prompt {i} " + "x" * rng.randint(0, 20), rng.choice([None, "acme/a0", "acme/a1", "acme/a2"]),
              rng.randint(1, 24)) for i in range(10)]
    engine = engine_factory(max_num_seqs=4, prefill_chunk_tokens=8)
    for index, folder in enumerate(adapters):
        engine.register_adapter(f"acme/a{index}", folder)
    handles, firsts = [], []
    for case_index, (prompt, adapter, max_tokens) in enumerate(cases):
        handles.append(engine.submit(request(prompt, adapter, max_tokens=max_tokens)))
        # let some run a little before the next ones join (the chunk read here is kept)
        firsts.append(next(iter(handles[-1])).text if case_index % 3 == 2 else "")
    together = [first + handle.result().text for first, handle in zip(firsts, handles)]
    assert engine.stats()["peak_rows"] > 1 and engine.stats()["prefill_chunks_run"] > len(cases)  # chunked
    for (prompt, adapter, max_tokens), text in zip(cases, together):
        assert text == alone(engine_factory, adapters, prompt, adapter, max_tokens, prefill_chunk_tokens=8), (prompt, adapter)


def test_a_request_valid_alone_is_valid_in_any_batch(engine_factory):
    """A long prompt with few tokens and a short prompt with many share a batch (their sum is over
    max_seq_len; only each request's own prompt + max_tokens counts)."""
    engine = engine_factory(max_seq_len=64, max_new_tokens=60, batch_wait_ms=200)
    long_prompt = engine.submit(request("y" * 50, max_tokens=10, ignore_eos=True))
    many_tokens = engine.submit(request("hi", max_tokens=60, ignore_eos=True))
    assert long_prompt.result().completion_tokens == 10 and many_tokens.result().completion_tokens == 60
    assert engine.stats()["peak_rows"] == 2


def test_chat_without_max_tokens_gets_what_its_own_prompt_leaves(engine_factory):
    engine = engine_factory(max_seq_len=64, max_new_tokens=60)
    short, longer = [{"role": "user", "content": "x"}], [{"role": "user", "content": "x" * 30}]
    handles = [engine.submit(request(messages=m, ignore_eos=True)) for m in (short, longer)]
    results = [handle.result() for handle in handles]
    for messages, result in zip((short, longer), results):
        assert result.completion_tokens == min(60, 64 - len(engine.encode(messages=messages)))


def test_the_kv_budget_bounds_the_running_requests_and_the_rest_wait(engine_factory):
    lane = LaneKVCache.lane_bytes(2, 2, 16, 128, __import__("torch").float32)  # the tiny model's lane
    engine = engine_factory(max_num_seqs=8, kv_cache_bytes=2 * lane)
    assert engine.stats()["kv_lanes"] == 2
    handles = [engine.submit(request(f"q{i}", max_tokens=6, ignore_eos=True)) for i in range(5)]
    assert engine.routing_stats().queue_len == 5
    assert [handle.result().completion_tokens for handle in handles] == [6] * 5
    assert engine.stats()["peak_rows"] == 2 and engine.stats()["running"] == 0


def test_a_budget_that_holds_no_lane_is_refused(engine_factory):
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        engine_factory(kv_cache_bytes=1000)


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(engine_factory):
    engine = engine_factory(max_num_seqs=2, max_seq_len=4096, max_new_tokens=4000, prefill_chunk_tokens=16)
    decoding = engine.submit(request("go", max_tokens=4000, ignore_eos=True))
    running(engine)
    before = engine.stats()["steps_run"]
    long_prompt = engine.submit(request("z" * 100, max_tokens=1))
    long_prompt.result()  # its prompt went in over 7 chunks
    assert engine.stats()["steps_run"] - before >= 100 // 16 - 1  # the running row decoded between chunks
    assert engine.stats()["running"] == 1
    decoding.cancel()


def test_a_new_version_serves_the_next_requests_and_never_waits_for_a_running_one(engine_factory, adapters):
    engine = engine_factory(max_num_seqs=4, max_seq_len=512, max_new_tokens=400)
    engine.register_adapter("acme/x", adapters[0])
    old_text = engine.generate("version", "acme/x", max_tokens=400, temperature=0, ignore_eos=True).text
    old_version = engine.submit(request("version", "acme/x", max_tokens=400, ignore_eos=True))
    running(engine)
    engine.register_adapter("acme/x", adapters[1])  # returns while `old_version` still holds the old one
    assert engine.stats()["running"] == 1
    new_text = engine.generate("version", "acme/x", max_tokens=30, temperature=0, ignore_eos=True).text
    assert old_version.result().text == old_text  # start to finish on one version
    assert new_text != old_text[: len(new_text)]
    assert new_text == alone(engine_factory, [adapters[1]], "version", "acme/a0", 30, max_seq_len=512)
    wait_until(lambda: engine.stats()["slots"]["warm"] == ["acme/x"], 5, "the old version's slot to be freed")


def test_delete_lets_running_requests_finish_and_fails_queued_ones(engine_factory, adapters):
    engine = engine_factory(max_num_seqs=1)  # one lane: the second request queues
    engine.register_adapter("acme/a0", adapters[0])
    first = engine.submit(request("hi", "acme/a0", max_tokens=100, ignore_eos=True))
    running(engine)
    queued = engine.submit(request("hi", "acme/a0", max_tokens=4))
    engine.delete_adapter("acme/a0")
    with pytest.raises(AdapterNotFoundError):
        queued.result()
    assert first.result().completion_tokens == 100
    wait_until(lambda: engine.stats()["slots"]["warm"] == [], 5, "the deleted adapter's slot to be freed")
    with pytest.raises(AdapterNotFoundError):
        engine.submit(request("hi", "acme/a0"))


def test_one_requests_failure_ends_that_request_alone(engine_factory, monkeypatch):
    class Exploding(TextStream):
        def push(self, token_id):
            if "BOOM" in self.stop:
                raise RuntimeError("this row's text failed")
            return super().push(token_id)

    monkeypatch.setattr(scheduler_module, "TextStream", Exploding)
    engine = engine_factory(batch_wait_ms=200)
    doomed = engine.submit(request("a", max_tokens=8, stop=("BOOM",)))
    fine = [engine.submit(request(f"b{i}", max_tokens=8, ignore_eos=True)) for i in range(2)]
    with pytest.raises(LoraServeError, match=r"failed in the engine \(RuntimeError\)") as info:
        doomed.result()
    assert info.value.status_code == 500
    assert "this row's text failed" not in str(info.value)  # the log has it; the caller gets the type only
    assert [handle.result().completion_tokens for handle in fine] == [8, 8]


def test_a_step_that_fails_fails_its_rows_and_the_engine_goes_on(engine_factory, monkeypatch):
    engine = engine_factory()
    real_run, calls = engine.runner.run, []

    def fail_once(first_lane, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory, say")
        return real_run(first_lane, batch)

    monkeypatch.setattr(engine.runner, "run", fail_once)
    victim = engine.submit(request("x", max_tokens=10, ignore_eos=True))
    with pytest.raises(LoraServeError, match="out of memory"):
        victim.result()
    assert engine.generate("y", max_tokens=3, temperature=0, ignore_eos=True).completion_tokens == 3


def test_a_dead_loop_fails_every_request_and_says_so(engine_factory, monkeypatch):
    engine = engine_factory()
    waiting = threading.Event()

    def broken_iteration():
        waiting.wait(5)
        raise SystemError("a bug in the loop")

    monkeypatch.setattr(engine.scheduler, "_iteration", broken_iteration)
    handle = engine.submit(request("x", max_tokens=3))
    waiting.set()
    with pytest.raises(EngineClosedError, match="loop died") as info:
        handle.result()
    assert info.value.status_code == 503
    wait_until(lambda: not engine.scheduler.alive, 5, "the loop to be reported dead")
    with pytest.raises(EngineClosedError):
        engine.submit(request("y"))


def test_a_cancelled_request_gives_its_lane_back_at_the_next_step(engine_factory):
    engine = engine_factory(max_num_seqs=1, max_seq_len=4096, max_new_tokens=4000)
    long = engine.submit(request("x", max_tokens=4000, ignore_eos=True))  # seconds of work
    running(engine)
    waiting = engine.submit(request("y", max_tokens=3, ignore_eos=True))
    long.cancel()
    assert waiting.result().completion_tokens == 3
    assert long.result().finish_reason == "cancelled"


@pytest.mark.parametrize("extension, check", [
    ({"min_tokens": 5, "stop_token_ids": ()}, lambda r, g: r.completion_tokens >= 5),
    ({"top_k": 1, "temperature": 1.0}, lambda r, g: r.text == g.text),
    ({"repetition_penalty": 10.0}, lambda r, g: len(set(r.text)) > len(set(g.text))),
])
def test_vllm_extensions(engine_factory, extension, check):
    engine = engine_factory()
    greedy = engine.generate("abcabc", max_tokens=12, temperature=0)
    result = engine.generate("abcabc", max_tokens=12, **{"temperature": 0, **extension})
    assert check(result, greedy), (result, greedy)


def test_stop_token_ids_end_the_row_without_their_text(engine_factory):
    engine = engine_factory()
    greedy = engine.generate("abc", max_tokens=12, temperature=0, ignore_eos=True)
    token_ids = engine.tokenizer.encode(greedy.text, add_special_tokens=False)
    stop = token_ids[3]
    result = engine.generate("abc", max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=(stop,))
    assert result.finish_reason == "stop"
    assert result.text == engine.tokenizer.decode(token_ids[: token_ids.index(stop)])
