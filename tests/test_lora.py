"""PEFT LoRA adapters as specialists: each tensor equals PEFT's merge_and_unload() (rank and alpha
patterns, rsLoRA, embeddings, modules_to_save, fan_in_fan_out, .bin adapters), and a merge of
adapters equals the merge of their merged full models; unsupported adapters exit 2 naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")
pytest.importorskip("peft")

import r2m_fast  # noqa: E402
from hf_models import build_llama_family, make_adapter  # noqa: E402
from r2m_fast.cli import main  # noqa: E402
from r2m_fast.io import open_checkpoint  # noqa: E402
from r2m_fast.lora import LoraCheckpoint, pattern_value  # noqa: E402
from r2m_fast.plan import MergeInputError  # noqa: E402

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base, _ = build_llama_family(root, n=0)
    adapters, merged = [], []
    configs = [
        dict(r=4, lora_alpha=8, target_modules=ATTN + ["gate_proj", "up_proj", "down_proj"]),
        dict(r=4, lora_alpha=16, target_modules=ATTN + ["embed_tokens"], modules_to_save=["lm_head"],
             rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 3}, alpha_pattern={"o_proj": 5}),
        dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "down_proj"]),
    ]
    for i, cfg in enumerate(configs):
        adapters.append(root / f"adapter{i}")
        merged.append(root / f"merged{i}")
        make_adapter(base, adapters[-1], merged[-1], seed=10 + i, **cfg)
    return base, adapters, merged


def _assert_same_model(adapter: Path, base: Path, merged: Path) -> None:
    ckpt = LoraCheckpoint(adapter, base)
    full = load_file(str(merged / "model.safetensors"))
    try:
        assert sorted(ckpt.specs) == sorted(full)
        for name in ckpt.specs:
            got = ckpt.get(name)
            assert got.dtype == full[name].dtype and torch.equal(got, full[name]), name
    finally:
        ckpt.close()


def test_each_tensor_equals_merge_and_unload(llama):
    base, adapters, merged = llama
    for adapter, full in zip(adapters, merged):
        _assert_same_model(adapter, base, full)
    # The patterns did something: ranks 2 and 3, and layers the adapter leaves alone are the base's.
    ckpt = LoraCheckpoint(adapters[1], base)
    assert {n for n in ckpt.adapted if "lm_head" in n or "embed" in n} == {"lm_head.weight", "model.embed_tokens.weight"}
    base_sd = load_file(str(base / "model.safetensors"))
    assert torch.equal(ckpt.get("model.layers.0.mlp.up_proj.weight"), base_sd["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(ckpt.get("model.layers.1.self_attn.q_proj.weight"), base_sd["model.layers.1.self_attn.q_proj.weight"])
    ckpt.close()


def test_bf16_model_as_peft_merges_it(tmp_path):
    """A bf16 base: a linear weight gets one rounding (PEFT adds the fp32 delta in place), an
    embedding two (PEFT casts its delta first); both ways of merging with PEFT agree with get()."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, _ = build_llama_family(tmp_path, n=0, dtype=torch.bfloat16)
    make_adapter(base, tmp_path / "ad", tmp_path / "full", seed=4, r=4, lora_alpha=8,
                 target_modules=["q_proj", "down_proj", "embed_tokens"], modules_to_save=["lm_head"])
    _assert_same_model(tmp_path / "ad", base, tmp_path / "full")
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16),
                                      str(tmp_path / "ad"))
    model.merge_and_unload().save_pretrained(str(tmp_path / "full2"))
    _assert_same_model(tmp_path / "ad", base, tmp_path / "full2")


def test_pattern_matching_as_peft():
    patterns = {"v_proj": 2, "layers.1.self_attn.q_proj": 3}
    assert pattern_value(patterns, "model.layers.0.self_attn.v_proj", 8) == 2
    assert pattern_value(patterns, "model.layers.1.self_attn.q_proj", 8) == 3
    assert pattern_value(patterns, "model.layers.11.self_attn.q_proj", 8) == 8  # "layers.1." must match whole segments
    assert pattern_value(patterns, "model.layers.0.self_attn.xv_proj", 8) == 8


def test_fan_in_fan_out_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        str(tmp_path / "base"))
    make_adapter(tmp_path / "base", tmp_path / "ad", tmp_path / "full", seed=3, model_cls=GPT2LMHeadModel,
                 r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    _assert_same_model(tmp_path / "ad", tmp_path / "base", tmp_path / "full")


def test_bin_adapter(tmp_path, llama):
    base = llama[0]
    make_adapter(base, tmp_path / "ad", tmp_path / "full", seed=5, safe_serialization=False, r=2, lora_alpha=2,
                 target_modules=["q_proj"])
    assert (tmp_path / "ad" / "adapter_model.bin").exists()
    _assert_same_model(tmp_path / "ad", base, tmp_path / "full")


@pytest.mark.parametrize("method", ["r2m", "average", "ties"])
def test_merge_of_adapters_equals_merge_of_merged_models(tmp_path, llama, method):
    base, adapters, merged = llama
    options = {"density": 0.5} if method == "ties" else None
    via_adapters = r2m_fast.merge_files(base, adapters, tmp_path / "a", method=method, options=options)
    via_full = r2m_fast.merge_files(base, merged, tmp_path / "f", method=method, options=options)
    a, f = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "f" / "model.safetensors"))
    assert sorted(a) == sorted(f)
    for name in a:
        assert torch.equal(a[name], f[name]), name
    if method == "r2m":
        assert via_adapters.report["residual_norms"] == via_full.report["residual_norms"]


def test_cli_adapters_and_full_models_mixed(tmp_path, llama):
    base, adapters, merged = llama
    out = tmp_path / "out"
    assert main(["--base", str(base), "--specialist", str(adapters[0]), "--specialist", str(merged[1]),
                 "--specialist", str(adapters[2]), "--output", str(out), "--quiet", "--method", "average"]) == 0
    assert main(["--base", str(base), "--specialist", str(merged[0]), "--specialist", str(merged[1]),
                 "--specialist", str(merged[2]), "--output", str(tmp_path / "ref"), "--quiet", "--method", "average"]) == 0
    a, f = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert all(torch.equal(a[k], f[k]) for k in f)
    assert (out / "config.json").exists()  # the base's


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes,key", [
    ({"use_dora": True}, "use_dora"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"lora_bias": True}, "lora_bias"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
])
def test_unsupported_adapters_exit_2(tmp_path, llama, capsys, changes, key):
    base, adapters, merged = llama
    bad = _edit_config(adapters[0], tmp_path / "bad", **changes)
    code = main(["--base", str(base), "--specialist", str(bad), "--specialist", str(merged[1]),
                 "--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert str(bad / "adapter_config.json") in err[0] and key in err[0]
    assert not (tmp_path / "out").exists()


def test_dora_tensors_refused(tmp_path, llama, capsys):
    base, adapters, merged = llama
    bad = _edit_config(adapters[0], tmp_path / "bad")
    sd = load_file(str(bad / "adapter_model.safetensors"))
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    save_file(sd, str(bad / "adapter_model.safetensors"))
    code = main(["--base", str(base), "--specialist", str(bad), "--specialist", str(merged[1]),
                 "--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "adapter_model.safetensors" in err and "lora_magnitude_vector" in err


def test_folder_with_full_weights_is_the_full_model(tmp_path, llama):
    from r2m_fast.lora import is_adapter

    base, adapters, merged = llama
    both = _edit_config(adapters[0], tmp_path / "both")
    assert is_adapter(both)
    (both / "model.safetensors").write_bytes((merged[0] / "model.safetensors").read_bytes())
    assert not is_adapter(both)


def test_adapter_as_base_or_for_another_model(tmp_path, llama, inputs):
    base, adapters, merged = llama
    with pytest.raises(MergeInputError, match="base must be a full model"):
        r2m_fast.merge_files(adapters[0], merged[:2], tmp_path / "out")
    with pytest.raises(MergeInputError, match="which the base does not have"):
        r2m_fast.merge_files(inputs[0], [adapters[0], adapters[1]], tmp_path / "out2")


def test_adapter_reads_one_layer_at_a_time(llama):
    """get() reads the base tensor and the module's own two factors, nothing more."""
    base, adapters, _ = llama
    ckpt = LoraCheckpoint(adapters[0], base)
    reads = []
    original = ckpt._weights.get
    ckpt._weights.get = lambda key: reads.append(key) or original(key)
    ckpt.get("model.layers.0.self_attn.q_proj.weight")
    assert sorted(reads) == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    reads.clear()
    ckpt.get("model.norm.weight")
    assert reads == []
    ckpt.close()
    assert isinstance(open_checkpoint(base).specs, dict)
