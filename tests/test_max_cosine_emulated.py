"""The CUDA max_cosine kernel's own source, run on the CPU through a CUDA emulation.

tests/cuda_emulation/max_cosine_emu.cpp includes csrc/cuda/max_cosine_kernel.cuh after
tests/cuda_emulation/cuda_emu.h (blocks run one at a time in a shuffled order, each block's
threads as std::threads, __syncthreads as a barrier); it is compiled here with the host C++
compiler and called through ctypes. This checks the tiling, the epilogue and the cross-block
combine on a machine without a GPU; tests/test_max_cosine_cuda.py runs the real thing on one.
"""

import ctypes
import hashlib
import os
import pathlib
import subprocess
import tempfile

import pytest
import torch
from reference import check_max_cosine

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "tests/cuda_emulation/cuda_emu.h", ROOT / "tests/cuda_emulation/max_cosine_emu.cpp",
           ROOT / "csrc/cuda/max_cosine_kernel.cuh"]
NO_LIMIT = 65535  # the real grid.z limit
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# The harness's entry point per dtype (float16/bfloat16 accumulate in float32, as on the GPU).
ENTRY_POINTS = {torch.float32: "max_cosine_emu_float", torch.float64: "max_cosine_emu_double",
                torch.float16: "max_cosine_emu_half", torch.bfloat16: "max_cosine_emu_bfloat16"}


@pytest.fixture(scope="module")
def emu():
    """The harness as a shared library, cached by the hash of its sources."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    out = pathlib.Path(tempfile.gettempdir()) / "intruder_ext_cuda_emu" / digest / "max_cosine_emu.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-O2", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
               "-fPIC", "-shared", "-pthread", str(SOURCES[1]), "-o", str(tmp)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr}"
        os.replace(tmp, out)  # atomic: concurrent test runs never load a half-written file
    lib = ctypes.CDLL(str(out))
    for name in ENTRY_POINTS.values():
        getattr(lib, name).restype = ctypes.c_int64
    return lib


def emulate(emu, Y, X, absolute=True, normalize=True, target_blocks=1, max_batch_blocks=NO_LIMIT, seed=0):
    """Runs the kernel as the CUDA launcher would; returns (values, indices, n-splits used)."""
    batch_shape = torch.broadcast_shapes(Y.shape[:-2], X.shape[:-2])
    (d, k), n = Y.shape[-2:], X.shape[-1]
    # expand + reshape keep stride-0 batch dims, like prepare_max_cosine.
    batch = batch_shape.numel()
    Y3 = Y.expand(*batch_shape, d, k).reshape(batch, d, k)
    X3 = X.expand(*batch_shape, d, n).reshape(batch, d, n)
    values = torch.empty(batch, k, dtype=Y.dtype)
    indices = torch.empty(batch, k, dtype=torch.int64)
    fn = getattr(emu, ENTRY_POINTS[Y.dtype])
    i64 = ctypes.c_int64 * 4
    ptr = ctypes.c_void_p
    splits = fn(ptr(Y3.data_ptr()), ptr(X3.data_ptr()), i64(batch, d, k, n),
                i64(*Y3.stride()), i64(*X3.stride()), int(absolute), int(normalize),
                ctypes.c_int64(target_blocks), ctypes.c_int64(max_batch_blocks), ctypes.c_uint(seed),
                ptr(values.data_ptr()), ptr(indices.data_ptr()))
    return values.reshape(*batch_shape, k), indices.reshape(*batch_shape, k), splits


def check(emu, Y, X, absolute=True, normalize=True, **launch):
    values, indices, splits = emulate(emu, Y, X, absolute, normalize, **launch)
    check_max_cosine(values, indices, Y, X, ATOL[Y.dtype], absolute, normalize)
    return values, indices, splits


@pytest.mark.parametrize("d,k,n", [
    (1, 1, 1), (3, 3, 5), (33, 33, 65), (20, 70, 9), (17, 5, 300), (0, 2, 3),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("target_blocks", [1, 64])
def test_matches_reference(emu, d, k, n, dtype, target_blocks):
    gen = torch.Generator().manual_seed(d * 1000 + k * 10 + n)
    Y = torch.randn(d, k, generator=gen, dtype=dtype)
    X = torch.randn(d, n, generator=gen, dtype=dtype)
    _, _, splits = check(emu, Y, X, target_blocks=target_blocks)
    if target_blocks == 64:
        assert splits == (n + 63) // 64  # one n-tile per block: the cross-block combine runs


@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_options(emu, absolute, normalize):
    gen = torch.Generator().manual_seed(1)
    Y = torch.randn(19, 7, generator=gen, dtype=torch.float64) * 3
    X = torch.randn(19, 260, generator=gen, dtype=torch.float64)
    _, _, splits = check(emu, Y, X, absolute, normalize, target_blocks=3)
    assert splits == 3


def test_signed_picks_the_largest_negative_free_value(emu):
    # All cosines negative: padding columns of the last tile must not win with a 0.
    Y = torch.ones(2, 1)
    X = -torch.rand(2, 70, generator=torch.Generator().manual_seed(2)) - 0.1
    check(emu, Y, X, absolute=False, target_blocks=2)


def test_batch_broadcast_and_batch_loop(emu):
    gen = torch.Generator().manual_seed(3)
    Y = torch.randn(5, 1, 12, 6, generator=gen, dtype=torch.float64)  # broadcast over dim 1
    X = torch.randn(3, 12, 130, generator=gen, dtype=torch.float64)   # broadcast over dim 0
    # grid.z capped at 2 so each block loops over several batch entries, with and without split n.
    for target_blocks in (1, 8):
        values, _, _ = check(emu, Y, X, target_blocks=target_blocks, max_batch_blocks=2)
        assert values.shape == (5, 3, 6)


def test_non_contiguous_inputs(emu):
    gen = torch.Generator().manual_seed(4)
    Y = torch.randn(40, 11, generator=gen, dtype=torch.float64).t()[:, ::2]         # (11, 20), row-major
    X = torch.randn(3, 11, 400, generator=gen, dtype=torch.float64)[1, :, 1::3]     # (11, 133)
    assert not Y.is_contiguous() and not X.is_contiguous() and Y.stride(1) != 1
    check(emu, Y, X, target_blocks=4)


def test_ties_pick_the_lowest_index_across_blocks(emu):
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(9, 300, generator=gen, dtype=torch.float64)
    # Exact copies (and negated copies, equal under abs) of columns in other tiles and splits.
    X[:, 200] = X[:, 130]
    X[:, 131] = -X[:, 130]
    X[:, 250] = X[:, 20]
    X[:, 70] = X[:, 20]
    Y = torch.stack([X[:, 200], X[:, 250], torch.ones(9, dtype=torch.float64)], dim=1)
    values, indices, splits = emulate(emu, Y, X, target_blocks=5)
    assert splits == 5
    assert indices[:2].tolist() == [130, 20]
    assert torch.allclose(values[:2], torch.ones(2, dtype=torch.float64))
    signed = emulate(emu, Y[:, :1], -X, absolute=False, target_blocks=5)[1]
    assert signed.tolist() == [131]


def test_zero_columns_have_cosine_zero(emu):
    gen = torch.Generator().manual_seed(6)
    Y = torch.randn(8, 4, generator=gen)
    Y[:, 2] = 0
    X = torch.randn(8, 150, generator=gen)
    X[:, :90] = 0  # the first split sees zero columns only
    values, indices, _ = emulate(emu, Y, X, target_blocks=3)
    assert not values.isnan().any()
    assert values[2].item() == 0 and indices[2].item() == 0
    assert (indices[[0, 1, 3]] >= 90).all()
    check(emu, Y, X, target_blocks=3)
    values, indices, _ = emulate(emu, Y, torch.zeros(8, 100), target_blocks=2)
    assert values.tolist() == [0.0] * 4 and indices.tolist() == [0] * 4


def test_nan_propagates_first_nan_wins(emu):
    gen = torch.Generator().manual_seed(7)
    Y = torch.randn(6, 3, generator=gen)
    X = torch.randn(6, 200, generator=gen)
    X[2, 150] = float("nan")
    X[4, 170] = float("nan")
    Y[1, 2] = float("nan")
    for absolute in (True, False):
        values, indices, _ = emulate(emu, Y, X, absolute=absolute, target_blocks=4)
        assert values.isnan().all()
        assert indices.tolist() == [150, 150, 0]


def test_result_does_not_depend_on_block_order(emu):
    gen = torch.Generator().manual_seed(8)
    Y = torch.randn(2, 16, 40, generator=gen)
    X = torch.randn(16, 330, generator=gen)
    first = emulate(emu, Y, X, target_blocks=12, seed=0)
    for seed in (1, 2):
        again = emulate(emu, Y, X, target_blocks=12, seed=seed)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
