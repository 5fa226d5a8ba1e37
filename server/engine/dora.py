"""DoRA (weight-decomposed LoRA, PEFT's ``use_dora``): the per-row factor, and the merged weight.

A DoRA module's weight is, per output row (PEFT's ``DoraLinearLayer``)::

    W' = g ⊙ (W + s·B·A)        g = m / ‖W + s·B·A‖_row     m: [d] (lora_magnitude_vector)

The norm is a constant of the adapter and the base weight (PEFT detaches it), so loraplex computes
g once when the adapter is placed (from the pristine base weight, whatever is merged) and serves
a row of a DoRA adapter as

    y = W x + b + (g − 1) ⊙ (W x) + g ⊙ s·B(A x)        (the bias is not scaled, as in PEFT)

The second term is the projection's ``add_magnitude`` (``lora/backend.py``) on the base output;
the third is the ordinary LoRA update with B stored as g ⊙ B in the slot, so every backend serves
it unchanged. ``adapter_scale`` (a row factor t) multiplies the whole update W' − W:
``y = W x + b + t·((g − 1) ⊙ W x + g ⊙ s·B A x)``, and the merged form is W + t·(W' − W): scaling
s instead would move the norm, so ``adapter_scale`` 0.5 would not be half the adapter's change.
"""

from __future__ import annotations

import torch

from adapters.peft_format import LoraLayerWeights


def dora_factor(weight: torch.Tensor, layer: LoraLayerWeights, fan_in_fan_out: bool = False) -> torch.Tensor:
    """g = m / ‖W + s·B·A‖_row in float32: [d]. ``weight``: the base weight as stored ([d, k], or
    [k, d] when ``fan_in_fan_out``), on any device; the result is on the weight's device."""
    return _factor_and_combined(weight, layer, fan_in_fan_out)[0]


def dora_merged(weight: torch.Tensor, layer: LoraLayerWeights, fan_in_fan_out: bool = False) -> torch.Tensor:
    """W + t·(W' − W) in float32, laid out like ``weight`` (t = ``layer.weight``; t = 1 gives
    W' = g ⊙ (W + s·B·A), PEFT's merge)."""
    g, combined = _factor_and_combined(weight, layer, fan_in_fan_out)
    merged = combined * g[:, None]  # [d, k]
    if layer.weight != 1.0:
        W = weight.float().t() if fan_in_fan_out else weight.float()
        merged = W + layer.weight * (merged - W)
    return merged.t() if fan_in_fan_out else merged


def _factor_and_combined(
    weight: torch.Tensor, layer: LoraLayerWeights, fan_in_fan_out: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g [d], W + s·B·A [d, k]) in float32. A row whose norm is 0 (a zero base row the update
    leaves zero) keeps g = 1 where PEFT would divide by zero."""
    assert layer.magnitude is not None, "not a DoRA layer"
    W = weight.float().t() if fan_in_fan_out else weight.float()  # [d, k]
    device = W.device
    combined = W + layer.scale * (layer.B.to(device, torch.float32) @ layer.A.to(device, torch.float32))
    norm = torch.linalg.norm(combined, dim=1)  # [d]
    m = layer.magnitude.to(device, torch.float32)
    g = torch.where(norm > 0, m / torch.where(norm > 0, norm, 1.0), 1.0)
    return g, combined
