"""Bad input raises a clear error naming the tensor, model or field."""

from __future__ import annotations

import pytest
import torch

import r2m_fast
from models import model_family
from r2m_fast import BackendUnavailable, MergeInputError, R2MConfig
from r2m_fast.backends import resolve_backend
from r2m_fast.reference import r2m_merge

MERGES = [r2m_fast.merge, lambda b, s, **kw: r2m_merge(b, s, R2MConfig(**kw))]
MERGE_IDS = ["fast", "reference"]


@pytest.mark.parametrize("merge", MERGES, ids=MERGE_IDS)
def test_fewer_than_two_specialists(merge):
    models = model_family(1)
    with pytest.raises(MergeInputError, match="at least 2 specialists, got 1"):
        merge(models[0], models[1:])


@pytest.mark.parametrize("merge", MERGES, ids=MERGE_IDS)
def test_missing_and_extra_keys_are_named(merge):
    models = model_family(2)
    del models[2]["blocks.0.attn.proj.weight"]
    with pytest.raises(MergeInputError, match=r"specialists\[1\].*missing 'blocks.0.attn.proj.weight'"):
        merge(models[0], models[1:])
    models = model_family(2)
    models[1]["extra.weight"] = torch.zeros(2, 2)
    with pytest.raises(MergeInputError, match=r"specialists\[0\].*unexpected 'extra.weight'"):
        merge(models[0], models[1:])


@pytest.mark.parametrize("merge", MERGES, ids=MERGE_IDS)
def test_shape_and_dtype_mismatch_are_named(merge):
    models = model_family(2)
    models[1]["blocks.0.attn.qkv.weight"] = torch.zeros(72, 25)
    with pytest.raises(MergeInputError, match=r"specialists\[0\].*'blocks.0.attn.qkv.weight' has shape \(72, 25\)"):
        merge(models[0], models[1:])
    models = model_family(2)
    models[2]["head.bias"] = models[2]["head.bias"].half()
    with pytest.raises(MergeInputError, match=r"specialists\[1\].*'head.bias' has dtype torch.float16"):
        merge(models[0], models[1:])


@pytest.mark.parametrize("merge", MERGES, ids=MERGE_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(merge, bad):
    models = model_family(2)
    models[2]["blocks.0.mlp.fc2.weight"][3, 4] = bad
    with pytest.raises(MergeInputError, match=r"specialists\[1\].*'blocks.0.mlp.fc2.weight' has 1 NaN/Inf"):
        merge(models[0], models[1:])


def test_not_a_state_dict():
    with pytest.raises(MergeInputError, match="base: expected a state dict"):
        r2m_fast.merge([1, 2], [{}, {}])
    with pytest.raises(MergeInputError, match=r"specialists\[1\]: entry 'w' is a str"):
        r2m_fast.merge({"w": torch.zeros(2)}, [{"w": torch.zeros(2)}, {"w": "x"}])


def test_everything_excluded():
    models = model_family(2)
    with pytest.raises(MergeInputError, match="no parameter is decomposed"):
        r2m_fast.merge(models[0], models[1:], exclude=("e", "s"))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("k_real", 0, "k_real: must be an integer ≥ 1"),
        ("k_real", 1.5, "k_real"),
        ("rank_ratio", 0.0, r"rank_ratio: must be in \(0, 1\]"),
        ("rank_ratio", 1.5, "rank_ratio"),
        ("alpha", -1.0, "alpha: must be ≥ 0"),
        ("alpha", float("nan"), "alpha: must be a finite number"),
        ("block_norm", "l2", "block_norm: must be one of"),
        ("exclude", "bias", "exclude: must be a sequence"),
        ("center", "yes", "center: must be True or False"),
        ("residual_scale", "abs", "residual_scale"),
        ("head_prefix", "", "head_prefix"),
        ("oversample", -1, "oversample"),
        ("power_iters", -1, "power_iters"),
        ("seed", -3, "seed"),
        ("backend", "metal", "backend: must be one of"),
        ("out_dtype", "int8", "out_dtype: unknown dtype"),
        ("out_dtype", torch.int32, "out_dtype: torch.int32 is not a floating dtype"),
        ("rank_overrides", {"(": 0.1}, "rank_overrides: bad pattern"),
        ("rank_overrides", {"fc": 0}, "rank_overrides"),
        ("rank_overrides", {"fc": 1.5}, "rank_overrides"),
    ],
)
def test_bad_config_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        R2MConfig(**{field: value})


def test_unknown_override_is_named():
    models = model_family(2)
    with pytest.raises(ValueError, match="unknown R2MConfig field.*rank_ratoi"):
        r2m_fast.merge(models[0], models[1:], rank_ratoi=0.1)


def test_config_dtype_names():
    assert R2MConfig(out_dtype="bf16").out_dtype == torch.bfloat16
    assert R2MConfig(out_dtype="torch.float16").out_dtype == torch.float16
    assert R2MConfig().to_dict()["exclude"] == ["ln", "norm", "bias"]


def test_backend_requested_but_unavailable(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("R2M_BACKEND", raising=False)
    with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot run: .*CUDA tensors"):
        resolve_backend("cuda", torch.device("cpu"))
    with pytest.raises(BackendUnavailable, match="backend 'triton' cannot run"):
        resolve_backend("triton", torch.device("cpu"))
    models = model_family(2)
    with pytest.raises(BackendUnavailable, match="triton"):
        r2m_fast.merge(models[0], models[1:], backend="triton")


def test_backend_environment_override(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("R2M_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cpu")).name == "torch"
    monkeypatch.setenv("R2M_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus' \\(from R2M_BACKEND\\)"):
        resolve_backend("auto", torch.device("cpu"))
    monkeypatch.delenv("R2M_BACKEND")
    assert resolve_backend("auto", torch.device("cpu")).name == "torch"


def test_auto_on_cuda_tensors_routes_each_op_to_its_measured_fastest_available_backend(monkeypatch):
    """auto follows the GPU suite per op (backends._AUTO_ROUTES), skipping backends that cannot run."""
    from r2m_fast import backends

    monkeypatch.delenv("R2M_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_logged_fallbacks", set())

    def available(**names: bool) -> None:
        for name, ok in names.items():
            reason = (lambda device: None) if ok else (lambda device: "not here")
            monkeypatch.setitem(backends.BACKENDS, name, backends.Backend(name, f"r2m_fast.{name}", reason))

    cuda = torch.device("cuda")
    available(cuda=True, triton=True)
    chosen = resolve_backend("auto", cuda)
    assert dict(chosen.routes) == {
        "gram_sketch": "cuda", "residual_matmul": "triton", "residual_matmul_T": "torch",
        "orthonormalize": "torch", "accumulate": "cuda",
    }
    assert chosen.name == (
        "auto(gram_sketch=cuda, residual_matmul=triton, residual_matmul_T=torch, orthonormalize=torch, accumulate=cuda)"
    )
    available(cuda=False, triton=True)
    assert dict(resolve_backend("auto", cuda).routes) == {
        "gram_sketch": "triton", "residual_matmul": "triton", "residual_matmul_T": "torch",
        "orthonormalize": "torch", "accumulate": "torch",
    }
    available(cuda=False, triton=False)
    assert resolve_backend("auto", cuda).name == "torch"  # one backend for everything: the plain one
    assert resolve_backend("torch", cuda).name == "torch"


def test_routed_ops_call_the_routed_module_and_split_residual_matmul_by_transpose():
    from types import SimpleNamespace

    from r2m_fast.backends import RoutedOps

    calls = []

    def module(tag):
        def record(op):
            return lambda *args: calls.append((tag, op, args)) or tag

        return SimpleNamespace(**{op: record(op) for op in ("gram_sketch", "residual_matmul", "orthonormalize", "accumulate")})

    ops = RoutedOps({
        "gram_sketch": module("g"), "residual_matmul": module("p"), "residual_matmul_T": module("t"),
        "orthonormalize": module("o"), "accumulate": module("a"),
    })
    assert ops.gram_sketch("w", "omega") == "g"
    assert ops.residual_matmul("w", "c", "rhs", False) == "p"
    assert ops.residual_matmul("w", "c", "rhs", True) == "t"
    assert ops.orthonormalize("y") == "o"
    assert ops.accumulate("w", "a", "l", "r", "dt") == "a"
    assert calls == [
        ("g", "gram_sketch", ("w", "omega")), ("p", "residual_matmul", ("w", "c", "rhs", False)),
        ("t", "residual_matmul", ("w", "c", "rhs", True)), ("o", "orthonormalize", ("y", 3)),
        ("a", "accumulate", ("w", "a", "l", "r", "dt")),
    ]
