"""Degenerate merges with subnormals flushed to zero, on every backend's orthonormalize.

AMD's BLAS and GPUs flush subnormal numbers to zero; Intel CPUs by default do not. A shift, floor
or scale that is subnormal therefore works on one machine and breaks on another (DESIGN §4: a
1e-44 Cholesky shift read as 0 crashed every merge of identical specialists on an AMD EPYC). Every
test here runs with flushing on (torch.set_flush_denormal), so such a regression fails on any x86
CPU, the Intel ones CI may run on included.

The degenerate inputs: identical specialists (any N), the same file given twice, specialists equal
to the base (the base back bit for bit), layers with zero residual sketches, rank-deficient layers.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import r2m_fast
from helpers import layer_family
from models import model_family
from r2m_fast import R2MConfig, ops_torch
from r2m_fast.backends import BACKENDS
from r2m_fast.plan import MergeInputError
from r2m_fast.reference import r2m_merge
from test_backends import _device_for
from test_engine import delta_error
from tolerances import (
    IDENTICAL_SPECIALISTS, NO_GAP_TOL, ORTHONORMAL_FP32, SCALE_INVARIANCE_FP32, SPAN_RANK_DEFICIENT_FP32,
)

BACKEND_PARAMS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", marks=pytest.mark.triton_interpreter, id="triton"),
    pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
]


@pytest.fixture(autouse=True)
def flushed():
    """Subnormals flushed to zero (and read as zero) for the test, restored after."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals (torch.set_flush_denormal needs x86 SSE3)")
    try:
        assert float(torch.tensor([1e-20]) * torch.tensor([1e-20])) == 0.0, "flushing is not on"
        yield
    finally:
        torch.set_flush_denormal(False)


def _orthonormalize(backend: str):
    device = _device_for(backend)
    return BACKENDS[backend].ops().orthonormalize, device


def _sketches(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    full = torch.randn(2, 53, 9, generator=g)
    low = torch.randn(2, 53, 2, generator=g) @ torch.randn(2, 2, 9, generator=g)  # rank 2 of 9
    twin = full.clone()
    twin[:, :, 4] = twin[:, :, 1]  # two identical columns
    cases = {
        "full": full,
        "rank2": low,
        "twin_columns": twin,
        "zero": torch.zeros(2, 53, 9),
        "one_nonzero_column": torch.zeros(2, 53, 9).index_fill_(2, torch.tensor([3]), 1.0),
        "tiny_rank2": low * 2.0**-45,   # squared column norms ~1e-26: the old shift (1e-6·that) was 1e-32
        "dust": full * 2.0**-60,        # squared column norms ~1e-34: counts as a zero sketch
    }
    return {k: v.to(device) for k, v in cases.items()}


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_orthonormalize_degenerate_sketches(backend):
    orthonormalize, device = _orthonormalize(backend)
    cases = _sketches(device)
    for name, y in cases.items():
        for steps in (2, 3):
            q = orthonormalize(y, steps=steps)
            assert torch.isfinite(q).all(), f"{name}, {steps} steps: NaN/Inf"
            assert q.shape == y.shape, name
    for name in ("zero", "dust"):
        assert torch.equal(orthonormalize(cases[name]), torch.zeros_like(cases[name])), name
    full = orthonormalize(cases["full"])
    eye = torch.eye(9, device=device)
    assert (full.transpose(1, 2) @ full - eye).abs().max() < ORTHONORMAL_FP32
    # The same basis whatever the scale (down to the zero-sketch floor): the scaling is exact.
    scaled = orthonormalize(cases["full"] * 2.0**-45)
    assert (scaled - full).abs().max() < SCALE_INVARIANCE_FP32
    for name in ("rank2", "twin_columns", "one_nonzero_column", "tiny_rank2"):
        y = cases[name]
        q = orthonormalize(y)
        left = y - q @ (q.transpose(1, 2) @ y)  # what the basis misses of y's column space
        assert torch.linalg.vector_norm(left) <= SPAN_RANK_DEFICIENT_FP32 * torch.linalg.vector_norm(y), name
        assert q.norm(dim=1).max() <= 1.0 + ORTHONORMAL_FP32, name
    # A batch mixing all of them: no item spoils another (a rank-deficient item's extra columns are
    # amplified rounding, not unique, so only the determined items are compared).
    batch = orthonormalize(torch.cat(list(cases.values())))
    assert torch.isfinite(batch).all()
    parts = dict(zip(cases, batch.split(2)))
    assert (parts["full"] - full).abs().max() < ORTHONORMAL_FP32
    assert not parts["zero"].any() and not parts["dust"].any()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("num_specialists", [2, 3, 5])
def test_identical_specialists_give_their_update(backend, num_specialists):
    device = _device_for(backend)
    base, special = model_family(1, device=device)
    result = r2m_fast.merge(base, [special] * num_specialists, backend=backend)
    assert result.report["residual_norms"] == [0.0] * num_specialists
    for name, tensor in result.state_dict.items():
        assert torch.isfinite(tensor).all() if tensor.is_floating_point() else True, name
        atol, rtol = IDENTICAL_SPECIALISTS
        torch.testing.assert_close(tensor, special[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_specialists", [2, 4])
def test_specialists_equal_to_the_base_give_the_base_bit_for_bit(backend, dtype, num_specialists):
    device = _device_for(backend)
    base = model_family(0, dtype, device=device)[0]
    base["blocks.0.attn.proj.weight"][0, :5] = -0.0  # signed zeros must survive too
    result = r2m_fast.merge(base, [base] * num_specialists, backend=backend, k_real=2)
    assert result.report["core_norm"] == 0.0 and result.report["eta"] == 0.0
    for name, tensor in result.state_dict.items():
        assert tensor.dtype == base[name].dtype, name
        same_bits = tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32) if tensor.is_floating_point() else tensor
        want = base[name].view(same_bits.dtype) if tensor.is_floating_point() else base[name]
        assert torch.equal(same_bits, want), name


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_zero_and_rank_deficient_layers_match_the_reference(backend):
    """One layer left unchanged by every specialist (zero Gram, zero sketches), one changed
    identically by all (zero residual), one whose updates have rank 1 below the truncation rank."""
    device = _device_for(backend)
    models = model_family(3, device=device, with_buffer=False)
    base = models[0]
    for sd in models[1:]:
        sd["blocks.0.attn.proj.weight"] = base["blocks.0.attn.proj.weight"].clone()
        sd["blocks.0.mlp.fc2.weight"] = models[1]["blocks.0.mlp.fc2.weight"].clone()
    g = torch.Generator().manual_seed(1)
    for sd in models[1:]:
        u, v = torch.randn(97, 1, generator=g), torch.randn(1, 24, generator=g)
        sd["blocks.0.mlp.fc1.weight"] = base["blocks.0.mlp.fc1.weight"] + (1e-3 * u @ v).to(device)
    config = R2MConfig(rank_ratio=0.2, backend=backend, range_finder_precision="fp32")
    ref = r2m_merge(base, models[1:], config.replace(out_dtype=torch.float64))
    fast = r2m_fast.merge(base, models[1:], config)
    for name, tensor in fast.state_dict.items():
        assert torch.isfinite(tensor).all(), name
        assert delta_error(fast, ref, base, name) < NO_GAP_TOL[torch.float32], name
    # Nothing changed that layer: its residuals are exactly zero, so is their factor.
    assert torch.equal(fast.state_dict["blocks.0.attn.proj.weight"], base["blocks.0.attn.proj.weight"])


def test_same_file_twice_and_the_base_as_every_specialist(tmp_path):
    base, special = model_family(1, with_buffer=False)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(special, str(tmp_path / "special.safetensors"))
    twice = r2m_fast.merge_files(
        tmp_path / "base.safetensors", [tmp_path / "special.safetensors"] * 2, tmp_path / "twice"
    )
    assert twice.report["residual_norms"] == [0.0, 0.0]
    merged = load_file(str(tmp_path / "twice" / "model.safetensors"))
    atol, rtol = IDENTICAL_SPECIALISTS
    for name in base:
        torch.testing.assert_close(merged[name], special[name], atol=atol, rtol=rtol, msg=name)
    r2m_fast.merge_files(tmp_path / "base.safetensors", [tmp_path / "base.safetensors"] * 3, tmp_path / "same")
    merged = load_file(str(tmp_path / "same" / "model.safetensors"))
    for name in base:
        assert torch.equal(merged[name].view(torch.int32), base[name].view(torch.int32)), name


def test_a_failed_factorization_names_the_layer(monkeypatch):
    """Finite inputs always factor; should LAPACK still refuse a Gram (e.g. an overflow), the user
    reads which tensor, not LAPACK's words."""

    def refuse(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")

    models = model_family(2, with_buffer=False)
    monkeypatch.setattr(ops_torch.torch.linalg, "cholesky", refuse)
    with pytest.raises(MergeInputError) as info:
        r2m_fast.merge(models[0], models[1:], backend="torch")
    message = str(info.value)
    assert "'patch_embed.proj.weight'" in message or "'blocks.0." in message
    assert "cholesky" not in message.lower() and "positive-definite" not in message
