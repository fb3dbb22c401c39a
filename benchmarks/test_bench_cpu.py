"""CPU benchmark at ViT-B/16 shapes: reference vs the fast torch path vs naive torch.svd_lowrank.

    python -m pytest benchmarks/test_bench_cpu.py --benchmark-json=benchmarks/results/cpu.json
    python benchmarks/report_cpu.py benchmarks/results/cpu.json   # writes the ratio table

R2M_BENCH_QUICK=1 shrinks the model to two narrow blocks so CI can run it under --benchmark-disable.
"""

from __future__ import annotations

import os

import pytest
import torch

import r2m_fast
from naive_merge import naive_merge
from r2m_fast import R2MConfig
from r2m_fast.reference import r2m_merge
from synthetic import vit_shapes

QUICK = os.environ.get("R2M_BENCH_QUICK", "0") == "1"
SHAPES = vit_shapes(width=96, depth=2) if QUICK else vit_shapes(width=768, depth=12)
CONFIG = R2MConfig(rank_ratio=0.1, backend="torch")


@pytest.fixture(scope="module", params=[3, 8], ids=lambda n: f"N={n}")
def family(request):
    from synthetic import synthetic_family

    return request.param, synthetic_family(SHAPES, request.param, seed=request.param)


def _delta_error(merged, want, base):
    """‖θ*_fast − θ*_ref‖ / ‖θ*_ref − θ₀‖ over the whole model."""
    err_sq = delta_sq = 0.0
    for name, tensor in merged.items():
        b = base[name].double()
        d = want[name].double() - b
        err_sq += float((tensor.double() - b - d).pow(2).sum())
        delta_sq += float(d.pow(2).sum())
    return (err_sq / delta_sq) ** 0.5


_reference_cache: dict[int, dict] = {}


def _reference(n, models):
    if n not in _reference_cache:
        _reference_cache[n] = r2m_merge(models[0], models[1:], CONFIG).state_dict
    return _reference_cache[n]


def test_reference(benchmark, family):
    n, models = family
    benchmark.group = f"vit_b16-N{n}"
    benchmark.extra_info.update(provider="reference", N=n)
    result = benchmark.pedantic(r2m_merge, args=(models[0], models[1:], CONFIG), rounds=1, iterations=1)
    _reference_cache[n] = result.state_dict


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_fast_torch(benchmark, family, precision):
    """precision "auto" multiplies the range finder in bf16 where the CPU has AMX/AVX512-BF16."""
    n, models = family
    benchmark.group = f"vit_b16-N{n}"
    rounds = 1 if QUICK else 3
    config = CONFIG.replace(range_finder_precision=precision)
    result = benchmark.pedantic(r2m_fast.merge, args=(models[0], models[1:], config), rounds=rounds, iterations=1)
    err = _delta_error(result.state_dict, _reference(n, models), models[0])
    provider = "fast_torch" if precision == "auto" else "fast_torch_fp32"
    benchmark.extra_info.update(provider=provider, N=n, delta_rel_error=err)
    assert err < 0.05  # randomized vs exact truncation without a spectral gap; the 1.05× contract is tested in tests/


def test_naive_svd_lowrank(benchmark, family):
    n, models = family
    benchmark.group = f"vit_b16-N{n}"
    rounds = 1 if QUICK else 3
    merged = benchmark.pedantic(naive_merge, args=(models[0], models[1:], CONFIG), rounds=rounds, iterations=1)
    err = _delta_error(merged, _reference(n, models), models[0])
    benchmark.extra_info.update(provider="naive_svd_lowrank", N=n, delta_rel_error=err)
    assert err < 0.05  # randomized vs exact truncation without a spectral gap; the 1.05× contract is tested in tests/
