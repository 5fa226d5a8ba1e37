"""adapters.spectral against dense float64 numpy references (ΔW = s·B·A formed explicitly)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from adapters import spectral
from adapters.spectral import (
    BaseLayerStats,
    LowRankFactors,
    RankThresholds,
    base_layer_stats,
    delta_svd,
    layer_diagnostics,
    rank_for_method,
    subspace_similarity,
    summarize,
)

D, K, R, SCALE = 96, 160, 8, 2.0
DIAG_KEYS = {
    "module",
    "shape",
    "rank",
    "singular_values",
    "delta_fro",
    "delta_spectral",
    "base_spectral_norm",
    "base_fro",
    "sval_ratios",
    "subspace_factors",
    "subspace_ratios",
    "amplification_factor",
    "base_alignment",
    "effective_rank",
    "stable_rank",
    "energy_rank",
    "recommended_rank",
}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# --------------------------------------------------------------------------- helpers


def make_factors(seed: int, d: int = D, k: int = K, r: int = R, scale: float = SCALE) -> LowRankFactors:
    rng = np.random.default_rng(seed)
    A = torch.from_numpy(rng.standard_normal((r, k)).astype(np.float32))  # [r, k]
    B = torch.from_numpy(rng.standard_normal((d, r)).astype(np.float32))  # [d, r]
    return LowRankFactors(A=A, B=B, scale=scale)


def dense(f: LowRankFactors) -> np.ndarray:
    """ΔW = s·B·A in float64, [d, k]."""
    return f.scale * f.B.double().numpy() @ f.A.double().numpy()


def dense_svd(f: LowRankFactors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    U, S, Vh = np.linalg.svd(dense(f), full_matrices=False)
    r = f.rank
    return U[:, :r], S[:r], Vh[:r]


def known_spectrum(d: int, k: int, sigmas: np.ndarray, seed: int = 1) -> np.ndarray:
    """W = Q1 diag(σ) Q2^T with orthonormal Q1: [d, n], Q2: [k, n]."""
    rng = np.random.default_rng(seed)
    n = len(sigmas)
    Q1, _ = np.linalg.qr(rng.standard_normal((d, n)))
    Q2, _ = np.linalg.qr(rng.standard_normal((k, n)))
    return (Q1 * sigmas) @ Q2.T


def random_W(seed: int = 7, d: int = D, k: int = K) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((d, k)).astype(np.float32))


def minimal_k(S: np.ndarray, ok) -> int:
    """Brute force: smallest k in 1..n with ok(k), n if none."""
    return next((k for k in range(1, len(S) + 1) if ok(k)), len(S))


@pytest.fixture(scope="module")
def W() -> torch.Tensor:
    return random_W()


@pytest.fixture(scope="module")
def base(W: torch.Tensor) -> BaseLayerStats:
    return base_layer_stats(W)


# --------------------------------------------------------------------------- delta_svd


@pytest.mark.parametrize("scale", [2.0, -0.5])
def test_delta_svd_matches_dense(scale: float) -> None:
    f = make_factors(0, scale=scale)
    svd = delta_svd(f)
    _, S_ref, _ = dense_svd(f)
    assert svd.U.shape == (D, R) and svd.S.shape == (R,) and svd.Vh.shape == (R, K)
    assert svd.U.dtype == svd.S.dtype == svd.Vh.dtype == torch.float64
    np.testing.assert_allclose(svd.S.numpy(), S_ref, rtol=1e-6)
    assert torch.all(svd.S[:-1] >= svd.S[1:])
    recon = (svd.U * svd.S) @ svd.Vh
    np.testing.assert_allclose(recon.numpy(), dense(f), atol=1e-10 * S_ref[0])
    np.testing.assert_allclose((svd.U.T @ svd.U).numpy(), np.eye(R), atol=1e-12)
    np.testing.assert_allclose((svd.Vh @ svd.Vh.T).numpy(), np.eye(R), atol=1e-12)


def test_delta_svd_keeps_numerically_zero_components() -> None:
    f = make_factors(1, r=6)
    B = f.B.clone()
    B[:, 4:] = 0  # padded rank: two dead components
    svd = delta_svd(LowRankFactors(A=f.A, B=B, scale=f.scale))
    assert svd.S.shape == (6,)
    assert float(svd.S[4]) < 1e-12 * float(svd.S[0])
    np.testing.assert_allclose((svd.U.T @ svd.U).numpy(), np.eye(6), atol=1e-12)


def test_delta_svd_never_needs_the_dense_product() -> None:
    # ΔW would be 20000 x 20000 float64 = 3.2 GB; the factored path touches O((d + k) r).
    d = k = 20_000
    r, scale = 4, 0.25
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(r, k, generator=gen)
    B = torch.randn(d, r, generator=gen)
    t0 = time.perf_counter()
    svd = delta_svd(LowRankFactors(A=A, B=B, scale=scale))
    assert time.perf_counter() - t0 < 5.0
    assert svd.U.shape == (d, r) and svd.S.shape == (r,) and svd.Vh.shape == (r, k)
    # Independent r x r reference: σ² = eigenvalues of s² (B^T B)(A A^T).
    G_B = B.double().numpy().T @ B.double().numpy()
    G_A = A.double().numpy() @ A.double().numpy().T
    ref = np.sqrt(np.sort(np.linalg.eigvals(scale**2 * G_B @ G_A).real)[::-1])
    np.testing.assert_allclose(svd.S.numpy(), ref, rtol=1e-6)
    # A few entries of U Σ Vh against s · B[i] · A[:, j].
    for i, j in [(0, 0), (123, 19_999), (19_999, 4567)]:
        want = scale * float(B[i].double() @ A[:, j].double())
        got = float((svd.U[i] * svd.S) @ svd.Vh[:, j])
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_factors_validate_shapes() -> None:
    with pytest.raises(ValueError, match=r"A: \[r, k\]"):
        LowRankFactors(A=torch.zeros(4, 10), B=torch.zeros(8, 3), scale=1.0)


# --------------------------------------------------------------------------- base_layer_stats


@pytest.mark.parametrize("exact_max_dim", [1024, 0], ids=["exact", "randomized"])
def test_base_spectral_norm_random_W(W: torch.Tensor, exact_max_dim: int) -> None:
    stats = base_layer_stats(W, exact_max_dim=exact_max_dim)
    S_ref = np.linalg.svd(W.double().numpy(), compute_uv=False)
    assert stats.spectral_norm == pytest.approx(S_ref[0], rel=1e-3)
    assert stats.fro == pytest.approx(np.linalg.norm(W.double().numpy()), rel=1e-12)
    assert stats.top_left.shape == (D, 64)


@pytest.mark.parametrize("exact_max_dim", [1024, 0], ids=["exact", "randomized"])
def test_base_stats_known_spectrum(exact_max_dim: int) -> None:
    sigmas = 10.0 * 0.8 ** np.arange(D)
    W = torch.from_numpy(known_spectrum(D, K, sigmas))
    stats = base_layer_stats(W, top_k=8, exact_max_dim=exact_max_dim)
    assert stats.spectral_norm == pytest.approx(10.0, rel=1e-3)
    assert stats.fro == pytest.approx(math.sqrt(float((sigmas**2).sum())), rel=1e-12)
    U_ref = np.linalg.svd(W.numpy(), full_matrices=False)[0][:, :8]
    U = stats.top_left.double().numpy()
    np.testing.assert_allclose(U @ U.T, U_ref @ U_ref.T, atol=1e-5)  # same subspace


def test_base_stats_top_k_capped_by_shape() -> None:
    stats = base_layer_stats(random_W(d=12, k=40), top_k=64)
    assert stats.top_left.shape == (12, 12)


def test_base_stats_round_trip(base: BaseLayerStats, tmp_path) -> None:
    via_json = BaseLayerStats.from_dict(json.loads(json.dumps(base.to_dict(json_ready=True))))
    path = tmp_path / "stats.pt"
    torch.save(base.to_dict(), path)
    via_torch = BaseLayerStats.from_dict(torch.load(path, weights_only=True))
    for other in (via_json, via_torch):
        assert other.spectral_norm == base.spectral_norm and other.fro == base.fro
        assert torch.equal(other.top_left, base.top_left)


# --------------------------------------------------------------------------- layer_diagnostics


def test_layer_diagnostics_against_dense(W: torch.Tensor, base: BaseLayerStats, monkeypatch) -> None:
    monkeypatch.setattr(spectral, "_W_CHUNK_COLS", 7)  # exercise the chunked U^T W V
    f = make_factors(2)
    out = layer_diagnostics("model.layers.0.self_attn.q_proj", f, W, base)
    assert set(out) == DIAG_KEYS
    json.dumps(out, allow_nan=False)

    Wd = W.double().numpy()
    U, S, Vh = dense_svd(f)
    W_U, W_S, _ = np.linalg.svd(Wd, full_matrices=False)
    M = U.T @ Wd @ Vh.T  # [r, r]
    p = S / S.sum()
    assert out["module"] == "model.layers.0.self_attn.q_proj"
    assert out["shape"] == [D, K] and out["rank"] == R
    np.testing.assert_allclose(out["singular_values"], S, rtol=1e-6)
    assert out["delta_fro"] == pytest.approx(np.linalg.norm(dense(f)), rel=1e-9)
    assert out["delta_spectral"] == pytest.approx(S[0], rel=1e-9)
    assert out["base_spectral_norm"] == pytest.approx(W_S[0], rel=1e-3)
    assert out["base_fro"] == pytest.approx(np.linalg.norm(Wd), rel=1e-9)
    np.testing.assert_allclose(out["sval_ratios"], S / W_S[0], rtol=1e-3)
    np.testing.assert_allclose(out["subspace_factors"], np.diag(M), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(out["subspace_ratios"], S / np.abs(np.diag(M)), rtol=1e-5)
    assert out["amplification_factor"] == pytest.approx(
        np.linalg.norm(dense(f)) / np.linalg.norm(M), rel=1e-9
    )
    phi = np.linalg.norm(U.T @ W_U[:, :R]) ** 2 / R
    assert out["base_alignment"] == pytest.approx(phi, rel=1e-6)
    assert out["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert out["stable_rank"] == pytest.approx((S**2).sum() / S[0] ** 2, rel=1e-9)
    energy = np.cumsum(S**2) / (S**2).sum()
    for t in (0.9, 0.95, 0.99):
        assert out["energy_rank"][str(t)] == minimal_k(S, lambda k, t=t: energy[k - 1] >= t)
    assert set(out["recommended_rank"]) == {"sv_ratio", "sv_cumulative", "sv_fro", "spn_ckpt"}
    for value in [*out["singular_values"], *out["sval_ratios"], out["delta_fro"], out["stable_rank"]]:
        assert type(value) is float


def test_layer_diagnostics_recommended_ranks_follow_thresholds(W: torch.Tensor, base: BaseLayerStats) -> None:
    f = make_factors(3)
    thresholds = RankThresholds(sv_ratio=2.0, sv_cumulative=0.5, sv_fro=0.99, spn_ckpt=0.05)
    out = layer_diagnostics("m", f, W, base, thresholds=thresholds)
    S = np.asarray(out["singular_values"])
    assert out["recommended_rank"] == {
        m: rank_for_method(torch.from_numpy(S), m, t, base.spectral_norm) for m, t in thresholds.items()
    }


def test_base_alignment_falls_back_when_cache_is_short(W: torch.Tensor, base: BaseLayerStats) -> None:
    f = make_factors(4)
    short = base_layer_stats(W, top_k=2)
    assert short.top_left.shape[1] == 2 < R
    full = layer_diagnostics("m", f, W, base)["base_alignment"]
    assert layer_diagnostics("m", f, W, short)["base_alignment"] == pytest.approx(full, rel=1e-6)


def test_base_alignment_is_one_inside_the_top_subspace(W: torch.Tensor, base: BaseLayerStats) -> None:
    U_W = base.top_left[:, :R]  # [d, r]
    A = torch.randn(R, K, generator=torch.Generator().manual_seed(5))
    out = layer_diagnostics("m", LowRankFactors(A=A, B=U_W @ torch.randn(R, R), scale=1.0), W, base)
    assert out["base_alignment"] == pytest.approx(1.0, abs=1e-5)


def test_zero_delta_is_json_ready(W: torch.Tensor, base: BaseLayerStats) -> None:
    f = make_factors(5)
    out = layer_diagnostics("m", LowRankFactors(A=f.A, B=torch.zeros_like(f.B), scale=1.0), W, base)
    json.dumps(out, allow_nan=False)
    assert out["singular_values"] == [0.0] * R and out["rank"] == R
    assert out["effective_rank"] is None and out["stable_rank"] is None
    assert out["amplification_factor"] == 0.0 and out["base_alignment"] is None
    assert out["subspace_ratios"] == [0.0] * R
    assert set(out["recommended_rank"].values()) == {1}


def test_padded_rank_reports_all_singular_values(W: torch.Tensor, base: BaseLayerStats) -> None:
    f = make_factors(6)
    B = f.B.clone()
    B[:, 5:] = 0
    out = layer_diagnostics("m", LowRankFactors(A=f.A, B=B, scale=f.scale), W, base)
    assert out["rank"] == R and len(out["singular_values"]) == R
    assert max(out["singular_values"][5:]) < 1e-10 * out["delta_spectral"]
    json.dumps(out, allow_nan=False)


def test_layer_diagnostics_rejects_mismatched_base(base: BaseLayerStats) -> None:
    with pytest.raises(ValueError, match="base weight"):
        layer_diagnostics("m", make_factors(0), random_W(d=K, k=D), base)


# --------------------------------------------------------------------------- rank_for_method

SPECTRUM = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0], dtype=torch.float64)


@pytest.mark.parametrize(
    ("method", "value", "want"),
    [
        ("sv_ratio", 1.0, 1),
        ("sv_ratio", 4.0, 3),  # σ ≥ 2: the boundary value itself is kept
        ("sv_ratio", 3.9, 2),
        ("sv_ratio", 1e30, 5),  # the exact zero never qualifies
        ("sv_cumulative", 0.5, 1),  # 8 / 15.5 = 0.516
        ("sv_cumulative", 0.9, 3),  # 14 / 15.5 = 0.903
        ("sv_cumulative", 1.0, 5),  # the zero component is not needed
        ("sv_fro", 0.9, 2),  # √(80 / 85.25) = 0.969
        ("sv_fro", 0.97, 3),
        ("sv_fro", 1.0, 5),
        ("spn_ckpt", 2.0 / 80.0, 3),  # σ / 80 ≥ 0.025
        ("spn_ckpt", 0.5, 1),  # nothing qualifies: minimum rank is 1
        ("rank", 3, 3),
        ("rank", 4.0, 4),
        ("rank", 100, 6),  # clamped to the available rank
    ],
)
def test_rank_for_method_constructed_spectrum(method: str, value: float, want: int) -> None:
    assert rank_for_method(SPECTRUM, method, value, 80.0) == want


def test_rank_for_method_exact_boundaries() -> None:
    # Met exactly in real arithmetic; float rounding must not push the rank up by one.
    f64 = torch.float64
    assert rank_for_method(torch.tensor([4.0, 3.0], dtype=f64), "sv_fro", 0.8, None) == 1  # √(16/25)
    assert rank_for_method(torch.tensor([0.3, 0.2, 0.1], dtype=f64), "sv_cumulative", 0.5, None) == 1
    assert rank_for_method(torch.tensor([0.1, 0.1, 0.1], dtype=f64), "sv_cumulative", 2 / 3, None) == 2


@pytest.mark.parametrize("seed", range(5))
def test_rank_for_method_is_minimal_on_random_spectra(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sv = np.sort(rng.exponential(size=12))[::-1]
    St = torch.from_numpy(sv.copy())
    cum, cum2 = np.cumsum(sv) / sv.sum(), np.cumsum(sv**2) / (sv**2).sum()
    for t in (0.3, 0.8, 0.95):
        assert rank_for_method(St, "sv_cumulative", t, None) == minimal_k(sv, lambda k, t=t: cum[k - 1] >= t)
        want_fro = minimal_k(sv, lambda k, t=t: math.sqrt(cum2[k - 1]) >= t)
        assert rank_for_method(St, "sv_fro", t, None) == want_fro
    for t in (1.5, 10.0):
        assert rank_for_method(St, "sv_ratio", t, None) == max(1, int((sv >= sv[0] / t).sum()))
    assert rank_for_method(St, "spn_ckpt", 0.1, 5.0) == max(1, int((sv / 5.0 >= 0.1).sum()))


@pytest.mark.parametrize(
    ("method", "value", "allowed"),
    [
        ("sv_ratio", 0.5, ">= 1"),
        ("sv_ratio", float("nan"), ">= 1"),
        ("sv_cumulative", 0.0, r"\(0, 1\]"),
        ("sv_cumulative", 1.5, r"\(0, 1\]"),
        ("sv_fro", -0.1, r"\(0, 1\]"),
        ("spn_ckpt", 0.0, "> 0"),
        ("spn_ckpt", -1.0, "> 0"),
        ("rank", 0, "integer >= 1"),
        ("rank", 2.5, "integer >= 1"),
    ],
)
def test_rank_for_method_out_of_range(method: str, value: float, allowed: str) -> None:
    with pytest.raises(ValueError, match=allowed):
        rank_for_method(SPECTRUM, method, value, 80.0)


def test_rank_for_method_bad_method_and_missing_base_norm() -> None:
    with pytest.raises(ValueError, match="sv_ratio, sv_cumulative, sv_fro, spn_ckpt, rank"):
        rank_for_method(SPECTRUM, "kohya", 1.0, 80.0)
    with pytest.raises(ValueError, match="spectral norm"):
        rank_for_method(SPECTRUM, "spn_ckpt", 0.1, None)


def test_rank_thresholds_validate() -> None:
    with pytest.raises(ValueError, match=r"sv_fro value must be a number in \(0, 1\]"):
        RankThresholds(sv_fro=2.0)


# --------------------------------------------------------------------------- summarize


def test_summarize(W: torch.Tensor, base: BaseLayerStats) -> None:
    layers = [layer_diagnostics(f"m{i}", make_factors(10 + i, r=4 + 2 * i), W, base) for i in range(3)]
    out = summarize(layers)
    json.dumps(out, allow_nan=False)
    assert out["layers"] == 3
    assert out["total_delta_fro"] == pytest.approx(math.sqrt(sum(x["delta_fro"] ** 2 for x in layers)))
    assert out["mean_effective_rank"] == pytest.approx(np.mean([x["effective_rank"] for x in layers]))
    assert out["median_amplification_factor"] == pytest.approx(
        np.median([x["amplification_factor"] for x in layers])
    )
    assert out["max_sval_ratio"] == max(max(x["sval_ratios"]) for x in layers)
    for m in ("sv_ratio", "sv_cumulative", "sv_fro", "spn_ckpt"):
        assert out["recommended_rank"][m] == max(x["recommended_rank"][m] for x in layers)


def test_summarize_empty() -> None:
    out = summarize([])
    assert out["layers"] == 0 and out["total_delta_fro"] == 0.0
    assert out["mean_effective_rank"] is None and out["recommended_rank"] == {}


# --------------------------------------------------------------------------- subspace_similarity


@pytest.mark.parametrize("side", ["left", "right"])
def test_subspace_similarity_against_dense(side: str) -> None:
    fx, fy = make_factors(20, r=6), make_factors(21, r=4)
    got = np.asarray(subspace_similarity(delta_svd(fx), delta_svd(fy), side))
    Ux, _, Vhx = dense_svd(fx)
    Uy, _, Vhy = dense_svd(fy)
    X, Y = (Ux, Uy) if side == "left" else (Vhx.T, Vhy.T)
    n = 4
    want = np.array(
        [
            [np.linalg.norm(X[:, :i].T @ Y[:, :j]) ** 2 / min(i, j) for j in range(1, n + 1)]
            for i in range(1, n + 1)
        ]
    )
    assert got.shape == (n, n)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


def test_subspace_similarity_of_an_adapter_with_itself_is_one() -> None:
    svd = delta_svd(make_factors(22))
    np.testing.assert_allclose(subspace_similarity(svd, svd, "right"), np.ones((R, R)), atol=1e-12)


def test_subspace_similarity_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="side"):
        subspace_similarity(delta_svd(make_factors(0)), delta_svd(make_factors(1)), "middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="different dimensions"):
        subspace_similarity(delta_svd(make_factors(0)), delta_svd(make_factors(1, d=50)), "left")
