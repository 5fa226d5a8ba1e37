"""Screening at upload: what an adapter covers of the base model, and warnings about what it does.

Users of multi-LoRA servers mostly report adapters that load fine and then do nothing, or the
wrong thing. Validation (``adapters.peft_format``) already refuses what cannot be served (an
adapter whose target modules match no module of the base is a 422 naming them); screening looks
at what *can* be served and says when it is suspicious:

    warning type          when
    no_effect             every lora_B is zero (ΔW = 0 everywhere: the adapter is the base)
    zero_modules          some modules (not all) have ΔW = 0
    unmatched_targets     entries of target_modules (a list) that match no module of the base
    rank_above_effective  the rank is ≥ RANK_FACTOR × the largest effective rank of any module
                          (and ≥ MIN_RANK_FOR_WARNING): most of the rank carries nothing
    large_update          σ₁(ΔW) / σ_max(W) > LARGE_RATIO in some module (trained adapters sit well
                          below 1; above it the update outweighs the base's strongest direction)

``coverage`` counts the adapted modules per transformer layer and in all, against the modules
of the base that LoRA can target. The σ_max(W) of each base layer is estimated by power
iteration (:class:`BaseNormCache`, once per layer per process); ``large_update`` needs the base
weights, so where they are not at hand (a cluster's store deployment) it is not checked.
No HTTP and no engine here; ``server.api.screening`` wires this to the routes.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from adapters.analysis import layer_index, module_type, natural_key
from adapters.peft_format import BaseLinearShape, LoraAdapter, VocabLayer, linear_shapes
from adapters.spectral import LowRankFactors, _effective_rank, delta_svd

RANK_FACTOR = 4.0  # rank_above_effective: r >= RANK_FACTOR x max effective rank
MIN_RANK_FOR_WARNING = 8  # ranks below this are cheap whatever their spectrum
LARGE_RATIO = 1.0  # large_update: σ₁(ΔW) / σ_max(W) above this
POWER_ITERATIONS = 40  # for σ_max(W); a lower bound within ~1% for the base weights we serve
_LISTED = 8  # modules named in a warning's message (all are in its "modules")

WeightFn = Callable[[str], torch.Tensor]  # module -> base weight W: [out, in], CPU


def coverage(adapter: LoraAdapter, base_shapes: Mapping[str, BaseLinearShape]) -> dict[str, Any]:
    """Adapted linear modules per layer and in all, next to what the base offers.

    ``{"modules": n, "of": N, "fraction": n/N, "layers": {"0": {"modules": [...], "of": 7}, ...},
    "module_types": {"q_proj": 30, ...}}``; modules outside any numbered layer count under "none".
    An adapter that changes the token embedding or the LM head adds ``"vocab": {"lm_head":
    "modules_to_save" or "lora", ...}``.
    """
    base_shapes = linear_shapes(base_shapes)
    offered: dict[str, int] = defaultdict(int)
    for module in base_shapes:
        offered[_layer_key(module)] += 1
    per_layer: dict[str, list[str]] = defaultdict(list)
    types: dict[str, int] = defaultdict(int)
    for module in sorted(adapter.layers, key=natural_key):
        per_layer[_layer_key(module)].append(module_type(module))
        types[module_type(module)] += 1
    layers = {
        key: {"modules": per_layer.get(key, []), "of": offered[key]}
        for key in sorted(offered, key=lambda k: (k == "none", int(k) if k.isdigit() else 0))
    }
    total = len(base_shapes)
    return {
        "modules": len(adapter.layers),
        "of": total,
        "fraction": len(adapter.layers) / total if total else 0.0,
        "layers": layers,
        "module_types": dict(sorted(types.items())),
        **({"vocab": {m: _vocab_kind(v) for m, v in adapter.vocab.items()}} if adapter.vocab else {}),
    }


def _vocab_kind(layer: VocabLayer) -> str:
    return "modules_to_save" if layer.replacement is not None else "lora"


def _layer_key(module: str) -> str:
    index = layer_index(module)
    return "none" if index is None else str(index)


class BaseNormCache:
    """σ_max(W) per base layer, by power iteration on first use. Thread-safe."""

    def __init__(self, weight: WeightFn) -> None:
        self.weight = weight
        self._norms: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, module: str) -> float:
        with self._lock:
            if module in self._norms:
                return self._norms[module]
        norm = spectral_norm_estimate(self.weight(module))
        with self._lock:
            self._norms[module] = norm
        return norm


def spectral_norm_estimate(W: torch.Tensor, iterations: int = POWER_ITERATIONS) -> float:
    """σ_max(W) by power iteration on WᵀW from a fixed start (deterministic); a lower bound."""
    W = W.detach().to(torch.float32)  # [d, k]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(W.shape[1], generator=generator, dtype=torch.float32).to(W.device)  # [k]
    sigma = 0.0
    for _ in range(iterations):
        y = W @ x  # [d]
        sigma = float(torch.linalg.vector_norm(y))
        if sigma == 0.0:
            return 0.0
        x = W.T @ (y / sigma)  # [k]
        x = x / torch.linalg.vector_norm(x)
    return float(torch.linalg.vector_norm(W @ x))


def screen(
    adapter: LoraAdapter,
    base_shapes: Mapping[str, BaseLinearShape],
    base_norm: Callable[[str], float] | None = None,
) -> dict[str, Any]:
    """``{"coverage": ..., "warnings": [{"type", "message", "modules"}, ...]}`` for one adapter.

    ``base_norm`` gives σ_max(W) of a base module (:class:`BaseNormCache`); None skips large_update.
    """
    warnings: list[dict[str, Any]] = []
    zero: list[str] = []
    effective: dict[str, float] = {}
    ratios: dict[str, float] = {}
    for module in sorted(adapter.layers, key=natural_key):
        w = adapter.layers[module]
        if w.scale == 0.0 or not bool(w.B.any()) or not bool(w.A.any()):
            if not w.is_dora:  # DoRA's magnitude rescales the base rows even when B·A is zero
                zero.append(module)
            continue
        S = delta_svd(LowRankFactors(A=w.A, B=w.B, scale=w.scale)).S  # [r], float64, descending
        eff = _effective_rank(S)
        if eff is not None:
            effective[module] = eff
        if base_norm is not None:
            norm = base_norm(module)
            if norm > 0:
                ratios[module] = float(S[0]) / norm

    if zero and len(zero) == len(adapter.layers) and not adapter.vocab:
        warnings.append(
            _warning(
                "no_effect",
                "no effect: every lora_B is zero (or the scale is 0), so the adapter computes exactly what "
                "the base does; PEFT initialises lora_B to zero, so this is an adapter saved before any "
                "training step. Upload the trained adapter.",
                zero,
            )
        )
    elif zero:
        warnings.append(
            _warning(
                "zero_modules",
                f"{len(zero)} of {len(adapter.layers)} modules have a zero update (lora_B or lora_A is zero): "
                f"{_names(zero)}; they change nothing.",
                zero,
            )
        )
    warnings.extend(_unmatched_targets(adapter, base_shapes))
    if effective:
        top = max(effective.values())
        rank = adapter.max_rank
        if rank >= MIN_RANK_FOR_WARNING and rank >= RANK_FACTOR * top:
            warnings.append(
                _warning(
                    "rank_above_effective",
                    f"rank {rank} is far above the effective rank of the update (at most {top:.1f} in any "
                    f"module): most of the rank carries almost nothing. POST /adapters/{{id}}/shrink keeps the "
                    "same update at a lower rank, which serves faster and takes less memory.",
                    sorted(effective, key=natural_key),
                )
            )
    large = sorted((m for m, r in ratios.items() if r > LARGE_RATIO), key=natural_key)
    if large:
        worst = max(ratios[m] for m in large)
        warnings.append(
            _warning(
                "large_update",
                f"σ₁(ΔW)/σ_max(W) is above {LARGE_RATIO:g} in {len(large)} modules (largest {worst:.3g}, usual "
                f"trained adapters stay well below 1): the update outweighs the base weight's strongest "
                f"direction in {_names(large)}; check lora_alpha (the scale) and the weights' units.",
                large,
            )
        )
    return {"coverage": coverage(adapter, base_shapes), "warnings": warnings}


def _unmatched_targets(
    adapter: LoraAdapter, base_shapes: Mapping[str, BaseLinearShape]
) -> list[dict[str, Any]]:
    targets = adapter.config.target_modules
    if isinstance(targets, str):  # a regex or 'all-linear': it matched something (validation)
        return []
    unmatched = [t for t in targets if not any(m == t or m.endswith(f".{t}") for m in base_shapes)]
    if not unmatched:
        return []
    return [
        _warning(
            "unmatched_targets",
            f"target_modules entries {_names(unmatched)} match no module of the base model (it has "
            f"{_names(sorted({module_type(m) for m in linear_shapes(base_shapes)}))}); those parts of the adapter were "
            "never trained for this base.",
            unmatched,
        )
    ]


def _warning(kind: str, message: str, modules: list[str]) -> dict[str, Any]:
    return {"type": kind, "message": message, "modules": modules}


def _names(items: list[str]) -> str:
    shown = ", ".join(repr(i) for i in items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")
