"""The same randomized R²M written naively: each residual materialized and factored by
torch.svd_lowrank (Householder QR, full small SVD), the baseline the fast path must beat."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from r2m_fast import R2MConfig, ops_torch
from r2m_fast.factors import ResidualFactors
from r2m_fast.sources import DictSource
from r2m_fast.engine import (
    MergeState, accumulate_pass, build_plan, residual_norms,
    residual_scales, sketch_width, solve_real_subspace,
)
from r2m_fast.plan import DECOMPOSED


@torch.no_grad()
def naive_merge(
    base: dict, specialists: Sequence[dict], config: R2MConfig, device: Optional[torch.device] = None
) -> dict[str, torch.Tensor]:
    """`device`: where to compute (default: the base tensors'), e.g. CUDA for models in pinned host memory."""
    source = DictSource(base, specialists, device=device)
    N = len(specialists)
    state = MergeState(plan=build_plan(source.specs(), config))
    # Grams only: svd_lowrank draws its own sketch per residual.
    for layer in state.plan:
        if layer.merged:
            weights = [t.reshape(layer.matrix) for t in source.load(layer.name)]
            # On the host, as the engine keeps them (the Real-subspace solve and the norms are host math).
            state.grams[layer.name] = ops_torch.gram_sketch(weights, None)[0].cpu()
    real = solve_real_subspace(state, config, N)
    factors = {}
    for layer in state.plan:
        if layer.kind != DECOMPOSED or layer.rank is None:
            continue
        tensors = [t.reshape(layer.matrix).float() for t in source.load(layer.name)]
        w = real.coeffs[layer.name].float()
        taus = [t - tensors[0] for t in tensors[1:]]
        core = sum(wj * tj for wj, tj in zip(w.tolist(), taus))
        lefts, rights, kept = [], [], []
        for tau in taus:
            U, S, V = torch.svd_lowrank(
                tau - core, q=sketch_width(layer, config.oversample), niter=config.effective_power_iters
            )
            r = layer.rank
            lefts.append(U[:, :r] * S[:r])
            rights.append(V[:, :r])
            kept.append(float((S[:r] ** 2).sum()))
        factors[layer.name] = ResidualFactors(
            torch.stack(lefts), torch.stack(rights), torch.tensor(kept, dtype=torch.float64)
        )
    norms = residual_norms(state, real, factors, N)
    scales = residual_scales(norms, config.alpha * real.core_norm, config.residual_scale)
    out: dict[str, torch.Tensor] = {}
    accumulate_pass(source, state, real, factors, scales, config, ops_torch, out.__setitem__)
    return out
