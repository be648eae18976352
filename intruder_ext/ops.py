"""Python entry points of the compiled ops (``torch.ops.intruder_ext.*``)."""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch  # loads libc10/libtorch, which _C links against, first

try:
    from . import _C  # noqa: F401  (loads the compiled ops into torch.ops.intruder_ext)
except ImportError as error:  # the usual cause: importing the source tree, which holds no _C
    import os.path
    raise ImportError(
        f"intruder_ext: the compiled library intruder_ext._C could not be loaded from "
        f"{os.path.dirname(__file__)} ({error}). Install the package with `pip install "
        "--no-build-isolation .` and import it from outside the source tree, or build in place "
        "with `python setup.py build_ext --inplace`.") from error
from . import _meta  # noqa: F401, E402  (fake implementations for torch.compile / meta tensors)


class MaxCosine(NamedTuple):
    """Result of :func:`max_cosine`: the best match of each column of ``Y`` among those of ``X``."""

    values: torch.Tensor
    indices: torch.Tensor


def cuda_built() -> bool:
    """True when the CUDA kernels were compiled into this install (a GPU need not be present)."""
    return torch.ops.intruder_ext.cuda_built()


def max_cosine(Y: torch.Tensor, X: torch.Tensor, *, absolute: bool = True,
               normalize: bool = True) -> MaxCosine:
    """Largest (absolute) cosine similarity of each column of ``Y`` with any column of ``X``.

    ``Y`` is ``(..., d, k)`` and ``X`` is ``(..., d, n)``: the columns are the vectors, as in the
    ``U`` returned by ``torch.linalg.svd``. Leading batch dims broadcast. Returns
    ``MaxCosine(values, indices)``, both ``(..., k)``::

        values[..., j]  = max_i |cos(Y[..., :, j], X[..., :, i])|
        indices[..., j] = the lowest i attaining it

    The k x n similarity matrix is never materialized: the CPU kernel reduces cache-sized tiles of
    BLAS products, the CUDA kernel fuses column norms, tiled GEMM and the arg-max reduction.

    Args:
        Y, X: float32, float64, float16 or bfloat16 tensors of one dtype on one device.
            float16/bfloat16 accumulate in float32, float32 in float32, float64 in float64.
        absolute: compare ``|cos|`` (the intruder definition, default). ``False`` takes the
            signed maximum instead.
        normalize: divide by the column norms (default). Pass ``False`` when the columns are
            known to have unit length (singular vectors) to skip the norms; the values are then
            plain dot products.

    A zero column has cosine 0 with everything (never NaN); a NaN input gives NaN.
    ``values`` has the inputs' dtype, ``indices`` is int64. Not differentiable.
    """
    for name, t in (("Y", Y), ("X", X)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"max_cosine: {name} must be a torch.Tensor (got {type(t).__name__})")
    values, indices = torch.ops.intruder_ext.max_cosine(Y, X, bool(absolute), bool(normalize))
    return MaxCosine(values, indices)


MAX_SWEEPS_ENV = "INTRUDER_EXT_GESVDJ_MAX_SWEEPS"
DEFAULT_MAX_SWEEPS = 100  # cuSOLVER's own default


def batched_svd(A: torch.Tensor, *, max_sweeps: int | None = None):
    """Thin SVD of every matrix in a ``(..., m, n)`` stack: ``(U, S, Vh)`` as
    ``torch.linalg.svd(A, full_matrices=False)`` returns them, singular values descending.

    On CUDA, stacks of matrices up to 32 x 32 go through one cuSOLVER ``gesvdjBatched`` call,
    larger ones through ``gesvdj`` one matrix at a time; any matrix whose Jacobi iteration does
    not converge within ``max_sweeps`` sweeps is recomputed with the QR-based ``gesvd``, with a
    ``RuntimeWarning``. ``max_sweeps`` defaults to ``$INTRUDER_EXT_GESVDJ_MAX_SWEEPS``, else 100.
    On CPU, LAPACK (``max_sweeps`` is unused). float32 and float64 only.
    """
    return checked_batched_svd(torch.ops.intruder_ext.batched_svd, A, max_sweeps)


def checked_batched_svd(op, A, max_sweeps):
    """Calls a ``batched_svd`` op (the package's, or the tests' emulated-cuSOLVER build) and turns
    its mask of recomputed matrices into a warning: a TORCH_WARN from an op called through
    ``torch.ops`` would reach stderr, not Python's ``warnings``."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"batched_svd: A must be a torch.Tensor (got {type(A).__name__})")
    if max_sweeps is None:
        env = os.environ.get(MAX_SWEEPS_ENV, "").strip()
        if not env:
            max_sweeps = DEFAULT_MAX_SWEEPS
        elif env.isdigit() and int(env) >= 1:
            max_sweeps = int(env)
        else:
            raise ValueError(f"batched_svd: {MAX_SWEEPS_ENV} must be a positive integer (got {env!r})")
    elif isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int) or max_sweeps < 1:
        raise ValueError(f"batched_svd: max_sweeps must be a positive int (got {max_sweeps!r})")
    U, S, Vh, recomputed = op(A, max_sweeps)
    if A.device.type != "meta" and bool(recomputed.any()):  # meta tensors hold no values
        warnings.warn(f"batched_svd: Jacobi SVD (gesvdj) did not converge within {max_sweeps} "
                      f"sweeps for {int(recomputed.sum())} of {recomputed.numel()} matrices; "
                      f"recomputed them with gesvd", RuntimeWarning, stacklevel=3)
    return U, S, Vh
