"""intruder_ext.batched_svd against torch.linalg.svd on CUDA, side by side (GPU only).

Run: pytest benchmarks/bench_batched_svd.py --benchmark-group-by=param:shape
"""

import pytest
import torch

import intruder_ext

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and intruder_ext.cuda_built()),
                                reason="needs a GPU and the CUDA build")

SHAPES = [(4096, 16, 16), (4096, 32, 32), (512, 32, 8), (64, 64, 64), (8, 256, 256), (1, 1024, 1024)]
IMPLS = {
    "intruder_ext": intruder_ext.batched_svd,
    "torch": lambda A: torch.linalg.svd(A, full_matrices=False),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batched_svd(benchmark, shape, impl):
    torch.manual_seed(0)
    A = torch.randn(shape, device="cuda")
    fn = IMPLS[impl]

    def run():
        out = fn(A)
        torch.cuda.synchronize()
        return out

    run()  # warm-up: handles, workspaces, caching allocator
    U, S, Vh = benchmark(run)
    torch.testing.assert_close(U @ (S.unsqueeze(-1) * Vh), A, atol=1e-3, rtol=0)
