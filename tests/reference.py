"""Dense pure-torch references for the PEFT-level tests: full SVDs in float64."""

import torch


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
            "runner_up": runner_up, "gap": gap,
                       "intruders": intruders}


def dense_mitigated_delta(W0, B, A, scale, k, epsilon, lam):
    """``W' - W0`` for ``W = W0 + scale B A``, with the intruders' part scaled by ``lam``."""
    W0 = W0.double()
    W = W0 + scale * B.double() @ A.double()
    d = dense_detect(W0, W, k, epsilon)
    I = d["intruders"]
    return W + (lam - 1) * (d["U"][:, I] * d["sigma"][I]) @ d["Vh"][I] - W0, I
