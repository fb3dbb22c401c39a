"""Backend "cuda": two layer operations of :mod:`r2m_fast.ops_torch` on the CUDA extension.

``gram_sketch`` and ``accumulate`` run hand-written CUDA kernels from ``csrc/`` (module
``r2m_fast._cuda``, built by setup.py with nvcc + pybind11, no torch C++ ABI), with the names,
arguments and results of the torch contract, up to floating-point rounding (DESIGN.md §3–4). They
are all this backend registers: the op registry (r2m_fast.backends.DELEGATES) serves the cuda
backend's ``residual_matmul`` and ``orthonormalize`` from Triton, or torch where Triton cannot run.

The extension is imported once, here; a failure is kept, never raised at import: ``import
r2m_fast`` works without it, :func:`unavailable_reason` says why the backend cannot run, and any
op called anyway raises a RuntimeError that carries the original error and a fix hint.

Every tensor is validated before its address reaches the extension (device, dtype, shape, unit
column stride — a strided view is copied — and element alignment); the extension picks its
16-byte-vector or scalar kernel variant from the actual pointer alignment and strides, so a
misaligned view runs slower, never wrong. Inputs it cannot take (more than 16 specialists, fp64
weights) go to the torch implementation with a warning. Kernels run on the current stream of
the tensors' device; CUDA errors come back as RuntimeError naming the kernel and the cause
(``R2M_CUDA_SYNC=1`` also synchronizes after each launch to catch asynchronous faults there).

``python -m r2m_fast.cuda_ops`` prints whether the extension is usable here and why not.
"""

from __future__ import annotations

import math
import os
import warnings
from functools import lru_cache
from types import ModuleType
from typing import Optional, Sequence

import torch

from r2m_fast import ops_torch

try:  # never let a missing or broken build break `import r2m_fast`
    from r2m_fast import _cuda as _ext

    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # ImportError, or OSError/undefined symbol from a stale build
    _ext = None
    _IMPORT_ERROR = exc

Weights = Sequence[torch.Tensor]

FIX_HINT = (
    "build it with nvcc on PATH: `python setup.py build_ext --inplace` or "
    "`pip install --no-build-isolation -e .` (R2M_BUILD_CUDA=1 makes a missing nvcc an error), "
    "or pick another backend (backend='triton' or 'torch')"
)
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MAX_TASKS = 16  # θ₀ + 16 specialists travel in one kernel-parameter struct (csrc/common.cuh)
_BLOCKS_PER_SM = 4  # persistent grid of the memory-bound kernels: 4 blocks of 256 threads per SM


# ----------------------------------------------------------------------------------- availability
def cuda_extension_available() -> bool:
    """True when ``r2m_fast._cuda`` imported (a device may still be missing: see unavailable_reason)."""
    return _ext is not None


def extension_import_error() -> Optional[BaseException]:
    """The exception that importing ``r2m_fast._cuda`` raised, or None."""
    return _IMPORT_ERROR


def _import_reason() -> Optional[str]:
    if _ext is not None:
        return None
    return (
        f"the CUDA extension r2m_fast._cuda does not import "
        f"({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}); {FIX_HINT}"
    )


@lru_cache(maxsize=1)
def _device_reason() -> Optional[str]:
    """Why no CUDA device can run the kernels (cached: the set of devices does not change)."""
    count, error = _ext.device_count()
    if count == 0:
        return f"no CUDA device: the extension's CUDA runtime reports {error}"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
        return f"no CUDA device: torch {torch.__version__} ({build}) sees none, though the CUDA runtime sees {count}"
    return None


def unavailable_reason() -> Optional[str]:
    """None when the extension imported and a CUDA device is usable; otherwise the reason."""
    reason = _import_reason()
    if reason is not None:
        return reason
    return _device_reason()


def _require_extension(op: str) -> ModuleType:
    reason = _import_reason()
    if reason is not None:
        raise RuntimeError(f"r2m_fast.cuda_ops.{op}: {reason}") from _IMPORT_ERROR
    return _ext


# ----------------------------------------------------------------------------------- validation
def _check_weights(weights: Weights, op: str) -> None:
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
        raise TypeError(f"{op}: weights must be a sequence of N+1 tensors [θ₀, θ₁, …], got {type(weights).__name__}")
    if len(weights) < 2:
        raise ValueError(f"{op}: weights needs θ₀ and at least one specialist, got {len(weights)} tensor(s)")
    first = weights[0]
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{op}: weights[{i}] must be a torch.Tensor, got {type(w).__name__}")
        if not w.is_floating_point():
            raise TypeError(f"{op}: weights[{i}] has dtype {w.dtype}; the layer operations take floating tensors")
        if w.dtype != first.dtype:
            raise TypeError(f"{op}: weights[{i}] has dtype {w.dtype} but weights[0] has {first.dtype}")
        if w.shape != first.shape:
            raise ValueError(f"{op}: weights[{i}] has shape {tuple(w.shape)} but weights[0] has {tuple(first.shape)}")


def _check_device(named: Sequence[tuple[str, torch.Tensor]], op: str) -> torch.device:
    """The common CUDA device of the named tensors; RuntimeError when no CUDA device can run."""
    for name, t in named:
        if t.device.type != "cuda":
            reason = unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"r2m_fast.cuda_ops.{op}: {reason} ({name} is on {t.device})")
            raise ValueError(f"{op}: {name} must be a CUDA tensor, got device {t.device}")
    device = named[0][1].device
    for name, t in named[1:]:
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but {named[0][0]} is on {device}")
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"r2m_fast.cuda_ops.{op}: {reason}")
    return device


def _rows_view(t: torch.Tensor, name: str, op: str) -> torch.Tensor:
    """t as a 2-D (rows, last dim) view with unit column stride (a copy when it has none)."""
    if t.dim() == 0:
        t = t.reshape(1, 1)
    elif t.dim() == 1:
        t = t.reshape(1, -1)
    elif t.dim() > 2:
        t = t.reshape(-1, t.shape[-1])
    if t.shape[1] > 1 and t.stride(1) != 1:
        t = t.contiguous()
    if t.shape[0] > 1 and t.stride(0) < t.shape[1]:  # overlapping or transposed rows
        t = t.contiguous()
    if t.data_ptr() % t.element_size() != 0:
        raise ValueError(f"{op}: {name} is not aligned to its element size ({t.element_size()} bytes)")
    return t


def _flat_view(ts: Sequence[torch.Tensor]) -> Optional[list[torch.Tensor]]:
    """(1, numel) views when every tensor is contiguous (elementwise kernels then see one long row)."""
    if all(t.is_contiguous() for t in ts):
        return [t.reshape(1, -1) for t in ts]
    return None


def _fp32_matrix(t: torch.Tensor, name: str, op: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    return t


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _persistent_grid(device: torch.device, work_items: int, threads: int = 256) -> int:
    return max(1, min(math.ceil(work_items / threads), _BLOCKS_PER_SM * _sm_count(device.index)))


def _fallback(op: str, why: str) -> None:
    warnings.warn(
        f"r2m_fast.cuda_ops.{op}: {why}; falling back to the slower torch implementation",
        RuntimeWarning,
        stacklevel=3,
    )


def _env_flag(name: str) -> bool:
    """Tensor-core kernel switches, on by default; =0 selects the fp32 SIMT kernel (same results to
    rounding), for comparison or bisection. R2M_CUDA_SKETCH_MMA: bf16 mma.sync for a bf16 Ω's sketch;
    R2M_CUDA_ACCUMULATE_MMA: 3xTF32 mma.sync for the L Rᵀ of accumulate."""
    return os.environ.get(name, "1") not in ("", "0")


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


# ----------------------------------------------------------------------------------- the ops
def gram_sketch(
    weights: Weights, omega: Optional[torch.Tensor]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gram matrix of the layer's task vectors and, optionally, their sketches (CUDA kernels).

    Args:
        weights: N+1 CUDA tensors of one shape (m, n) and dtype fp32/bf16/fp16 (fp64: torch
            fallback with a warning); a 1-D tensor is one row, a tensor of more dims is
            (prod(shape[:-1]), shape[-1]) for the sketch, as torch.matmul treats it.
        omega: (n, s) test matrix (fp32: fp32 SIMT kernel; or bf16 for a product at bf16 precision:
            τ is formed in fp32 and rounded to bf16, then bf16 tensor-core products with fp32
            accumulation), or None for the Gram alone.

    Returns:
        gram: (N, N) float64 on the device, Gᵢⱼ = ⟨τᵢ, τⱼ⟩ (fp32 per-thread sums, fp64 across threads).
        sketch: (N, m, s) float32 (shape[:-1] + (s,) per task in general) or None.
    """
    ext = _require_extension("gram_sketch")
    _check_weights(weights, "gram_sketch")
    named = [(f"weights[{i}]", w) for i, w in enumerate(weights)]
    if omega is not None:
        _fp32_matrix(omega, "omega", "gram_sketch")
        last = weights[0].shape[-1] if weights[0].dim() > 0 else 1
        if omega.shape[0] != last:
            raise ValueError(
                f"gram_sketch: omega has shape {tuple(omega.shape)} but the weights' last dimension is {last}"
            )
        if omega.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"gram_sketch: omega must be float32 or bfloat16, got {omega.dtype}")
        named.append(("omega", omega))
    device = _check_device(named, "gram_sketch")
    n_tasks = len(weights) - 1
    if n_tasks > _MAX_TASKS:
        _fallback("gram_sketch", f"{n_tasks} specialists (the kernels take at most {_MAX_TASKS})")
        return ops_torch.gram_sketch(weights, omega)
    if weights[0].dtype not in _DTYPE_CODES:
        _fallback("gram_sketch", f"weights of dtype {weights[0].dtype} (the kernels read float32, bfloat16, float16)")
        return ops_torch.gram_sketch(weights, omega)

    base = weights[0]
    dtype_code = _DTYPE_CODES[base.dtype]
    index = _device_index(device)
    gram = torch.zeros((n_tasks, n_tasks), dtype=torch.float64, device=device)
    sketch = None
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        if base.numel() > 0:
            mats = _flat_view(weights) or [_rows_view(w, f"weights[{i}]", "gram_sketch") for i, w in enumerate(weights)]
            rows, cols = mats[0].shape
            per_vec = 16 // base.element_size()
            grid = _persistent_grid(device, rows * math.ceil(cols / per_vec))
            partial = torch.empty((grid, n_tasks, n_tasks), dtype=torch.float64, device=device)
            ext.gram_partials(
                [m.data_ptr() for m in mats], [m.stride(0) for m in mats], rows, cols, dtype_code,
                partial.data_ptr(), grid, index, stream,
            )
            gram = partial.sum(0)  # fp64, fixed order: deterministic
            gram = torch.triu(gram) + torch.triu(gram, 1).transpose(0, 1)  # exactly symmetric
        if omega is not None:
            s = omega.shape[1]
            lead = tuple(base.shape[:-1]) if base.dim() > 1 else ()
            mats = [_rows_view(w, f"weights[{i}]", "gram_sketch") for i, w in enumerate(weights)]
            rows, cols = mats[0].shape
            om = _rows_view(omega.float(), "omega", "gram_sketch")  # bf16 → fp32 is exact
            out = torch.empty((n_tasks, rows, s), dtype=torch.float32, device=device)
            if rows > 0 and s > 0 and cols > 0:
                ext.sketch(
                    [m.data_ptr() for m in mats], [m.stride(0) for m in mats], rows, cols, dtype_code,
                    om.data_ptr(), om.stride(0), s, out.data_ptr(), omega.dtype == torch.bfloat16,
                    _env_flag("R2M_CUDA_SKETCH_MMA"), index, stream,
                )
            else:
                out.zero_()
            sketch = out.reshape((n_tasks, *lead, s))
    return gram, sketch


def accumulate(
    weights: Weights,
    coeffs: torch.Tensor,
    left: Optional[torch.Tensor],
    right: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The merged layer θ₀ + Σⱼ aⱼ (θⱼ − θ₀) + L Rᵀ in fp32, cast once (CUDA kernels).

    L Rᵀ runs on tensor cores in 3xTF32 (~1e-6 relative, fp32-class; R2M_CUDA_ACCUMULATE_MMA=0 for
    fp32 SIMT FMA) with the combination of the weights in the GEMM's epilogue; without L Rᵀ a
    memory-bound elementwise kernel (16-byte loads and stores, persistent grid) writes the result.

    Args:
        weights: N+1 CUDA tensors of one shape and dtype fp32/bf16/fp16 ((m, n) when left is given).
        coeffs: (N,) coefficients a (a tensor on any device, or a sequence of floats); zero terms
            are skipped, as in the torch contract.
        left: (m, K) or None; right: (n, K) or None (both or neither); fp32 (others are widened).
        out_dtype: float32, bfloat16 or float16 written by the kernel; float64 is the fp32 result
            widened, as in the torch contract.
        out: a tensor of weights[0]'s shape and out_dtype (on any device) the result is copied into,
            or None.

    Returns:
        a tensor of weights[0]'s shape and out_dtype on the weights' device, each element written once
        (`out`, when given).
    """
    if out is not None:
        ops_torch.check_destination(out, tuple(weights[0].shape), out_dtype)
        return out.copy_(accumulate(weights, coeffs, left, right, out_dtype))
    ext = _require_extension("accumulate")
    _check_weights(weights, "accumulate")
    n_tasks = len(weights) - 1
    if isinstance(coeffs, torch.Tensor):
        if coeffs.dim() != 1 or coeffs.numel() != n_tasks:
            raise ValueError(f"accumulate: coeffs must have shape ({n_tasks},), got {tuple(coeffs.shape)}")
        coeff_list = [float(a) for a in coeffs.tolist()]
    else:
        coeff_list = [float(a) for a in coeffs]
        if len(coeff_list) != n_tasks:
            raise ValueError(f"accumulate: coeffs needs {n_tasks} values, got {len(coeff_list)}")
    if (left is None) != (right is None):
        raise ValueError("accumulate: left and right must be given together (or both None)")
    named = [(f"weights[{i}]", w) for i, w in enumerate(weights)]
    shape = tuple(weights[0].shape)
    k = 0
    if left is not None:
        _fp32_matrix(left, "left", "accumulate")
        _fp32_matrix(right, "right", "accumulate")
        if len(shape) != 2:
            raise ValueError(f"accumulate: left/right need 2-D weights, got weights[0] of shape {shape}")
        if left.shape[0] != shape[0] or right.shape[0] != shape[1] or left.shape[1] != right.shape[1]:
            raise ValueError(
                f"accumulate: left {tuple(left.shape)} and right {tuple(right.shape)} do not fit weights "
                f"of shape {shape}: need left (m, K) and right (n, K)"
            )
        k = left.shape[1]
        named += [("left", left), ("right", right)]
    device = _check_device(named, "accumulate")
    terms = [(a, j) for j, a in enumerate(coeff_list, start=1) if a != 0.0]  # (coefficient, index in weights)
    why = None
    if weights[0].dtype not in _DTYPE_CODES:
        why = f"weights of dtype {weights[0].dtype} (the kernels read float32, bfloat16, float16)"
    elif not out_dtype.is_floating_point:
        why = f"output dtype {out_dtype} (the kernels write floating dtypes)"
    elif len(terms) > _MAX_TASKS:
        why = f"{len(terms)} non-zero terms (the kernels take at most {_MAX_TASKS})"
    if why is not None:
        _fallback("accumulate", why)
        coeffs64 = torch.tensor(coeff_list, dtype=torch.float64)
        return ops_torch.accumulate(weights, coeffs64, left, right, out_dtype)
    # The contract computes in fp32 and casts once: a wider output (fp64) is the fp32 result widened.
    kernel_dtype = out_dtype if out_dtype in _DTYPE_CODES else torch.float32

    used = [0] + [j for _, j in terms]  # the weights the kernels read, by their index in `weights`
    out = torch.empty(shape, dtype=kernel_dtype, device=device)
    if out.numel() == 0:
        return out.to(out_dtype)
    index = _device_index(device)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        if k > 0:
            mats = [_rows_view(weights[j], f"weights[{j}]", "accumulate") for j in used]
            lm = _rows_view(left.float(), "left", "accumulate")
            rm = _rows_view(right.float(), "right", "accumulate")
            rows, cols = mats[0].shape
            ext.accumulate(
                [m.data_ptr() for m in mats], [m.stride(0) for m in mats], [a for a, _ in terms], rows, cols,
                _DTYPE_CODES[weights[0].dtype], lm.data_ptr(), lm.stride(0), rm.data_ptr(), rm.stride(0), k,
                out.data_ptr(), _DTYPE_CODES[kernel_dtype], 1, _env_flag("R2M_CUDA_ACCUMULATE_MMA"), index, stream,
            )
        else:
            mats = _flat_view([weights[j] for j in used]) or [
                _rows_view(weights[j], f"weights[{j}]", "accumulate") for j in used
            ]
            rows, cols = mats[0].shape
            grid = _persistent_grid(device, rows * math.ceil(cols / (16 // weights[0].element_size())))
            ext.accumulate(
                [m.data_ptr() for m in mats], [m.stride(0) for m in mats], [a for a, _ in terms], rows, cols,
                _DTYPE_CODES[weights[0].dtype], 0, 0, 0, 0, 0, out.data_ptr(), _DTYPE_CODES[kernel_dtype], grid,
                False, index, stream,
            )
    return out if kernel_dtype == out_dtype else out.to(out_dtype)


def describe() -> str:
    """A few lines on the extension: built for which architectures, usable here or why not."""
    lines = []
    if _ext is None:
        lines.append(f"r2m_fast._cuda: not importable: {type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}")
        lines.append(f"hint: {FIX_HINT}")
    else:
        rt = _ext.runtime_version()
        lines.append(
            f"r2m_fast._cuda: imported from {_ext.__file__}; built for {_ext.COMPILED_ARCHS}; "
            f"CUDA runtime {rt // 1000}.{rt % 1000 // 10} (static), driver {_ext.driver_version()}"
        )
        reason = _device_reason()
        lines.append("cuda backend: usable" if reason is None else f"cuda backend: unavailable: {reason}")
        lines.append("residual_matmul, orthonormalize: not CUDA kernels; served by triton, else torch "
                     "(r2m_fast.backends.DELEGATES)")
    return "\n".join(lines)


def _bench(quick: bool = False) -> None:  # pragma: no cover - needs a GPU
    """Times the CUDA ops beside ops_torch on one GPU (CUDA events, median of a few runs) and prints
    ms, GB/s of the weights read and written, and TFLOP/s of the products."""
    import statistics

    device = torch.device("cuda")

    def timed(fn, reps: int = 5) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        return statistics.median(times)

    shapes = [(768, 3072, 8, 86)] if quick else [(768, 3072, 8, 86), (4096, 4096, 4, 419), (4096, 11008, 2, 419)]
    print(f"{'op':28s} {'shape':>16s} {'N':>2s} {'impl':>6s} {'ms':>9s} {'GB/s':>8s} {'TFLOP/s':>8s}")
    for m, n, tasks, s in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        base = torch.randn(m, n, device=device, generator=g).bfloat16()
        weights = [base] + [(base.float() + 1e-3 * torch.randn(m, n, device=device, generator=g)).bfloat16()
                            for _ in range(tasks)]
        read = (tasks + 1) * m * n * 2
        omega16 = torch.randn(n, s, device=device, generator=g).bfloat16()
        omega32 = omega16.float()
        coeffs = torch.full((tasks,), 1.0 / tasks)
        k = tasks * (s - 10)
        left = torch.randn(m, k, device=device, generator=g) * 1e-3
        right = torch.randn(n, k, device=device, generator=g)
        cases = [
            ("gram", lambda o: o.gram_sketch(weights, None), read, 0.0),
            ("gram+sketch (bf16 omega)", lambda o: o.gram_sketch(weights, omega16), read, 2.0 * tasks * m * n * s),
            ("gram+sketch (fp32 omega)", lambda o: o.gram_sketch(weights, omega32), read, 2.0 * tasks * m * n * s),
            ("accumulate (no LR)", lambda o: o.accumulate(weights, coeffs, None, None, torch.bfloat16),
             read + m * n * 2, 0.0),
            (f"accumulate (K={k})", lambda o: o.accumulate(weights, coeffs, left, right, torch.bfloat16),
             read + m * n * 2, 2.0 * m * n * k),
        ]
        for name, fn, nbytes, flops in cases:
            for impl, mod in (("cuda", _this_module()), ("torch", ops_torch)):
                ms = timed(lambda: fn(mod))
                print(f"{name:28s} {f'{m}x{n}':>16s} {tasks:>2d} {impl:>6s} {ms:9.3f} "
                      f"{nbytes / ms / 1e6:8.1f} {flops / ms / 1e9:8.1f}")
        del weights, left, right
        torch.cuda.empty_cache()


def _this_module() -> ModuleType:
    import sys

    return sys.modules[__name__]


if __name__ == "__main__":
    import sys

    print(describe())
    if "--bench" in sys.argv[1:]:
        if unavailable_reason() is not None:
            raise SystemExit(f"--bench needs the cuda backend: {unavailable_reason()}")
        _bench(quick="--quick" in sys.argv[1:])
    raise SystemExit(0 if _ext is not None else 1)
