"""Op registry: which implementation of each layer operation runs a merge.

The layer operations are the five of :class:`LayerOps` (contract and reference: r2m_fast.ops_torch).
Each backend registers the ones it implements in one (op, backend) table, :data:`BACKENDS` (torch:
all five; triton: the four kernels of r2m_fast.kernels; cuda: the two hand-written CUDA kernels of
r2m_fast.cuda_ops). An op a backend does not implement is served by another one, chosen by one rule
everywhere (:func:`select`): a list of candidate backends per op, the first that can run on the
device wins, and each candidate skipped is logged once with its reason. The lists are
:data:`DELEGATES` for a backend named explicitly (cuda: residual_matmul and orthonormalize from
triton, else torch) and ``_AUTO_ROUTES`` for auto on CUDA tensors. ``residual_operator`` (a
layer's residuals formed once for its 2q+1 products) is derived from the chosen ``residual_matmul``
where that backend has none. A :class:`Backend` (what :func:`resolve_backend` returns) names what runs each op (``routes``), and the
merge report carries it (``ops``).

Choice order: the ``backend`` argument, then the ``R2M_BACKEND`` environment variable, then
automatic by device. A backend asked for by name that cannot run raises
:class:`BackendUnavailable` saying why. Automatic on CUDA tensors routes each operation to the
backend the GPU suite measured fastest for it (benchmarks/results/gpu_h200_2026-11-27/); on CPU it
is torch (triton under ``TRITON_INTERPRET=1``, for testing).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch

logger = logging.getLogger("r2m_fast")

BACKEND_ENV = "R2M_BACKEND"
Weights = Sequence[torch.Tensor]


class BackendUnavailable(RuntimeError):
    """A backend was requested by name but cannot run here."""


class LayerOps(Protocol):
    """The per-layer operations a merge runs (shapes, dtypes and math: r2m_fast.ops_torch)."""

    def gram_sketch(
        self, weights: Weights, omega: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]: ...

    def residual_matmul(
        self, weights: Weights, core_coeffs: torch.Tensor, rhs: torch.Tensor, transpose: bool
    ) -> torch.Tensor: ...

    def residual_operator(
        self, weights: Weights, core_coeffs: torch.Tensor
    ) -> Callable[[torch.Tensor, bool], torch.Tensor]: ...

    def orthonormalize(self, y: torch.Tensor, steps: int = 3) -> torch.Tensor: ...

    def accumulate(
        self, weights: Weights, coeffs: torch.Tensor, left: Optional[torch.Tensor],
        right: Optional[torch.Tensor], out_dtype: torch.dtype, out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor: ...


OPS = ("gram_sketch", "residual_matmul", "residual_operator", "orthonormalize", "accumulate")
# What a route decides: each op, with residual_matmul's two products apart (F·P and Fᵀ·Q are
# different kernels, and auto on CUDA runs them on different backends); residual_operator follows
# residual_matmul.
ROUTED = ("gram_sketch", "residual_matmul", "residual_matmul[transpose]", "orthonormalize", "accumulate")


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



def _torch_kernels() -> dict[str, Callable]:
    from r2m_fast import ops_torch

    return {
        "gram_sketch": ops_torch.gram_sketch, "residual_matmul": ops_torch.residual_matmul,
        "residual_operator": ops_torch.residual_operator, "orthonormalize": ops_torch.orthonormalize,
        "accumulate": ops_torch.accumulate,
    }


def _triton_kernels() -> dict[str, Callable]:
    from r2m_fast import kernels

    return {
        "gram_sketch": kernels.gram_sketch, "residual_matmul": kernels.residual_matmul,
        "orthonormalize": kernels.orthonormalize, "accumulate": kernels.accumulate,
    }


def _cuda_kernels() -> dict[str, Callable]:
    from r2m_fast import cuda_ops

    return {"gram_sketch": cuda_ops.gram_sketch, "accumulate": cuda_ops.accumulate}


@dataclass(frozen=True)
class Provider:
    """One backend's registration: the ops it implements itself, and whether it can run on a device.

    `load` imports the implementations (triton and the CUDA extension take seconds to import, and
    may fail), so it runs only once a merge selects the backend; `implements` says which ops it
    registers without importing anything."""

    name: str
    implements: frozenset[str]
    load: Callable[[], dict[str, Callable]]
    # Returns None when the backend can run on `device`, else the reason it cannot.
    unavailable_reason: Callable[[torch.device], Optional[str]]

    def ops(self, device: Optional[torch.device] = None) -> "Ops":
        """The five ops as this backend runs them on `device` (default: CUDA for cuda, else CPU),
        delegated ones included."""
        if device is None:
            device = torch.device("cuda" if self.name == "cuda" else "cpu")
        return select(self.name, device).ops()


# The (op, backend) table: each backend with the ops it registers.
BACKENDS: dict[str, Provider] = {
    "torch": Provider("torch", frozenset(OPS), _torch_kernels, _torch_reason),
    "triton": Provider("triton", frozenset(OPS) - {"residual_operator"}, _triton_kernels, _triton_reason),
    "cuda": Provider("cuda", frozenset({"gram_sketch", "accumulate"}), _cuda_kernels, _cuda_reason),
}

# A backend named explicitly: who serves the ops it does not implement, in order of preference
# (any other backend's missing op: torch, which implements all).
DELEGATES: dict[str, dict[str, tuple[str, ...]]] = {
    "cuda": {"residual_matmul": ("triton", "torch"), "orthonormalize": ("triton", "torch")},
}

# auto on CUDA tensors, per ROUTED entry: the backends to try, in order. The order follows the op
# timings of the GPU suite on an H200, led by the 4096×4096 layer (fp32 and bf16 weights, N = 3
# and 8), where kernel time rather than launch overhead sets a merge's time; p50 ms there:
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
    "residual_matmul[transpose]": ("torch",),
    "orthonormalize": ("torch",),
    "accumulate": ("cuda", "torch"),
}
_logged_fallbacks: set[tuple[str, str]] = set()


@functools.lru_cache(maxsize=None)
def _kernels(backend: str) -> dict[str, Callable]:
    return BACKENDS[backend].load()


def _by_transpose(plain: Callable, transposed: Callable) -> Callable:
    def residual_matmul(weights: Weights, core_coeffs: torch.Tensor, rhs: torch.Tensor, transpose: bool):
        return (transposed if transpose else plain)(weights, core_coeffs, rhs, transpose)

    return residual_matmul


def _derived_operator(residual_matmul: Callable) -> Callable:
    """residual_operator where the backend has none: each product forms the residuals anew."""

    def residual_operator(weights: Weights, core_coeffs: torch.Tensor) -> Callable[[torch.Tensor, bool], torch.Tensor]:
        return functools.partial(residual_matmul, weights, core_coeffs)

    return residual_operator


@dataclass(frozen=True)
class Ops:
    """The five layer operations of one merge, each the implementation its route chose (a LayerOps)."""

    gram_sketch: Callable
    residual_matmul: Callable
    residual_operator: Callable
    orthonormalize: Callable
    accumulate: Callable


@dataclass(frozen=True)
class Backend:
    """What runs a merge: its name ("torch", "cuda", ..., or "auto(entry=backend, ...)" when auto
    mixes backends) and, per ROUTED entry, the backend that runs it."""

    name: str
    routes: tuple[tuple[str, str], ...]

    def ops(self) -> Ops:
        routes = dict(self.routes)
        chosen = {op: _kernels(routes[op])[op] for op in ("gram_sketch", "orthonormalize", "accumulate")}
        plain, transposed = routes["residual_matmul"], routes["residual_matmul[transpose]"]
        if plain == transposed:
            matmul = _kernels(plain)["residual_matmul"]
            operator = _kernels(plain).get("residual_operator") or _derived_operator(matmul)
        else:
            matmul = _by_transpose(_kernels(plain)["residual_matmul"], _kernels(transposed)["residual_matmul"])
            operator = _derived_operator(matmul)
        return Ops(residual_matmul=matmul, residual_operator=operator, **chosen)


def _first_available(order: tuple[str, ...], device: torch.device, entry: str) -> str:
    """The first backend of `order` that runs on `device` (torch when none does); each one skipped
    is logged once per entry, with its reason."""
    for candidate in order:
        reason = BACKENDS[candidate].unavailable_reason(device)
        if reason is None:
            return candidate
        if (candidate, entry) not in _logged_fallbacks:
            _logged_fallbacks.add((candidate, entry))
            logger.info("r2m_fast: backend %s skipped for %s: %s", candidate, entry, reason)
    return "torch"


def select(name: str, device: torch.device) -> Backend:
    """The routes of backend `name` ("auto" or a key of BACKENDS) on `device`: each ROUTED entry to
    the backend itself where it implements the op, else to the first available of its DELEGATES;
    auto: of _AUTO_ROUTES on CUDA tensors, torch on CPU (triton under TRITON_INTERPRET=1)."""
    if name == "auto" and device.type == "cuda":
        routes = tuple((entry, _first_available(_AUTO_ROUTES[entry], device, entry)) for entry in ROUTED)
        used = {backend for _, backend in routes}
        if len(used) == 1:
            return select(used.pop(), device)
        return Backend("auto(" + ", ".join(f"{entry}={backend}" for entry, backend in routes) + ")", routes)
    if name == "auto":
        order = ("triton", "torch") if _triton_interpreting() else ("torch",)
        return select(_first_available(order, device, "every op"), device)
    backend, delegates = BACKENDS[name], DELEGATES.get(name, {})
    routes = []
    for entry in ROUTED:
        op = entry.partition("[")[0]
        routes.append((entry, name if op in backend.implements
                       else _first_available(delegates.get(op, ("torch",)), device, f"{name}'s {op}")))
    return Backend(name, tuple(routes))


def resolve_backend(requested: str, device: torch.device) -> Backend:
    """What runs a merge on `device`: `requested` unless "auto", then $R2M_BACKEND, then by device
    (on CUDA tensors one backend per op, see _AUTO_ROUTES). A backend named explicitly that cannot
    run raises BackendUnavailable saying why."""
    name = requested if requested != "auto" else os.environ.get(BACKEND_ENV, "auto") or "auto"
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(
                f"unknown backend {name!r} (from {'argument' if requested != 'auto' else BACKEND_ENV}); "
                f"choose one of {sorted(BACKENDS)} or 'auto'"
            )
        reason = BACKENDS[name].unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} cannot run: {reason}")
    return select(name, device)
