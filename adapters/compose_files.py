"""A composed adapter written as a regular PEFT adapter (``POST /adapters/compose``), optionally
recompressed to a lower rank.

    as composed:   A' = A,  B' = scale · B                                  scale' = 1
    with rank k:   ΔW = scale · B A = U Σ V^T (exact, ``adapters.spectral.delta_svd``)
                   B' = U_k Σ_k^½,  A' = Σ_k^½ V_k^T                         (``adapters.shrink.truncate``)
                   relative error = ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = √(Σ_{i>k} σ_i² / Σ σ_i²)

Every module is written with ``lora_alpha`` = its rank (scale 1 in PEFT and in loraplex), as the
shrink route does (``adapters.analysis.shrunk_config``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from adapters.analysis import factor_files, natural_key, shrunk_config
from adapters.archive import AdapterFiles
from adapters.compose import compact_targets
from adapters.peft_format import LoraAdapter
from adapters.shrink import truncate
from adapters.spectral import LowRankFactors, delta_svd


@dataclass(frozen=True)
class ComposedFiles:
    files: AdapterFiles  # adapter_config.json + adapter_model.safetensors
    layers: list[dict[str, Any]]  # per module: module, rank (composed), stored_rank, relative_error
    relative_error: float  # of the whole update: √(Σ_modules lost energy / Σ_modules energy)


def relative_error(S: torch.Tensor, kept: int) -> float:
    """‖ΔW − ΔW_k‖_F / ‖ΔW‖_F for singular values ``S`` (descending) truncated to ``kept``; 0 for ΔW = 0."""
    energy = S.to(torch.float64) ** 2  # [n]
    total = float(energy.sum())
    if total <= 0.0:
        return 0.0
    return math.sqrt(max(float(energy[kept:].sum()), 0.0) / total)


def composed_files(
    adapter: LoraAdapter, base_modules: Iterable[str], rank: int | None = None
) -> ComposedFiles:
    """The PEFT files of ``adapter`` (each module's scale folded into B), or with ``rank``, of the
    truncated SVD of each module's ΔW to at most ``rank`` components."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    report: list[dict[str, Any]] = []
    lost = total = 0.0
    for module in sorted(adapter.layers, key=natural_key):
        layer = adapter.layers[module]
        if rank is None:
            A, B = layer.A, layer.B if layer.scale == 1.0 else layer.B * layer.scale  # [r, k], [d, r]
            error = 0.0
        else:
            svd = delta_svd(LowRankFactors(A=layer.A, B=layer.B, scale=layer.scale))
            kept = min(rank, svd.rank)
            truncated = truncate(svd, kept, torch.float32)
            A, B = truncated.A, truncated.B  # [kept, k], [d, kept]
            error = relative_error(svd.S, kept)
            energy = svd.S.to(torch.float64) ** 2  # [n]
            lost, total = lost + float(energy[kept:].sum()), total + float(energy.sum())
        factors[module] = (A, B)
        report.append(
            {"module": module, "rank": layer.rank, "stored_rank": int(A.shape[0]), "relative_error": error}
        )
    targets = compact_targets(factors, base_modules)
    source = dataclasses.replace(adapter.config, target_modules=targets, layers_to_transform=None)
    config = shrunk_config(source, {m: int(A.shape[0]) for m, (A, _) in factors.items()})
    overall = math.sqrt(lost / total) if total > 0 else 0.0
    return ComposedFiles(files=factor_files(config, factors), layers=report, relative_error=overall)
