"""The merged layer out = θ₀ + Σⱼ aⱼ τⱼ + L Rᵀ, one kernel, each output element written once.

DESIGN §3 item 4. A GEMM over K (L (m, K), R (n, K), K = N·r up to a few thousand) whose epilogue
adds θ₀ and the linear combination of the weight tiles (each τⱼ formed in fp32), then casts to the
output dtype. L Rᵀ runs in 3xTF32: it is a correction ~1e-3 of θ, and plain tf32's ~5e-4 relative
error on it would show at 1e-6 of the merged fp32 weights, above the ~1e-5 budget once summed over
thousands of terms; 3xTF32 is ~fp32 accurate at tensor-core speed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from r2m_fast.kernels.utils import cdiv, check_tensor, coefficient_vector, dot_block, device_guard, layer_weights, same_device


@triton.jit
def _accumulate_kernel(
    out_ptr, stride_om, stride_on,  # (m, n) out_dtype
    base_ptr, stride_wm, stride_wn,  # θ₀; θ₁…θ_N share its dtype and strides
    table_ptr,
    coeff_ptr,  # (N,) fp32 a
    left_ptr, stride_lm, stride_lk,  # (m, K) fp32
    right_ptr, stride_rn, stride_rk,  # (n, K) fp32
    m, n, K, num_tasks,
    HAS_LOW_RANK: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    low_rank = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LOW_RANK:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_ok = ks < K
            lt = tl.load(
                left_ptr + rows[:, None] * stride_lm + ks[None, :] * stride_lk,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            rt = tl.load(  # Rᵀ chunk (BLOCK_K, BLOCK_N), transposed by addressing
                right_ptr + ks[:, None] * stride_rk + cols[None, :] * stride_rn,
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            low_rank = tl.dot(lt, rt, low_rank, input_precision="tf32x3")
    mask = row_ok[:, None] & col_ok[None, :]
    off = rows[:, None] * stride_wm + cols[None, :] * stride_wn
    base = tl.load(base_ptr + off, mask=mask, other=0.0).to(tl.float32)
    out = base
    for j in range(num_tasks):
        a = tl.load(coeff_ptr + j)
        if a != 0.0:  # as ops_torch: a zero coefficient reads nothing (and adds no 0·inf)
            pj = tl.load(table_ptr + j).to(base_ptr.dtype)
            if ALIGNED:
                pj = tl.multiple_of(pj, 16)  # see LayerWeights.aligned
            out += a * (tl.load(pj + off, mask=mask, other=0.0).to(tl.float32) - base)
    out += low_rank
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def accumulate(
    weights: Sequence[torch.Tensor],
    coeffs: torch.Tensor,
    left: Optional[torch.Tensor],
    right: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The merged layer θ₀ + Σⱼ aⱼ (θⱼ − θ₀) + L Rᵀ in fp32, cast once (Triton).

    Args:
        weights: N+1 tensors (m, n), fp32/bf16/fp16 (fp64 read as fp32), θ₀ first, one set of strides.
        coeffs: (N,) a, any float dtype and device (used as fp32).
        left: (m, K) or None; right: (n, K) or None (both or neither); used as fp32.
        out_dtype: floating dtype of the result.
        out: (m, n) of out_dtype on the weights' device to write the result into (any strides), or None.

    Returns:
        (m, n) tensor of out_dtype on the weights' device: `out` when given, else a contiguous new one.
    """
    op = "accumulate"
    layer = layer_weights(weights, op)
    N, m, n = layer.num_tasks, layer.m, layer.n
    device = layer.device
    a = coefficient_vector(coeffs, "coeffs", N, device, op)
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise ValueError(f"r2m_fast.kernels.{op}: out_dtype must be a floating torch.dtype, got {out_dtype!r}")
    if (left is None) != (right is None):
        raise ValueError(f"r2m_fast.kernels.{op}: left and right must both be given or both be None")
    K = 0
    if left is not None:
        check_tensor(left, "left", op, 2)
        check_tensor(right, "right", op, 2)
        same_device(left, device, "left", op)
        same_device(right, device, "right", op)
        if left.shape[0] != m or right.shape[0] != n or left.shape[1] != right.shape[1]:
            raise ValueError(
                f"r2m_fast.kernels.{op}: left must be ({m}, K) and right ({n}, K); "
                f"got {tuple(left.shape)} and {tuple(right.shape)}"
            )
        left, right = left.float(), right.float()
        K = left.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=device)
    elif tuple(out.shape) != (m, n) or out.dtype != out_dtype or out.device != device:
        raise ValueError(
            f"r2m_fast.kernels.{op}: out must be ({m}, {n}) {out_dtype} on {device}; "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if out.numel() == 0:
        return out
    has_low_rank = K > 0
    lr = (left, right) if has_low_rank else (a, a)  # placeholders keep the signature fixed when unused
    block_k = dot_block(K, 32) if has_low_rank else 16
    with device_guard(layer.base):
        _accumulate_kernel[(cdiv(m, 64), cdiv(n, 64))](
            out, *out.stride(),
            layer.base, layer.stride_m, layer.stride_n,
            layer.table, a,
            lr[0], *(left.stride() if has_low_rank else (0, 0)),
            lr[1], *(right.stride() if has_low_rank else (0, 0)),
            m, n, K, N,
            HAS_LOW_RANK=has_low_rank,
            ALIGNED=layer.aligned,
            BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k,
            num_warps=8,  # 4 warps spill registers with the 3xTF32 GEMM (checked in the sm_90 cubin)
        )
    return out
