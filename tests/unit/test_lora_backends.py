"""The LoRA backends on fused projections against the dense reference, and the compiled one's
loading (server/engine/lora/compiled_cpu.py, server/engine/sgmv_cpu.py).

The engine-level tests (PEFT, solo = mixed) run every backend through tests/lora_backends.py;
these cover the shapes the compiled kernel's blocking has to get right (and hold the other
backends to the same): partial row tiles, ranks and widths that are not multiples of its
16-column blocks, row scales, several tokens per row, an output that is a column slice of a wider
tensor, and parts an adapter skips.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from server.engine import cpu_build, sgmv_cpu
from server.engine.lora import BASE_SLOT, LoraBatchContext, LoraProjection, LoraSlotBank, choose_backend
from server.engine.lora.compiled_cpu import CompiledCpuBackend
from server.engine.lora.slot_layouts import slot_factors
from server.engine.native.graphed import graph_lora_form
from tests.lora_backends import LORA_BACKENDS, lora_backend


def _can_build_here() -> bool:
    return shutil.which("cc") is not None and cpu_build.cpu_supports_avx2_fma()


def test_the_compiled_kernel_loads_wherever_it_can_be_built() -> None:
    """On a machine with a C compiler and AVX2/FMA (CI's) ``--lora-backend auto`` picks the
    compiled backend on the CPU in float32, and grouped for other dtypes; where the kernel is off
    (or cannot build) auto picks grouped and asking for compiled-cpu says what to use instead."""
    cpu = torch.device("cpu")
    sgmv_cpu.configure("auto")
    assert (sgmv_cpu.load() is not None) == _can_build_here()
    assert CompiledCpuBackend.serves(cpu, torch.float32) == _can_build_here()
    assert not CompiledCpuBackend.serves(cpu, torch.bfloat16)
    assert choose_backend("auto", cpu, torch.float32).name == (
        "compiled-cpu" if _can_build_here() else "grouped"
    )
    assert choose_backend("auto", cpu, torch.bfloat16).name == "grouped"
    assert not choose_backend("auto", cpu, torch.float32).wants_sorted_rows or not _can_build_here()
    sgmv_cpu.configure("off")
    assert sgmv_cpu.load() is None
    assert choose_backend("auto", cpu, torch.float32).name == "grouped"
    with pytest.raises(ValueError, match="use --lora-backend grouped"):
        choose_backend("compiled-cpu", cpu, torch.float32)
    with pytest.raises(ValueError, match="unknown LoRA backend 'gather_bmm'"):
        choose_backend("gather_bmm", cpu, torch.float32)
    with pytest.raises(ValueError, match="auto or off"):
        sgmv_cpu.configure("on")  # type: ignore[arg-type]


def test_a_compiler_that_fails_leaves_the_pytorch_form(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CC", "false")  # exists, always exits 1
    assert cpu_build.compile_library("sgmv_cpu", sgmv_cpu.SOURCE, tmp_path, "test") is None
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert cpu_build.compile_library("sgmv_cpu", sgmv_cpu.SOURCE, tmp_path, "test") is None


def _bank(k: int, d: int, slots: dict[int, tuple[int, int, float]]) -> LoraSlotBank:
    """A bank with, per slot, random factors of (rank, seed) and a scale."""
    bank = LoraSlotBank(k, d, torch.float32, torch.device("cpu"))
    for slot, (rank, seed, scale) in slots.items():
        g = torch.Generator().manual_seed(seed)
        bank.set_slot(slot, torch.randn(rank, k, generator=g), torch.randn(d, rank, generator=g), scale)
    return bank


# (row slots, row scales, tokens per row)
BATCHES = {
    "one-row": ([1], None, 1),
    "one-adapter-every-row": ([0] * 9, None, 1),
    "ragged-groups-and-base": ([0, BASE_SLOT, 1, 0, 2, 0, 0, 1, BASE_SLOT, 0, 2], None, 1),
    "scaled-rows": ([2, 0, 2, 1, 0], [0.5, -1.0, 0.0, 2.0, 1.0], 1),
    "prefill-tokens": ([1, 0, BASE_SLOT, 1], None, 7),
}


@pytest.mark.parametrize("backend", LORA_BACKENDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("k", "widths", "ranks"), [(24, (40, 9), (4, 8)), (37, (16, 100, 7), (16, 5, 24))])
def test_backend_equals_the_dense_reference(backend: str, batch: str, k: int, widths, ranks) -> None:
    """Parts of a fused output, each with its own slots (slot 2 skips the first part, slot 1 the
    last), into a column slice of a wider output; every row against ``y + c · s · B A x``."""
    if backend == "compiled-cpu" and not _can_build_here():
        pytest.fail("this test needs a C compiler and an AVX2/FMA CPU, as CI has")
    row_slots, scales, seq = BATCHES[batch]
    banks, spans, start = [], [], 0
    for p, (width, rank) in enumerate(zip(widths, ranks, strict=True)):
        slots = {
            0: (rank, 10 * p, 2.0),
            1: (max(1, rank - 3), 10 * p + 1, 0.5),
            2: (rank + 1, 10 * p + 2, -1.5),
        }
        if p == 0:
            del slots[2]
        if p == len(widths) - 1:
            del slots[1]
        banks.append(_bank(k, width, slots))
        spans.append((start, start + width))
        start += width
    lora = LoraProjection(banks, spans, lora_backend(backend))
    ctx = LoraBatchContext()
    ctx.set_rows(row_slots, "cpu", scales)
    x = torch.randn(len(row_slots), seq, k)  # x: [B, T, k]
    wide = torch.randn(len(row_slots) * seq, 3 + start + 5)
    before = wide.clone()
    lora.add_delta(x, wide[:, 3 : 3 + start], ctx)  # y: a column slice, row stride wider than it
    expected = before.clone()
    for i, slot in enumerate(row_slots):
        if slot == BASE_SLOT:
            continue
        c = 1.0 if scales is None else scales[i]
        for bank, (s, e) in zip(banks, spans, strict=True):
            if slot in bank.occupied:
                delta = c * bank.delta_weight(slot)  # [d, k]
                expected[i * seq : (i + 1) * seq, 3 + s : 3 + e] += x[i] @ delta.T
    torch.testing.assert_close(wide, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(wide[:, :3], before[:, :3]) and torch.equal(
        wide[:, 3 + start :], before[:, 3 + start :]
    )


def _expected(y: torch.Tensor, x: torch.Tensor, row_slots, banks, spans) -> torch.Tensor:
    """y + each row's s · B A x over the parts its slot adapts (x: [B, 1, k], y: [B, D])."""
    expected = y.clone()
    for i, slot in enumerate(row_slots):
        for bank, (s, e) in zip(banks, spans, strict=True):
            if slot != BASE_SLOT and slot in bank.occupied:
                expected[i, s:e] += x[i, 0] @ bank.delta_weight(slot).T
    return expected


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_slot_layouts_follow_batch_compositions_and_slot_changes(backend: str) -> None:
    """Mixed ranks 2-16 in one bank (a rank-16 slot pads the bank, the others keep their rank),
    batches of changing compositions, a slot refilled with another rank and one emptied, and a slot
    past this projection's banks (an adapter of other layers only): every row equals the dense
    reference after each change, whatever the backend keeps per slot."""
    if backend == "compiled-cpu" and not _can_build_here():
        pytest.fail("this test needs a C compiler and an AVX2/FMA CPU, as CI has")
    k, widths = 20, (18, 33)
    banks = [
        _bank(k, widths[0], {0: (2, 1, 1.0), 1: (16, 2, 0.5), 2: (5, 3, 2.0), 4: (9, 4, -1.0)}),
        _bank(k, widths[1], {0: (3, 5, 1.0), 2: (8, 6, 1.5), 3: (16, 7, 0.25)}),
    ]
    spans = [(0, widths[0]), (widths[0], sum(widths))]
    lora = LoraProjection(banks, spans, lora_backend(backend))
    ctx = LoraBatchContext()
    compositions = [[0, 1, 2, 0], [4, 2, 3, 3, BASE_SLOT, 1], [1], [3, 0, 9, 2, 4, 1, 0], [9, BASE_SLOT]]
    for step, row_slots in enumerate(compositions * 2):
        if step == len(compositions):  # refill slot 2 at another rank, empty slot 4
            g = torch.Generator().manual_seed(99)
            banks[0].set_slot(
                2, torch.randn(12, k, generator=g), torch.randn(widths[0], 12, generator=g), 0.75
            )
            banks[1].set_slot(2, torch.randn(4, k, generator=g), torch.randn(widths[1], 4, generator=g), 3.0)
            banks[0].clear_slot(4)
            ctx.invalidate()
        ctx.set_rows(row_slots, "cpu")
        x = torch.randn(len(row_slots), 1, k)  # x: [B, 1, k]
        y = torch.randn(len(row_slots), sum(widths))
        expected = _expected(y, x, row_slots, banks, spans)
        lora.add_delta(x, y, ctx)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_compiled_backend_packs_a_slot_once_per_contents() -> None:
    """A new batch composition packs no factors; refilling a slot repacks that slot only."""
    if not _can_build_here():
        pytest.fail("this test needs a C compiler and an AVX2/FMA CPU, as CI has")
    k, d = 16, 24
    bank = _bank(k, d, {s: (4 + 4 * s, s, 1.0) for s in range(4)})
    lora = LoraProjection([bank], [(0, d)], lora_backend("compiled-cpu"))
    layouts = lora.state.layouts
    ctx = LoraBatchContext()
    x, y = torch.randn(4, 1, k), torch.zeros(4, d)
    for row_slots in ([0, 1, 2, 3], [3, 2], [1, 1, 0], [2, 0, 3, 1]):
        ctx.set_rows(row_slots, "cpu")
        lora.add_delta(x[: len(row_slots)], y[: len(row_slots)], ctx)
    assert layouts.rebuilt == 4
    bank.set_slot(1, torch.randn(7, k), torch.randn(d, 7), 2.0)
    ctx.invalidate()
    ctx.set_rows([1, 2], "cpu")
    y = torch.zeros(2, d)
    lora.add_delta(x[:2], y, ctx)
    assert layouts.rebuilt == 5
    torch.testing.assert_close(y, _expected(torch.zeros(2, d), x[:2], [1, 2], [bank], [(0, d)]))


def test_compiled_kernel_refuses_inputs_that_do_not_fit() -> None:
    if not _can_build_here():
        pytest.fail("this test needs a C compiler and an AVX2/FMA CPU, as CI has")
    lora = LoraProjection([_bank(8, 6, {0: (2, 1, 1.0)})], [(0, 6)], lora_backend("compiled-cpu"))
    ctx = LoraBatchContext()
    ctx.set_rows([0, 0], "cpu")
    with pytest.raises(ValueError, match="do not fit"):
        lora.add_delta(torch.randn(2, 1, 8), torch.zeros(2, 5), ctx)  # y narrower than the part
    ctx.set_rows([0, 0, 0, 0], "cpu")  # rows the tensors below do not have: refused, never read
    with pytest.raises(ValueError, match="do not fit"):
        lora.add_delta(torch.randn(2, 1, 8), torch.zeros(2, 6), ctx)


def test_graph_steps_take_a_graph_form_of_the_runners_backend() -> None:
    """Captured CUDA graphs keep the runner's backend only when it is graph_safe (its tensors keep
    their addresses), else use gathered; compiled steps use segmented (shapes follow the batch)."""
    cpu = torch.device("cpu")
    grouped, gathered = lora_backend("grouped"), lora_backend("gathered")
    assert graph_lora_form("cuda_graphs", gathered, cpu, torch.float32) is gathered
    assert graph_lora_form("cuda_graphs", grouped, cpu, torch.float32).name == "gathered"
    assert graph_lora_form("compile", grouped, cpu, torch.float32).name == "segmented"
    assert [b for b in LORA_BACKENDS if lora_backend(b).graph_safe] == ["gathered"]
    bank = _bank(8, 6, {0: (2, 1, 1.0)})
    ctx = LoraBatchContext()
    ctx.set_rows([0, BASE_SLOT], "cpu")
    with pytest.raises(NotImplementedError, match="grouped LoRA backend has no graph form"):
        grouped.step_part(bank, ctx)
    x = torch.randn(2, 8)
    rows, scales = ctx.row_slots, torch.ones(2)
    assert rows is not None
    for form in (gathered, graph_lora_form("compile", grouped, cpu, torch.float32)):
        delta = form.step_part(bank, ctx).delta(x, rows, scales)  # [2, 6]
        torch.testing.assert_close(delta[0], bank.delta_weight(0) @ x[0])
        torch.testing.assert_close(delta[1], torch.zeros(6))


@pytest.mark.parametrize(
    ("ranks", "widths"),
    [((64, 64, 16), (576, 192, 192)), ((12, 0, 4), (24, 9, 40)), ((32,), (20,))],
)
def test_a_plan_packed_straight_from_staged_factors_equals_the_first_use_one(ranks, widths) -> None:
    """The slot loader packs a slot from its staged factors (``SlotPlan.from_staged``); the plan is
    the one the first step would build from the banks, entry for entry (multiples of the 16-column
    blocks take the one-copy path, the others the padded one)."""
    k = 48
    g = torch.Generator().manual_seed(5)
    banks = [LoraSlotBank(k, d, torch.float32, torch.device("cpu")) for d in widths]
    staged = []
    for p, (r, d) in enumerate(zip(ranks, widths, strict=True)):
        if r == 0:
            continue
        A, B, scale = torch.randn(r, k, generator=g), torch.randn(d, r, generator=g), 0.3 + p
        banks[p].set_slot(2, A, B, scale)
        staged.append((p, A, B, torch.tensor(scale, dtype=torch.float32)))
    factors = slot_factors(banks, 2)
    assert factors is not None
    first_use = sgmv_cpu.SlotPlan(
        factors.A, [(q.index, q.rank_start, q.B) for q in factors.parts], len(banks)
    )
    direct = sgmv_cpu.SlotPlan.from_staged(staged, len(banks))
    assert direct.k == first_use.k and direct.widths == first_use.widths
    assert len(direct._tensors) == len(first_use._tensors)
    for ours, theirs in zip(direct._tensors, first_use._tensors, strict=True):
        assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    assert torch.equal(direct._rank_start, first_use._rank_start) and torch.equal(
        direct._rank, first_use._rank
    )
