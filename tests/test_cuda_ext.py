"""The CUDA extension r2m_fast._cuda and its wrapper r2m_fast.cuda_ops.

Without a GPU (CI): the extension must have been built wherever nvcc is found (a real build check,
not a skip), it imports, a call raises a clear "no CUDA device" RuntimeError, and the wrapper's
validation errors name the offending tensor. On a GPU: every CUDA op against r2m_fast.ops_torch on
fresh inputs from helpers.layer_family — ragged shapes, N = 2, 3, 8 (and 5, 16), fp32/bf16/fp16,
strided and misaligned views (the kernels' scalar variants) — and bit-identical reruns.

Tolerances: the kernels and ops_torch form the same fp32 τ from the same inputs, so they differ only
by the order of fp32 sums; atol is relative to the output's scale and grows with sqrt(reduction
length) (helpers.assert_close_verbose). An output cast to bf16/fp16 may differ by one rounding of
that dtype, so it is checked at that dtype's tolerance.
"""

from __future__ import annotations

import os
import shutil
from functools import lru_cache

import pytest
import torch

from helpers import DTYPE_IDS, assert_close_verbose, layer_family
from tolerances import LRT_RELATIVE_FP32, STREAM_GRAM, STREAM_SKETCH, TOLERANCES
from r2m_fast import cuda_ops, ops_torch

SHAPES = [(33, 47), (65, 129), (1, 40), (1000, 3), (257, 1031)]
SKETCH_COLS = {(33, 47): 13, (65, 129): 72, (1, 40): 8, (1000, 3): 5, (257, 1031): 36}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NUM_SPECIALISTS = [2, 3, 8]


def _nvcc_present() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool(shutil.which("nvcc")) or bool(home and os.path.isfile(os.path.join(home, "bin", "nvcc")))


# ------------------------------------------------------------------------------------ no GPU needed
def test_extension_built_and_imports():
    """setup.py builds the extension when R2M_BUILD_CUDA=1 (CI: scripts/test.sh), or by default where
    nvcc and a GPU are both present; in those cases it must import."""
    mode = os.environ.get("R2M_BUILD_CUDA", "")
    if mode == "0":
        pytest.skip("R2M_BUILD_CUDA=0: the CUDA extension build was skipped on purpose")
    if mode != "1" and not (_nvcc_present() and torch.cuda.is_available()):
        pytest.skip("built by default only where nvcc and a GPU are both present (R2M_BUILD_CUDA=1 forces it)")
    assert cuda_ops.cuda_extension_available(), (
        f"setup.py must have built r2m_fast._cuda here (R2M_BUILD_CUDA={mode!r}), but it does not import: "
        f"{cuda_ops.extension_import_error()!r}"
    )
    from r2m_fast import _cuda

    count, error = _cuda.device_count()
    assert isinstance(count, int) and isinstance(error, str)
    assert count > 0 or error, "device_count() must say why it sees no device"
    assert _cuda.MAX_TASKS == 16
    assert _cuda.runtime_version() >= 12000
    assert "unavailable" in cuda_ops.describe() or "usable" in cuda_ops.describe()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the no-GPU error cannot be shown")
def test_call_without_gpu_raises_clear_error():
    if not cuda_ops.cuda_extension_available():
        pytest.skip(f"the CUDA extension is not built here: {cuda_ops.extension_import_error()!r}")
    reason = cuda_ops.unavailable_reason()
    assert reason is not None and reason.startswith("no CUDA device"), reason
    weights = layer_family(2, (8, 16))
    omega = torch.randn(16, 4)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda_ops.gram_sketch(weights, omega)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda_ops.accumulate(weights, torch.tensor([0.5, 0.5]), None, None, torch.float32)
    # The raw extension raises too (a RuntimeError naming the kernel), it does not crash.
    from r2m_fast import _cuda

    with pytest.raises(RuntimeError, match="gram_partials_kernel"):
        _cuda.gram_partials([16, 16], [1, 1], 1, 1, 0, 16, 1, 0, 0)


def test_extension_rejects_bad_strides_before_touching_the_device():
    """The launchers re-check row strides (a negative or short stride would read outside the
    tensor) and raise before any CUDA call, so this runs without a GPU."""
    if not cuda_ops.cuda_extension_available():
        pytest.skip(f"the CUDA extension is not built here: {cuda_ops.extension_import_error()!r}")
    from r2m_fast import _cuda

    # addresses are never dereferenced: every call fails validation first
    with pytest.raises(RuntimeError, match=r"gram_partials_kernel: weights\[1\] has row stride -4 < its 4 columns"):
        _cuda.gram_partials([16, 32], [4, -4], 2, 4, 0, 16, 1, 0, 0)
    with pytest.raises(RuntimeError, match=r"sketch_kernel: omega has row stride 3 < its 5 columns"):
        _cuda.sketch([16, 32], [4, 4], 2, 4, 0, 64, 3, 5, 128, False, False, 0, 0)
    with pytest.raises(RuntimeError, match=r"accumulate_mma_kernel: left has row stride 2 < its 3 columns"):
        _cuda.accumulate([16, 32], [4, 4], [0.5], 2, 4, 0, 64, 2, 128, 3, 3, 256, 0, 1, True, 0, 0)
    with pytest.raises(RuntimeError, match=r"combine_kernel: grid must be in"):
        _cuda.accumulate([16, 32], [4, 4], [0.5], 2, 4, 0, 0, 0, 0, 0, 0, 256, 0, 0, False, 0, 0)


def test_missing_extension_error_carries_cause_and_hint(monkeypatch):
    monkeypatch.setattr(cuda_ops, "_ext", None)
    monkeypatch.setattr(cuda_ops, "_IMPORT_ERROR", ImportError("libfoo.so: cannot open shared object file"))
    reason = cuda_ops.unavailable_reason()
    assert "libfoo.so" in reason and "build_ext --inplace" in reason
    assert not cuda_ops.cuda_extension_available()
    with pytest.raises(RuntimeError, match="libfoo.so") as info:
        cuda_ops.gram_sketch(layer_family(2, (4, 4)), None)
    assert "build_ext --inplace" in str(info.value)
    with pytest.raises(RuntimeError, match="libfoo.so"):
        cuda_ops.accumulate(layer_family(2, (4, 4)), torch.ones(2), None, None, torch.float32)


class _StubExtension:
    """Stands in for r2m_fast._cuda where it is not built: validation runs before any call."""

    def device_count(self):
        return 0, "stub"


@pytest.fixture
def wrapper(monkeypatch):
    if not cuda_ops.cuda_extension_available():
        monkeypatch.setattr(cuda_ops, "_ext", _StubExtension())
        monkeypatch.setattr(cuda_ops, "_IMPORT_ERROR", None)
        cuda_ops._device_reason.cache_clear()
        yield cuda_ops
        cuda_ops._device_reason.cache_clear()
    else:
        yield cuda_ops


def _family(shape=(6, 10), n=2, dtype=torch.float32):
    return layer_family(n, shape, dtype=dtype)


@pytest.mark.parametrize(
    "case, exc, pattern",
    [
        ("shape", ValueError, r"weights\[2\] has shape \(6, 11\)"),
        ("integer", TypeError, r"weights\[0\] has dtype torch.int32"),
        ("mixed dtype", TypeError, r"weights\[1\] has dtype torch.float16"),
        ("not a tensor", TypeError, r"weights\[1\] must be a torch.Tensor"),
        ("one weight", ValueError, r"weights needs θ₀ and at least one specialist"),
        ("omega rows", ValueError, r"omega has shape \(9, 4\)"),
        ("omega dtype", TypeError, r"omega must be float32 or bfloat16"),
        ("omega dims", ValueError, r"omega must be 2-D"),
    ],
)
def test_gram_sketch_validation_names_the_tensor(wrapper, case, exc, pattern):
    weights = _family()
    omega = torch.randn(10, 4)
    if case == "shape":
        weights[2] = torch.zeros(6, 11)
    elif case == "integer":
        weights = [w.to(torch.int32) for w in weights]
    elif case == "mixed dtype":
        weights[1] = weights[1].half()
    elif case == "not a tensor":
        weights[1] = [[0.0]]
    elif case == "one weight":
        weights = weights[:1]
    elif case == "omega rows":
        omega = torch.randn(9, 4)
    elif case == "omega dtype":
        omega = torch.randn(10, 4).half()
    elif case == "omega dims":
        omega = torch.randn(10)
    with pytest.raises(exc, match=pattern):
        wrapper.gram_sketch(weights, omega)


@pytest.mark.parametrize(
    "case, exc, pattern",
    [
        ("left only", ValueError, r"left and right must be given together"),
        ("left rows", ValueError, r"left \(5, 3\) and right \(10, 3\) do not fit"),
        ("right rank", ValueError, r"left \(6, 3\) and right \(10, 2\) do not fit"),
        ("coeffs", ValueError, r"coeffs must have shape \(2,\)"),
        ("weights shape", ValueError, r"weights\[1\] has shape"),
        ("left dtype", TypeError, r"left must be a floating tensor"),
    ],
)
def test_accumulate_validation_names_the_tensor(wrapper, case, exc, pattern):
    weights = _family()
    coeffs = torch.tensor([0.3, 0.2])
    left, right = torch.randn(6, 3), torch.randn(10, 3)
    if case == "left only":
        right = None
    elif case == "left rows":
        left = torch.randn(5, 3)
    elif case == "right rank":
        right = torch.randn(10, 2)
    elif case == "coeffs":
        coeffs = torch.ones(3)
    elif case == "weights shape":
        weights[1] = weights[1].T.contiguous()
    elif case == "left dtype":
        left = torch.ones(6, 3, dtype=torch.int32)
    with pytest.raises(exc, match=pattern):
        wrapper.accumulate(weights, coeffs, left, right, torch.float32)


# ------------------------------------------------------------------------------------ on a GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")


@pytest.fixture
def cuda():
    """The CUDA backend must be usable wherever torch sees a GPU: fail (not skip) when it is not."""
    reason = cuda_ops.unavailable_reason()
    assert reason is None, f"a GPU is present but the cuda backend cannot run: {reason}"
    return cuda_ops


@lru_cache(maxsize=None)
def _cpu_family(n: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    return tuple(layer_family(n, shape, dtype=dtype, seed=seed))


def _gpu_family(n, shape, dtype, seed=0):
    return [w.cuda() for w in _cpu_family(n, shape, dtype, seed)]


def _check_gram_sketch(weights, omega, sketch_dtype_tol=torch.float32):
    gram, sketch = cuda_ops.gram_sketch(weights, omega)
    ref_gram, ref_sketch = ops_torch.gram_sketch(weights, omega)
    assert gram.dtype == torch.float64 and gram.device == weights[0].device
    numel = weights[0].numel()
    atol, rtol = TOLERANCES[torch.float32]
    scale = ref_gram.abs().max().item()
    assert_close_verbose(gram, ref_gram, atol * scale, rtol, "gram", reduce_dim=numel)
    assert torch.equal(gram, gram.T), "gram must be exactly symmetric"
    if omega is None:
        assert sketch is None
        return gram, sketch
    assert sketch.dtype == torch.float32 and sketch.shape == ref_sketch.shape
    atol, rtol = TOLERANCES[sketch_dtype_tol]
    scale = ref_sketch.abs().max().item()
    assert_close_verbose(sketch, ref_sketch, atol * scale, rtol, "sketch", reduce_dim=omega.shape[0])
    return gram, sketch


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("num_specialists", NUM_SPECIALISTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gram_sketch_matches_torch(cuda, shape, num_specialists, dtype):
    weights = _gpu_family(num_specialists, shape, dtype, seed=1)
    g = torch.Generator(device="cuda").manual_seed(7)
    omega = torch.randn(shape[1], SKETCH_COLS[shape], device="cuda", generator=g)
    gram, sketch = _check_gram_sketch(weights, omega)
    gram2, sketch2 = cuda.gram_sketch(weights, omega)
    assert torch.equal(gram, gram2) and torch.equal(sketch, sketch2), "same inputs twice must be bit-identical"
    gram_only, none = cuda.gram_sketch(weights, None)
    assert none is None and torch.equal(gram_only, gram)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_specialists", [1, 5, 16])
def test_gram_sketch_other_task_counts(cuda, num_specialists):
    weights = _gpu_family(num_specialists, (129, 257), torch.bfloat16, seed=2)
    omega = torch.randn(257, 20, device="cuda")
    _check_gram_sketch(weights, omega)


@gpu
@pytest.mark.gpu
def test_gram_sketch_more_than_16_specialists_falls_back_with_warning(cuda):
    weights = _gpu_family(17, (16, 24), torch.float32, seed=3)
    with pytest.warns(RuntimeWarning, match="falling back"):
        gram, _ = cuda.gram_sketch(weights, None)
    assert gram.shape == (17, 17)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mma", ["1", "0"], ids=["tensor_cores", "simt"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(65, 129), (257, 1031), (1000, 3), (1, 40), (300, 200)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_gram_sketch_bf16_omega(cuda, monkeypatch, shape, dtype, mma):
    """A bf16 Ω: τ rounded to bf16, bf16 products with fp32 sums (torch rounds its bf16 result once
    more), on the tensor-core kernel and on the SIMT kernel; ragged in every tile dimension."""
    monkeypatch.setenv("R2M_CUDA_SKETCH_MMA", mma)
    weights = _gpu_family(3, shape, dtype, seed=4)
    s = 24 if shape[1] > 24 else 3
    if shape == (300, 200):
        s = 130  # three 64-column tiles, the last ragged
    omega = torch.randn(shape[1], s, device="cuda").bfloat16()
    _, sketch = _check_gram_sketch(weights, omega, sketch_dtype_tol=torch.bfloat16)
    _, again = cuda.gram_sketch(weights, omega)
    assert torch.equal(sketch, again), "same inputs twice must be bit-identical"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", ["padded_rows", "misaligned", "transposed", "conv4d", "vector1d"])
def test_gram_sketch_views(cuda, dtype, layout):
    """Strided, misaligned and non-2-D inputs: the scalar kernel variants and the wrapper's views."""
    if layout == "conv4d":
        weights = _gpu_family(3, (24, 4, 3, 5), dtype, seed=5)
    elif layout == "vector1d":
        weights = _gpu_family(3, (77,), dtype, seed=5)
    else:
        big = _gpu_family(3, (70, 136), dtype, seed=5)
        if layout == "padded_rows":  # row stride 136 ≠ 129 columns, 16-byte-aligned rows: vector loads
            weights = [w[:, :129] for w in big]
        elif layout == "misaligned":  # offset by one element: scalar variant
            weights = [w[1:, 1:130] for w in big]
        else:  # unit row stride: the wrapper copies
            weights = [w[:, :70].T for w in big]
    omega = torch.randn(weights[0].shape[-1], 12, device="cuda")
    _check_gram_sketch(weights, omega)
    _check_gram_sketch(weights, omega.bfloat16(), sketch_dtype_tol=torch.bfloat16)  # tensor-core kernel


def _low_rank_factors(m, n, k, scale, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    left = torch.randn(m, k, device=device, generator=g) * scale
    right = torch.randn(n, k, device=device, generator=g) / max(k, 1) ** 0.5
    return left, right


def _check_accumulate(weights, coeffs, left, right, out_dtype):
    out = cuda_ops.accumulate(weights, coeffs, left, right, out_dtype)
    ref = ops_torch.accumulate(weights, coeffs, left, right, out_dtype)
    assert out.dtype == out_dtype and out.shape == ref.shape and out.device == weights[0].device
    atol, rtol = TOLERANCES[out_dtype]
    scale = ref.float().abs().max().item()
    k = 1 if left is None else left.shape[1]
    assert_close_verbose(out, ref, atol * scale, rtol, "accumulate", reduce_dim=k)
    return out


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("with_product", [False, "mma", "simt"], ids=["no_LR", "LR_3xtf32", "LR_simt"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("num_specialists", NUM_SPECIALISTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_accumulate_matches_torch(cuda, monkeypatch, shape, num_specialists, dtype, with_product):
    monkeypatch.setenv("R2M_CUDA_ACCUMULATE_MMA", "0" if with_product == "simt" else "1")
    weights = _gpu_family(num_specialists, shape, dtype, seed=6)
    coeffs = torch.linspace(0.9, -0.4, num_specialists, dtype=torch.float64)
    coeffs[-1] = 0.0  # a zero term is skipped, as in the torch contract
    left = right = None
    if with_product:
        tau_scale = (weights[1].float() - weights[0].float()).abs().max().item()
        left, right = _low_rank_factors(shape[0], shape[1], 37, tau_scale, seed=num_specialists)
    out = _check_accumulate(weights, coeffs, left, right, dtype)
    again = cuda.accumulate(weights, coeffs, left, right, dtype)
    assert torch.equal(out, again), "same inputs twice must be bit-identical"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mma", ["1", "0"], ids=["3xtf32", "simt"])
@pytest.mark.parametrize("k", [0, 1, 16, 130, 4000])
def test_accumulate_output_dtypes_and_ranks(cuda, monkeypatch, out_dtype, k, mma):
    monkeypatch.setenv("R2M_CUDA_ACCUMULATE_MMA", mma)
    weights = _gpu_family(3, (257, 1031), torch.bfloat16, seed=7)
    coeffs = torch.tensor([0.5, -0.25, 0.75])
    left = right = None
    if k:
        left, right = _low_rank_factors(257, 1031, k, 1e-3, seed=k)
    _check_accumulate(weights, coeffs, left, right, out_dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", ["padded_rows", "misaligned", "transposed", "conv4d", "strided_factors"])
def test_accumulate_views(cuda, dtype, layout):
    big = _gpu_family(2, (70, 136), dtype, seed=8)
    coeffs = torch.tensor([0.6, 0.4])
    left = right = None
    if layout == "conv4d":
        weights = _gpu_family(2, (24, 4, 3, 5), dtype, seed=8)
    elif layout == "padded_rows":
        weights = [w[:, :129] for w in big]
    elif layout == "misaligned":
        weights = [w[1:, 1:130] for w in big]
    elif layout == "transposed":
        weights = [w[:, :70].T for w in big]
    else:
        weights = [w[:, :129] for w in big]
        lf, rf = _low_rank_factors(70, 2 * 129, 19, 1e-3)
        left, right = lf[:, 1:19], rf[::2, 1:19]  # misaligned rows, strided rows
    _check_accumulate(weights, coeffs, left, right, dtype)


@gpu
@pytest.mark.gpu
def test_accumulate_all_zero_coefficients_and_sixteen_specialists(cuda):
    weights = _gpu_family(16, (33, 47), torch.float16, seed=9)
    _check_accumulate(weights, torch.zeros(16), None, None, torch.float32)
    coeffs = torch.linspace(-1, 1, 16)
    left, right = _low_rank_factors(33, 47, 5, 1e-3)
    _check_accumulate(weights, coeffs, left, right, torch.float16)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mma", ["1", "0"], ids=["3xtf32", "simt"])
def test_accumulate_product_is_fp32_accurate(cuda, monkeypatch, mma):
    """L Rᵀ alone (θ₀ = θ₁ = 0) against fp64: ~1e-6 relative, far inside the 1e-5 contract (TF32
    alone would be ~1e-3)."""
    monkeypatch.setenv("R2M_CUDA_ACCUMULATE_MMA", mma)
    zeros = [torch.zeros(300, 500, device="cuda") for _ in range(3)]
    left, right = _low_rank_factors(300, 500, 700, 1.0, seed=12)
    out = cuda.accumulate(zeros, torch.tensor([0.5, 0.5]), left, right, torch.float32)
    exact = left.double() @ right.double().T
    err = ((out.double() - exact).norm() / exact.norm()).item()
    assert err < LRT_RELATIVE_FP32, f"relative error of L Rᵀ {err:.3g}"


@gpu
@pytest.mark.gpu
def test_fp64_output_and_fp64_weights(cuda):
    """fp64 output: the fp32 result widened (as the contract); fp64 weights: torch, with a warning."""
    weights = _gpu_family(2, (33, 47), torch.float32, seed=11)
    left, right = _low_rank_factors(33, 47, 6, 1e-3)
    out = cuda.accumulate(weights, torch.tensor([0.4, 0.6]), left, right, torch.float64)
    ref = ops_torch.accumulate(weights, torch.tensor([0.4, 0.6]), left, right, torch.float64)
    assert out.dtype == torch.float64
    atol, rtol = TOLERANCES[torch.float32]
    assert_close_verbose(out, ref, atol * ref.abs().max().item(), rtol, "accumulate fp64", reduce_dim=6)
    wide = [w.double() for w in weights]
    with pytest.warns(RuntimeWarning, match="falling back"):
        gram, _ = cuda.gram_sketch(wide, None)
    torch.testing.assert_close(gram, ops_torch.gram_sketch(wide, None)[0])
    with pytest.warns(RuntimeWarning, match="falling back"):
        cuda.accumulate(wide, torch.tensor([0.4, 0.6]), None, None, torch.float64)


@gpu
@pytest.mark.gpu
def test_kernels_run_on_the_current_stream(cuda):
    weights = _gpu_family(3, (257, 1031), torch.bfloat16, seed=10)
    omega = torch.randn(1031, 36, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gram, sketch = cuda.gram_sketch(weights, omega)
        out = cuda.accumulate(weights, torch.tensor([0.2, 0.3, 0.5]), None, None, torch.bfloat16)
    torch.cuda.current_stream().wait_stream(stream)
    ref_gram, ref_sketch = ops_torch.gram_sketch(weights, omega)
    assert torch.allclose(gram, ref_gram, rtol=STREAM_GRAM[1], atol=STREAM_GRAM[0])
    assert torch.allclose(sketch, ref_sketch, rtol=STREAM_SKETCH[1], atol=STREAM_SKETCH[0] * ref_sketch.abs().max().item())
    assert out.shape == weights[0].shape
