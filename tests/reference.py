"""Pure-torch reference implementations the tests (and benchmarks) check the package against."""

import torch


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
