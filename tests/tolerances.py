"""Every numeric tolerance of the test suite, in one place (STYLE §7.8).

Per-dtype (atol, rtol) pairs are used through helpers.assert_close_verbose, which scales atol by
sqrt(reduction length) for Grams, sketches and products. Named bounds say what they bound and why
the number is what it is; change one here and every test that relies on it sees the change.
"""

from __future__ import annotations

import torch

# (atol, rtol) per input dtype for results computed in fp32 from inputs of that dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}

# --- Degenerate merges (tests/test_degenerate.py) ---------------------------------------------
# Identical specialists merge to their common update: θ* = θ₀ + τ up to fp32 rounding of θ₀ + τ
# and of the core coefficients (w = 1/N·1 summed N times); (atol, rtol).
IDENTICAL_SPECIALISTS = (1e-6, 1e-5)
# ‖QᵀQ − I‖_max of a CholeskyQR3 basis in fp32, and the largest column norm above 1 it may leave.
ORTHONORMAL_FP32 = 1e-5
# The basis of y·2⁻⁴⁵ against that of y: the power-of-two scaling is exact, so only the rounding
# of the fp32 Gram (computed at another exponent, but with the same mantissas) may differ.
SCALE_INVARIANCE_FP32 = 1e-5
# ‖y − QQᵀy‖ / ‖y‖ for a rank-deficient y: the shifted Cholesky leaves ~sqrt(1e-6) of a direction.
SPAN_FP32 = 1e-4

# --- Baselines (tests/test_baselines.py) --------------------------------------------------------
# TSV-M in fp64 where every triplet is kept: the merge is exact up to fp64 SVD rounding.
TSVM_EXACT_FP64 = 1e-12
