"""The four per-layer operations of the fast path, written with torch ops.

This module is both the `torch` backend (CPU fast path and CUDA fallback) and the contract the
Triton (`r2m_fast.kernels`) and CUDA (`r2m_fast.cuda_ops`) backends implement: same names, same
arguments, same results up to floating-point rounding. DESIGN.md section 3 describes them.

Every operation takes a layer's ``weights``: a sequence of N+1 tensors of one shape (m, n) and one
floating dtype, ``weights[0]`` the base θ₀ and ``weights[1:]`` the specialists θ₁…θ_N. Task vectors
τⱼ = θⱼ − θ₀ are formed in fp32 *before* any product (DESIGN §4: τ is ~1e-3 of θ, so a product of
raw θ in reduced precision would cancel it away).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

Weights = Sequence[torch.Tensor]


def task_vectors(weights: Weights) -> torch.Tensor:
    """τ as one fp32 tensor of shape (N, m, n)."""
    base = weights[0].float()
    return torch.stack([w.float() - base for w in weights[1:]])


def gram_sketch(
    weights: Weights, omega: Optional[torch.Tensor]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gram matrix of the layer's task vectors and, optionally, their sketches.

    Args:
        weights: N+1 tensors (m, n), fp32/bf16/fp16.
        omega: (n, s) fp32 Gaussian test matrix, or None for the Gram alone.

    Returns:
        gram: (N, N) float64, Gᵢⱼ = ⟨τᵢ, τⱼ⟩ over all m·n elements.
        sketch: (N, m, s) float32, Zⱼ = τⱼ Ω, or None when omega is None.
    """
    tau = task_vectors(weights)
    flat = tau.reshape(tau.shape[0], -1)
    gram = (flat @ flat.T).double()
    sketch = None if omega is None else torch.matmul(tau, omega.float())
    return gram, sketch


def residual_matmul(
    weights: Weights, core_coeffs: torch.Tensor, rhs: torch.Tensor, transpose: bool
) -> torch.Tensor:
    """Products of every residual Fᵢ = τᵢ − Σⱼ wⱼ τⱼ with its own right-hand side.

    The residuals are never stored beyond one layer: τ_core = Σⱼ wⱼ τⱼ is formed once, so the
    combination costs O(N) per element, not O(N²) (DESIGN §3).

    Args:
        weights: N+1 tensors (m, n).
        core_coeffs: (N,) the Real-component coefficients w of this layer.
        rhs: (N, n, s) when transpose is False, (N, m, s) when it is True; fp32.
        transpose: multiply Fᵢᵀ instead of Fᵢ.

    Returns:
        (N, m, s) = Fᵢ rhsᵢ, or (N, n, s) = Fᵢᵀ rhsᵢ when transpose; fp32.
    """
    tau = task_vectors(weights)
    core = torch.einsum("j,jmn->mn", core_coeffs.to(tau), tau)
    residual = tau.sub_(core)
    if transpose:
        residual = residual.transpose(1, 2)
    return torch.bmm(residual, rhs.float())


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal bases of a batch of tall-skinny matrices by shifted CholeskyQR2.

    Householder QR is slow batched on GPUs (pytorch#143281); CholeskyQR needs only a Gram, a tiny
    Cholesky and a triangular solve. The Gram is taken in float64 so that one more pass restores
    orthogonality to fp32 rounding. A shift keeps the Cholesky defined when a sketch is rank
    deficient (a zero or low-rank residual): such columns come out small instead of NaN, and a
    small column in the basis only adds a zero singular value later.

    Args:
        y: (B, m, s) fp32 with s ≤ m.

    Returns:
        (B, m, s) fp32 with orthonormal columns wherever y has full column rank.
    """
    q = y.float()
    for _ in range(2):
        gram = torch.matmul(q.transpose(1, 2).double(), q.double())
        q = q @ _inverse_cholesky_factor(gram).to(q.dtype)
    return q


def _inverse_cholesky_factor(gram: torch.Tensor) -> torch.Tensor:
    """R⁻¹ with Rᵀ R = gram + shift·I, batched, float64."""
    s = gram.shape[-1]
    # The floor keeps R⁻¹ representable in fp32 for an all-zero sketch (R⁻¹·0 = 0, not inf·0 = NaN).
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    # Shift of Fukaya et al. (shifted CholeskyQR) sized for fp32 columns; relative to the trace.
    shift = (1e-7 * scale)[:, None, None] * torch.eye(s, dtype=gram.dtype, device=gram.device)
    r = torch.linalg.cholesky(gram + shift, upper=True)
    eye = torch.eye(s, dtype=gram.dtype, device=gram.device).expand_as(r)
    return torch.linalg.solve_triangular(r, eye, upper=True)


def accumulate(
    weights: Weights,
    coeffs: torch.Tensor,
    left: Optional[torch.Tensor],
    right: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The merged layer: θ₀ + Σⱼ aⱼ τⱼ + L Rᵀ, computed in fp32 and cast once.

    Args:
        weights: N+1 tensors (m, n).
        coeffs: (N,) the coefficients a of the task vectors.
        left: (m, K) fp32 or None; right: (n, K) fp32 or None (both or neither).
        out_dtype: dtype of the result.

    Returns:
        (m, n) tensor of out_dtype on the weights' device.
    """
    base = weights[0].float()
    out = base.clone()
    for a, w in zip(coeffs.tolist(), weights[1:]):
        if a != 0.0:
            out.add_(w.float() - base, alpha=a)
    if left is not None:
        out.addmm_(left.float(), right.float().T)
    return out.to(out_dtype)
