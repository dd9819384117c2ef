"""The correctness matrix: the engine's logits for a row equal an eager
`PeftModel.from_pretrained(fresh_tiny_model(), folder)` to 1e-4 (fp32), for every supported
checkpoint variant, alone and in mixed batches; base rows equal the plain base model; a slot that
is swapped or deleted keeps nothing of its previous occupant; greedy generation through the
engine's static-cache path gives PEFT's tokens.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from deployments.engine import Engine
from deployments.engine.base_model import load_base_model
from deployments.engine.slots import BASE_SLOT
from lora_core.checkpoint import read_checkpoint
from lora_core.errors import AdapterNotFoundError
from lora_core.settings import EngineConfig
from tests.support.adapters import TINY, edit_adapter_config, fresh_tiny_model, make_peft_adapter
from tests.support.requests import request

ATOL = 1e-4
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]

# variant id -> LoRA options (PEFT's LoraConfig); each one is also saved and served.
VARIANTS = {
    "r1": {"r": 1, "lora_alpha": 2},
    "r4": {"r": 4, "lora_alpha": 4},
    "r8": {"r": 8, "lora_alpha": 16},
    "r16": {"r": 16, "lora_alpha": 24},
    "alpha-fractional": {"r": 8, "lora_alpha": 5},
    "rslora": {"r": 16, "lora_alpha": 8, "use_rslora": True},
    "rank-pattern": {"r": 8, "rank_pattern": {"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 16}},
    "alpha-pattern": {"r": 4, "lora_alpha": 8, "alpha_pattern": {"v_proj": 32, r"layers\.0\.self_attn\.q_proj": 1}},
    "rslora-patterns": {
        "r": 8,
        "use_rslora": True,
        "target_modules": QKVO,
        "rank_pattern": {"k_proj": 16, "(q|o)_proj": 2},
        "alpha_pattern": {"o_proj": 4},
    },
    "q-only": {"target_modules": ["q_proj"]},
    "qkvo": {"target_modules": QKVO},
    "v-o": {"target_modules": ["v_proj", "o_proj"]},
    "layer-1-only": {"target_modules": QKVO, "layers_to_transform": [1]},
    "regex-targets": {"target_modules": r".*\.(q|k)_proj"},
    "adapter-name-custom": {"adapter_name": "custom", "target_modules": QKVO, "r": 4},
    "bf16-weights": {"weights_dtype": torch.bfloat16, "target_modules": QKVO},
    "target-parameters": {"target_modules": [], "target_parameters": ["q_proj.weight", "o_proj.weight"]},
}
VARIANT_IDS = list(VARIANTS)
ROWS = len(VARIANTS) + 1  # room for one row per variant plus a base row in one batch
INPUT_IDS = torch.randint(3, 259, (ROWS, 10), generator=torch.Generator().manual_seed(11))


def save_adapter(folder: Path, seed: int, **options) -> Path:
    """`make_peft_adapter`, plus saving under another adapter name (PEFT writes it to folder/<name>)
    or with the weights stored in another dtype."""
    adapter_name = options.pop("adapter_name", "default")
    weights_dtype = options.pop("weights_dtype", None)
    if adapter_name == "default":
        folder = make_peft_adapter(folder, seed=seed, **options)
        if weights_dtype is not None:
            path = folder / "adapter_model.safetensors"
            save_file({k: v.to(weights_dtype) for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
        return folder
    settings = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **options}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(fresh_tiny_model(), LoraConfig(**settings), adapter_name=adapter_name)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.normal_(0, 0.2)
    model.save_pretrained(folder, save_embedding_layers=False)
    assert not (folder / "adapter_config.json").exists()
    return folder / adapter_name


@torch.no_grad()
def peft_logits(folder: Path, input_ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    model = PeftModel.from_pretrained(fresh_tiny_model(), folder)
    model.eval()
    return model(input_ids=input_ids).logits.float()


def assert_rows_match(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = (actual - expected).abs().max().item()
    assert error <= ATOL, f"{what}: max |engine - reference| = {error:.3g} > {ATOL}"


@pytest.fixture(scope="module")
def base_logits() -> torch.Tensor:
    with torch.no_grad():
        return fresh_tiny_model()(input_ids=INPUT_IDS).logits.float()


@pytest.fixture(scope="module")
def variants(tmp_path_factory, base_logits) -> dict[str, tuple[Path, torch.Tensor]]:
    """variant id -> (adapter folder, PEFT's logits for every row of INPUT_IDS)."""
    root = tmp_path_factory.mktemp("variants")
    built = {}
    for seed, (name, options) in enumerate(VARIANTS.items()):
        folder = save_adapter(root / name, seed=100 + seed, **options)
        reference = peft_logits(folder)
        # A variant that did not change the logits would prove nothing.
        assert (reference - base_logits).abs().max() > 1e-2, name
        built[name] = (folder, reference)
    return built


@pytest.fixture(scope="module")
def engine(variants):
    """One engine with a slot for every variant (max_rank 16)."""
    engine = Engine(EngineConfig(base_model="tiny-random-llama", compile="off", num_slots=len(VARIANTS), max_rank=16, max_seq_len=128))
    try:
        for name, (folder, _) in variants.items():
            engine.register_adapter(name, folder)
        yield engine
    finally:
        engine.close()


def expected_rows(adapters: list[str | None], variants, base_logits) -> torch.Tensor:
    return torch.stack(
        [(base_logits if a is None else variants[a][1])[row] for row, a in enumerate(adapters)]
    )


# ---- logits ----------------------------------------------------------------------------------


def test_base_rows_equal_the_plain_base_model(engine, base_logits):
    assert_rows_match(engine.forward_logits(INPUT_IDS, [None] * ROWS), base_logits, "base rows")


@pytest.mark.parametrize("variant", VARIANT_IDS)
def test_single_adapter_batch_matches_peft(variant, engine, variants):
    rows = 3
    logits = engine.forward_logits(INPUT_IDS[:rows], [variant] * rows)
    assert_rows_match(logits, variants[variant][1][:rows], variant)


def _mixed_orders():
    everything = VARIANT_IDS + [None]
    assert len(everything) == ROWS
    shuffled = []
    for seed in (1, 2, 3):
        order = list(everything)
        random.Random(seed).shuffle(order)
        shuffled.append(pytest.param(order, id=f"all-shuffled-{seed}"))
    return [
        pytest.param(everything, id="all-in-order"),
        pytest.param(everything[::-1], id="all-reversed"),
        *shuffled,
        pytest.param(["r16", None, "r1", "r16", None, "q-only", "layer-1-only", "r1"], id="repeats-and-base-rows"),
        pytest.param([None, "rslora", None, "rslora"], id="base-first"),
        pytest.param(["v-o", "alpha-pattern", "rank-pattern"], id="three-adapters"),
    ]


@pytest.mark.parametrize("adapters", _mixed_orders())
def test_mixed_batch_matches_peft_per_row(adapters, engine, variants, base_logits):
    logits = engine.forward_logits(INPUT_IDS[: len(adapters)], adapters)
    for row, adapter in enumerate(adapters):
        expected = (base_logits if adapter is None else variants[adapter][1])[row]
        assert_rows_match(logits[row], expected, f"row {row} ({adapter or 'base'})")


# ---- swapping and deleting ---------------------------------------------------------------------


def _slot_rows(engine, slot: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (layer.lora_a[slot].clone(), layer.lora_b[slot].clone()) for name, layer in engine.slot_model.layers.items()}


def _assert_slot_holds_only(engine, slot: int, folder: Path) -> None:
    """Rows [:r] of each layer are the adapter's, rows [r:] (and untargeted layers) are zero."""
    modules = read_checkpoint(folder).modules
    for name, (lora_a, lora_b) in _slot_rows(engine, slot).items():
        rank = modules[name].rank if name in modules else 0
        assert not lora_a[rank:].any() and not lora_b[rank:].any(), f"{name}: leftovers beyond rank {rank}"
        if rank:
            weights = modules[name]
            assert torch.equal(lora_a[:rank], weights.lora_a.to(lora_a.dtype)), name
            torch.testing.assert_close(lora_b[:rank], (weights.lora_b.float() * weights.scaling).t().to(lora_b.dtype))


SWAPS = [
    pytest.param("r16", "r1", id="smaller-rank"),
    pytest.param("qkvo", "q-only", id="fewer-modules"),
    pytest.param("rslora-patterns", "layer-1-only", id="patterns-then-one-layer"),
    pytest.param("r4", "r16", id="larger-rank"),
    pytest.param("v-o", "regex-targets", id="disjoint-modules"),
]


@pytest.mark.parametrize("api", ["register_adapter", "update_adapter"])
@pytest.mark.parametrize("first, second", SWAPS)
def test_swap_in_place_leaves_nothing_of_the_previous_adapter(first, second, api, variants, base_logits, engine_factory):
    engine = engine_factory(num_slots=2)
    engine.register_adapter("acme/a", variants[first][0])
    engine.register_adapter("acme/b", variants["r8"][0])
    slot = engine.warm("acme/a")
    other = engine.warm("acme/b")
    adapters = ["acme/a", None, "acme/b"]
    rows = [first, None, "r8"]
    assert_rows_match(engine.forward_logits(INPUT_IDS[:3], adapters), expected_rows(rows, variants, base_logits), "before")
    old_version = engine.residency.warm_versions().get("acme/a")

    folder = variants[second][0]
    if api == "register_adapter":
        version = engine.register_adapter("acme/a", folder)
    else:
        checkpoint = read_checkpoint(folder)
        version = checkpoint.version
        engine.update_adapter("acme/a", checkpoint, version)

    assert version != old_version
    assert engine.residency.warm_versions().get("acme/a") == version
    assert engine.residency.placement("acme/a").slot == slot and engine.residency.placement("acme/b").slot == other
    _assert_slot_holds_only(engine, slot, folder)
    rows = [second, None, "r8"]
    assert_rows_match(engine.forward_logits(INPUT_IDS[:3], adapters), expected_rows(rows, variants, base_logits), "after swap")


@pytest.mark.parametrize("first, second", SWAPS)
def test_one_slot_pool_evicts_and_swaps_cleanly(first, second, variants, base_logits, engine_factory):
    engine = engine_factory(num_slots=1)
    engine.register_adapter("acme/x", variants[first][0])
    engine.register_adapter("acme/y", variants[second][0])
    for adapter, variant in [("acme/x", first), ("acme/y", second), ("acme/x", first), ("acme/y", second)]:
        logits = engine.forward_logits(INPUT_IDS[:2], [adapter, None])
        assert_rows_match(logits, expected_rows([variant, None], variants, base_logits), f"{adapter} ({variant})")
        assert engine.residency.placement(adapter).slot == 1
        _assert_slot_holds_only(engine, 1, variants[variant][0])
    snapshot = engine.residency.pool_snapshot()
    assert snapshot.evictions == 3 and snapshot.warm == ("acme/y",)


def test_config_only_change_is_swapped_in(adapter_factory, engine_factory, tmp_path):
    engine = engine_factory()
    first = adapter_factory("alpha16", seed=5, lora_alpha=16)
    engine.register_adapter("acme/a", first)
    engine.warm("acme/a")
    assert_rows_match(engine.forward_logits(INPUT_IDS[:2], ["acme/a"] * 2), peft_logits(first, INPUT_IDS[:2]), "alpha 16")
    second = tmp_path / "alpha2"
    shutil.copytree(first, second)
    edit_adapter_config(second, lora_alpha=2)
    engine.register_adapter("acme/a", second)
    assert_rows_match(engine.forward_logits(INPUT_IDS[:2], ["acme/a"] * 2), peft_logits(second, INPUT_IDS[:2]), "alpha 2")


def test_delete_zeroes_the_slot_and_touches_nothing_else(variants, base_logits, engine_factory):
    engine = engine_factory(num_slots=3)
    names = {"acme/a": "r16", "acme/b": "qkvo", "acme/c": "rslora-patterns"}
    for adapter, variant in names.items():
        engine.register_adapter(adapter, variants[variant][0])
    slots = {adapter: engine.warm(adapter) for adapter in names}
    doomed = slots["acme/b"]
    before = {slot: _slot_rows(engine, slot) for slot in range(engine.residency.pool.num_slots + 1)}
    assert any(a.any() or b.any() for a, b in before[doomed].values())
    assert not any(a.any() or b.any() for a, b in before[BASE_SLOT].values())

    engine.delete_adapter("acme/b")

    assert engine.residency.placement("acme/b") is None and engine.residency.warm_versions().get("acme/b") is None
    for name, (lora_a, lora_b) in _slot_rows(engine, doomed).items():
        assert not lora_a.any() and not lora_b.any(), f"{name}: deleted slot {doomed} not zeroed"
    for slot in range(engine.residency.pool.num_slots + 1):
        if slot != doomed:
            for name, (lora_a, lora_b) in _slot_rows(engine, slot).items():
                assert torch.equal(lora_a, before[slot][name][0]) and torch.equal(lora_b, before[slot][name][1]), (slot, name)
    with pytest.raises(AdapterNotFoundError):
        engine.submit(request("hi", "acme/b"))
    adapters = ["acme/a", "acme/c", None]
    logits = engine.forward_logits(INPUT_IDS[:3], adapters)
    assert_rows_match(logits, expected_rows(["r16", "rslora-patterns", None], variants, base_logits), "survivors")

    # The freed slot serves a new adapter cleanly.
    engine.register_adapter("acme/d", variants["r1"][0])
    assert engine.warm("acme/d") == doomed
    _assert_slot_holds_only(engine, doomed, variants["r1"][0])
    logits = engine.forward_logits(INPUT_IDS[:2], ["acme/d", "acme/a"])
    assert_rows_match(logits, expected_rows(["r1", "r16"], variants, base_logits), "after reuse")


# ---- generation --------------------------------------------------------------------------------

# (adapter seed or None for the base model, prompt, max_tokens): seeds and prompts picked so
# that the tiny random model writes varied printable text rather than one repeated byte.
GENERATION_ROWS = [
    (2, "xyz 123", 16),
    (13, "Hello there", 16),
    (21, "a", 14),
    (25, "Once upon a time", 12),
    (None, "The quick brown fox", 10),
]


def test_greedy_generation_matches_peft_generate_per_row(tmp_path):
    base = load_base_model(TINY)
    tokenizer = base.tokenizer
    prompts = [tokenizer.encode(prompt, add_special_tokens=False) for _, prompt, _ in GENERATION_ROWS]
    assert len({len(ids) for ids in prompts}) == len(prompts)  # different lengths: left padding matters
    folders = {
        seed: make_peft_adapter(tmp_path / f"gen{seed}", seed=seed, target_modules=QKVO)
        for seed, _, _ in GENERATION_ROWS
        if seed is not None
    }

    def reference(seed, ids, max_tokens, eos):
        model = fresh_tiny_model() if seed is None else PeftModel.from_pretrained(fresh_tiny_model(), folders[seed])
        input_ids = torch.tensor([ids])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        return out[0, len(ids) :].tolist()

    # The tiny model ties its embeddings and zeroes the pad row, which is its eos (<|im_end|>), so
    # it never writes eos on its own. Add a second eos id: a token the first row writes after a
    # few others and no other row writes, so one row stops at eos while the others run on.
    plain = [reference(seed, ids, n, [tokenizer.eos_token_id]) for (seed, _, n), ids in zip(GENERATION_ROWS, prompts)]
    others = {token for tokens in plain[1:] for token in tokens}
    stop_token = next((t for i, t in enumerate(plain[0]) if i >= 4 and t not in plain[0][:i] and t not in others), None)
    assert stop_token is not None, f"no usable stop token in the first row's output {plain[0]}"
    eos = [tokenizer.eos_token_id, stop_token]
    base.model.generation_config.eos_token_id = eos
    expected = [reference(seed, ids, n, eos) for (seed, _, n), ids in zip(GENERATION_ROWS, prompts)]
    assert expected[0][-1] == stop_token and 5 <= len(expected[0]) < GENERATION_ROWS[0][2]
    for tokens, (_, _, max_tokens) in zip(expected[1:], GENERATION_ROWS[1:]):
        assert len(tokens) == max_tokens
    assert len({tuple(tokens) for tokens in expected}) == len(expected)  # every adapter writes its own text

    config = EngineConfig(base_model="tiny-random-llama", compile="off", num_slots=4, max_num_seqs=8, max_seq_len=64, batch_wait_ms=500)
    engine = Engine(config, base=base)
    try:
        for seed, folder in folders.items():
            engine.register_adapter(f"gen/{seed}", folder)
        handles = [
            engine.submit(request(None, None if seed is None else f"gen/{seed}", prompt_ids=ids, max_tokens=n))
            for (seed, _, n), ids in zip(GENERATION_ROWS, prompts)
        ]
        results = [handle.result() for handle in handles]
        assert engine.stats()["peak_rows"] == len(GENERATION_ROWS)  # one mixed batch: four adapters and a base row
    finally:
        engine.close()

    for row, (result, tokens) in enumerate(zip(results, expected)):
        stopped = tokens[-1] in eos
        text = tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=True)
        assert result.text == text, f"row {row}"
        assert result.completion_tokens == len(tokens), f"row {row}"
        assert result.finish_reason == ("stop" if stopped else "length"), f"row {row}"
        assert result.prompt_tokens == len(prompts[row])
