"""Spectral engine: base spectra, low-rank SVDs and certified top-k singular triplets.

The fast path of DESIGN.md: the top-k singular triplets of ``W = W0 + s·B·A`` are found from the
base spectrum ``W0 = U0 diag(S0) V0^T`` without an m x n SVD of ``W``. In the orthonormal basis
``C = [U0, Q]`` (``Q R`` = the part of ``B`` outside ``range(U0)``) the Gram matrix ``W W^T`` is

    G~ = diag(S0^2, 0) + s (L1 L2^T + L2 L1^T) + s^2 L2 (A A^T) L2^T,
    L1 = C^T W0 A^T,  L2 = [U0^T B ; R],

diagonal plus rank <= 2r, and the top eigenvectors ``x_j`` of ``G~`` give ``y_j = C x_j``. Only
products with ``U0`` and ``W0`` and the values ``S0`` are needed: a :class:`BaseSpectrum` holds
``U0``, or for a tall W0 (right form) ``V0`` and applies ``U0 = W0 V0 diag(S0)^-1`` as products.

Precision
---------
Everything that decides an answer runs in float64, whatever the dtype of the inputs (float32,
bfloat16 and float16 upcast exactly); the returned tensors have the base spectrum's dtype.

- Structured path (:func:`lora_topk`). The operator ``G~`` is diagonal plus low rank, so float64
  costs little there; its setup products (``U0^T B``, ``C^T W0 A^T``) are float64 too, since in
  float32 they would already carry errors of eps32·sigma_1^2 in ``G~``: for sigma_1/sigma_k = 1e4
  that is 6 times sigma_k^2. ``G~`` is exact only for an exact base spectrum, so its Ritz
  vectors are then checked, and if needed refined, by block Krylov iteration on the true
  ``W W^T`` (products with W0, B and A in float64).
- General path (:func:`weight_topk`, any W). Products with a dense m x n W dominate, and float64
  ones take about twice as long: a float32 block Krylov iteration finds the subspace, then the
  same float64 iteration on the true ``W W^T`` certifies it, and refines it where float32 was
  not enough (measurements in :func:`weight_topk`).
- :func:`dense_topk` (the fallback) is a float64 SVD of W.

Working on ``W W^T`` squares the condition number: in float64 the residuals below bottom out
near eps64·(sigma_1/sigma_j)^2, 1e-8 for sigma_1/sigma_j = 1e4, so the default tolerance (1e-6)
is met up to sigma_1/sigma_j of about 1e4-1e5; beyond that the answer says it is not converged.

Certificates
------------
Each returned triplet ``(sigma_j, y_j, z_j)`` (``TopK.sigma[j]``, ``TopK.U[:, j]``,
``TopK.Vh[j]``, with ``z_j = W^T y_j / sigma_j``) carries its own certificate, computed in float64
from the true W (never from the base spectrum's approximation of W0):

- ``residual[j] = ||W W^T y_j - mu_j y_j|| / mu_j`` with ``mu_j = sigma_j^2``: relative to the
  vector's own sigma, so it means the same for the first and the k-th vector. Some singular
  value of W lies within ``residual[j] · sigma_j`` of ``sigma_j`` (plus the rounding of the
  returned dtype).
- ``angle_bound[j]``: a bound on the sine of the angle between ``y_j`` and the true j-th left
  singular vector of W, by the Davis-Kahan sin-theta theorem, ``||W W^T y_j - mu_j y_j|| / gap_j``
  (plus the rounding of the returned dtype), where ``gap_j`` is the distance from ``mu_j`` to the
  rest of the spectrum of ``W W^T``. That gap is an *estimate*: it is taken from the neighbouring
  Ritz values ``mu_{j-1}`` and ``mu_{j+1}`` (a top-k answer computes k+1 Ritz pairs; below the
  last one, 0, the least an eigenvalue of W W^T can be), each moved towards ``mu_j`` by its own
  residual norm (a Ritz value is within its residual of an eigenvalue). It is exact unless the
  iteration missed an eigenvalue of W W^T altogether, which block Krylov started from the base
  spectrum's top vectors (and, on the general path, a random block) makes very unlikely.
  ``angle_bound`` is 1 (no information) when the gap is not resolved: inside a cluster of
  near-equal singular values a single vector is not determined by W, only the cluster's
  subspace is, and the certificate says so rather than claim precision. Since
  ``angle_bound[j] ~ residual[j] / (gap_j / mu_j)``, the default tol certifies a vector to 1e-4
  when its relative gap is at least 1e-2; a smaller tol certifies closer pairs.
- ``max_cos_bound[j]``: a bound on the error of ``max_cos[j]`` against the exact
  ``max_i |cos(y*_j, base.U[:, i])|`` of the true vector ``y*_j``, from the angle bound
  (``||y_j - y*_j|| = 2 sin(theta/2)``) plus the rounding of the returned dtype. ``max_cos`` is
  measured against the base spectrum's own vectors ``base.U``, taken as unit vectors: their
  deviation from that (the rounding of the spectrum's dtype; for a tall W0, whose left vectors
  are formed as ``W0 v_i / s_i``, also eps64 sqrt(m) (s_1/s_i)^2) is added. Where W0
  itself has near-equal singular values those vectors are not unique, and neither is
  ``max_cos``: two correct base spectra can give values 0.02 apart for the same ``y_j``.
- ``converged`` is True when every ``residual[j] <= tol``. With ``on_failure="dense"`` an answer
  that does not converge is recomputed by :func:`dense_topk` (with a warning), whose certificate
  is computed the same way (its gaps are exact: the whole spectrum is known); zero singular
  values, whose vectors are arbitrary, are never certified.

What is tested (``tests/test_numerics_properties.py``, hypothesis over shapes up to 400, ranks,
scales and steep, flat, clustered and rank-deficient spectra, float32 and bfloat16 weights,
both paths): the certificates are honest (the true errors against a float64 dense SVD of W in
the same base basis never exceed them); for sigma_1/sigma_k <= 1e4 every answer converges and is
within 1e-5 (relative) in sigma and max(1e-4, max_cos_bound) in max_cos; and max_cos_bound is
<= 1e-4 for every vector whose relative gap is at least 1e-2.
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
           "lowrank_svd", "lowrank_svds", "weight_topk"]

_WORK_DTYPES = (torch.float32, torch.float64)
_F64 = torch.float64
# Default certificate tolerance on the own-relative residual: it bounds the relative error of
# sigma, and gives angle bounds <= 1e-4 for relative gaps >= 1e-2; reachable in float64 up to
# sigma_1/sigma_k of about 1e4-1e5 (see the module docstring).
_DEFAULT_TOL = 1e-6
_DEPTH = 4  # Krylov blocks per restart (Rayleigh-Ritz every _DEPTH products with G)
_DENSE_N = 256  # below this, an explicit eigh of G~ is cheaper than any iteration
_STALL = 5  # restarts without halving the largest residual: at the rounding floor, stop


class BaseSpectrum:
    """What the fast path needs of a base weight ``W0`` (m x n): its singular values ``S``
    (p,), descending, p = min(m, n), one set of its singular vectors, and ``weight``, W0 itself
    (in map orientation, any floating dtype, e.g. bfloat16), for products with W0.

    The vectors come in one of two forms:

    - left (any shape): ``BaseSpectrum(U, S, weight)`` with the left singular vectors ``U``
      (m, p) and ``S`` in the working dtype.
    - right (tall W0, m > n): ``BaseSpectrum.from_right(V, S, weight, dtype)`` with the right
      singular vectors ``V`` (n, n) and ``S``, both float64. The left vectors are
      ``U = W0 V diag(S)^-1``, applied as products with W0 and never formed by the engine: that
      saves the product forming U (as many operations as W0's Gram matrix) and stores n^2
      float64 numbers instead of m n in the working dtype (smaller once m > 2n in float32).
      V stays float64 because W0 amplifies its rounding: from a float32 V, u_i would be off by
      about eps32 s_1/s_i. :func:`base_spectrum` uses this form for tall
      weights whose singular values are all at least ``RIGHT_FORM_MIN`` of the largest (every
      trained weight we have seen); there the implicit u_i are orthonormal to about
      eps64 (s_1/s_n)^2.

    ``U`` always reads as the left vectors in the working dtype (formed on each access in the
    right form: m n^2 operations); :meth:`columns` forms only some of them. ``dtype`` is the
    working dtype (float32 or float64), that of ``U`` and ``S`` as read; ``weight`` keeps its
    own. :func:`base_spectrum` and :meth:`SpectrumCache.get` attach the W0 they were given; a
    cache stores only the vectors and ``S``. The spectrum describes the weight as it was: in
    the right form the left vectors are computed from ``weight`` itself, so changing that tensor
    in place afterwards (it is usually the model's own parameter) invalidates the spectrum.
    """

    def __init__(self, U: Tensor, S: Tensor, weight: Tensor):
        self._init("BaseSpectrum", U, None, S, weight, None)

    @classmethod
    def from_right(cls, V: Tensor, S: Tensor, weight: Tensor,
                   dtype: torch.dtype = torch.float32) -> "BaseSpectrum":
        """The right form (see the class docstring): ``V`` (n, n) and ``S`` (n,) float64 of a
        tall ``weight`` (m > n), ``dtype`` the working dtype."""
        _check_work_dtype("BaseSpectrum.from_right", dtype)
        self = cls.__new__(cls)
        self._init("BaseSpectrum.from_right", None, V, S, weight, dtype)
        return self

    def _init(self, fn: str, U, V, S, weight, dtype) -> None:
        for name, t in (("U" if V is None else "V", U if V is None else V), ("S", S),
                        ("weight", weight)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{fn}: {name} must be a torch.Tensor (got {type(t).__name__})")
        if weight.dim() != 2:
            raise ValueError(f"{fn}: weight must be 2-D (got shape {tuple(weight.shape)})")
        m, n = weight.shape
        p = min(m, n)
        if V is None:
            if tuple(U.shape) != (m, p) or tuple(S.shape) != (p,):
                raise ValueError(f"{fn}: U must be (m, p) and S (p,) with (m, n) = {(m, n)} the "
                                 f"weight's shape and p = min(m, n) (got U {tuple(U.shape)} and "
                                 f"S {tuple(S.shape)})")
            dtype = U.dtype
        else:
            if m <= n:
                raise ValueError(f"{fn}: the right form is for tall weights, m > n (got weight "
                                 f"shape {(m, n)})")
            if tuple(V.shape) != (n, n) or tuple(S.shape) != (n,):
                raise ValueError(f"{fn}: V must be (n, n) and S (n,) with (m, n) = {(m, n)} the "
                                 f"weight's shape (got V {tuple(V.shape)} and S {tuple(S.shape)})")
            if V.dtype != _F64 or S.dtype != _F64:
                raise TypeError(f"{fn}: V and S must be float64 (got {V.dtype} and {S.dtype})")
            if V.device != S.device:
                raise ValueError(f"{fn}: V and S must be on one device (got {V.device} and "
                                 f"{S.device})")
            # The implicit U = W0 V / S divides by S: only values the form is accurate for.
            if not (bool(torch.isfinite(S).all()) and bool((S[:-1] >= S[1:]).all())
                    and float(S[-1]) >= RIGHT_FORM_MIN * float(S[0]) > 0):
                raise ValueError(f"{fn}: S must be finite, descending and at least "
                                 f"RIGHT_FORM_MIN = {RIGHT_FORM_MIN:g} of its largest value, which "
                                 f"must be positive (got S[0] = {float(S[0]):.3g}, S[-1] = "
                                 f"{float(S[-1]):.3g})")
        self._U, self._V, self._S, self.weight, self._dtype = U, V, S, weight, dtype

    @property
    def V(self) -> Tensor | None:
        """The right singular vectors (n, n), float64, in the right form; None in the left."""
        return self._V

    @property
    def S(self) -> Tensor:
        return self._S.to(self._dtype)

    @property
    def U(self) -> Tensor:
        """The left singular vectors (m, p) in the working dtype."""
        if self._V is None:
            return self._U
        return self.columns(slice(None)).to(self._dtype)

    def columns(self, cols, weight64: Tensor | None = None) -> Tensor:
        """``U[:, cols]`` in float64 (``cols`` a slice or index tensor): in the right form,
        ``W0 V[:, cols] / S[cols]``, m n r operations for r columns, with ``weight64`` (W0 in
        float64) if the caller has it, else from a float64 copy of ``weight``."""
        return _Basis("BaseSpectrum.columns", self, weight64).columns(cols)

    def stored(self) -> dict[str, Tensor]:
        """The tensors a cache stores: ``{"U", "S"}`` (left form) or ``{"V", "S"}`` (right)."""
        return {"U": self._U, "S": self._S} if self._V is None else {"V": self._V, "S": self._S}

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the base weight."""
        return tuple(self.weight.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._S.device

    def to(self, device=None, dtype=None) -> "BaseSpectrum":
        """A copy on another device and/or working dtype (``weight`` moves to the device and
        keeps its dtype; in the right form V and S stay float64)."""
        weight = self.weight.to(device=device)
        if self._V is None:
            return BaseSpectrum(self._U.to(device=device, dtype=dtype),
                                self._S.to(device=device, dtype=dtype), weight)
        return BaseSpectrum.from_right(self._V.to(device=device), self._S.to(device=device),
                                       weight, self._dtype if dtype is None else dtype)


@dataclass
class TopK:
    """Top-k singular triplets of a weight ``W`` and their similarity to a base spectrum.

    ``sigma`` (k,) descending, ``U`` (m, k), ``Vh`` (k, n); ``coords`` (p, k) the cosines
    ``base.U[:, i]^T U[:, j]`` with every base vector, ``max_cos[j] = max_i |coords[i, j]|`` and
    ``argmax[j]`` the ``i`` attaining it. The
    certificate of each triplet, as defined in the module docstring: ``residual[j]`` (relative
    to its own sigma), ``angle_bound[j]`` (sine of the angle to the true vector, 1 when not
    determined) and ``max_cos_bound[j]``; ``converged`` when every residual met the tolerance.
    ``iterations`` counts block Krylov restarts (both stages), ``method`` is ``"structured"``,
    ``"subspace"`` or ``"dense"``.
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
    angle_bound: Tensor
    max_cos_bound: Tensor
    coords: Tensor

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
    if base.weight.device != base.device:
        raise ValueError(f"{fn}: base.weight must be on the device of base.S "
                         f"(got {base.weight.device} and {base.device})")


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
    """Checks a (base, W, k) call; returns W detached."""
    _check_base(fn, base)
    _check_tensor(fn, "W", W, dims=2)
    m, n = base.shape
    if tuple(W.shape) != (m, n):
        raise ValueError(f"{fn}: W must have the base weight's shape {(m, n)} (got {tuple(W.shape)})")
    _check_same_device(fn, base, W=W)
    _check_k(fn, k, min(m, n))
    return W.detach()


def _check_finite(fn: str, name: str, t: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{fn}: {name} has non-finite entries (NaN or inf)")


def _check_tol(fn: str, tol) -> float:
    if tol is None:
        return _DEFAULT_TOL
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < math.inf:
        raise ValueError(f"{fn}: tol must be a positive number (got {tol!r})")
    return float(tol)


def _check_solver_args(fn: str, tol, max_iter, on_failure, block) -> float:
    tol = _check_tol(fn, tol)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{fn}: max_iter must be a positive int (got {max_iter!r})")
    if on_failure not in ("dense", "raise"):
        raise ValueError(f"{fn}: on_failure must be 'dense' or 'raise' (got {on_failure!r})")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"{fn}: block must be a positive int (got {block!r})")
    return tol


# ---------------------------------------------------------------------------------------------
# Base spectrum and low-rank SVD.

_BASE_METHODS = ("auto", "gram", "svd")
# A tall weight whose singular values all reach this fraction of the largest keeps the right
# form (BaseSpectrum.from_right): its implicit left vectors are then orthonormal to about
# eps64 (s_1/s_n)^2 <= 1e-10.
RIGHT_FORM_MIN = 1e-3
# Below this fraction, left vectors W0 v_i / s_i (formed for a tall W0) are orthonormal only to
# about eps64 (s_1/s_i)^2 > 1e-8, and are re-orthonormalized.
_GRAM_TINY = 1e-4
_GRAM_BLOCK = 512  # columns per block of the symmetric Gram product


def base_spectrum(W0: Tensor, dtype: torch.dtype = torch.float32, *,
                  method: str = "auto") -> BaseSpectrum:
    """Singular values and vectors of the base weight ``W0`` (m x n), working dtype ``dtype``,
    on ``W0``'s device, with ``W0`` attached (see :class:`BaseSpectrum` for the two forms).

    Computed in float64 from W0 upcast exactly:

    - ``"gram"``: eigendecomposition of the Gram matrix on the short side. For m <= n,
      ``W0 W0^T = U0 diag(S0^2) U0^T`` gives U0 directly (left form, rounded to ``dtype``).
      For m > n, ``W0^T W0 = V0 diag(S0^2) V0^T``: the right form (V0 and S0 in float64, U0 =
      W0 V0 / S0 implicit) when every singular value is at least ``RIGHT_FORM_MIN`` (1e-3) of
      the largest; otherwise U0 = W0 V0 / S0 is formed (left form), and its columns with
      ``S0 < 1e-4 * S0[0]`` (where that division amplifies rounding) are replaced by an
      orthonormal basis of what the others leave, which is a singular basis for those values to
      within ``(1e-4 * S0[0])^2`` in eigen-residual. Through the Gram matrix a singular value
      below about 1e-7 of ``S0[0]`` is resolved only to about ``1e-8 * S0[0]`` (absolute): zero
      and tiny values come out as such.
    - ``"svd"``: LAPACK / cuSOLVER SVD (:func:`intruder_ext.batched_svd`), left form, 2-3x
      slower on CPU.
    - ``"auto"`` (default): ``"gram"``, the faster one measured at every shape on CPU (see the
      table in the source).
    """
    fn = "base_spectrum"
    _check_tensor(fn, "W0", W0, dims=2)
    _check_work_dtype(fn, dtype)
    if method not in _BASE_METHODS:
        raise ValueError(f"{fn}: method must be one of {_BASE_METHODS} (got {method!r})")
    W = W0.detach()
    # "auto" rule, from timings on this project's 2-core CPU (two threads, quiet machine;
    # benchmarks/RESULTS.md 5.1; torch.linalg.svd in float32 for reference, at float32 accuracy):
    #   W0 shape       gram      torch.linalg.svd float64   torch.linalg.svd float32
    #   4096 x 4096     9.8 s    20.3 s                     10.8 s
    #   4096 x 11008   11.1 s    58.3 s                     35.4 s
    #   11008 x 4096   11.2 s    32.2 s                     17.9 s
    #   1024 x 4096     0.25 s    1.6 s                      1.1 s
    # "gram" is the fastest float64 method at every shape; it also beats the float32 SVD. No
    # GPU was lent to this project: on CUDA "gram" is assumed as well (cuSOLVER's syevd is far
    # faster than its gesvd), not measured.
    Wd = W.to(_F64)
    m, n = W.shape
    if method == "svd":
        _check_finite(fn, "W0", W)
        U, S, _ = ops.batched_svd(Wd)
    else:
        G = _gram(Wd.mT if m <= n else Wd)
        # Every entry of W0 is in a diagonal entry of G, a sum of squares, where a NaN or inf
        # cannot cancel: checked there at O(p) instead of a pass over W0.
        if not bool(torch.isfinite(G.diagonal()).all()):
            _check_finite(fn, "W0", W)
            raise ValueError(f"{fn}: W0's squared row or column norms overflow float64 (largest "
                             f"|entry| {float(W.abs().max()):.3g})")
        mu, vectors = torch.linalg.eigh(G)
        del G
        S = mu.flip(0).clamp_min(0).sqrt()
        if m > n > 0 and float(S[0]) > 0 and float(S[-1]) >= RIGHT_FORM_MIN * float(S[0]):
            return BaseSpectrum.from_right(vectors.flip(1).contiguous(), S, W0, dtype)
        U = vectors.flip(1) if m <= n else _left_from_right(Wd, vectors.flip(1), S)
    # eigh's vectors are column-major: one copy makes them row-major in dtype.
    return BaseSpectrum(torch.empty(U.shape, dtype=dtype, device=U.device).copy_(U),
                        S.to(dtype), W0)


def _gram(X: Tensor) -> Tensor:
    """``X^T X``, one block of columns at a time against itself and the blocks after it (the
    rest by symmetry): (1 + b/n)/2 of a full product's operations, 2.65 s against 4.40 s for a
    11008 x 4096 float64 X on two cores."""
    n = X.shape[1]
    G = X.new_empty(n, n)
    for j in range(0, n, _GRAM_BLOCK):
        e = min(j + _GRAM_BLOCK, n)
        block = X[:, j:e].mT @ X[:, j:]
        G[j:e, j:] = block
        G[e:, j:e] = block[:, e - j:].mT
    return G


def _left_from_right(W: Tensor, V: Tensor, S: Tensor) -> Tensor:
    """Left singular vectors ``W V / S`` of a float64 tall W; those of singular values below
    ``_GRAM_TINY`` of the largest replaced by an orthonormal basis of what the others leave."""
    n = V.shape[1]
    U = W @ V
    good = int((S > _GRAM_TINY * S[0]).sum()) if n else 0
    U[:, :good] /= S[:good]
    if good < n:
        U[:, good:] = _orthonormal_block(U[:, :good], U[:, good:])
    return U


def _factor_dtype(*tensors: Tensor) -> torch.dtype:
    """Working dtype of LoRA factors: float64 if any is, else float32 (half types upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def lowrank_svds(pairs: list[tuple[Tensor, Tensor]]) -> list[LowRankSVD]:
    """Thin SVDs of many products ``B @ A`` (each B (m, r), A (r, n), shapes free): QR of each
    factor, then SVDs of the small cores. On CUDA the cores of one shape go through one batched
    call (cuSOLVER ``gesvdjBatched``, which treats every matrix on its own); on CPU, where
    LAPACK loops over the matrices anyway, one call each, because a matrix inside a stack sits
    at another memory alignment and LAPACK/BLAS round differently with alignment. So each result
    is exactly what :func:`lowrank_svd` gives for its pair alone, whatever the other pairs."""
    factored = []
    for B, A in pairs:
        dtype = _factor_dtype(B, A)
        Qb, Rb = torch.linalg.qr(B.to(dtype))
        Qa, Ra = torch.linalg.qr(A.to(dtype).mT)
        factored.append((Qb, Qa, Rb @ Ra.mT))
    cores: list[tuple | None] = [None] * len(pairs)
    groups: dict[tuple, list[int]] = {}
    for i, (_, _, core) in enumerate(factored):
        if core.device.type == "cuda":
            groups.setdefault((tuple(core.shape), core.dtype, core.device), []).append(i)
        else:
            cores[i] = ops.batched_svd(core)
    for members in groups.values():
        Uc, S, Vhc = ops.batched_svd(torch.stack([factored[i][2] for i in members]))
        for j, i in enumerate(members):
            cores[i] = (Uc[j], S[j], Vhc[j])
    return [LowRankSVD(Qb @ Uc, S, Vhc @ Qa.mT)
            for (Qb, Qa, _), (Uc, S, Vhc) in zip(factored, cores)]


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
    mu: Tensor             # (c,) Ritz values, descending, c = min(k + 1, N)
    X: Tensor              # (N, c) Ritz vectors, orthonormal
    rho: Tensor            # (c,) residual norms ||G x - mu x||
    aux: Tensor | None     # (., c) the operator's side product for X (W^T X), if it has one
    iterations: int        # restarts


# An operator maps an orthonormal block V to (G V, aux V or None).
_Operator = Callable[[Tensor], "tuple[Tensor, Tensor | None]"]


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
    by 2048 x 10: about 20 ms against 2 ms measured; for ``M = W^T`` of a row-major float64 W,
    4096 x 4096 by 4096 x 11: 1.0 s against 0.04 s)."""
    return (X.mT @ M.mT).mT


def _rayleigh_ritz(V: Tensor, GV: Tensor, aux: Tensor | None):
    """Rotates ``V`` (orthonormal) onto its Ritz vectors, descending: no product with G."""
    H = V.mT @ GV
    mu, Y = torch.linalg.eigh((H + H.mT) / 2)
    mu, Y = mu.flip(0), Y.flip(1)
    return mu, V @ Y, GV @ Y, (aux @ Y if aux is not None else None)


def _eig_dense(op: _Operator, N: int, c: int, dtype, device) -> _Eig:
    """Explicit G (N x N) and eigh: for small N."""
    G, aux = op(torch.eye(N, dtype=dtype, device=device))
    mu, X, GX, aux = _rayleigh_ritz(torch.eye(N, dtype=dtype, device=device), G, aux)
    rho = (GX[:, :c] - X[:, :c] * mu[:c]).norm(dim=0)
    return _Eig(mu[:c], X[:, :c], rho, aux[:, :c] if aux is not None else None, 0)


def _eig_topk(op: _Operator, X0: Tensor, k: int, *, block: int, tol: float, max_iter: int,
              floor: float = 0.0, dense_n: int = _DENSE_N) -> _Eig:
    """Top-k eigenpairs of the symmetric PSD operator ``op`` (N-dim), and the (k+1)-th.

    Each restart computes ``G V`` for the current block V, rotates V onto its Ritz vectors
    (Rayleigh-Ritz within span(V)) and tests ``||G x_j - mu_j x_j|| <= tol * max(mu_j, floor *
    mu_1)`` on the top min(k + 1, N) of them: a fresh product, so the test is on the operator
    itself, not on Krylov sums. ``floor=0`` is the own-relative test of the certificates;
    ``floor=1`` the cheaper test relative to mu_1 (for a float32 warm start). If the test fails, the block
    Krylov basis K = [V, GV, ..., G^d V] (orthonormalized block by block) gives the top ``block``
    Ritz vectors of K^T G K as the next V. Stops early when the residuals stall (``_STALL``
    restarts without halving): the rounding floor is reached. Whether the answer converged is
    for the caller to judge from ``rho``.
    """
    N = X0.shape[0]
    dtype, device = X0.dtype, X0.device
    c = min(k + 1, N)
    if N <= max(dense_n, 4 * X0.shape[1]):  # too small for Krylov blocks beside X0
        return _eig_dense(op, N, c, dtype, device)
    max_basis = N // 2
    V = _orthonormal_block(None, X0)
    best, stalled = math.inf, 0
    for it in range(max_iter + 1):
        GV, aux = op(V)
        mu, V, GV, aux = _rayleigh_ritz(V, GV, aux)
        rho = (GV[:, :c] - V[:, :c] * mu[:c]).norm(dim=0)
        scale = torch.maximum(mu[:c], floor * mu[:1]).clamp_min(torch.finfo(dtype).tiny)
        worst = float((rho / scale).max())
        stalled = 0 if worst <= best / 2 else stalled + 1
        best = min(best, worst)
        if worst <= tol or it == max_iter or stalled >= _STALL:
            return _Eig(mu[:c], V[:, :c], rho, aux[:, :c] if aux is not None else None, it)
        # Krylov blocks grow from the top Ritz vectors only: a wide start block (X0) has done
        # its job once Rayleigh-Ritz has combined it, and narrower blocks are cheaper to
        # orthogonalize.
        keep = max(c, min(block, V.shape[1], max_basis // 2))
        V, GV = V[:, :keep], GV[:, :keep]
        blocks, gblocks = [V], [GV]
        for _ in range(_DEPTH):
            width = sum(b.shape[1] for b in blocks)
            if width + V.shape[1] > max_basis:
                break
            blocks.append(_orthonormal_block(torch.cat(blocks, dim=1), gblocks[-1]))
            gblocks.append(op(blocks[-1])[0])
        K, GK = torch.cat(blocks, dim=1), torch.cat(gblocks, dim=1)
        H = K.mT @ GK
        _, Y = torch.linalg.eigh((H + H.mT) / 2)
        # At most a quarter of the space, so that the next restart has room for a Krylov block.
        keep = max(c, min(block, K.shape[1], max_basis // 2))
        # K Y is orthonormal only to rounding; left alone, the error compounds over iterations.
        V = torch.linalg.qr(K @ Y.flip(1)[:, :keep])[0]
    raise AssertionError("unreachable")


def _default_block(k: int, N: int) -> int:
    # Room beyond k so a cluster of near-equal values at the k-th boundary converges as a whole.
    return min(N, max(2 * k, k + 10))


def _certificate(mu: Tensor, rho: Tensor, k: int):
    """Own-relative residuals, Davis-Kahan angle bounds and max_cos error bounds of the top k of
    ``c`` Ritz pairs (``mu`` descending, ``rho`` their residual norms; float64).

    The gap of pair j is the distance from mu_j to its neighbours, each moved towards mu_j by
    its own residual norm; below the last pair (no (j+1)-th: the whole space is spanned) the
    nearest eigenvalue can only be >= 0, so the distance to 0 bounds that side.
    """
    inf = torch.full_like(mu[:1], math.inf)
    above = torch.cat([inf, mu[:-1] - rho[:-1]])[:k] - mu[:k]
    below = mu[:k] - torch.cat([mu[1:] + rho[1:], torch.zeros_like(mu[:1])])[:k]
    gap = torch.minimum(above, below)
    residual = rho[:k] / mu[:k].clamp_min(torch.finfo(mu.dtype).tiny)
    angle = torch.where(gap > 0, rho[:k] / gap.clamp_min(torch.finfo(mu.dtype).tiny),
                        torch.ones_like(gap)).clamp_max(1.0)
    return residual, angle, 2 * torch.sin(torch.asin(angle) / 2)


class _Gram64:
    """``W W^T`` for ``W = W0 + s B A`` (B, A optional) through float64 products with the true
    weights: W0 is upcast once per call (exactly, from any floating dtype). Calling it on V
    returns ``(W W^T V, W^T V)``."""

    def __init__(self, W0: Tensor, B: Tensor | None = None, A: Tensor | None = None,
                 scale: float = 0.0):
        self.W0 = W0.to(_F64)
        self.B = None if B is None else B.to(_F64)
        self.A = None if A is None else A.to(_F64)
        self.s = float(scale)

    def mm(self, X: Tensor) -> Tensor:
        """``W @ X``."""
        out = _thin_mm(self.W0, X)
        return out if self.B is None else out + self.s * (self.B @ (self.A @ X))

    def rmm(self, Y: Tensor) -> Tensor:
        """``W^T @ Y``."""
        out = _thin_mm(self.W0.mT, Y)
        return out if self.B is None else out + self.s * (self.A.mT @ (self.B.mT @ Y))

    def dense(self) -> Tensor:
        return self.W0 if self.B is None else self.W0 + self.s * (self.B @ self.A)

    def __call__(self, V: Tensor):
        Z = self.rmm(V)
        return self.mm(Z), Z


class _Basis:
    """A base spectrum's left vectors ``U0`` (m, p) in float64, for one computation of ``fn``:
    products ``U0^T X`` and ``U0 x`` with U0 itself (left form), or as ``S^-1 V^T (W0^T X)`` and
    ``W0 V (x / S)`` (right form, ``W64`` the float64 W0 when the caller has one, else made on
    first use). In the right form every result passes through W0, where a non-finite entry makes
    the result non-finite (NaN * x, inf * 0, inf - inf): checked there, at the size of the
    result, instead of a pass over W0; unchecked, it would turn every max_cos into NaN, which
    no epsilon flags.

    ``unit_error`` is the estimate of ``| ||u_i|| - 1 |`` and ``|u_i^T u_j|`` that the max_cos
    bound adds: the rounding of U0's dtype, plus, where vectors are (or were) formed as
    ``W0 v_i / s_i`` (tall W0), the Gram eigensolver's backward error amplified by S^-1 on both
    sides, eps64 sqrt(m) (s_1/s_i)^2 for the smallest such s_i (the right form's S[-1]; in a
    tall left form, the smallest value above the re-orthonormalized ones). Measured: 6e-11 on a
    2000 x 400 weight with s_1/s_n = 1e3 (log-spaced values), where this gives 9e-9."""

    def __init__(self, fn: str, base: BaseSpectrum, W64: Tensor | None = None):
        self.fn, self._base, self._W64, self._U = fn, base, W64, None
        self.S = base._S.to(_F64)
        self.V = base.V
        m, n = base.shape
        self.unit_error = torch.finfo(base.dtype).eps
        formed = self.S[self.S > _GRAM_TINY * self.S[:1]] if m > n else self.S[:0]
        if formed.numel():
            self.unit_error += torch.finfo(_F64).eps * math.sqrt(m) * float(
                formed[0] / formed[-1]) ** 2

    @property
    def U(self) -> Tensor:
        """The left form's U0 in float64, converted on first use."""
        if self._U is None:
            self._U = self._base._U.to(_F64)
        return self._U

    @property
    def W0(self) -> Tensor:
        if self._W64 is None:
            self._W64 = self._base.weight.detach().to(_F64)
        return self._W64

    def _through_W0(self, out: Tensor) -> Tensor:
        _check_finite(self.fn, "base.weight (W0)", out)
        return out

    def t(self, X: Tensor) -> Tensor:
        """``U0^T X``."""
        if self.V is None:
            return _thin_mm(self.U.mT, X)
        return self._through_W0(_thin_mm(self.V.mT, _thin_mm(self.W0.mT, X)) / self.S[:, None])

    def mm(self, x: Tensor) -> Tensor:
        """``U0 x``."""
        if self.V is None:
            return _thin_mm(self.U, x)
        return self._through_W0(_thin_mm(self.W0, _thin_mm(self.V, x / self.S[:, None])))

    def columns(self, cols) -> Tensor:
        """``U0[:, cols]`` (in the left form without converting the rest of U0)."""
        if self.V is None:
            return self._base._U[:, cols].to(_F64)
        return self._through_W0(_thin_mm(self.W0, self.V[:, cols]) / self.S[cols])


def _certify(gram: _Gram64, Y0: Tensor, k: int, *, block: int, tol: float, max_iter: int) -> _Eig:
    """The float64 stage of every path: Ritz pairs of the true ``W W^T`` started from the
    approximate left vectors ``Y0`` (m, >= k + 1 columns where m allows), refined by block Krylov
    iteration until the own-relative residuals meet ``tol``. From a good start this is one
    product with W and one with W^T."""
    return _eig_topk(gram, Y0.to(_F64), k, block=block, tol=tol, max_iter=max_iter, dense_n=0)


def _certified(fn: str, gram: _Gram64, Y0: Tensor, k: int, basis: _Basis, dtype: torch.dtype,
               method: str, iterations: int, *, block: int | None, tol: float, max_iter: int,
               on_failure: str) -> TopK:
    """The end of every fast path: certify the approximate left vectors ``Y0`` against the true
    ``W``, or fail as ``on_failure`` says (the dense fallback, or an error)."""
    m = Y0.shape[0]
    eig = _certify(gram, Y0, k, block=_default_block(k, m) if block is None else min(block, m),
                   tol=tol, max_iter=max_iter)
    top = _finish(eig, k, basis, dtype, method, iterations + eig.iterations, tol)
    if not top.converged:
        _fail(fn, top, tol, max_iter, on_failure)
        return _dense(gram, basis, k, dtype, tol)
    return top


def _fail(fn: str, top: TopK, tol: float, max_iter: int, on_failure: str):
    msg = (f"{fn}: top-{top.sigma.shape[0]} did not converge: largest residual "
           f"{float(top.residual.max()):.3g} > tol {tol:.3g} after {top.iterations} iterations "
           f"(max_iter={max_iter})")
    if on_failure == "raise":
        raise RuntimeError(msg)
    warnings.warn(msg + "; falling back to a dense SVD (dense_topk)", RuntimeWarning, stacklevel=4)


def _finish(eig: _Eig, k: int, basis: _Basis, dtype: torch.dtype, method: str, iterations: int,
            tol: float) -> TopK:
    """TopK in ``dtype`` from float64 Ritz pairs of the true W W^T (``eig.aux = W^T X``)."""
    Y, Z = eig.X[:, :k], eig.aux[:, :k]
    sigma = Z.norm(dim=0)
    Vh = (Z / sigma.clamp_min(torch.finfo(_F64).tiny)).mT
    residual, angle, cos_err = _certificate(eig.mu, eig.rho, k)
    # cos with every base vector as float64 GEMMs: twice as fast here as max_cosine's float64
    # kernel (2048 x 2048 by 2048 x 10: 7 ms against 15 ms), and p x k stays small beside U0
    # itself. The base vectors are unit vectors to within basis.unit_error; normalizing them
    # would cost more than the GEMM (column norms of a row-major matrix: 35 ms here).
    coords = basis.t(Y)
    max_cos, argmax = coords.abs().max(dim=0)
    # Rounding to dtype (returned vectors and values) and the base vectors' norms are part of
    # the error.
    eps = torch.finfo(dtype).eps
    angle = (angle + eps).clamp_max(1.0)
    cos_bound = (cos_err + eps + basis.unit_error).clamp_max(1.0)
    return TopK(sigma.to(dtype), Y.to(dtype).contiguous(), Vh.to(dtype).contiguous(),
                max_cos.to(dtype), argmax, residual.to(dtype), bool((residual <= tol).all()),
                iterations, method, angle.to(dtype), cos_bound.to(dtype),
                coords.to(dtype).contiguous())


# ---------------------------------------------------------------------------------------------
# Top-k of W = W0 + s B A from the base spectrum (structured), of any W (subspace), dense.

def lora_topk(base: BaseSpectrum, B: Tensor, A: Tensor, scale: float, k: int, *,
              tol: float | None = None, max_iter: int = 100, on_failure: str = "dense",
              block: int | None = None) -> TopK:
    """Certified top-k singular triplets of ``W = W0 + scale * B @ A`` (DESIGN.md step 2).

    ``base`` is the spectrum of W0 (m x n) with W0 attached, B is (m, r), A is (r, n), on the
    base's device, any floating dtype. Costs O((m + n) p r) for the float64 setup products, a
    block Krylov iteration on the (p + q)-dim operator G~ at O((p + q) r) per product, and the
    float64 check of the answer against the true W: O(m n k) (see the module docstring for the
    precision and the certificate).

    Args:
        tol: certificate ``residual[j] <= tol`` (own-relative, see the module docstring) for
            every returned triplet (default 1e-6).
        max_iter: restarts of each block Krylov iteration before giving up.
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
    tol = _check_solver_args(fn, tol, max_iter, on_failure, block)
    _check_finite(fn, "B", B)
    _check_finite(fn, "A", A)
    s = float(scale)
    gram = _Gram64(base.weight.detach(), B.detach(), A.detach(), s)
    basis = _Basis(fn, base, gram.W0)
    S0 = basis.S
    B, A = gram.B, gram.A

    # B = U0 P + Q R, with Q orthonormal and orthogonal to U0 (only when U0 does not span R^m).
    # W0 A^T is the only product with W0 in the setup; one pass over U0 gives U0^T [B, W0 A^T].
    r = B.shape[1]
    W0At = _thin_mm(gram.W0, A.mT)
    # A non-finite entry of W0 makes its whole row of W0 A^T non-finite (NaN * a, inf * 0, or
    # inf - inf): checked here at O(m r) instead of a pass over W0.
    _check_finite(fn, "base.weight (W0)", W0At)
    P, L1 = basis.t(torch.cat([B, W0At], dim=1)).split(r, dim=1)
    if m > p:
        Bp = B - basis.mm(P)
        P2 = basis.t(Bp)  # second pass: one projection leaves eps-sized parts in range(U0)
        P, Bp = P + P2, Bp - basis.mm(P2)
        Q, R = torch.linalg.qr(Bp)
    else:
        Q, R = B.new_zeros(m, 0), B.new_zeros(0, r)
    q = Q.shape[1]
    L1 = torch.cat([L1, Q.mT @ W0At])
    L2 = torch.cat([P, R])
    L = torch.cat([L1, L2], dim=1)
    eye = torch.eye(r, dtype=_F64, device=B.device)
    K2 = torch.cat([torch.cat([torch.zeros_like(eye), s * eye], dim=1),
                    torch.cat([s * eye, (s * s) * (A @ A.mT)], dim=1)])
    D = torch.cat([S0 * S0, B.new_zeros(q)])

    def structured(X: Tensor):
        return D[:, None] * X + L @ (K2 @ (L.mT @ X)), None

    N = p + q
    blk = max(k, _default_block(k, N) if block is None else min(block, N))
    X0 = torch.cat([torch.eye(N, blk, dtype=_F64, device=B.device), L], dim=1)
    # Stage 1 only finds the vectors (G~ is exact only for an exact base spectrum): a tenth of
    # tol, so that the check on the true W below usually passes at once, or the rounding floor.
    approx = _eig_topk(structured, X0, k, block=blk, tol=tol / 10, max_iter=max_iter)
    x = approx.X
    Y0 = basis.mm(x[:p]) + Q @ x[p:]
    return _certified(fn, gram, Y0, k, basis, base.dtype, "structured", approx.iterations,
                      block=block, tol=tol, max_iter=max_iter, on_failure=on_failure)


def weight_topk(W: Tensor, base: BaseSpectrum, k: int, *, tol: float | None = None,
                max_iter: int = 100, on_failure: str = "dense", block: int | None = None) -> TopK:
    """Certified top-k singular triplets of an arbitrary ``W`` (m x n), e.g. a fully fine-tuned
    weight, compared with the base spectrum's ``U`` (arguments as in :func:`lora_topk`).

    A float32 block Krylov iteration on ``W W^T`` (or ``W^T W`` when m > n), started from the
    base's top singular vectors and a random block, finds the subspace; the float64 iteration on
    the true ``W W^T`` then certifies (and where float32 was not enough, refines) it.
    """
    fn = "weight_topk"
    W = _check_weight(fn, base, W, k)
    tol = _check_solver_args(fn, tol, max_iter, on_failure, block)
    _check_finite(fn, "W", W)
    m, n = base.shape
    p = min(m, n)
    gram = _Gram64(W)
    basis = _Basis(fn, base)

    # Float32 warm start, tested relative to mu_1 (what float32 can reach on any spectrum),
    # then the float64 iteration. Against float64 throughout (one thread, k = 10, W = W0 + noise
    # + two spikes): 2048 x 5632, slowly decaying spectrum (14 restarts) 2.66 s against 3.76 s,
    # 5632 x 2048 3.18 s against 4.48 s; a steep spectrum (1 restart) 0.65 s against 0.46 s.
    # The slow case is the one that matters, so float32 first.
    W32 = W.to(torch.float32)
    left = m <= n  # iterate on the smaller Gram matrix
    blk = max(k, _default_block(k, p) if block is None else min(block, p))
    gen = torch.Generator(device=W.device).manual_seed(0)
    if base.V is not None:  # right form: W0's top right vectors are at hand
        start = base.V[:, :blk].to(torch.float32)
    else:
        start = basis.columns(slice(0, blk)).to(torch.float32)
        if not left:
            start = _thin_mm(W32.mT, start)  # ~ the top right vectors when W is near W0
    X0 = torch.cat([start, torch.randn(p, blk, generator=gen, device=W.device)], dim=1)

    def gram32(X: Tensor):
        if left:
            return _thin_mm(W32, _thin_mm(W32.mT, X)), None
        return _thin_mm(W32.mT, _thin_mm(W32, X)), None

    approx = _eig_topk(gram32, X0, k, block=blk, tol=1e-5, max_iter=max_iter, floor=1.0)
    Y0 = approx.X if left else _thin_mm(W32, approx.X)
    return _certified(fn, gram, Y0, k, basis, base.dtype, "subspace", approx.iterations,
                      block=block, tol=tol, max_iter=max_iter, on_failure=on_failure)


def _dense(gram: _Gram64, basis: _Basis, k: int, dtype: torch.dtype, tol: float) -> TopK:
    """Float64 SVD of W, certified like the iterative answers (with exact gaps)."""
    W = gram.dense()
    U, S, _ = ops.batched_svd(W)
    c = min(k + 1, U.shape[1])
    Y = U[:, :c]
    GY, Z = gram(Y)
    mu = S[:c] * S[:c]
    rho = (GY - Y * mu).norm(dim=0)
    eig = _Eig(mu, Y, rho, Z, 0)
    return _finish(eig, k, basis, dtype, "dense", 0, tol)


def dense_topk(W: Tensor, base: BaseSpectrum, k: int, *, tol: float | None = None) -> TopK:
    """Reference and fallback: float64 SVD of ``W``, its top k compared with the base spectrum's
    ``U``; certified as the iterative answers are (``converged`` when every own-relative
    residual is <= ``tol``, default 1e-6: not the case for zero singular values)."""
    W = _check_weight("dense_topk", base, W, k)
    tol = _check_tol("dense_topk", tol)
    _check_finite("dense_topk", "W", W)
    return _dense(_Gram64(W), _Basis("dense_topk", base), k, base.dtype, tol)
