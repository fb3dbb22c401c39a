"""The torch backend's ops (the CPU fast path) against their formulas in fp64, with row blocks small
enough that every shape here is several blocks and a ragged last one."""

from __future__ import annotations

import pytest
import torch

from helpers import DTYPE_IDS
from r2m_fast import ops_torch
from tolerances import OPS_TORCH_RTOL

SHAPES = [(37, 61), (64, 129), (1, 300), (300, 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _small_row_blocks(monkeypatch):
    monkeypatch.setattr(ops_torch, "ROW_BLOCK_ELEMENTS", 500)  # e.g. 8 rows of 61: 4 blocks + 5 rows


def _layer(shape, dtype, N=3, seed=0):
    gen = torch.Generator().manual_seed(seed + shape[0] * 1000 + shape[1])
    base = torch.randn(shape, generator=gen)
    return [base.to(dtype)] + [(base + 1e-2 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(N)]


def _tau64(weights):
    return torch.stack([w.double() - weights[0].double() for w in weights[1:]])


def _assert_close(got, want, name):
    # A reduced-precision result may round the other way than the fp64 value does: one ulp of it.
    rtol = max(OPS_TORCH_RTOL, torch.finfo(got.dtype).eps if got.dtype.itemsize < 4 else 0.0)
    scale = float(want.abs().max()) or 1.0
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=OPS_TORCH_RTOL * scale, msg=name)


def test_row_blocks_cover_every_row_once():
    for m, n in [(37, 61), (1, 1), (0, 5), (501, 1), (3, 1000)]:
        blocks = ops_torch.row_blocks((m, n), torch.device("cpu"))
        assert [r for b in blocks for r in range(b.start, b.stop)] == list(range(m))
        assert all(b.stop - b.start == max(1, 500 // n) for b in blocks[:-1])
    assert ops_torch.row_blocks((37, 61), torch.device("meta")) == [slice(0, 37)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES)
def test_gram_sketch(cpu_blas_choice, shape, dtype):
    weights = _layer(shape, dtype)
    omega = torch.randn(shape[1], 5, generator=torch.Generator().manual_seed(1))
    gram, sketch = ops_torch.gram_sketch(weights, omega)
    tau = _tau64(weights)
    flat = tau.flatten(1)
    _assert_close(gram, flat @ flat.T, "gram")
    _assert_close(sketch, tau @ omega.double(), "sketch")
    assert gram.dtype == torch.float64 and sketch.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES)
def test_residual_operator(cpu_blas_choice, shape, dtype):
    weights = _layer(shape, dtype)
    w = torch.tensor([0.5, -0.25, 0.125])
    tau = _tau64(weights)
    residuals = tau - torch.einsum("j,jmn->mn", w.double(), tau)
    gen = torch.Generator().manual_seed(2)
    right = torch.randn(3, shape[1], 4, generator=gen)
    left = torch.randn(3, shape[0], 4, generator=gen)
    operator = ops_torch.residual_operator(weights, w)
    _assert_close(operator(right, False), residuals @ right.double(), "F·rhs")
    _assert_close(operator(left, True), residuals.transpose(1, 2) @ left.double(), "Fᵀ·rhs")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES)
def test_accumulate(cpu_blas_choice, shape, dtype, out_dtype):
    weights = _layer(shape, dtype)
    coeffs = torch.tensor([0.3, 0.0, -0.7])  # a zero coefficient is skipped, not added as 0·τ
    gen = torch.Generator().manual_seed(3)
    left, right = torch.randn(shape[0], 6, generator=gen), torch.randn(shape[1], 6, generator=gen)
    want = weights[0].double() + torch.einsum("j,jmn->mn", coeffs.double(), _tau64(weights))
    plain = ops_torch.accumulate(weights, coeffs, None, None, out_dtype)
    assert plain.dtype == out_dtype
    _assert_close(plain, want.to(out_dtype).double(), "θ₀ + Σ aⱼτⱼ")
    merged = ops_torch.accumulate(weights, coeffs, left, right, out_dtype)
    _assert_close(merged, (want + left.double() @ right.double().T).to(out_dtype).double(), "θ₀ + Σ aⱼτⱼ + L·Rᵀ")
    # The fp32 sum of a reduced-precision output lives in a reused buffer: the result must not.
    again = ops_torch.accumulate(weights, -coeffs, None, None, out_dtype)
    assert not torch.equal(plain, again)
    _assert_close(plain, want.to(out_dtype).double(), "θ₀ + Σ aⱼτⱼ after reuse")
    # Into a given place (rows of a wider buffer, as pass 3's row blocks of a mapped file): the same bits.
    wide = torch.full((shape[0], shape[1] + 3), float("nan"), dtype=out_dtype)
    place = wide[:, : shape[1]]
    assert ops_torch.accumulate(weights, coeffs, left, right, out_dtype, out=place) is place
    assert torch.equal(place, merged) and wide[:, shape[1]:].isnan().all()


def test_accumulate_refuses_a_place_that_does_not_fit():
    weights = _layer((5, 4), torch.float32)
    coeffs = torch.tensor([0.3, 0.2, 0.1])
    for out in (torch.empty(4, 5), torch.empty(5, 4, dtype=torch.bfloat16), torch.empty(4, 5).T):
        with pytest.raises(ValueError, match="accumulate: out must be"):
            ops_torch.accumulate(weights, coeffs, None, None, torch.float32, out=out)


def test_scratch_keeps_a_large_buffer_for_small_requests():
    cpu, k = torch.device("cpu"), ops_torch.SCRATCH_KEEP_BELOW
    ops_torch.release_scratch()
    big = ops_torch.scratch("t", (8, k), torch.float32, cpu)
    small = ops_torch.scratch("t", (1, 2048), torch.float32, cpu)
    assert small.data_ptr() == big.data_ptr()  # a norm between two matrices: no fresh buffer
    assert ops_torch.scratch("t", (8, k), torch.float32, cpu).data_ptr() == big.data_ptr()
    assert ops_torch.scratch("t", (2, k), torch.float32, cpu).data_ptr() == big.data_ptr()  # 4×: kept
    assert ops_torch.scratch("t", (k,), torch.float32, cpu).data_ptr() != big.data_ptr()  # 8× a large one: replaced
    ops_torch.release_scratch()


def test_scratch_pool_slots_outlive_threads_and_only_grow():
    """A pass's workers are new threads: inside a scratch_pool a later layer, on another thread, gets
    the buffer an earlier one left (even after a much larger one: no shrinking within a merge); two
    layers running at once never share one; the buffers go with the pool."""
    import threading

    cpu, k = torch.device("cpu"), ops_torch.SCRATCH_KEEP_BELOW
    ops_torch.release_scratch()
    outside = ops_torch.scratch("t", (k,), torch.float32, cpu)
    seen = {}

    def layer(label, rows, slot):
        with slot():
            seen[label] = ops_torch.scratch("t", (rows, k), torch.float32, cpu).data_ptr()

    with ops_torch.scratch_pool():
        slot = ops_torch.layer_slot()
        for label, rows in (("big", 8), ("small", 1)):  # one after the other, each on a new thread
            thread = threading.Thread(target=layer, args=(label, rows, slot))
            thread.start()
            thread.join()
        assert seen["small"] == seen["big"]
        with slot():  # two layers at once: two slots
            first = ops_torch.scratch("t", (1, k), torch.float32, cpu).data_ptr()
            thread = threading.Thread(target=layer, args=("concurrent", 1, slot))
            thread.start()
            thread.join()
        assert first == seen["big"] and seen["concurrent"] != first
    assert ops_torch.layer_slot()().__enter__() is None  # no pool: a no-op context, thread-local buffers
    assert ops_torch.scratch("t", (k,), torch.float32, cpu).data_ptr() == outside.data_ptr()
    ops_torch.release_scratch()
