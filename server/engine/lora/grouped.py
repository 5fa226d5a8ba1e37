"""``grouped`` (Punica SGMV semantics, PyTorch ops): every adapter multiplies only its own rows.

The batch's rows are grouped by slot, each group padded to the largest (``RowGroups``)::

    xg = x[rows of each slot]                # [L, m, k]
    h  = xg @ A_g                            # [L, m, R]: one batched matmul for all parts
    y[rows, part] += h[..., part] @ (s·B)_g  # per part, scattered back with one index_add_

Padding positions carry weight 0. Per call: one gather, one batched matmul down for every part
(their A concatenated along the rank), one batched matmul up per part, one ``index_add_`` per run
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
    """One projection's factors for the batch's slots: every applying part's A concatenated along
    the rank and the parts in runs of adjacent columns; rebuilt when the slots or a bank's
    contents change."""

    def __init__(self, projection: LoraProjection) -> None:
        self.projection = projection
        self.key: tuple | None = None
        self.A: torch.Tensor | None = None  # [L, k, R]; None: no part applies
        self.runs: list[Run] = []

    def update(self, slots: tuple[int, ...]) -> bool:
        """Bring the factors up to date for ``slots``; True when they were rebuilt."""
        p = self.projection
        key = (slots, tuple(bank.version for bank in p.banks))
        if key == self.key:
            return False
        down: list[torch.Tensor] = []
        runs: list[Run] = []
        rank = 0
        for bank, (start, end) in zip(p.banks, p.spans, strict=True):
            if not any(s in bank.occupied for s in slots):
                continue
            A, B = bank.grouped_factors(slots)
            part = GroupedPart(start, end, rank, rank + bank.r_max, B)
            rank += bank.r_max
            down.append(A)
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end, [*runs[-1][2], part])
            else:
                runs.append((start, end, [part]))
        self.A = torch.cat(down, dim=2).contiguous() if down else None
        self.runs = runs
        self.key = key
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
