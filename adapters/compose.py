"""Compose LoRA adapters into one: LoRAX's ``merged_adapters`` and ``POST /adapters/compose``.

Each source i adapts a module with ΔW_i = s_i · B_i A_i (A_i: [r_i, k], B_i: [d, r_i]) and has a
weight w_i. Per module, over the sources that adapt it (the union of their targets):

    linear      exact:  ΔW = Σ_i w_i · s_i · B_i A_i
                A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...]  [Σ r_i, k]      B' = [B_1 | B_2 | ...]  [d, Σ r_i]
                (PEFT's ``add_weighted_adapter(combination_type="cat")``)

    ties, dare_linear, dare_ties   PEFT's merge utilities applied to each factor on its own, as its
                ``add_weighted_adapter(combination_type=...)`` does (every source has the same rank r):
                A' = merge([A_i], sign(w_i)·√|w_i s_i|)    B' = merge([B_i], √|w_i s_i|)    [r, k], [d, r]
                merge = ties:        keep the top ``density`` of each |tensor|, elect a sign per entry,
                                     average the weighted entries that agree with it
                        dare_linear: keep each entry with probability ``density`` (rescaled by 1/density),
                                     weighted sum
                        dare_ties:   dare's random pruning, then ties' sign election and average

The composed module's scale is 1 (folded into A'), except where one source adapts it: then A and
B are kept as they are with scale w·s, so the weights [1.0] of one adapter give back the very same
factors. PEFT's rule that one source is always combined linearly is kept (whatever the strategy),
and ``linear`` adds up the weights of a source listed twice (the same ΔW, half the rank).

DARE draws its masks from a ``torch.Generator`` seeded per module from ``CompositionSpec.seed``:
the same composition gives the same adapter every time (the server derives the seed from the
composition itself, see :func:`composition_digest`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from adapters.errors import AdapterError
from adapters.peft_format import LoraAdapter, LoraConfigSpec, LoraLayerWeights

Strategy = Literal["linear", "ties", "dare_linear", "dare_ties"]
SignMethod = Literal["total", "frequency"]
STRATEGIES: tuple[str, ...] = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS: tuple[str, ...] = ("total", "frequency")
MAX_SOURCES = 16  # adapters in one composition


@dataclass(frozen=True)
class CompositionSpec:
    """How to combine the sources (LoRAX's ``merge_strategy``, ``density``, ``majority_sign_method``)."""

    strategy: Strategy = "linear"
    density: float = 1.0  # fraction of entries ties / DARE keep, in (0, 1]; linear ignores it
    majority_sign_method: SignMethod = "total"  # ties and dare_ties: sign election by sum or by count
    seed: int = 0  # DARE's random masks

    def canonical(self) -> CompositionSpec:
        """The same spec with the parameters its strategy ignores set to their defaults."""
        if self.strategy == "linear":
            return CompositionSpec("linear", seed=self.seed)
        if self.strategy == "dare_linear":
            return CompositionSpec("dare_linear", self.density, seed=self.seed)
        return self


def check_composition(weights: Sequence[float], spec: CompositionSpec, n_sources: int) -> None:
    """Raise :class:`AdapterError` (``invalid_composition``) with what to change."""
    if n_sources < 1:
        raise _invalid("name at least one adapter to compose.")
    if n_sources > MAX_SOURCES:
        raise _invalid(f"at most {MAX_SOURCES} adapters can be composed at once, got {n_sources}.")
    if len(weights) != n_sources:
        raise _invalid(f"give one weight per adapter: {n_sources} adapter(s) but {len(weights)} weight(s).")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise _invalid("weights must be finite numbers.")
    if spec.strategy not in STRATEGIES:
        raise _invalid(f"merge strategy {spec.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}.")
    if spec.majority_sign_method not in SIGN_METHODS:
        raise _invalid(
            f"majority_sign_method {spec.majority_sign_method!r} is unknown; use one of {', '.join(SIGN_METHODS)}."
        )
    if not (isinstance(spec.density, (int, float)) and 0 <= spec.density <= 1):
        raise _invalid(f"density must be in [0, 1], got {spec.density!r}.")
    if spec.strategy != "linear" and spec.density == 0 and n_sources > 1:
        raise _invalid(
            f"density 0 keeps no entry, so {spec.strategy} would compose nothing; give a density in (0, 1] "
            "(the fraction of entries kept)."
        )


def compose(
    sources: Sequence[LoraAdapter],
    weights: Sequence[float],
    spec: CompositionSpec,
    *,
    adapter_id: str,
    version: str = "1",
    max_rank: int | None = None,
) -> LoraAdapter:
    """The composed adapter (float32 factors on the CPU) over the union of the sources' modules.

    ``max_rank`` bounds each composed module's rank (``rank_too_large`` beyond it). Raises
    :class:`AdapterError` for an invalid spec or sources whose ranks ties / DARE cannot combine.
    """
    check_composition(weights, spec, len(sources))
    whole = [a.adapter_id for a in sources if a.vocab]
    if whole:
        raise AdapterError(
            f"adapter {whole[0]!r} changes the token embedding or the LM head (modules_to_save, or LoRA on "
            "them), which compositions do not combine; serve it on its own, or compose adapters of linear "
            "layers only.",
            "unsupported",
        )
    dora = [a.adapter_id for a in sources if a.is_dora]
    if dora:
        raise AdapterError(
            f"adapter {dora[0]!r} is DoRA (use_dora=true), which cannot be composed: its weight "
            "m ⊙ (W + ΔW) / ‖W + ΔW‖ is not a sum of low-rank updates, and PEFT's add_weighted_adapter "
            "would drop its magnitude. Serve it on its own, or compose plain LoRA adapters.",
            "unsupported",
        )
    weights = [float(w) for w in weights]
    strategy = spec.strategy if len(sources) > 1 else "linear"  # PEFT: one adapter is combined linearly
    if strategy == "linear":
        sources, weights = _merge_duplicates(sources, weights)
    modules = sorted({m for adapter in sources for m in adapter.layers})
    layers: dict[str, LoraLayerWeights] = {}
    for module in modules:
        present = [(a.layers[module], w) for a, w in zip(sources, weights, strict=True) if module in a.layers]
        if strategy == "linear":
            layers[module] = _linear(present)
        else:
            layers[module] = _task_arithmetic(module, present, spec, strategy)
        if max_rank is not None and layers[module].rank > max_rank:
            raise AdapterError(
                f"the composition has rank {layers[module].rank} in module {module!r}, above the server's "
                f"limit of {max_rank} (--max-rank); compose fewer adapters, or store the composition with "
                f"POST /adapters/compose and a 'rank' to recompress it.",
                "rank_too_large",
            )
    config = composed_config(sources, {m: w.rank for m, w in layers.items()})
    return LoraAdapter(adapter_id=adapter_id, config=config, layers=layers, version=version)


def composition_digest(
    sources: Iterable[tuple[str, str]], weights: Sequence[float], spec: CompositionSpec
) -> str:
    """sha256 of a composition: the sources as (id, content hash: the server passes the sha256 of
    their weights and of their config), the weights, and the spec's parameters that matter for its
    strategy. Keys the cache and seeds DARE."""
    canonical = spec.canonical()
    payload = {
        "sources": [list(s) for s in sources],
        "weights": [float(w) for w in weights],
        "strategy": canonical.strategy,
        "density": float(canonical.density),
        "majority_sign_method": canonical.majority_sign_method,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def seed_of(digest: str) -> int:
    """A 63-bit seed from a composition digest."""
    return int(digest[:16], 16) & (2**63 - 1)


# --------------------------------------------------------------------------- strategies


def _merge_duplicates(
    sources: Sequence[LoraAdapter], weights: Sequence[float]
) -> tuple[list[LoraAdapter], list[float]]:
    """``linear``: a source listed twice contributes once, with its weights added (same ΔW)."""
    order: dict[str, int] = {}
    merged: list[LoraAdapter] = []
    summed: list[float] = []
    for adapter, weight in zip(sources, weights, strict=True):
        if adapter.key in order:
            summed[order[adapter.key]] += weight
        else:
            order[adapter.key] = len(merged)
            merged.append(adapter)
            summed.append(weight)
    return merged, summed


def _linear(present: list[tuple[LoraLayerWeights, float]]) -> LoraLayerWeights:
    """Concatenated factors: ΔW = Σ w_i s_i B_i A_i exactly (one source: its factors, scale w·s)."""
    if len(present) == 1:
        ((layer, weight),) = present
        return LoraLayerWeights(A=layer.A, B=layer.B, scale=weight * layer.scale)
    A = torch.cat([layer.A * weight * layer.scale for layer, weight in present], dim=0)  # [Σr, k]
    B = torch.cat([layer.B for layer, _ in present], dim=1)  # [d, Σr]
    return LoraLayerWeights(A=A.contiguous(), B=B.contiguous(), scale=1.0)


def _task_arithmetic(
    module: str, present: list[tuple[LoraLayerWeights, float]], spec: CompositionSpec, strategy: str
) -> LoraLayerWeights:
    """PEFT's ``_generalized_task_arithmetic_weighted_adapter`` for one module."""
    ranks = [layer.rank for layer, _ in present]
    if len(set(ranks)) > 1:
        raise AdapterError(
            f"{strategy} combines the factors entry by entry, so the adapters must have the same rank in "
            f"each module they share; module {module!r} has ranks {ranks}. Use merge_strategy 'linear' "
            "(it concatenates), or shrink the adapters to one rank first (POST /adapters/{id}/shrink).",
            "incompatible_ranks",
        )
    weights_A: list[float] = []
    weights_B: list[float] = []
    for layer, weight in present:
        scaled = weight * layer.scale
        sign = 1 if scaled >= 0 else -1  # the sign on one side only
        weights_A.append(math.sqrt(abs(scaled)) * sign)
        weights_B.append(math.sqrt(abs(scaled)))
    sides = []
    for side, tensors, side_weights in (
        ("A", [layer.A for layer, _ in present], weights_A),
        ("B", [layer.B for layer, _ in present], weights_B),
    ):
        generator = torch.Generator().manual_seed(_module_seed(spec.seed, module, side))
        merged = merge_task_tensors(
            tensors, torch.tensor(side_weights), strategy, spec.density, spec.majority_sign_method, generator
        )
        sides.append(merged.to(tensors[0].dtype).contiguous())
    return LoraLayerWeights(A=sides[0], B=sides[1], scale=1.0)


def merge_task_tensors(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    strategy: str,
    density: float,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PEFT's ``ties`` / ``dare_linear`` / ``dare_ties`` (``peft.utils.merge_utils``), DARE seeded.

    tensors: n × [..]; weights: [n]. The operations are PEFT's, in PEFT's order.
    """
    if strategy == "ties":
        pruned = [magnitude_prune(t, density) for t in tensors]
    else:
        pruned = [dare_prune(t, density, generator) for t in tensors]
    stacked = torch.stack(pruned, dim=0)  # [n, ..]
    weights = weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if strategy == "dare_linear":
        return (stacked * weights).sum(dim=0)
    sign_mask = majority_sign_mask(stacked, majority_sign_method)  # elected from the unweighted tensors
    weighted = stacked * weights
    kept = (weighted * sign_mask).sum(dim=0)
    return kept / torch.clamp(sign_mask.sum(dim=0), min=1.0)


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density · numel)`` entries of largest magnitude (PEFT's ``magnitude_based_pruning``)."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    top = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def dare_prune(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Keep each entry with probability ``density`` and rescale by 1/density (PEFT's ``random_pruning``)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """[n, ..] -> bool [n, ..]: entries whose sign is the elected one (sum of values, or of signs)."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority = torch.where(magnitude >= 0, 1, -1)
    return sign == majority


def _module_seed(seed: int, module: str, side: str) -> int:
    digest = hashlib.sha256(f"{seed}:{module}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


# --------------------------------------------------------------------------- config


def composed_config(sources: Sequence[LoraAdapter], ranks: dict[str, int]) -> LoraConfigSpec:
    """A config describing the composition: its modules by full name, each with scale 1 as written
    (``adapters.analysis.shrunk_config`` writes the per-module ranks and alphas)."""
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    others = {m: k for m, k in ranks.items() if k != r}
    first = sources[0].config
    return LoraConfigSpec(
        r=r,
        lora_alpha=float(r),
        target_modules=sorted(ranks),
        rank_pattern=others,
        alpha_pattern={m: float(k) for m, k in others.items()},
        fan_in_fan_out=first.fan_in_fan_out,
        base_model_name_or_path=first.base_model_name_or_path,
    )


def compact_targets(modules: Iterable[str], base_modules: Iterable[str]) -> list[str]:
    """The shortest ``target_modules`` that selects exactly ``modules`` among ``base_modules``:
    their last name parts (``q_proj``) when those select no other module, else the full names."""
    wanted = set(modules)
    short = sorted({m.rsplit(".", 1)[-1] for m in wanted})
    selected = {m for m in base_modules if m.rsplit(".", 1)[-1] in short}
    return short if selected == wanted else sorted(wanted)


def _invalid(message: str) -> AdapterError:
    return AdapterError(message, "invalid_composition")
