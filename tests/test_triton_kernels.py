"""The Triton backend (r2m_fast.kernels), op by op against its contract r2m_fast.ops_torch.

Runs on CPU tensors under TRITON_INTERPRET=1 (fp32/fp16: the interpreter has no bf16) and on CUDA
tensors on a GPU machine (bf16 too), with ragged shapes and N = 2, 3, 8 (and 16 once):

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_kernels.py -q      # CPU, interpreter
    python -m pytest tests/test_triton_kernels.py -q                         # GPU
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import DTYPE_IDS, assert_close_verbose, layer_family, test_devices
from tolerances import (
    ACCUMULATE_COMBINATION, ACCUMULATE_LOW_RANK_FP32, ORTHONORMAL_FP32_STEPS_SQUARE, SPAN_FULL_RANK_FP32,
    SPAN_RANK_DEFICIENT_FP32, TOLERANCES, TRITON_MERGE_DELTA, TSQR_VS_TORCH,
)
from r2m_fast import ops_torch

triton = pytest.importorskip("triton", reason="triton does not import: the Triton backend cannot run")

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernel_devices() -> list[str]:
    """CPU under the interpreter, CUDA otherwise (the interpreter would copy CUDA tensors to CPU)."""
    return [d for d in test_devices() if (d == "cpu") == INTERPRETING and (d == "cpu" or torch.cuda.is_available())]


DEVICES = _kernel_devices()
if not DEVICES:
    pytest.skip(
        "Triton kernels need TRITON_INTERPRET=1 (CPU tensors) or a CUDA GPU; neither is present",
        allow_module_level=True,
    )

from r2m_fast import kernels  # noqa: E402  (after the skip: needs triton)

pytestmark = pytest.mark.triton_interpreter

DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(INTERPRETING, reason="the Triton interpreter has no bf16")),
]
# (shape, N): ragged in every block size, a 1-row layer, a layer narrower than the sketch block.
CASES = [((33, 47), 2), ((33, 47), 3), ((65, 129), 8), ((1, 40), 3), ((17, 5), 2), ((65, 129), 2)]
CASE_IDS = [f"{m}x{n}-N{N}" for (m, n), N in CASES]


def _tol(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def _scaled(expected: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) with atol relative to the result's magnitude (task vectors are ~1e-3 of θ, so
    absolute fp32 tolerances would be meaningless on their products)."""
    atol, rtol = _tol(dtype)
    return atol * float(expected.abs().max().clamp_min(1e-30)), rtol


def _family(N: int, shape: tuple[int, int], dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    return layer_family(N, shape, dtype, device=device, seed=seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,N", CASES, ids=CASE_IDS)
def test_gram_sketch_matches_torch(device, dtype, shape, N):
    weights = _family(N, shape, dtype, device)
    s = 20
    omega_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    omega = torch.randn(shape[1], s, device=device).to(omega_dtype)
    gram, sketch = kernels.gram_sketch(weights, omega)
    gram_ref, sketch_ref = ops_torch.gram_sketch(weights, omega)
    assert gram.dtype == torch.float64 and gram.shape == (N, N)
    assert sketch.dtype == torch.float32 and sketch.shape == (N, shape[0], s)
    numel = shape[0] * shape[1]
    assert_close_verbose(gram, gram_ref, *_scaled(gram_ref, torch.float32), name="gram", reduce_dim=numel)
    assert_close_verbose(sketch, sketch_ref, *_scaled(sketch_ref, dtype), name="sketch", reduce_dim=shape[1])
    gram_only, none = kernels.gram_sketch(weights, None)
    assert none is None
    assert torch.equal(gram_only, gram)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,N", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("transpose", [False, True], ids=["F", "Ft"])
def test_residual_matmul_matches_torch(device, dtype, shape, N, transpose):
    weights = _family(N, shape, dtype, device)
    core = torch.rand(N, dtype=torch.float64) - 0.2
    rhs_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    k = shape[0] if transpose else shape[1]
    rhs = torch.randn(N, k, 11, device=device).to(rhs_dtype)
    out = kernels.residual_matmul(weights, core.to(device), rhs, transpose)
    ref = ops_torch.residual_matmul(weights, core.to(device), rhs, transpose)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert_close_verbose(out, ref, *_scaled(ref, dtype), name="residual product", reduce_dim=k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [2, 3, 50])
def test_split_reductions_match(device, splits):
    """Split-K (chosen for occupancy on GPUs, 1 under the interpreter) gives the same results."""
    shape, N = (33, 200), 3
    weights = _family(N, shape, torch.float16, device, seed=5)
    omega = torch.randn(shape[1], 20, device=device)
    core = torch.tensor([0.2, 0.5, 0.3], device=device)
    gram_ref, sketch_ref = ops_torch.gram_sketch(weights, omega)
    gram, sketch = kernels.gram_sketch(weights, omega, splits=splits)
    assert_close_verbose(gram, gram_ref, *_scaled(gram_ref, torch.float32), name="gram", reduce_dim=shape[0] * shape[1])
    assert_close_verbose(sketch, sketch_ref, *_scaled(sketch_ref, torch.float32), name="sketch", reduce_dim=shape[1])
    for transpose in (False, True):
        rhs = torch.randn(N, shape[0] if transpose else shape[1], 12, device=device)
        ref = ops_torch.residual_matmul(weights, core, rhs, transpose)
        out = kernels.residual_matmul(weights, core, rhs, transpose, splits=splits)
        assert_close_verbose(out, ref, *_scaled(ref, torch.float32), name="product", reduce_dim=rhs.shape[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,m,s", [(3, 47, 9), (8, 129, 20), (2, 65, 40), (2, 5, 5)])
@pytest.mark.parametrize("steps", [2, 3])
def test_orthonormalize_matches_torch_and_is_orthonormal(device, B, m, s, steps):
    y = torch.randn(B, m, s, device=device) * torch.logspace(0, -4, s, device=device)  # cond ~1e4
    q = kernels.orthonormalize(y, steps)
    ref = ops_torch.orthonormalize(y, steps)
    assert q.dtype == torch.float32 and q.shape == y.shape
    # Q R⁻¹ runs in 3xTF32 on GPUs (~2⁻²¹ per product against fp32's 2⁻²⁴): a looser bound there.
    tol = TSQR_VS_TORCH[torch.device(device).type]
    assert_close_verbose(q, ref, tol, tol, name="Q", reduce_dim=s)
    eye = torch.eye(s, device=device)
    # 1e-6-shifted CholeskyQR: squared column norms are biased by ~1e-6 (see ops_torch); two steps
    # leave an intermediate basis only near-orthonormal (1e-2 here, where square y is worse than 1e4).
    assert (q.transpose(1, 2) @ q - eye).abs().max() < ORTHONORMAL_FP32_STEPS_SQUARE[steps]
    # Q spans Y: Y − Q QᵀY vanishes.
    resid = y - q @ (q.transpose(1, 2) @ y)
    assert torch.linalg.vector_norm(resid) <= SPAN_FULL_RANK_FP32 * torch.linalg.vector_norm(y)


@pytest.mark.parametrize("device", DEVICES)
def test_orthonormalize_rank_deficient_and_zero_give_no_nan(device):
    low = torch.randn(2, 40, 2, device=device) @ torch.randn(2, 2, 8, device=device)  # rank 2 of 8
    zero = torch.zeros(2, 40, 8, device=device)
    for y in (low, zero, torch.cat([low, zero])):
        q = kernels.orthonormalize(y)
        assert torch.isfinite(q).all()
    assert torch.equal(kernels.orthonormalize(zero), zero)
    q = kernels.orthonormalize(low)
    resid = low - q @ (q.transpose(1, 2) @ low)
    assert torch.linalg.vector_norm(resid) <= SPAN_RANK_DEFICIENT_FP32 * torch.linalg.vector_norm(low)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,N", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("low_rank", [True, False], ids=["LRt", "noLR"])
def test_accumulate_matches_torch(device, dtype, shape, N, low_rank):
    weights = _family(N, shape, dtype, device)
    coeffs = torch.rand(N, dtype=torch.float64) * 0.5
    coeffs[0] = 0.0  # a zero coefficient is skipped, as in ops_torch
    left = right = None
    if low_rank:
        K = 37
        left = torch.randn(shape[0], K, device=device) * 1e-3 / shape[1] ** 0.5
        right = torch.randn(shape[1], K, device=device) / K**0.5
    out = kernels.accumulate(weights, coeffs.to(device), left, right, dtype)
    ref = ops_torch.accumulate(weights, coeffs.to(device), left, right, dtype)
    assert out.dtype == dtype and out.shape == shape
    atol, rtol = _tol(dtype)
    assert_close_verbose(out, ref, atol * float(ref.abs().max()), rtol, name="merged")
    if dtype == torch.float32:
        # The merged fp32 weights stay within ~1e-5 relative of the fp32 torch op (3xTF32 L Rᵀ).
        err = torch.linalg.vector_norm((out - ref).double()) / torch.linalg.vector_norm(ref.double())
        assert err < ACCUMULATE_LOW_RANK_FP32


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_into_a_given_place(device):
    """out= receives the result (any strides: columns of a wider buffer) and is returned; one of
    another shape is refused."""
    weights = _family(3, (33, 47), torch.float32, device)
    coeffs = torch.tensor([0.2, 0.3, 0.1], device=device)
    left, right = torch.randn(33, 5, device=device), torch.randn(47, 5, device=device)
    wide = torch.full((33, 50), float("nan"), device=device)
    place = wide[:, :47]
    assert kernels.accumulate(weights, coeffs, left, right, torch.float32, out=place) is place
    assert torch.equal(place, kernels.accumulate(weights, coeffs, left, right, torch.float32))
    assert wide[:, 47:].isnan().all()
    with pytest.raises(ValueError, match="out must be"):
        kernels.accumulate(weights, coeffs, None, None, torch.float32, out=torch.empty(47, 33, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_out_dtypes(device):
    weights = _family(3, (33, 47), torch.float16, device)
    coeffs = torch.tensor([0.2, 0.3, 0.1], device=device)
    for out_dtype in (torch.float32, torch.float64):
        out = kernels.accumulate(weights, coeffs, None, None, out_dtype)
        ref = ops_torch.accumulate(weights, coeffs, None, None, out_dtype)
        assert out.dtype == out_dtype
        assert_close_verbose(out, ref, *ACCUMULATE_COMBINATION, name=f"merged as {out_dtype}")


@pytest.mark.parametrize("device", DEVICES)
def test_sixteen_specialists(device):
    shape, N = (20, 33), 16
    weights = _family(N, shape, torch.float32, device, seed=4)
    omega = torch.randn(shape[1], 16, device=device)
    gram, sketch = kernels.gram_sketch(weights, omega)
    gram_ref, sketch_ref = ops_torch.gram_sketch(weights, omega)
    assert_close_verbose(gram, gram_ref, *_scaled(gram_ref, torch.float32), name="gram", reduce_dim=shape[0] * shape[1])
    assert_close_verbose(sketch, sketch_ref, *_scaled(sketch_ref, torch.float32), name="sketch", reduce_dim=shape[1])
    w = torch.linspace(-0.5, 1.0, N, device=device)
    rhs = torch.randn(N, shape[0], 8, device=device)
    out = kernels.residual_matmul(weights, w, rhs, True)
    ref = ops_torch.residual_matmul(weights, w, rhs, True)
    assert_close_verbose(out, ref, *_scaled(ref, torch.float32), name="residual product", reduce_dim=shape[0])
    merged = kernels.accumulate(weights, w, None, None, torch.float32)
    assert_close_verbose(merged, ops_torch.accumulate(weights, w, None, None, torch.float32), *ACCUMULATE_COMBINATION, name="merged")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    shape, N = (33, 47), 3
    contiguous = _family(N, shape, torch.float32, device, seed=2)
    # Transposed views (strides (1, m)) are read in place; mixed strides are copied first.
    transposed = [w.T.contiguous().T for w in contiguous]
    mixed = [contiguous[0]] + transposed[1:]
    sliced = [torch.stack([w, w], -1)[..., 0] for w in contiguous]  # stride (2n, 2)
    omega = torch.randn(2 * shape[1], 16, device=device)[::2]
    rhs = torch.randn(N, 16, shape[0], device=device).transpose(1, 2)
    core = torch.tensor([0.3, 0.3, 0.4], device=device)
    gram_ref, sketch_ref = ops_torch.gram_sketch(contiguous, omega)
    prod_ref = ops_torch.residual_matmul(contiguous, core, rhs, True)
    acc_ref = ops_torch.accumulate(contiguous, core, None, None, torch.float32)
    for weights in (transposed, mixed, sliced):
        assert not all(w.is_contiguous() for w in weights)
        gram, sketch = kernels.gram_sketch(weights, omega)
        assert_close_verbose(gram, gram_ref, *_scaled(gram_ref, torch.float32), name="gram", reduce_dim=shape[0] * shape[1])
        assert_close_verbose(sketch, sketch_ref, *_scaled(sketch_ref, torch.float32), name="sketch", reduce_dim=shape[1])
        prod = kernels.residual_matmul(weights, core, rhs, True)
        assert_close_verbose(prod, prod_ref, *_scaled(prod_ref, torch.float32), name="product", reduce_dim=shape[0])
        acc = kernels.accumulate(weights, core, None, None, torch.float32)
        assert_close_verbose(acc, acc_ref, *ACCUMULATE_COMBINATION, name="merged")
    y = torch.randn(2, 9, 40, device=device).transpose(1, 2)
    tol = TSQR_VS_TORCH[torch.device(device).type]
    assert_close_verbose(kernels.orthonormalize(y), ops_torch.orthonormalize(y), tol, tol, name="Q")


@pytest.mark.parametrize("device", DEVICES)
def test_same_input_twice_is_bit_identical(device):
    shape, N = (65, 129), 3
    weights = _family(N, shape, torch.float16, device, seed=3)
    omega = torch.randn(shape[1], 24, device=device)
    core = torch.tensor([0.2, 0.5, 0.3], device=device)
    rhs = torch.randn(N, shape[1], 24, device=device)
    y = torch.randn(N, shape[0], 24, device=device)
    left, right = torch.randn(shape[0], 40, device=device), torch.randn(shape[1], 40, device=device)
    runs = [
        (
            *kernels.gram_sketch(weights, omega),
            kernels.residual_matmul(weights, core, rhs, False),
            kernels.orthonormalize(y),
            kernels.accumulate(weights, core, left, right, torch.float16),
        )
        for _ in range(2)
    ]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    weights = _family(2, (9, 7), torch.float32, device)
    core = torch.tensor([0.5, 0.5], device=device)
    with pytest.raises(ValueError, match="at least one specialist"):
        kernels.gram_sketch(weights[:1], None)
    with pytest.raises(ValueError, match=r"weights\[2\] has shape"):
        kernels.gram_sketch(weights[:2] + [torch.zeros(9, 8, device=device)], None)
    with pytest.raises(ValueError, match=r"weights\[1\] has dtype"):
        kernels.accumulate([weights[0], weights[1].half(), weights[2]], core, None, None, torch.float32)
    with pytest.raises(ValueError, match=r"weights\[0\] must be 2-D"):
        kernels.gram_sketch([w.reshape(-1) for w in weights], None)
    with pytest.raises(ValueError, match="must be a floating tensor"):
        kernels.gram_sketch([w.int() for w in weights], None)
    with pytest.raises(TypeError, match="sequence of N\\+1 tensors"):
        kernels.gram_sketch(torch.stack(weights), None)
    with pytest.raises(ValueError, match="omega must have 7 rows"):
        kernels.gram_sketch(weights, torch.randn(8, 4, device=device))
    with pytest.raises(ValueError, match="core_coeffs must have shape"):
        kernels.residual_matmul(weights, torch.ones(3, device=device), torch.randn(2, 7, 4, device=device), False)
    with pytest.raises(ValueError, match="rhs must have shape"):
        kernels.residual_matmul(weights, core, torch.randn(2, 9, 4, device=device), False)
    with pytest.raises(ValueError, match="left and right"):
        kernels.accumulate(weights, core, torch.randn(9, 3, device=device), None, torch.float32)
    with pytest.raises(ValueError, match="left must be"):
        kernels.accumulate(weights, core, torch.randn(9, 3, device=device), torch.randn(7, 4, device=device), torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        kernels.accumulate(weights, core, None, None, torch.int32)
    with pytest.raises(ValueError, match="y must be 3-D"):
        kernels.orthonormalize(torch.randn(9, 4, device=device))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    weights = _family(2, (4, 4), torch.float32, "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at call time by the launchers' device check
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        kernels.gram_sketch(weights, None)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_triton_matches_torch_backend(device):
    import r2m_fast

    models = [
        {"w": w, "v": v}
        for w, v in zip(_family(3, (40, 24), torch.float32, device, seed=7), _family(3, (17, 30), torch.float32, device, seed=8))
    ]
    fast = r2m_fast.merge(models[0], models[1:], backend="triton", rank_ratio=0.25, seed=1, range_finder_precision="fp32")
    ref = r2m_fast.merge(models[0], models[1:], backend="torch", rank_ratio=0.25, seed=1, range_finder_precision="fp32")
    assert fast.report["backend"] == "triton"
    for name in ref.state_dict:
        base = models[0][name]
        delta_err = torch.linalg.vector_norm((fast.state_dict[name] - ref.state_dict[name]).double())
        delta = torch.linalg.vector_norm((ref.state_dict[name] - base).double())
        assert delta_err <= TRITON_MERGE_DELTA * delta, name


# Compiles the kernel variants the launchers pick on a GPU for sm_90 with Triton's bundled ptxas, in a
# subprocess without TRITON_INTERPRET (the interpreter patches triton.language in-process): catches
# GPU-only compile errors on a machine without a GPU. Pointers claim 16-byte alignment and unit inner
# strides are specialized, as the runtime does for contiguous tensors.
_COMPILE_SCRIPT = textwrap.dedent(
    """
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import r2m_fast.kernels  # noqa: F401
    mods = {name: importlib.import_module("r2m_fast.kernels." + name)
            for name in ("gram_sketch", "residual_project", "tsqr", "accumulate")}
    UNIT = {"stride_wn", "stride_os", "stride_zs", "stride_cn", "stride_ck", "stride_rs", "stride_ys",
            "stride_qs", "stride_rj", "stride_on", "stride_lk", "stride_rk"}

    def compile_variant(module, kernel, types, constexprs, num_warps):
        fn = getattr(mods[module], kernel)
        constexprs = dict(constexprs)
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs or name in UNIT:
                sig[name] = "constexpr"
                constexprs.setdefault(name, 1)
            elif name.endswith("_ptr"):
                sig[name] = types.get(name, "*fp32")
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[name] = "i64" if name.startswith("stride") else "i32"
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
        print("compiled", kernel, types, constexprs)

    for w in ("*bf16", "*fp16", "*fp32"):
        for n_pad, sk32, bs in ((4, True, 64), (8, False, 128), (16, False, 128)):
            compile_variant("gram_sketch", "_gram_sketch_kernel",
                            dict(base_ptr=w, table_ptr="*i64", omega_ptr="*fp32" if sk32 else "*bf16"),
                            dict(HAS_SKETCH=True, SKETCH_FP32=sk32, ALIGNED=True, N_PAD=n_pad,
                                 BLOCK_M=64 // n_pad, BLOCK_K=32, BLOCK_S=bs), 8)
        compile_variant("gram_sketch", "_gram_sketch_kernel", dict(base_ptr=w, table_ptr="*i64"),
                        dict(HAS_SKETCH=False, SKETCH_FP32=True, ALIGNED=False, N_PAD=2, BLOCK_M=32,
                             BLOCK_K=32, BLOCK_S=16), 8)
        compile_variant("residual_project", "_residual_core_kernel", dict(base_ptr=w, table_ptr="*i64"),
                        dict(ALIGNED=True, BLOCK_M=32, BLOCK_N=64), 4)
        for rhs, bs in (("*fp32", 64), ("*bf16", 128)):
            compile_variant("residual_project", "_residual_matmul_kernel",
                            dict(base_ptr=w, table_ptr="*i64", rhs_ptr=rhs),
                            dict(RHS_FP32=rhs == "*fp32", ALIGNED=True, BLOCK_P=64, BLOCK_K=32, BLOCK_S=bs), 8)
        compile_variant("accumulate", "_accumulate_kernel", dict(out_ptr=w, base_ptr=w, table_ptr="*i64"),
                        dict(HAS_LOW_RANK=True, ALIGNED=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 8)
    compile_variant("accumulate", "_accumulate_kernel", dict(out_ptr="*fp64", base_ptr="*fp16", table_ptr="*i64"),
                    dict(HAS_LOW_RANK=False, ALIGNED=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16), 8)
    compile_variant("tsqr", "_tsqr_gram_kernel", {}, dict(BLOCK_M=64, BLOCK_S=32), 4)
    compile_variant("tsqr", "_tsqr_apply_kernel", {}, dict(BLOCK_M=64, BLOCK_K=32, BLOCK_S=64), 8)
    """
)


def _nvidia_backend_present() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _nvidia_backend_present(), reason="triton has no NVIDIA backend (ptxas) to compile with")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every kernel compiles for real in the tests above")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"compiling for sm_90 failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert res.stdout.count("compiled ") == 27
