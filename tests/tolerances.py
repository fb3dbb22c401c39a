"""Every numeric tolerance of the test suite, in one place (STYLE §7.8).

Pairs are (atol, rtol). Per-dtype pairs go through helpers.assert_close_verbose, which scales atol
by sqrt(reduction length) for Grams, sketches and products. Each named bound says what it bounds and
why the number is what it is; tighten one here and every test that relies on it follows.
"""

from __future__ import annotations

import torch

# --- Per-dtype: a result computed in fp32 from inputs of that dtype -----------------------------
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}

# --- Whole merges against the float64 reference (test_engine.py, test_backends.py) --------------
# Delta-relative error of the randomized merge against the exact one on spectra without a gap at r
# (measured ≤ 3e-3 fp32/fp16 and ≤ 7e-2 bf16, where 1e-3-sized task vectors are mostly rounding).
NO_GAP_TOL = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 0.15}
# Delta-relative bound on a spectrum with a gap at r: fp32 accumulation rounds θ* at ~6e-8·‖θ‖,
# i.e. ~6e-5 of a 1e-3-sized update; bf16 subspace-finding products tilt the found subspace by
# ~1e-4 more. Both are far inside DESIGN §4's 1e-4 of the weights.
GAPPED_DELTA_TOL = {"fp32": 2e-4, "bf16": 1e-3}
# Relative error of the merged weights themselves on a gapped spectrum (DESIGN §4: 1e-4; fp32 output).
GAPPED_WEIGHTS_RTOL = 1e-6
# core_norm, eta and residual norms of the torch backend against the reference (fp64 Grams).
REPORT_RTOL = 1e-5
# The same numbers from the triton/cuda backends (fp32 Grams partial sums, 3xTF32 products).
BACKEND_REPORT_RTOL = 1e-4
# DESIGN §4's contract per truncated residual: ‖f − f̃_fast‖_F ≤ this × ‖f − f̃_opt‖_F.
TRUNCATION_ERROR_RATIO = 1.05
# One fp32 product (inner dimension ≤ 70) of either CPU BLAS against fp64, relative to its largest entry.
MATMUL_FP32_RTOL = 1e-5
# The torch backend's ops (fp32 arithmetic, rounded to the output dtype) against fp64 formulas,
# relative to the largest entry; the expected value is rounded to the output dtype first.
OPS_TORCH_RTOL = 1e-5
# task_gram (fp32 blocks of 32768 columns, summed in fp64) against the fp64 Gram.
TASK_GRAM_RTOL = 1e-6
# The factorization's kept σ² against ‖L Rᵀ‖_F² recomputed in fp64.
KEPT_SQ_RTOL = 1e-4
# The specialists given in reverse order (fp32 range finder): sums in another order only.
ORDER_INVARIANCE_FP32 = (1e-9, 1e-6)
# ... with bf16 range-finder products (delta-relative): each residual rounds differently.
ORDER_INVARIANCE_BF16_DELTA = 2e-3
# Identical specialists merge to their common update: θ* = θ₀ + τ up to fp32 rounding of θ₀ + τ
# and of the core coefficients (w = 1/N·1 summed N times).
IDENTICAL_SPECIALISTS = (1e-6, 1e-5)
# Their residual norms: rounding noise, zeroed below NEGLIGIBLE_RESIDUAL_RTOL (absolute, on the report).
IDENTICAL_RESIDUAL_NORM_ABS = 1e-9
# k_real ≥ N with α = 0 gives the mean, in fp64 outputs (fp64 weights): fp32 accumulation rounding.
MEAN_FP64_OUT = (1e-9, 1e-6)
# The head averaged (fp32 weights and output).
MEAN_FP32 = (1e-7, 1e-6)
# Triton against torch on a whole merge (fp32 range finder), delta-relative.
TRITON_MERGE_DELTA = 1e-4

# --- orthonormalize (test_engine.py, test_triton_kernels.py, test_degenerate.py) ----------------
# ‖QᵀQ − I‖_max of a CholeskyQR basis of a cond ~1e4 sketch in fp32, by number of steps (two steps
# leave an intermediate basis only near-orthonormal: its 1e-6 shift biases squared norms).
ORTHONORMAL_FP32_STEPS = {2: 1e-4, 3: 1e-5}
# ... on a square (m = s) cond ~1e4 sketch, where two steps are worse.
ORTHONORMAL_FP32_STEPS_SQUARE = {2: 1e-2, 3: 1e-5}
# ‖QᵀQ − I‖_max for a well-conditioned sketch (3 steps), and the most a column's norm may exceed 1.
ORTHONORMAL_FP32 = 1e-5
# ‖y − QQᵀy‖ / ‖y‖: Q spans a full-rank y to fp32 rounding ...
SPAN_FULL_RANK_FP32 = 1e-5
# ... and a rank-deficient one up to the shifted Cholesky's ~sqrt(1e-6) leftover per direction.
SPAN_RANK_DEFICIENT_FP32 = 1e-4
# The basis of y·2⁻⁴⁵ against that of y: the power-of-two scaling is exact, so only the rounding
# of the fp32 Gram may differ.
SCALE_INVARIANCE_FP32 = 1e-5
# Triton's Q against torch's: the interpreter computes fp32 exactly; Q R⁻¹ runs in 3xTF32 on GPUs
# (~2⁻²¹ per product against fp32's 2⁻²⁴). (atol = rtol, by device type.)
TSQR_VS_TORCH = {"cpu": 2e-5, "cuda": 1e-4}

# --- accumulate (test_triton_kernels.py, test_cuda_ext.py) --------------------------------------
# Plain combinations (no L Rᵀ) against the torch op: both fp32 with the same operation order.
ACCUMULATE_COMBINATION = (1e-6, 1e-6)
# Merged fp32 weights with an L Rᵀ term against the fp32 torch op, relative Frobenius (3xTF32).
ACCUMULATE_LOW_RANK_FP32 = 1e-6
# L Rᵀ alone against fp64, relative Frobenius: 3xTF32 is ~1e-6; plain TF32 would be ~1e-3.
LRT_RELATIVE_FP32 = 1e-5
# Results computed on another CUDA stream (bf16 weights): Grams and sketches, (atol, rtol); the
# sketch's atol is relative to its largest entry.
STREAM_GRAM = (0.0, 1e-4)
STREAM_SKETCH = (1e-3, 1e-3)

# --- Reference (test_reference.py): fp64 identities -----------------------------------------------
REFERENCE_FP64 = (1e-15, 1e-9)
# The reference against the released script rewritten literally.
RELEASED_SCRIPT_FP64 = (1e-14, 1e-10)
# Scaling every τ by c: relative scales the update by c, kit by c and c² (more fp64 operations).
SCALE_EQUIVARIANCE_FP64 = (1e-14, 1e-8)
# Singular values above this fraction of the largest count towards an fp64 matrix's rank.
RANK_RTOL_FP64 = 1e-12

# --- Incremental merges (test_incremental.py) ----------------------------------------------------
# Remove: ‖got − want‖ ≤ rtol × ‖want − θ₀‖ + atol per tensor (Gram rounding ~1e-16 relative moves w,
# the merged update moves by fp32 rounding of the output, ~1e-7 relative).
REMOVE_UPDATE = (1e-12, 1e-5)
# Grams of a state after a remove against a fresh merge's: a GEMM of another shape rounds differently.
STATE_GRAM_RTOL = 1e-6

# --- Baselines (test_baselines.py) ----------------------------------------------------------------
# Baselines compute in fp64 on CPU: against the fp64 definitions only the final cast to fp32 differs.
BASELINE_FP32_CAST = (1e-9, 2e-7)
# TSV-M in fp64 where every triplet is kept: exact up to fp64 SVD rounding.
TSVM_EXACT_FP64 = (1e-12, 1e-10)
# Against mergekit 0.1.5's own merge (it computes in fp32).
MERGEKIT_PARITY = (1e-7, 1e-5)
