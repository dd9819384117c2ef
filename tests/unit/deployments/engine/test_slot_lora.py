"""Every way `SlotLoraLinear` computes its delta gives each row its own slot's LoRA: the dense and
grouped decode kernels and the per-row loop of a prefill, against `x @ A.T @ B` row by row."""

import pytest
import torch

from deployments.engine.slot_lora import SlotContext, SlotLoraLinear

SLOTS, RANK, IN_FEATURES, OUT_FEATURES = 5, 4, 16, 12  # grouped_mm wants 16-byte strides


def _layer(kernel: str) -> SlotLoraLinear:
    generator = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(IN_FEATURES, OUT_FEATURES, bias=True)
    layer = SlotLoraLinear(base, SlotContext(SLOTS, RANK, kernel), SLOTS, RANK)
    with torch.no_grad():
        layer.lora_a[1:] = torch.randn(SLOTS - 1, RANK, IN_FEATURES, generator=generator)
        layer.lora_b[1:] = torch.randn(SLOTS - 1, RANK, OUT_FEATURES, generator=generator)
    return layer


def _expected(layer: SlotLoraLinear, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    rows = [layer.base(x[row]) + x[row] @ layer.lora_a[slot].t() @ layer.lora_b[slot] for row, slot in enumerate(slots)]
    return torch.stack(rows)


@pytest.mark.parametrize("kernel", ["dense", "grouped"])
@pytest.mark.parametrize("tokens, loop_rows", [(1, False), (5, False), (5, True)], ids=["decode", "prefill", "eager-prefill"])
@pytest.mark.parametrize("slots", [[3, 0, 1, 3, 4, 2], [0, 0], [2]], ids=["mixed", "base-only", "one-row"])
def test_each_row_gets_its_own_slot(kernel, tokens, loop_rows, slots):
    layer = _layer(kernel)
    x = torch.randn(len(slots), tokens, IN_FEATURES, generator=torch.Generator().manual_seed(1))
    layer.context.set(torch.tensor(slots), tokens, torch.float32, loop_rows)
    assert (layer.context.row_slots is not None) == loop_rows
    with torch.no_grad():
        actual = layer(x)
    torch.testing.assert_close(actual, _expected(layer, x, slots), rtol=1e-5, atol=1e-5)
    if any(slots):
        assert not torch.allclose(actual, layer.base(x)), "the adapters' delta is missing"
