"""Shared helpers of the Triton launchers: validation, the weight pointer table, block sizes.

A layer's N+1 weights arrive as separate tensors (θ₀ first). Stacking them would copy every model
once more, so the kernels read θ₁…θ_N through a table of their addresses (one int64 per tensor)
and θ₀ through an ordinary pointer argument, whose element type the kernels reuse to cast the
table entries to pointers. All N+1 tensors must therefore share one dtype and one set of strides.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Sequence

import torch

# Element types the kernels read; fp64 weights are read and rounded to fp32 like ops_torch's .float().
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on CPU tensors one program at a time."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_block(size: int, cap: int = 64) -> int:
    """A tl.dot block dimension covering `size`: a power of two in [16, cap] (tl.dot needs ≥ 16)."""
    return max(16, min(cap, next_pow2(size)))


def reduction_splits(programs: int, k: int, device: torch.device, min_chunk: int = 256) -> int:
    """How many programs share one reduction of length k (split-K) so that a grid of `programs`
    output tiles still puts ~2 programs on every SM (a ViT-B layer has only a few dozen row blocks);
    each split keeps ≥ min_chunk of k. 1 off CUDA: interpreter programs run one after another."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(cdiv(2 * sms, max(programs, 1)), k // min_chunk))


def split_length(k: int, splits: int, block: int) -> tuple[int, int]:
    """(length per split rounded up to whole blocks, number of non-empty splits)."""
    per = cdiv(cdiv(k, max(splits, 1)), block) * block
    return per, max(1, cdiv(k, per))


def check_device(t: torch.Tensor, op: str) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter only."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"r2m_fast.kernels.{op}: Triton kernels need CUDA tensors (got device {t.device}); "
        "CPU tensors run only under TRITON_INTERPRET=1 — use backend='torch' on CPU"
    )


def device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def check_tensor(t: object, name: str, op: str, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"r2m_fast.kernels.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"r2m_fast.kernels.{op}: {name} must be a floating tensor, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"r2m_fast.kernels.{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def same_device(t: torch.Tensor, device: torch.device, name: str, op: str) -> None:
    if t.device != device:
        raise ValueError(f"r2m_fast.kernels.{op}: {name} is on {t.device}, the weights on {device}")


@dataclass
class LayerWeights:
    """θ₀ plus the address table of θ₁…θ_N, all (m, n) with strides (stride_m, stride_n)."""

    base: torch.Tensor
    table: torch.Tensor  # (N,) int64 data pointers of θ₁…θ_N
    tensors: list[torch.Tensor]  # keeps the tensors behind `table` alive for the launch
    m: int
    n: int
    stride_m: int
    stride_n: int
    # Every θ₁…θ_N starts on a 16-byte boundary: the kernels may then tell Triton so
    # (tl.multiple_of), which it cannot infer for addresses loaded from the table, and the weight
    # loads vectorize (128-bit, checked in the sm_90 PTX) instead of one element per instruction.
    aligned: bool

    @property
    def num_tasks(self) -> int:
        return len(self.tensors) - 1

    @property
    def device(self) -> torch.device:
        return self.base.device


def layer_weights(weights: Sequence[torch.Tensor], op: str) -> LayerWeights:
    """Validate a layer's [θ₀, θ₁, …, θ_N] and build the pointer table.

    Raises ValueError (TypeError for non-tensors) naming the offending argument. Non-contiguous
    2-D tensors are read in place through their strides; the tensors are copied (to contiguous)
    only when their strides differ from one another, since the kernels take one set of strides.
    """
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
        raise TypeError(f"r2m_fast.kernels.{op}: weights must be a sequence of N+1 tensors (θ₀ first)")
    if len(weights) < 2:
        raise ValueError(
            f"r2m_fast.kernels.{op}: weights must hold θ₀ and at least one specialist, got {len(weights)} tensor(s)"
        )
    tensors = [check_tensor(w, f"weights[{i}]", op, 2) for i, w in enumerate(weights)]
    base = tensors[0]
    check_device(base, op)
    if base.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"r2m_fast.kernels.{op}: weights[0] has dtype {base.dtype}; supported: {WEIGHT_DTYPES}")
    for i, w in enumerate(tensors[1:], start=1):
        if w.shape != base.shape:
            raise ValueError(
                f"r2m_fast.kernels.{op}: weights[{i}] has shape {tuple(w.shape)}, weights[0] {tuple(base.shape)}"
            )
        if w.dtype != base.dtype:
            raise ValueError(f"r2m_fast.kernels.{op}: weights[{i}] has dtype {w.dtype}, weights[0] {base.dtype}")
        same_device(w, base.device, f"weights[{i}]", op)
    if any(w.stride() != base.stride() for w in tensors[1:]):
        tensors = [w.contiguous() for w in tensors]
        base = tensors[0]
    table = to_device_async(torch.tensor([w.data_ptr() for w in tensors[1:]], dtype=torch.int64), base.device)
    m, n = base.shape
    aligned = all(w.data_ptr() % 16 == 0 for w in tensors[1:])
    return LayerWeights(base, table, tensors, m, n, base.stride(0), base.stride(1), aligned)


def coefficient_vector(
    coeffs: object, name: str, num_tasks: int, device: torch.device, op: str
) -> torch.Tensor:
    """A (N,) fp32 vector of per-task coefficients on the weights' device."""
    if not isinstance(coeffs, torch.Tensor):
        raise TypeError(f"r2m_fast.kernels.{op}: {name} must be a torch.Tensor, got {type(coeffs).__name__}")
    if coeffs.shape != (num_tasks,):
        raise ValueError(
            f"r2m_fast.kernels.{op}: {name} must have shape ({num_tasks},) (one per specialist), "
            f"got {tuple(coeffs.shape)}"
        )
    return to_device_async(coeffs.to(dtype=torch.float32).contiguous(), device)


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without blocking the host. A plain host→GPU copy from pageable memory waits
    for every kernel queued on the stream, once per op call: several host syncs per layer, which
    leave the GPU idle between launches. From pinned memory the copy is queued like a kernel (torch's
    pinned allocator keeps the staging block alive until the copy has run)."""
    if t.device == device or device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
