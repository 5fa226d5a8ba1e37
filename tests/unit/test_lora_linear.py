"""LoRA-aware linear layer against the dense reference y = (W + s·B·A) x, row by row."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server.engine.lora import BASE_SLOT, LoraBatchContext, RowGroups
from server.engine.lora_linear import LoraLinear
from tests.lora_backends import LORA_BACKENDS, lora_backend


def _layer(ctx: LoraBatchContext, k: int = 24, d: int = 40, backend: str = "grouped") -> LoraLinear:
    torch.manual_seed(0)
    return LoraLinear(nn.Linear(k, d, bias=True), k, d, ctx, lora_backend(backend))


def _factors(seed: int, r: int, k: int = 24, d: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, k, generator=g), torch.randn(d, r, generator=g)


@pytest.mark.parametrize("backend", LORA_BACKENDS)
@pytest.mark.parametrize("seq_len", [1, 5])
def test_each_row_equals_dense_reference(backend: str, seq_len: int) -> None:
    ctx = LoraBatchContext()
    layer = _layer(ctx, backend=backend)
    adapters = {
        0: (*_factors(1, 4), 2.0),
        1: (*_factors(2, 8), 0.5),
        3: (*_factors(3, 2), 1.5),
    }  # ranks differ
    for slot, (A, B, s) in adapters.items():
        layer.set_slot(slot, A, B, s)
    row_slots = [0, BASE_SLOT, 1, 3, 0, BASE_SLOT, 3]
    x = torch.randn(len(row_slots), seq_len, 24)  # x: [B, T, k]
    ctx.set_rows(row_slots, "cpu")
    y = layer(x)
    W, bias = layer.base.weight, layer.base.bias
    for i, slot in enumerate(row_slots):
        dense = W if slot == BASE_SLOT else W + adapters[slot][2] * adapters[slot][1] @ adapters[slot][0]
        torch.testing.assert_close(y[i], x[i] @ dense.T + bias, rtol=1e-5, atol=1e-5)


def test_no_adapter_rows_leave_output_untouched() -> None:
    ctx = LoraBatchContext()
    layer = _layer(ctx)
    layer.set_slot(0, *_factors(1, 4), 1.0)
    x = torch.randn(3, 2, 24)
    ctx.set_rows([BASE_SLOT] * 3, "cpu")
    assert torch.equal(layer(x), layer.base(x))


def test_slot_reuse_and_clear() -> None:
    ctx = LoraBatchContext()
    layer = _layer(ctx)
    A1, B1 = _factors(1, 8)
    A2, B2 = _factors(2, 2)
    layer.set_slot(0, A1, B1, 1.0)
    x = torch.randn(1, 1, 24)
    ctx.set_rows([0], "cpu")
    first = layer(x)
    layer.set_slot(0, A2, B2, 3.0)  # smaller rank into the same slot: old columns must be zeroed
    torch.testing.assert_close(layer(x)[0], x[0] @ (layer.base.weight + 3.0 * B2 @ A2).T + layer.base.bias)
    assert not torch.allclose(first, layer(x))
    layer.clear_slot(0)
    assert torch.equal(layer(x), layer.base(x))
    torch.testing.assert_close(layer.delta_weight(0), torch.zeros(40, 24))


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_row_mask_follows_row_changes(backend: str) -> None:
    ctx = LoraBatchContext()
    layer = _layer(ctx, backend=backend)
    A, B = _factors(1, 4)
    layer.set_slot(0, A, B, 1.0)
    x = torch.randn(2, 1, 24)
    ctx.set_rows([0, BASE_SLOT], "cpu")
    y1 = layer(x)
    ctx.set_rows([BASE_SLOT, 0], "cpu")
    y2 = layer(x)
    torch.testing.assert_close(y1[0], y2[1] + (x[0] - x[1]) @ (layer.base.weight + B @ A).T)
    torch.testing.assert_close(y2[0], layer.base(x[0]))


# (row slots, row scales, how the grouped kernel reads them: scattered / block / padded block / identity)
GROUPED_LAYOUTS = {
    "scattered": ([0, BASE_SLOT, 1, 0, 1], None),
    "block": ([BASE_SLOT, 0, 0, 1, 1], None),
    "padded-block": ([BASE_SLOT, BASE_SLOT, 0, 0, 0, 1], None),
    "scaled-block": ([0, 0, 1, 1], [0.5, 1.0, 0.0, -2.0]),
    "identity": ([1, 1, 1], None),
    "one-adapter-after-base": ([BASE_SLOT, 1, 1], None),
}


@pytest.mark.parametrize("layout", GROUPED_LAYOUTS)
@pytest.mark.parametrize("seq_len", [1, 3])
def test_grouped_kernel_reads_every_row_layout_right(layout: str, seq_len: int) -> None:
    """The grouped kernel's four ways to read rows (gather + scatter, views, views + unpad, plain
    matmuls) each equal the dense reference, and each layout takes the way meant for it."""
    row_slots, scales = GROUPED_LAYOUTS[layout]
    groups = RowGroups.build(row_slots, scales, "cpu")
    assert (groups.start is None) == (layout == "scattered")
    assert (groups.unpad is not None) == (layout == "padded-block")
    assert groups.identity == (layout == "identity")
    ctx = LoraBatchContext()
    layer = _layer(ctx, backend="grouped")  # the PyTorch form: the compiled one reads no views
    adapters = {0: (*_factors(1, 4), 2.0), 1: (*_factors(2, 8), 0.5)}
    for slot, (A, B, s) in adapters.items():
        layer.set_slot(slot, A, B, s)
    x = torch.randn(len(row_slots), seq_len, 24)  # x: [B, T, k]
    ctx.set_rows(row_slots, "cpu", scales)
    y = layer(x)
    W, bias = layer.base.weight, layer.base.bias
    for i, slot in enumerate(row_slots):
        c = 1.0 if scales is None else scales[i]
        dense = W if slot == BASE_SLOT else W + c * adapters[slot][2] * adapters[slot][1] @ adapters[slot][0]
        torch.testing.assert_close(y[i], x[i] @ dense.T + bias, rtol=1e-5, atol=1e-5)
