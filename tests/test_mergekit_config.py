"""mergekit YAML read as is: the translation (mergekit's defaults, per-model weights and densities,
LoRA syntax, refusals naming the key) and parity with mergekit-yaml itself on a tiny Llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from r2m_fast.cli import main
from r2m_fast.mergekit_config import ConfigError, translate


def _cfg(method="ties", **extra):
    data = {"merge_method": method, "base_model": "b", "models": [{"model": "x"}, {"model": "y"}]}
    data.update(extra)
    return data


def test_mergekit_defaults_not_ours():
    # task_arithmetic: λ = 1, no normalization (ours: λ = 0.3); ties: density 1, λ 1, normalize.
    assert translate(_cfg("task_arithmetic"))["options"] == {"normalize": False, "scaling": 1.0}
    assert translate(_cfg("ties"))["options"] == {"normalize": True, "scaling": 1.0, "density": 1.0}
    assert translate(_cfg("linear"))["options"] == {"normalize": True}
    assert translate(_cfg("tsvm"))["options"] == {"scaling": 1.0}
    out = translate(_cfg("r2m", parameters={"rank_ratio": 0.2, "k_real": 2}))
    assert out["method"] == "r2m" and out["rank_ratio"] == 0.2 and out["k_real"] == 2 and "options" not in out


def test_models_weights_and_base():
    data = {
        "merge_method": "ties", "base_model": "b", "dtype": "bfloat16", "tokenizer_source": "tok/src",
        "parameters": {"density": 0.4, "lambda": 0.9, "normalize": False, "int8_mask": True},
        "models": ["b", {"model": "x", "parameters": {"weight": 2.0}},
                   {"model": {"model": {"path": "org/y", "revision": "v1"}}, "parameters": {"weight": 1, "density": 0.6}}],
    }
    out = translate(data)
    assert out["base"] == "b" and out["specialists"] == ["x", "org/y@v1"]  # the base is no task vector
    assert out["options"] == {"normalize": False, "scaling": 0.9, "density": [0.4, 0.6], "weights": [2.0, 1.0]}
    assert out["out_dtype"] == "bfloat16" and out["tokenizer_source"] == "tok/src"
    # linear averages every model it lists, the base too, and takes the first model as reference without one.
    lin = translate({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 3}},
                                                          {"model": "y", "parameters": {"weight": 1}}]})
    assert lin["base"] == "x" and lin["specialists"] == ["x", "y"] and lin["options"]["weights"] == [3.0, 1.0]
    assert translate(_cfg("linear"))["specialists"] == ["x", "y", "b"]
    # mergekit's LoRA syntax on the base: the adapter is the specialist.
    assert translate(_cfg("task_arithmetic", models=["b+ad1", "b+ad2"]))["specialists"] == ["ad1", "ad2"]
    # A uniform weight scales TSV-M's result (it is homogeneous in τ).
    assert translate(_cfg("tsvm", parameters={"weight": 0.5, "lambda": 2.0}))["options"] == {"scaling": 1.0}


@pytest.mark.parametrize("data,key", [
    (_cfg(slices=[{"sources": []}], models=None), "slices"),
    (_cfg("dare_ties"), "merge_method"),
    (_cfg(["ties"]), "merge_method"),
    (_cfg(models=[{"model": "x", "parameters": {"weight": [0, 1]}}, {"model": "y"}]), "models[0].parameters.weight"),
    (_cfg(models=[{"model": "x", "parameters": {"density": [{"filter": "mlp", "value": 0.5}, {"value": 1}]}},
                  {"model": "y"}]), "models[0].parameters.density"),
    (_cfg(tokenizer_source="union"), "tokenizer_source"),
    (_cfg(tokenizer={"source": "base"}), "tokenizer"),
    (_cfg(chat_template="chatml"), "chat_template"),
    (_cfg(parameters={"epsilon": 0.1}), "parameters.epsilon"),
    (_cfg(parameters={"rescale": True}), "parameters.rescale"),
    (_cfg(models=["other+ad", "y"]), "models[0].model"),
    (_cfg(base_model="b+ad"), "base_model"),
    (_cfg(models=[{"model": "x", "parameters": {"weight": 1}, "layer_range": [0, 2]}, {"model": "y"}]),
     "models[0].layer_range"),
    (_cfg("r2m", models=[{"model": "x", "parameters": {"weight": 0.5}}, {"model": "y"}]), "models[].parameters.weight"),
    (_cfg("tsvm", models=[{"model": "x", "parameters": {"weight": 0.5}}, {"model": "y"}]), "models[].parameters.weight"),
    (_cfg(models=["x"]), "models"),
    ({"merge_method": "ties", "models": ["x", "y"]}, "base_model"),
    (_cfg(dtype="int4"), "dtype"),
    (_cfg(merge_sort=True), "merge_sort"),
])
def test_what_it_cannot_express_names_the_key(data, key):
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        translate(data)
    assert str(info.value).startswith(key), str(info.value)


def test_cli_refusal_exits_2_with_one_line(tmp_path, inputs, capsys):
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "dare_ties", "base_model": str(inputs[0]),
                                    "models": [{"model": str(p)} for p in inputs[1:]]}))
    assert main([str(path), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "merge_method" in err[0] and "dare_ties" in err[0]


def test_cli_runs_a_mergekit_yaml(tmp_path, inputs, family):
    """mergekit-yaml's command line (CONFIG OUTPUT) and semantics: Σ wᵢτᵢ with λ, on loose files."""
    import r2m_fast

    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(inputs[0]), "parameters": {"lambda": 0.5},
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(inputs[1:], (0.2, 0.3, 0.5))],
    }))
    assert main(["--config", str(path), str(tmp_path / "out"), "--quiet"]) == 0
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, base in family[0].items():
        if not base.dtype.is_floating_point:
            continue
        tau = sum(w * (sd[name].double() - base.double()) for w, sd in zip((0.2, 0.3, 0.5), family[1:]))
        torch.testing.assert_close(got[name], (base.double() + 0.5 * tau).to(base.dtype), rtol=0, atol=0)
    ran = yaml.safe_load((tmp_path / "out" / "merge_config.yaml").read_text())
    assert ran["method"] == "task_arithmetic" and ran["weights"] == [0.2, 0.3, 0.5] and ran["scaling"] == 0.5
    # Fed back to r2m-merge, the config it wrote repeats the merge.
    assert main([str(tmp_path / "out" / "merge_config.yaml"), "--output", str(tmp_path / "again"), "--quiet"]) == 0
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(again[k], got[k]) for k in got)
    del r2m_fast


# --- parity with mergekit-yaml itself ------------------------------------------------------------------

PARITY = {
    "linear": {"merge_method": "linear", "models": [
        {"model": "ft0", "parameters": {"weight": 0.5}}, {"model": "ft1", "parameters": {"weight": 0.3}},
        {"model": "ft2", "parameters": {"weight": 0.2}}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 0.8},
                        "models": [{"model": "ft0", "parameters": {"weight": 0.5}},
                                   {"model": "ft1", "parameters": {"weight": 0.3}}, {"model": "base"}]},
    "ties": {"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.7, "int8_mask": True},
             "models": [{"model": "ft0", "parameters": {"weight": 1.0, "density": 0.5}},
                        {"model": "ft1", "parameters": {"weight": 0.6, "density": 0.3}},
                        {"model": "ft2", "parameters": {"weight": 0.4}}]},
}


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_models import build_llama_family

    root = tmp_path_factory.mktemp("mk")
    build_llama_family(root, n=3)
    return root


@pytest.mark.parametrize("name", [*PARITY, "lora"])
def test_same_result_as_mergekit_yaml(llama3, name):
    pytest.importorskip("mergekit")
    root = llama3
    config = root / f"{name}.yaml"
    if name == "lora":  # mergekit's BASE+ADAPTER syntax: it merges each adapter with PEFT first
        from hf_models import make_adapter

        make_adapter(root / "base", root / "ad0", root / "full0", seed=1, r=4, lora_alpha=8,
                     target_modules=["q_proj", "v_proj"])
        make_adapter(root / "base", root / "ad1", root / "full1", seed=2, r=2, lora_alpha=4,
                     target_modules=["o_proj", "down_proj"])
        data = {"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.5, "weight": 1.0},
                "models": [{"model": "base+ad0"}, {"model": "base+ad1"}]}
    else:
        data = PARITY[name]
    data = {**data, "dtype": "float32"}
    # Absolute paths: mergekit asks the Hub about relative names that exist locally.
    data["models"] = [{**m, "model": "+".join(str(root / p) for p in m["model"].split("+"))} for m in data["models"]]
    if "base_model" in data:
        data["base_model"] = str(root / data["base_model"])
    config.write_text(yaml.safe_dump(data))
    theirs, ours = root / f"mergekit_{name}", root / f"r2m_{name}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(config), str(theirs), "--quiet",
                           "--lora-merge-cache", str(root / "lora_cache")],
                          cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main([str(config), str(ours), "--quiet"]) == 0
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in b:
        # Both round to fp32 once (mergekit computes in fp32, r2m_fast in fp64): an ulp or two apart.
        torch.testing.assert_close(a[key], b[key], rtol=2e-7, atol=1e-8, msg=key)
    assert json.loads((ours / "config.json").read_text())["dtype"] == "float32"


def test_weights_validated(family):
    import r2m_fast

    with pytest.raises(ValueError, match="option weights: 2 given for 3 specialists"):
        r2m_fast.merge(family[0], family[1:], method="task_arithmetic", weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="option weights must be a list of numbers"):
        r2m_fast.merge(family[0], family[1:], method="average", weights=0.5)
    with pytest.raises(ValueError, match="sum to 0"):
        r2m_fast.merge(family[0], family[1:], method="average", weights=[1.0, -1.0, 0.0])
    # Weights of 1 are the unweighted merge, bit for bit.
    for method in ("average", "task_arithmetic", "ties"):
        a = r2m_fast.merge(family[0], family[1:], method=method, weights=[1.0, 1.0, 1.0]).state_dict
        b = r2m_fast.merge(family[0], family[1:], method=method).state_dict
        assert all(torch.equal(a[k], b[k]) for k in a), method
