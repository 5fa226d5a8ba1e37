"""Shrink a LoRA layer to a lower rank by truncating the exact SVD of its update.

    ΔW = s · B @ A = U Σ V^T                       (exact, from :func:`delta_svd`)
    ΔW_k = U_k Σ_k V_k^T                           best rank-k approximation (Eckart–Young)
    B' = U_k Σ_k^{1/2}   [d, k]      A' = Σ_k^{1/2} V_k^T   [k, k_in]      scale' = 1

The scale is folded into the factors, so a PEFT writer must give each shrunk module
``lora_alpha = k`` (plain LoRA: scale = alpha / r) or ``lora_alpha = √k`` (rsLoRA) via
``rank_pattern`` / ``alpha_pattern``. Splitting Σ evenly between B' and A' keeps both factors
on the same scale, which is kinder to fp16/bf16 storage than putting Σ on one side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapters.spectral import DeltaSVD, LowRankFactors, delta_svd, rank_for_method


@dataclass(frozen=True, eq=False)
class ShrunkLayer:
    factors: LowRankFactors  # A': [kept_rank, k], B': [d, kept_rank], scale = 1.0
    kept_rank: int
    original_rank: int
    fro_retained: float  # ‖ΔW_k‖_F / ‖ΔW‖_F = √(Σ_{≤k} σ² / Σ σ²); 1.0 for an all-zero ΔW


def fro_retained(S: torch.Tensor, kept: int) -> float:
    """√(Σ_{i≤kept} σ_i² / Σ σ_i²), the Frobenius fraction of ΔW kept; 1.0 when ΔW = 0."""
    energy = S.to(torch.float64) ** 2  # [n]
    total = float(energy.sum())
    if total <= 0.0:
        return 1.0
    return min(1.0, math.sqrt(float(energy[:kept].sum()) / total))


def truncate(svd: DeltaSVD, kept: int, dtype: torch.dtype = torch.float32) -> LowRankFactors:
    """Rank-``kept`` factors B' = U_k Σ_k^{1/2}, A' = Σ_k^{1/2} V_k^T with the scale folded in."""
    root = svd.S[:kept].clamp_min(0).sqrt()  # [k]
    B = svd.U[:, :kept] * root  # [d, k]
    A = root[:, None] * svd.Vh[:kept]  # [k, k_in]
    return LowRankFactors(A=A.to(dtype).contiguous(), B=B.to(dtype).contiguous(), scale=1.0)


def shrink_layer(
    f: LowRankFactors,
    method: str,
    value: float,
    base_spectral_norm: float | None,
    dtype: torch.dtype = torch.float32,
    svd: DeltaSVD | None = None,
) -> ShrunkLayer:
    """Shrink one layer to the minimal rank meeting ``method``/``value`` (see ``rank_for_method``).

    ``base_spectral_norm`` is only needed for ``spn_ckpt``; ``svd`` may pass a precomputed
    ``delta_svd(f)``. The new factors are on ``f.A``'s device, in ``dtype``. Raises ValueError
    for an unknown method or a value outside its allowed range.
    """
    svd = svd or delta_svd(f)
    kept = rank_for_method(svd.S, method, value, base_spectral_norm)
    new = truncate(svd, kept, dtype)
    device = f.A.device
    factors = LowRankFactors(A=new.A.to(device), B=new.B.to(device), scale=1.0)
    return ShrunkLayer(
        factors=factors, kept_rank=kept, original_rank=f.rank, fro_retained=fro_retained(svd.S, kept)
    )
