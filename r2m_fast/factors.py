"""What the N×N solve and pass 2 hand on: the Real subspace and each layer's residual factors.

A module of its own so that the passes (r2m_fast.engine) and the disk store they may keep factors in
(r2m_fast.spill) both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RealSubspace:
    """Result of the N×N solve (DESIGN §1 step 1)."""

    eigenvalues: list[float]
    k: int                                    # directions kept (≤ k_real; fewer when C is degenerate)
    coeffs: dict[str, torch.Tensor]           # per merged layer: w with τ_coreˡ = Σⱼ wⱼ τⱼˡ (fp64, CPU)
    core_norm: float


@dataclass
class ResidualFactors:
    """Rank-r factors of a layer's N truncated residuals: F̃ᵢ = Lᵢ Rᵢᵀ, ‖F̃ᵢ‖² = kept_sq[i]."""

    left: torch.Tensor     # (N, m, r) fp32 = Qᵢ U_r S_r
    right: torch.Tensor    # (N, n, r) fp32 = V_r
    kept_sq: torch.Tensor  # (N,) fp64 on CPU
