"""Batched small symmetric eigensolver for pass 2's s×s problems (DESIGN §5).

``torch.linalg.eigh`` on CUDA loops cuSOLVER ``syevd`` once per matrix for s > 32 (pytorch#175585):
at ViT-L that was about 25 000 launches and 80 % of an H200 merge. :func:`batched_eigh` solves every
same-size problem of a batch in one call to cuSOLVER's ``cusolverDnXsyevBatched`` (64-bit API,
divide and conquer, any s; cuSOLVER ≥ 11.7.1, CUDA ≥ 12.6 Update 2) through the extension
``r2m_fast._cuda`` (csrc/small_eigh.cpp), which resolves cuSOLVER with dlopen at first use: the
extension builds and imports without cuSOLVER headers or libraries.

Where that path cannot run — CPU tensors, no extension, no loadable cuSOLVER, one too old, a call
that fails — :func:`batched_eigh` returns ``torch.linalg.eigh``'s answer instead: on CPU exactly
that call (bit-for-bit what the engine did before), on CUDA with a warning the first time.
:func:`method` names what a device gets, for the merge report's ``small_eigh`` field:
``"cusolver_batched"`` or ``"torch.linalg.eigh (<reason>)"``.

Environment: ``R2M_SMALL_EIGH=torch`` forces the torch path (A/B runs); ``R2M_CUSOLVER_LIBRARY``
names a libcusolver file to try before the wheel folders and the system search path.

``python -c "from r2m_fast import small_eigh; small_eigh._main()"`` prints what this machine gets and why.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

CUSOLVER = "cusolver_batched"
# cuSOLVER 12.x ships with CUDA 13 (the wheel nvidia-cusolver, folder nvidia/cu13/lib), 11.x with
# CUDA 12 (nvidia-cusolver-cu12, nvidia/cusolver/lib); cusolverDnXsyevBatched exists from 11.7.1.
SONAMES = ("libcusolver.so.12", "libcusolver.so.11")
WHEEL_DIRS = ("nvidia/cu13/lib", "nvidia/cusolver/lib")

_lock = threading.Lock()
_load_reason: Optional[str] = None   # why cuSOLVER's batched solver cannot be used; None when it can
_loaded = False
_runtime_failure: Optional[str] = None  # a call that failed turns the path off for the process
_warned = False


def library_candidates() -> list[str]:
    """Where to look for libcusolver, in order: R2M_CUSOLVER_LIBRARY, every site-packages folder's
    wheel lib folders (the ones torch's CUDA wheels install), then the bare sonames (LD_LIBRARY_PATH,
    the ld.so cache). The extension first takes a cuSOLVER the process has already loaded."""
    out: list[str] = []
    forced = os.environ.get("R2M_CUSOLVER_LIBRARY", "").strip()
    if forced:
        out.append(forced)
    roots = list(dict.fromkeys([*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"],
                                sysconfig.get_paths()["platlib"], *sys.path]))
    for root in roots:
        if not root or not os.path.isdir(root):
            continue
        for sub in WHEEL_DIRS:
            for soname in SONAMES:
                path = Path(root) / sub / soname
                if path.is_file():
                    out.append(str(path))
    out.extend(SONAMES)
    return list(dict.fromkeys(out))


def _extension():
    from r2m_fast import cuda_ops

    return cuda_ops._ext, cuda_ops.extension_import_error()


def _ensure_loaded() -> Optional[str]:
    """Load cuSOLVER's batched solver once per process; None when usable, else the reason."""
    global _load_reason, _loaded
    with _lock:
        if _loaded:
            return _load_reason
        ext, error = _extension()
        if ext is None:
            _load_reason = f"the CUDA extension r2m_fast._cuda does not import ({type(error).__name__}: {error})"
        elif not hasattr(ext, "small_eigh"):
            _load_reason = "the CUDA extension r2m_fast._cuda predates small_eigh (rebuild it)"
        else:
            _load_reason = ext.small_eigh_load(library_candidates()) or None
        _loaded = True
        return _load_reason


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when `device`'s problems go to cusolverDnXsyevBatched; otherwise why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"{device.type} tensors"
    if os.environ.get("R2M_SMALL_EIGH", "").strip().lower() == "torch":
        return "R2M_SMALL_EIGH=torch"
    if _runtime_failure is not None:
        return _runtime_failure
    return _ensure_loaded()


def method(device: torch.device) -> str:
    """What batched_eigh uses on `device`: "cusolver_batched" or "torch.linalg.eigh (<reason>)"."""
    reason = unavailable_reason(device)
    return CUSOLVER if reason is None else f"torch.linalg.eigh ({reason})"


def library() -> str:
    """The loaded cuSOLVER's path and version, or "" when none is loaded."""
    ext, _ = _extension()
    return ext.small_eigh_library() if ext is not None and hasattr(ext, "small_eigh_library") else ""


def _check(mats: torch.Tensor) -> None:
    if not isinstance(mats, torch.Tensor):
        raise TypeError(f"batched_eigh: mats must be a torch.Tensor, got {type(mats).__name__}")
    if mats.dim() != 3 or mats.shape[1] != mats.shape[2]:
        raise ValueError(f"batched_eigh: mats must be (B, s, s), got shape {tuple(mats.shape)}")
    if mats.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"batched_eigh: mats must be float32 or float64, got {mats.dtype}")


def _warn_once(why: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"r2m_fast.small_eigh: {why}; using torch.linalg.eigh (one cuSOLVER call per matrix)",
                      RuntimeWarning, stacklevel=3)


def batched_eigh(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a batch of symmetric matrices.

    The contract of ``torch.linalg.eigh(mats)`` (lower triangle read, eigenvectors in the columns,
    ``mats`` left unchanged), for CUDA tensors in one cusolverDnXsyevBatched call, elsewhere (or
    when that path is unavailable, see :func:`method`) by torch.linalg.eigh itself.

    Args:
        mats: (B, s, s) float32 or float64, symmetric.

    Returns:
        eigenvalues (B, s) and eigenvectors (B, s, s), of mats' dtype and device.
    """
    _check(mats)
    if mats.device.type != "cuda" or mats.numel() == 0:
        return torch.linalg.eigh(mats)
    reason = unavailable_reason(mats.device)
    if reason is not None:
        if reason != "R2M_SMALL_EIGH=torch":  # asked for: no warning
            _warn_once(reason)
        return torch.linalg.eigh(mats)
    return _solve_with_cusolver(mats)


def _solve_with_cusolver(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cusolverDnXsyevBatched's answer, unconverged problems re-solved by torch; a failed call turns
    the path off for the process and answers with torch."""
    try:
        evals, evecs, info = _cusolver(mats)
    except RuntimeError as exc:
        _disable(f"cusolverDnXsyevBatched failed: {exc}")
        return torch.linalg.eigh(mats)
    # One host sync per call, as torch.linalg.eigh's own info check makes; divide and conquer all
    # but never fails on finite input, but a failed problem must not pass as an answer.
    bad = info != 0
    if bool(bad.any()):
        idx = bad.nonzero().flatten()
        warnings.warn(f"r2m_fast.small_eigh: cusolverDnXsyevBatched did not converge on {idx.numel()} of "
                      f"{mats.shape[0]} problems (s = {mats.shape[1]}); those go to torch.linalg.eigh",
                      RuntimeWarning, stacklevel=2)
        evals[idx], evecs[idx] = torch.linalg.eigh(mats[idx])
    return evals, evecs


def _disable(why: str) -> None:
    global _runtime_failure
    _runtime_failure = why
    _warn_once(why)


INT32_MAX = 2**31 - 1


def max_batch(s: int) -> int:
    """Problems one cusolverDnXsyevBatched call takes: cuSOLVER documents n·lda·batch ≤ INT32_MAX."""
    return max(1, INT32_MAX // (s * s))


def _cusolver(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ext, _ = _extension()
    batch, s, _ = mats.shape
    code = ext.DTYPE_FLOAT32 if mats.dtype == torch.float32 else ext.DTYPE_FLOAT64
    with torch.cuda.device_of(mats):
        device = mats.device.index if mats.device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(mats.device).cuda_stream
        a = mats.contiguous().clone()  # overwritten by the eigenvectors
        w = torch.empty(batch, s, dtype=mats.dtype, device=mats.device)
        info = torch.zeros(batch, dtype=torch.int32, device=mats.device)
        step = max_batch(s)
        for lo in range(0, batch, step):
            n = min(step, batch - lo)
            a_lo, w_lo, info_lo = a[lo:lo + n], w[lo:lo + n], info[lo:lo + n]
            dev_bytes, _ = ext.small_eigh_buffer_size(a_lo.data_ptr(), w_lo.data_ptr(), s, n, code, device, stream)
            work = torch.empty(max(int(dev_bytes), 1), dtype=torch.uint8, device=mats.device)
            ext.small_eigh(a_lo.data_ptr(), w_lo.data_ptr(), s, n, code, work.data_ptr(), work.numel(),
                           info_lo.data_ptr(), device, stream)
    # Column j of a column-major matrix is row j of the row-major buffer: transposing gives the
    # eigenvectors in the columns, with the same strides torch.linalg.eigh returns.
    return w, a.transpose(-1, -2), info


def _main() -> int:  # pragma: no cover - a diagnostic (benchmarks/run_gpu.sh)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"small_eigh on {device}: {method(device)}")
    lib = library()
    print(f"cuSOLVER: {lib or 'not loaded'}")
    print("candidates: " + ", ".join(library_candidates()))
    return 0
