"""Pure-torch reference implementations the compiled ops are checked against."""

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
