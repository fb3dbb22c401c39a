"""The r2m-merge command: flags and YAML, dry run, errors (one line, no traceback), --force, the
built-in example, and SIGINT/SIGTERM mid-merge leaving no output and no temporary folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import r2m_fast
from helpers import merge_flags as flags, wait_until_writing
from r2m_fast.cli import main
from r2m_fast.output import SINK_DELAY_ENV


REPO = Path(__file__).resolve().parents[1]



def merged(out: Path):
    return load_file(str(out / "model.safetensors"))


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_flags_merge_equals_api(tmp_path, inputs, family, capsys):
    out = tmp_path / "out"
    argv = flags(inputs, out) + ["--rank-ratio", "0.2", "--alpha", "0.5", "--k-real", "2", "--seed", "4",
                                 "--head-prefix", "head.", "--power-iters", "2"]
    assert main(argv) == 0
    expected = r2m_fast.merge(family[0], family[1:], rank_ratio=0.2, alpha=0.5, k_real=2, seed=4,
                              head_prefix="head.", power_iters=2).state_dict
    assert_same(merged(out), expected)
    assert capsys.readouterr().out == ""  # --quiet
    report = json.loads((out / "merge_report.json").read_text())
    assert report["seed"] == 4 and report["k_real"] == 2


def test_summary_without_quiet(tmp_path, inputs, capsys):
    argv = [a for a in flags(inputs, tmp_path / "out") if a != "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "merged with r2m" in text and "merge_report.json" in text


def test_yaml_config_and_flag_override(tmp_path, inputs, family):
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(inputs[0]), "specialists": [str(p) for p in inputs[1:]], "output": str(tmp_path / "out"),
        "method": "r2m", "rank_ratio": 0.2, "seed": 1, "exclude": ["norm", "bias"], "shard_size": "2KB",
    }))
    assert main([str(config), "--seed", "7", "--quiet"]) == 0
    expected = r2m_fast.merge(family[0], family[1:], rank_ratio=0.2, seed=7, exclude=("norm", "bias")).state_dict
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").exists()
    assert_same(r2m_fast.io.load_state_dict(out), expected)
    written = yaml.safe_load((out / "merge_config.yaml").read_text())
    assert written["seed"] == 7 and written["exclude"] == ["norm", "bias"] and written["shard_size"] == 2000
    # The written config repeats the merge.
    assert main([str(out / "merge_config.yaml"), "--output", str(tmp_path / "again"), "--quiet"]) == 0
    assert_same(r2m_fast.io.load_state_dict(tmp_path / "again"), expected)


@pytest.mark.parametrize(
    "method,extra,options",
    [("ties", ["--density", "0.3", "--scaling", "0.9"], {"density": 0.3, "scaling": 0.9}),
     ("task_arithmetic", ["--lambda", "0.4"], {"scaling": 0.4}),
     ("tsvm", [], {}),
     ("average", [], {})],
)
def test_baseline_methods(tmp_path, inputs, family, method, extra, options):
    assert main(flags(inputs, tmp_path / "out") + ["--method", method] + extra) == 0
    assert_same(merged(tmp_path / "out"), r2m_fast.merge(family[0], family[1:], method=method, **options).state_dict)


def test_yaml_method_options(tmp_path, inputs, family):
    config = tmp_path / "ties.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(inputs[0]), "specialists": [str(p) for p in inputs[1:]], "output": str(tmp_path / "out"),
        "method": "ties", "options": {"density": 0.4}, "scaling": 0.5,
    }))
    assert main([str(config), "--quiet"]) == 0
    expected = r2m_fast.merge(family[0], family[1:], method="ties", density=0.4, scaling=0.5).state_dict
    assert_same(merged(tmp_path / "out"), expected)


def test_prefix_and_out_dtype(tmp_path, family):
    paths = []
    for i, sd in enumerate(family):
        paths.append(tmp_path / f"d{i}.pt")
        torch.save({"state_dict": {f"backbone.{k}": v for k, v in sd.items()}}, paths[-1])
    assert main(flags(paths, tmp_path / "out") + ["--prefix", "backbone.", "--out-dtype", "bf16"]) == 0
    out = merged(tmp_path / "out")
    assert out["blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    assert_same(out, r2m_fast.merge(family[0], family[1:], out_dtype="bf16").state_dict)


def test_dry_run_writes_nothing(tmp_path, inputs, capsys):
    assert main(flags(inputs, tmp_path / "out")[:-1] + ["--dry-run", "--rank-ratio", "0.25"]) == 0
    text = capsys.readouterr().out
    assert "blocks.0.mlp.fc1.weight" in text and "(97, 24)" in text and "decomposed" in text
    assert "estimated peak memory" in text and "GFLOP" in text and "estimated time" in text
    assert "   6\n" in text  # fc1: ⌊0.25·24⌋ = 6
    assert not (tmp_path / "out").exists()
    assert main(flags(inputs, tmp_path / "out")[:-1] + ["--dry-run", "--method", "tsvm"]) == 0
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path, inputs, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(flags(inputs, out)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and "Traceback" not in err
    assert os.listdir(out) == []
    assert main(flags(inputs, out) + ["--force"]) == 0
    assert (out / "model.safetensors").exists()


def _error(argv, capsys, code=1):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("r2m-merge: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_errors_are_one_line(tmp_path, inputs, family, capsys):
    bad = dict(family[2])
    del bad["blocks.0.attn.qkv.weight"]
    save_file(bad, str(inputs[2]))
    err = _error(flags(inputs, tmp_path / "out"), capsys)
    assert "m2.safetensors" in err and "blocks.0.attn.qkv.weight" in err
    nan = {k: v.clone() for k, v in family[2].items()}
    nan["blocks.0.mlp.fc2.weight"][0, 0] = float("nan")
    save_file(nan, str(inputs[2]))
    err = _error(flags(inputs, tmp_path / "out"), capsys)
    assert "m2.safetensors: tensor 'blocks.0.mlp.fc2.weight' has 1 NaN/Inf" in err
    inputs[2].write_bytes(inputs[1].read_bytes()[:-64])
    assert "m2.safetensors: truncated" in _error(flags(inputs, tmp_path / "out"), capsys)
    assert "no such file" in _error(flags(inputs[:2] + [tmp_path / "gone.safetensors"], tmp_path / "out"), capsys)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]


def test_debug_shows_traceback(tmp_path, inputs, capsys):
    assert main(flags(inputs[:2] + [tmp_path / "gone.safetensors"], tmp_path / "out") + ["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_usage_errors(tmp_path, inputs, capsys):
    assert "at least 2 specialists" in _error(flags(inputs[:2], tmp_path / "o"), capsys, code=2)
    assert "give a CONFIG.yaml" in _error(["--output", str(tmp_path / "o")], capsys, code=2)
    assert "no base model" in _error(["--specialist", "a", "--output", str(tmp_path / "o")], capsys, code=2)
    config = tmp_path / "c.yaml"
    config.write_text("base: a\nspecialists: [b, c]\noutput: o\nrank_ration: 0.1\n")
    assert "unknown key(s) rank_ration" in _error([str(config)], capsys, code=2)
    config.write_text("base: [unclosed\n")
    assert "invalid YAML" in _error([str(config)], capsys, code=2)
    assert "density" in _error(flags(inputs, tmp_path / "o") + ["--density", "0.2"], capsys, code=2)
    assert "density" in _error(flags(inputs, tmp_path / "o") + ["--method", "average", "--density", "0.2"], capsys,
                               code=2)
    assert "--rank-ratio" in _error(flags(inputs, tmp_path / "o") + ["--rank-ratio", "3"], capsys, code=2)
    assert not (tmp_path / "o").exists()


def test_rank_ratio_none_disables_truncation(tmp_path, inputs, family):
    assert main(flags(inputs, tmp_path / "out") + ["--rank-ratio", "none"]) == 0
    assert_same(merged(tmp_path / "out"), r2m_fast.merge(family[0], family[1:], rank_ratio=None).state_dict)


def test_example(tmp_path, capsys):
    start = time.perf_counter()
    assert main(["--example", str(tmp_path / "ex")]) == 0
    seconds = time.perf_counter() - start
    text = capsys.readouterr().out
    assert "merged with r2m" in text and "residual norms" in text
    out = load_file(str(tmp_path / "ex" / "merged" / "model.safetensors"))
    assert "head.weight" in out and len(out) == 56
    assert (tmp_path / "ex" / "merge.yaml").exists()
    assert seconds < 20
    assert main(["--example", str(tmp_path / "ex"), "--quiet"]) == 1  # merged/ exists: needs --force
    assert main(["--example", str(tmp_path / "ex"), "--quiet", "--force"]) == 0


def test_example_honours_spill_dir(tmp_path, capsys):
    spill = tmp_path / "spill"
    spill.mkdir()
    assert main(["--example", str(tmp_path / "ex"), "--quiet", "--spill-dir", str(spill)]) == 0
    report = json.loads((tmp_path / "ex" / "merged" / "merge_report.json").read_text())
    assert report["spill_bytes"] > 0 and not any(spill.iterdir())
    assert main(["--example", str(tmp_path / "ex2"), "--quiet", "--spill-dir", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err


# --- subprocesses: the console entry and signals ----------------------------------------------------


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def test_python_dash_m_error_is_one_line(tmp_path, inputs):
    proc = subprocess.run(
        [sys.executable, "-m", "r2m_fast"] + flags(inputs[:2] + [tmp_path / "nope.bin"], tmp_path / "out"),
        capture_output=True, text=True, env=_env(), timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"r2m-merge: error: {tmp_path / 'nope.bin'}: no such file or folder"]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupt_leaves_no_output(tmp_path, inputs, sig, code):
    out = tmp_path / "out"
    # 0.5 s after every written tensor: the merge sits in pass 3 with shards half written.
    proc = subprocess.Popen(
        [sys.executable, "-m", "r2m_fast"] + flags(inputs, out) + ["--shard-size", "1KB"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**{SINK_DELAY_ENV: "0.5"}),
    )
    wait_until_writing(proc, tmp_path, timeout=60)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "no partial output was left" in err and "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in inputs]


def test_torch_is_imported_with_the_collector_off_then_frozen():
    """r2m-merge imports torch before a merge with gc off, then freezes what the import made (later
    collections skip it); the collector must be back on afterwards. In a fresh process: where torch
    is already imported (this one), nothing is frozen."""
    import gc

    from r2m_fast import cli

    frozen = gc.get_freeze_count()
    cli._import_torch()
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    probe = ("import gc, sys; from r2m_fast import cli; assert 'torch' not in sys.modules; cli._import_torch(); "
             "print(gc.isenabled(), gc.get_freeze_count() > 1000, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.split() == ["True", "True", "True"]
