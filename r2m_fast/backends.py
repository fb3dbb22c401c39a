"""Backend registry: which implementation of the four layer operations runs a merge.

A backend is a module exposing ``gram_sketch``, ``residual_matmul``, ``orthonormalize`` and
``accumulate`` with the signatures of :mod:`r2m_fast.ops_torch`. Choice order: the ``backend``
argument, then the ``R2M_BACKEND`` environment variable, then automatic by device (triton → torch on CUDA tensors;
torch on CPU, or triton when ``TRITON_INTERPRET=1``). A backend asked for by name that cannot run
raises :class:`BackendUnavailable` saying why; an automatic choice falls back and logs the reason once.

The cuda extension is opt-in (by name or ``R2M_BACKEND=cuda``): ``auto`` follows measurements, and
no GPU run has yet checked and timed it (README, "GPU"); the Triton kernels have run whole merges
on an H100. Put it in ``_AUTO_ORDER`` where the GPU suite shows it correct and faster.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional

import torch

logger = logging.getLogger("r2m_fast")

BACKEND_ENV = "R2M_BACKEND"
OPS = ("gram_sketch", "residual_matmul", "orthonormalize", "accumulate")


class BackendUnavailable(RuntimeError):
    """A backend was requested by name but cannot run here."""


@dataclass(frozen=True)
class Backend:
    name: str
    module: str
    # Returns None when the backend can run on `device`, else the reason it cannot.
    unavailable_reason: Callable[[torch.device], Optional[str]]

    def ops(self) -> ModuleType:
        return importlib.import_module(self.module)


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _torch_reason(device: torch.device) -> Optional[str]:
    return None


def _triton_reason(device: torch.device) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton does not import ({exc}); install the extra: pip install 'r2m_fast[triton]'"
    if importlib.util.find_spec("r2m_fast.kernels") is None:
        # kernels/ becomes r2m_fast.kernels only when the package is installed (setup.py package_dir).
        return "r2m_fast.kernels is not importable: install the package (pip install -e .) rather than using PYTHONPATH"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _triton_interpreting():
        return None
    return (
        f"triton kernels need CUDA tensors (got device {device}); "
        "on CPU they run only under TRITON_INTERPRET=1, for testing"
    )


def _cuda_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the CUDA extension needs CUDA tensors (got device {device})"
    from r2m_fast import cuda_ops

    return cuda_ops.unavailable_reason()


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", "r2m_fast.ops_torch", _torch_reason),
    "triton": Backend("triton", "r2m_fast.kernels", _triton_reason),
    "cuda": Backend("cuda", "r2m_fast.cuda_ops", _cuda_reason),
}

_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("torch",)}
_logged_fallbacks: set[str] = set()


def resolve_backend(requested: str, device: torch.device) -> Backend:
    """The backend to run on `device`: `requested` unless "auto", then $R2M_BACKEND, then by device."""
    name = requested if requested != "auto" else os.environ.get(BACKEND_ENV, "auto") or "auto"
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(
                f"unknown backend {name!r} (from {'argument' if requested != 'auto' else BACKEND_ENV}); "
                f"choose one of {sorted(BACKENDS)} or 'auto'"
            )
        backend = BACKENDS[name]
        reason = backend.unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} cannot run: {reason}")
        return backend
    order = _AUTO_ORDER.get(device.type, ("torch",))
    if device.type == "cpu" and _triton_interpreting():
        order = ("triton", "torch")
    for candidate in order:
        backend = BACKENDS[candidate]
        reason = backend.unavailable_reason(device)
        if reason is None:
            return backend
        if candidate not in _logged_fallbacks:
            _logged_fallbacks.add(candidate)
            logger.info("r2m_fast: backend %s skipped: %s", candidate, reason)
    return BACKENDS["torch"]
