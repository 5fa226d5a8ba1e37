"""Adapter slot storage: one adaptable output's resident adapters, stacked and rank-padded.

No kernel is chosen here: a :class:`LoraSlotBank` holds the factors, and a backend
(``backend.py``) reads them in whatever layout it needs.
"""

from __future__ import annotations

import torch

from server.engine.lora.batch import BASE_SLOT, LoraBatchContext

__all__ = ["BASE_SLOT", "LoraSlotBank"]


class LoraSlotBank:
    """One adaptable output's stacked, rank-padded adapter slots.

    A plain linear layer owns one bank; a fused projection (q/k/v in one matrix) owns one bank per
    part, each adding into its own column slice of the fused output. A bank is the ``LoraTarget``
    of its PEFT module name. ``version`` changes whenever a slot's content does: backends key the
    layouts they derive from the slots on it.
    """

    fan_in_fan_out = False  # banks store A: [r, in] and B: [out, r] whatever the base layout

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device) -> None:
        self.in_features = in_features
        self.out_features = out_features
        self._dtype, self._device = dtype, device
        self.version = 0
        # Stacked slots; allocated lazily and grown when an adapter needs more room.
        self.A_stack = torch.zeros(0, 0, in_features, dtype=dtype, device=device)  # [S, r_max, k]
        self.B_stack = torch.zeros(0, out_features, 0, dtype=dtype, device=device)  # [S, d, r_max]
        self.scale = torch.zeros(0, dtype=dtype, device=device)  # [S]
        self.occupied: set[int] = set()
        # DoRA: g − 1 per slot and output feature (0 for plain LoRA slots); None until a DoRA
        # adapter is placed. Its slots' B_stack holds g ⊙ B (see server/engine/dora.py).
        self.magnitude_stack: torch.Tensor | None = None  # [S, d]
        self.dora_slots: set[int] = set()

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

    def set_slot(
        self,
        slot: int,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float,
        dora_factor: torch.Tensor | None = None,
    ) -> None:
        """Place one adapter's factors (A: [r, k], B: [d, r]) in ``slot``; a DoRA adapter also
        gives its factor g = m / ‖W + s·B·A‖_row ([d], ``server/engine/dora.py``)."""
        r = A.shape[0]
        self._grow(slot + 1, r)
        self.A_stack[slot].zero_()
        self.B_stack[slot].zero_()
        self.A_stack[slot, :r] = A.to(self._device, self._dtype)
        if dora_factor is None:
            self.B_stack[slot, :, :r] = B.to(self._device, self._dtype)
        else:  # g ⊙ B in float32, then the serving dtype
            g = dora_factor.to(self._device, torch.float32)
            self.B_stack[slot, :, :r] = (B.to(self._device, torch.float32) * g[:, None]).to(self._dtype)
        self._set_magnitude(slot, dora_factor)
        self.scale[slot] = scale
        self.occupied.add(slot)
        self.version += 1

    def _set_magnitude(self, slot: int, dora_factor: torch.Tensor | None) -> None:
        if dora_factor is None:
            if slot in self.dora_slots:
                assert self.magnitude_stack is not None
                self.magnitude_stack[slot].zero_()
                self.dora_slots.discard(slot)
            return
        stack = self.magnitude_stack
        if stack is None or stack.shape[0] <= slot:
            grown = torch.zeros(
                self.A_stack.shape[0], self.out_features, dtype=self._dtype, device=self._device
            )
            if stack is not None:
                grown[: stack.shape[0]] = stack
            self.magnitude_stack = stack = grown
        stack[slot] = (dora_factor.to(self._device, torch.float32) - 1).to(self._dtype)
        self.dora_slots.add(slot)

    def clear_slot(self, slot: int) -> None:
        if slot in self.occupied:
            self.A_stack[slot].zero_()
            self.B_stack[slot].zero_()
            self.scale[slot] = 0
            self._set_magnitude(slot, None)
            self.occupied.discard(slot)
            self.version += 1

    def delta_weight(self, slot: int) -> torch.Tensor:
        """Dense ``scale · B @ A`` for one slot in float32: [d, k] (tests only; a DoRA slot's
        B holds g ⊙ B)."""
        A = self.A_stack[slot].float()
        B = self.B_stack[slot].float()
        return float(self.scale[slot]) * (B @ A)

    def grouped_factors(self, slots: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors of ``slots`` one group each, zero for a slot this bank does not hold:
        (A_g [L, k, r_max], (scale·B)_g [L, r_max, d])."""
        held = [s for s in slots if s in self.occupied]
        A = self.A_stack.new_zeros(len(slots), self.r_max, self.in_features)  # [L, r, k]
        B = self.B_stack.new_zeros(len(slots), self.r_max, self.out_features)  # [L, r, d]
        if held:
            at = torch.tensor([slots.index(s) for s in held], device=A.device)
            idx = torch.tensor(held, device=A.device)
            A[at] = self.A_stack[idx]
            B[at] = (self.B_stack[idx] * self.scale[idx][:, None, None]).transpose(1, 2)
        return A.transpose(1, 2), B

    def active_factors(self, slots: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The factors of ``slots`` (all held here) concatenated along the rank: (A_t [k, L*r_max],
        (scale·B)_t [L*r_max, d], the slot of each rank column [L*r_max])."""
        idx = torch.tensor(slots, device=self.A_stack.device)
        A_t = self.A_stack[idx].reshape(-1, self.in_features).t().contiguous()  # [k, L*r_max]
        B = (self.B_stack[idx] * self.scale[idx][:, None, None]).permute(1, 0, 2)  # [d, L, r_max]
        B_t = B.reshape(self.out_features, -1).t().contiguous()  # [L*r_max, d]
        return A_t, B_t, idx.repeat_interleave(self.r_max)

    def dora_rows(self, batch: LoraBatchContext) -> torch.Tensor | None:
        """Each row's ``row_scale · (g − 1)`` for this output: [B, d], 0 on rows that are not of a
        DoRA adapter here; None when no row of the batch is."""
        if batch.row_slots is None or not any(s in self.dora_slots for s in batch.active_slots):
            return None
        stack = self.magnitude_stack
        assert stack is not None
        present = (batch.row_slots >= 0) & (batch.row_slots < stack.shape[0])  # [B]
        rows = stack[torch.where(present, batch.row_slots, 0)] * present[:, None].to(stack.dtype)  # [B, d]
        if batch.row_scale is not None:
            rows = rows * batch.row_scale[:, None].to(stack.dtype)
        return rows

    def applies_to(self, batch: LoraBatchContext) -> bool:
        """True when some row of the batch reads an adapter that adapts this output."""
        return batch.row_slots is not None and any(s in self.occupied for s in batch.active_slots)
