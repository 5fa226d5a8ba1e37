"""LoRA on Hugging Face models' linear layers: many adapters, one batch, the base weight untouched.

    x ──► base(x) = W x ─────────────────────────────────────────────────┐
    │                                                                    ▼
    └──► A[slot[i]] x_i ──► row_scale[i] · scale[slot[i]] · B[slot[i]] (·) ──► + ──► y_i

:class:`LoraLinear` wraps one ``nn.Linear`` (or GPT-2 ``Conv1D``): its adapters live in a
:class:`LoraSlotBank` and a LoRA backend (``server/engine/lora/``) adds their updates, reading
the row → slot map from the :class:`LoraBatchContext` shared by every layer of the model; slot
``-1`` is the bare base (no adapter). A row may also scale its adapter's update
(``adapter_scale``: 0 is the base, 1 the adapter) without a slot of its own: ``row_scale[i]``.
"""

from __future__ import annotations

import torch
from torch import nn

from server.engine.lora import BASE_SLOT, LoraBackend, LoraBatchContext, LoraProjection, LoraSlotBank

__all__ = ["BASE_SLOT", "LoraBatchContext", "LoraLinear", "LoraSlotBank", "linear_shape"]


class LoraLinear(nn.Module):
    """Wraps a linear layer (``nn.Linear`` or GPT-2 ``Conv1D``) with stacked LoRA slots."""

    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        ctx: LoraBatchContext,
        backend: LoraBackend,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features = in_features
        self.out_features = out_features
        self.fan_in_fan_out = bool(linear_shape(base)[2])  # type: ignore[index]
        self.ctx = ctx
        self.bank = LoraSlotBank(in_features, out_features, base.weight.dtype, base.weight.device)
        self.lora = LoraProjection([self.bank], [(0, out_features)], backend)

    def set_slot(
        self,
        slot: int,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float,
        dora_factor: torch.Tensor | None = None,
    ) -> None:
        """Place one adapter's factors (A: [r, k], B: [d, r]) in ``slot`` (DoRA: and g, [d])."""
        self.bank.set_slot(slot, A, B, scale, dora_factor)

    def clear_slot(self, slot: int) -> None:
        self.bank.clear_slot(slot)

    def delta_weight(self, slot: int) -> torch.Tensor:
        return self.bank.delta_weight(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [B, T, d], a fresh tensor: the delta is added in place
        if self.bank.applies_to(self.ctx):
            flat = y.view(-1, self.out_features)  # [B*T, d]
            if self.lora.has_dora(self.ctx):
                self.lora.add_magnitude(flat, getattr(self.base, "bias", None), self.ctx, seq=x.shape[1])
            self.lora.add_delta(x, flat, self.ctx)
        return y


def linear_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, fan_in_fan_out) for layers LoRA can wrap, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 Conv1D
        in_features, out_features = module.weight.shape
        return int(in_features), int(out_features), True
    return None
