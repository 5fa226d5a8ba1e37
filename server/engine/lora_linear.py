"""LoRA-aware linear layers: many adapters, one batch, the base weight untouched.

    x ──► base(x) = W x ─────────────────────────────────────────────────┐
    │                                                                    ▼
    └──► A[slot[i]] x_i ──► row_scale[i] · scale[slot[i]] · B[slot[i]] (·) ──► + ──► y_i

Each wrapped layer keeps the adapters that are resident in memory in stacked, rank-padded
slots (``A_stack: [S, r_max, k]``, ``B_stack: [S, d, r_max]``, ``scale: [S]``). A forward pass
reads the row → slot map from a :class:`LoraBatchContext` shared by every layer of the model;
slot ``-1`` is the bare base (no adapter). A row may also scale its adapter's update
(``adapter_scale``: 0 is the base, 1 the adapter) without a slot of its own: ``row_scale[i]``.

Three batched kernels compute the same thing:

* ``grouped`` (the default; Punica SGMV semantics): the batch's rows are grouped by slot, each
  group padded to the largest, so every adapter multiplies only its own rows:
  ``xg = x[rows of each slot]  # [L, m, k]``;  ``h = xg @ A_g`` (``[L, k, r]``, one batched matmul for
  all parts of a fused projection);  ``y[rows] += h @ (scale·B)_g`` (per part, scattered back with
  one ``index_add_``). Padding positions carry weight 0. On the CPU in float32 the same kernel
  runs as compiled C where it builds (``sgmv_cpu.py``; ``--cpu-kernel``).
* ``gather_bmm`` (Punica BGMV semantics, the portable reference):
  ``y[i] += row_scale[i] * scale[slot[i]] * (x[i] @ A[slot[i]].T) @ B[slot[i]].T``
* ``segmented``: the active slots' A are concatenated once per batch composition, so each
  layer costs one matmul down, one mask, one matmul up:
  ``h = x @ A_act.T;  h *= row_mask;  y += h @ B_act_scaled.T``
  with ``row_mask[i, j] = row_scale[i]`` where column j belongs to row i's slot, else 0. Every
  row is multiplied by every active adapter (L times the work of ``grouped``); its shapes follow
  the batch's adapters only, which is what ``torch.compile`` takes (native/graphed.py).

All three are checked against the dense ``W + s·B·A`` in the tests. A padded rank costs compute,
not correctness: padded rows of A and columns of B are zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

import torch
from torch import nn

from server.engine import sgmv_cpu

BASE_SLOT = -1
Kernel = Literal["grouped", "segmented", "gather_bmm"]
KERNELS: tuple[Kernel, ...] = get_args(Kernel)


@dataclass(frozen=True)
class RowGroups:
    """The batch's rows grouped by adapter slot, each group padded to the largest (the layout of
    the ``grouped`` kernel): grouped position ``l * size + j`` is the j-th row reading ``slots[l]``.

    Rows of the bare base belong to no group; padding positions re-read their group's first row
    with weight 0. When the rows with an adapter are the batch's last rows, already in slot order
    (the native runner sorts its decode rows so), the kernel reads and writes them as a block:
    without padding as plain views, with padding through ``unpad``.
    """

    slots: tuple[int, ...]  # the batch's active slots, sorted: one group each
    size: int  # positions per group: the largest group's row count
    index: torch.Tensor  # [len(slots) * size] int64: the row at each grouped position
    weight: torch.Tensor | None  # [len(slots), size, 1, 1]: row scale, 0 on padding; None: all 1
    start: int | None  # rows [start, B) are the grouped rows in group order; None: scattered
    unpad: torch.Tensor | None  # [B - start]: each of those rows' grouped position; None: no padding
    identity: bool  # one group of every row in order, all at scale 1: no gather, no scatter
    members: tuple[tuple[int, ...], ...]  # each group's rows, without padding (the compiled kernel)
    member_weights: tuple[float, ...] | None  # their row scales in the same order; None: all 1

    @staticmethod
    def build(
        row_slots: Sequence[int], row_scales: Sequence[float] | None, device: torch.device | str
    ) -> RowGroups:
        slots = tuple(sorted({s for s in row_slots if s != BASE_SLOT}))
        members = {s: [i for i, r in enumerate(row_slots) if r == s] for s in slots}
        size = max(len(rows) for rows in members.values())
        index = [0] * (len(slots) * size)
        weight = [0.0] * (len(slots) * size)
        positions: list[int] = []  # grouped position of each grouped row, in group order
        for group, slot in enumerate(slots):
            rows = members[slot]
            for j in range(size):  # padding re-reads the group's first row
                index[group * size + j] = rows[j] if j < len(rows) else rows[0]
            for j, row in enumerate(rows):
                weight[group * size + j] = 1.0 if row_scales is None else float(row_scales[row])
                positions.append(group * size + j)
        padded = len(positions) < len(index)
        start = len(row_slots) - len(positions)
        in_order = [index[p] for p in positions] == list(range(start, len(row_slots)))
        return RowGroups(
            slots=slots,
            size=size,
            index=torch.tensor(index, dtype=torch.long, device=device),
            weight=(
                torch.tensor(weight, dtype=torch.float32, device=device).view(len(slots), size, 1, 1)
                if padded or row_scales is not None
                else None
            ),
            start=start if in_order else None,
            unpad=torch.tensor(positions, dtype=torch.long, device=device) if in_order and padded else None,
            identity=len(slots) == 1 and start == 0 and row_scales is None,
            members=tuple(tuple(members[s]) for s in slots),
            member_weights=(
                None
                if row_scales is None
                else tuple(float(row_scales[row]) for s in slots for row in members[s])
            ),
        )


@dataclass
class LoraBatchContext:
    """What the current forward pass needs to know about adapters, shared by all LoRA layers.

    The engine calls :meth:`set_rows` before each forward; layers read it, never write it.
    """

    row_slots: torch.Tensor | None = None  # [B] int64, BASE_SLOT for rows without adapter
    row_scale: torch.Tensor | None = None  # [B] float32 per-row adapter scale; None: every row 1
    active_slots: tuple[int, ...] = ()  # distinct slots >= 0 used by the batch, sorted
    # (slots, r_max) -> [B, L*r_max]; layers that some adapters skip use a subset of the slots
    row_mask_cache: dict[tuple[tuple[int, ...], int], torch.Tensor] = field(default_factory=dict)
    _rows_key: tuple | None = None
    _groups: RowGroups | None = None
    _compiled_groups: dict[int, sgmv_cpu.GroupsPlan] = field(default_factory=dict)  # by tokens per row

    def set_rows(
        self, row_slots: list[int], device: torch.device | str, row_scales: list[float] | None = None
    ) -> None:
        """Describe the next batch: ``row_slots[i]`` is the slot of row i (``BASE_SLOT``: none),
        ``row_scales[i]`` the factor on its adapter's update (default 1).

        Decode steps repeat the same rows; then nothing is rebuilt.
        """
        scales = None
        if row_scales is not None and any(
            s != 1.0 for s, slot in zip(row_scales, row_slots, strict=True) if slot != BASE_SLOT
        ):
            scales = tuple(
                1.0 if slot == BASE_SLOT else float(s) for s, slot in zip(row_scales, row_slots, strict=True)
            )
        key = (tuple(row_slots), scales)
        if key == self._rows_key:
            return
        self._rows_key = key
        active = tuple(sorted({s for s in row_slots if s != BASE_SLOT}))
        self.active_slots = active
        self.row_slots = torch.tensor(row_slots, dtype=torch.long, device=device) if active else None
        self.row_scale = (
            torch.tensor(scales, dtype=torch.float32, device=device)
            if active and scales is not None
            else None
        )
        self.row_mask_cache = {}
        self._groups = None
        self._compiled_groups = {}

    def row_groups(self) -> RowGroups:
        """The rows grouped by slot (``grouped`` kernel), built once per batch composition."""
        if self._groups is None:
            assert self._rows_key is not None and self.row_slots is not None
            row_slots, scales = self._rows_key
            self._groups = RowGroups.build(row_slots, scales, self.row_slots.device)
        return self._groups

    def compiled_groups(self, seq: int) -> sgmv_cpu.GroupsPlan:
        """The row groups as the compiled kernel reads them, for ``seq`` tokens per row."""
        plan = self._compiled_groups.get(seq)
        if plan is None:
            groups = self.row_groups()
            plan = self._compiled_groups[seq] = sgmv_cpu.GroupsPlan(
                groups.members, groups.member_weights, seq
            )
        return plan

    def invalidate(self) -> None:
        """Forget the cached row mask (call after slot contents change)."""
        self._rows_key = None

    def row_mask(self, slots: tuple[int, ...], r_max: int, dtype: torch.dtype) -> torch.Tensor:
        """``[B, L*r_max]``: ``row_scale[i]`` (1 by default) where column block l (slot ``slots[l]``)
        belongs to row i's slot, else 0."""
        mask = self.row_mask_cache.get((slots, r_max))
        if mask is None or mask.dtype != dtype:
            assert self.row_slots is not None
            columns = torch.tensor(slots, device=self.row_slots.device)
            onehot = (self.row_slots[:, None] == columns[None, :]).to(dtype)  # [B, L]
            if self.row_scale is not None:
                onehot.mul_(self.row_scale[:, None].to(dtype))
            mask = onehot.repeat_interleave(r_max, dim=1)  # [B, L*r_max]
            self.row_mask_cache[(slots, r_max)] = mask
        return mask


class LoraSlotBank:
    """One adaptable output's stacked, rank-padded adapter slots and the kernels that apply them.

    A plain linear layer owns one bank; a fused projection (q/k/v in one matrix) owns one bank per
    part and lets each add into its own column slice of the fused output. A bank is the
    ``LoraTarget`` of its PEFT module name.
    """

    fan_in_fan_out = False  # banks store A: [r, in] and B: [out, r] whatever the base layout

    def __init__(
        self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device, kernel: Kernel
    ) -> None:
        self.in_features = in_features
        self.out_features = out_features
        self._dtype, self._device = dtype, device
        if kernel not in KERNELS:
            raise ValueError(f"unknown LoRA kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
        self.version = 0  # bumped whenever a slot's content changes (caches key on it)
        # the kernel is bound once: no string comparison in the forward
        if kernel == "grouped":
            self.add_delta = GroupedLora([self], [(0, out_features)]).add_delta
        elif kernel == "gather_bmm":
            self.add_delta = self._add_delta_gather_bmm
        else:
            self.add_delta = self._add_delta_segmented
        # Stacked slots; allocated lazily and grown when an adapter needs more room.
        self.A_stack = torch.zeros(0, 0, in_features, dtype=dtype, device=device)  # [S, r_max, k]
        self.B_stack = torch.zeros(0, out_features, 0, dtype=dtype, device=device)  # [S, d, r_max]
        self.scale = torch.zeros(0, dtype=dtype, device=device)  # [S]
        self.occupied: set[int] = set()
        # (batch slots, this bank's slots, A_act^T, (scale·B)_act^T, slot of each rank column)
        self._active_cache: (
            tuple[tuple[int, ...], tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor] | None
        ) = None

    # ---------------------------------------------------------------- slot management

    @property
    def r_max(self) -> int:
        return int(self.A_stack.shape[1])

    def _grow(self, slots: int, r_max: int) -> None:
        old_s, old_r = self.A_stack.shape[0], self.A_stack.shape[1]
        if slots <= old_s and r_max <= old_r:
            return
        new_s, new_r = max(slots, old_s), max(r_max, old_r)
        A = self.A_stack.new_zeros(new_s, new_r, self.in_features)
        B = self.B_stack.new_zeros(new_s, self.out_features, new_r)
        scale = self.scale.new_zeros(new_s)
        A[:old_s, :old_r] = self.A_stack
        B[:old_s, :, :old_r] = self.B_stack
        scale[:old_s] = self.scale
        self.A_stack, self.B_stack, self.scale = A, B, scale

    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        """Place one adapter's factors (A: [r, k], B: [d, r]) in ``slot``."""
        r = A.shape[0]
        self._grow(slot + 1, r)
        self.A_stack[slot].zero_()
        self.B_stack[slot].zero_()
        self.A_stack[slot, :r] = A.to(self._device, self._dtype)
        self.B_stack[slot, :, :r] = B.to(self._device, self._dtype)
        self.scale[slot] = scale
        self.occupied.add(slot)
        self._active_cache = None
        self.version += 1

    def clear_slot(self, slot: int) -> None:
        if slot in self.occupied:
            self.A_stack[slot].zero_()
            self.B_stack[slot].zero_()
            self.scale[slot] = 0
            self.occupied.discard(slot)
            self._active_cache = None
            self.version += 1

    def delta_weight(self, slot: int) -> torch.Tensor:
        """Dense ``scale · B @ A`` for one slot in float32: [d, k] (tests and merging only)."""
        A = self.A_stack[slot].float()
        B = self.B_stack[slot].float()
        return float(self.scale[slot]) * (B @ A)

    def grouped_factors(self, slots: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors of ``slots`` in the grouped kernel's layout, zero for a slot this bank does
        not hold: (A_g [L, k, r_max], (scale·B)_g [L, r_max, d])."""
        held = [s for s in slots if s in self.occupied]
        A = self.A_stack.new_zeros(len(slots), self.r_max, self.in_features)  # [L, r, k]
        B = self.B_stack.new_zeros(len(slots), self.r_max, self.out_features)  # [L, r, d]
        if held:
            at = torch.tensor([slots.index(s) for s in held], device=A.device)
            idx = torch.tensor(held, device=A.device)
            A[at] = self.A_stack[idx]
            B[at] = (self.B_stack[idx] * self.scale[idx][:, None, None]).transpose(1, 2)
        return A.transpose(1, 2), B

    def applies_to(self, ctx: LoraBatchContext) -> bool:
        """True when some row of the batch reads an adapter that adapts this output."""
        return ctx.row_slots is not None and any(s in self.occupied for s in ctx.active_slots)

    # ---------------------------------------------------------------- kernels

    def _add_delta_gather_bmm(self, x: torch.Tensor, y: torch.Tensor, ctx: LoraBatchContext) -> None:
        """Semantics: ``y[i] += row_scale[i] * scale[slot[i]] * (x[i] @ A[slot[i]].T) @ B[slot[i]].T``.

        x: [B, T, k]; y: [B*T, d], possibly a column slice of a wider output.
        """
        assert ctx.row_slots is not None
        # base rows, and rows whose adapter skips this output, read slot 0 with scale 0
        present = (ctx.row_slots >= 0) & (ctx.row_slots < self.A_stack.shape[0])
        slots = torch.where(present, ctx.row_slots, 0)  # [B]
        scale = torch.where(present, self.scale[slots], 0)  # [B]
        if ctx.row_scale is not None:
            scale = scale * ctx.row_scale.to(scale.dtype)
        A = self.A_stack[slots]  # [B, r, k]
        B = self.B_stack[slots]  # [B, d, r]
        h = torch.bmm(x, A.transpose(1, 2))  # [B, T, r]
        delta = torch.bmm(h, B.transpose(1, 2)) * scale[:, None, None]  # [B, T, d]
        y.add_(delta.reshape(y.shape))

    def active_weights(
        self, ctx: LoraBatchContext
    ) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor]:
        """This bank's slots among the batch's, with their A and scaled B concatenated along rank,
        and the slot each rank column belongs to: (slots, A_t [k, L*r_max], B_t [L*r_max, d],
        columns [L*r_max]).

        Cached until the batch's slots or a slot's content change.
        """
        cached = self._active_cache
        if cached is None or cached[0] != ctx.active_slots:
            slots = tuple(s for s in ctx.active_slots if s in self.occupied)
            idx = torch.tensor(slots, device=self.A_stack.device)
            A_t = self.A_stack[idx].reshape(-1, self.in_features).t().contiguous()  # [k, L*r_max]
            B = (self.B_stack[idx] * self.scale[idx][:, None, None]).permute(1, 0, 2)  # [d, L, r_max]
            B_t = B.reshape(self.out_features, -1).t().contiguous()  # [L*r_max, d]
            columns = idx.repeat_interleave(self.r_max)  # [L*r_max]
            cached = self._active_cache = (ctx.active_slots, slots, A_t, B_t, columns)
        return cached[1:]

    def _add_delta_segmented(self, x: torch.Tensor, y: torch.Tensor, ctx: LoraBatchContext) -> None:
        """Semantics: ``h = x @ A_act.T; h *= row_mask (row_scale where the slot is the row's); y += h @ (scale·B)_act.T``.

        x: [B, T, k]; y: [B*T, d] (a view: written in place, no temporaries beyond ``h``).
        """
        slots, A_t, B_t, _ = self.active_weights(ctx)
        batch, seq = x.shape[0], x.shape[1]
        h = torch.mm(x.reshape(batch * seq, -1), A_t)  # [B*T, L*r_max]
        h.view(batch, seq, -1).mul_(ctx.row_mask(slots, self.r_max, h.dtype)[:, None, :])
        y.addmm_(h, B_t)  # [B*T, d]


class _GroupedPart(NamedTuple):
    start: int  # the part's output columns [start, end)
    end: int
    rank_start: int  # its columns [rank_start, rank_end) of the down-projected h
    rank_end: int
    B: torch.Tensor  # [L, r, d] scaled by each slot's scale


class GroupedLora:
    """The ``grouped`` kernel for banks that read the same input: one layer's bank, or the parts of
    a fused projection (each adding into its own output columns ``spans[p]``).

    Per call: one gather of the rows into groups, one batched matmul down for every part (their
    A concatenated along the rank), one batched matmul up per part, and one ``index_add_`` per run
    of adjacent parts (q, k, v of an all-linear adapter: one; q and v only: two). A batch of one
    adapter's rows in order skips the gather and the scatter.

    Compared with ``segmented`` each row meets only its own adapter's factors (L times less
    arithmetic with L adapters in the batch). On the embedded model with 4 adapters mixed
    (``bench/efficiency.py``, 2-core CPU), the LoRA overhead of a decode step went from +38% to
    +23% at 16 rows and from +18% to +9% at 64.

    ``compiled`` (float32 CPU banks, where ``sgmv_cpu`` builds): ``add_delta`` hands the whole
    projection to the C kernel instead (+12% at 16 rows where these ops measured +21%, same run).
    """

    def __init__(self, banks: Sequence[LoraSlotBank], spans: Sequence[tuple[int, int]]) -> None:
        self.banks = list(banks)
        self.spans = list(spans)
        self._key: tuple | None = None
        self._A: torch.Tensor | None = None  # [L, k, R]: every applying part's A_g along the rank
        self._runs: list[tuple[int, int, list[_GroupedPart]]] = []  # (start, end, adjacent parts)
        # float32 on the CPU: the same kernel compiled from C where it builds (sgmv_cpu.py)
        self.compiled = sgmv_cpu.load_for(self.banks[0]._device, self.banks[0]._dtype)
        self._plan: sgmv_cpu.FactorsPlan | None = None  # the factors as the compiled kernel reads them

    def _factors(self, slots: tuple[int, ...]) -> tuple[torch.Tensor | None, list]:
        """The concatenated A and the parts' runs for the batch's slots, cached until the slots or a
        bank's contents change."""
        key = (slots, tuple(bank.version for bank in self.banks))
        if key != self._key:
            down: list[torch.Tensor] = []
            runs: list[tuple[int, int, list[_GroupedPart]]] = []
            rank = 0
            for bank, (start, end) in zip(self.banks, self.spans, strict=True):
                if not any(s in bank.occupied for s in slots):
                    continue
                A, B = bank.grouped_factors(slots)
                part = _GroupedPart(start, end, rank, rank + bank.r_max, B)
                rank += bank.r_max
                down.append(A)
                if runs and runs[-1][1] == start:
                    runs[-1] = (runs[-1][0], end, [*runs[-1][2], part])
                else:
                    runs.append((start, end, [part]))
            self._A = torch.cat(down, dim=2).contiguous() if down else None
            self._runs = runs
            self._plan = (
                sgmv_cpu.FactorsPlan(
                    self._A,
                    [
                        (p.start, p.end - p.start, p.rank_start, p.rank_end - p.rank_start, p.B)
                        for *_, ps in runs
                        for p in ps
                    ],
                )
                if self.compiled is not None and self._A is not None
                else None
            )
            self._key = key
        return self._A, self._runs

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, ctx: LoraBatchContext) -> None:
        """x: [B, T, k]; y: [B*T, D] (possibly a column slice of a wider output), written in place."""
        if ctx.row_slots is None:
            return
        A, runs = self._factors(ctx.active_slots)
        if A is None:
            return
        batch, seq, k = x.shape
        if self._plan is not None and x.dtype == torch.float32:  # one call does all of the below
            self.compiled.add(x.reshape(batch * seq, k), y, ctx.compiled_groups(seq), self._plan)  # type: ignore[union-attr]
            return
        groups = ctx.row_groups()
        if groups.identity:  # one adapter, every row: plain matmuls, no gather or scatter
            h = torch.mm(x.reshape(batch * seq, k), A[0])  # [B*T, R]
            for _, _, parts in runs:
                for p in parts:
                    y[:, p.start : p.end].addmm_(h[:, p.rank_start : p.rank_end], p.B[0])
            return
        num, size = len(groups.slots), groups.size
        block = groups.start is not None and groups.unpad is None  # the grouped rows as they lie
        if block:
            xg = x.narrow(0, groups.start, num * size).reshape(num, size * seq, k)  # a view
        else:
            xg = x.index_select(0, groups.index).view(num, size * seq, k)  # [L, m*T, k]
        h = torch.bmm(xg, A)  # [L, m*T, R]
        if groups.weight is not None:
            h.view(num, size, seq, -1).mul_(groups.weight.to(h.dtype))
        y3 = y.view(batch, seq, y.shape[-1])
        for start, end, parts in runs:
            ups = [torch.bmm(h[:, :, p.rank_start : p.rank_end], p.B) for p in parts]  # [L, m*T, d_p]
            out = (ups[0] if len(ups) == 1 else torch.cat(ups, dim=2)).view(num * size, seq, end - start)
            if groups.start is None:  # scattered rows (padding adds 0 to its group's first row)
                y3[:, :, start:end].index_add_(0, groups.index, out)
                continue
            rows = y3[groups.start :, :, start:end]  # [B - start, T, d]
            rows.add_(out if groups.unpad is None else out.index_select(0, groups.unpad))


class LoraLinear(nn.Module):
    """Wraps a linear layer (``nn.Linear`` or GPT-2 ``Conv1D``) with stacked LoRA slots."""

    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        ctx: LoraBatchContext,
        kernel: Kernel = "grouped",
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features = in_features
        self.out_features = out_features
        self.fan_in_fan_out = bool(linear_shape(base)[2])  # type: ignore[index]
        self.ctx = ctx
        self.bank = LoraSlotBank(in_features, out_features, base.weight.dtype, base.weight.device, kernel)

    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        """Place one adapter's factors (A: [r, k], B: [d, r]) in ``slot``."""
        self.bank.set_slot(slot, A, B, scale)

    def clear_slot(self, slot: int) -> None:
        self.bank.clear_slot(slot)

    def delta_weight(self, slot: int) -> torch.Tensor:
        return self.bank.delta_weight(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [B, T, d], a fresh tensor: the delta is added in place
        if self.bank.applies_to(self.ctx):
            self.bank.add_delta(x, y.view(-1, self.out_features), self.ctx)
        return y


def linear_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, fan_in_fan_out) for layers LoRA can wrap, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 Conv1D
        in_features, out_features = module.weight.shape
        return int(in_features), int(out_features), True
    return None
