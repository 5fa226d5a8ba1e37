"""Spectral diagnostics of LoRA updates: exact SVD of ΔW from its factors, base-model context.

Math (docs/analysis.md)
-------------------

    ΔW = s · B @ A                       B: [d, r]   A: [r, k]   (d = out, k = in)

    B   = Q_B R_B                        Q_B: [d, r]  R_B: [r, r]   (thin QR)
    A^T = Q_A R_A                        Q_A: [k, r]  R_A: [r, r]
    ΔW  = Q_B (s · R_B R_A^T) Q_A^T      only the r x r core is decomposed:
    s · R_B R_A^T = U_c Σ V_c^T  ==>  ΔW = (Q_B U_c) Σ (Q_A V_c)^T = U Σ V^T   (exact)

    The d x k product is never formed: cost O((d + k) r^2), memory O((d + k) r).

Per layer, against the base weight W: [d, k]

    sval_ratios         σ_i / σ_max(W)                       (resize_lora ``spn_ckpt`` score)
    subspace_factors    u_i^T W v_i = diag(U^T W V)
    amplification       ‖ΔW‖_F / ‖U^T W V‖_F                 (LoRA paper §7, Table 7)
    base_alignment      φ = ‖U^T U_W‖_F² / r, U_W = top-r left singular vectors of W (Fig. 8)
    effective_rank      exp(−Σ p_i ln p_i),  p_i = σ_i / Σσ   (Roy & Vetterli)
    stable_rank         ‖ΔW‖_F² / σ_1²
    energy_rank[t]      min k: Σ_{≤k} σ² ≥ t · Σ σ²

Everything on the small factors runs in float64. Rank criteria keep the *minimal* rank that
meets them (kohya's resize_lora keeps one component more); see :func:`rank_for_method`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

F64 = torch.float64

RANK_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro", "spn_ckpt", "rank")
DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro", "spn_ckpt")  # reported as recommended_rank
ENERGY_THRESHOLDS = (0.9, 0.95, 0.99)

# A threshold counts as met when missed by at most this relative amount, so that a spectrum
# that meets it exactly in real arithmetic (e.g. 0.1 + 0.2 vs 0.3) is not pushed one rank up.
_REL_SLACK = 1e-12
# W columns converted to float64 at a time when projecting U^T W V (bounds extra memory).
_W_CHUNK_COLS = 2048


# --------------------------------------------------------------------------- factors / SVD


@dataclass(frozen=True, eq=False)
class LowRankFactors:
    """One adapted linear layer: ΔW = scale · B @ A (W is [d, k] = [out_features, in_features])."""

    A: torch.Tensor  # [r, k]
    B: torch.Tensor  # [d, r]
    scale: float

    def __post_init__(self) -> None:
        ok = self.A.ndim == 2 and self.B.ndim == 2 and self.B.shape[1] == self.A.shape[0]
        if not ok or min(*self.A.shape, self.B.shape[0]) < 1:
            raise ValueError(
                "LowRankFactors needs A: [r, k] and B: [d, r] with r, d, k >= 1; "
                f"got A {tuple(self.A.shape)}, B {tuple(self.B.shape)}"
            )

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(d, k): the shape of ΔW."""
        return int(self.B.shape[0]), int(self.A.shape[1])


@dataclass(frozen=True, eq=False)
class DeltaSVD:
    """Exact thin SVD ΔW = U diag(S) Vh, float64, on the CPU.

    n = min(r, d, k) components (n = r for any real adapter). Components whose singular value
    is (numerically) zero are kept: their vectors are still orthonormal, inside span(B) / span(A^T).
    """

    U: torch.Tensor  # [d, n] float64
    S: torch.Tensor  # [n] float64, descending
    Vh: torch.Tensor  # [n, k] float64

    @property
    def rank(self) -> int:
        return int(self.S.numel())


def _as_f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=F64)


def delta_svd(f: LowRankFactors) -> DeltaSVD:
    """Exact SVD of ``f.scale * f.B @ f.A`` via QR of B and A^T and an SVD of the r x r core."""
    A = _as_f64(f.A)  # [r, k]
    B = _as_f64(f.B)  # [d, r]
    Q_B, R_B = torch.linalg.qr(B)  # [d, m], [m, r]     m = min(d, r)
    Q_A, R_A = torch.linalg.qr(A.T)  # [k, p], [p, r]   p = min(k, r)
    core = float(f.scale) * (R_B @ R_A.T)  # [m, p]
    U_c, S, Vh_c = torch.linalg.svd(core, full_matrices=False)  # [m, n], [n], [n, p]
    return DeltaSVD(U=Q_B @ U_c, S=S, Vh=Vh_c @ Q_A.T)  # [d, n], [n], [n, k]


# --------------------------------------------------------------------------- base weight


@dataclass(frozen=True, eq=False)
class BaseLayerStats:
    """What the diagnostics need from one base weight W: [d, k]. Compute once per base model.

    ``to_dict()`` keeps ``top_left`` a tensor (save with ``torch.save``; loads with
    ``weights_only=True``); ``to_dict(json_ready=True)`` makes it nested lists for JSON.
    """

    spectral_norm: float  # σ_max(W)
    fro: float  # ‖W‖_F
    top_left: torch.Tensor  # [d, q] float32, top-q left singular vectors of W

    def to_dict(self, json_ready: bool = False) -> dict[str, Any]:
        top = self.top_left.tolist() if json_ready else self.top_left
        return {"spectral_norm": self.spectral_norm, "fro": self.fro, "top_left": top}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseLayerStats:
        top = torch.as_tensor(data["top_left"], dtype=torch.float32)
        if top.ndim != 2:
            raise ValueError(f"top_left must be a [d, q] matrix, got shape {tuple(top.shape)}")
        return cls(spectral_norm=float(data["spectral_norm"]), fro=float(data["fro"]), top_left=top)


def _randomized_svd(
    W: torch.Tensor, q: int, niter: int, oversample: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-q left singular vectors and values of W by randomized subspace iteration.

    Same algorithm as ``torch.svd_lowrank`` (Halko et al. 2011, QR after every product), but
    with a private, seeded generator so the result is reproducible and the global RNG untouched.
    """
    d, k = W.shape
    p = min(q + oversample, d, k)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    G = torch.randn(k, p, generator=gen, dtype=W.dtype).to(W.device)  # [k, p]
    Q = torch.linalg.qr(W @ G).Q  # [d, p]
    for _ in range(niter):
        Z = torch.linalg.qr(W.T @ Q).Q  # [k, p]
        Q = torch.linalg.qr(W @ Z).Q  # [d, p]
    U_b, S, _ = torch.linalg.svd(Q.T @ W, full_matrices=False)  # [p, p], [p]
    return (Q @ U_b)[:, :q], S[:q]  # [d, q], [q]


def _top_left_svd(
    W: torch.Tensor, q: int, niter: int, exact_max_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-q left singular vectors [d, q] and values [q] of W: exact LAPACK SVD when small."""
    if min(W.shape) <= exact_max_dim:
        U, S, _ = torch.linalg.svd(W.to(F64), full_matrices=False)
        return U[:, :q], S[:q]
    return _randomized_svd(W.to(torch.float32), q, niter)


def base_layer_stats(
    W: torch.Tensor, top_k: int = 64, *, niter: int = 32, exact_max_dim: int = 1024
) -> BaseLayerStats:
    """σ_max(W), ‖W‖_F and the top-q left singular vectors of W (q = min(top_k, d, k)).

    W with min(d, k) ≤ ``exact_max_dim`` gets an exact float64 SVD; larger W a randomized block
    subspace iteration of width q + 10 and ``niter`` (≥ 32) rounds, whose σ_max converges at rate
    (σ_{q+11}/σ_1)^(2·niter), far inside the 1e-3 relative accuracy the diagnostics need.
    """
    if W.ndim != 2 or min(W.shape) == 0:
        raise ValueError(f"base weight must be a non-empty [d, k] matrix, got shape {tuple(W.shape)}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    Wd = W.detach()
    q = min(top_k, *Wd.shape)
    U, S = _top_left_svd(Wd, q, niter, exact_max_dim)
    fro = torch.linalg.vector_norm(Wd, dtype=F64).item()
    return BaseLayerStats(spectral_norm=float(S[0]), fro=float(fro), top_left=U.to("cpu", torch.float32))


# --------------------------------------------------------------------------- rank criteria


_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "sv_ratio": (lambda v: v >= 1, "a number >= 1"),
    "sv_cumulative": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "sv_fro": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "spn_ckpt": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "rank": (lambda v: v >= 1 and v.is_integer(), "an integer >= 1"),
}


def _check_range(method: str, value: float) -> None:
    """Raise ValueError naming the allowed range when ``value`` is outside it for ``method``."""
    if method not in _RANGES:
        raise ValueError(f"unknown rank method {method!r}; allowed: {', '.join(RANK_METHODS)}")
    in_range, allowed = _RANGES[method]
    try:
        good = in_range(float(value))
    except (TypeError, ValueError, OverflowError):
        good = False
    if not good:
        raise ValueError(f"{method} value must be {allowed}, got {value!r}")


def _minimal_prefix(weights: torch.Tensor, target: float) -> int:
    """Smallest k ≥ 1 with sum(weights[:k]) ≥ target · sum(weights); 1 when the sum is 0."""
    total = float(weights.sum())
    if total <= 0.0:
        return 1
    frac = torch.cumsum(weights, dim=0) / total  # [n], non-decreasing, ends at 1
    met = torch.nonzero(frac >= target - _REL_SLACK).flatten()
    return int(met[0]) + 1 if met.numel() else int(weights.numel())


def _count_at_least(sigmas: torch.Tensor, floor: float) -> int:
    """Number of σ_i ≥ floor (with a relative slack), at least 1."""
    return max(1, int((sigmas >= floor * (1 - _REL_SLACK)).sum()))


def rank_for_method(S: torch.Tensor, method: str, value: float, base_spectral_norm: float | None) -> int:
    """Minimal rank meeting ``method``'s criterion for the descending singular values S.

    ==============  ===========================  ================================================
    method          value                        kept rank
    ==============  ===========================  ================================================
    sv_ratio        t ≥ 1                        #{i: σ_i ≥ σ_1 / t}
    sv_cumulative   0 < t ≤ 1                    min k: Σ_{≤k} σ / Σ σ ≥ t
    sv_fro          0 < t ≤ 1                    min k: √(Σ_{≤k} σ² / Σ σ²) ≥ t
    spn_ckpt        t > 0                        #{i: σ_i / σ_max(W) ≥ t}   (needs base σ_max)
    rank            integer n ≥ 1                min(n, len(S))
    ==============  ===========================  ================================================

    Unlike kohya's resize_lora, which adds one to the index its criterion finds (keeping one
    component more than needed), this returns the *minimal* rank that meets the criterion.
    The result is always in [1, len(S)]; an all-zero spectrum gives 1.
    """
    _check_range(method, value)
    S = S.detach().to("cpu", F64).flatten()  # [n]
    n = int(S.numel())
    if n == 0:
        raise ValueError("rank_for_method needs at least one singular value")
    if method == "rank":
        return min(int(value), n)
    if method == "sv_ratio":
        return _count_at_least(S, float(S[0]) / value) if S[0] > 0 else 1
    if method == "sv_cumulative":
        return _minimal_prefix(S, value)
    if method == "sv_fro":
        return _minimal_prefix(S * S, value * value)
    # spn_ckpt
    if base_spectral_norm is None or not base_spectral_norm > 0 or not math.isfinite(base_spectral_norm):
        raise ValueError(f"spn_ckpt needs the base layer's spectral norm (> 0), got {base_spectral_norm!r}")
    return _count_at_least(S, value * base_spectral_norm) if S[0] > 0 else 1


@dataclass(frozen=True)
class RankThresholds:
    """Thresholds behind ``recommended_rank`` (one per dynamic method of :func:`rank_for_method`).

    Defaults are deliberately conservative (they recommend dropping only clearly weak
    components): sv_ratio 10 keeps everything within 20 dB of σ_1 (kohya users often pass
    2-4, which prunes much harder); sv_cumulative / sv_fro 0.9 are the usual 90% marks.
    spn_ckpt 0.01 is ten times below resize_lora's SDXL default (σ_i ≥ σ_max(W) / 10): LLM
    LoRA updates are small next to the base weight, so at 0.1 many layers would be cut to
    rank 1. It is a judgement, not a measured optimum; pass your own thresholds to tune it.
    """

    sv_ratio: float = field(default=10.0, metadata={"help": "keep σ_i ≥ σ_1 / t (within 20 dB of the top)"})
    sv_cumulative: float = field(default=0.9, metadata={"help": "keep 90% of the nuclear norm Σσ"})
    sv_fro: float = field(default=0.9, metadata={"help": "keep 90% of ‖ΔW‖_F (81% of the energy)"})
    spn_ckpt: float = field(default=0.01, metadata={"help": "keep σ_i ≥ 1% of σ_max(W)"})

    def __post_init__(self) -> None:
        for method in DYNAMIC_METHODS:
            _check_range(method, getattr(self, method))

    def items(self) -> Iterator[tuple[str, float]]:
        return ((m, float(getattr(self, m))) for m in DYNAMIC_METHODS)


# --------------------------------------------------------------------------- per-layer numbers


def _num(x: float | torch.Tensor) -> float | None:
    """A plain JSON float, or None for NaN/inf."""
    v = float(x)
    return v if math.isfinite(v) else None


def _div(a: float, b: float) -> float | None:
    return _num(a / b) if b != 0 else None


def _projected(W: torch.Tensor, svd: DeltaSVD) -> torch.Tensor:
    """U^T W V: [n, n] float64, streaming W's columns in float64 chunks on W's device."""
    U = svd.U.to(W.device)  # [d, n]
    Vh = svd.Vh.to(W.device)  # [n, k]
    M = torch.zeros(svd.rank, svd.rank, dtype=F64, device=W.device)
    for c0 in range(0, W.shape[1], _W_CHUNK_COLS):
        cols = slice(c0, c0 + _W_CHUNK_COLS)
        M += (U.T @ W[:, cols].detach().to(F64)) @ Vh[:, cols].T  # [n, c] @ [c, n]
    return M.cpu()


def _effective_rank(S: torch.Tensor) -> float | None:
    total = float(S.sum())
    if total <= 0:
        return None
    p = S[S > 0] / total
    return _num(torch.exp(-(p * torch.log(p)).sum()))


def _base_alignment(W: torch.Tensor, base: BaseLayerStats, svd: DeltaSVD) -> float | None:
    """φ(ΔW, W) = ‖U^T U_W‖_F² / n with U_W the top-n left singular vectors of W.

    None for ΔW = 0, whose singular vectors are arbitrary. Falls back to computing U_W from W
    when the cached stats hold fewer than n vectors.
    """
    n = svd.rank
    if float(svd.S[0]) <= 0.0:
        return None
    U_W = base.top_left
    if U_W.shape[1] < n:
        U_W, _ = _top_left_svd(W.detach(), n, niter=32, exact_max_dim=1024)
    G = svd.U.T @ U_W[:, :n].to("cpu", F64)  # [n, n]
    return _num((G * G).sum() / n)


def _recommended_ranks(
    S: torch.Tensor, thresholds: RankThresholds, base_norm: float
) -> dict[str, int | None]:
    """Minimal rank per dynamic method; spn_ckpt is None when σ_max(W) is 0 (undefined ratio)."""
    base = base_norm if base_norm > 0 else None
    return {
        m: rank_for_method(S, m, t, base) if (m != "spn_ckpt" or base is not None) else None
        for m, t in thresholds.items()
    }


def layer_diagnostics(
    module: str,
    f: LowRankFactors,
    W: torch.Tensor,
    base: BaseLayerStats,
    thresholds: RankThresholds | None = None,
    energy_thresholds: Sequence[float] = ENERGY_THRESHOLDS,
    svd: DeltaSVD | None = None,
) -> dict[str, Any]:
    """All §5 numbers for one adapted layer as a JSON-ready dict (plain floats, None if undefined).

    W is the base weight as [d, k] = [out, in] (transpose Conv1D / fan_in_fan_out weights first);
    ``base`` is ``base_layer_stats(W)``, usually cached; ``svd`` may pass a precomputed
    ``delta_svd(f)``. ``recommended_rank`` holds the minimal rank per method (see
    :func:`rank_for_method`), with ``thresholds`` defaulting to :class:`RankThresholds()`.
    """
    thresholds = thresholds or RankThresholds()
    d, k = f.shape
    if tuple(W.shape) != (d, k):
        raise ValueError(f"{module}: base weight is {tuple(W.shape)} but ΔW = B @ A is {(d, k)}")
    if base.top_left.shape[0] != d:
        raise ValueError(f"{module}: base stats are for a weight with {base.top_left.shape[0]} rows, not {d}")
    svd = svd or delta_svd(f)
    S = svd.S  # [n]
    sigma_1 = float(S[0])
    delta_fro = float(torch.linalg.vector_norm(S))
    M = _projected(W, svd)  # [n, n]
    factors = torch.diagonal(M)  # [n]
    energy = S * S
    return {
        "module": module,
        "shape": [d, k],
        "rank": f.rank,
        "singular_values": [float(s) for s in S],
        "delta_fro": delta_fro,
        "delta_spectral": sigma_1,
        "base_spectral_norm": float(base.spectral_norm),
        "base_fro": float(base.fro),
        "sval_ratios": [_div(float(s), base.spectral_norm) for s in S],
        "subspace_factors": [float(x) for x in factors],
        "subspace_ratios": [_div(float(s), abs(float(x))) for s, x in zip(S, factors, strict=True)],
        "amplification_factor": _div(delta_fro, float(torch.linalg.matrix_norm(M))),
        "base_alignment": _base_alignment(W, base, svd),
        "effective_rank": _effective_rank(S),
        "stable_rank": _div(delta_fro**2, sigma_1**2),
        "energy_rank": {str(t): _minimal_prefix(energy, t) for t in energy_thresholds},
        "recommended_rank": _recommended_ranks(S, thresholds, base.spectral_norm),
    }


# --------------------------------------------------------------------------- adapter level


def summarize(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Adapter-wide summary of :func:`layer_diagnostics` dicts.

    total_delta_fro = √(Σ_layers ‖ΔW‖_F²) (the norm of the whole update as one vector);
    means/medians skip layers where the value is None; ``recommended_rank`` is, per method,
    the MAX over layers — the single rank that would satisfy the criterion in every layer.
    """
    eff = [x["effective_rank"] for x in layers if x["effective_rank"] is not None]
    amp = [x["amplification_factor"] for x in layers if x["amplification_factor"] is not None]
    ratios = [r for x in layers for r in x["sval_ratios"] if r is not None]
    methods = list(dict.fromkeys(m for x in layers for m in x["recommended_rank"]))
    recommended: dict[str, int | None] = {}
    for m in methods:
        ranks = [x["recommended_rank"].get(m) for x in layers]
        ranks = [r for r in ranks if r is not None]
        recommended[m] = max(ranks) if ranks else None
    return {
        "layers": len(layers),
        "total_delta_fro": math.sqrt(sum(x["delta_fro"] ** 2 for x in layers)),
        "mean_effective_rank": statistics.fmean(eff) if eff else None,
        "median_amplification_factor": float(statistics.median(amp)) if amp else None,
        "max_sval_ratio": max(ratios) if ratios else None,
        "recommended_rank": recommended,
    }


def subspace_similarity(
    x: DeltaSVD, y: DeltaSVD, side: Literal["left", "right"] = "left"
) -> list[list[float]]:
    """LoRA paper Eq. 4: φ(i, j) = ‖U_x[:, :i]^T U_y[:, :j]‖_F² / min(i, j), i, j = 1..min(n_x, n_y).

    ``side="left"`` compares the column spaces (U, output side), ``"right"`` the row spaces
    (V, input side). Entry [i-1][j-1] holds φ(i, j); 1 means one subspace contains the other,
    ≈ max(i, j)/dim for random subspaces.
    """
    if side == "left":
        X, Y = x.U, y.U  # [d, n_x], [d, n_y]
    elif side == "right":
        X, Y = x.Vh.T, y.Vh.T  # [k, n_x], [k, n_y]
    else:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"{side} subspaces live in different dimensions: {X.shape[0]} vs {Y.shape[0]}")
    n = min(X.shape[1], Y.shape[1])
    G = X[:, :n].to(F64).T @ Y[:, :n].to(F64)  # [n, n]
    C = (G * G).cumsum(0).cumsum(1)  # C[i-1, j-1] = ‖X_i^T Y_j‖_F²
    idx = torch.arange(1, n + 1, dtype=F64)
    phi = C / torch.minimum(idx[:, None], idx[None, :])
    return [[float(v) for v in row] for row in phi]
