"""intruder_ext.batched_svd against torch.linalg.svd(A, full_matrices=False), on CPU and CUDA."""

import pytest
import torch

import intruder_ext

HAS_GPU = torch.cuda.is_available() and intruder_ext.cuda_built()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="needs a GPU "
                                                                "and the CUDA build"))]
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a GPU and the CUDA build")
# (atol scale) per dtype, relative to the largest singular value.
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def check_svd(A, U, S, Vh):
    """Thin shapes, descending S, orthonormal columns, reconstruction and S against torch."""
    *batch, m, n = A.shape
    p = min(m, n)
    assert U.shape == (*batch, m, p) and S.shape == (*batch, p) and Vh.shape == (*batch, p, n)
    assert U.dtype == S.dtype == Vh.dtype == A.dtype
    assert U.device == S.device == Vh.device == A.device
    if A.numel() == 0:
        return
    scale = A.abs().amax().item() * max(m, n)
    tol = TOL[A.dtype] * max(scale, 1.0)
    assert (S[..., :-1] >= S[..., 1:]).all(), "singular values must be descending"
    assert (S >= 0).all()
    S_ref = torch.linalg.svdvals(A.cpu().double())
    torch.testing.assert_close(S.cpu().double(), S_ref, atol=tol, rtol=0)
    eye = torch.eye(p, dtype=A.dtype, device=A.device)
    # Orthonormality holds for every column, including those of zero singular values.
    torch.testing.assert_close(U.mT @ U, eye.expand(*batch, p, p), atol=TOL[A.dtype] * 50, rtol=0)
    torch.testing.assert_close(Vh @ Vh.mT, eye.expand(*batch, p, p), atol=TOL[A.dtype] * 50, rtol=0)
    torch.testing.assert_close(U @ (S.unsqueeze(-1) * Vh), A, atol=tol, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [
    (5, 5), (7, 3), (3, 7),              # single square, tall, wide
    (6, 32, 32), (4, 32, 9), (4, 9, 32),  # the one-call batched path at its size limit
    (2, 3, 12, 5), (2, 3, 5, 12),         # multi-dim batch
    (2, 40, 33), (2, 33, 40), (3, 64, 64),  # past the batched limit: one call per matrix
    (1, 1), (3, 1, 8), (3, 8, 1),         # degenerate vectors
])
def test_matches_torch(device, dtype, shape):
    torch.manual_seed(0)
    A = torch.randn(shape, dtype=dtype, device=device)
    A_before = A.clone()
    U, S, Vh = intruder_ext.batched_svd(A)
    check_svd(A, U, S, Vh)
    torch.testing.assert_close(A, A_before, atol=0, rtol=0)  # the input is left untouched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
@pytest.mark.parametrize("m,n", [(12, 7), (7, 12), (40, 36)])
def test_non_contiguous_input(device, layout, m, n):
    torch.manual_seed(5)
    if layout == "transposed":
        A = torch.randn(3, n, m, device=device).mT
    elif layout == "strided":
        A = torch.randn(6, m, 2 * n, device=device)[::2, :, ::2]
    else:  # stride 0 over the batch: every matrix is the same memory
        A = torch.randn(1, m, n, device=device).expand(4, m, n)
    A_before = A.clone()
    U, S, Vh = intruder_ext.batched_svd(A)
    check_svd(A, U, S, Vh)
    torch.testing.assert_close(A, A_before, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,rank", [(16, 16, 3), (24, 10, 2), (10, 24, 1), (48, 40, 5)])
def test_rank_deficient(device, dtype, m, n, rank):
    torch.manual_seed(1)
    B = torch.randn(4, m, rank, dtype=dtype, device=device)
    C = torch.randn(4, rank, n, dtype=dtype, device=device)
    A = B @ C
    U, S, Vh = intruder_ext.batched_svd(A)
    check_svd(A, U, S, Vh)
    assert (S[..., rank:] <= TOL[dtype] * 100 * S[..., :1]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wide", [False, True])
def test_singular_vectors_match_torch_up_to_sign(device, wide):
    # Well separated singular values make each singular vector unique up to its sign.
    torch.manual_seed(2)
    Q1, _ = torch.linalg.qr(torch.randn(3, 20, 6, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(3, 6, 6, dtype=torch.float64))
    S_true = torch.tensor([9.0, 7.0, 5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    A = Q1 * S_true @ Q2.mT
    A = (A.mT if wide else A).to(device)
    U, S, Vh = intruder_ext.batched_svd(A)
    torch.testing.assert_close(S.cpu(), S_true.expand(3, 6), atol=1e-12, rtol=0)
    U_ref, _, Vh_ref = torch.linalg.svd(A.cpu(), full_matrices=False)
    ones = torch.ones(3, 6, dtype=torch.float64)
    torch.testing.assert_close((U.cpu() * U_ref).sum(-2).abs(), ones)
    torch.testing.assert_close((Vh.cpu() * Vh_ref).sum(-1).abs(), ones)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4, 3), (2, 0, 5), (2, 5, 0), (0, 0), (3, 0, 40, 40)])
def test_zero_size(device, shape):
    A = torch.empty(shape, device=device)
    U, S, Vh = intruder_ext.batched_svd(A)
    check_svd(A, U, S, Vh)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_matrix(device):
    A = torch.zeros(5, 6, 4, device=device)
    U, S, Vh = intruder_ext.batched_svd(A)
    check_svd(A, U, S, Vh)
    assert (S == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    with pytest.raises(ValueError, match=r"batched_svd: A must have at least 2 dims \(\.\.\., m, n\) "
                                         r"\(got shape \[5\]\)"):
        intruder_ext.batched_svd(torch.randn(5, device=device))
    with pytest.raises(TypeError, match=r"batched_svd: A must be float32 or float64 \(got Half\)"):
        intruder_ext.batched_svd(torch.randn(3, 3, device=device).half())
    with pytest.raises(TypeError, match=r"batched_svd: A must be float32 or float64 \(got Long\)"):
        intruder_ext.batched_svd(torch.ones(3, 3, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match=r"batched_svd: A must be a torch.Tensor \(got list\)"):
        intruder_ext.batched_svd([[1.0, 2.0], [3.0, 4.0]])


def test_meta_shapes():
    U, S, Vh = intruder_ext.batched_svd(torch.empty(2, 3, 7, 4, device="meta"))
    assert U.shape == (2, 3, 7, 4) and S.shape == (2, 3, 4) and Vh.shape == (2, 3, 4, 4)


@needs_gpu
@pytest.mark.parametrize("shape", [(64, 20, 20), (8, 32, 12), (8, 12, 32), (3, 48, 40)])
def test_cuda_unconverged_matrices_are_recomputed(monkeypatch, shape):
    # One Jacobi sweep leaves random matrices unconverged: every one must come from the fallback.
    monkeypatch.setenv("INTRUDER_EXT_GESVDJ_MAX_SWEEPS", "1")
    torch.manual_seed(3)
    A = torch.randn(shape, device="cuda")
    with pytest.warns(UserWarning, match=r"batched_svd: Jacobi SVD \(gesvdj\) did not converge within "
                                         r"1 sweeps for \d+ of \d+ matrices; recomputed them with gesvd"):
        U, S, Vh = intruder_ext.batched_svd(A)
    check_svd(A, U, S, Vh)


@needs_gpu
def test_cuda_bad_max_sweeps(monkeypatch):
    monkeypatch.setenv("INTRUDER_EXT_GESVDJ_MAX_SWEEPS", "zero")
    with pytest.raises(ValueError, match=r"batched_svd: INTRUDER_EXT_GESVDJ_MAX_SWEEPS must be a "
                                         r"positive integer \(got 'zero'\)"):
        intruder_ext.batched_svd(torch.randn(4, 4, device="cuda"))


@needs_gpu
def test_cuda_runs_on_the_current_stream():
    torch.manual_seed(4)
    A = torch.randn(16, 24, 24, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        U, S, Vh = intruder_ext.batched_svd(A)
    torch.cuda.current_stream().wait_stream(stream)
    check_svd(A, U, S, Vh)
