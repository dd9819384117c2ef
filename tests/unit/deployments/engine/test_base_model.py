"""Base model loading: the tiny in-code model, local folders, the SmolLM2 cache and its atomicity.

Everything runs offline: an autouse fixture makes any socket connect fail, so a stray Hub
download shows up as an error instead of a slow, flaky test.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from deployments.engine import base_model
from deployments.engine.base_model import KNOWN_BASE_MODELS, SMOLLM2_NAME, TINY_NAME, BaseModelSpec, load_base_model
from lora_core import base_models
from lora_core.paths import default_model_cache_dir

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"network access attempted: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture(scope="module")
def tiny():
    return load_base_model(BaseModelSpec(name=TINY_NAME))


def test_public_surface():
    assert sorted(base_model.__all__) == sorted(
        [
            "KNOWN_BASE_MODELS",
            "SMOLLM2_NAME",
            "TINY_NAME",
            "BaseModelSpec",
            "LoadedBaseModel",
            "load_base_model",
            "tiny_tokenizer",
        ]
    )
    assert KNOWN_BASE_MODELS == (SMOLLM2_NAME, TINY_NAME)
    assert set(base_model._BUILDERS) == set(KNOWN_BASE_MODELS)  # a loader for every known name


def test_default_cache_dir_is_in_repo():
    repo_root = Path(base_model.__file__).resolve().parents[2]
    assert Path(default_model_cache_dir()) == repo_root / ".cache" / "models"
    assert BaseModelSpec().cache_dir is None  # None: the default, resolved when loading


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as info:
        BaseModelSpec(name="gpt-17")
    for name in KNOWN_BASE_MODELS:
        assert name in str(info.value)


def test_spec_is_frozen():
    spec = BaseModelSpec(name=TINY_NAME)
    with pytest.raises(AttributeError):
        spec.name = SMOLLM2_NAME  # type: ignore[misc]


# --- tiny model -----------------------------------------------------------------------------


def test_tiny_loads_fast_and_ready_to_serve(tiny):
    started = time.perf_counter()
    loaded = load_base_model(BaseModelSpec(name=TINY_NAME))
    assert time.perf_counter() - started < 5.0
    assert loaded.name == TINY_NAME
    assert loaded.device == "cpu"
    assert loaded.dtype == torch.float32
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.model.config._attn_implementation == "sdpa"


def test_tiny_weights_are_deterministic_and_leave_global_rng_alone(tiny):
    rng_before = torch.random.get_rng_state()
    again = load_base_model(BaseModelSpec(name=TINY_NAME))
    assert torch.equal(rng_before, torch.random.get_rng_state())
    first, second = tiny.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    # Not all zeros / all equal: the weights are really random.
    assert tiny.model.model.layers[0].self_attn.q_proj.weight.std() > 0.001


def test_tiny_dtype_override():
    loaded = load_base_model(BaseModelSpec(name=TINY_NAME), dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())


@pytest.mark.parametrize("text", ["hello world", "héllo 👋", "  leading spaces\nand\ttabs", ""])
def test_tiny_tokenizer_round_trips(tiny, text):
    tokenizer = tiny.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


def test_tiny_special_tokens(tiny):
    tokenizer = tiny.tokenizer
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id is not None
    assert tokenizer.padding_side == "left"
    assert tiny.model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tiny.model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_tiny_chat_template(tiny):
    rendered = tiny.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    without = tiny.tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert not without.endswith("<|im_start|>assistant\n")


def test_tiny_vocab_sizes_match(tiny):
    vocab = len(tiny.tokenizer)
    assert vocab == tiny.model.config.vocab_size
    assert tiny.model.get_input_embeddings().weight.shape[0] == vocab


def test_tiny_forward_and_padded_generate(tiny):
    batch = tiny.tokenizer(["hi", "a longer prompt"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = tiny.model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tiny.tokenizer))
    assert torch.isfinite(logits).all()
    out = tiny.model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= batch["input_ids"].shape[1] + 4


# --- local folders ---------------------------------------------------------------------------


def test_load_from_local_path(tiny, tmp_path):
    folder = tmp_path / "tiny-model"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)

    loaded = load_base_model(BaseModelSpec(name=SMOLLM2_NAME, path=str(folder)))  # path wins
    assert loaded.name == str(folder.resolve())
    assert not loaded.model.training
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    assert len(loaded.tokenizer) == loaded.model.config.vocab_size
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("héllo 👋")) == "héllo 👋"
    tokenizer = loaded.tokenizer
    rendered = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert loaded.tokenizer.pad_token_id is not None


def test_non_model_folder_says_what_is_missing(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError) as info:
        load_base_model(BaseModelSpec(path=str(tmp_path)))
    message = str(info.value)
    assert "config.json" in message and "weights" in message and "tokenizer" in message


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_base_model(BaseModelSpec(path=str(tmp_path / "nope")))


# --- SmolLM2 cache: atomic writes (conversion faked with the tiny model, so these are fast) ----


class FakeConvert:
    """Stands in for the ~20 s GGUF dequantization; counts calls, can fail half-way."""

    def __init__(self, tiny, fail: bool = False, delay_s: float = 0.0):
        self.tiny, self.fail, self.delay_s = tiny, fail, delay_s
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, gguf: Path, out: Path) -> None:
        with self.lock:
            self.calls += 1
        assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.is_file()
        time.sleep(self.delay_s)
        self.tiny.model.save_pretrained(out)
        if self.fail:
            raise RuntimeError("simulated crash mid-write")
        self.tiny.tokenizer.save_pretrained(out)


def _leftovers(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if p.name.endswith(".partial"))


def test_cache_is_written_once_then_reused(tiny, tmp_path, monkeypatch):
    convert = FakeConvert(tiny)
    monkeypatch.setattr(base_model, "_convert_gguf", convert)
    spec = BaseModelSpec(cache_dir=str(tmp_path))
    first = load_base_model(spec)
    second = load_base_model(spec)
    assert convert.calls == 1
    assert first.name == second.name == SMOLLM2_NAME
    folder = tmp_path / SMOLLM2_NAME
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_partial_folder_and_leftover_temp_dir_do_not_break_load(tiny, tmp_path, monkeypatch):
    convert = FakeConvert(tiny)
    monkeypatch.setattr(base_model, "_convert_gguf", convert)
    partial = tmp_path / SMOLLM2_NAME
    partial.mkdir()
    (partial / "config.json").write_text("{")  # truncated, and no completion marker
    leftover = tmp_path / f".{SMOLLM2_NAME}.deadbeef.partial"  # what a writer that died leaves
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 10)

    loaded = load_base_model(BaseModelSpec(cache_dir=str(tmp_path)))
    assert convert.calls == 1
    assert loaded.model.config.vocab_size == len(loaded.tokenizer)
    assert _leftovers(tmp_path) == []
    assert (partial / "model.safetensors").is_file()


def test_crash_mid_write_leaves_no_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(base_model, "_convert_gguf", FakeConvert(tiny, fail=True))
    spec = BaseModelSpec(cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="simulated crash"):
        load_base_model(spec)
    assert not (tmp_path / SMOLLM2_NAME).exists()
    assert _leftovers(tmp_path) == []

    convert = FakeConvert(tiny)
    monkeypatch.setattr(base_model, "_convert_gguf", convert)
    load_base_model(spec)
    assert convert.calls == 1


def test_stale_cache_is_rebuilt(tiny, tmp_path, monkeypatch):
    convert = FakeConvert(tiny)
    monkeypatch.setattr(base_model, "_convert_gguf", convert)
    spec = BaseModelSpec(cache_dir=str(tmp_path))
    load_base_model(spec)
    marker = tmp_path / SMOLLM2_NAME / base_models.CACHE_MARKER
    marker.write_text(marker.read_text().replace('"format": 1', '"format": 0'))
    load_base_model(spec)
    assert convert.calls == 2
    assert _leftovers(tmp_path) == []


def _run_in_threads(target, count: int) -> list:
    """Run `target` in `count` threads at once; return results, re-raising the first error."""
    results, errors = [], []
    barrier = threading.Barrier(count)

    def run():
        try:
            barrier.wait()
            results.append(target())
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    assert len(results) == count
    return results


def test_concurrent_loads_in_threads_are_safe(tiny, tmp_path, monkeypatch):
    # transformers' from_pretrained patches process-global state; unserialized, two threads
    # left every later load with meta tensors. Regression test for the in-process lock.
    convert = FakeConvert(tiny, delay_s=0.2)
    monkeypatch.setattr(base_model, "_convert_gguf", convert)
    specs = [BaseModelSpec(cache_dir=str(tmp_path)), BaseModelSpec(name=TINY_NAME)]
    loaded = _run_in_threads(lambda: [load_base_model(s) for s in specs], 3)
    assert convert.calls == 1
    after = load_base_model(BaseModelSpec(cache_dir=str(tmp_path)))
    for result in [m for pair in loaded for m in pair] + [after]:
        assert all(p.device.type == "cpu" for p in result.model.parameters())
    assert _leftovers(tmp_path) == []


def test_cache_build_is_deduplicated_by_file_lock(tiny, tmp_path, monkeypatch):
    # Calls _build_cache directly (no in-process load lock), as separate processes would.
    convert = FakeConvert(tiny, delay_s=0.5)
    monkeypatch.setattr(base_model, "_convert_gguf", convert)
    gguf = base_models.smollm2_gguf_path()
    expected = {**base_models.smollm2_source_info(gguf), "source_size_bytes": 1}
    folder = tmp_path / SMOLLM2_NAME
    _run_in_threads(lambda: base_model._build_cache(gguf, folder, expected), 3)
    assert convert.calls == 1
    assert base_models.converted_cache_is_complete(folder, expected)
    assert _leftovers(tmp_path) == []
