"""Every fast backend end to end against the reference (the torch backend: tests/test_engine.py).

On CPU, the Triton backend runs under TRITON_INTERPRET=1 (fp32/fp16 only: the interpreter has no
bf16); on a GPU machine triton and cuda run on CUDA tensors with bf16 too.
"""

from __future__ import annotations

import os

import pytest
import torch

import r2m_fast
from helpers import DTYPE_IDS
from models import gapped_family, model_family
from r2m_fast import R2MConfig
from r2m_fast.backends import BACKENDS
from r2m_fast.reference import r2m_merge
from test_engine import delta_error
from tolerances import BACKEND_REPORT_RTOL, GAPPED_DELTA_TOL, IDENTICAL_SPECIALISTS, NO_GAP_TOL

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device_for(backend: str) -> str:
    """The device this backend is tested on here, or skip with the reason it cannot run."""
    if os.environ.get("R2M_TEST_DEVICE") == "cpu" or not torch.cuda.is_available():
        device = "cpu"
    else:
        device = "cuda"
    if backend == "auto":
        if device != "cuda":
            pytest.skip("auto routes ops across backends only on CUDA tensors (on CPU it is torch: test_engine.py)")
        return device
    reason = BACKENDS[backend].unavailable_reason(torch.device(device))
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable here: {reason}")
    return device


PARAMS = [
    pytest.param("triton", marks=pytest.mark.triton_interpreter, id="triton"),
    pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
    pytest.param("auto", marks=pytest.mark.gpu, id="auto"),
]


def _reported(backend: str, report: dict) -> bool:
    return report["backend"] == backend or (backend == "auto" and report["backend"].startswith("auto("))


@pytest.mark.parametrize("backend", PARAMS)
@pytest.mark.parametrize("num_specialists", [2, 3, 8])
def test_gapped_spectrum_matches_reference(backend, num_specialists):
    device = _device_for(backend)
    models = [{k: v.to(device) for k, v in m.items()} for m in gapped_family(num_specialists, 83, 61, seed=5)]
    config = R2MConfig(rank_ratio=0.2, out_dtype=torch.float64, backend=backend)
    ref = r2m_merge(models[0], models[1:], config)
    fast = r2m_fast.merge(models[0], models[1:], config)
    assert _reported(backend, fast.report)
    assert delta_error(fast, ref, models[0], "w") < GAPPED_DELTA_TOL["fp32"]
    assert fast.report["residual_norms"] == pytest.approx(ref.report["residual_norms"], rel=BACKEND_REPORT_RTOL)


@pytest.mark.parametrize("backend", PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("num_specialists", [2, 3])
def test_realistic_models_match_reference(backend, dtype, num_specialists):
    device = _device_for(backend)
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter has no bf16; bf16 runs on the GPU")
    models = model_family(num_specialists, dtype, seed=num_specialists, device=device)
    config = R2MConfig(rank_ratio=0.2, head_prefix="head.", backend=backend)
    ref = r2m_merge(models[0], models[1:], config.replace(out_dtype=torch.float64))
    fast = r2m_fast.merge(models[0], models[1:], config)
    for name, tensor in fast.state_dict.items():
        base = models[0][name]
        assert tensor.dtype == base.dtype and tensor.shape == base.shape, name
        if not base.is_floating_point():
            assert torch.equal(tensor, base), name
            continue
        want = ref.state_dict[name].double().cpu()
        b = base.double().cpu()
        rounding = torch.linalg.vector_norm(want.to(dtype).double() - want)
        budget = 2 * rounding + NO_GAP_TOL[dtype] * torch.linalg.vector_norm(want - b)
        err = torch.linalg.vector_norm(tensor.double().cpu() - want)
        assert err <= budget, f"{name}: error {err:.3g} > budget {budget:.3g}"


@pytest.mark.parametrize("backend", PARAMS)
def test_same_seed_bit_identical(backend):
    device = _device_for(backend)
    models = model_family(3, device=device)
    a = r2m_fast.merge(models[0], models[1:], backend=backend, seed=3)
    b = r2m_fast.merge(models[0], models[1:], backend=backend, seed=3)
    for name in a.state_dict:
        assert torch.equal(a.state_dict[name], b.state_dict[name]), name


@pytest.mark.parametrize("backend", PARAMS)
def test_degenerate_inputs_give_no_nan(backend):
    device = _device_for(backend)
    base, special = model_family(1, device=device, with_buffer=False)
    same = r2m_fast.merge(base, [special, special], backend=backend)
    unchanged = r2m_fast.merge(base, [base, base], backend=backend)
    for name in base:
        assert torch.isfinite(same.state_dict[name]).all(), name
        torch.testing.assert_close(
            same.state_dict[name], special[name], rtol=IDENTICAL_SPECIALISTS[1], atol=IDENTICAL_SPECIALISTS[0], msg=name
        )
        torch.testing.assert_close(unchanged.state_dict[name], base[name], rtol=0, atol=0, msg=name)


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("num_specialists", [2, 3])
def test_ops_routed_across_backends_match_reference(monkeypatch, num_specialists):
    """auto on a GPU mixes backends op by op (backends._AUTO_ROUTES); here the same mixing of
    triton and torch, which the interpreter can run on CPU, against the reference."""
    from r2m_fast import engine
    from r2m_fast.backends import Backend

    device = _device_for("triton")
    routes = Backend("auto(mixed)", (
        ("gram_sketch", "triton"), ("residual_matmul", "triton"), ("residual_matmul[transpose]", "torch"),
        ("orthonormalize", "torch"), ("accumulate", "triton"),
    ))
    monkeypatch.setattr(engine, "resolve_backend", lambda requested, device: routes)
    models = [{k: v.to(device) for k, v in m.items()} for m in gapped_family(num_specialists, 83, 61, seed=5)]
    config = R2MConfig(rank_ratio=0.2, out_dtype=torch.float64)
    ref = r2m_merge(models[0], models[1:], config)
    fast = r2m_fast.merge(models[0], models[1:], config)
    assert fast.report["backend"] == routes.name
    assert delta_error(fast, ref, models[0], "w") < GAPPED_DELTA_TOL["fp32"]
    assert fast.report["residual_norms"] == pytest.approx(ref.report["residual_norms"], rel=BACKEND_REPORT_RTOL)
