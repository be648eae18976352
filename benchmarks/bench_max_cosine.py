"""max_cosine against the naive torch expression on CPU: time and peak extra memory.

    pytest benchmarks/bench_max_cosine.py --benchmark-json=benchmarks/max_cosine.json
    python benchmarks/summarize.py benchmarks/max_cosine.json
"""

import pytest
import torch
from memory import peak_extra_mib

import intruder_ext


def naive_max_cosine(Y, X):
    sims = torch.nn.functional.normalize(Y, dim=-2).transpose(-2, -1) @ torch.nn.functional.normalize(X, dim=-2)
    return sims.abs().max(dim=-1)


IMPLS = {"intruder_ext": intruder_ext.max_cosine, "naive_torch": naive_max_cosine}
CASES = [(d, k, 4096) for d in (1024, 2048, 4096) for k in (10, 256, 1024, 4096)]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("d,k,n", CASES, ids=[f"d{d}-k{k}-n{n}" for d, k, n in CASES])
def test_max_cosine(benchmark, impl, d, k, n):
    torch.manual_seed(0)
    Y, X = torch.randn(d, k), torch.randn(d, n)
    fn = IMPLS[impl]
    # Both implementations must agree before their speed means anything.
    ours, ref = intruder_ext.max_cosine(Y, X), naive_max_cosine(Y, X)
    torch.testing.assert_close(ours.values, ref.values, atol=1e-5, rtol=0)
    benchmark.group = f"max_cosine d={d} k={k} n={n}"
    benchmark.extra_info["peak_extra_MiB"] = peak_extra_mib(fn, Y, X)
    benchmark.extra_info["input_MiB"] = (Y.numel() + X.numel()) * 4 / 2**20
    benchmark.pedantic(fn, args=(Y, X), rounds=5 if d * k < 2**22 else 3, warmup_rounds=1)
