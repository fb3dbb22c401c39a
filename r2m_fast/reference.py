"""The oracle: R²M written as DESIGN.md §1's equations, in float64, with exact eigh and SVD.

Slow by design and kept readable side by side with the paper; every fast path is tested against it.
It shares only input checking and the per-layer plan (which parameter is decomposed, its rank) with
the fast engine, never the arithmetic.
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import torch

from r2m_fast.config import R2MConfig
from r2m_fast.plan import (
    COPY, DECOMPOSED, EIGEN_RTOL, HEAD, NEGLIGIBLE_RESIDUAL_RTOL, ModelLike, as_state_dict, build_plan, check_compatible, check_finite,
)
from r2m_fast.result import MergeResult

def block_weight(A: torch.Tensor, block_norm: str) -> float:
    """γ_l of DESIGN §1 for the N × P block A (0 for an unchanged layer)."""
    fro = float(torch.linalg.matrix_norm(A))
    if block_norm == "none":
        return 1.0
    if fro == 0.0:
        return 0.0
    if block_norm == "fro":
        return 1.0 / fro
    return math.sqrt(A.shape[1]) / fro


def r2m_merge(
    base: ModelLike, specialists: Sequence[ModelLike], config: Optional[R2MConfig] = None
) -> MergeResult:
    start = time.perf_counter()
    config = config or R2MConfig()
    theta0 = as_state_dict(base, "base")
    thetas = [as_state_dict(s, f"specialists[{i}]") for i, s in enumerate(specialists)]
    labels = [f"specialists[{i}]" for i in range(len(thetas))]
    specs = lambda sd: {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}  # noqa: E731
    check_compatible(list(theta0), specs(theta0), [specs(t) for t in thetas], labels)
    plan = build_plan(specs(theta0), config)
    N = len(thetas)
    k = min(config.k_real, N)

    # Task vectors τᵢˡ = θᵢˡ − θ₀ˡ, flattened: Aˡ is N × Pˡ.
    A: dict[str, torch.Tensor] = {}
    for layer in plan:
        if layer.kind == COPY:
            continue
        check_finite(layer.name, [theta0[layer.name]] + [t[layer.name] for t in thetas], ["base"] + labels)
        base64 = theta0[layer.name].double().cpu().reshape(-1)
        A[layer.name] = torch.stack([t[layer.name].double().cpu().reshape(-1) - base64 for t in thetas])
    tau_bar = {name: a.mean(0) for name, a in A.items()}

    # Step 1 — Real subspace from the block-weighted Gram C = Σ_l γ_l Aˡ Aˡᵀ over decomposed layers.
    decomposed = [layer.name for layer in plan if layer.kind == DECOMPOSED]
    task_matrix = {
        name: A[name] - tau_bar[name] if config.center else A[name] for name in decomposed
    }
    gamma = {name: block_weight(task_matrix[name], config.block_norm) for name in decomposed}
    C = sum(gamma[name] * task_matrix[name] @ task_matrix[name].T for name in decomposed)
    evals, U = torch.linalg.eigh(C)
    evals, U = evals.flip(0), U.flip(1)  # descending
    lam_max = float(evals[0])
    keep = evals[:k] > EIGEN_RTOL * lam_max if lam_max > 0 else torch.zeros(k, dtype=torch.bool)
    U_k, lam_k = U[:, :k][:, keep], evals[:k][keep]
    a = sum(gamma[name] * task_matrix[name] @ tau_bar[name] for name in decomposed)
    y = (U_k.T @ a) / lam_k  # Λ_k⁻¹ U_kᵀ a

    tau_core: dict[str, torch.Tensor] = {}
    for name in A:
        kind = next(layer.kind for layer in plan if layer.name == name)
        if kind == DECOMPOSED:
            projected = task_matrix[name].T @ (U_k @ y)
            beta = config.real_blend_beta
            tau_core[name] = (1 - beta) * tau_bar[name] + beta * projected
        else:
            tau_core[name] = tau_bar[name]

    # Steps 2–3 — residuals fᵢ = τᵢ − τ_core, truncated to rank r by an exact SVD.
    merged_layers = [layer for layer in plan if layer.merged]
    residuals: dict[str, list[torch.Tensor]] = {}
    for layer in merged_layers:
        f = A[layer.name] - tau_core[layer.name]
        if layer.rank is not None:
            truncated = []
            for f_i in f:
                U_f, S_f, Vh_f = torch.linalg.svd(f_i.reshape(layer.matrix), full_matrices=False)
                r = layer.rank
                truncated.append(((U_f[:, :r] * S_f[:r]) @ Vh_f[:r]).reshape(-1))
            f = torch.stack(truncated)
        residuals[layer.name] = f

    # Step 4 — norm matching over all merged parameters.
    norms = torch.sqrt(sum((residuals[layer.name] ** 2).sum(1) for layer in merged_layers))
    tau_norms = torch.sqrt(sum((A[layer.name] ** 2).sum(1) for layer in merged_layers))
    norms = torch.where(norms > NEGLIGIBLE_RESIDUAL_RTOL * tau_norms, norms, 0.0)
    target = norms.mean() if config.residual_scale == "kit" else torch.tensor(1.0, dtype=torch.float64)
    scale = torch.where(norms > 0, target / torch.where(norms > 0, norms, 1.0), 0.0)

    # Step 5 — θ* = θ₀ + τ_core + η · mean(rescaled residuals), η = α‖τ_core‖.
    core_norm = math.sqrt(sum(float((tau_core[layer.name] ** 2).sum()) for layer in merged_layers))
    eta = config.alpha * core_norm
    out: dict[str, torch.Tensor] = {}
    for layer in plan:
        original = theta0[layer.name]
        if layer.kind == COPY:
            out[layer.name] = original.clone()
            continue
        if layer.kind == HEAD:
            delta = tau_bar[layer.name]
        else:
            tau_res = (scale[:, None] * residuals[layer.name]).mean(0)
            delta = tau_core[layer.name] + eta * tau_res
        merged = original.double().cpu() + delta.reshape(layer.shape)
        out[layer.name] = merged.to(dtype=config.out_dtype or original.dtype, device=original.device)

    report = {
        "method": "r2m",
        "backend": "reference",
        "core_norm": core_norm,
        "eta": eta,
        "residual_norms": norms.tolist(),
        "ranks": {layer.name: layer.rank for layer in plan if layer.kind == DECOMPOSED},
        "eigenvalues": evals.tolist(),
        "k_real": int(U_k.shape[1]),
        "seconds": time.perf_counter() - start,
    }
    return MergeResult(state_dict=out, report=report)
