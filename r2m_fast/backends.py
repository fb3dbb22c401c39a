"""Backend registry: which implementation of the four layer operations runs a merge.

A backend is a module exposing ``gram_sketch``, ``residual_matmul``, ``orthonormalize`` and
``accumulate`` with the signatures of :mod:`r2m_fast.ops_torch`. Choice order: the ``backend``
argument, then the ``R2M_BACKEND`` environment variable, then automatic by device. A backend asked
for by name that cannot run raises :class:`BackendUnavailable` saying why; an automatic choice falls
back and logs the reason once.

Automatic on CUDA tensors routes each operation to the backend the GPU suite measured fastest for it
(``_AUTO_ROUTES``, from benchmarks/results/gpu_h200_2026-11-27/), skipping those that cannot run; on
CPU it is torch (triton under ``TRITON_INTERPRET=1``, for testing).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional, Sequence, Union

import torch

logger = logging.getLogger("r2m_fast")

BACKEND_ENV = "R2M_BACKEND"


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

# auto on CUDA tensors, per operation: the backends to try, in order. residual_matmul is split by
# its `transpose` flag (F·P and Fᵀ·Q are different kernels). The order follows the op timings of the
# GPU suite on an H200, led by the 4096×4096 layer (fp32 and bf16 weights, N = 3 and 8), where
# kernel time rather than launch overhead sets a merge's time; p50 ms there:
#   gram_sketch        cuda 1.24–2.57  torch 1.83–3.37  triton 1.75–5.16
#   F·P                triton 0.63–1.71 (cuda delegates to it)  torch 1.08–2.88
#   Fᵀ·Q               torch 1.60–4.16  triton 5.31–13.5
#   orthonormalize     torch 4.2–7.7    triton 5.2–10.6 (fastest at every shape measured)
#   accumulate         torch 1.18–3.46  cuda 1.42–3.07  triton 4.39–11.4 (its L Rᵀ GEMM)
# accumulate is a tie at 4096×4096 (torch ahead by up to 20 % at N = 3, cuda by 13 % at bf16 N = 8);
# cuda goes first because at the ViT-L shapes it is up to 1.6× faster at N = 8 and it writes the
# output once, where torch holds three fp32 copies of the layer.
_AUTO_ROUTES: dict[str, tuple[str, ...]] = {
    "gram_sketch": ("cuda", "triton", "torch"),
    "residual_matmul": ("triton", "torch"),
    "residual_matmul_T": ("torch",),
    "orthonormalize": ("torch",),
    "accumulate": ("cuda", "torch"),
}
_logged_fallbacks: set[str] = set()


class RoutedOps:
    """The layer operations, each taken from the backend module routed to it."""

    def __init__(self, modules: dict[str, ModuleType]):
        self.modules = modules

    def gram_sketch(
        self, weights: Sequence[torch.Tensor], omega: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.modules["gram_sketch"].gram_sketch(weights, omega)

    def residual_matmul(
        self, weights: Sequence[torch.Tensor], core_coeffs: torch.Tensor, rhs: torch.Tensor, transpose: bool
    ) -> torch.Tensor:
        key = "residual_matmul_T" if transpose else "residual_matmul"
        return self.modules[key].residual_matmul(weights, core_coeffs, rhs, transpose)

    def orthonormalize(self, y: torch.Tensor, steps: int = 3) -> torch.Tensor:
        return self.modules["orthonormalize"].orthonormalize(y, steps)

    def accumulate(
        self, weights: Sequence[torch.Tensor], coeffs: torch.Tensor, left: Optional[torch.Tensor],
        right: Optional[torch.Tensor], out_dtype: torch.dtype,
    ) -> torch.Tensor:
        return self.modules["accumulate"].accumulate(weights, coeffs, left, right, out_dtype)


@dataclass(frozen=True)
class RoutedBackend:
    """Several backends in one merge: `routes` maps each _AUTO_ROUTES key to a backend name."""

    routes: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return "auto(" + ", ".join(f"{op}={backend}" for op, backend in self.routes) + ")"

    def ops(self) -> RoutedOps:
        return RoutedOps({op: BACKENDS[backend].ops() for op, backend in self.routes})


def _first_available(order: tuple[str, ...], device: torch.device) -> str:
    for candidate in order:
        reason = BACKENDS[candidate].unavailable_reason(device)
        if reason is None:
            return candidate
        if candidate not in _logged_fallbacks:
            _logged_fallbacks.add(candidate)
            logger.info("r2m_fast: backend %s skipped: %s", candidate, reason)
    return "torch"


def resolve_backend(requested: str, device: torch.device) -> Union[Backend, RoutedBackend]:
    """The backend to run on `device`: `requested` unless "auto", then $R2M_BACKEND, then by device
    (on CUDA tensors one backend per operation, see _AUTO_ROUTES)."""
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
    if device.type != "cuda":
        return BACKENDS[_first_available(("triton", "torch") if _triton_interpreting() else ("torch",), device)]
    routes = tuple((op, _first_available(order, device)) for op, order in _AUTO_ROUTES.items())
    chosen = {backend for _, backend in routes}
    return BACKENDS[chosen.pop()] if len(chosen) == 1 else RoutedBackend(routes)
