"""Pass 1 of the merge: the layer's Gram of task vectors and their sketches, in one read of the weights.

DESIGN §3 item 1. Each program owns BLOCK_M rows of the layer for every task at once: its register
tile stacks the N task-vector row blocks, τⱼ = θⱼ − θ₀ formed in fp32 (N_PAD·BLOCK_M rows ×
BLOCK_K columns), so θ₀ and θ₁…θ_N are read from memory once per column chunk. That one tile feeds

* the sketch: one tl.dot of the stacked tile with the Ω chunk gives every Zⱼ = τⱼ Ω row block;
* the Gram: Gᵢⱼ += Σ τᵢ ⊙ τⱼ elementwise in fp32 (no tensor-core rounding: the Gram decides the
  Real subspace, and tl.dot on fp32 would default to tf32; the pass is memory-bound anyway).

τ is never written to memory and raw θ is never multiplied. Grid: (row blocks, Ω column blocks of
BLOCK_S, splits of the n columns); the splits (split-K) exist for occupancy — a ViT-B layer has only
a few dozen row blocks — and their partial Grams and sketches are summed on the device in a fixed
order. Only the first Ω column block's programs accumulate the Gram.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from r2m_fast.kernels.utils import (
    cdiv, check_tensor, device_guard, dot_block, layer_weights, next_pow2, reduction_splits, same_device, split_length,
)


@triton.jit
def _gram_sketch_kernel(
    gram_ptr,  # (splits, num_row_blocks, N_PAD, N_PAD) fp32 partial Grams, one per program
    sketch_ptr, stride_zk, stride_zt, stride_zm, stride_zs,  # (splits, N, m, s) fp32 partial sketches
    base_ptr, stride_wm, stride_wn,  # θ₀ (m, n); θ₁…θ_N share its dtype and strides
    table_ptr,  # (N,) int64 addresses of θ₁…θ_N
    omega_ptr, stride_on, stride_os,  # Ω (n, s), fp32 or bf16
    m, n, s, num_tasks, cols_per_split,
    HAS_SKETCH: tl.constexpr,
    SKETCH_FP32: tl.constexpr,
    ALIGNED: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_k = tl.program_id(2)  # split of the n columns (split-K, for occupancy)
    k_lo = pid_k * cols_per_split
    k_hi = tl.minimum(n, k_lo + cols_per_split)
    # Row r of the stacked tile is row (r % BLOCK_M) of the block, for task r // BLOCK_M.
    stacked = tl.arange(0, N_PAD * BLOCK_M)
    task = stacked // BLOCK_M
    row = pid_m.to(tl.int64) * BLOCK_M + stacked % BLOCK_M
    row_ok = (task < num_tasks) & (row < m)
    theta_ptr = tl.load(table_ptr + task, mask=task < num_tasks, other=0).to(base_ptr.dtype)
    if ALIGNED:
        theta_ptr = tl.multiple_of(theta_ptr, 16)  # see LayerWeights.aligned
    row_off = row * stride_wm
    # The same rows of one task, for the Gram's second factor.
    local = tl.arange(0, BLOCK_M)
    lrow = pid_m.to(tl.int64) * BLOCK_M + local
    lrow_ok = lrow < m
    lrow_off = lrow * stride_wm
    tasks = tl.arange(0, N_PAD)

    cols_s = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    acc = tl.zeros((N_PAD * BLOCK_M, BLOCK_S), dtype=tl.float32)
    gram = tl.zeros((N_PAD, N_PAD), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        col_ok = cols < k_hi
        mask = row_ok[:, None] & col_ok[None, :]
        off = row_off[:, None] + cols[None, :] * stride_wn
        theta = tl.load(theta_ptr[:, None] + off, mask=mask, other=0.0).to(tl.float32)
        base = tl.load(base_ptr + off, mask=mask, other=0.0).to(tl.float32)
        tau = theta - base  # fp32, before any product (DESIGN §4); 0 on masked elements
        if HAS_SKETCH:
            om = tl.load(
                omega_ptr + cols[:, None] * stride_on + cols_s[None, :] * stride_os,
                mask=col_ok[:, None] & (cols_s < s)[None, :],
                other=0.0,
            )
            if SKETCH_FP32:
                # An fp32 Ω asks for an fp32-accurate sketch: 3xTF32 keeps ~fp32 accuracy on tensor cores.
                acc = tl.dot(tau, om, acc, input_precision="tf32x3")
            else:
                # A bf16 Ω asks for a bf16 product (the range finder's error is unchanged by it, DESIGN
                # §3); τ was formed in fp32 first, so only τ itself is rounded.
                acc = tl.dot(tau.to(om.dtype), om, acc)
        if pid_s == 0:
            # Column j of the Gram: Σ over the chunk of τ_all ⊙ τⱼ, elementwise fp32. τⱼ is reloaded
            # (a cache hit: this program just read it) since a register tile cannot be sliced.
            tau3 = tl.reshape(tau, (N_PAD, BLOCK_M, BLOCK_K))
            lmask = lrow_ok[:, None] & col_ok[None, :]
            loff = lrow_off[:, None] + cols[None, :] * stride_wn
            base_l = tl.load(base_ptr + loff, mask=lmask, other=0.0).to(tl.float32)
            for j in range(num_tasks):
                pj = tl.load(table_ptr + j).to(base_ptr.dtype)
                if ALIGNED:
                    pj = tl.multiple_of(pj, 16)
                tau_j = tl.load(pj + loff, mask=lmask, other=0.0).to(tl.float32) - base_l
                col = tl.sum(tl.sum(tau3 * tau_j[None, :, :], axis=2), axis=1)
                gram += tl.where(tasks[None, :] == j, col[:, None], 0.0)
    if pid_s == 0:
        g_off = (pid_k.to(tl.int64) * tl.num_programs(0) + pid_m) * N_PAD * N_PAD + tasks[:, None] * N_PAD + tasks[None, :]
        tl.store(gram_ptr + g_off, gram)
    if HAS_SKETCH:
        z_off = (pid_k.to(tl.int64) * stride_zk + task[:, None].to(tl.int64) * stride_zt + row[:, None] * stride_zm
                 + cols_s[None, :] * stride_zs)
        tl.store(sketch_ptr + z_off, acc, mask=row_ok[:, None] & (cols_s < s)[None, :])


def gram_sketch(
    weights: Sequence[torch.Tensor], omega: Optional[torch.Tensor], *, splits: Optional[int] = None
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gram matrix of the layer's task vectors and, optionally, their sketches (Triton).

    Args:
        weights: N+1 tensors (m, n) of one dtype (fp32, bf16, fp16; fp64 is read as fp32), θ₀ first,
            any strides (one set for all).
        omega: (n, s) test matrix, fp32 (3xTF32 product, ~fp32 accurate) or bf16 (bf16 product of
            the fp32-formed τ), or None for the Gram alone.
        splits: programs sharing each row block's n columns (split-K); default: enough to fill the
            GPU (1 under the interpreter). Partial results are summed in a fixed order (deterministic).

    Returns:
        gram: (N, N) float64, Gᵢⱼ = ⟨τᵢ, τⱼ⟩ (fp32 sums per BLOCK_M rows, added in fp64).
        sketch: (N, m, s) float32, Zⱼ = τⱼ Ω, or None when omega is None.
    """
    op = "gram_sketch"
    layer = layer_weights(weights, op)
    N, m, n = layer.num_tasks, layer.m, layer.n
    device = layer.device
    n_pad = next_pow2(N)
    # 64 stacked rows: enough for a tensor-core tile (tl.dot needs ≥ 16) and small enough that the
    # grid has many row blocks (one per BLOCK_M rows) to fill the GPU.
    block_m = max(1, 64 // n_pad)
    block_k = dot_block(n, 32)
    s = 0
    if omega is not None:
        check_tensor(omega, "omega", op, 2)
        same_device(omega, device, "omega", op)
        if omega.shape[0] != n:
            raise ValueError(f"r2m_fast.kernels.{op}: omega must have {n} rows (the weights' columns), got {tuple(omega.shape)}")
        if omega.dtype not in (torch.float32, torch.bfloat16):
            omega = omega.float()
        s = omega.shape[1]
    # An fp32 Ω stages twice the bytes per column and its 3xTF32 product three accumulating passes:
    # 64 columns per block for it, 128 for bf16 (fewer re-reads of the weights when s > 64).
    block_s = dot_block(s, 64 if omega.dtype == torch.float32 else 128) if omega is not None else 16
    row_blocks = max(1, cdiv(m, block_m))
    s_blocks = max(1, cdiv(s, block_s)) if omega is not None else 1
    if splits is None:
        splits = reduction_splits(row_blocks * s_blocks, n, device)
    cols_per_split, splits = split_length(n, splits, block_k)
    gram_parts = torch.empty((splits, row_blocks, n_pad, n_pad), dtype=torch.float32, device=device)
    # With one split the sketch is written in place; otherwise per-split partials are summed below.
    parts = torch.empty((splits, N, m, s), dtype=torch.float32, device=device) if omega is not None else None
    grid = (row_blocks, s_blocks, splits)
    # Unused pointer arguments get a live tensor of the right kind so the signature stays fixed.
    z = parts if parts is not None else gram_parts
    om = omega if omega is not None else gram_parts
    with device_guard(layer.base):
        _gram_sketch_kernel[grid](
            gram_parts,
            z, *(parts.stride() if parts is not None else (0, 0, 0, 0)),
            layer.base, layer.stride_m, layer.stride_n,
            layer.table,
            om, *(omega.stride() if omega is not None else (0, 0)),
            m, n, s, N, cols_per_split,
            HAS_SKETCH=omega is not None,
            SKETCH_FP32=omega is None or omega.dtype == torch.float32,
            ALIGNED=layer.aligned,
            N_PAD=n_pad, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_S=block_s,
            num_warps=8,  # 4 warps spill registers at BLOCK_S = 128 (checked in the sm_90 cubin)
        )
    gram = gram_parts.double().sum((0, 1))[:N, :N]
    sketch = None if parts is None else (parts[0] if splits == 1 else parts.sum(0))
    return gram, sketch
