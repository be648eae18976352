"""Pure-torch reference implementations the tests (and benchmarks) check the package against."""

import torch


def max_cosine_reference(Y, X, absolute=True, normalize=True):
    """The naive expression: normalize the columns, multiply, (abs,) max over X's columns.

    Computes in float64 so it can judge every dtype; returns (values, indices).
    """
    Y64, X64 = Y.double(), X.double()
    if normalize:
        Y64 = Y64 / Y64.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        X64 = X64 / X64.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    sims = Y64.transpose(-2, -1) @ X64
    if absolute:
        sims = sims.abs()
    values, indices = sims.max(dim=-1)
    return values, indices


# --- spectral engine (intruder_ext.spectral) ---------------------------------------------------

def two_svd_topk(W0, W, k, dtype=torch.float64):
    """The two-SVD intruder reference (as in the paper's code): full SVDs of ``W0`` and ``W``, then
    the top-k left singular vectors of ``W`` against all of ``W0``'s.

    Returns ``(sigma, U, max_cos, argmax)``: (k,), (m, k), (k,), (k,).
    """
    U0 = torch.linalg.svd(W0.to(dtype), full_matrices=False)[0]
    U, S, _ = torch.linalg.svd(W.to(dtype), full_matrices=False)
    max_cos, argmax = (U[:, :k].mT @ U0).abs().max(dim=1)
    return S[:k], U[:, :k], max_cos, argmax


def lowrank_svd_reference(B, A, scale=1.0):
    """Thin SVD of the dense product ``scale * B @ A`` in float64, truncated to min(m, n, r)."""
    r = min(B.shape[-2], A.shape[-1], B.shape[-1])
    U, S, Vh = torch.linalg.svd(scale * (B.double() @ A.double()), full_matrices=False)
    return U[..., :r], S[..., :r], Vh[..., :r, :]


# --- PEFT detection and mitigation (intruder_ext.detection, intruder_ext.mitigation) --------

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


def dense_mitigated_delta(W0, B, A, scale, k, epsilon, lam):
    """``W' - W0`` for ``W = W0 + scale B A``, with the intruders' part scaled by ``lam``."""
    W0 = W0.double()
    W = W0 + scale * B.double() @ A.double()
    d = dense_detect(W0, W, k, epsilon)
    I = d["intruders"]
    return W + (lam - 1) * (d["U"][:, I] * d["sigma"][I]) @ d["Vh"][I] - W0, I
