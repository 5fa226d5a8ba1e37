"""``segmented``: the batch's active slots' factors concatenated once per batch composition, so
each part costs one matmul down, one mask, one matmul up::

    h = x @ A_act.T;  h *= row_mask;  y += h @ (s·B)_act.T

with ``row_mask[i, j] = row_scale[i]`` where rank column j belongs to row i's slot, else 0. Every
row is multiplied by every active adapter (L times the work of ``grouped``); its shapes follow
the batch's adapters only, which is what ``torch.compile`` takes: ``native/graphed.py`` compiles
the decode step with :meth:`SegmentedBackend.step_part` as its arguments.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from server.engine.lora.backend import LoraBackend, LoraProjection
from server.engine.lora.batch import LoraBatchContext
from server.engine.lora.slots import LoraSlotBank


class SegmentedLora(NamedTuple):
    """One part's adapters in a step, segmented: ``delta = ((x @ A_t) * mask) @ B_t``.

    The mask is computed from ``columns`` in the step (no tensor shared between parts: dynamo
    guards on inputs that alias).
    """

    A_t: torch.Tensor  # [in, L*r_max]
    B_t: torch.Tensor  # [L*r_max, out], scaled per slot
    columns: torch.Tensor  # [L*r_max] the slot each column belongs to

    def delta(self, x: torch.Tensor, row_slots: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        """x: [N, in] -> [N, out], each row's ``row_scale · s · B (A x)`` (row_slots: [N], -1 for none)."""
        mask = (row_slots[:, None] == self.columns[None, :]).to(x.dtype) * row_scale[:, None].to(x.dtype)
        return (x @ self.A_t * mask) @ self.B_t


class _Masks:
    """The batch's row masks, one per (slots, r_max, dtype): ``[B, L*r_max]``."""

    def __init__(self, batch: LoraBatchContext) -> None:
        self._batch = batch
        self._masks: dict[tuple, torch.Tensor] = {}

    def get(self, slots: tuple[int, ...], r_max: int, dtype: torch.dtype) -> torch.Tensor:
        mask = self._masks.get((slots, r_max, dtype))
        if mask is None:
            row_slots = self._batch.row_slots
            assert row_slots is not None
            columns = torch.tensor(slots, device=row_slots.device)
            onehot = (row_slots[:, None] == columns[None, :]).to(dtype)  # [B, L]
            if self._batch.row_scale is not None:
                onehot.mul_(self._batch.row_scale[:, None].to(dtype))
            mask = self._masks[(slots, r_max, dtype)] = onehot.repeat_interleave(r_max, dim=1)
        return mask


class SegmentedBackend(LoraBackend):
    name = "segmented"

    def __init__(self, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__(device, dtype)
        # bank -> (batch slots, bank version, its slots, A_t, B_t, columns)
        self._active: weakref.WeakKeyDictionary[LoraSlotBank, tuple] = weakref.WeakKeyDictionary()
        self._null_parts: weakref.WeakKeyDictionary[LoraSlotBank, SegmentedLora] = weakref.WeakKeyDictionary()

    def prepare(self, batch: LoraBatchContext) -> _Masks:
        return _Masks(batch)

    def active_weights(
        self, bank: LoraSlotBank, batch: LoraBatchContext
    ) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bank's slots among the batch's and their factors concatenated along the rank:
        (slots, A_t [k, L*r_max], B_t [L*r_max, d], columns [L*r_max]); cached until the batch's
        slots or the bank's contents change."""
        cached = self._active.get(bank)
        if cached is None or cached[:2] != (batch.active_slots, bank.version):
            slots = tuple(s for s in batch.active_slots if s in bank.occupied)
            cached = (batch.active_slots, bank.version, slots, *bank.active_factors(slots))
            self._active[bank] = cached
        return cached[2:]

    def add_delta(
        self, projection: LoraProjection, x: torch.Tensor, y: torch.Tensor, batch: LoraBatchContext
    ) -> None:
        batch_size, seq = x.shape[0], x.shape[1]
        x2 = x.reshape(batch_size * seq, -1)
        masks: _Masks = self.plan(batch)
        for bank, (start, end) in zip(projection.banks, projection.spans, strict=True):
            if not bank.applies_to(batch):
                continue
            slots, A_t, B_t, _ = self.active_weights(bank, batch)
            h = torch.mm(x2, A_t)  # [B*T, L*r_max]
            h.view(batch_size, seq, -1).mul_(masks.get(slots, bank.r_max, h.dtype)[:, None, :])
            y[:, start:end].addmm_(h, B_t)  # [B*T, d]

    def step_part(self, bank: LoraSlotBank, batch: LoraBatchContext) -> SegmentedLora:
        """The bank's step argument for ``decode_logits``. A part no row's adapter adapts gets a
        rank-2 zero stand-in, so that every batch with adapters has the same structure and one
        compiled graph (sizes >= 2 are symbolic) serves all."""
        if bank.applies_to(batch):
            return SegmentedLora(*self.active_weights(bank, batch)[1:])
        # one stand-in per bank, never shared between parts: dynamo guards on which inputs are the
        # same tensor, so a stand-in shared by parts of equal shape recompiles when that changes
        part = self._null_parts.get(bank)
        if part is None:
            zeros = bank.A_stack.new_zeros
            columns = torch.full((2,), -2, dtype=torch.long, device=bank.A_stack.device)
            part = self._null_parts[bank] = SegmentedLora(
                zeros(bank.in_features, 2), zeros(2, bank.out_features), columns
            )
        return part
