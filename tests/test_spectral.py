"""Spectral engine: lowrank_svd, certified top-k (structured, subspace, dense) against the
two-SVD float64 reference of the same float32 inputs, and the certificates' meaning (the
property-based sweep is in test_numerics_properties.py, base spectra in test_base_spectrum.py)."""

import pytest
import torch
from reference import dense_detect, lowrank_svd_reference, topk_reference

from intruder_ext.spectral import (BaseSpectrum, base_spectrum, dense_topk, lora_topk,
                                   lowrank_svd, weight_topk)

K = 10
EPS = 0.5


def orthonormal(rows, cols, gen):
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))[0]


def spectrum_matrix(m, n, S, gen):
    """float32 matrix with singular values S and random orthogonal factors (built in float64);
    also returns the left factor."""
    p = min(m, n)
    U = orthonormal(m, p, gen)
    return ((U * S) @ orthonormal(n, p, gen).T).float(), U


def decaying(p, top=10.0):
    # A steep top (relative gaps of several percent) over a linear bulk whose absolute gaps
    # (2/p) keep every base singular vector resolvable in float32: the float32 answers can then
    # meet the float64 reference to 1e-4. (Gaps of 1% at the top already put a float32 dense
    # SVD's own error near 1e-4: the base's float32 backward error, ~sqrt(p) ulps, over the gap.)
    i = torch.arange(p, dtype=torch.float64)
    return top * torch.exp(-i / 8) + 2 * (1 - i / p) + 0.5


def lora_case(m, n, r, scale, seed, S0=None):
    """W0 with spectrum S0 and a LoRA whose first half of B leans on W0's top directions (those
    columns do not intrude) and second half is random (those do, once scale is large)."""
    gen = torch.Generator().manual_seed(seed)
    p = min(m, n)
    S0 = decaying(p) if S0 is None else S0
    W0, U0 = spectrum_matrix(m, n, S0, gen)
    B = torch.randn(m, r, generator=gen, dtype=torch.float64) / m ** 0.5
    half = r // 2
    B[:, :half] += 3 * U0[:, torch.randperm(max(8, half), generator=gen)[:half]]
    A = torch.randn(r, n, generator=gen, dtype=torch.float64) / n ** 0.5
    return W0, B.float(), A.float(), scale


def assert_matches_reference(topk, W0, W, k=K, cos_tol=1e-4, sigma_tol=1e-5):
    ref = dense_detect(W0, W, k, EPS)
    sigma, max_cos = ref["sigma"], ref["max_cos"]
    assert topk.sigma.shape == (k,) and topk.max_cos.shape == (k,)
    torch.testing.assert_close(topk.sigma.double(), sigma, rtol=sigma_tol, atol=0)
    torch.testing.assert_close(topk.max_cos.double(), max_cos, rtol=0, atol=cos_tol)
    # Same intruder set, except for values within the tolerance of epsilon itself.
    near = (max_cos - EPS).abs() < cos_tol
    assert torch.equal((topk.max_cos.double() < EPS)[~near], (max_cos < EPS)[~near])
    return max_cos


def assert_genuine_triplets(topk, W, tol=2e-5):
    """U orthonormal, W^T U = Vh^T diag(sigma), and the returned certificate is honest."""
    k = topk.sigma.shape[0]
    eye = torch.eye(k, dtype=topk.U.dtype)
    torch.testing.assert_close(topk.U.mT @ topk.U, eye, atol=tol, rtol=0)
    torch.testing.assert_close(topk.Vh @ topk.Vh.mT, eye, atol=tol, rtol=0)
    Wd = W.double()
    torch.testing.assert_close(Wd.mT @ topk.U.double(), topk.Vh.double().mT * topk.sigma.double(),
                               atol=tol * float(topk.sigma[0]), rtol=0)
    assert bool((topk.sigma[:-1] >= topk.sigma[1:]).all())


# ---------------------------------------------------------------------------------------------
# lowrank_svd

@pytest.mark.parametrize("shape", [(40, 30, 5), (30, 40, 5), (20, 25, 32), (50, 50, 1)])
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_lowrank_svd_matches_dense_svd(shape, batch):
    m, n, r = shape
    gen = torch.Generator().manual_seed(1)
    B = torch.randn(*batch, m, r, generator=gen)
    A = torch.randn(*batch, r, n, generator=gen)
    U, S, Vh = lowrank_svd(B, A, scale=-0.7)
    _, S_ref, _ = lowrank_svd_reference(B, A, -0.7)
    p = min(m, n, r)
    assert U.shape == (*batch, m, p) and S.shape == (*batch, p) and Vh.shape == (*batch, p, n)
    torch.testing.assert_close(S.double(), S_ref, rtol=1e-5, atol=1e-5 * float(S_ref.max()))
    torch.testing.assert_close((U * S[..., None, :]) @ Vh, -0.7 * B @ A, rtol=0, atol=1e-4)
    torch.testing.assert_close(U.mT @ U, torch.eye(p).expand(*batch, p, p), atol=1e-5, rtol=0)


def test_lowrank_svd_rank_deficient_broadcast_and_half_inputs():
    gen = torch.Generator().manual_seed(2)
    B = torch.randn(30, 4, generator=gen)
    B = torch.cat([B, B[:, :2]], dim=1)  # rank 4 of 6
    A = torch.randn(3, 6, 20, generator=gen)  # batch of 3 sharing one B
    U, S, Vh = lowrank_svd(B.bfloat16(), A.bfloat16())
    assert U.dtype == torch.float32 and U.shape == (3, 30, 6)
    _, S_ref, _ = lowrank_svd_reference(B.bfloat16().float(), A.bfloat16().float())
    torch.testing.assert_close(S.double(), S_ref, rtol=0, atol=1e-4 * float(S_ref.max()))
    assert float(S[..., 4:].abs().max()) < 1e-4 * float(S.max())


def test_lowrank_svd_errors():
    B, A = torch.randn(8, 3), torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"lowrank_svd: B \(\.\.\., m, r\) and A \(\.\.\., r, n\) "
                                         r"must share r \(got B \(8, 3\) and A \(4, 5\)\)"):
        lowrank_svd(B, A)
    with pytest.raises(ValueError, match=r"lowrank_svd: A must have at least 2 dims \(got shape \(5,\)\)"):
        lowrank_svd(B, torch.randn(5))
    with pytest.raises(TypeError, match="lowrank_svd: B must be a floating-point tensor"):
        lowrank_svd(torch.ones(8, 3, dtype=torch.int64), torch.randn(3, 5))
    with pytest.raises(ValueError, match="lowrank_svd: batch dims of B and A do not broadcast"):
        lowrank_svd(torch.randn(2, 8, 3), torch.randn(3, 3, 5))
    with pytest.raises(ValueError, match=r"lowrank_svd: scale must be a finite number \(got nan\)"):
        lowrank_svd(B, torch.randn(3, 5), scale=float("nan"))


# ---------------------------------------------------------------------------------------------
# lora_topk against the two-SVD reference

SHAPES = {"square": (384, 384), "wide": (300, 520), "tall": (520, 300)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("r", [1, 16, 64])
@pytest.mark.parametrize("scale", [0.3, 6.0])
def test_lora_topk_matches_two_svd_reference(shape, r, scale):
    m, n = SHAPES[shape]
    W0, B, A, s = lora_case(m, n, r, scale, seed=r)
    base = base_spectrum(W0)
    topk = lora_topk(base, B, A, s, K, on_failure="raise")
    assert topk.method == "structured" and topk.converged
    W = W0 + s * (B @ A)
    assert float(topk.residual.max()) <= 1e-6
    assert_matches_reference(topk, W0, W)
    assert_genuine_triplets(topk, W)


def test_lora_cases_have_varied_intruders():
    """The reference cases above are meaningful: none, some and many intruders occur."""
    counts = set()
    for r, scale in [(4, 0.3), (16, 6.0), (64, 6.0), (4, 6.0)]:
        W0, B, A, s = lora_case(384, 384, r, scale, seed=r)
        counts.add(len(dense_detect(W0, W0 + s * B @ A, K, EPS)["intruders"]))
    assert 0 in counts and any(0 < c < K for c in counts) and len(counts) >= 3


def test_lora_topk_small_problem_uses_exact_eigh():
    W0, B, A, s = lora_case(48, 40, 8, 4.0, seed=3)
    topk = lora_topk(base_spectrum(W0), B, A, s, 6)
    assert topk.method == "structured" and topk.converged
    assert_matches_reference(topk, W0, W0 + s * B @ A, k=6)


def test_lora_topk_near_equal_top_spectrum():
    # Top 16 singular values within 0.2% of each other (gaps 1e-4 relative), k-th boundary inside.
    p = 400
    S0 = decaying(p, top=4.0)
    S0[:16] = 10 * (1 - 1e-4 * torch.arange(16, dtype=torch.float64))
    W0, B, A, s = lora_case(p, p, 4, 0.05, seed=5, S0=S0)
    W = W0 + s * (B @ A)
    topk = lora_topk(base_spectrum(W0), B, A, s, K, block=24, on_failure="raise")
    assert topk.converged
    ref = dense_detect(W0, W, K, EPS)
    sigma, U_ref = ref["sigma"], ref["U"]
    torch.testing.assert_close(topk.sigma.double(), sigma, rtol=1e-5, atol=0)
    assert_genuine_triplets(topk, W)
    # Individual vectors in a cluster are ill-conditioned; the top-k subspace is not (gap to 17+).
    overlap = torch.linalg.svdvals(U_ref.mT @ topk.U.double())
    assert float(overlap.min()) > 1 - 1e-4


def test_lora_topk_close_top_spectrum_vectors():
    # Relative gaps of 1% at the top: individual vectors are well defined and must match.
    p = 400
    S0 = decaying(p, top=4.0)
    S0[:14] = 10 * (1 - 1e-2 * torch.arange(14, dtype=torch.float64))
    W0, B, A, s = lora_case(p, p, 8, 0.5, seed=6, S0=S0)
    topk = lora_topk(base_spectrum(W0), B, A, s, K, on_failure="raise")
    assert_matches_reference(topk, W0, W0 + s * B @ A)


def test_lora_topk_zero_adapter_returns_base_top():
    W0, B, A, s = lora_case(300, 300, 8, 1.0, seed=7)
    base = base_spectrum(W0)
    topk = lora_topk(base, torch.zeros_like(B), A, s, K)
    torch.testing.assert_close(topk.sigma, base.S[:K], rtol=1e-5, atol=0)
    torch.testing.assert_close(topk.max_cos, torch.ones(K), atol=1e-4, rtol=0)
    assert torch.equal(topk.argmax, torch.arange(K))


def test_lora_topk_float64():
    W0, B, A, s = lora_case(320, 280, 16, 5.0, seed=8)
    topk = lora_topk(base_spectrum(W0, dtype=torch.float64), B, A, s, K)
    assert topk.sigma.dtype == topk.max_cos.dtype == topk.angle_bound.dtype == torch.float64
    assert float(topk.residual.max()) <= 1e-6
    assert_matches_reference(topk, W0, W0 + s * B.double() @ A.double(), cos_tol=1e-6,
                             sigma_tol=1e-7)


def test_lora_topk_failure_raises_or_falls_back():
    W0, B, A, s = lora_case(384, 384, 16, 6.0, seed=9)
    base = base_spectrum(W0)
    with pytest.raises(RuntimeError, match=r"lora_topk: top-10 did not converge: largest residual "
                                           r"[0-9.e+-]+ > tol 1e-12 after [0-9]+ iterations \(max_iter=1\)"):
        lora_topk(base, B, A, s, K, tol=1e-12, max_iter=1, on_failure="raise")
    with pytest.warns(RuntimeWarning, match="lora_topk: top-10 did not converge.*falling back to a dense SVD"):
        topk = lora_topk(base, B, A, s, K, tol=1e-12, max_iter=1)
    assert topk.method == "dense"
    assert_matches_reference(topk, W0, W0 + s * B @ A)


def test_lora_topk_errors():
    W0, B, A, s = lora_case(64, 48, 4, 1.0, seed=10)
    base = base_spectrum(W0)
    with pytest.raises(ValueError, match=r"lora_topk: B must be \(m, r\) and A \(r, n\) with \(m, n\) = "
                                         r"\(64, 48\) the base weight's shape \(got B \(48, 4\) and A \(4, 48\)\)"):
        lora_topk(base, B[:48], A, s, 3)
    with pytest.raises(ValueError, match=r"lora_topk: k must be in \[1, min\(m, n\)\] = \[1, 48\] \(got 49\)"):
        lora_topk(base, B, A, s, 49)
    with pytest.raises(ValueError, match=r"lora_topk: on_failure must be 'dense' or 'raise' \(got 'ignore'\)"):
        lora_topk(base, B, A, s, 3, on_failure="ignore")
    with pytest.raises(ValueError, match=r"lora_topk: tol must be a positive number \(got -1\)"):
        lora_topk(base, B, A, s, 3, tol=-1)
    with pytest.raises(ValueError, match=r"lora_topk: max_iter must be a positive int \(got 0\)"):
        lora_topk(base, B, A, s, 3, max_iter=0)
    with pytest.raises(ValueError, match=r"lora_topk: scale must be a finite number \(got inf\)"):
        lora_topk(base, B, A, float("inf"), 3)
    with pytest.raises(TypeError, match=r"lora_topk: base must be a BaseSpectrum \(got Tensor\)"):
        lora_topk(W0, B, A, s, 3)
    with pytest.raises(ValueError, match=r"lora_topk: A must be 2-D \(got shape \(1, 4, 48\)\)"):
        lora_topk(base, B, A[None], s, 3)
    half = BaseSpectrum(base.U.half(), base.S.half(), base.weight)
    with pytest.raises(TypeError, match=r"lora_topk: dtype must be torch.float32 or torch.float64 "
                                        r"\(got torch.float16\)"):
        lora_topk(half, B, A, s, 3)


# ---------------------------------------------------------------------------------------------
# weight_topk (general path) and dense_topk

def full_finetune_case(m, n, seed):
    """A 'fully fine-tuned' W: W0 plus dense noise plus two strong new directions."""
    gen = torch.Generator().manual_seed(seed)
    p = min(m, n)
    W0, _ = spectrum_matrix(m, n, decaying(p), gen)
    noise = 0.02 * torch.randn(m, n, generator=gen)
    spikes = 25 * torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen) / (m * n) ** 0.5
    return W0, W0 + noise + spikes


@pytest.mark.parametrize("shape", list(SHAPES))
def test_weight_topk_matches_two_svd_reference(shape):
    m, n = SHAPES[shape]
    W0, W = full_finetune_case(m, n, seed=11)
    base = base_spectrum(W0)
    topk = weight_topk(W, base, K, on_failure="raise")
    assert topk.method == "subspace" and topk.converged
    max_cos = assert_matches_reference(topk, W0, W)
    assert 0 < int((max_cos < EPS).sum()) < K
    assert_genuine_triplets(topk, W)


def test_weight_topk_failure_and_errors():
    W0, W = full_finetune_case(300, 300, seed=12)
    base = base_spectrum(W0)
    with pytest.raises(RuntimeError, match=r"weight_topk: top-10 did not converge: largest residual .* "
                                           r"> tol 1e-12 after [0-9]+ iterations \(max_iter=1\)"):
        weight_topk(W, base, K, tol=1e-12, max_iter=1, on_failure="raise")
    with pytest.warns(RuntimeWarning, match="weight_topk: .*falling back to a dense SVD"):
        assert weight_topk(W, base, K, tol=1e-12, max_iter=1).method == "dense"
    with pytest.raises(ValueError, match=r"weight_topk: W must have the base weight's shape \(300, 300\) "
                                         r"\(got \(300, 299\)\)"):
        weight_topk(W[:, :299], base, K)
    with pytest.raises(ValueError, match=r"weight_topk: block must be a positive int \(got 0\)"):
        weight_topk(W, base, K, block=0)


def test_dense_topk_matches_reference():
    W0, W = full_finetune_case(200, 150, seed=13)
    topk = dense_topk(W, base_spectrum(W0), K)
    assert topk.method == "dense"
    assert_matches_reference(topk, W0, W)
    assert_genuine_triplets(topk, W)
    with pytest.raises(ValueError, match=r"dense_topk: k must be in \[1, min\(m, n\)\] = \[1, 150\] \(got 0\)"):
        dense_topk(W, base_spectrum(W0), 0)


def test_base_spectrum_errors_and_dtype():
    W0 = torch.randn(20, 30, dtype=torch.float64)
    base = base_spectrum(W0)
    assert base.dtype == torch.float32 and base.shape == (20, 30) and base.weight is not None
    assert base.U.shape == (20, 20) and base.S.shape == (20,)
    assert torch.equal(base.weight, W0)  # attached as given, in its own dtype
    torch.testing.assert_close(torch.linalg.svdvals(W0), base.S.double(), atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match=r"base_spectrum: dtype must be torch.float32 or torch.float64 "
                                        r"\(got torch.bfloat16\)"):
        base_spectrum(W0, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"base_spectrum: W0 must be 2-D \(got shape \(2, 20, 30\)\)"):
        base_spectrum(W0.expand(2, 20, 30))
    with pytest.raises(ValueError, match=r"base_spectrum: method must be one of \('auto', 'gram', "
                                         r"'svd'\) \(got 'eig'\)"):
        base_spectrum(W0, method="eig")
    bad = W0.clone()
    bad[3, 4] = float("nan")
    for method in ("gram", "svd"):
        with pytest.raises(ValueError, match=r"base_spectrum: W0 has non-finite entries"):
            base_spectrum(bad, method=method)
        with pytest.raises(ValueError, match=r"base_spectrum: W0 has non-finite entries"):
            base_spectrum(bad.mT, method=method)
    huge = W0.clone()
    huge[3, 4] = 1e200  # finite, but its square is not
    with pytest.raises(ValueError, match=r"base_spectrum: W0's squared row or column norms "
                                         r"overflow float64 \(largest \|entry\| 1e\+200\)"):
        base_spectrum(huge)


def test_base_spectrum_class_checks_and_to():
    W0 = torch.randn(12, 8).bfloat16()
    base = base_spectrum(W0)
    moved = base.to(dtype=torch.float64)
    assert moved.dtype == torch.float64 and moved.weight.dtype == torch.bfloat16
    assert moved.shape == (12, 8) and moved.device == W0.device
    with pytest.raises(ValueError, match=r"BaseSpectrum: U must be \(m, p\) and S \(p,\) with "
                                         r"\(m, n\) = \(12, 8\) the weight's shape and p = min\(m, n\) "
                                         r"\(got U \(12, 12\) and S \(8,\)\)"):
        BaseSpectrum(torch.zeros(12, 12), base.S, W0)
    with pytest.raises(TypeError,
                       match=r"BaseSpectrum: weight must be a torch.Tensor \(got NoneType\)"):
        BaseSpectrum(base.U, base.S, None)
    with pytest.raises(ValueError, match=r"BaseSpectrum: weight must be 2-D \(got shape \(96,\)\)"):
        BaseSpectrum(base.U, base.S, W0.flatten())


def test_base_spectrum_right_form_checks():
    W0 = torch.randn(12, 8).bfloat16()
    base = base_spectrum(W0)  # tall, well conditioned: the right form
    V, S = base.V, base.stored()["S"]
    assert V.shape == (8, 8) and V.dtype == S.dtype == torch.float64 and base.dtype == torch.float32
    assert base.to(dtype=torch.float64).V is V and base.to(dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match=r"BaseSpectrum.from_right: the right form is for tall "
                                         r"weights, m > n \(got weight shape \(8, 12\)\)"):
        BaseSpectrum.from_right(V, S, W0.mT)
    with pytest.raises(ValueError, match=r"BaseSpectrum.from_right: V must be \(n, n\) and S "
                                         r"\(n,\) with \(m, n\) = \(12, 8\) the weight's shape "
                                         r"\(got V \(8, 7\) and S \(8,\)\)"):
        BaseSpectrum.from_right(V[:, :7], S, W0)
    with pytest.raises(TypeError, match=r"BaseSpectrum.from_right: V and S must be float64 "
                                        r"\(got torch.float32 and torch.float64\)"):
        BaseSpectrum.from_right(V.float(), S, W0)
    with pytest.raises(TypeError, match=r"BaseSpectrum.from_right: dtype must be torch.float32 or "
                                        r"torch.float64 \(got torch.float16\)"):
        BaseSpectrum.from_right(V, S, W0, torch.float16)
    with pytest.raises(TypeError, match=r"BaseSpectrum.from_right: V must be a torch.Tensor "
                                        r"\(got list\)"):
        BaseSpectrum.from_right([], S, W0)
    for bad in (torch.cat([S[:-1], S.new_zeros(1)]), S.flip(0), S * float("nan"),
                torch.cat([S[:-1], S[-1:] * 1e-4])):
        with pytest.raises(ValueError, match=r"BaseSpectrum.from_right: S must be finite, "
                                             r"descending and at least RIGHT_FORM_MIN = 0.001 of "
                                             r"its largest value, which must be positive"):
            BaseSpectrum.from_right(V, bad, W0)


# ---------------------------------------------------------------------------------------------
# Certificates: what they claim, on the cases that broke the float32 engine (issue 10)

def steep_case(ratio, seed=0, m=256, n=256, second=0.5):
    """Issue 10's hidden failure: a rank-2 update on a 256-wide layer, sigma_1/sigma_10 ~ ratio
    (the update's two singular values are ratio and second * ratio)."""
    gen = torch.Generator().manual_seed(seed)
    p = min(m, n)
    W0, _ = spectrum_matrix(m, n, torch.linspace(1.0, 0.1, p, dtype=torch.float64), gen)
    B = orthonormal(m, 2, gen)
    A = torch.tensor([[1.0], [second]], dtype=torch.float64) * orthonormal(n, 2, gen).T
    return W0, B.float(), A.float(), float(ratio)


@pytest.mark.parametrize("ratio", [30, 100, 300, 1000])
@pytest.mark.parametrize("shape", [(256, 256), (300, 520), (520, 300)])
def test_steep_spectrum_regression(ratio, shape):
    """float32 iteration on W W^T with a certificate relative to sigma_1^2 was off by up to 0.34
    in max_cos here while claiming convergence; now every answer is within 1e-4 of the float64
    reference in the same base basis, and certified so."""
    W0, B, A, s = steep_case(ratio, m=shape[0], n=shape[1])
    base = base_spectrum(W0)
    top = lora_topk(base, B, A, s, K, on_failure="raise")
    ref = topk_reference(W0.double() + s * B.double() @ A.double(), base.U, K)
    assert float(ref["sigma"][0] / ref["sigma"][-1]) > ratio
    assert top.converged and top.method == "structured"
    torch.testing.assert_close(top.sigma.double(), ref["sigma"], rtol=1e-5, atol=0)
    torch.testing.assert_close(top.max_cos.double(), ref["max_cos"], rtol=0, atol=1e-4)
    assert float(top.max_cos_bound.max()) <= 1e-4


def test_close_pair_needs_a_smaller_tol_to_be_certified():
    """The update's two singular values 300 and 299.99 (relative gap 2e-4 in sigma^2): with the
    default tol (residual <= 1e-6, here about 3e-8: the float32 basis) the pair is correct but
    only certified to ~1e-4; tol=1e-9 refines on the true W until it is certified to 1e-6."""
    W0, B, A, s = steep_case(300, second=1 - 1e-4)
    base = base_spectrum(W0)
    ref = topk_reference(W0.double() + s * B.double() @ A.double(), base.U, K)
    assert 1e-4 < float(ref["rel_gap"][:2].min()) < 1e-3
    loose = lora_topk(base, B, A, s, K, on_failure="raise")
    tight = lora_topk(base, B, A, s, K, tol=1e-9, on_failure="raise")
    assert float(loose.max_cos_bound[:2].min()) > 1e-5
    assert float(tight.max_cos_bound.max()) <= 1e-6 and float(tight.residual.max()) <= 1e-9
    for top in (loose, tight):
        err = (top.max_cos.double() - ref["max_cos"]).abs()
        assert bool((err <= top.max_cos_bound.double() + 1e-12).all())


def test_certificate_fields():
    W0, B, A, s = steep_case(1000)
    top = lora_topk(base_spectrum(W0), B, A, s, 6)
    for name in ("sigma", "max_cos", "residual", "angle_bound", "max_cos_bound"):
        t = getattr(top, name)
        assert t.shape == (6,) and t.dtype == torch.float32, name
    assert bool((top.residual <= 1e-6).all()) and top.converged
    assert bool((top.angle_bound > 0).all()) and bool((top.angle_bound <= 1).all())
    # max_cos_bound follows from angle_bound (||y - y*|| = 2 sin(theta / 2) <= angle_bound here)
    # and rounding: one more float32 eps for the base vectors' norms.
    assert bool((top.max_cos_bound <= top.angle_bound + 1.2e-7).all())


def test_imprecise_base_is_refined_on_the_true_weight():
    """A base spectrum from a float32 SVD of a steep W0 (vectors off by eps32 * s_1 / gap): G~ in
    that basis is not W W^T, the check on the true W catches it and the float64 refinement on W
    makes the answer right anyway."""
    gen = torch.Generator().manual_seed(4)
    S = torch.cat([torch.logspace(0, -4, 12, dtype=torch.float64),
                   torch.full((288,), 1e-5, dtype=torch.float64)])
    W0, _ = spectrum_matrix(300, 300, S, gen)
    U, S32, _ = torch.linalg.svd(W0, full_matrices=False)  # float32 LAPACK
    B = 1e-5 * torch.randn(300, 4, generator=gen)
    A = torch.randn(4, 300, generator=gen) / 300 ** 0.5
    rough, good = BaseSpectrum(U, S32, W0), base_spectrum(W0)
    for base in (rough, good):
        top = lora_topk(base, B, A, 1.0, K, on_failure="raise")
        ref = topk_reference(W0.double() + B.double() @ A.double(), base.U, K)
        assert float(ref["sigma"][0] / ref["sigma"][-1]) > 1e3
        torch.testing.assert_close(top.sigma.double(), ref["sigma"], rtol=1e-5, atol=0)
        torch.testing.assert_close(top.max_cos.double(), ref["max_cos"], rtol=0, atol=1e-4)
    # The float32 basis alone would have been off: its G~ differs from W W^T by eps32 * s_1^2,
    # more than 1% of sigma_10^2.
    x = rough.U.double().mT @ W0.double()
    G = x @ x.mT
    off = float((G - torch.diag(rough.S.double() ** 2)).abs().max())
    assert off > 1e-2 * float(ref["mu"][K - 1])


def test_dense_topk_zero_singular_values_are_not_certified():
    """Singular values that are zero have no relative accuracy and arbitrary vectors: the
    answer says so (converged=False, angle bound 1), and lora_topk falls back and says so too."""
    gen = torch.Generator().manual_seed(5)
    S = torch.cat([torch.ones(3, dtype=torch.float64), torch.zeros(37, dtype=torch.float64)])
    W0, _ = spectrum_matrix(40, 40, S, gen)
    base = base_spectrum(W0)
    top = dense_topk(W0, base, 5)
    assert not top.converged and top.method == "dense"
    torch.testing.assert_close(top.sigma[:3], torch.ones(3), rtol=1e-6, atol=0)
    assert bool((top.angle_bound[3:] == 1).all()) and float(top.residual[:3].max()) <= 1e-6
    with pytest.warns(RuntimeWarning, match="lora_topk: top-5 did not converge"):
        top = lora_topk(base, torch.zeros(40, 1), torch.zeros(1, 40), 1.0, 5)
    assert not top.converged and top.method == "dense"


def test_non_finite_inputs_are_errors():
    W0, B, A, s = lora_case(64, 48, 4, 1.0, seed=10)
    base = base_spectrum(W0)
    for name, value in (("B", float("nan")), ("A", float("inf"))):
        bad = {"B": B.clone(), "A": A.clone()}
        bad[name][1, 2] = value
        with pytest.raises(ValueError, match=rf"lora_topk: {name} has non-finite entries"):
            lora_topk(base, bad["B"], bad["A"], s, 3)
    broken = W0.clone()
    broken[5, 7] = float("inf")  # W0 itself is only read through products: still caught
    with pytest.raises(ValueError, match=r"lora_topk: base.weight \(W0\) has non-finite entries"):
        lora_topk(BaseSpectrum(base.U, base.S, broken), B, A, s, 3)
    with pytest.raises(ValueError, match=r"weight_topk: W has non-finite entries"):
        weight_topk(broken, base, 3)
    with pytest.raises(ValueError, match=r"dense_topk: W has non-finite entries"):
        dense_topk(broken, base, 3)


def test_lowrank_svds_each_result_independent_of_the_others():
    """Many products at once equal each product alone, bit for bit (mitigation writes the same
    factors for a layer whichever layers are mitigated with it)."""
    from intruder_ext.spectral import lowrank_svds
    gen = torch.Generator().manual_seed(4)
    pairs = [(torch.randn(32, r, generator=gen), torch.randn(r, n, generator=gen))
             for r, n in [(7, 32), (7, 40), (6, 32), (7, 32), (7, 64)]]
    together = lowrank_svds(pairs)
    for pair, got in zip(pairs, together):
        alone = lowrank_svds([pair])[0]
        single = lowrank_svd(*pair)
        for a, b, c in zip(got, alone, single):
            assert torch.equal(a, b) and torch.equal(a, c)
