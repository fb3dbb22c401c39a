"""The oracle against independent derivations of DESIGN.md §1."""

from __future__ import annotations

import math

import pytest
import torch

from models import model_family
from r2m_fast import R2MConfig
from r2m_fast.plan import DECOMPOSED, build_plan
from r2m_fast.reference import r2m_merge
from tolerances import RANK_RTOL_FP64, REFERENCE_FP64, RELEASED_SCRIPT_FP64, SCALE_EQUIVARIANCE_FP64


def deltas(result, base):
    return {k: result.state_dict[k].double() - base[k].double() for k in base if base[k].is_floating_point()}


def stacked_projection(models, config):
    """τ_core by the stacked-SVD form: project τ̄ on the top-k right singular vectors of
    [√γ₁A¹ … √γ_L Aᴸ] (centred when asked), then undo the block weights."""
    base, specs = models[0], models[1:]
    plan = build_plan({k: (tuple(v.shape), v.dtype) for k, v in base.items()}, config)
    names = [layer.name for layer in plan if layer.kind == DECOMPOSED]
    A = {n: torch.stack([s[n].double().reshape(-1) - base[n].double().reshape(-1) for s in specs]) for n in names}
    tau_bar = {n: a.mean(0) for n, a in A.items()}
    M = {n: (a - tau_bar[n]) if config.center else a for n, a in A.items()}
    gamma = {}
    for n, a in M.items():
        fro = float(a.norm())
        gamma[n] = {"none": 1.0, "fro": 1 / fro, "fro_sqrtP": math.sqrt(a.shape[1]) / fro}[config.block_norm]
    S = torch.cat([math.sqrt(gamma[n]) * M[n] for n in names], dim=1)
    _, _, Vh = torch.linalg.svd(S, full_matrices=False)
    V = Vh[: config.k_real].T
    t = torch.cat([math.sqrt(gamma[n]) * tau_bar[n] for n in names])
    p = V @ (V.T @ t)
    out, offset = {}, 0
    for n in names:
        size = tau_bar[n].numel()
        out[n] = (p[offset : offset + size] / math.sqrt(gamma[n])).reshape(base[n].shape)
        offset += size
    return out


@pytest.mark.parametrize("k_real", [1, 2])
@pytest.mark.parametrize("center", [False, True], ids=["uncentred", "centred"])
@pytest.mark.parametrize("block_norm", ["fro_sqrtP", "fro", "none"])
def test_real_component_is_the_stacked_svd_projection(k_real, center, block_norm):
    models = model_family(4, torch.float64, seed=k_real, with_buffer=False)
    config = R2MConfig(k_real=k_real, center=center, block_norm=block_norm, alpha=0.0, out_dtype=torch.float64)
    got = deltas(r2m_merge(models[0], models[1:], config), models[0])
    want = stacked_projection(models, config)
    for name, core in want.items():
        torch.testing.assert_close(got[name], core, rtol=REFERENCE_FP64[1], atol=REFERENCE_FP64[0], msg=name)


def test_full_rank_real_subspace_gives_the_mean_task_vector():
    models = model_family(3, torch.float64, with_buffer=False)
    got = deltas(r2m_merge(models[0], models[1:], R2MConfig(k_real=3, alpha=0.0)), models[0])
    for name, delta in got.items():
        mean = torch.stack([s[name].double() - models[0][name].double() for s in models[1:]]).mean(0)
        torch.testing.assert_close(delta, mean, rtol=REFERENCE_FP64[1], atol=REFERENCE_FP64[0], msg=name)


def test_blend_interpolates_between_projection_and_mean():
    models = model_family(3, torch.float64, with_buffer=False)
    proj = deltas(r2m_merge(models[0], models[1:], R2MConfig(alpha=0.0)), models[0])
    half = deltas(r2m_merge(models[0], models[1:], R2MConfig(alpha=0.0, real_blend_beta=0.5)), models[0])
    name = "blocks.0.attn.qkv.weight"
    mean = torch.stack([s[name] - models[0][name] for s in models[1:]]).mean(0)
    torch.testing.assert_close(half[name], 0.5 * mean + 0.5 * proj[name], rtol=REFERENCE_FP64[1], atol=REFERENCE_FP64[0])


def released_script(models, alpha):
    """The authors' released merge (no truncation, uncentred, mean-norm rescale), rewritten from its
    description in DESIGN.md §1 with block_norm='none', where its τ_core is the projection."""
    base, specs = models[0], models[1:]
    N = len(specs)
    names = list(base)
    tau = [{n: s[n] - base[n] for n in names} for s in specs]
    used = [n for n in names if not any(p in n for p in ("ln", "norm", "bias"))]
    A = {n: torch.stack([t[n].reshape(-1) for t in tau]) for n in used}
    C = sum(A[n] @ A[n].T for n in used)
    evals, U = torch.linalg.eigh(C)
    U1, lam1 = U[:, -1:], evals[-1:]
    y = sum((U1 / lam1.sqrt()).T @ (A[n] @ A[n].mean(0)) for n in used)
    w = (U1 / lam1.sqrt()) @ y
    mean = {n: torch.stack([t[n] for t in tau]).mean(0) for n in names}
    core = {n: (A[n].T @ w).reshape(base[n].shape) if n in used else mean[n] for n in names}
    fakes = [{n: t[n] - core[n] for n in names} for t in tau]
    norms = torch.stack([torch.sqrt(sum((f[n] ** 2).sum() for n in names)) for f in fakes])
    res = {n: sum(f[n] * (norms.mean() / k) for f, k in zip(fakes, norms)) / N for n in names}
    eta = alpha * torch.sqrt(sum((core[n] ** 2).sum() for n in names))
    return {n: base[n] + core[n] + eta * res[n] for n in names}


def test_script_options_reproduce_the_released_script():
    models = model_family(4, torch.float64, with_buffer=False)
    config = R2MConfig(
        block_norm="none", rank_ratio=None, residual_scale="kit", exclude=("ln", "norm", "bias"), alpha=0.6
    )
    got = r2m_merge(models[0], models[1:], config).state_dict
    want = released_script(models, 0.6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=RELEASED_SCRIPT_FP64[1], atol=RELEASED_SCRIPT_FP64[0], msg=name)


@pytest.mark.parametrize("rank_ratio", [0.2, None])
def test_relative_scale_is_scale_invariant_and_kit_is_not(rank_ratio):
    models = model_family(3, torch.float64, with_buffer=False)
    c = 3.0
    scaled = [models[0]] + [{n: models[0][n] + c * (s[n] - models[0][n]) for n in s} for s in models[1:]]
    for scale in ("relative", "kit"):
        config = R2MConfig(rank_ratio=rank_ratio, residual_scale=scale)
        d1 = deltas(r2m_merge(models[0], models[1:], config), models[0])
        dc = deltas(r2m_merge(scaled[0], scaled[1:], config), models[0])
        core = deltas(r2m_merge(models[0], models[1:], config.replace(alpha=0.0)), models[0])
        for name in d1:
            expected = c * d1[name] if scale == "relative" else c * core[name] + c**2 * (d1[name] - core[name])
            atol, rtol = SCALE_EQUIVARIANCE_FP64
            torch.testing.assert_close(dc[name], expected, rtol=rtol, atol=atol, msg=f"{scale} {name}")


def test_truncated_residuals_have_the_requested_rank():
    models = model_family(3, torch.float64, with_buffer=False)
    config = R2MConfig(rank_ratio=0.1, alpha=0.6, k_real=1)
    merged = deltas(r2m_merge(models[0], models[1:], config), models[0])
    core = deltas(r2m_merge(models[0], models[1:], config.replace(alpha=0.0)), models[0])
    # fc1 is 97 × 24: r = ⌊0.1·24⌋ = 2 per residual, 3 residuals → rank ≤ 6.
    residual_sum = (merged["blocks.0.mlp.fc1.weight"] - core["blocks.0.mlp.fc1.weight"])
    s = torch.linalg.svdvals(residual_sum)
    assert int((s > RANK_RTOL_FP64 * s[0]).sum()) == 6
