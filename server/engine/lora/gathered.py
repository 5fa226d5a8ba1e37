"""``gathered`` (Punica BGMV semantics, the portable reference): every row reads its own slot's
factors, whatever the other rows hold::

    y[i] += row_scale[i] · scale[slot[i]] · (x[i] @ A[slot[i]].T) @ B[slot[i]].T

It reads the slot stacks as they are (no layout derived per batch), so every tensor keeps its
address while slot contents change: the form captured CUDA graphs replay (``graph_safe``;
``native/graphed.py`` takes its step arguments from :meth:`GatheredBackend.step_part`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from server.engine.lora.backend import LoraBackend, LoraProjection
from server.engine.lora.batch import LoraBatchContext
from server.engine.lora.slots import LoraSlotBank


class GatheredLora(NamedTuple):
    """One part's adapters in a graph-captured step: the bank's slot stacks themselves."""

    A_stack: torch.Tensor  # [S, r_max, in]
    B_stack: torch.Tensor  # [S, out, r_max]
    scale: torch.Tensor  # [S] the slots' own scales

    def delta(self, x: torch.Tensor, row_slots: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        """x: [N, in] -> [N, out], each row's ``row_scale · s · B (A x)`` (row_slots: [N], -1 for none)."""
        present = (row_slots >= 0) & (row_slots < self.A_stack.shape[0])  # [N]
        slots = torch.where(present, row_slots, 0)
        scale = torch.where(present, self.scale[slots], 0) * row_scale.to(self.scale.dtype)  # [N]
        h = torch.bmm(x[:, None, :], self.A_stack[slots].transpose(1, 2))  # [N, 1, r_max]
        return torch.bmm(h, self.B_stack[slots].transpose(1, 2))[:, 0] * scale[:, None]  # [N, out]


class GatheredBackend(LoraBackend):
    name = "gathered"
    graph_safe = True

    def add_delta(
        self, projection: LoraProjection, x: torch.Tensor, y: torch.Tensor, batch: LoraBatchContext
    ) -> None:
        row_slots = batch.row_slots
        assert row_slots is not None
        for bank, (start, end) in zip(projection.banks, projection.spans, strict=True):
            if not bank.applies_to(batch):
                continue
            # base rows, and rows whose adapter skips this output, read slot 0 with scale 0
            present = (row_slots >= 0) & (row_slots < bank.A_stack.shape[0])
            slots = torch.where(present, row_slots, 0)  # [B]
            scale = torch.where(present, bank.scale[slots], 0)  # [B]
            if batch.row_scale is not None:
                scale = scale * batch.row_scale.to(scale.dtype)
            A = bank.A_stack[slots]  # [B, r, k]
            B = bank.B_stack[slots]  # [B, d, r]
            h = torch.bmm(x, A.transpose(1, 2))  # [B, T, r]
            delta = torch.bmm(h, B.transpose(1, 2)) * scale[:, None, None]  # [B, T, d]
            y[:, start:end].add_(delta.reshape(-1, end - start))

    def step_part(self, bank: LoraSlotBank, batch: LoraBatchContext) -> GatheredLora | None:
        """The bank's step argument for ``decode_logits``: None when no row's adapter adapts it
        (which parts are adapted is part of a captured graph's key)."""
        return GatheredLora(bank.A_stack, bank.B_stack, bank.scale) if bank.applies_to(batch) else None
