"""max_cosine on CPU against the pure-torch reference, plus its errors and opcheck."""

import pytest
import torch
from reference import check_max_cosine

import intruder_ext
from intruder_ext import max_cosine

# Tolerance on the values per dtype: the output is rounded to the input dtype.
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check(Y, X, absolute=True, normalize=True):
    values, indices = max_cosine(Y, X, absolute=absolute, normalize=normalize)
    check_max_cosine(values, indices, Y, X, ATOL[Y.dtype], absolute, normalize)
    return values, indices


SHAPES = [  # (d, k, n): single elements, odd sizes, k > n, n > k, beyond one tile in k and n
    (1, 1, 1), (3, 5, 7), (17, 1, 300), (5, 9, 2), (64, 600, 33), (33, 10, 700), (129, 513, 257),
]


@pytest.mark.parametrize("d,k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_reference(d, k, n, dtype):
    check(torch.randn(d, k, dtype=dtype), torch.randn(d, n, dtype=dtype))


@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_options(absolute, normalize):
    check(torch.randn(40, 12, dtype=torch.float64), torch.randn(40, 300, dtype=torch.float64),
          absolute=absolute, normalize=normalize)


def test_signed_differs_from_absolute():
    Y = torch.tensor([[1.0], [0.0]])
    X = torch.tensor([[-1.0, 0.5], [0.0, 0.5]])
    assert max_cosine(Y, X).indices.item() == 0
    signed = max_cosine(Y, X, absolute=False)
    assert signed.indices.item() == 1
    assert signed.values.item() == pytest.approx(2 ** -0.5)


@pytest.mark.parametrize("y_batch,x_batch", [((2, 3), ()), ((), (4,)), ((2, 1), (1, 3)), ((0,), ())])
def test_batch_dims_broadcast(y_batch, x_batch):
    Y = torch.randn(*y_batch, 20, 6, dtype=torch.float64)
    X = torch.randn(*x_batch, 20, 270, dtype=torch.float64)
    values, _ = check(Y, X)
    assert values.shape == (*torch.broadcast_shapes(y_batch, x_batch), 6)


def test_non_contiguous_inputs():
    Y = torch.randn(8, 50, 30, dtype=torch.float64).transpose(-2, -1)[::2, :, ::3]  # (4, 30, 17)
    X = torch.randn(300, 30, dtype=torch.float64).t()[:, ::2]  # (30, 150)
    assert not Y.is_contiguous() and not X.is_contiguous()
    check(Y, X)


def test_zero_size_inputs():
    v, i = max_cosine(torch.randn(5, 0), torch.randn(5, 3))
    assert v.shape == (0,) and i.shape == (0,)
    v, i = max_cosine(torch.randn(0, 5, 4), torch.randn(5, 3))
    assert v.shape == (0, 4)
    v, i = max_cosine(torch.randn(5, 0), torch.randn(5, 0))
    assert v.shape == (0,)
    # d = 0: every vector is zero, so every cosine is 0 and the lowest index wins.
    v, i = max_cosine(torch.randn(0, 3), torch.randn(0, 4))
    assert torch.equal(v, torch.zeros(3)) and torch.equal(i, torch.zeros(3, dtype=torch.long))


def test_ties_pick_lowest_index():
    x = torch.randn(16, dtype=torch.float64)
    # Columns 3 and 5 equal x, column 4 is -x: the same |cos| three times, across a tile boundary too.
    X = torch.randn(16, 600, dtype=torch.float64)
    X[:, 3], X[:, 4], X[:, 5], X[:, 300] = x, -x, 2 * x, x
    v, i = max_cosine(x[:, None], X)
    assert i.item() == 3 and v.item() == pytest.approx(1.0)
    v, i = max_cosine(-x[:, None], X, absolute=False)
    assert i.item() == 4


def test_zero_columns_have_cosine_zero():
    Y = torch.randn(10, 4)
    Y[:, 1] = 0
    X = torch.randn(10, 7)
    X[:, 0] = 0
    v, i = max_cosine(Y, X)
    assert not torch.isnan(v).any()
    assert v[1].item() == 0 and i[1].item() == 0
    assert (i[[0, 2, 3]] != 0).all()  # a zero column of X never wins over a real match


def test_nan_propagates():
    Y = torch.randn(6, 2, dtype=torch.float64)
    X = torch.randn(6, 400, dtype=torch.float64)
    X[2, 350] = float("nan")
    X[0, 380] = float("nan")
    v, i = max_cosine(Y, X)
    assert torch.isnan(v).all() and (i == 350).all()


def test_thread_count_does_not_change_the_result():
    Y, X = torch.randn(70, 700), torch.randn(70, 900)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = max_cosine(Y, X)
        torch.set_num_threads(2)
        two = max_cosine(Y, X)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.values, two.values) and torch.equal(one.indices, two.indices)


def test_returns_named_tuple():
    result = max_cosine(torch.randn(4, 2), torch.randn(4, 3))
    assert isinstance(result, intruder_ext.MaxCosine)
    values, indices = result
    assert values is result.values and indices is result.indices


@pytest.mark.parametrize("Y,X,error,message", [
    (torch.randn(384, 4), torch.randn(768, 5), ValueError,
     r"max_cosine: Y and X must have the same number of rows \(got 384 and 768\)"),
    (torch.randn(4), torch.randn(4, 5), ValueError,
     r"max_cosine: Y must have at least 2 dims \(\.\.\., d, k\) \(got shape \[4\]\)"),
    (torch.randn(4, 2), torch.randn(5), ValueError,
     r"max_cosine: X must have at least 2 dims \(\.\.\., d, n\) \(got shape \[5\]\)"),
    (torch.ones(4, 2, dtype=torch.int64), torch.randn(4, 5), TypeError,
     r"max_cosine: Y must be float32, float64, float16 or bfloat16 \(got Long\)"),
    (torch.randn(4, 2), torch.randn(4, 5, dtype=torch.float64), TypeError,
     r"max_cosine: Y and X must have the same dtype \(got Float and Double\)"),
    (torch.randn(2, 4, 2), torch.randn(3, 4, 5), ValueError,
     r"max_cosine: the leading \(batch\) dims of Y and X must broadcast "
     r"\(got shapes \[2, 4, 2\] and \[3, 4, 5\]\)"),
    (torch.randn(4, 2), torch.randn(4, 0), ValueError,
     r"max_cosine: X must have at least one column to compare with \(got shape \[4, 0\]\)"),
    ("not a tensor", torch.randn(4, 5), TypeError, r"max_cosine: Y must be a torch.Tensor \(got str\)"),
])
def test_bad_input(Y, X, error, message):
    with pytest.raises(error, match=message):
        max_cosine(Y, X)


def test_different_devices():
    # A meta tensor stands in for a second device on machines without a GPU.
    with pytest.raises((ValueError, RuntimeError),
                       match=r"max_cosine: Y and X must be on the same device \(got cpu and meta\)"):
        max_cosine(torch.randn(4, 2), torch.randn(4, 5, device="meta"))


def test_meta_shapes():
    v, i = max_cosine(torch.empty(3, 1, 8, 5, device="meta"), torch.empty(4, 8, 9, device="meta"))
    assert v.shape == (3, 4, 5) and i.shape == (3, 4, 5) and i.dtype == torch.long


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    Y = torch.randn(2, 9, 4, dtype=dtype)
    X = torch.randn(9, 11, dtype=dtype)
    torch.library.opcheck(torch.ops.intruder_ext.max_cosine.default, (Y, X, True, True))
    torch.library.opcheck(torch.ops.intruder_ext.max_cosine.default, (Y, X, False, False))


def test_cuda_built_reports_the_build():
    assert isinstance(intruder_ext.cuda_built(), bool)
