"""Streamed answers: OpenAI's chunk objects and the server-sent events that carry them."""

import json

from deployments.contracts import GenerationChunk
from deployments.schemas.openai import Usage
from deployments.schemas.streaming import StreamFormat, sse_event


def test_chat_stream_opens_with_the_role_and_ends_with_usage():
    fmt = StreamFormat("chat", "m", include_usage=True)
    (opening,) = fmt.opening()
    assert opening.choices[0].delta.role == "assistant"
    (delta,) = fmt.chunk(GenerationChunk("Hi", None, prompt_tokens=3))
    assert delta.choices[0].delta.content == "Hi" and delta.usage is None
    last, usage = fmt.chunk(GenerationChunk("", "stop", prompt_tokens=3, completion_tokens=2))
    assert last.choices[0].finish_reason == "stop" and usage.choices == []
    assert usage.usage.total_tokens == 5
    assert {opening.id, delta.id, last.id, usage.id} == {fmt.id}


def test_completion_stream_has_no_opening_and_keeps_one_id():
    fmt = StreamFormat("completion", "m", include_usage=False)
    assert fmt.opening() == []
    (first,) = fmt.chunk(GenerationChunk("Once", None, prompt_tokens=2))
    (last,) = fmt.chunk(GenerationChunk("", "length", prompt_tokens=2, completion_tokens=4))
    assert first.choices[0].text == "Once" and last.choices[0].finish_reason == "length"
    assert first.id == last.id == fmt.id and first.object == "text_completion"


def test_server_sent_events_frame_models_dicts_and_done():
    usage = Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    assert sse_event(usage) == f"data: {usage.model_dump_json()}\n\n"
    assert json.loads(sse_event({"error": {"type": "x"}})[len("data: "):]) == {"error": {"type": "x"}}
    assert sse_event("[DONE]") == "data: [DONE]\n\n"


def test_the_last_chunk_of_a_combination_says_how_it_was_built():
    for kind in ("chat", "completion"):
        fmt = StreamFormat(kind, "base", include_usage=False)
        (delta,) = fmt.chunk(GenerationChunk("Hi", None, prompt_tokens=3, combination="svd"))
        (last,) = fmt.chunk(GenerationChunk("", "stop", prompt_tokens=3, completion_tokens=2, combination="svd"))
        assert delta.lora_serve is None and last.lora_serve.combination == "svd"
        (plain,) = fmt.chunk(GenerationChunk("", "stop", prompt_tokens=3, completion_tokens=2))
        assert plain.lora_serve is None
