"""Calibration: the null distribution of max |cos| against Monte Carlo through max_cosine, the
alignment score, and the basis-sensitivity interval on a planted degenerate cluster."""

import json
import math

import pytest
import torch

import intruder_ext
from intruder_ext.calibration import (CalibrationWarning, alignment, basis_groups,
                                      max_cos_interval, null_max_cos)
from intruder_ext.detection import analyse_layer
from intruder_ext.layers import Layer
from intruder_ext.detection import spectrum_source


def order_statistic_bounds(values, q, z=4.5):
    """A distribution-free confidence interval for the q-quantile: the order statistics
    N q -/+ z sqrt(N q (1 - q)) of ``values`` (binomial counts, z standard deviations)."""
    v = values.sort().values
    n = v.numel()
    half = z * math.sqrt(n * q * (1 - q))
    lo = max(0, math.floor(n * q - half))
    hi = min(n - 1, math.ceil(n * q + half))
    return v[lo].item(), v[hi].item()


@pytest.mark.parametrize("m,p,samples", [(8, 8, 20000), (24, 5, 20000), (32, 32, 20000),
                                         (64, 16, 20000), (96, 96, 20000), (384, 384, 12000),
                                         (1536, 384, 6000)])
def test_null_matches_monte_carlo_through_max_cosine(m, p, samples):
    """Random unit directions against a random orthonormal basis of p vectors in R^m, through
    the package's own max_cosine: both quantiles inside their Monte Carlo confidence interval,
    widened by the documented accuracy (2e-3 from m = 32; the Monte Carlo path below)."""
    g = torch.Generator().manual_seed(m + 7 * p)
    X, _ = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))
    Y = torch.randn(m, samples, generator=g, dtype=torch.float64)
    values, _ = intruder_ext.max_cosine(Y, X)
    null = null_max_cos(m, p)
    slack = 2e-3 if m >= 32 else 3e-3
    for q, got in ((0.5, null.median), (0.99, null.p99)):
        lo, hi = order_statistic_bounds(values, q)
        assert lo - slack <= got <= hi + slack, (q, got, lo, hi)


def test_null_exact_cases():
    # p = 1: |cos| has density proportional to (1 - t^2)^((m - 3) / 2) on [0, 1].
    for m in (33, 200):
        t = torch.linspace(0, 1, 200001, dtype=torch.float64)
        cdf = torch.cumulative_trapezoid((1 - t * t) ** ((m - 3) / 2), t)
        cdf = cdf / cdf[-1]
        null = null_max_cos(m, 1)
        for q, got in ((0.5, null.median), (0.99, null.p99)):
            want = t[1:][torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64))].item()
            assert got == pytest.approx(want, abs=1e-4)
    # m = p = 2: max(|cos a|, |sin a|) = cos(b) with b uniform on [0, pi/4].
    null = null_max_cos(2, 2)
    assert null.median == pytest.approx(math.cos(math.pi / 8), abs=3e-3)
    assert null.p99 == pytest.approx(math.cos(0.01 * math.pi / 4), abs=3e-3)
    assert null_max_cos(1, 1) == (1.0, 1.0)
    # The example: about 0.06 in a 4096-wide layer.
    assert 0.055 < null_max_cos(4096, 4096).median < 0.065


def test_null_argument_check():
    with pytest.raises(ValueError, match=r"null_max_cos: need integers 1 <= p <= m \(got m=4, p=5\)"):
        null_max_cos(4, 5)


def test_alignment():
    got = alignment(torch.tensor([0.0, 0.2, 0.6, 1.0]), 0.2)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.5, 1.0]))
    assert alignment(torch.tensor([1.0]), 1.0).item() == 1.0


def test_basis_groups_chain_relative_to_the_largest_value():
    S = torch.tensor([10.0, 9.9995, 9.999, 5.0, 1.0, 1.0, 0.0, 0.0])
    assert basis_groups(S, 1e-4).tolist() == [0, 0, 0, 1, 2, 2, 3, 3]
    assert basis_groups(S, 0.0).tolist() == [0, 1, 2, 3, 4, 4, 5, 5]
    assert basis_groups(torch.zeros(3), 1e-4).tolist() == [0, 0, 0]


def rotation(d, generator):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q


def to_unit_vector(x):
    """An orthogonal matrix whose first column is the unit vector x (a Householder
    reflection)."""
    e = torch.zeros_like(x)
    e[0] = 1.0
    v = x - e
    if v.norm() < 1e-12:
        return torch.eye(len(x), dtype=x.dtype)
    v = v / v.norm()
    return torch.eye(len(x), dtype=x.dtype) - 2 * torch.outer(v, v)


def test_interval_on_a_planted_degenerate_cluster():
    """W0 has four equal singular values (indices 5..8). A LoRA update makes the top tuned
    vector 0.45 x_1 + 0.3 (x_5 + x_6 + x_7 + x_8) + a spread remainder: whatever basis of the
    cluster the SVD returned, max_cos can be anything in [0.45, 0.6] over valid bases (the upper
    end from the cluster, which does not hold the arg-max in a basis that spreads it). Two random
    valid bases land inside the reported interval, the extreme bases reach its ends, and the flag
    is set exactly when the interval straddles epsilon."""
    g = torch.Generator().manual_seed(3)
    m = n = 40
    U0 = rotation(m, g)
    V0 = rotation(n, g)
    S0 = torch.linspace(20, 1, m, dtype=torch.float64)
    cluster = [5, 6, 7, 8]
    S0[cluster] = 16.0
    W0 = (U0 * S0) @ V0.T
    coef = torch.zeros(m, dtype=torch.float64)
    coef[1] = 0.45
    coef[cluster] = 0.3
    rest = [i for i in range(10, m)]
    coef[rest] = math.sqrt((1 - 0.45 ** 2 - 4 * 0.09) / len(rest))
    y = U0 @ coef
    z = V0[:, 20]
    layer = Layer("l", "linear", (m, n), rank=1, scale=1.0, read_base=lambda: W0.float(),
                  read_factors=lambda: (300.0 * y[:, None].float(), z[None, :].float()))
    rec = analyse_layer(layer, spectrum_source(False), 3, 0.5).record
    lo, hi = rec.max_cos_lo[0].item(), rec.max_cos_hi[0].item()

    W = W0 + 300.0 * torch.outer(y, z)
    y0 = torch.linalg.svd(W).U[:, :1]  # the tuned top vector, float64
    c = (U0.T @ y0).flatten()
    rho = c[cluster].norm().item()
    assert lo == pytest.approx(c[1].abs().item(), abs=2e-4)
    assert hi == pytest.approx(rho, abs=2e-4)
    assert 0.40 < lo < 0.5 < hi < 0.65

    def max_cos_in(Q):  # the basis U0 with the cluster's columns rotated by Q (W0 unchanged)
        U = U0.clone()
        U[:, cluster] = U0[:, cluster] @ Q
        V = V0.clone()
        V[:, cluster] = V0[:, cluster] @ Q
        torch.testing.assert_close((U * S0) @ V.T, W0)  # a valid SVD of the same W0
        return intruder_ext.max_cosine(y0, U)[0].item()

    for _ in range(2):
        assert lo - 1e-5 <= max_cos_in(rotation(4, g)) <= hi + 1e-5
    # The ends are attained: one basis vector along y's part in the cluster gives hi; a basis
    # with equal coordinates (0.3 each, below the singleton's 0.45) gives lo.
    along = to_unit_vector(c[cluster] / rho)
    assert max_cos_in(along) == pytest.approx(hi, abs=2e-4)
    spread = along @ to_unit_vector(torch.full((4,), 0.5, dtype=torch.float64)).T
    assert max_cos_in(spread) == pytest.approx(lo, abs=2e-4)

    for eps in (0.3, lo - 1e-3, lo + 1e-3, 0.5, hi - 1e-3, hi + 1e-3, 0.9):
        flagged = 0 in analyse_layer(layer, spectrum_source(False), 3, eps).record.basis_sensitive
        assert flagged == (lo < eps <= hi), eps
        # ... and the status indeed differs between the two extreme bases when flagged
        assert flagged == ((max_cos_in(spread) < eps) != (max_cos_in(along) < eps)), eps


def test_interval_formula_by_sampling_rotations():
    """max over groups of rho_g / sqrt(d_g) and of rho_g bound max|coordinate| under every
    block rotation (sampled), and the bounds of a singleton-only basis are the coordinate."""
    g = torch.Generator().manual_seed(5)
    groups = torch.tensor([0, 1, 1, 1, 2, 2, 3])
    coords = torch.randn(7, 4, generator=g, dtype=torch.float64)
    coords = coords / coords.norm(dim=0)
    lo, hi = max_cos_interval(coords, groups)
    for _ in range(200):
        rotated = coords.clone()
        for members in ([1, 2, 3], [4, 5]):
            rotated[members] = rotation(len(members), g).T @ coords[members]
        got = rotated.abs().amax(dim=0)
        assert (lo - 1e-12 <= got).all() and (got <= hi + 1e-12).all()
    single = torch.arange(7)
    lo1, hi1 = max_cos_interval(coords, single)
    torch.testing.assert_close(lo1, coords.abs().amax(dim=0))
    torch.testing.assert_close(hi1, coords.abs().amax(dim=0))


def test_report_carries_the_calibration(llama_lora):
    with pytest.warns(CalibrationWarning, match=r"epsilon=0.5 is at or below .* 32x64"):
        report = intruder_ext.find_intruders(llama_lora, progress=False)
    entry = report["model.layers.0.mlp.up_proj"]  # 96 x 64
    assert (entry.null_max_cos, entry.null_max_cos_p99) == null_max_cos(96, 64)
    assert (entry.max_cos_lo <= entry.max_cos).all() and (entry.max_cos <= entry.max_cos_hi).all()
    torch.testing.assert_close(entry.alignment, alignment(entry.max_cos, entry.null_max_cos))
    d = json.loads(report.to_json())
    assert d["basis_rtol"] == 1e-4 and d["totals"]["modules_epsilon_below_null"] == 2
    m = d["modules"][0]
    assert m["null_max_cos"] < m["null_max_cos_p99"] and len(m["alignment"]) == 10
    assert "null med/p99" in str(report) and "min align" in str(report)
    # Above the null everywhere: no warning.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        intruder_ext.find_intruders(llama_lora, epsilon=0.7, progress=False)


def test_basis_rtol_is_checked(llama_lora):
    with pytest.raises(ValueError, match=r"find_intruders: basis_rtol must be a finite number "
                                         r">= 0 \(got -1\)"):
        intruder_ext.find_intruders(llama_lora, basis_rtol=-1, progress=False)
