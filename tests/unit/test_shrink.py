"""adapters.shrink against the dense truncated SVD of ΔW = s·B·A (Eckart–Young)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adapters.shrink import ShrunkLayer, shrink_layer
from adapters.spectral import LowRankFactors, delta_svd

D, K, R = 48, 72, 8


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def make_factors(seed: int = 0, r: int = R, scale: float = 0.75) -> LowRankFactors:
    rng = np.random.default_rng(seed)
    A = torch.from_numpy(rng.standard_normal((r, K)).astype(np.float32))  # [r, k]
    B = torch.from_numpy(rng.standard_normal((D, r)).astype(np.float32))  # [d, r]
    return LowRankFactors(A=A, B=B, scale=scale)


def with_spectrum(sigmas: list[float], seed: int = 1) -> LowRankFactors:
    """Factors whose ΔW has exactly the singular values ``sigmas`` (scale 2, B = U Σ / 2, A = V^T)."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((D, len(sigmas))))
    V, _ = np.linalg.qr(rng.standard_normal((K, len(sigmas))))
    B = torch.from_numpy(U * np.asarray(sigmas) / 2.0)
    return LowRankFactors(A=torch.from_numpy(V.T.copy()), B=B, scale=2.0)


def dense(f: LowRankFactors) -> np.ndarray:
    return f.scale * f.B.double().numpy() @ f.A.double().numpy()  # [d, k]


def truncated(f: LowRankFactors, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rank-k truncated SVD of ΔW, all singular values of ΔW), dense float64."""
    U, S, Vh = np.linalg.svd(dense(f), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k], S


@pytest.mark.parametrize(
    ("method", "value"),
    [("sv_fro", 0.9), ("sv_cumulative", 0.6), ("sv_ratio", 3.0), ("rank", 3), ("spn_ckpt", 0.05)],
)
def test_shrunk_product_is_the_truncated_svd(method: str, value: float) -> None:
    f = make_factors()
    out = shrink_layer(f, method, value, base_spectral_norm=100.0, dtype=torch.float64)
    k = out.kept_rank
    assert isinstance(out, ShrunkLayer) and out.original_rank == R and 1 <= k <= R
    assert out.factors.scale == 1.0
    assert out.factors.A.shape == (k, K) and out.factors.B.shape == (D, k)
    ref, S = truncated(f, k)
    got = dense(out.factors)
    np.testing.assert_allclose(got, ref, atol=1e-9 * np.abs(ref).max())
    # Eckart–Young: the residual is exactly the dropped tail of the spectrum.
    S = S[:R]
    assert np.linalg.norm(dense(f) - got) == pytest.approx(math.sqrt((S[k:] ** 2).sum()), rel=1e-6, abs=1e-9)
    assert out.fro_retained == pytest.approx(math.sqrt((S[:k] ** 2).sum() / (S**2).sum()), rel=1e-9)
    assert out.fro_retained == pytest.approx(np.linalg.norm(got) / np.linalg.norm(dense(f)), rel=1e-9)


def test_kept_rank_is_minimal_for_each_method() -> None:
    f = with_spectrum([8.0, 4.0, 2.0, 1.0, 0.5])  # Σσ = 15.5, Σσ² = 85.25
    assert shrink_layer(f, "sv_ratio", 4.0, None).kept_rank == 3  # σ ≥ 2
    assert shrink_layer(f, "sv_cumulative", 0.9, None).kept_rank == 3  # 14 / 15.5 = 0.903
    assert shrink_layer(f, "sv_cumulative", 0.91, None).kept_rank == 4
    assert shrink_layer(f, "sv_fro", 0.97, None).kept_rank == 3  # √(84 / 85.25) = 0.993
    assert shrink_layer(f, "spn_ckpt", 0.1, 20.0).kept_rank == 3  # σ / 20 ≥ 0.1
    out = shrink_layer(f, "sv_fro", 0.95, None)
    assert out.kept_rank == 2 and out.fro_retained == pytest.approx(math.sqrt(80 / 85.25))
    assert out.fro_retained >= 0.95 > math.sqrt(64 / 85.25)  # one fewer would miss the target


def test_rank_method_clamps_and_keeps_everything() -> None:
    f = make_factors(2)
    out = shrink_layer(f, "rank", 50, None, dtype=torch.float64)
    assert out.kept_rank == R and out.fro_retained == pytest.approx(1.0)
    np.testing.assert_allclose(dense(out.factors), dense(f), atol=1e-9)


def test_dtype_device_and_balanced_factors() -> None:
    f = make_factors(3)
    out = shrink_layer(f, "rank", 4, None, dtype=torch.bfloat16)
    assert out.factors.A.dtype == out.factors.B.dtype == torch.bfloat16
    assert out.factors.A.device == f.A.device
    # Σ^{1/2} on each side: row norms of A' equal column norms of B' (both √σ_i).
    fp = shrink_layer(f, "rank", 4, None, dtype=torch.float64).factors
    np.testing.assert_allclose(fp.A.norm(dim=1).numpy(), fp.B.norm(dim=0).numpy(), rtol=1e-9)
    np.testing.assert_allclose(fp.A.norm(dim=1).numpy() ** 2, delta_svd(f).S[:4].numpy(), rtol=1e-9)


def test_zero_delta_keeps_one_component() -> None:
    f = make_factors(4)
    out = shrink_layer(LowRankFactors(A=f.A, B=torch.zeros_like(f.B), scale=1.0), "sv_fro", 0.9, None)
    assert out.kept_rank == 1 and out.fro_retained == 1.0
    assert float(out.factors.B.abs().max()) == 0.0


def test_precomputed_svd_is_used() -> None:
    f = make_factors(5)
    a = shrink_layer(f, "sv_fro", 0.8, None, dtype=torch.float64)
    b = shrink_layer(f, "sv_fro", 0.8, None, dtype=torch.float64, svd=delta_svd(f))
    assert a.kept_rank == b.kept_rank and torch.equal(a.factors.A, b.factors.A)


@pytest.mark.parametrize(
    ("method", "value", "allowed"),
    [
        ("sv_ratio", 0.9, ">= 1"),
        ("sv_cumulative", 0.0, r"\(0, 1\]"),
        ("sv_fro", 1.01, r"\(0, 1\]"),
        ("spn_ckpt", 0.0, "> 0"),
        ("rank", 0, "integer >= 1"),
        ("rank", 1.5, "integer >= 1"),
    ],
)
def test_out_of_range_values_raise(method: str, value: float, allowed: str) -> None:
    with pytest.raises(ValueError, match=allowed):
        shrink_layer(make_factors(), method, value, base_spectral_norm=10.0)


def test_spn_ckpt_needs_base_norm_and_unknown_method_raises() -> None:
    with pytest.raises(ValueError, match="spectral norm"):
        shrink_layer(make_factors(), "spn_ckpt", 0.1, None)
    with pytest.raises(ValueError, match="allowed"):
        shrink_layer(make_factors(), "svd", 0.1, None)
