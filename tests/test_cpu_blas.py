"""r2m_fast.cpu_blas: which BLAS multiplies the CPU path's fp32 products, and that it multiplies right."""

from __future__ import annotations

import pytest
import torch

from r2m_fast import cpu_blas
from tolerances import MATMUL_FP32_RTOL


def _operands(gen: torch.Generator, shape_a, shape_b, layout: str):
    a = torch.randn(*shape_a, generator=gen)
    b = torch.randn(*shape_b, generator=gen)
    if layout == "transposed":  # column-major views, as the range finder's Fᵀ·Q passes them
        a = a.transpose(-1, -2).contiguous().transpose(-1, -2)
        b = b.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "strided":  # no unit stride at all: not a BLAS operand as it is
        a = torch.randn(*shape_a[:-2], 2 * shape_a[-2], 2 * shape_a[-1], generator=gen)[..., ::2, ::2]
    return a, b


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("shapes", [((37, 61), (61, 13)), ((3, 129, 70), (3, 70, 11)), ((3, 129, 70), (70, 11))])
def test_matmul_matches_torch(cpu_blas_choice, shapes, layout):
    gen = torch.Generator().manual_seed(sum(map(sum, shapes)))
    a, b = _operands(gen, *shapes, layout)
    want = torch.matmul(a.double(), b.double())
    got = cpu_blas.matmul(a, b)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=MATMUL_FP32_RTOL, atol=MATMUL_FP32_RTOL * float(want.abs().max()))
    out = torch.full(want.shape, float("nan"))
    assert cpu_blas.matmul(a, b, out=out) is out
    assert torch.equal(out, got)


def test_reduced_precision_stays_with_torch(cpu_blas_choice):
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    for dtype in (torch.bfloat16, torch.float16):
        assert not cpu_blas.takes(a.to(dtype), b.to(dtype))
        assert torch.equal(cpu_blas.matmul(a.to(dtype), b.to(dtype)), torch.matmul(a.to(dtype), b.to(dtype)))


def test_fp64_gram_is_symmetric(cpu_blas_choice):
    x = torch.randn(4, 300, 37, dtype=torch.float64)
    gram = cpu_blas.matmul(x.transpose(1, 2), x)
    torch.testing.assert_close(gram, torch.matmul(x.transpose(1, 2), x), rtol=1e-12, atol=1e-12)
    if cpu_blas_choice == "openblas":  # a syrk: both triangles from one computation
        assert torch.equal(gram, gram.transpose(1, 2))


def test_openblas_follows_torch_threads(cpu_blas_choice):
    if cpu_blas_choice != "openblas":
        pytest.skip("OpenBLAS only")
    lib = cpu_blas._numpy_openblas()
    a = torch.randn(8, 8)
    for threads in (2, 1):
        torch.set_num_threads(threads)  # the autouse fixture restores it
        cpu_blas.matmul(a, a)
        assert lib._controller.num_threads == threads


@pytest.mark.parametrize(
    "vendor,env,want",
    [("AuthenticAMD", None, "openblas"), ("HygonGenuine", "auto", "openblas"), ("GenuineIntel", None, "torch"),
     (None, None, "torch"), ("AuthenticAMD", "torch", "torch"), ("GenuineIntel", "openblas", "openblas")],
)
def test_choice_by_vendor_and_override(monkeypatch, vendor, env, want):
    if cpu_blas._numpy_openblas() is None:
        pytest.skip("numpy's BLAS is not OpenBLAS here")
    monkeypatch.setattr(cpu_blas, "cpu_vendor", lambda: vendor)
    if env is None:
        monkeypatch.delenv(cpu_blas.CPU_BLAS_ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_blas.CPU_BLAS_ENV, env)
    cpu_blas.cpu_blas.cache_clear()
    try:
        assert cpu_blas.cpu_blas() == want
    finally:
        cpu_blas.cpu_blas.cache_clear()


def test_bad_override_names_the_variable(monkeypatch):
    monkeypatch.setenv(cpu_blas.CPU_BLAS_ENV, "atlas")
    cpu_blas.cpu_blas.cache_clear()
    try:
        with pytest.raises(ValueError, match="R2M_CPU_BLAS='atlas'"):
            cpu_blas.cpu_blas()
    finally:
        cpu_blas.cpu_blas.cache_clear()


@pytest.mark.parametrize("layout", ["row-major", "column-major", "every other row", "no unit stride"])
def test_upper_triangular_matmul_in_place(cpu_blas_choice, layout):
    """a ← a·U for upper-triangular U, in a's memory, for the layouts the range finder hands it (its
    products come out row-major, or column-major as transposed views) and two more, through numpy's
    OpenBLAS strmm on that path (the last layout through a matmul)."""
    gen = torch.Generator().manual_seed(4)
    whole = torch.randn(3, 1000, 74, generator=gen)
    a = {
        "row-major": lambda: whole[:, :500, :37].contiguous(),
        "column-major": lambda: whole[:, :37, :500].contiguous().transpose(1, 2),
        "every other row": lambda: whole[:, ::2, :37],
        "no unit stride": lambda: whole[:, :500, ::2],
    }[layout]()
    before = whole.clone()
    upper = torch.randn(3, 37, 37, generator=gen).triu() + 4 * torch.eye(37)
    want = a.double() @ upper.double()
    pointer = a.data_ptr()
    got = cpu_blas.upper_triangular_matmul_(a, upper)
    assert got is a and a.data_ptr() == pointer
    torch.testing.assert_close(a.double(), want, rtol=1e-5, atol=1e-4)
    if layout == "every other row":  # the rows in between and the columns beyond are not a's
        assert torch.equal(whole[:, 1::2], before[:, 1::2]) and torch.equal(whole[:, :, 37:], before[:, :, 37:])
    if cpu_blas_choice == "openblas":
        assert cpu_blas._strmm() is not None  # numpy's OpenBLAS exports it: the test ran strmm
        assert cpu_blas._numpy_openblas()._controller.num_threads == torch.get_num_threads()


def test_orthonormalize_leaves_its_input_alone(cpu_blas_choice):
    y = torch.randn(2, 300, 20, generator=torch.Generator().manual_seed(6))
    before = y.clone()
    from r2m_fast import ops_torch

    q = ops_torch.orthonormalize(y, steps=2)
    assert torch.equal(y, before) and q.data_ptr() != y.data_ptr()


@pytest.mark.parametrize("layout", ["row-major", "column-major", "rows of a wider out", "no unit stride"])
def test_matmul_add_accumulates_in_place(cpu_blas_choice, layout):
    """out += a @ b in out's memory, for row- and column-major operands (pass 3 passes Rᵀ as a
    column-major view), an out with a leading dimension beyond its width, and operands with no unit
    stride (copied by the fallback): one sgemm with β = 1 on the OpenBLAS path."""
    gen = torch.Generator().manual_seed(9)
    a, b = torch.randn(133, 47, generator=gen), torch.randn(47, 61, generator=gen)
    wide = torch.randn(133, 70, generator=gen)
    out = wide[:, :61] if layout == "rows of a wider out" else torch.randn(133, 61, generator=gen)
    if layout == "column-major":
        a, b = a.T.contiguous().T, b.T.contiguous().T
    elif layout == "no unit stride":
        a = torch.randn(266, 94, generator=gen)[::2, ::2]
    before, beyond = out.clone(), wide[:, 61:].clone()
    pointer = out.data_ptr()
    assert cpu_blas.matmul_add_(out, a, b) is out and out.data_ptr() == pointer
    want = before.double() + a.double() @ b.double()
    torch.testing.assert_close(out.double(), want, rtol=MATMUL_FP32_RTOL, atol=MATMUL_FP32_RTOL * float(want.abs().max()))
    assert torch.equal(wide[:, 61:], beyond)  # the columns beyond out are not its own
    if cpu_blas_choice == "openblas":
        assert cpu_blas._sgemm() is not None  # numpy's OpenBLAS exports it: the test ran sgemm


def test_matmul_add_refuses_shapes_that_do_not_fit(cpu_blas_choice):
    with pytest.raises((ValueError, RuntimeError)):
        cpu_blas.matmul_add_(torch.zeros(5, 4), torch.zeros(5, 3), torch.zeros(2, 4))
