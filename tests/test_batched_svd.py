"""intruder_ext.batched_svd against torch.linalg.svd(A, full_matrices=False): on CPU, on CUDA, and
the CUDA implementation's host code on an emulated cuSOLVER.

The "emulated" backend builds csrc/cuda/batched_svd_gesvdj.h (the CUDA op minus its CUDA context)
against tests/cuda_emulation/include/cusolverDn.h, a CPU emulation of the cuSOLVER routines it
calls (a real one-sided Jacobi SVD behind the same signatures and storage conventions), so the
layout handling, the batched/per-matrix split and the fallback for unconverged matrices run
without a GPU.
"""

import hashlib
import pathlib
import tempfile

import pytest
import torch

import intruder_ext
from intruder_ext.ops import checked_batched_svd

ROOT = pathlib.Path(__file__).resolve().parent.parent
EMULATION_SOURCES = [ROOT / "tests/cuda_emulation/batched_svd_emu.cpp",
                     ROOT / "tests/cuda_emulation/include/cusolverDn.h",
                     ROOT / "csrc/cuda/batched_svd_gesvdj.h", ROOT / "csrc/cuda/cusolver_utils.h",
                     ROOT / "csrc/batched_svd_common.h"]
HAS_GPU = torch.cuda.is_available() and intruder_ext.cuda_built()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a GPU and the CUDA build")
BACKENDS = ["cpu", pytest.param("cuda", marks=needs_gpu), "emulated"]
GESVDJ_BACKENDS = [pytest.param("cuda", marks=needs_gpu), "emulated"]
# (atol scale) per dtype, relative to the largest singular value.
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.fixture(scope="session")
def emulated_batched_svd():
    """torch.ops.intruder_ext_emulation.batched_svd, built once per version of its sources."""
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256(torch.__version__.encode()
                            + b"".join(p.read_bytes() for p in EMULATION_SOURCES)).hexdigest()[:16]
    build = pathlib.Path(tempfile.gettempdir()) / "intruder_ext_cuda_emu" / f"batched_svd_{digest}"
    build.mkdir(parents=True, exist_ok=True)
    load(name="intruder_ext_batched_svd_emu", sources=[str(EMULATION_SOURCES[0])],
         extra_include_paths=[str(ROOT / "tests/cuda_emulation/include")],
         extra_cflags=["-O2", "-Wall", "-Wextra"], build_directory=str(build),
         is_python_module=False)
    return torch.ops.intruder_ext_emulation.batched_svd


@pytest.fixture
def backend(request):
    """(device, the batched_svd to test, its raw op) for the backend named by the parameter;
    the emulated op goes through the same Python wrapper as the package's."""
    name = request.param
    if name == "emulated":
        op = request.getfixturevalue("emulated_batched_svd")
        return "cpu", lambda A, max_sweeps=None: checked_batched_svd(op, A, max_sweeps), op
    return name, intruder_ext.batched_svd, torch.ops.intruder_ext.batched_svd


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


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [
    (5, 5), (7, 3), (3, 7),              # single square, tall, wide
    (6, 32, 32), (4, 32, 9), (4, 9, 32),  # the one-call batched path at its size limit
    (2, 3, 12, 5), (2, 3, 5, 12),         # multi-dim batch
    (2, 40, 33), (2, 33, 40), (3, 64, 64),  # past the batched limit: one call per matrix
    (1, 1), (3, 1, 8), (3, 8, 1),         # degenerate vectors
])
def test_matches_torch(backend, dtype, shape):
    device, svd, _ = backend
    torch.manual_seed(0)
    A = torch.randn(shape, dtype=dtype, device=device)
    A_before = A.clone()
    U, S, Vh = svd(A)
    check_svd(A, U, S, Vh)
    torch.testing.assert_close(A, A_before, atol=0, rtol=0)  # the input is left untouched


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
@pytest.mark.parametrize("m,n", [(12, 7), (7, 12), (40, 36)])
def test_non_contiguous_input(backend, layout, m, n):
    device, svd, _ = backend
    torch.manual_seed(5)
    if layout == "transposed":
        A = torch.randn(3, n, m, device=device).mT
    elif layout == "strided":
        A = torch.randn(6, m, 2 * n, device=device)[::2, :, ::2]
    else:  # stride 0 over the batch: every matrix is the same memory
        A = torch.randn(1, m, n, device=device).expand(4, m, n)
    A_before = A.clone()
    U, S, Vh = svd(A)
    check_svd(A, U, S, Vh)
    torch.testing.assert_close(A, A_before, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,rank", [(16, 16, 3), (24, 10, 2), (10, 24, 1), (48, 40, 5)])
def test_rank_deficient(backend, dtype, m, n, rank):
    device, svd, _ = backend
    torch.manual_seed(1)
    B = torch.randn(4, m, rank, dtype=dtype, device=device)
    C = torch.randn(4, rank, n, dtype=dtype, device=device)
    A = B @ C
    U, S, Vh = svd(A)
    check_svd(A, U, S, Vh)
    assert (S[..., rank:] <= TOL[dtype] * 100 * S[..., :1]).all()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("wide", [False, True])
def test_singular_vectors_match_torch_up_to_sign(backend, wide):
    device, svd, _ = backend
    # Well separated singular values make each singular vector unique up to its sign.
    torch.manual_seed(2)
    Q1, _ = torch.linalg.qr(torch.randn(3, 20, 6, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(3, 6, 6, dtype=torch.float64))
    S_true = torch.tensor([9.0, 7.0, 5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    A = Q1 * S_true @ Q2.mT
    A = (A.mT if wide else A).to(device)
    U, S, Vh = svd(A)
    torch.testing.assert_close(S.cpu(), S_true.expand(3, 6), atol=1e-12, rtol=0)
    U_ref, _, Vh_ref = torch.linalg.svd(A.cpu(), full_matrices=False)
    ones = torch.ones(3, 6, dtype=torch.float64)
    torch.testing.assert_close((U.cpu() * U_ref).sum(-2).abs(), ones)
    torch.testing.assert_close((Vh.cpu() * Vh_ref).sum(-1).abs(), ones)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("shape", [(0, 4, 3), (2, 0, 5), (2, 5, 0), (0, 0), (3, 0, 40, 40)])
def test_zero_size(backend, shape):
    device, svd, _ = backend
    A = torch.empty(shape, device=device)
    U, S, Vh = svd(A)
    check_svd(A, U, S, Vh)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_zero_matrix(backend):
    device, svd, _ = backend
    A = torch.zeros(5, 6, 4, device=device)
    U, S, Vh = svd(A)
    check_svd(A, U, S, Vh)
    assert (S == 0).all()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bad_input(backend):
    device, svd, _ = backend
    with pytest.raises(ValueError, match=r"batched_svd: A must have at least 2 dims \(\.\.\., m, n\) "
                                         r"\(got shape \[5\]\)"):
        svd(torch.randn(5, device=device))
    with pytest.raises(TypeError, match=r"batched_svd: A must be float32 or float64 \(got Half\)"):
        svd(torch.randn(3, 3, device=device).half())
    with pytest.raises(TypeError, match=r"batched_svd: A must be float32 or float64 \(got Long\)"):
        svd(torch.ones(3, 3, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match=r"batched_svd: A must be a torch.Tensor \(got list\)"):
        intruder_ext.batched_svd([[1.0, 2.0], [3.0, 4.0]])


def test_meta_shapes():
    U, S, Vh = intruder_ext.batched_svd(torch.empty(2, 3, 7, 4, device="meta"))
    assert U.shape == (2, 3, 7, 4) and S.shape == (2, 3, 4) and Vh.shape == (2, 3, 4, 4)


@pytest.mark.parametrize("backend", GESVDJ_BACKENDS, indirect=True)
@pytest.mark.parametrize("shape", [(64, 20, 20), (8, 32, 12), (8, 12, 32), (3, 48, 40), (2, 40, 48)])
def test_unconverged_matrices_are_recomputed(backend, monkeypatch, shape):
    device, svd, _ = backend
    # One Jacobi sweep leaves random matrices unconverged: every one must come from the fallback.
    monkeypatch.setenv("INTRUDER_EXT_GESVDJ_MAX_SWEEPS", "1")
    torch.manual_seed(3)
    A = torch.randn(shape, device=device)
    batch = shape[0]
    with pytest.warns(RuntimeWarning, match=rf"batched_svd: Jacobi SVD \(gesvdj\) did not converge within "
                                         rf"1 sweeps for {batch} of {batch} matrices; recomputed them "
                                         rf"with gesvd"):
        U, S, Vh = svd(A)
    check_svd(A, U, S, Vh)


@pytest.mark.parametrize("backend", GESVDJ_BACKENDS, indirect=True)
def test_converged_matrices_keep_the_jacobi_result(backend, monkeypatch, recwarn):
    device, svd, _ = backend
    # A matrix with orthogonal columns needs no rotation: converged after one sweep, no fallback.
    monkeypatch.setenv("INTRUDER_EXT_GESVDJ_MAX_SWEEPS", "1")
    A = torch.diag(torch.tensor([1.0, 4.0, 2.0, 3.0], device=device)).expand(3, 4, 4)
    U, S, Vh = svd(A)
    check_svd(A, U, S, Vh)
    assert torch.equal(S.cpu(), torch.tensor([4.0, 3.0, 2.0, 1.0]).expand(3, 4))
    assert not [w for w in recwarn if "did not converge" in str(w.message)]


@pytest.mark.parametrize("backend", GESVDJ_BACKENDS, indirect=True)
def test_max_sweeps_argument_overrides_the_environment(backend, monkeypatch):
    device, svd, _ = backend
    monkeypatch.setenv("INTRUDER_EXT_GESVDJ_MAX_SWEEPS", "1")
    A = torch.randn(3, 20, 20, device=device)
    with pytest.warns(RuntimeWarning, match="within 1 sweeps for 3 of 3 matrices"):
        svd(A)
    with pytest.warns(RuntimeWarning, match="within 2 sweeps for 3 of 3 matrices"):
        svd(A, max_sweeps=2)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bad_max_sweeps(backend, monkeypatch):
    device, svd, op = backend
    A = torch.randn(4, 4, device=device)
    monkeypatch.setenv("INTRUDER_EXT_GESVDJ_MAX_SWEEPS", "zero")
    with pytest.raises(ValueError, match=r"batched_svd: INTRUDER_EXT_GESVDJ_MAX_SWEEPS must be a "
                                         r"positive integer \(got 'zero'\)"):
        svd(A)
    monkeypatch.delenv("INTRUDER_EXT_GESVDJ_MAX_SWEEPS")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=rf"batched_svd: max_sweeps must be a positive int "
                                             rf"\(got {bad!r}\)"):
            svd(A, max_sweeps=bad)
    # The compiled op checks it too, for callers of torch.ops.intruder_ext.batched_svd.
    with pytest.raises(ValueError, match=r"batched_svd: max_sweeps must be a positive int \(got 0\)"):
        op(A, 0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_recomputed_mask_has_the_batch_shape(backend):
    device, _, op = backend
    U, S, Vh, recomputed = op(torch.randn(2, 3, 6, 5, device=device), 100)
    assert recomputed.shape == (2, 3) and recomputed.dtype == torch.bool
    assert recomputed.device == U.device and not recomputed.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    A = torch.randn(3, 7, 5, dtype=dtype)
    torch.library.opcheck(torch.ops.intruder_ext.batched_svd.default, (A, 100))
    torch.library.opcheck(torch.ops.intruder_ext.batched_svd.default, (A.mT, 100))


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
