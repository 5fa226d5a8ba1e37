"""What a forward pass needs to know about adapters: each row's slot and scale, and the rows grouped
by slot. Shared by every LoRA layer of a model; no backend's plan is kept here (backends derive
their own from it, keyed on :attr:`LoraBatchContext.version`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

BASE_SLOT = -1  # the slot of a row without adapter (the bare base)
_versions = itertools.count(1)  # batch compositions, numbered across every context


@dataclass(frozen=True)
class RowGroups:
    """The batch's rows grouped by adapter slot, each group padded to the largest (the layout the
    grouped backends read): grouped position ``l * size + j`` is the j-th row reading ``slots[l]``.

    Rows of the bare base belong to no group; padding positions re-read their group's first row
    with weight 0. When the rows with an adapter are the batch's last rows, already in slot order
    (the native runner sorts its decode rows so for a backend that ``wants_sorted_rows``), it reads and writes them as a block:
    without padding as plain views, with padding through ``unpad``.
    """

    slots: tuple[int, ...]  # the batch's active slots, sorted: one group each
    size: int  # positions per group: the largest group's row count
    index: torch.Tensor  # [len(slots) * size] int64: the row at each grouped position
    weight: torch.Tensor | None  # [len(slots), size, 1, 1]: row scale, 0 on padding; None: all 1
    start: int | None  # rows [start, B) are the grouped rows in group order; None: scattered
    unpad: torch.Tensor | None  # [B - start]: each of those rows' grouped position; None: no padding
    identity: bool  # one group of every row in order, all at scale 1: no gather, no scatter
    members: tuple[tuple[int, ...], ...]  # each group's rows, without padding (the compiled backend)
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


class LoraBatchContext:
    """The current batch's adapters, shared by all LoRA layers of a model.

    The runner calls :meth:`set_rows` before each forward; layers and backends read it, never
    write it. ``version`` is new for every batch composition (unique across contexts): a
    backend's per-batch plan is valid while it stays the same.
    """

    def __init__(self) -> None:
        self.row_slots: torch.Tensor | None = None  # [B] int64, BASE_SLOT for rows without adapter
        self.row_scale: torch.Tensor | None = None  # [B] float32 per-row adapter scale; None: every row 1
        self.active_slots: tuple[int, ...] = ()  # distinct slots >= 0 used by the batch, sorted
        self.version = 0
        self._rows_key: tuple | None = None
        self._groups: RowGroups | None = None

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
        self.version = next(_versions)
        active = tuple(sorted({s for s in row_slots if s != BASE_SLOT}))
        self.active_slots = active
        self.row_slots = torch.tensor(row_slots, dtype=torch.long, device=device) if active else None
        self.row_scale = (
            torch.tensor(scales, dtype=torch.float32, device=device)
            if active and scales is not None
            else None
        )
        self._groups = None

    @property
    def rows(self) -> tuple[tuple[int, ...], tuple[float, ...] | None]:
        """The batch as set: each row's slot, and each row's scale (None: all 1)."""
        assert self._rows_key is not None, "set_rows first"
        return self._rows_key

    def row_groups(self) -> RowGroups:
        """The rows grouped by slot, built once per batch composition."""
        if self._groups is None:
            assert self._rows_key is not None and self.row_slots is not None
            row_slots, scales = self._rows_key
            self._groups = RowGroups.build(row_slots, scales, self.row_slots.device)
        return self._groups

    def invalidate(self) -> None:
        """Forget the batch (call after slot contents change): the next ``set_rows`` rebuilds."""
        self._rows_key = None
