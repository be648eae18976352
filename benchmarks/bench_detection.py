"""Per-layer intruder detection: structured fast path against the two-SVD reference (CPU).

One LoRA layer W = W0 + s B A (rank 16, random non-zero B) at widths 1024, 2048 and 4096,
top k = 10, epsilon = 0.5, float32. For each width, side by side (one group per width):

- ``reference``: full SVDs of W0 and W, then max |U_k^T U0| (the paper's / PEFT's method);
- ``structured_uncached``: base_spectrum(W0) (one SVD) + lora_topk;
- ``structured_cached``: SpectrumCache.get(W0) from a warm on-disk cache (hash + load + verify)
  + lora_topk;
- ``structured_in_memory``: lora_topk with the base spectrum already in memory.

Every fast variant asserts the same intruder set as the reference. The 4096 reference SVDs take
about a minute each on 2 cores, so the slow variants run one round there.

Run: pytest benchmarks/bench_detection.py --benchmark-only \
         --benchmark-group-by=param --benchmark-columns=min,mean,max,rounds
"""

import pytest
import torch

from intruder_ext.cache import SpectrumCache
from intruder_ext.spectral import base_spectrum, lora_topk

K, EPSILON, RANK, ALPHA = 10, 0.5, 16, 32
WIDTHS = [1024, 2048, 4096]


def make_layer(width, seed=0):
    """W0 with random orthogonal factors and a decaying spectrum, and a rank-16 LoRA whose
    singular values span the top of W0's (so some of its directions intrude, some do not)."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(width, width, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(width, width, generator=gen))
    i = torch.arange(width, dtype=torch.float32)
    S0 = 1 + 9 * torch.exp(-i / 32)
    W0 = (U * S0) @ V.T
    B = torch.randn(width, RANK, generator=gen) / width ** 0.5
    A = torch.randn(RANK, width, generator=gen) / width ** 0.5 * torch.linspace(0.5, 5.0, RANK)[:, None]
    return W0, B, A, ALPHA / RANK


def reference_intruders(W0, W):
    U0 = torch.linalg.svd(W0, full_matrices=False)[0]
    U = torch.linalg.svd(W, full_matrices=False)[0]
    max_cos = (U[:, :K].mT @ U0).abs().max(dim=1).values
    return set(torch.nonzero(max_cos < EPSILON).flatten().tolist())


def fast_intruders(topk):
    return set(topk.intruders(EPSILON).tolist())


def rounds_for(width):
    return 1 if width >= 4096 else 3


@pytest.fixture(scope="module", params=WIDTHS, ids=lambda w: f"width={w}")
def layer(request, tmp_path_factory):
    width = request.param
    W0, B, A, scale = make_layer(width)
    cache = SpectrumCache(tmp_path_factory.mktemp(f"spectra{width}"))
    cache.get(W0)  # warm the cache: the cached variant times a disk hit
    return {"width": width, "W0": W0, "B": B, "A": A, "scale": scale, "cache": cache,
            "W": W0 + scale * (B @ A), "expected": None}


def expected(layer):
    if layer["expected"] is None:  # only when the reference benchmark did not run first
        layer["expected"] = reference_intruders(layer["W0"], layer["W"])
    return layer["expected"]


@pytest.fixture
def width(layer):
    return layer["width"]


def test_reference(benchmark, layer, width):
    result = benchmark.pedantic(reference_intruders, args=(layer["W0"], layer["W"]),
                                rounds=rounds_for(width), iterations=1)
    layer["expected"] = result
    benchmark.extra_info["intruders"] = sorted(result)


def test_structured_uncached(benchmark, layer, width):
    def run():
        return lora_topk(base_spectrum(layer["W0"]), layer["B"], layer["A"], layer["scale"], K,
                         on_failure="raise")
    topk = benchmark.pedantic(run, rounds=rounds_for(width), iterations=1)
    assert fast_intruders(topk) == expected(layer)


def test_structured_cached(benchmark, layer, width):
    cache = layer["cache"]

    def run():
        return lora_topk(cache.get(layer["W0"]), layer["B"], layer["A"], layer["scale"], K,
                         on_failure="raise")
    hits = cache.stats.hits
    topk = benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    assert cache.stats.hits == hits + 11 and cache.stats.misses == 1
    assert fast_intruders(topk) == expected(layer)
    benchmark.extra_info["intruders"] = sorted(fast_intruders(topk))


def test_structured_in_memory(benchmark, layer, width):
    base = layer["cache"].get(layer["W0"])

    def run():
        return lora_topk(base, layer["B"], layer["A"], layer["scale"], K, on_failure="raise")
    topk = benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    assert fast_intruders(topk) == expected(layer)
    benchmark.extra_info["iterations"] = topk.iterations
