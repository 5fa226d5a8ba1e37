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
        self.version += 1

    def clear_slot(self, slot: int) -> None:
        if slot in self.occupied:
            self.A_stack[slot].zero_()
            self.B_stack[slot].zero_()
            self.scale[slot] = 0
            self.occupied.discard(slot)
            self.version += 1

    def delta_weight(self, slot: int) -> torch.Tensor:
        """Dense ``scale · B @ A`` for one slot in float32: [d, k] (tests and merging only)."""
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

    def applies_to(self, batch: LoraBatchContext) -> bool:
        """True when some row of the batch reads an adapter that adapts this output."""
        return batch.row_slots is not None and any(s in self.occupied for s in batch.active_slots)
