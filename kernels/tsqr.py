"""Batched orthonormalization of tall-skinny sketches: shifted CholeskyQR3, as r2m_fast.ops_torch.

DESIGN §3 item 3 (Householder QR is slow batched on GPUs, pytorch#143281). Each of the three steps
is Q ← Q R⁻¹ with Rᵀ R = QᵀQ + δ·I. The two products that touch the (B, m, s) data run in Triton:

* the Gram QᵀQ, tiled over the s×s output and split over m so that even a few batch items fill
  the GPU; each split's fp32 partial (ieee: the Gram's rounding is the orthogonality we get) is
  added in fp64 on the host side;
* Q R⁻¹, a batched GEMM that skips the zero lower triangle of R⁻¹, in 3xTF32 (~fp32 accurate).

The s×s Cholesky and triangular inverse, with the same shift, are ops_torch's own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r2m_fast.kernels.utils import cdiv, check_device, check_tensor, device_guard, dot_block, interpreting
from r2m_fast.ops_torch import inverse_cholesky_factor


@triton.jit
def _tsqr_gram_kernel(
    part_ptr,  # (B, SPLITS, s, s) fp32 partial Grams
    y_ptr, stride_yb, stride_ym, stride_ys,  # (B, m, s) fp32
    m, s, rows_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    tiles_s = tl.cdiv(s, BLOCK_S)
    ci = (tile // tiles_s).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    cj = (tile % tiles_s).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    y_ptr += b * stride_yb
    acc = tl.zeros((BLOCK_S, BLOCK_S), dtype=tl.float32)
    start = split.to(tl.int64) * rows_per_split
    for r0 in range(0, rows_per_split, BLOCK_M):
        rows = start + r0 + tl.arange(0, BLOCK_M)
        r_ok = (rows < m) & (r0 + tl.arange(0, BLOCK_M) < rows_per_split)
        yi_t = tl.load(  # (BLOCK_S, BLOCK_M): columns ci of the row chunk, transposed by addressing
            y_ptr + ci[:, None] * stride_ys + rows[None, :] * stride_ym,
            mask=(ci < s)[:, None] & r_ok[None, :],
            other=0.0,
        )
        yj = tl.load(
            y_ptr + rows[:, None] * stride_ym + cj[None, :] * stride_ys,
            mask=r_ok[:, None] & (cj < s)[None, :],
            other=0.0,
        )
        # ieee: the Gram's accuracy bounds the orthogonality CholeskyQR reaches (tf32 would not do).
        acc = tl.dot(yi_t, yj, acc, input_precision="ieee")
    p_off = ((b * tl.num_programs(2) + split) * s + ci[:, None]) * s + cj[None, :]
    tl.store(part_ptr + p_off, acc, mask=(ci < s)[:, None] & (cj < s)[None, :])


@triton.jit
def _tsqr_apply_kernel(
    q_ptr, stride_qb, stride_qm, stride_qs,  # (B, m, s) fp32 out
    y_ptr, stride_yb, stride_ym, stride_ys,  # (B, m, s) fp32
    rinv_ptr, stride_rb, stride_ri, stride_rj,  # (B, s, s) fp32, upper triangular
    m, s,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_s = tl.program_id(2)
    cols = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    y_ptr += b * stride_yb
    rinv_ptr += b * stride_rb
    acc = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
    # R⁻¹ is upper triangular: output columns < (pid_s+1)·BLOCK_S need only its first rows.
    k_end = tl.minimum(s, (pid_s + 1) * BLOCK_S)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        y = tl.load(
            y_ptr + rows[:, None] * stride_ym + ks[None, :] * stride_ys,
            mask=(rows < m)[:, None] & (ks < s)[None, :],
            other=0.0,
        )
        r = tl.load(
            rinv_ptr + ks[:, None] * stride_ri + cols[None, :] * stride_rj,
            mask=(ks < s)[:, None] & (cols < s)[None, :],
            other=0.0,
        )
        # 3xTF32: ~fp32 accuracy on tensor cores; plain tf32 would cost the basis its orthogonality.
        acc = tl.dot(y, r, acc, input_precision="tf32x3")
    q_off = b * stride_qb + rows[:, None] * stride_qm + cols[None, :] * stride_qs
    tl.store(q_ptr + q_off, acc, mask=(rows < m)[:, None] & (cols < s)[None, :])


def _gram(y: torch.Tensor) -> torch.Tensor:
    """(B, s, s) fp32 YᵀY, partial sums over m-splits added in fp64."""
    B, m, s = y.shape
    block_s = dot_block(s, 32)
    block_m = 64
    # Splits of the m rows: enough programs to fill a GPU (~4 per SM on 132 SMs); one program per
    # tile under the interpreter, where programs run one after another.
    programs = B * cdiv(s, block_s) ** 2
    splits = 1 if interpreting() else max(1, min(cdiv(m, 4 * block_m), cdiv(512, programs)))
    rows_per_split = cdiv(cdiv(m, splits), block_m) * block_m
    splits = cdiv(m, rows_per_split)
    parts = torch.empty((B, splits, s, s), dtype=torch.float32, device=y.device)
    _tsqr_gram_kernel[(B, cdiv(s, block_s) ** 2, splits)](
        parts, y, *y.stride(), m, s, rows_per_split,
        BLOCK_M=block_m, BLOCK_S=block_s, num_warps=4,
    )
    gram = parts.double().sum(1)
    return (0.5 * (gram + gram.transpose(1, 2))).float()


def _apply(y: torch.Tensor, r_inv: torch.Tensor) -> torch.Tensor:
    B, m, s = y.shape
    q = torch.empty_like(y)
    block_m, block_s = 64, dot_block(s, 64)
    _tsqr_apply_kernel[(B, cdiv(m, block_m), cdiv(s, block_s))](
        q, *q.stride(), y, *y.stride(), r_inv, *r_inv.stride(), m, s,
        BLOCK_M=block_m, BLOCK_K=32, BLOCK_S=block_s, num_warps=8,
    )
    return q


def orthonormalize(y: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Orthonormal bases of a batch of tall-skinny matrices by shifted CholeskyQR3 (Triton products).

    Args:
        y: (B, m, s) with s ≤ m, any floating dtype (used as fp32), any strides.
        steps: CholeskyQR steps (see r2m_fast.ops_torch.orthonormalize).

    Returns:
        (B, m, s) fp32 with orthonormal columns wherever y has full column rank; a rank-deficient
        or zero y gives small (or zero) columns, never NaN.
    """
    op = "orthonormalize"
    check_tensor(y, "y", op, 3)
    check_device(y, op)
    q = y.float()
    if q.numel() == 0:
        return q.clone()
    with device_guard(q):
        for _ in range(steps):
            q = _apply(q, inverse_cholesky_factor(_gram(q)).contiguous())
    return q
