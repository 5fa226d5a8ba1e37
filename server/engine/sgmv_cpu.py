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
        ("group_slot", ctypes.c_void_p),
    ]


class _Slot(ctypes.Structure):
    _fields_ = [
        ("R", ctypes.c_int64),
        ("A", ctypes.c_void_p),
        ("part_rank", ctypes.c_void_p),
        ("part_r", ctypes.c_void_p),
        ("part_B", ctypes.c_void_p),
    ]


class _Factors(ctypes.Structure):
    _fields_ = [
        ("k", ctypes.c_int64),
        ("num_parts", ctypes.c_int64),
        ("num_slots", ctypes.c_int64),
        ("part_col", ctypes.c_void_p),
        ("part_width", ctypes.c_void_p),
        ("slots", ctypes.c_void_p),
    ]


class GroupsPlan:
    """The batch's rows grouped by adapter slot, as the C kernel reads them (built once per batch
    composition; the tensors it points into live as long as the plan)."""

    def __init__(
        self,
        slots: Sequence[int],
        members: Sequence[Sequence[int]],
        weights: Sequence[float] | None,
        seq: int,
    ) -> None:
        """``slots[g]``: group g's slot; ``members[g]``: its batch rows; ``weights``: each member's
        factor (member order), None for all 1; ``seq``: tokens per row (row i's tokens are x rows
        i*seq ...)."""
        starts = [0]
        rows: list[int] = []
        for group in members:
            rows.extend(row * seq + t for row in group for t in range(seq))
            starts.append(len(rows))
        self.num_rows = (
            max((row for group in members for row in group), default=-1) + 1
        ) * seq  # x, y need as many
        self.max_slot = max(slots, default=-1)  # the factors need as many slots
        self._slots = torch.tensor(slots, dtype=torch.int64)
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
            self._slots.data_ptr(),
        )


BLOCK = 16  # columns per packed block (BLOCK in sgmv_cpu.c)


def pack_blocks(matrix: torch.Tensor) -> torch.Tensor:
    """[rows, cols] -> [ceil(cols / BLOCK), rows, BLOCK], zero-padded: each block of BLOCK columns
    contiguous, the layout the C kernel streams."""
    rows, cols = matrix.shape
    padded = torch.nn.functional.pad(matrix, (0, -cols % BLOCK))
    return padded.view(rows, -1, BLOCK).transpose(0, 1).contiguous()


def pack_row_blocks(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row blocks [r_i, k] stacked along the rank (R = Σ r_i), packed as :func:`pack_blocks` packs
    their transpose [k, R]: [ceil(R / BLOCK), k, BLOCK], where ``out[b, i, c] = rows[16b + c, i]``.
    One copy per entry (no transposed, concatenated or padded intermediate) when every r_i is a
    multiple of BLOCK, as ranks usually are; else through :func:`pack_blocks`."""
    if any(r.shape[0] % BLOCK for r in rows):
        return pack_blocks(torch.cat(list(rows)).t())
    k = int(rows[0].shape[1])
    out = rows[0].new_empty(sum(int(r.shape[0]) for r in rows) // BLOCK, k, BLOCK)
    block = 0
    for r in rows:
        n = int(r.shape[0]) // BLOCK
        out[block : block + n].copy_(r.unflatten(0, (n, BLOCK)).transpose(1, 2))  # [n, k, 16]
        block += n
    return out


def pack_scaled_columns(B: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """B [d, r] times ``scale`` (a 0-d tensor), packed as :func:`pack_blocks` packs (scale·B)ᵀ
    [r, d]: [ceil(d / BLOCK), r, BLOCK], in one pass (the product written into place) when d is a
    multiple of BLOCK; else through :func:`pack_blocks`."""
    d, r = B.shape
    if d % BLOCK:
        return pack_blocks((B.t() * scale).contiguous())
    out = B.new_empty(d // BLOCK, r, BLOCK)
    return torch.mul(B.unflatten(0, (d // BLOCK, BLOCK)).transpose(1, 2), scale, out=out)


class SlotPlan:
    """One slot's factors for one projection, packed as the C kernel reads them (built once, when
    the slot's contents change)."""

    def __init__(
        self, A: torch.Tensor, parts: Sequence[tuple[int, int, torch.Tensor]], num_parts: int
    ) -> None:
        """``A``: [k, R] float32; ``parts``: (part index, first rank column of h, B [r, d_p] float32,
        scaled) per part the slot adapts, of the projection's ``num_parts``."""
        tensors = [A, *(p[2] for p in parts)]
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
            raise ValueError("the compiled kernel reads float32 CPU factors")
        packed = [(index, start, pack_blocks(B), *map(int, B.shape)) for index, start, B in parts]
        self._build(pack_blocks(A), int(A.shape[0]), packed, num_parts)  # A: [R/16, k, 16]

    @classmethod
    def from_staged(
        cls, parts: Sequence[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]], num_parts: int
    ) -> SlotPlan:
        """The plan of a slot's factors as the banks hold them, packed straight from them:
        ``parts``: (part index, A [r, k], B [d_p, r], scale as a 0-d tensor) per part the slot
        adapts, in part order, float32 on the CPU. Equal to ``SlotPlan(Aᵀ concatenated, [(index,
        start, (scale·B)ᵀ)])``, with one copy of each factor instead of four."""
        tensors = [t for p in parts for t in p[1:]]
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
            raise ValueError("the compiled kernel reads float32 CPU factors")
        plan = cls.__new__(cls)
        packed, start = [], 0
        for index, A, B, scale in parts:
            packed.append((index, start, pack_scaled_columns(B, scale), int(A.shape[0]), int(B.shape[0])))
            start += int(A.shape[0])
        plan._build(pack_row_blocks([p[1] for p in parts]), int(parts[0][1].shape[1]), packed, num_parts)
        return plan

    def _build(
        self,
        packed_A: torch.Tensor,
        k: int,
        packed_parts: Sequence[tuple[int, int, torch.Tensor, int, int]],
        num_parts: int,
    ) -> None:
        """``packed_A``: [R/16, k, 16]; ``packed_parts``: (part index, first rank column of h,
        packed B [d_p/16, r, 16], r, d_p) per part."""
        self.k = k
        self.widths = {index: d for index, _, _, _, d in packed_parts}
        rank_start, rank = [0] * num_parts, [0] * num_parts
        B_pointers = [0] * num_parts
        packed_B = []
        for index, start, packed, r, _ in packed_parts:
            packed_B.append(packed)
            rank_start[index], rank[index], B_pointers[index] = start, r, packed.data_ptr()
        self._rank_start = torch.tensor(rank_start, dtype=torch.int64)
        self._rank = torch.tensor(rank, dtype=torch.int64)
        self._b_pointers = (ctypes.c_void_p * num_parts)(*B_pointers)
        self._tensors = [packed_A, *packed_B]  # kept alive: the struct holds their addresses
        self.struct = _Slot(
            int(packed_A.shape[0]) * BLOCK,
            packed_A.data_ptr(),
            self._rank_start.data_ptr(),
            self._rank.data_ptr(),
            ctypes.cast(self._b_pointers, ctypes.c_void_p),
        )


class FactorsPlan:
    """One projection's slots as the C kernel reads them: a table of every slot's :class:`SlotPlan`
    (an empty entry where a slot adapts none of its parts), set one slot at a time."""

    def __init__(self, k: int, spans: Sequence[tuple[int, int]]) -> None:
        """``k``: input features; ``spans``: each part's output columns [start, end)."""
        self.k = k
        self.widths = [end - start for start, end in spans]
        self.width = max(end for _, end in spans)
        self._part_col = torch.tensor([start for start, _ in spans], dtype=torch.int64)
        self._part_width = torch.tensor(self.widths, dtype=torch.int64)
        self._plans: list[SlotPlan | None] = []
        self._table = (_Slot * 0)()
        self.struct = _Factors(k, len(spans), 0, self._part_col.data_ptr(), self._part_width.data_ptr(), None)

    @property
    def num_slots(self) -> int:
        return len(self._plans)

    def set_slot(self, slot: int, plan: SlotPlan | None) -> None:
        """Point ``slot``'s entry at ``plan`` (None: the slot adapts nothing here)."""
        if plan is not None and (
            plan.k != self.k or any(self.widths[p] != w for p, w in plan.widths.items())
        ):
            raise ValueError("compiled LoRA kernel: a slot's factors do not fit the projection")
        if slot >= len(self._plans):
            size = max(slot + 1, 2 * len(self._plans))
            self._plans.extend([None] * (size - len(self._plans)))
            table = (_Slot * size)()
            ctypes.memmove(table, self._table, ctypes.sizeof(self._table))
            self._table = table
            self.struct.slots = ctypes.addressof(table)
            self.struct.num_slots = size
        self._plans[slot] = plan
        self._table[slot] = _Slot() if plan is None else plan.struct


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
        fits = fits and groups.max_slot < factors.num_slots
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
    """One random problem with ragged groups, padding tiles, two parts, slots of different ranks
    (one adapting a single part, one empty) and row weights, against the dense formula."""
    gen = torch.Generator().manual_seed(0)
    rows, k, widths = 11, 40, (24, 9)
    ranks = {0: (8, 5), 3: (3, 0), 5: (17, 2)}  # slot -> each part's rank (0: not adapted)
    x = torch.randn(rows, k, generator=gen)
    factors = FactorsPlan(k, [(0, widths[0]), (widths[0], sum(widths))])
    dense: dict[int, list[torch.Tensor | None]] = {}
    for slot, part_ranks in ranks.items():
        A = torch.randn(k, sum(part_ranks), generator=gen)
        parts, start, dense[slot] = [], 0, []
        for p, (r, d) in enumerate(zip(part_ranks, widths, strict=True)):
            B = torch.randn(r, d, generator=gen)
            dense[slot].append(A[:, start : start + r] @ B if r else None)  # [k, d]
            if r:
                parts.append((p, start, B))
            start += r
        factors.set_slot(slot, SlotPlan(A, parts, len(widths)))
    factors.set_slot(1, None)
    members = [[0, 3, 4, 6, 7, 10], [2], [8, 1, 5]]  # row 9 has no adapter
    slots = [5, 3, 0]
    weights = [0.5 + i / 10 for i in range(10)]
    y = torch.randn(rows, sum(widths), generator=gen)
    expected = y.clone()
    flat = [row for group in members for row in group]
    for slot, group in zip(slots, members, strict=True):
        for row in group:
            for p, delta in enumerate(dense[slot]):
                if delta is not None:
                    cols = slice(sum(widths[:p]), sum(widths[: p + 1]))
                    expected[row, cols] += x[row] @ delta * weights[flat.index(row)]
    kernel.add(x, y, GroupsPlan(slots, members, weights, 1), factors)
    return torch.allclose(y, expected, rtol=1e-4, atol=1e-4)


@functools.cache
def _build(cache_dir: Path) -> CompiledSgmv | None:
    return _build_and_check(cache_dir)


def _build_and_check(cache_dir: Path) -> CompiledSgmv | None:
    return cpu_build.load_checked(
        "sgmv_cpu", SOURCE, cache_dir, "compiled LoRA kernel", CompiledSgmv, _agrees_with_reference, FLAGS
    )
