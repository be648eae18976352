"""Calibration of ``max_cos``: what chance reaches, and how far the base basis pins it down.

**The null.** ``max_cos(y) = max_i |cos(y, x_i)|`` over the ``p = min(m, n)`` left singular
vectors ``x_i`` of a base weight (m x n), which are orthonormal in ``R^m``. For ``y`` uniform on
the unit sphere, ``U0^T y`` are ``p`` coordinates of a uniform unit vector in an orthonormal
basis, so the distribution of ``max_cos`` depends on ``(m, p)`` only: with ``g ~ N(0, I_m)``,

    max_cos = M / sqrt(M^2 + S' + T),   M = max_{i<p} |g_i|,

``S'`` the sum of the other ``p - 1`` squares (each a standard normal truncated to ``|g| < M``)
and ``T ~ chi^2_{m-p}``. Hence, with ``s = t^2``,

    P(max_cos <= t) = int p 2phi(mu) erf(mu/sqrt2)^(p-1) P(S' + T >= mu^2 (1 - s)/s) dmu,

a 1-D integral whose inner tail is that of a sum of independent terms with known moments. It is
approximated by a shifted gamma with the sum's exact mean, variance and third moment (exact when
p = 1). From m = 32 on, against 4e5-sample Monte Carlo, the median agrees to 2e-4 and the 99th
percentile to 2e-3 (largest near m = 32..40, shrinking as m grows); tests/test_calibration.py
checks it. Below m = 32 a sum of so few bounded terms is not gamma-like (the p99 would be off by
0.02 at m = 8), and the quantiles come from a seeded Monte Carlo of the same representation
instead (2^18 samples: standard errors below 1e-3, cost N * m, under 0.5 s). Both are cached
per (m, p); the integral costs about 0.1 s.

**Basis sensitivity.** Singular vectors with equal singular values are determined only up to a
rotation within their group, and near-equal ones only up to rotations that a perturbation of
the weight of the size of the gap produces: two correct SVDs may return different ones, and
``max_cos`` with them. Base values are grouped by chaining consecutive gaps
``s_i - s_{i+1} <= basis_rtol * s_0`` (relative to the largest value ``s_0``: an SVD's backward
error, and the perturbation bounds of its vectors (Davis-Kahan, Wedin), are in units of
``s_0``). The default :data:`BASIS_RTOL` = 1e-4 is about the backward error of a float32 SVD of
a 1000-wide matrix (``m * eps32``); larger values ask what happens under larger perturbations
(bf16 storage rounds every entry by up to 4e-3). Every group is then a block of size ``d_g``
that a valid basis may rotate freely; a group of width ``w`` (largest minus smallest value) is
exactly degenerate in ``W0 + E`` for some ``||E||_2 <= w / 2``.

With ``rho_g = ||P_g y||`` the norm of ``y``'s part in group ``g``'s span, a rotation inside the
group moves that part's coordinates anywhere on the sphere of radius ``rho_g`` in ``R^{d_g}``,
so its largest ``|coordinate|`` ranges over ``[rho_g / sqrt(d_g), rho_g]`` (the upper end:
align one basis vector with ``P_g y``; the lower end: a basis in which all ``d_g`` coordinates
are equal, which exists for every ``d_g``), and groups rotate independently. Hence the set of
values ``max_cos`` takes over all valid bases is exactly the interval

    [ max_g rho_g / sqrt(d_g),  max_g rho_g ]

(connected, every point attained). The upper end is the maximum over *all* groups, not the norm
in the group holding the current arg-max: a singleton at 0.4 holds the arg-max while a group of
four with 0.3 on each has ``rho = 0.6``, which a rotation turns into ``max_cos = 0.6``. A
vector's intruder status (``max_cos < epsilon``) depends on the basis exactly when
``lo < epsilon <= hi``.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["BASIS_RTOL", "CalibrationWarning", "NullMaxCos", "alignment", "basis_groups",
           "below_null", "max_cos_interval", "null_max_cos", "warn_below_null"]

BASIS_RTOL = 1e-4
NULL_QUANTILES = (0.5, 0.99)
_MC_BELOW_M = 32  # below this width the quantiles come from Monte Carlo (see the module doc)
_MC_SAMPLES = 1 << 18
_MC_CHUNK = 1 << 15
_MU_POINTS = 4000  # integration grid for M; its density is smooth, width >= 0.2
_GL_NODES = 64  # Gauss-Legendre nodes for the truncated moments


class CalibrationWarning(UserWarning):
    """epsilon is at or below what a random direction reaches: chance-level directions would
    count as aligned (not intruders)."""


class NullMaxCos(NamedTuple):
    """Quantiles of ``max_cos`` for a uniformly random unit vector: median and 99th percentile."""

    median: float
    p99: float


@functools.lru_cache(maxsize=None)
def null_max_cos(m: int, p: int) -> NullMaxCos:
    """The median and 99th percentile of ``max_i |cos(y, x_i)|`` for ``y`` uniform on the unit
    sphere of ``R^m`` and ``p`` orthonormal ``x_i`` (p = min(m, n) for an m x n base weight)."""
    if not (isinstance(m, int) and isinstance(p, int) and 1 <= p <= m):
        raise ValueError(f"null_max_cos: need integers 1 <= p <= m (got m={m!r}, p={p!r})")
    if m < _MC_BELOW_M:
        return NullMaxCos(*_monte_carlo_quantiles(m, p, NULL_QUANTILES))
    return NullMaxCos(*(_bisect(lambda t: _null_cdf(m, p, t), q) for q in NULL_QUANTILES))


def _monte_carlo_quantiles(m: int, p: int, qs) -> list[float]:
    g = torch.Generator().manual_seed(m * 1_000_003 + p)  # the same numbers in every run
    samples = []
    for start in range(0, _MC_SAMPLES, _MC_CHUNK):
        x = torch.randn(_MC_CHUNK, m, generator=g, dtype=torch.float64)
        samples.append(x[:, :p].abs().amax(dim=1) / x.norm(dim=1))
    values = torch.cat(samples)
    return torch.quantile(values, torch.tensor(qs, dtype=torch.float64)).tolist()


def _bisect(cdf, q: float) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(40):  # 1e-12: far below the approximation's own error
        mid = (lo + hi) / 2
        if cdf(mid) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@functools.lru_cache(maxsize=None)
def _mu_grid(m: int, p: int):
    """Grid over M = max of p |N(0,1)|, its density, and the mean, variance and third central
    moment of S' + T (the sum of the other squares) given M = mu."""
    dt = torch.float64
    hi = math.sqrt(2 * math.log(max(p, 2))) + 9.0  # the density of M is < 1e-17 beyond
    mu = torch.linspace(0.0, hi, _MU_POINTS, dtype=dt)
    F = torch.special.erf(mu / math.sqrt(2))
    phi2 = math.sqrt(2 / math.pi) * torch.exp(-mu * mu / 2)  # density of |N(0, 1)|
    density = p * phi2 * F ** (p - 1)  # 0 ** 0 = 1: p = 1 has density at mu = 0
    mean1, var1, third1 = _truncated_square_moments(mu)
    mean = (p - 1) * mean1 + (m - p)
    var = (p - 1) * var1 + 2 * (m - p)
    third = (p - 1) * third1 + 8 * (m - p)
    return mu, density, mean, var, third


def _truncated_square_moments(mu: Tensor):
    """Mean, variance and third central moment of X^2, X ~ N(0, 1) given |X| < mu, by
    Gauss-Legendre quadrature in x = mu u, u in [0, 1] (the closed forms cancel catastrophically
    for small mu)."""
    u, w = np.polynomial.legendre.leggauss(_GL_NODES)
    u = torch.as_tensor((u + 1) / 2, dtype=mu.dtype)
    w = torch.as_tensor(w / 2, dtype=mu.dtype)
    x2 = (mu[:, None] * u) ** 2
    weight = w * torch.exp(-x2 / 2)
    weight = weight / weight.sum(dim=1, keepdim=True)
    mean = (weight * x2).sum(dim=1)
    d = x2 - mean[:, None]
    return mean, (weight * d * d).sum(dim=1), (weight * d ** 3).sum(dim=1)


def _null_cdf(m: int, p: int, t: float) -> float:
    """P(max_cos <= t) by the 1-D integral of the module doc, the inner tail by a shifted gamma
    with the exact first three moments of S' + T."""
    if t <= 0:
        return 0.0
    if t >= 1:
        return 1.0
    mu, density, mean, var, third = _mu_grid(m, p)
    s = t * t
    need = mu * mu * (1 - s) / s  # S' + T must reach this
    k = 4 * var ** 3 / third ** 2  # shape from the skewness 2 / sqrt(k)
    theta = var / (k * var).sqrt()
    shift = mean - k * theta
    tail = torch.special.gammaincc(k, ((need - shift) / theta).clamp_min(0))
    # Where every term vanishes (mu = 0 with p = m) the shape is 0/0; M has no density there.
    return float(torch.trapezoid(torch.where(density > 0, density * tail, 0.0), mu))


def alignment(max_cos: Tensor, null_median: float) -> Tensor:
    """Where each ``max_cos`` sits between chance and a base singular vector:
    ``(max_cos - null) / (1 - null)`` clipped to [0, 1]; 0 at or below the null median (a random
    direction does as well), 1 for a base vector itself."""
    if null_median >= 1:  # m = 1: every direction is a base vector
        return torch.ones_like(max_cos)
    return ((max_cos - null_median) / (1 - null_median)).clamp(0, 1)


def basis_groups(S: Tensor, rtol: float = BASIS_RTOL) -> Tensor:
    """Group index (p,) of each singular value (``S`` descending): consecutive values share a
    group when their gap is at most ``rtol * S[0]``."""
    if S.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=S.device)
    new = (S[:-1] - S[1:]) > rtol * S[0]
    return torch.cat([new.new_zeros(1), new]).cumsum(0)


def max_cos_interval(coords: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """``(lo, hi)``, each (k,): the range of ``max_cos`` over the bases that rotate within
    ``groups``, from ``coords = U0^T Y`` (p, k) of unit vectors ``Y`` (see the module doc)."""
    n_groups = int(groups[-1]) + 1 if groups.numel() else 0
    sq = coords.new_zeros(n_groups, coords.shape[1]).index_add_(0, groups, coords * coords)
    size = torch.bincount(groups, minlength=n_groups).to(coords.dtype)
    rho = sq.sqrt()
    return (rho / size.sqrt()[:, None]).amax(dim=0), rho.amax(dim=0)


def below_null(records, epsilon: float) -> list:
    """The records (:class:`~intruder_ext.report.ModuleReport`) whose null 99th percentile
    reaches ``epsilon``: there more than 1% of random directions have ``max_cos >= epsilon``,
    so the test no longer separates an intruder from chance. (The p99 rather than the median:
    at the median half of all chance directions would already pass as aligned.)"""
    return [r for r in records if epsilon <= r.null_max_cos_p99]


def warn_below_null(records, epsilon: float, stacklevel: int = 2) -> None:
    """A :class:`CalibrationWarning` naming the worst module when :func:`below_null` holds
    any record."""
    low = below_null(records, epsilon)
    if not low:
        return
    worst = max(low, key=lambda r: r.null_max_cos_p99)
    warnings.warn(
        f"epsilon={epsilon} is at or below the 99th percentile of max |cos| of a random "
        f"direction in {len(low)} of {len(records)} modules (up to "
        f"{worst.null_max_cos_p99:.3f} in {worst.name}, {worst.shape[0]}x{worst.shape[1]}): "
        f"there chance-level directions count as aligned; raise epsilon or read the alignment "
        f"column", CalibrationWarning, stacklevel=stacklevel)
