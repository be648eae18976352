"""The real CUDA max_cosine kernel against the pure-torch reference (skipped without a GPU).

Without a GPU, tests/test_max_cosine_emulated.py runs the same kernel source on the CPU.
"""

import pytest
import torch
from reference import check_max_cosine, max_cosine_reference

import intruder_ext
from intruder_ext import max_cosine

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and intruder_ext.cuda_built()),
                                reason="needs a GPU and the CUDA kernels")

DEVICE = "cuda"
# Tolerance on the values per dtype: the output is rounded to the input dtype; float32 also
# differs from the float64 reference by its accumulation over d.
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check(Y, X, absolute=True, normalize=True):
    values, indices = max_cosine(Y, X, absolute=absolute, normalize=normalize)
    check_max_cosine(values, indices, Y, X, ATOL[Y.dtype], absolute, normalize)
    return values, indices


SHAPES = [  # (d, k, n): single elements, odd sizes, k > n, n > k (split across blocks), many tiles
    (1, 1, 1), (3, 5, 7), (33, 33, 65), (17, 1, 3000), (5, 90, 2), (64, 600, 33), (129, 513, 257),
    (256, 8, 20000), (0, 3, 4),
]


@pytest.mark.parametrize("d,k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_reference(d, k, n, dtype):
    gen = torch.Generator(DEVICE).manual_seed(d + 7 * k + 13 * n)
    check(torch.randn(d, k, dtype=dtype, device=DEVICE, generator=gen),
          torch.randn(d, n, dtype=dtype, device=DEVICE, generator=gen))


@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_options(absolute, normalize, dtype):
    Y = torch.randn(40, 12, dtype=dtype, device=DEVICE) * 3
    X = torch.randn(40, 3000, dtype=dtype, device=DEVICE)
    check(Y, X, absolute=absolute, normalize=normalize)


def test_matches_the_cpu_kernel():
    Y = torch.randn(3, 50, 70, dtype=torch.float64)
    X = torch.randn(50, 900, dtype=torch.float64)
    cpu = max_cosine(Y, X)
    gpu = max_cosine(Y.to(DEVICE), X.to(DEVICE))
    torch.testing.assert_close(gpu.values.cpu(), cpu.values, atol=1e-12, rtol=0)
    assert torch.equal(gpu.indices.cpu(), cpu.indices)


@pytest.mark.parametrize("y_batch,x_batch", [((2, 3), ()), ((), (4,)), ((2, 1), (1, 3)), ((0,), ())])
def test_batch_dims_broadcast(y_batch, x_batch):
    Y = torch.randn(*y_batch, 20, 6, dtype=torch.float64, device=DEVICE)
    X = torch.randn(*x_batch, 20, 270, dtype=torch.float64, device=DEVICE)
    values, _ = check(Y, X)
    assert values.shape == (*torch.broadcast_shapes(y_batch, x_batch), 6)


def test_batch_beyond_the_grid_limit():
    # 70000 batch entries > 65535 blocks on grid.z: the kernel loops over the batch.
    Y = torch.randn(70000, 4, 3, device=DEVICE)
    X = torch.randn(4, 5, device=DEVICE)
    check(Y, X)


def test_non_contiguous_inputs():
    Y = torch.randn(8, 50, 30, dtype=torch.float64, device=DEVICE).transpose(-2, -1)[::2, :, ::3]
    X = torch.randn(300, 30, dtype=torch.float64, device=DEVICE).t()[:, ::2]
    assert not Y.is_contiguous() and not X.is_contiguous()
    check(Y, X)


def test_zero_size_inputs():
    for Y, X, shape in [(torch.randn(5, 0), torch.randn(5, 3), (0,)),
                        (torch.randn(0, 5, 2), torch.randn(5, 3), (0, 2))]:
        values, indices = max_cosine(Y.to(DEVICE), X.to(DEVICE))
        assert values.shape == shape and indices.shape == shape
        assert values.device.type == "cuda" and indices.dtype == torch.int64


def test_ties_pick_the_lowest_index():
    X = torch.randn(9, 5000, dtype=torch.float64)
    X[:, 4000] = X[:, 1300]  # copies in other blocks of the split n
    X[:, 1301] = -X[:, 1300]
    Y = X[:, [4000, 1301]].clone()
    values, indices = max_cosine(Y.to(DEVICE), X.to(DEVICE))
    assert indices.tolist() == [1300, 1300]
    assert values.cpu().tolist() == pytest.approx([1.0, 1.0])


def test_zero_columns_and_nan():
    Y = torch.randn(8, 4, device=DEVICE)
    Y[:, 2] = 0
    X = torch.randn(8, 3000, device=DEVICE)
    X[:, :2000] = 0
    values, indices = max_cosine(Y, X)
    assert not values.isnan().any()
    assert values[2].item() == 0 and indices[2].item() == 0
    assert (indices[[0, 1, 3]] >= 2000).all()
    X[3, 2500] = float("nan")
    X[3, 2700] = float("nan")
    values, indices = max_cosine(Y, X)
    assert values.isnan().all() and indices.tolist() == [2500] * 4


def test_runs_on_the_current_stream():
    Y = torch.randn(64, 40, device=DEVICE)
    X = torch.randn(64, 5000, device=DEVICE)
    expected = max_cosine(Y, X)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = max_cosine(Y, X)
    stream.synchronize()
    assert torch.equal(got.values, expected.values) and torch.equal(got.indices, expected.indices)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_inputs_device():
    Y = torch.randn(16, 5, device="cuda:1")
    X = torch.randn(16, 300, device="cuda:1")
    values, _ = max_cosine(Y, X)
    assert values.device == Y.device
    torch.testing.assert_close(values.double().cpu(), max_cosine_reference(Y.cpu(), X.cpu())[0],
                               atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("y_device,x_device", [(DEVICE, "cpu"), ("cpu", DEVICE)])
def test_inputs_on_different_devices(y_device, x_device):
    Y = torch.randn(4, 2, device=y_device)
    X = torch.randn(4, 3, device=x_device)
    with pytest.raises(ValueError, match=r"max_cosine: Y and X must be on the same device "
                                         rf"\(got {Y.device} and {X.device}\)"):
        max_cosine(Y, X)


@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(absolute, dtype):
    Y = torch.randn(2, 16, 5, dtype=dtype, device=DEVICE)
    X = torch.randn(16, 300, dtype=dtype, device=DEVICE)
    torch.library.opcheck(torch.ops.intruder_ext.max_cosine, (Y, X), {"absolute": absolute, "normalize": True})
