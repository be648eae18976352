"""Spectral engine: base spectra, low-rank SVDs and certified top-k singular triplets.

The fast path of DESIGN.md: the top-k singular triplets of ``W = W0 + s·B·A`` are found from the
base spectrum ``W0 = U0 diag(S0) Vh0`` without an m x n SVD of ``W``. In the orthonormal basis
``C = [U0, Q]`` (``Q R`` = the part of ``B`` outside ``range(U0)``) the Gram matrix ``W W^T`` is

    G~ = diag(S0^2, 0) + s (L1 L2^T + L2 L1^T) + s^2 L2 (A A^T) L2^T,
    L1 = [diag(S0) Vh0 A^T ; 0],  L2 = [U0^T B ; R],

diagonal plus rank <= 2r, and the top eigenvectors ``x_j`` of ``G~`` give ``y_j = C x_j`` with
``cos(y_j, U0[:, i]) = x_j[i]``: the intruder test reads the largest entry of ``x_j[:p]``.
Every answer carries a residual certificate ``||G x - mu x|| / mu_max``.

All maths runs in the base spectrum's dtype (float32 by default, float64 accepted) on its device.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from . import ops

__all__ = ["BaseSpectrum", "LowRankSVD", "TopK", "base_spectrum", "dense_topk", "lora_topk",
           "lowrank_svd", "weight_topk"]

_WORK_DTYPES = (torch.float32, torch.float64)
# Default certificate tolerances, relative to mu_max = sigma_max^2. In float32 the residuals of
# Krylov Ritz vectors bottom out near 1e-6 (rounding of the basis combinations, also the level
# of a float32 dense SVD's vectors), so 1e-5 is reliably reachable.
_DEFAULT_TOL = {torch.float32: 1e-5, torch.float64: 1e-11}
_DEPTH = 4  # Krylov blocks per restart (Rayleigh-Ritz every _DEPTH products with G)
_DENSE_N = 256  # below this, an explicit eigh of G is cheaper than any iteration


@dataclass
class BaseSpectrum:
    """Thin SVD of a base weight ``W0`` (m x n), what the fast path needs of it.

    ``U`` is (m, p), ``S`` is (p,) descending, ``Vh`` is (p, n), p = min(m, n).
    """

    U: Tensor
    S: Tensor
    Vh: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the base weight."""
        return self.U.shape[0], self.Vh.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.U.dtype

    @property
    def device(self) -> torch.device:
        return self.U.device

    def to(self, device=None, dtype=None) -> "BaseSpectrum":
        """A copy on another device and/or dtype."""
        return BaseSpectrum(*(t.to(device=device, dtype=dtype) for t in (self.U, self.S, self.Vh)))

    def weight(self) -> Tensor:
        """``U diag(S) Vh``: the base weight as this spectrum represents it."""
        return (self.U * self.S) @ self.Vh


@dataclass
class TopK:
    """Top-k singular triplets of a weight ``W`` and their similarity to a base spectrum.

    ``max_cos[j] = max_i |cos(U[:, j], base.U[:, i])|`` over all p base vectors, ``argmax[j]``
    the ``i`` attaining it. ``residual[j] = ||G x_j - mu_j x_j|| / mu_max`` with ``G = W W^T`` (in
    the coordinates the method worked in): the certificate of the pair.
    """

    sigma: Tensor
    U: Tensor
    Vh: Tensor
    max_cos: Tensor
    argmax: Tensor
    residual: Tensor
    converged: bool
    iterations: int
    method: str

    def intruders(self, epsilon: float = 0.5) -> Tensor:
        """Indices j (into the top-k) with ``max_cos[j] < epsilon``."""
        return torch.nonzero(self.max_cos < epsilon).flatten()


class LowRankSVD(NamedTuple):
    """Thin SVD ``(U, S, Vh)`` of a product of factors, as ``torch.linalg.svd`` returns it."""

    U: Tensor
    S: Tensor
    Vh: Tensor


# ---------------------------------------------------------------------------------------------
# Input checks: every message names the function, the argument and the values received.

def _check_tensor(fn: str, name: str, t, dims: int | None = None, min_dims: int | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor (got {type(t).__name__})")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{fn}: {name} must be {dims}-D (got shape {tuple(t.shape)})")
    if min_dims is not None and t.dim() < min_dims:
        raise ValueError(f"{fn}: {name} must have at least {min_dims} dims (got shape {tuple(t.shape)})")
    if not (t.is_floating_point()):
        raise TypeError(f"{fn}: {name} must be a floating-point tensor (got {t.dtype})")


def _check_work_dtype(fn: str, dtype):
    if dtype not in _WORK_DTYPES:
        raise TypeError(f"{fn}: dtype must be torch.float32 or torch.float64 (got {dtype})")


def _check_base(fn: str, base):
    if not isinstance(base, BaseSpectrum):
        raise TypeError(f"{fn}: base must be a BaseSpectrum (got {type(base).__name__})")
    _check_work_dtype(fn, base.dtype)


def _check_same_device(fn: str, base: BaseSpectrum, **tensors):
    for name, t in tensors.items():
        if t.device != base.device:
            raise ValueError(f"{fn}: {name} must be on the base spectrum's device "
                             f"(got {t.device} and {base.device})")


def _check_k(fn: str, k, p: int):
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{fn}: k must be an int (got {type(k).__name__})")
    if not 1 <= k <= p:
        raise ValueError(f"{fn}: k must be in [1, min(m, n)] = [1, {p}] (got {k})")


def _check_weight(fn: str, base, W, k) -> Tensor:
    """Checks a (base, W, k) call; returns W detached in the base's dtype."""
    _check_base(fn, base)
    _check_tensor(fn, "W", W, dims=2)
    m, n = base.shape
    if tuple(W.shape) != (m, n):
        raise ValueError(f"{fn}: W must have the base weight's shape {(m, n)} (got {tuple(W.shape)})")
    _check_same_device(fn, base, W=W)
    _check_k(fn, k, min(m, n))
    return W.detach().to(base.dtype)


def _check_solver_args(fn: str, tol, max_iter, on_failure, block):
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"{fn}: tol must be a positive number (got {tol!r})")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{fn}: max_iter must be a positive int (got {max_iter!r})")
    if on_failure not in ("dense", "raise"):
        raise ValueError(f"{fn}: on_failure must be 'dense' or 'raise' (got {on_failure!r})")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"{fn}: block must be a positive int (got {block!r})")


# ---------------------------------------------------------------------------------------------
# Base spectrum and low-rank SVD.

def base_spectrum(W0: Tensor, dtype: torch.dtype = torch.float32) -> BaseSpectrum:
    """Thin SVD of the base weight ``W0`` (m x n) in ``dtype``, on ``W0``'s device."""
    _check_tensor("base_spectrum", "W0", W0, dims=2)
    _check_work_dtype("base_spectrum", dtype)
    W = W0.detach().to(dtype)
    if not bool(torch.isfinite(W).all()):
        raise ValueError("base_spectrum: W0 has non-finite entries (NaN or inf)")
    U, S, Vh = ops.batched_svd(W)
    return BaseSpectrum(U.contiguous(), S.contiguous(), Vh.contiguous())


def _factor_dtype(*tensors: Tensor) -> torch.dtype:
    """Working dtype of LoRA factors: float64 if any is, else float32 (half types upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def lowrank_svd(B: Tensor, A: Tensor, scale: float = 1.0) -> LowRankSVD:
    """Thin SVD of ``scale * B @ A`` for stacked factors B (..., m, r), A (..., r, n).

    QR of each factor, then one batched SVD of the small cores: O((m + n) r^2) per matrix.
    Batch dims broadcast; float16/bfloat16 factors are upcast to float32. Returns
    ``(U, S, Vh)`` with ``min(m, n, r)`` columns, singular values descending.
    """
    fn = "lowrank_svd"
    _check_tensor(fn, "B", B, min_dims=2)
    _check_tensor(fn, "A", A, min_dims=2)
    if B.shape[-1] != A.shape[-2]:
        raise ValueError(f"{fn}: B (..., m, r) and A (..., r, n) must share r "
                         f"(got B {tuple(B.shape)} and A {tuple(A.shape)})")
    if B.device != A.device:
        raise ValueError(f"{fn}: B and A must be on the same device (got {B.device} and {A.device})")
    try:
        torch.broadcast_shapes(B.shape[:-2], A.shape[:-2])
    except RuntimeError:
        raise ValueError(f"{fn}: batch dims of B and A do not broadcast "
                         f"(got B {tuple(B.shape)} and A {tuple(A.shape)})") from None
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be a finite number (got {scale!r})")
    dtype = _factor_dtype(B, A)
    Qb, Rb = torch.linalg.qr(B.to(dtype))
    Qa, Ra = torch.linalg.qr(A.to(dtype).mT)
    Uc, S, Vhc = ops.batched_svd((scale * Rb) @ Ra.mT)
    return LowRankSVD(Qb @ Uc, S, Vhc @ Qa.mT)


# ---------------------------------------------------------------------------------------------
# Certified symmetric top-k eigensolver: restarted block Krylov with Rayleigh-Ritz.

class _Eig(NamedTuple):
    mu: Tensor        # (k,) Ritz values, descending
    X: Tensor         # (N, k) Ritz vectors, orthonormal
    residual: Tensor  # (k,) ||G x - mu x|| / mu_max
    converged: bool
    iterations: int


def _project_out(K: Tensor | None, W: Tensor) -> Tensor:
    """``W`` minus its components in ``range(K)`` (K orthonormal), twice: once is not enough
    in floating point when W is nearly inside range(K)."""
    if K is None or K.shape[1] == 0:
        return W
    for _ in range(2):
        W = W - K @ (K.mT @ W)
    return W


def _orthonormal_block(K: Tensor | None, W: Tensor) -> Tensor:
    """An orthonormal basis of the part of ``range(W)`` outside ``range(K)``, orthogonal to K.

    Columns of W that were (numerically) inside range(K) give arbitrary unit directions
    orthogonal to K: harmless for Rayleigh-Ritz, which only needs an orthonormal basis.
    """
    norms = W.norm(dim=0)
    W = _project_out(K, W)
    Q, R = torch.linalg.qr(W)
    small = R.diagonal().abs() <= math.sqrt(torch.finfo(W.dtype).eps) * norms.max().clamp_min(1e-300)
    if bool(small.any()):
        Q, _ = torch.linalg.qr(_project_out(K, Q))
    return Q


def _thin_mm(M: Tensor, X: Tensor) -> Tensor:
    """``M @ X`` for a large M and a thin X, computed as ``(X^T M^T)^T``: with X a column slice
    of a QR factor (column-major) the direct product runs several times slower on CPU (2048 x 2048
    by 2048 x 10: about 20 ms against 2 ms measured)."""
    return (X.mT @ M.mT).mT


def _eig_dense(matvec: Callable[[Tensor], Tensor], N: int, k: int, dtype, device) -> _Eig:
    """Explicit G (N x N) and eigh: for small N."""
    G = matvec(torch.eye(N, dtype=dtype, device=device))
    G = (G + G.mT) / 2
    mu, X = torch.linalg.eigh(G)
    mu, X = mu.flip(0)[:k], X.flip(1)[:, :k]
    res = (G @ X - X * mu).norm(dim=0) / mu[0].abs().clamp_min(torch.finfo(dtype).tiny)
    return _Eig(mu, X, res, True, 1)


def _eig_topk(matvec: Callable[[Tensor], Tensor], X0: Tensor, k: int, *, block: int, tol: float,
              max_iter: int) -> _Eig:
    """Top-k eigenpairs of the symmetric PSD operator ``matvec`` (N-dim), certified.

    Each iteration builds the block Krylov basis K = [V, GV, ..., G^d V] (orthonormalized block
    by block), takes the Rayleigh-Ritz pairs of K^T G K and keeps the top ``block`` Ritz vectors
    as the next V. The certificate ``||G x - mu x|| <= tol * mu_max`` is checked on those from
    the product G V that the next iteration computes anyway: a fresh product, whose rounding
    floor (a few ulps of mu_max) is well below that of the Krylov sums G K Y.
    """
    N = X0.shape[0]
    dtype, device = X0.dtype, X0.device
    if N <= max(_DENSE_N, 2 * X0.shape[1]):
        return _eig_dense(matvec, N, k, dtype, device)
    max_basis = N // 2
    V = _orthonormal_block(None, X0)
    tiny = torch.finfo(dtype).tiny
    for it in range(max_iter + 1):
        GV = matvec(V)
        if it > 0:
            rho = (V * GV).sum(dim=0)  # Rayleigh quotients of the Ritz vectors
            res = (GV[:, :k] - V[:, :k] * rho[:k]).norm(dim=0) / rho.max().abs().clamp_min(tiny)
            if bool((res <= tol).all()) or it == max_iter:
                return _Eig(rho[:k], V[:, :k], res, bool((res <= tol).all()), it)
        blocks, gblocks = [V], [GV]
        for _ in range(_DEPTH):
            width = sum(b.shape[1] for b in blocks)
            if width + V.shape[1] > max_basis:
                break
            blocks.append(_orthonormal_block(torch.cat(blocks, dim=1), gblocks[-1]))
            gblocks.append(matvec(blocks[-1]))
        K, GK = torch.cat(blocks, dim=1), torch.cat(gblocks, dim=1)
        H = K.mT @ GK
        mu, Y = torch.linalg.eigh((H + H.mT) / 2)
        keep = max(k, min(block, K.shape[1]))
        # K Y is orthonormal only to rounding; left alone, the error compounds over iterations.
        V = torch.linalg.qr(K @ Y.flip(1)[:, :keep])[0]
    raise AssertionError("unreachable")


def _default_block(k: int, N: int) -> int:
    # Room beyond k so a cluster of near-equal values at the k-th boundary converges as a whole.
    return min(N, max(2 * k, k + 10))


def _fail(fn: str, k: int, eig: _Eig, tol: float, max_iter: int, on_failure: str):
    msg = (f"{fn}: top-{k} did not converge: largest residual {float(eig.residual.max()):.3g} "
           f"> tol {tol:.3g} after max_iter={max_iter} iterations")
    if on_failure == "raise":
        raise RuntimeError(msg)
    warnings.warn(msg + "; falling back to a dense SVD (dense_topk)", RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# Top-k of W = W0 + s B A from the base spectrum (structured), of any W (subspace), dense.

def lora_topk(base: BaseSpectrum, B: Tensor, A: Tensor, scale: float, k: int, *,
              tol: float | None = None, max_iter: int = 100, on_failure: str = "dense",
              block: int | None = None) -> TopK:
    """Certified top-k singular triplets of ``W = W0 + scale * B @ A`` (DESIGN.md step 2).

    ``base`` is the spectrum of W0 (m x n), B is (m, r), A is (r, n); the factors are cast to
    the base's dtype and must be on its device. Costs O((m + n) p r) for the setup products plus
    a block Krylov iteration on the (p + q)-dim operator G~ at O((p + q) r) per product.

    Args:
        tol: certificate ``||G~ x - mu x|| <= tol * mu_max`` for every returned pair (default
            1e-5 in float32, 1e-11 in float64).
        max_iter: restarts of the block Krylov iteration before giving up.
        on_failure: ``"dense"`` falls back to :func:`dense_topk` with a warning, ``"raise"``
            raises ``RuntimeError``.
        block: Ritz vectors kept per restart (default max(2k, k + 10)); raise it for clusters
            of near-equal singular values wider than that at the k-th boundary.
    """
    fn = "lora_topk"
    _check_base(fn, base)
    _check_tensor(fn, "B", B, dims=2)
    _check_tensor(fn, "A", A, dims=2)
    m, n = base.shape
    p = min(m, n)
    if B.shape[0] != m or A.shape[1] != n or B.shape[1] != A.shape[0]:
        raise ValueError(f"{fn}: B must be (m, r) and A (r, n) with (m, n) = {(m, n)} the base "
                         f"weight's shape (got B {tuple(B.shape)} and A {tuple(A.shape)})")
    _check_same_device(fn, base, B=B, A=A)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be a finite number (got {scale!r})")
    _check_k(fn, k, p)
    _check_solver_args(fn, tol, max_iter, on_failure, block)
    dtype = base.dtype
    tol = _DEFAULT_TOL[dtype] if tol is None else float(tol)
    U0, S0, Vh0 = base.U, base.S, base.Vh
    B, A = B.detach().to(dtype), A.detach().to(dtype)
    s = float(scale)

    # B = U0 P + Q R, with Q orthonormal and orthogonal to U0 (only when U0 does not span R^m).
    P = _thin_mm(U0.mT, B)
    if m > p:
        Bp = B - _thin_mm(U0, P)
        P2 = _thin_mm(U0.mT, Bp)  # second pass: one projection leaves eps-sized parts in range(U0)
        P, Bp = P + P2, Bp - _thin_mm(U0, P2)
        Q, R = torch.linalg.qr(Bp)
    else:
        Q, R = B.new_zeros(m, 0), B.new_zeros(0, B.shape[1])
    q = Q.shape[1]
    r = B.shape[1]
    L1 = torch.cat([S0[:, None] * _thin_mm(Vh0, A.mT), B.new_zeros(q, r)])
    L2 = torch.cat([P, R])
    L = torch.cat([L1, L2], dim=1)
    eye = torch.eye(r, dtype=dtype, device=B.device)
    K2 = torch.cat([torch.cat([torch.zeros_like(eye), s * eye], dim=1),
                    torch.cat([s * eye, (s * s) * (A @ A.mT)], dim=1)])
    D = torch.cat([S0 * S0, B.new_zeros(q)])

    def matvec(X: Tensor) -> Tensor:
        return D[:, None] * X + L @ (K2 @ (L.mT @ X))

    N = p + q
    blk = _default_block(k, N) if block is None else min(block, N)
    blk = max(blk, k)
    X0 = torch.cat([torch.eye(N, blk, dtype=dtype, device=B.device), L], dim=1)
    eig = _eig_topk(matvec, X0, k, block=blk, tol=tol, max_iter=max_iter)
    if not eig.converged:
        _fail(fn, k, eig, tol, max_iter, on_failure)
        return dense_topk(base.weight() + s * (B @ A), base, k)

    x = eig.X
    Y = _thin_mm(U0, x[:p]) + Q @ x[p:]
    # W^T y = Vh0^T S0 (U0^T y) + s A^T (B^T y), with U0^T y = x[:p] and B^T y = L2^T x.
    Z = _thin_mm(Vh0.mT, S0[:, None] * x[:p]) + s * (A.mT @ (L2.mT @ x))
    return _finish(Y, Z, x[:p].abs(), eig, "structured")


def _finish(Y: Tensor, Z: Tensor, cos: Tensor | None, eig: _Eig, method: str,
            base: BaseSpectrum | None = None) -> TopK:
    """TopK from left vectors Y (m, k) and Z = W^T Y (n, k): sigma = ||Z|| is accurate to
    O(eps sigma_max), better than sqrt(mu) near the bottom of the top-k."""
    sigma = Z.norm(dim=0)
    order = torch.argsort(sigma, descending=True, stable=True)
    sigma, Y, Z = sigma[order], Y[:, order], Z[:, order]
    Vh = (Z / sigma.clamp_min(torch.finfo(Z.dtype).tiny)).mT
    if cos is not None:
        max_cos, argmax = cos[:, order].max(dim=0)
    else:
        max_cos, argmax = ops.max_cosine(Y, base.U)
    return TopK(sigma, Y, Vh.contiguous(), max_cos, argmax, eig.residual[order], eig.converged,
                eig.iterations, method)


def weight_topk(W: Tensor, base: BaseSpectrum, k: int, *, tol: float | None = None,
                max_iter: int = 100, on_failure: str = "dense", block: int | None = None) -> TopK:
    """Certified top-k singular triplets of an arbitrary ``W`` (m x n), e.g. a fully fine-tuned
    weight, compared with the base spectrum through :func:`intruder_ext.max_cosine`.

    Block Krylov iteration on ``W W^T`` (or ``W^T W`` when m > n) started from the base's top
    singular vectors and a random block; arguments as in :func:`lora_topk`.
    """
    fn = "weight_topk"
    W = _check_weight(fn, base, W, k)
    _check_solver_args(fn, tol, max_iter, on_failure, block)
    m, n = base.shape
    p = min(m, n)
    dtype = base.dtype
    tol = _DEFAULT_TOL[dtype] if tol is None else float(tol)

    left = m <= n  # iterate on the smaller Gram matrix
    blk = _default_block(k, p) if block is None else min(block, p)
    blk = max(blk, k)
    gen = torch.Generator(device=W.device).manual_seed(0)
    start = base.U[:, :blk] if left else base.Vh[:blk].mT
    X0 = torch.cat([start, torch.randn(p, blk, generator=gen, dtype=dtype, device=W.device)], dim=1)

    def matvec(X: Tensor) -> Tensor:
        return _thin_mm(W, _thin_mm(W.mT, X)) if left else _thin_mm(W.mT, _thin_mm(W, X))

    eig = _eig_topk(matvec, X0, k, block=blk, tol=tol, max_iter=max_iter)
    if not eig.converged:
        _fail(fn, k, eig, tol, max_iter, on_failure)
        return dense_topk(W, base, k)
    if left:
        Y = eig.X
    else:
        WV = _thin_mm(W, eig.X)
        Y = WV / WV.norm(dim=0).clamp_min(torch.finfo(dtype).tiny)
    return _finish(Y, _thin_mm(W.mT, Y), None, eig, "subspace", base)


def dense_topk(W: Tensor, base: BaseSpectrum, k: int) -> TopK:
    """Reference: full SVD of ``W``, its top k compared with the base through max_cosine."""
    W = _check_weight("dense_topk", base, W, k)
    U, S, Vh = ops.batched_svd(W)
    Uk, Sk, Vhk = U[:, :k], S[:k], Vh[:k]
    mu = Sk * Sk
    res = (W @ (W.mT @ Uk) - Uk * mu).norm(dim=0) / mu[0].clamp_min(torch.finfo(W.dtype).tiny)
    max_cos, argmax = ops.max_cosine(Uk, base.U)
    return TopK(Sk.contiguous(), Uk.contiguous(), Vhk.contiguous(), max_cos, argmax, res, True, 0,
                "dense")
