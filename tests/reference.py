"""Pure-torch reference implementations the tests (and benchmarks) check the package against."""

import torch


def cosine_matrix_reference(Y, X, absolute=True, normalize=True):
    """The full k x n similarity matrix in float64 (what max_cosine maximizes)."""
    Y64, X64 = Y.double(), X.double()
    if normalize:
        Y64 = Y64 / Y64.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        X64 = X64 / X64.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    sims = Y64.transpose(-2, -1) @ X64
    return sims.abs() if absolute else sims


def max_cosine_reference(Y, X, absolute=True, normalize=True):
    """The naive expression: normalize the columns, multiply, (abs,) max over X's columns.

    Computes in float64 so it can judge every dtype; returns (values, indices).
    """
    values, indices = cosine_matrix_reference(Y, X, absolute, normalize).max(dim=-1)
    return values, indices


def check_max_cosine(values, indices, Y, X, atol, absolute=True, normalize=True):
    """Assert that ``(values, indices)`` is max_cosine(Y, X): dtype, shape and device, values
    within ``atol`` (scaled by the largest value when unnormalized), and indices equal to the
    reference's in float64; in lower precision a near-tie may pick another column, which must
    then be as good as the best."""
    ref_values, ref_indices = max_cosine_reference(Y, X, absolute, normalize)
    assert values.device == Y.device and indices.device == Y.device
    assert values.dtype == Y.dtype and indices.dtype == torch.int64
    assert values.shape == ref_values.shape and indices.shape == ref_indices.shape
    atol = atol * (1 if normalize else max(1.0, ref_values.abs().max().item()))
    torch.testing.assert_close(values.double().cpu(), ref_values.cpu(), atol=atol, rtol=0)
    if Y.dtype == torch.float64:
        assert torch.equal(indices.cpu(), ref_indices.cpu())
    else:
        sims = cosine_matrix_reference(Y, X, absolute, normalize)
        chosen = sims.gather(-1, indices.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(chosen.cpu(), ref_values.cpu(), atol=2 * atol, rtol=0)


def dense_detect(W0: torch.Tensor, W: torch.Tensor, k: int, epsilon: float):
    """Top-k of ``W`` against all left singular vectors of ``W0`` the way the paper's code does
    it: two full SVDs and the k x p |cosine| matrix. Returns a dict of float64 tensors."""
    W0, W = W0.double(), W.double()
    U0, _, _ = torch.linalg.svd(W0, full_matrices=False)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    cos = (U[:, :k].T @ U0).abs()
    max_cos, argmax = cos.max(dim=1)
    # How well each singular vector is determined: the distance of its sigma^2 to every other,
    # relative to sigma_max^2 (the scale of the certificates; Davis-Kahan: angle <= res / gap).
    mu = S * S
    gaps = (mu[:k, None] - mu[None, :]).abs() + torch.eye(k, len(S), dtype=S.dtype) * mu[0]
    gap = gaps.min(dim=1).values / mu[0]
    runner_up = cos.topk(min(2, cos.shape[1]), dim=1).values[:, -1]
    intruders = torch.nonzero(max_cos < epsilon).flatten().tolist()
    return {"sigma": S[:k], "U": U[:, :k], "Vh": Vh[:k], "max_cos": max_cos, "argmax": argmax,
            "runner_up": runner_up, "gap": gap, "intruders": intruders}


def lowrank_svd_reference(B, A, scale=1.0):
    """Thin SVD of the dense product ``scale * B @ A`` in float64, truncated to min(m, n, r)."""
    r = min(B.shape[-2], A.shape[-1], B.shape[-1])
    U, S, Vh = torch.linalg.svd(scale * (B.double() @ A.double()), full_matrices=False)
    return U[..., :r], S[..., :r], Vh[..., :r, :]


def dense_mitigated_delta(W0, B, A, scale, k, epsilon, lam):
    """``W' - W0`` for ``W = W0 + scale B A``, with the intruders' part scaled by ``lam``."""
    W0 = W0.double()
    W = W0 + scale * B.double() @ A.double()
    d = dense_detect(W0, W, k, epsilon)
    I = d["intruders"]
    return W + (lam - 1) * (d["U"][:, I] * d["sigma"][I]) @ d["Vh"][I] - W0, I


def topk_reference(W: torch.Tensor, base_U: torch.Tensor, k: int):
    """The float64 dense top-k of ``W`` (upcast exactly) compared with ``base_U``, the package's
    own base singular vectors (upcast, columns normalised): what every top-k answer must match.

    Also returns, for each of the top k, the gap from ``mu_j = sigma_j^2`` to the rest of the
    spectrum of ``W W^T`` (absolute and relative to mu_j; W W^T has zero eigenvalues beyond
    min(m, n) when m > n), which says how well the vector is determined.
    """
    W = W.double()
    m = W.shape[0]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    X = base_U.double()
    X = X / X.norm(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    max_cos, argmax = (U[:, :k].T @ X).abs().max(dim=1)
    mu = S * S
    inf = torch.full((1,), float("inf"), dtype=torch.float64)
    rest = torch.zeros(1, dtype=torch.float64) if m > len(S) else inf
    above = torch.cat([inf, mu[:-1]])[:k] - mu[:k]
    below = mu[:k] - torch.cat([mu[1:], rest])[:k]
    gap = torch.minimum(above, below)
    return {"sigma": S[:k], "U": U[:, :k], "Vh": Vh[:k], "max_cos": max_cos, "argmax": argmax,
            "mu": mu, "gap": gap, "rel_gap": gap / mu[:k]}


def check_certified_topk(top, W, base_U, k, tol=1e-6):
    """Asserts that ``top`` (a TopK) is a certified top-k of W against the float64 reference in
    the basis ``base_U``; returns the reference (:func:`topk_reference`).

    - honest: sigma within its residual, each vector within its angle bound and max_cos within
      its bound of the reference (where the reference's own vector is defined: gap > 0);
    - accurate: for sigma_1/sigma_k <= 1e4 the answer converged and is correct to 1e-5 relative
      in sigma and to max(1e-4, its bound) in max_cos;
    - not vacuous: a vector whose gap is at least 1% of its mu is certified to 1e-4.
    """
    ref = topk_reference(W, base_U, k)
    sigma, mc = top.sigma.double(), top.max_cos.double()
    eps = torch.finfo(top.sigma.dtype).eps
    mu1 = float(ref["mu"][0])
    assert top.sigma.shape == top.residual.shape == top.angle_bound.shape == (k,)
    assert top.max_cos_bound.shape == (k,) and top.U.shape == (W.shape[0], k)
    if top.converged:
        assert bool((top.residual <= tol).all())
    # The float64 reference itself is determined to about eps64 * mu_1 / gap.
    ref_err = 1e-12 + 1e-14 * mu1 / ref["gap"].clamp_min(1e-300)
    defined = ref["gap"] > 0

    # Honest. sigma: some singular value lies within residual * sigma (plus output rounding).
    if top.converged:
        slack = (top.residual.double() + 2 * eps) * sigma + 1e-13 * float(ref["sigma"][0])
        assert bool(((sigma - ref["sigma"]).abs() <= slack).all()), (sigma, ref["sigma"])
    Y = top.U.double()
    Y = Y / Y.norm(dim=0)
    sin = (Y - ref["U"] * (ref["U"] * Y).sum(dim=0)).norm(dim=0)
    assert bool((sin <= top.angle_bound.double() + ref_err)[defined].all()), \
        (sin, top.angle_bound, ref["gap"])
    cos_err = (mc - ref["max_cos"]).abs()
    assert bool((cos_err <= top.max_cos_bound.double() + ref_err)[defined].all()), \
        (cos_err, top.max_cos_bound)

    s_k = float(ref["sigma"][-1])
    if s_k > 0 and float(ref["sigma"][0]) / s_k <= 1e4:
        # Accurate.
        assert top.converged, (top.residual, top.method)
        rel = ((sigma - ref["sigma"]) / ref["sigma"]).abs()
        assert float(rel.max()) <= 1e-5, rel
        assert bool((cos_err <= top.max_cos_bound.double().clamp_min(1e-4) + ref_err).all())
        # Not vacuous.
        sure = ref["rel_gap"] >= 1e-2
        assert bool((top.max_cos_bound[sure] <= 1e-4).all()), (top.max_cos_bound, ref["rel_gap"])
        assert bool((top.angle_bound[sure] <= 1e-4).all())
    return ref
