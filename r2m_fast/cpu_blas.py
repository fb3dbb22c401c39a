"""The BLAS behind the CPU path's large products (the sketch, the range finder, L·Rᵀ).

torch's CPU wheels multiply with MKL, whose sgemm runs its generic AVX2 code on AMD CPUs: on a
Zen 3 core it reached 35–53 GFLOP/s on R²M's shapes (m×n by n×214, single-threaded) where the
OpenBLAS that numpy ships reached 58–70 (benchmarks/results/cpu_blas_2026-12-01.md). So on AMD
(and Hygon) CPUs, when numpy's BLAS is OpenBLAS, these products go through numpy, on the same
memory (no copies); elsewhere they stay with torch. The choice depends only on the machine, never
on a timing, so one machine always gives the same merge (DESIGN §4); R2M_CPU_BLAS=torch|openblas
overrides it. OpenBLAS follows torch's thread count (one thread per layer worker, see
r2m_fast.pipeline.one_thread_per_worker), set through threadpoolctl. On that path CholeskyQR's
triangular products go through scipy's strmm where scipy brings its own OpenBLAS
(upper_triangular_matmul_), again a fixed rule.
"""

from __future__ import annotations

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


@functools.lru_cache(maxsize=1)
def _scipy_trmm() -> Optional[tuple[Callable, _OpenBLAS]]:
    """scipy's strmm and its OpenBLAS (another copy than numpy's), or None without scipy or where
    its BLAS is not an OpenBLAS whose threads can be set."""
    try:
        from scipy.linalg import blas
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    for lib in ThreadpoolController().select(internal_api="openblas").lib_controllers:
        if "scipy" in lib.filepath and "numpy" not in lib.filepath:
            return blas.strmm, _OpenBLAS(lib)
    return None


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


def upper_triangular_matmul_(a: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """a ← a @ upper for a batch of upper-triangular matrices `upper` (B, s, s) (zero below the
    diagonal) and a (B, m, s) fp32, in place; returns a.

    On the OpenBLAS path, where scipy brings an OpenBLAS, each item is one strmm (the half of a
    GEMM's flops the zero triangle does not need, in place: 1.5–1.6× faster than the GEMM at the
    range finder's shapes, s = 214, benchmarks/results/cpu_blas_trmm_2026-12-01.md); elsewhere a
    matmul into a's memory."""
    trmm = _scipy_trmm() if takes(a, upper) and a.dtype == torch.float32 else None
    items = a.numpy() if trmm is not None else None
    if trmm is None or any(not (x.flags.c_contiguous or x.flags.f_contiguous) for x in items):
        return a.copy_(matmul(a, upper))
    import numpy

    strmm, library = trmm
    library.follow_torch_threads()
    for item, factor in zip(items, _blas_operand(upper)):
        if item.flags.f_contiguous:  # column-major: B ← B·U (side right)
            done = strmm(1.0, factor, item, side=1, lower=0, overwrite_b=1)
        else:  # row-major: its transpose is column-major, Bᵀ ← Uᵀ·Bᵀ (side left, U transposed)
            done = strmm(1.0, factor, item.T, side=0, lower=0, trans_a=1, overwrite_b=1)
            done = done.T
        if not numpy.shares_memory(done, item):  # scipy had to copy (it does not for these layouts)
            item[...] = done
    return a
