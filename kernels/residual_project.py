"""Products of the layer's residuals with right-hand sides, residuals never written to memory.

DESIGN §3 item 2. Fᵢ = τᵢ − τ_core with τ_core = Σⱼ wⱼ τⱼ. Forming Fᵢ from the N task vectors in
every GEMM prologue would cost O(N) per element per task, O(N²) in all; instead a prologue kernel
writes τ_core once in fp32 (one extra m·n fp32 write and one read per task, which L2 mostly serves
since the task index varies fastest in the grid), and the batched GEMM's A tile is
(θᵢ − θ₀) − τ_core, each difference formed in fp32 first (DESIGN §4), O(1) per element.
Grid: (task, row blocks of BLOCK_P, column blocks of BLOCK_S × splits of the reduction); split-K
partials are summed on the device in a fixed order. Cost: the weights are read about twice per call
(prologue and GEMM) plus the fp32 τ_core; a fused multi-task GEMM would read them once.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from r2m_fast.kernels.utils import (
    cdiv, check_tensor, coefficient_vector, device_guard, dot_block, layer_weights, reduction_splits, same_device,
    split_length,
)


@triton.jit
def _residual_core_kernel(
    core_ptr, stride_cm, stride_cn,  # (m, n) fp32 out: τ_core = Σⱼ wⱼ (θⱼ − θ₀)
    base_ptr, stride_wm, stride_wn,
    table_ptr,
    coeff_ptr,  # (N,) fp32 w
    m, n, num_tasks,
    ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < m)[:, None] & (cols < n)[None, :]
    off = rows[:, None] * stride_wm + cols[None, :] * stride_wn
    base = tl.load(base_ptr + off, mask=mask, other=0.0).to(tl.float32)
    core = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(num_tasks):
        w = tl.load(coeff_ptr + j)
        pj = tl.load(table_ptr + j).to(base_ptr.dtype)
        if ALIGNED:
            pj = tl.multiple_of(pj, 16)  # see LayerWeights.aligned
        core += w * (tl.load(pj + off, mask=mask, other=0.0).to(tl.float32) - base)
    tl.store(core_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, core, mask=mask)


@triton.jit
def _residual_matmul_kernel(
    out_ptr, stride_ok, stride_ot, stride_op, stride_os,  # (splits, N, P, s) fp32 partial products
    base_ptr, stride_wp, stride_wk,  # θ₀ viewed as (P, K): (m, n) or its transpose
    table_ptr,
    core_ptr, stride_cp, stride_ck,  # τ_core viewed as (P, K)
    rhs_ptr, stride_rt, stride_rk, stride_rs,  # (N, K, s), fp32 or bf16
    P, K, s, k_per_split,
    RHS_FP32: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    task = tl.program_id(0)  # fastest: the N programs of one tile share θ₀ and τ_core in L2
    rows = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    s_blocks = tl.cdiv(s, BLOCK_S)
    pid_k = tl.program_id(2) // s_blocks  # split of the reduction (split-K, for occupancy)
    cols_s = (tl.program_id(2) % s_blocks).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    row_ok = rows < P
    s_ok = cols_s < s
    theta_ptr = tl.load(table_ptr + task).to(base_ptr.dtype)
    if ALIGNED:
        theta_ptr = tl.multiple_of(theta_ptr, 16)  # see LayerWeights.aligned
    rhs_ptr += task.to(tl.int64) * stride_rt
    acc = tl.zeros((BLOCK_P, BLOCK_S), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < k_hi
        mask = row_ok[:, None] & k_ok[None, :]
        off = rows[:, None] * stride_wp + ks[None, :] * stride_wk
        base = tl.load(base_ptr + off, mask=mask, other=0.0).to(tl.float32)
        tau = tl.load(theta_ptr + off, mask=mask, other=0.0).to(tl.float32) - base
        core = tl.load(core_ptr + rows[:, None] * stride_cp + ks[None, :] * stride_ck, mask=mask, other=0.0)
        resid = tau - core
        rhs = tl.load(
            rhs_ptr + ks[:, None] * stride_rk + cols_s[None, :] * stride_rs,
            mask=k_ok[:, None] & s_ok[None, :],
            other=0.0,
        )
        if RHS_FP32:
            # An fp32 right-hand side asks for an fp32-accurate product (the engine forms Bᵢ = QᵢᵀFᵢ
            # this way): 3xTF32 on tensor cores.
            acc = tl.dot(resid, rhs, acc, input_precision="tf32x3")
        else:
            # bf16 power iterations: the residual is formed in fp32, then rounded to the operand type.
            acc = tl.dot(resid.to(rhs.dtype), rhs, acc)
    o_off = pid_k.to(tl.int64) * stride_ok + task.to(tl.int64) * stride_ot + rows[:, None] * stride_op + cols_s[None, :] * stride_os
    tl.store(out_ptr + o_off, acc, mask=row_ok[:, None] & s_ok[None, :])


def residual_matmul(
    weights: Sequence[torch.Tensor],
    core_coeffs: torch.Tensor,
    rhs: torch.Tensor,
    transpose: bool,
    *,
    splits: Optional[int] = None,
) -> torch.Tensor:
    """Fᵢ rhsᵢ (or Fᵢᵀ rhsᵢ) for every residual Fᵢ = τᵢ − Σⱼ wⱼ τⱼ of the layer (Triton).

    Args:
        weights: N+1 tensors (m, n), fp32/bf16/fp16 (fp64 read as fp32), θ₀ first, one set of strides.
        core_coeffs: (N,) w, any float dtype and device (used as fp32).
        rhs: (N, n, s) when transpose is False, (N, m, s) when True; fp32 (3xTF32 product, ~fp32
            accurate) or bf16 (bf16 product of the fp32-formed residual); fp16 runs as fp16.
        transpose: multiply Fᵢᵀ instead of Fᵢ.
        splits: programs sharing each output tile's reduction (split-K); default: enough to fill the
            GPU (1 under the interpreter). Partial products are summed in a fixed order (deterministic).

    Returns:
        (N, m, s) fp32, or (N, n, s) when transpose.
    """
    op = "residual_matmul"
    layer = layer_weights(weights, op)
    N, m, n = layer.num_tasks, layer.m, layer.n
    device = layer.device
    w = coefficient_vector(core_coeffs, "core_coeffs", N, device, op)
    check_tensor(rhs, "rhs", op, 3)
    same_device(rhs, device, "rhs", op)
    P, K = (n, m) if transpose else (m, n)
    if rhs.shape[:2] != (N, K):
        want = f"({N}, {K}, s)"
        raise ValueError(
            f"r2m_fast.kernels.{op}: rhs must have shape {want} for transpose={transpose}, got {tuple(rhs.shape)}"
        )
    if rhs.dtype == torch.float64:
        rhs = rhs.float()
    s = rhs.shape[2]
    if N * P * s == 0:
        return torch.zeros((N, P, s), dtype=torch.float32, device=device)
    core = torch.empty((m, n), dtype=torch.float32, device=device)
    ws = (layer.stride_n, layer.stride_m) if transpose else (layer.stride_m, layer.stride_n)
    cs = (core.stride(1), core.stride(0)) if transpose else core.stride()
    block_p, block_k, block_s = 64, 32, dot_block(s, 64 if rhs.dtype == torch.float32 else 128)
    tiles = N * cdiv(P, block_p) * cdiv(s, block_s)
    k_per_split, splits = split_length(K, reduction_splits(tiles, K, device) if splits is None else splits, block_k)
    # With one split the products are written in place; otherwise per-split partials are summed below.
    parts = torch.empty((splits, N, P, s), dtype=torch.float32, device=device)
    with device_guard(layer.base):
        _residual_core_kernel[(cdiv(m, 32), cdiv(n, 64))](
            core, *core.stride(),
            layer.base, layer.stride_m, layer.stride_n,
            layer.table, w,
            m, n, N,
            ALIGNED=layer.aligned,
            BLOCK_M=32, BLOCK_N=64,
            num_warps=4,
        )
        _residual_matmul_kernel[(N, cdiv(P, block_p), cdiv(s, block_s) * splits)](
            parts, *parts.stride(),
            layer.base, *ws,
            layer.table,
            core, *cs,
            rhs, *rhs.stride(),
            P, K, s, k_per_split,
            RHS_FP32=rhs.dtype == torch.float32,
            ALIGNED=layer.aligned,
            BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_S=block_s,
            num_warps=8,  # 4 warps spill registers on the 3xTF32 path (checked in the sm_90 cubin)
        )
    return parts[0] if splits == 1 else parts.sum(0)
