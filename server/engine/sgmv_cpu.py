"""The grouped LoRA kernel compiled from C for float32 batches on the CPU (``sgmv_cpu.c``).

The ``grouped`` LoRA backend (lora/grouped.py) computes it with PyTorch ops: per fused
projection a gather, a batched matmul down, one up per part, a cat and an add. At decode sizes
the factors are small matrices and every one of those ops pays a fixed dispatch and set-up cost,
so the step spent more time on that than on reading the factors. The C form does a projection in
one call, four rows per tile, split over PyTorch's own OpenMP threads. Measured on the 2-core CI
machine (120 projections of the embedded model, rank-16 all-linear adapters; scratch benchmark):

    rows x adapters      PyTorch ops      compiled
        1 x 1              4.4 ms          1.8 ms
       16 x 4             13.6 ms          5.5 ms
       64 x 4             17.1 ms          9.5 ms

How it is built (``cpu_build.py``): on first use the C source is compiled with the system C
compiler (``$CC``, else ``cc``; AVX2, FMA and OpenMP) into ``<cache_dir>/kernels/`` (only when that
directory is ours and not writable by others; else a temporary directory of the process's own)
under a name made from a hash of the source and flags, then loaded with ctypes and checked once
against the dense formula on random inputs. ``add`` checks every shape and row count first: the C code trusts its indices.
Without a compiler, on a CPU without AVX2/FMA, or if that check fails, ``load`` returns None and
``--lora-backend auto`` picks ``grouped``'s PyTorch ops: same results, slower. The backend that
calls it is ``compiled-cpu`` (lora/compiled_cpu.py). ``configure("off")`` turns the compiled
kernels off for what is built next (tests; ``quant_cpu`` follows it too).

The library links ``libgomp.so.1``; PyTorch's CPU wheels load one under the same name first, so
the kernel runs on PyTorch's thread pool, with ``torch.get_num_threads()`` threads (passed on each
call: OpenMP keeps that count per calling thread). The ctypes call releases the GIL while it runs.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from server.engine import cpu_build

log = logging.getLogger(__name__)

CpuKernelMode = Literal["auto", "off"]
SOURCE = Path(__file__).with_name("sgmv_cpu.c")
FLAGS = cpu_build.AVX2_FLAGS

_settings: dict[str, object] = {"mode": "auto", "cache_dir": Path("~/.cache/loraplex").expanduser()}


def configure(mode: CpuKernelMode, cache_dir: Path | None = None) -> None:
    """Choose whether the compiled kernels may be used from now on (``auto``: where they build;
    backends and layers keep what they were built with) and where they are compiled to."""
    if mode not in ("auto", "off"):
        raise ValueError(f"unknown cpu kernel mode {mode!r}: choose auto or off")
    _settings["mode"] = mode
    if cache_dir is not None:
        _settings["cache_dir"] = Path(cache_dir).expanduser()


def current() -> tuple[CpuKernelMode, Path]:
    """The configured mode and cache directory (other compiled kernels follow the same settings)."""
    return _settings["mode"], _settings["cache_dir"]  # type: ignore[return-value]


def load() -> CompiledSgmv | None:
    """The compiled kernel, or None when it is turned off or cannot be built here (see above)."""
    if _settings["mode"] == "off":
        return None
    return _build(_settings["cache_dir"])  # type: ignore[arg-type]


def load_for(device: torch.device | str, dtype: torch.dtype) -> CompiledSgmv | None:
    """The compiled kernel for a backend built now on this device and dtype (float32 on the CPU
    only), or None."""
    return load() if torch.device(device).type == "cpu" and dtype == torch.float32 else None


class _Groups(ctypes.Structure):
    _fields_ = [
        ("num_groups", ctypes.c_int64),
        ("group_start", ctypes.c_void_p),
        ("rows", ctypes.c_void_p),
        ("row_weight", ctypes.c_void_p),
    ]


class _Factors(ctypes.Structure):
    _fields_ = [
        ("k", ctypes.c_int64),
        ("R", ctypes.c_int64),
        ("num_parts", ctypes.c_int64),
        ("A", ctypes.c_void_p),
        ("part_col", ctypes.c_void_p),
        ("part_width", ctypes.c_void_p),
        ("part_rank", ctypes.c_void_p),
        ("part_r", ctypes.c_void_p),
        ("part_B", ctypes.c_void_p),
    ]


class GroupsPlan:
    """The batch's rows grouped by adapter, as the C kernel reads them (built once per batch
    composition; the tensors it points into live as long as the plan)."""

    def __init__(self, members: Sequence[Sequence[int]], weights: Sequence[float] | None, seq: int) -> None:
        """``members[g]``: the batch rows of group g; ``weights``: each member's factor (member
        order), None for all 1; ``seq``: tokens per row (row i's tokens are x rows i*seq ...)."""
        starts = [0]
        rows: list[int] = []
        for group in members:
            rows.extend(row * seq + t for row in group for t in range(seq))
            starts.append(len(rows))
        self.num_rows = (
            max((row for group in members for row in group), default=-1) + 1
        ) * seq  # x, y need as many
        self._starts = torch.tensor(starts, dtype=torch.int64)
        self._rows = torch.tensor(rows, dtype=torch.int64)
        self._weight = (
            None
            if weights is None
            else torch.tensor([w for w in weights for _ in range(seq)], dtype=torch.float32)
        )
        self.struct = _Groups(
            len(members),
            self._starts.data_ptr(),
            self._rows.data_ptr(),
            None if self._weight is None else self._weight.data_ptr(),
        )


BLOCK = 16  # columns per packed block (BLOCK in sgmv_cpu.c)


def pack_blocks(matrix: torch.Tensor) -> torch.Tensor:
    """[L, rows, cols] -> [L, ceil(cols / BLOCK), rows, BLOCK], zero-padded: each block of BLOCK
    columns contiguous, the layout the C kernel streams."""
    L, rows, cols = matrix.shape
    padded = torch.nn.functional.pad(matrix, (0, -cols % BLOCK))
    return padded.view(L, rows, -1, BLOCK).permute(0, 2, 1, 3).contiguous()


class FactorsPlan:
    """One projection's factors for the batch's groups, packed as the C kernel reads them (built
    once per batch composition and adapter contents, like the PyTorch form's factors)."""

    def __init__(self, A: torch.Tensor, parts: Sequence[tuple[int, int, int, int, torch.Tensor]]) -> None:
        """``A``: [L, k, R] float32; ``parts``: (first output column, width, first rank column of
        h, rank, B [L, r, width] float32) per part."""
        tensors = [A, *(p[4] for p in parts)]
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
            raise ValueError("the compiled kernel reads float32 CPU factors")
        packed_A = pack_blocks(A)  # [L, R/16, k, 16]
        packed_B = [pack_blocks(p[4]) for p in parts]  # [L, d/16, r, 16] each
        self._tensors = [packed_A, *packed_B]  # kept alive: the struct holds their addresses
        self._meta = [torch.tensor([p[i] for p in parts], dtype=torch.int64) for i in range(4)]
        self._b_pointers = (ctypes.c_void_p * len(parts))(*(b.data_ptr() for b in packed_B))
        self.width = max(p[0] + p[1] for p in parts)
        self.k = int(A.shape[1])
        self.struct = _Factors(
            self.k,
            int(packed_A.shape[1]) * BLOCK,
            len(parts),
            packed_A.data_ptr(),
            *(m.data_ptr() for m in self._meta),
            ctypes.cast(self._b_pointers, ctypes.c_void_p),
        )


class CompiledSgmv:
    """The loaded library: ``add`` is the grouped kernel's update for one projection."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = library.lora_grouped_add
        self._fn.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
            ctypes.POINTER(_Groups), ctypes.POINTER(_Factors), ctypes.c_int,
        ]  # fmt: skip
        self._fn.restype = ctypes.c_int

    def add(self, x: torch.Tensor, y: torch.Tensor, groups: GroupsPlan, factors: FactorsPlan) -> None:
        """``y[rows] += update(x[rows])`` in place. x: [N, k] float32 CPU with unit column stride;
        y: [N, >= factors.width] float32 CPU with unit column stride (a column slice is fine)."""
        fits = all(t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(1) == 1 for t in (x, y))
        fits = fits and x.shape[1] == factors.k and y.shape[1] >= factors.width
        if not fits or min(x.shape[0], y.shape[0]) < groups.num_rows:  # the C code trusts every index
            raise ValueError(
                f"compiled LoRA kernel: x {tuple(x.shape)} / y {tuple(y.shape)} do not fit "
                f"{groups.num_rows} rows of {factors.k} -> {factors.width} columns"
            )
        status = self._fn(
            x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), ctypes.byref(groups.struct),
            ctypes.byref(factors.struct), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("compiled LoRA kernel: out of memory for its work buffers")


def _agrees_with_reference(kernel: CompiledSgmv) -> bool:
    """One random problem with ragged groups, padding tiles, two parts and row weights, against
    the dense formula."""
    gen = torch.Generator().manual_seed(0)
    rows, k, widths, ranks, num_groups = 11, 40, (24, 9), (8, 5), 3
    x = torch.randn(rows, k, generator=gen)
    A = torch.randn(num_groups, k, sum(ranks), generator=gen)
    Bs = [torch.randn(num_groups, r, d, generator=gen) for r, d in zip(ranks, widths, strict=True)]
    members = [[0, 3, 4, 6, 7, 10], [2], [8, 1, 5]]  # row 9 has no adapter
    weights = [0.5 + i / 10 for i in range(10)]
    y = torch.randn(rows, sum(widths), generator=gen)
    expected = y.clone()
    flat = [row for group in members for row in group]
    for g, group in enumerate(members):
        for row in group:
            h = x[row] @ A[g] * weights[flat.index(row)]
            expected[row, : widths[0]] += h[: ranks[0]] @ Bs[0][g]
            expected[row, widths[0] :] += h[ranks[0] :] @ Bs[1][g]
    parts = [(0, widths[0], 0, ranks[0], Bs[0]), (widths[0], widths[1], ranks[0], ranks[1], Bs[1])]
    kernel.add(x, y, GroupsPlan(members, weights, 1), FactorsPlan(A, parts))
    return torch.allclose(y, expected, rtol=1e-4, atol=1e-4)


@functools.cache
def _build(cache_dir: Path) -> CompiledSgmv | None:
    return _build_and_check(cache_dir)


def _build_and_check(cache_dir: Path) -> CompiledSgmv | None:
    return cpu_build.load_checked(
        "sgmv_cpu", SOURCE, cache_dir, "compiled LoRA kernel", CompiledSgmv, _agrees_with_reference, FLAGS
    )
