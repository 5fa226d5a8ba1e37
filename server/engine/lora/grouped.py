"""``grouped`` (Punica SGMV semantics, PyTorch ops): every adapter multiplies only its own rows.

The batch's rows are grouped by slot, each group padded to the largest (``RowGroups``)::

    xg = x[rows of each slot]                # [L, m, k]
    h  = xg @ A_g                            # [L, m, R]: one batched matmul for all parts
    y[rows, part] += h[..., part] @ (s·B)_g  # per part, scattered back with one index_add_

Padding positions carry weight 0. The factors are kept per slot in this layout, rewritten when a
slot's contents change (``GroupedFactors``); a new batch composition costs one ``index_select``
of its slots per factor tensor. Per call: one gather of the rows, one batched matmul down for
every part (their A concatenated along the rank), one batched matmul up per part, one ``index_add_`` per run
of adjacent parts (q, k, v of an all-linear adapter: one; q and v only: two). A batch of one
adapter's rows in order skips the gather and the scatter; rows sorted by slot are read as views
(``wants_sorted_rows``).

Compared with ``segmented`` each row meets only its own adapter's factors (L times less
arithmetic with L adapters in the batch). On the embedded model with 4 adapters mixed
(``bench/efficiency.py``, 2-core CPU), the LoRA overhead of a decode step went from +38% to +23%
at 16 rows and from +18% to +9% at 64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from server.engine.lora.backend import LoraBackend, LoraProjection
from server.engine.lora.batch import LoraBatchContext


class GroupedPart(NamedTuple):
    start: int  # the part's output columns [start, end)
    end: int
    rank_start: int  # its columns [rank_start, rank_end) of the down-projected h
    rank_end: int
    B: torch.Tensor  # [L, r, d] scaled by each slot's scale


Run = tuple[int, int, list[GroupedPart]]  # (first column, end column, adjacent parts)


class GroupedFactors:
    """One projection's factors in the layout the batched matmuls read, kept per slot:
    ``A_all`` [S, k, R] (every part's A transposed, part p at a fixed offset of its bank's
    ``r_max``) and per part ``B_all[p]`` [S, r_p, d_p] already scaled. A slot's entries are
    rewritten only when its contents change (``LoraSlotBank.slot_contents``); a new batch
    composition takes its L slots with one ``index_select`` per tensor (the matmuls need them
    contiguous), not the L × rank × k copy, scale, transpose and concatenation per part it was."""

    def __init__(self, projection: LoraProjection) -> None:
        self.projection = projection
        self.key: tuple | None = None
        self.A: torch.Tensor | None = None  # [L, k, R]; None: no part applies
        self.runs: list[Run] = []
        self._shape: tuple = ()  # (S, each bank's (slots, r_max)) the stacks were laid out for
        self._written: dict[int, tuple[int | None, ...]] = {}  # slot -> the contents its entries hold
        self._A_all = torch.zeros(0)
        self._B_all: list[torch.Tensor] = []
        self._offsets: list[int] = []

    def _layout(self, slots: tuple[int, ...]) -> None:
        """(Re)allocate the stacks when a bank grew or a slot lies past them (a slot of an adapter
        that adapts other projections only)."""
        banks = self.projection.banks
        S = max(max(bank.num_slots for bank in banks), max(slots) + 1, self._A_all.shape[0])
        shape = (S, *((bank.num_slots, bank.r_max) for bank in banks))
        if shape == self._shape:
            return
        first = banks[0]
        self._offsets = [sum(bank.r_max for bank in banks[:p]) for p in range(len(banks))]
        R = sum(bank.r_max for bank in banks)
        self._A_all = first.A_stack.new_zeros(S, first.in_features, R)  # [S, k, R]
        self._B_all = [bank.B_stack.new_zeros(S, bank.r_max, bank.out_features) for bank in banks]
        self._shape, self._written = shape, {}

    def _write(self, slot: int) -> None:
        key = tuple(bank.slot_contents.get(slot) for bank in self.projection.banks)
        if self._written.get(slot) == key:
            return
        for bank, offset, B_all in zip(self.projection.banks, self._offsets, self._B_all, strict=True):
            A_cols = self._A_all[slot, :, offset : offset + bank.r_max]  # [k, r]
            if slot in bank.occupied:
                A_cols.copy_(bank.A_stack[slot].t())
                B_all[slot].copy_(bank.B_stack[slot].t() * bank.scale[slot])  # [r, d]
            else:
                A_cols.zero_()
                B_all[slot].zero_()
        self._written[slot] = key

    def update(self, slots: tuple[int, ...]) -> bool:
        """Bring the factors up to date for ``slots``; True when they were rebuilt."""
        p = self.projection
        key = (slots, tuple(bank.version for bank in p.banks))
        if key == self.key:
            return False
        self.key = key
        applying = [i for i, bank in enumerate(p.banks) if any(s in bank.occupied for s in slots)]
        if not applying:
            self.A, self.runs = None, []
            return True
        self._layout(slots)
        for slot in slots:
            self._write(slot)
        index = torch.tensor(slots, device=self._A_all.device)
        runs: list[Run] = []
        for i in applying:
            (start, end), bank, offset = p.spans[i], p.banks[i], self._offsets[i]
            part = GroupedPart(start, end, offset, offset + bank.r_max, self._B_all[i].index_select(0, index))
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end, [*runs[-1][2], part])
            else:
                runs.append((start, end, [part]))
        self.A = self._A_all.index_select(0, index)  # [L, k, R]
        self.runs = runs
        return True


class GroupedBackend(LoraBackend):
    name = "grouped"
    wants_sorted_rows = True

    def bind(self, projection: LoraProjection) -> GroupedFactors:
        return GroupedFactors(projection)

    def add_delta(
        self, projection: LoraProjection, x: torch.Tensor, y: torch.Tensor, batch: LoraBatchContext
    ) -> None:
        factors: GroupedFactors = projection.state
        factors.update(batch.active_slots)
        A, runs = factors.A, factors.runs
        if A is None:
            return
        batch_size, seq, k = x.shape
        groups = batch.row_groups()
        if groups.identity:  # one adapter, every row: plain matmuls, no gather or scatter
            h = torch.mm(x.reshape(batch_size * seq, k), A[0])  # [B*T, R]
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
        y3 = y.view(batch_size, seq, y.shape[-1])
        for start, end, parts in runs:
            ups = [torch.bmm(h[:, :, p.rank_start : p.rank_end], p.B) for p in parts]  # [L, m*T, d_p]
            out = (ups[0] if len(ups) == 1 else torch.cat(ups, dim=2)).view(num * size, seq, end - start)
            if groups.start is None:  # scattered rows (padding adds 0 to its group's first row)
                y3[:, :, start:end].index_add_(0, groups.index, out)
                continue
            rows = y3[groups.start :, :, start:end]  # [B - start, T, d]
            rows.add_(out if groups.unpad is None else out.index_select(0, groups.unpad))
