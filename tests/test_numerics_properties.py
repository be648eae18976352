"""Property-based tests of the certified top-k (issue 10, item 1): over shapes, ranks, scales and
spectra (steep, flat, clustered, rank-deficient), float32 and bfloat16 weights, every answer of
the structured path (lora_topk) and the general path (weight_topk) is checked against the
float64 dense top-k of the same W taken in the package's own base basis:

- honest: the true errors never exceed what the certificate claims (sigma within its residual,
  the vector within its angle bound, max_cos within its bound);
- accurate: for sigma_1/sigma_k <= 1e4 the answer converged and is correct to 1e-5 (relative)
  in sigma and to max(1e-4, its own bound) in max_cos;
- not vacuous: a vector whose gap to the rest of the spectrum is at least 1% of its mu gets a
  certified max_cos error <= 1e-4.

Deterministic (derandomized hypothesis, fixed torch seeds) and sized for CI: 100 examples per
property, about 11 s on a quiet 2-core machine (several times that while other jobs
share the cores).
"""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import check_certified_topk

from intruder_ext.spectral import base_spectrum, lora_topk, weight_topk

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow])

shapes = st.tuples(st.sampled_from(["square", "wide", "tall"]), st.integers(8, 400),
                   st.floats(1.05, 2.5)).map(
    lambda t: {"square": (t[1], t[1]), "wide": (t[1], min(400, int(t[1] * t[2]))),
               "tall": (min(400, int(t[1] * t[2])), t[1])}[t[0]])
spectra = st.sampled_from(["steep", "flat", "clustered", "rank_deficient"])
dtypes = st.sampled_from([torch.float32, torch.bfloat16])


def base_values(kind: str, p: int, steepness: float, gen) -> torch.Tensor:
    """Singular values of W0 (float64, descending)."""
    i = torch.arange(p, dtype=torch.float64)
    if kind == "steep":  # geometric over the first dozen values, then a low tail
        top = min(p, 12)
        S = torch.full((p,), 10 ** -steepness, dtype=torch.float64) * (1 - 0.5 * i / p)
        S[:top] = torch.logspace(0, -steepness, top, dtype=torch.float64)
        return S
    if kind == "flat":
        return 1 - 0.5 * i / p
    if kind == "clustered":  # groups of 1 to 4 equal values
        sizes = torch.randint(1, 5, (p,), generator=gen)
        group = torch.repeat_interleave(torch.arange(p), sizes)[:p].double()
        return 1 / (1 + 0.1 * group)
    S = 1 - 0.5 * i / p  # rank_deficient: half of the values are exactly zero
    S[(p + 1) // 2:] = 0
    return S


def orthonormal(rows, cols, gen):
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))[0]


def make_base(shape, kind, steepness, dtype, seed):
    m, n = shape
    p = min(m, n)
    gen = torch.Generator().manual_seed(seed)
    S = base_values(kind, p, steepness, gen)
    W0 = ((orthonormal(m, p, gen) * S) @ orthonormal(n, p, gen).T).to(dtype)
    return W0, gen


def quietly(fn, *args, **kwargs):
    """Calls fn with the dense fallback's RuntimeWarning silenced (it is part of the answer)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


@SETTINGS
@given(shape=shapes, kind=spectra, steepness=st.floats(0.0, 4.0), dtype=dtypes,
       r=st.integers(1, 8), log_scale=st.floats(-3.0, 4.0), k=st.integers(1, 10),
       seed=st.integers(0, 2 ** 16))
def test_lora_topk_is_certified(shape, kind, steepness, dtype, r, log_scale, k, seed):
    W0, gen = make_base(shape, kind, steepness, dtype, seed)
    m, n = shape
    k = min(k, m, n)
    B = (torch.randn(m, r, generator=gen, dtype=torch.float64) / m ** 0.5).to(dtype)
    A = (torch.randn(r, n, generator=gen, dtype=torch.float64) / n ** 0.5).to(dtype)
    s = 10.0 ** log_scale
    base = base_spectrum(W0)
    top = quietly(lora_topk, base, B, A, s, k)
    assert top.method in ("structured", "dense")
    W = W0.double() + s * (B.double() @ A.double())
    check_certified_topk(top, W, base.U, k)


@SETTINGS
@given(shape=shapes, kind=spectra, steepness=st.floats(0.0, 4.0), dtype=dtypes,
       update=st.sampled_from(["dense", "spikes"]), log_scale=st.floats(-3.0, 3.0),
       k=st.integers(1, 10), seed=st.integers(0, 2 ** 16))
def test_weight_topk_is_certified(shape, kind, steepness, dtype, update, log_scale, k, seed):
    """The general path: W any matrix (a full fine-tuning), stored in float32 or bfloat16."""
    W0, gen = make_base(shape, kind, steepness, dtype, seed)
    m, n = shape
    k = min(k, m, n)
    s = 10.0 ** log_scale
    if update == "dense":
        dW = torch.randn(m, n, generator=gen, dtype=torch.float64) / (m * n) ** 0.25
    else:
        dW = torch.randn(m, 2, generator=gen, dtype=torch.float64) \
            @ torch.randn(2, n, generator=gen, dtype=torch.float64) / (m * n) ** 0.5
    W = (W0.double() + s * dW).to(dtype)
    base = base_spectrum(W0)
    top = quietly(weight_topk, W, base, k)
    assert top.method in ("subspace", "dense")
    check_certified_topk(top, W.double(), base.U, k)


@pytest.mark.parametrize("ratio", [30, 100, 300, 1000, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steep_top_with_an_exact_cluster(ratio, dtype):
    """A strong rank-2 update (sigma_1/sigma_10 = ratio) over a base with 4 equal values in the
    top 10, left alone by the update: W0 is a signed permutation of a diagonal (exact in any
    dtype), so the cluster is exact in W too. Its vectors are not individually determined (the
    certificate says so: angle bound 1), the top-k subspace is and matches the reference."""
    p = 300
    gen = torch.Generator().manual_seed(int(ratio))
    S = (1 - 0.5 * torch.arange(p, dtype=torch.float64) / p).to(dtype).double()
    S[2:6] = S[2]
    rows, cols = torch.randperm(p, generator=gen), torch.randperm(p, generator=gen)
    W0 = torch.zeros(p, p, dtype=torch.float64)
    W0[rows, cols] = S * torch.sign(torch.randn(p, generator=gen, dtype=torch.float64))
    B = torch.randn(p, 2, generator=gen, dtype=torch.float64) / p ** 0.5
    A = ratio * torch.randn(2, p, generator=gen, dtype=torch.float64) / p ** 0.5
    B[rows[2:6]], A[:, cols[2:6]] = 0, 0
    W0, B, A = W0.to(dtype), B.to(dtype), A.to(dtype)
    base = base_spectrum(W0)
    top = lora_topk(base, B, A, 1.0, 10, on_failure="raise")
    ref = check_certified_topk(top, W0.double() + B.double() @ A.double(), base.U, 10)
    in_cluster = ref["rel_gap"] < 1e-12
    assert int(in_cluster.sum()) == 4 and bool((top.angle_bound[in_cluster] == 1).all())
    assert float(ref["sigma"][0] / ref["sigma"][-1]) > ratio / 3
    overlap = torch.linalg.svdvals(ref["U"].T @ top.U.double())
    assert float(overlap.min()) > 1 - 1e-6
