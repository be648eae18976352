"""Fake (meta) implementations: shapes and dtypes only, for FakeTensor and torch.compile."""

import torch

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@torch.library.register_fake("intruder_ext::max_cosine")
def _max_cosine_fake(Y, X, absolute=True, normalize=True):
    torch._check(Y.dim() >= 2 and X.dim() >= 2,
                 lambda: f"max_cosine: Y and X need at least 2 dims (got {Y.shape} and {X.shape})")
    torch._check(Y.dtype == X.dtype and Y.dtype in _FLOAT_DTYPES,
                 lambda: f"max_cosine: Y and X must have one floating dtype (got {Y.dtype} and {X.dtype})")
    torch._check(Y.device == X.device,
                 lambda: f"max_cosine: Y and X must be on the same device (got {Y.device} and {X.device})")
    torch._check(Y.shape[-2] == X.shape[-2],
                 lambda: f"max_cosine: Y and X must have the same number of rows "
                         f"(got {Y.shape[-2]} and {X.shape[-2]})")
    shape = (*torch.broadcast_shapes(Y.shape[:-2], X.shape[:-2]), Y.shape[-1])
    return Y.new_empty(shape), Y.new_empty(shape, dtype=torch.long)


@torch.library.register_fake("intruder_ext::batched_svd")
def _batched_svd_fake(A, max_sweeps):
    torch._check(A.dim() >= 2, lambda: f"batched_svd: A must have at least 2 dims (got shape {A.shape})")
    *batch, m, n = A.shape
    p = min(m, n)
    return (A.new_empty((*batch, m, p)), A.new_empty((*batch, p)), A.new_empty((*batch, p, n)),
            A.new_empty(batch, dtype=torch.bool))
