"""A merged folder is a Hugging Face model: config, generation config, tokenizer, model card, index
and permissions as transformers writes them; it loads with from_pretrained and runs. Hub ids
resolve from the local cache only."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import r2m_fast
from r2m_fast.cli import main
from r2m_fast.hf import TOKENIZER_FILES, looks_like_repo_id, resolve_model
from r2m_fast.plan import MergeInputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_models import build_llama_family

    return build_llama_family(tmp_path_factory.mktemp("llama"))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(str(folder / "model.safetensors"))
    out = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_file(str(folder / shard)))
    return out


def _load_and_run(out: Path, dtype: torch.dtype):
    """from_pretrained(out) loads every tensor from the folder (none initialized) and runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == dtype
    written = _weights(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, written[name]), name
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("w1 w2 w3 w99", return_tensors="pt").input_ids
    assert ids.tolist() == [[4, 5, 6, 102]]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()
    return model


def test_output_folder_is_a_model(tmp_path, llama):
    base, specialists = llama
    out = tmp_path / "merged"
    old = os.umask(0o022)
    try:
        code = main(["--base", str(base), *sum((["--specialist", str(s)] for s in specialists), []),
                     "--output", str(out), "--quiet", "--shard-size", "100KB"])
    finally:
        os.umask(old)
    assert code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # as mkdir under umask 022, not mkdtemp's 0700
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"} and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"] == {"total_size": sum(t.nbytes for t in _weights(out).values()),
                                 "total_parameters": sum(t.numel() for t in _weights(out).values())}
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert name in names
    assert (out / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "float32"
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and {"merge", "r2m_fast", "r2m"} <= set(front["tags"])
    assert front["base_model"] == [str(base), *map(str, specialists)] and front["base_model_relation"] == "merge"
    assert all(str(s) in card for s in specialists) and "rank_ratio" in card
    report = json.loads((out / "merge_report.json").read_text())
    assert {"config.json", "README.md", "tokenizer.json"} <= set(report["model_files"])
    _load_and_run(out, torch.float32)


def test_out_dtype_sets_config_dtype(tmp_path, llama):
    base, specialists = llama
    out = tmp_path / "bf16"
    r2m_fast.merge_files(base, specialists, out, method="average", config=r2m_fast.R2MConfig(out_dtype="bf16"))
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    _load_and_run(out, torch.bfloat16)


def test_config_dtype_fields(tmp_path):
    from r2m_fast.hf import config_text

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"torch_dtype": "float32", "text_config": {"dtype": "float32"}, "x": 1}))
    assert json.loads(config_text(path, torch.bfloat16)) == {
        "torch_dtype": "bfloat16", "text_config": {"dtype": "bfloat16"}, "x": 1}
    path.write_text(json.dumps({"model_type": "llama"}))
    assert json.loads(config_text(path, torch.float16)) == {"model_type": "llama", "dtype": "float16",
                                                            "torch_dtype": "float16"}


def test_tokenizer_flags(tmp_path, llama):
    pytest.importorskip("transformers")
    from hf_models import save_tokenizer

    base, specialists = llama
    flags = ["--base", str(base), "--specialist", str(specialists[0]), "--specialist", str(specialists[1]),
             "--method", "average", "--quiet"]
    assert main(flags + ["--output", str(tmp_path / "none"), "--no-tokenizer"]) == 0
    assert not any((tmp_path / "none" / name).exists() for name in TOKENIZER_FILES)
    assert (tmp_path / "none" / "config.json").exists()
    # Another tokenizer with the same vocabulary (a chat template added) is taken as is.
    chat = tmp_path / "chat"
    save_tokenizer(chat, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert main(flags + ["--output", str(tmp_path / "chatout"), "--tokenizer-source", str(chat)]) == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "chatout"))
    assert tok.apply_chat_template([{"role": "user", "content": "w5"}], tokenize=False) == "w5"
    # One with another vocabulary would not match the merged embeddings: refused before merging.
    other = tmp_path / "other"
    save_tokenizer(other, words=50)
    assert main(flags + ["--output", str(tmp_path / "bad"), "--tokenizer-source", str(other)]) == 2
    assert not (tmp_path / "bad").exists()


def test_loose_files_get_a_card_only(tmp_path, inputs):
    """A merge of loose .safetensors files has no config to copy: model card, no config.json."""
    out = tmp_path / "out"
    r2m_fast.merge_files(inputs[0], inputs[1:], out, method="average")
    assert (out / "README.md").exists() and not (out / "config.json").exists()
    front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert front["library_name"] == "safetensors"


# --- hub ids -----------------------------------------------------------------------------------------


def _fake_cache(hub: Path, repo_id: str, source: Path, revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """The Hugging Face cache layout (models--org--name/{refs/main, snapshots/<hash>/...}) holding `source`."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in source.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snap


def test_repo_id_detection(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_repo_id("org/name") and looks_like_repo_id("org/name@v1")
    assert not looks_like_repo_id("/abs/path") and not looks_like_repo_id("a/b/c") and not looks_like_repo_id("x.pt")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert not looks_like_repo_id("org/name")  # an existing path wins
    assert resolve_model("org/name") == Path("org/name")


def test_repo_ids_resolve_from_the_local_cache(tmp_path, inputs, family, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    folders = []
    for i, path in enumerate(inputs):
        folder = tmp_path / f"src{i}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(path.read_bytes())
        folders.append(folder)
    snaps = [_fake_cache(hub, f"org/m{i}", f) for i, f in enumerate(folders)]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/m1") == snaps[1]
    out = tmp_path / "out"
    result = r2m_fast.merge_files("org/m0", ["org/m1", "org/m2", "org/m3"], out, method="average")
    expected = r2m_fast.merge(family[0], family[1:], method="average").state_dict
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    config = yaml.safe_load((out / "merge_config.yaml").read_text())
    assert config["base"] == "org/m0" and config["specialists"] == ["org/m1", "org/m2", "org/m3"]
    assert result.report["inputs"]["base"] == "org/m0"
    with pytest.raises(MergeInputError, match=r"org/missing: no such file or folder, and not in the local Hugging Face cache"):
        resolve_model("org/missing")


def test_repo_id_cli_subprocess(tmp_path, inputs):
    """As a user runs it: HF_HOME points at a cache; a cached id merges, an uncached one exits 2."""
    pytest.importorskip("huggingface_hub")
    hub = tmp_path / "hf" / "hub"
    for i, path in enumerate(inputs[:3]):
        folder = tmp_path / f"src{i}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(path.read_bytes())
        _fake_cache(hub, f"org/m{i}", folder)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("HF_HUB_CACHE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "r2m_fast", "--base", "org/m0", "--specialist", "org/m1", "--quiet",
           "--method", "average", "--output", str(tmp_path / "out")]
    ok = subprocess.run(cmd + ["--specialist", "org/m2"], capture_output=True, text=True, env=env, timeout=120,
                        cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(cmd + ["--specialist", "org/nothere", "--force"], capture_output=True, text=True,
                         env=env, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "org/nothere" in lines[0] and "Hugging Face cache" in lines[0]
