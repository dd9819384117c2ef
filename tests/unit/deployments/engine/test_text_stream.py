"""Text streaming and stop strings (no engine thread)."""

import pytest

from deployments.engine.base_model import BaseModelSpec, load_base_model
from deployments.engine.text_stream import TextStream


@pytest.fixture(scope="module")
def tokenizer():
    return load_base_model(BaseModelSpec(name="tiny-random-llama")).tokenizer


def stream_text(tokenizer, text, stop=()):
    stream = TextStream(tokenizer, tuple(stop))
    sent, stopped = [], False
    for token in tokenizer.encode(text, add_special_tokens=False):
        delta, stopped = stream.push(token)
        sent.append(delta)
        if stopped:
            break
    if not stopped:
        sent.append(stream.flush())
    return sent, stopped


def test_stream_reassembles_text_with_multibyte_characters(tokenizer):
    text = "héllo 👋 wörld"
    sent, stopped = stream_text(tokenizer, text)
    assert "".join(sent) == text and not stopped
    assert all("\ufffd" not in piece for piece in sent)


def test_stop_string_cuts_text_and_never_leaks_its_prefix(tokenizer):
    sent, stopped = stream_text(tokenizer, "one two STOP three", stop=["STOP"])
    assert stopped
    assert "".join(sent) == "one two "
    assert not any("S" in piece for piece in sent)


def test_earliest_of_several_stop_strings_wins(tokenizer):
    sent, stopped = stream_text(tokenizer, "abc\n\nxyz END", stop=["END", "\n\n"])
    assert stopped and "".join(sent) == "abc"


def test_held_back_prefix_is_released_when_it_does_not_complete(tokenizer):
    sent, stopped = stream_text(tokenizer, "ST then more", stop=["STOP"])
    assert not stopped and "".join(sent) == "ST then more"
