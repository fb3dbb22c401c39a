"""The BLAS behind the CPU path's large products (the sketch, the range finder, L·Rᵀ).

torch's CPU wheels multiply with MKL, whose sgemm runs its generic AVX2 code on AMD CPUs: on a
Zen 3 core it reached 35–53 GFLOP/s on R²M's shapes (m×n by n×214, single-threaded) where the
OpenBLAS that numpy ships reached 58–70 (benchmarks/results/cpu_blas_2026-12-01.md). So on AMD
(and Hygon) CPUs, when numpy's BLAS is OpenBLAS, these products go through numpy, on the same
memory (no copies); elsewhere they stay with torch. The choice depends only on the machine, never
on a timing, so one machine always gives the same merge (DESIGN §4); R2M_CPU_BLAS=torch|openblas
overrides it. OpenBLAS follows torch's thread count (one thread per layer worker, see
r2m_fast.pipeline.one_thread_per_worker), set through threadpoolctl. On that path CholeskyQR's
triangular products go through the same OpenBLAS's strmm (upper_triangular_matmul_).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from typing import Callable, Optional

import torch

# R2M_CPU_BLAS=torch|openblas forces the BLAS of the CPU products ("auto" or unset: by CPU vendor).
CPU_BLAS_ENV = "R2M_CPU_BLAS"
CPU_BLAS_CHOICES = ("auto", "torch", "openblas")
_VENDORS_WITHOUT_FAST_MKL = ("AuthenticAMD", "HygonGenuine")


def cpu_vendor() -> Optional[str]:
    """The vendor_id of /proc/cpuinfo (None where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


class _OpenBLAS:
    """numpy's OpenBLAS, with its thread count kept equal to torch's."""

    def __init__(self, controller) -> None:
        self._controller = controller
        self._threads = controller.num_threads
        self._lock = threading.Lock()

    def follow_torch_threads(self) -> None:
        wanted = torch.get_num_threads()
        if wanted != self._threads:
            with self._lock:
                if wanted != self._threads:
                    self._controller.set_num_threads(wanted)
                    self._threads = wanted


@functools.lru_cache(maxsize=1)
def _numpy_openblas() -> Optional[_OpenBLAS]:
    try:
        import numpy  # noqa: F401  (threadpoolctl finds only the BLAS libraries already loaded)
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    for lib in ThreadpoolController().select(internal_api="openblas").lib_controllers:
        if "numpy" in lib.filepath:
            return _OpenBLAS(lib)
    return None


# The CBLAS routines numpy's OpenBLAS exports, under one of these names: numpy ≥ 2 wheels ship
# scipy-openblas64 (ILP64, prefixed names), older ones openblas64_ (suffixed). "{}" is the routine.
_CBLAS_NAMES = (("scipy_cblas_{}64_", ctypes.c_int64), ("cblas_{}64_", ctypes.c_int64),
                ("scipy_cblas_{}", ctypes.c_int), ("cblas_{}", ctypes.c_int))
_ROW_MAJOR, _COL_MAJOR, _RIGHT, _UPPER, _LOWER, _NO_TRANS, _TRANS, _NON_UNIT = 101, 102, 142, 121, 122, 111, 112, 131


def _cblas(routine: str, argtypes: Callable[[type], list]) -> Optional[Callable]:
    """cblas_<routine> of numpy's OpenBLAS (already loaded: no import, its threads already followed),
    with the argument types argtypes(integer type) gives; None where it exports none."""
    library = _numpy_openblas()
    if library is None:
        return None
    try:
        handle = ctypes.CDLL(library._controller.filepath)
    except OSError:
        return None
    for pattern, integer in _CBLAS_NAMES:
        function = getattr(handle, pattern.format(routine), None)
        if function is not None:
            function.restype = None
            function.argtypes = argtypes(integer)
            return function
    return None


@functools.lru_cache(maxsize=1)
def _strmm() -> Optional[Callable]:
    """cblas_strmm(order, side, uplo, trans, diag, m, n, alpha, A, lda, B, ldb)."""
    return _cblas("strmm", lambda integer: [ctypes.c_int] * 5 + [integer] * 2 + [
        ctypes.c_float, ctypes.c_void_p, integer, ctypes.c_void_p, integer])


@functools.lru_cache(maxsize=1)
def _sgemm() -> Optional[Callable]:
    """cblas_sgemm(order, transA, transB, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)."""
    return _cblas("sgemm", lambda integer: [ctypes.c_int] * 3 + [integer] * 3 + [
        ctypes.c_float, ctypes.c_void_p, integer, ctypes.c_void_p, integer, ctypes.c_float, ctypes.c_void_p, integer])


@functools.lru_cache(maxsize=1)
def cpu_blas() -> str:
    """'openblas' or 'torch': which BLAS multiplies the CPU path's fp32 products on this machine."""
    choice = os.environ.get(CPU_BLAS_ENV, "auto").strip().lower() or "auto"
    if choice not in CPU_BLAS_CHOICES:
        raise ValueError(f"{CPU_BLAS_ENV}={choice!r}: expected one of {', '.join(CPU_BLAS_CHOICES)}")
    if choice == "torch":
        return "torch"
    if _numpy_openblas() is None:
        if choice == "openblas":
            raise ValueError(f"{CPU_BLAS_ENV}=openblas: numpy's BLAS is not OpenBLAS (or threadpoolctl is missing)")
        return "torch"
    if choice == "openblas" or cpu_vendor() in _VENDORS_WITHOUT_FAST_MKL:
        return "openblas"
    return "torch"


def _blas_operand(t: torch.Tensor):
    # A BLAS reads a matrix with one unit stride (row- or column-major, i.e. transposed views are
    # free); numpy falls back to its own slow loop for anything else, so give it a copy instead.
    if t.stride(-1) != 1 and t.stride(-2) != 1:
        t = t.contiguous()
    return t.numpy()


def takes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether matmul(a, b) goes through numpy's OpenBLAS (CPU fp32/fp64 operands on an OpenBLAS machine)."""
    return (a.device.type == "cpu" and a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64)
            and cpu_blas() == "openblas")


def matmul(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch.matmul(a, b) of 2-D or batched 3-D tensors; on CPU fp32/fp64 through cpu_blas().

    `out` (contiguous, of the product's shape and dtype) receives the product when given. With
    OpenBLAS, ``matmul(x.mT, x)`` of one buffer is a syrk (half the flops, an exactly symmetric result)."""
    if not takes(a, b):
        return torch.matmul(a, b, out=out)
    import numpy

    _numpy_openblas().follow_torch_threads()
    product = numpy.matmul(_blas_operand(a), _blas_operand(b), out=None if out is None else out.numpy())
    return out if out is not None else torch.from_numpy(product)


def _blas_layout(t: torch.Tensor) -> Optional[tuple[int, int]]:
    """(transpose flag, leading dimension) of a 2-D matrix as a row-major CBLAS call reads it, or None
    when it has no unit stride: a column-major matrix is the transpose of a row-major one."""
    rows, cols = t.shape
    if t.stride(1) == 1 and t.stride(0) >= max(cols, 1):
        return _NO_TRANS, t.stride(0)
    if t.stride(0) == 1 and t.stride(1) >= max(rows, 1):
        return _TRANS, t.stride(1)
    return None


def matmul_add_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out += a @ b for 2-D a (m, k), b (k, n) and out (m, n); returns out.

    On the OpenBLAS path one cblas_sgemm with β = 1: the product lands in out's memory, where numpy's
    matmul (no accumulate form) wrote it to a buffer that a second pass then added (pass 3 at 1 B: 3.8 GB
    of products written and read back). Elsewhere torch's addmm_."""
    if not takes(a, b) or a.dtype != torch.float32 or out.dtype != torch.float32:
        return out.addmm_(a, b)
    (m, k), n = a.shape, b.shape[1]
    if b.shape[0] != k or out.shape != (m, n):
        raise ValueError(f"matmul_add_: out {tuple(out.shape)} += a {tuple(a.shape)} @ b {tuple(b.shape)} do not fit")
    sgemm = _sgemm()
    layouts = _blas_layout(a), _blas_layout(b), _blas_layout(out)
    if sgemm is None or None in layouts or layouts[2][0] != _NO_TRANS:
        return out.add_(matmul(a, b))
    if not out.numel() or not k:
        return out
    _numpy_openblas().follow_torch_threads()
    (trans_a, lda), (trans_b, ldb), (_, ldc) = layouts
    sgemm(_ROW_MAJOR, trans_a, trans_b, m, n, k, 1.0, a.data_ptr(), lda, b.data_ptr(), ldb, 1.0, out.data_ptr(), ldc)
    return out


def upper_triangular_matmul_(a: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """a ← a @ upper for a batch of upper-triangular matrices `upper` (B, s, s) (zero below the
    diagonal) and a (B, m, s) fp32, in place; returns a.

    On the OpenBLAS path each item is one cblas_strmm of numpy's OpenBLAS (through ctypes, which lets
    go of the GIL): half a GEMM's flops, in place, 1.5–1.6× faster than the GEMM at the range
    finder's shapes (s = 214, benchmarks/results/cpu_blas_trmm_2026-12-01.md). Elsewhere, or for an
    item with no unit stride, a matmul into a's memory."""
    strmm = _strmm() if takes(a, upper) and a.dtype == torch.float32 else None
    layout = _blas_layout(a[0]) if a.numel() else None  # every item has the first one's strides
    if strmm is None or layout is None:
        return a.copy_(matmul(a, upper))
    _numpy_openblas().follow_torch_threads()
    upper = upper.contiguous()
    m, s = a.shape[1:]
    # Row-major items: B ← B·U. Column-major ones: the same memory read column-major; U's row-major
    # memory is Uᵀ column-major (lower), so op(A) = (Uᵀ)ᵀ.
    item_layout, lead = layout
    order, uplo, trans = (_ROW_MAJOR, _UPPER, _NO_TRANS) if item_layout == _NO_TRANS else (_COL_MAJOR, _LOWER, _TRANS)
    for item, factor in zip(a, upper):
        strmm(order, _RIGHT, uplo, trans, _NON_UNIT, m, s, 1.0, factor.data_ptr(), s, item.data_ptr(), lead)
    return a
