"""The compiled linear kernel (server/engine/gemv_cpu.py) against F.linear.

The runner-level tests (HF logits, PEFT, merges) run it through the ``blocked`` weight layout;
these cover the shapes its blocking has to get right: output widths that are not multiples of its
16-column blocks, every row-tile size (1 to 6 rows, and several tiles), odd input widths, a bias,
an output that is a column slice of a wider tensor, accumulation, and refused shapes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from server.engine import cpu_build, gemv_cpu


@pytest.fixture(scope="module")
def kernel() -> gemv_cpu.CompiledGemv:
    built = gemv_cpu.load()
    assert built is not None, "CI's machine has a C compiler (make setup) and AVX2/FMA"
    return built


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 13, 64])
@pytest.mark.parametrize(("k", "out"), [(1, 1), (37, 21), (64, 48), (576, 960), (19, 5), (33, 17)])
def test_linear_equals_f_linear_on_ragged_shapes(kernel, rows: int, k: int, out: int) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + k * 10 + out)
    x = torch.randn(rows, k, generator=gen)
    weight = torch.randn(out, k, generator=gen)
    bias = torch.randn(out, generator=gen)
    packed = gemv_cpu.pack(weight)
    assert packed.shape == (-(-out // 16), k, 16)
    torch.testing.assert_close(kernel.linear(x, packed, out), F.linear(x, weight), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        kernel.linear(x, packed, out, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-4
    )


def test_output_slices_and_accumulation_leave_other_columns_alone(kernel) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 40, generator=gen)[:, 3:38]  # rows with a stride wider than their width
    weight = torch.randn(21, 35, generator=gen)
    bias = torch.randn(21, generator=gen)
    wide = torch.randn(4, 30, generator=gen)
    expected = wide.clone()
    expected[:, 4:25] += F.linear(x, weight, bias)
    kernel.linear(x, gemv_cpu.pack(weight), 21, bias, out=wide[:, 4:25], accumulate=True)
    torch.testing.assert_close(wide, expected, rtol=1e-5, atol=1e-4)
    expected[:, 4:25] = F.linear(x, weight)
    kernel.linear(x, gemv_cpu.pack(weight), 21, out=wide[:, 4:25])
    torch.testing.assert_close(wide, expected, rtol=1e-5, atol=1e-4)


def test_pack_unpack_and_row_reads_are_exact() -> None:
    weight = torch.randn(37, 11)
    packed = gemv_cpu.pack(weight)
    assert torch.equal(gemv_cpu.unpack(packed, 37), weight)
    assert torch.equal(packed[-1, :, 5:], torch.zeros(11, 11))  # the last block's padding columns
    index = torch.tensor([0, 36, 15, 16, 15])
    assert torch.equal(gemv_cpu.packed_rows(packed, index), weight[index])


def test_shapes_that_do_not_fit_are_refused_before_the_c_code_runs(kernel) -> None:
    packed = gemv_cpu.pack(torch.randn(20, 8))
    bad = {
        "wrong input width": dict(x=torch.randn(2, 9)),
        "too many outputs for the blocks": dict(out_features=33),
        "too few outputs for the blocks": dict(out_features=16),
        "float64": dict(x=torch.randn(2, 8, dtype=torch.float64)),
        "an out tensor of the wrong shape": dict(out=torch.empty(3, 20)),
        "a column-strided input": dict(x=torch.randn(8, 2).t()),
        "a bias of the wrong size": dict(bias=torch.randn(19)),
    }
    for why, change in bad.items():
        args = dict(x=torch.randn(2, 8), packed=packed, out_features=20) | change
        with pytest.raises(ValueError, match="compiled linear kernel"):
            kernel.linear(**args)
        assert why
    with pytest.raises(ValueError, match="accumulate needs an out"):
        kernel.linear(torch.randn(2, 8), packed, 20, accumulate=True)


def test_a_compiler_that_fails_leaves_pytorch_ops(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CC", "false")  # exists, always exits 1
    assert cpu_build.compile_library("gemv_cpu", gemv_cpu.SOURCE, tmp_path, "test") is None
    assert gemv_cpu._build_and_check(tmp_path) is None
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert cpu_build.compile_library("gemv_cpu", gemv_cpu.SOURCE, tmp_path, "test") is None
    assert gemv_cpu._build_and_check(tmp_path) is None
