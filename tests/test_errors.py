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


def _available(monkeypatch, **names: bool) -> None:
    """Make the named backends run (or not) on any device, keeping what each registers."""
    import dataclasses

    from r2m_fast import backends

    for name, ok in names.items():
        reason = (lambda device: None) if ok else (lambda device: "not here")
        monkeypatch.setitem(backends.BACKENDS, name, dataclasses.replace(backends.BACKENDS[name], unavailable_reason=reason))


def test_auto_on_cuda_tensors_routes_each_op_to_its_measured_fastest_available_backend(monkeypatch):
    """auto follows the GPU suite per op (backends._AUTO_ROUTES), skipping backends that cannot run."""
    from r2m_fast import backends

    monkeypatch.delenv("R2M_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_logged_fallbacks", set())
    cuda = torch.device("cuda")
    _available(monkeypatch, cuda=True, triton=True)
    chosen = resolve_backend("auto", cuda)
    assert dict(chosen.routes) == {
        "gram_sketch": "cuda", "residual_matmul": "triton", "residual_matmul[transpose]": "torch",
        "orthonormalize": "torch", "accumulate": "cuda",
    }
    assert chosen.name == (
        "auto(gram_sketch=cuda, residual_matmul=triton, residual_matmul[transpose]=torch, orthonormalize=torch, "
        "accumulate=cuda)"
    )
    _available(monkeypatch, cuda=False, triton=True)
    assert dict(resolve_backend("auto", cuda).routes) == {
        "gram_sketch": "triton", "residual_matmul": "triton", "residual_matmul[transpose]": "torch",
        "orthonormalize": "torch", "accumulate": "torch",
    }
    _available(monkeypatch, cuda=False, triton=False)
    assert resolve_backend("auto", cuda).name == "torch"  # one backend for everything: the plain one
    assert resolve_backend("torch", cuda).name == "torch"


def test_cuda_backend_runs_its_own_two_ops_and_the_table_delegates_the_others(monkeypatch, caplog):
    """The cuda backend registers gram_sketch and accumulate only; the registry serves the other ops
    from triton, else torch, and logs a skipped delegate once."""
    import logging

    from r2m_fast import backends

    monkeypatch.setattr(backends, "_logged_fallbacks", set())
    assert backends.BACKENDS["cuda"].implements == {"gram_sketch", "accumulate"}
    cuda = torch.device("cuda")
    _available(monkeypatch, cuda=True, triton=True)
    routes = dict(resolve_backend("cuda", cuda).routes)
    assert routes == {
        "gram_sketch": "cuda", "residual_matmul": "triton", "residual_matmul[transpose]": "triton",
        "orthonormalize": "triton", "accumulate": "cuda",
    }
    _available(monkeypatch, triton=False)
    with caplog.at_level(logging.INFO, logger="r2m_fast"):
        for _ in range(2):
            routes = dict(resolve_backend("cuda", cuda).routes)
    assert routes["residual_matmul"] == routes["orthonormalize"] == "torch"
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2 and all("not here" in m for m in skipped), skipped  # per op, once


def test_routed_ops_call_the_routed_backend_and_split_residual_matmul_by_transpose(monkeypatch):
    import dataclasses

    from r2m_fast import backends

    calls = []

    def provider(tag, own_operator=False):
        def record(op):
            return lambda *args: calls.append((tag, op, args)) or tag

        ops = [op for op in backends.OPS if op != "residual_operator" or own_operator]
        return dataclasses.replace(
            backends.BACKENDS["torch"], name=tag, implements=frozenset(ops), load=lambda: {op: record(op) for op in ops}
        )

    for tag in "gptoa":
        monkeypatch.setitem(backends.BACKENDS, tag, provider(tag))
    monkeypatch.setitem(backends.BACKENDS, "s", provider("s", own_operator=True))
    backends._kernels.cache_clear()
    try:
        ops = backends.Backend("mixed", (
            ("gram_sketch", "g"), ("residual_matmul", "p"), ("residual_matmul[transpose]", "t"),
            ("orthonormalize", "o"), ("accumulate", "a"),
        )).ops()
        assert ops.gram_sketch("w", "omega") == "g"
        assert ops.residual_matmul("w", "c", "rhs", False) == "p"
        assert ops.residual_matmul("w", "c", "rhs", True) == "t"
        operator = ops.residual_operator("w", "c")  # derived: each product goes to its routed backend
        assert operator("rhs", True) == "t" and operator("rhs", False) == "p"
        assert ops.orthonormalize("y") == "o"
        assert ops.accumulate("w", "a", "l", "r", "dt") == "a"
        assert calls == [
            ("g", "gram_sketch", ("w", "omega")), ("p", "residual_matmul", ("w", "c", "rhs", False)),
            ("t", "residual_matmul", ("w", "c", "rhs", True)), ("t", "residual_matmul", ("w", "c", "rhs", True)),
            ("p", "residual_matmul", ("w", "c", "rhs", False)), ("o", "orthonormalize", ("y",)),
            ("a", "accumulate", ("w", "a", "l", "r", "dt")),
        ]
        calls.clear()
        own = backends.Backend("s", tuple((entry, "s") for entry in backends.ROUTED)).ops()
        assert own.residual_operator("w", "c") == "s"  # a backend's own residual_operator is used
        assert calls == [("s", "residual_operator", ("w", "c"))]
    finally:
        backends._kernels.cache_clear()
