"""Baselines (average, task arithmetic, TIES, TSV-M) against direct float64 implementations, and
TIES and task arithmetic against mergekit 0.1.5's own merge (in the "test" extras, so CI runs it).
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import r2m_fast
from r2m_fast.baselines import METHODS, method_options, tsvm_tau
from r2m_fast.sources import DictSource
from r2m_fast.baselines import run_baseline
from tolerances import BASELINE_FP32_CAST, MERGEKIT_PARITY, TSVM_EXACT_FP64




# --- direct float64 implementations, written from the papers' definitions ----------------------


def taus64(models, name):
    base = models[0][name].double()
    return base, [m[name].double() - base for m in models[1:]]


def average_ref(models, name, **_):
    base, taus = taus64(models, name)
    return base + sum(taus) / len(taus)


def task_arithmetic_ref(models, name, scaling=0.3):
    base, taus = taus64(models, name)
    return base + scaling * sum(taus)


def ties_ref(models, name, density=0.2, scaling=1.0):
    base, taus = taus64(models, name)
    flat = [t.flatten() for t in taus]
    numel = flat[0].numel()
    k = max(1, int(density * numel))
    trimmed = []
    for t in flat:
        keep = torch.zeros(numel, dtype=torch.float64)
        order = sorted(range(numel), key=lambda i: -abs(float(t[i])))[:k]
        keep[order] = 1.0
        trimmed.append(t * keep)
    merged = torch.zeros(numel, dtype=torch.float64)
    for i in range(numel):
        total = sum(float(t[i]) for t in trimmed)
        sign = 1.0 if total >= 0 else -1.0
        agreeing = [float(t[i]) for t in trimmed if float(t[i]) != 0 and math.copysign(1.0, float(t[i])) == sign]
        merged[i] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return base + scaling * merged.reshape(base.shape)


def tsvm_ref(models, name, scaling=1.0):
    """TSV-M as the authors' code writes it: zero-padded U/Σ/V slots, then polar factors by SVD."""
    base, taus = taus64(models, name)
    if base.dim() < 2:
        return base + scaling * sum(taus) / len(taus)
    shape = base.shape
    base, taus = base.reshape(shape[0], -1), [t.reshape(shape[0], -1) for t in taus]  # conv: out × in·kh·kw
    N = len(taus)
    m, n = base.shape
    k = min(m, n)
    r = int(k * (1.0 / N))
    if r == 0:
        return (base + scaling * sum(taus) / len(taus)).reshape(shape)
    sum_u = torch.zeros(m, k, dtype=torch.float64)
    sum_s = torch.zeros(k, dtype=torch.float64)
    sum_v = torch.zeros(k, n, dtype=torch.float64)
    for i, tau in enumerate(taus):
        u, s, v = torch.linalg.svd(tau, full_matrices=False)
        sum_u[:, i * r:(i + 1) * r] = u[:, :r]
        sum_s[i * r:(i + 1) * r] = s[:r]
        sum_v[i * r:(i + 1) * r, :] = v[:r, :]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    merged = torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))
    return (base + scaling * merged).reshape(shape)


REFS = {"average": average_ref, "task_arithmetic": task_arithmetic_ref, "ties": ties_ref, "tsvm": tsvm_ref}
CASES = [
    ("average", {}),
    ("task_arithmetic", {}),
    ("task_arithmetic", {"scaling": 0.7}),
    ("ties", {}),
    ("ties", {"density": 0.5, "scaling": 0.8}),
    ("tsvm", {}),
    ("tsvm", {"scaling": 0.5}),
]


@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{o}" for m, o in CASES])
def test_baseline_matches_float64_reference(family, method, options):
    result = r2m_fast.merge(family[0], family[1:], method=method, **options)
    assert result.report["method"] == method
    for name, base in family[0].items():
        out = result.state_dict[name]
        assert out.dtype == base.dtype and out.shape == base.shape, name
        if not base.dtype.is_floating_point:
            assert torch.equal(out, base)
            continue
        want = REFS[method](family, name, **options)
        # Baselines compute in fp64 on CPU: the only difference left is the final cast to fp32.
        atol, rtol = BASELINE_FP32_CAST
        torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol, msg=f"{method} {name}")


def test_tsvm_orthogonalizes_concatenated_singular_vectors():
    # Orthogonal task subspaces: TSV-M then keeps each task's top triplets unchanged, so the merged
    # τ is the sum of the tasks' rank-r truncations.
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    p, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    taus = torch.stack([
        (q[:, 5 * i:5 * i + 5] * torch.tensor([5.0, 4, 3, 0.2, 0.1], dtype=torch.float64)) @ p[:, 5 * i:5 * i + 5].T
        for i in range(2)
    ])
    merged = tsvm_tau(taus)  # r = 10 // 2 = 5: every triplet kept
    atol, rtol = TSVM_EXACT_FP64
    torch.testing.assert_close(merged, taus.sum(0), rtol=rtol, atol=atol)


def test_tsvm_decomposes_conv_kernels_as_out_by_rest_matrices():
    """A conv kernel (out, in, kh, kw) is the (out, in·kh·kw) matrix, as in R²M, not averaged: with
    each task's update of rank 3 in orthogonal subspaces of that matrix and r = ⌊min(6, 12)/2⌋ = 3,
    TSV-M keeps every triplet, so the merged update is the sum of the updates (the average is half)."""
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    p, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    base = {"conv.weight": torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64)}
    updates = [
        ((q[:, 3 * i:3 * i + 3] * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)) @ p[:, 3 * i:3 * i + 3].T)
        .reshape(6, 3, 2, 2)
        for i in range(2)
    ]
    specialists = [{"conv.weight": base["conv.weight"] + u} for u in updates]
    merged = r2m_fast.merge(base, specialists, method="tsvm").state_dict["conv.weight"]
    expected = base["conv.weight"] + updates[0] + updates[1]
    atol, rtol = TSVM_EXACT_FP64
    torch.testing.assert_close(merged, expected, rtol=rtol, atol=atol)
    want = tsvm_ref([base] + specialists, "conv.weight")
    torch.testing.assert_close(merged, want, rtol=rtol, atol=atol)


def test_ties_sign_election_and_disjoint_mean():
    base = {"w": torch.zeros(4, 1, dtype=torch.float64)}
    a = {"w": torch.tensor([[3.0], [-1.0], [2.0], [0.0]], dtype=torch.float64)}
    b = {"w": torch.tensor([[-1.0], [-1.0], [-5.0], [0.0]], dtype=torch.float64)}
    out = r2m_fast.merge(base, [a, b], method="ties", density=1.0).state_dict["w"]
    # entry 0: mass +2 → keep 3 only; 1: both −1 → −1; 2: mass −3 → keep −5; 3: nothing → 0.
    assert out.flatten().tolist() == [3.0, -1.0, -5.0, 0.0]


def test_head_prefix_and_out_dtype(family):
    config = r2m_fast.R2MConfig(head_prefix="head.", out_dtype="bf16")
    result = r2m_fast.merge(family[0], family[1:], config, method="ties")
    for name in ("head.weight", "head.bias"):
        torch.testing.assert_close(result.state_dict[name].double(), average_ref(family, name).to(torch.bfloat16).double())
    assert result.state_dict["blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    assert result.state_dict["bn.num_batches_tracked"].dtype == torch.int64
    assert result.report["layers"]["head"] == 2


@pytest.mark.parametrize(
    "method,options,match",
    [
        ("ties", {"densty": 0.2}, "densty"),
        ("task_arithmetic", {"density": 0.2}, "density"),
        ("average", {"scaling": 1.0}, "scaling"),
        ("ties", {"density": 0.0}, "density"),
        ("ties", {"density": "a lot"}, "density"),
        ("slerp", {}, "slerp"),
    ],
)
def test_options_are_validated(family, method, options, match):
    with pytest.raises(ValueError, match=match):
        r2m_fast.merge(family[0], family[1:], method=method, **options)


def test_r2m_overrides_still_reach_the_config(family):
    with pytest.raises(ValueError, match="scaling"):
        r2m_fast.merge(family[0], family[1:], scaling=0.3)  # not an R2MConfig field
    result = r2m_fast.merge(family[0], family[1:], method="r2m", rank_ratio=0.2)
    assert result.report["method"] == "r2m"


def test_method_options_defaults():
    assert method_options("task_arithmetic").scaling == 0.3
    assert (method_options("ties").density, method_options("ties").scaling) == (0.2, 1.0)
    assert method_options("tsvm").scaling == 1.0
    assert set(METHODS) == {"r2m", "average", "task_arithmetic", "ties", "tsvm"}


def test_baseline_streams_one_layer_at_a_time(family):
    loads = []

    class CountingSource(DictSource):
        def load(self, name):
            loads.append(name)
            return super().load(name)

    written = []
    run_baseline(CountingSource(family[0], family[1:]), "ties", sink=lambda n, t: written.append(n))
    assert loads == list(family[0]) == written  # one read per tensor, written in order


def test_nan_names_tensor_and_model(family):
    bad = {k: v.clone() for k, v in family[2].items()}
    bad["blocks.0.mlp.fc1.weight"][3, 3] = float("nan")
    with pytest.raises(r2m_fast.MergeInputError, match=r"specialists\[1\].*blocks.0.mlp.fc1.weight.*NaN"):
        r2m_fast.merge(family[0], [family[1], bad, family[3]], method="average")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_equivalent_to_mergekit(tmp_path, family, method):
    """mergekit's own merge of tiny safetensors models equals ours (skips only without the test extras)."""
    api = pytest.importorskip("mergekit.merge_methods.api")
    paths = []
    for i, sd in enumerate(family):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(sd, str(paths[-1]))
    if method == "ties":
        ours, theirs = {"density": 0.2, "scaling": 1.0}, {"weight": 1.0, "density": 0.2, "lambda": 1.0, "normalize": True}
    else:
        ours, theirs = {"scaling": 0.3}, {"weight": 0.3}
    r2m_fast.merge_files(paths[0], paths[1:], tmp_path / "out", method=method, options=ours)
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    loaded = [load_file(str(p)) for p in paths]
    expected = api.merge_state_dicts(loaded, method, parameters=theirs, base=0)
    assert sorted(expected) == sorted(merged)
    for name, want in expected.items():
        atol, rtol = MERGEKIT_PARITY
        torch.testing.assert_close(merged[name], want.to(merged[name].dtype), rtol=rtol, atol=atol, msg=name)
