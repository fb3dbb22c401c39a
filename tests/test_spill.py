"""Spilling R²M's between-pass tensors to disk (r2m_fast.spill, ``spill_dir=``, ``--spill-dir``).

A spilled merge must equal the in-memory one bit for bit (torch backend, CPU, fp32 and bf16 models with
conv and ragged shapes), keep its sketches and factors in files and not in memory between passes, and
leave nothing in the spill folder: after success, after an error or Ctrl-C mid-merge, at interpreter
exit. A bad spill folder is one line naming it, before any output exists. (2 gloo ranks spilling:
tests/test_distributed.py.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import r2m_fast
from helpers import merge_flags as flags
from models import model_family
from r2m_fast import spill as spill_module
from r2m_fast.cli import main
from r2m_fast.config import R2MConfig
from r2m_fast.engine import run_merge, sketch_width
from r2m_fast.factors import ResidualFactors
from r2m_fast.sources import DictSource
from r2m_fast.output import SINK_DELAY_ENV
from r2m_fast.plan import DECOMPOSED, MergeInputError, build_plan
from r2m_fast.spill import PREFIX, Spill, release_heap_slack

CONFIG = R2MConfig(rank_ratio=0.2, head_prefix="head.", backend="torch")
REPO = Path(__file__).resolve().parents[1]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(bits(got[name]), bits(tensor)), name


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def truncated_layers(models, config):
    specs = {k: (tuple(v.shape), v.dtype) for k, v in models[0].items()}
    return [layer for layer in build_plan(specs, config) if layer.rank is not None and layer.kind == DECOMPOSED]


# --- the store ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_store_round_trips_bit_for_bit(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    raw = [torch.randn(3, 97, 13, generator=g, dtype=torch.float64) * 1e3, torch.randn(5, generator=g, dtype=torch.float64),
           torch.tensor(2.5, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64),
           torch.randn(13, 7, generator=g, dtype=torch.float64).T]  # non-contiguous
    tensors = [t.to(dtype) for t in raw]
    if dtype.is_floating_point:  # bit patterns a value comparison would miss: NaN payloads, -0, ±inf
        tensors[1] = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-40], dtype=dtype)
    with Spill(tmp_path) as spill:
        store = spill.store("t")
        for i, t in enumerate(tensors):
            store[f"layer.{i}"] = t
        assert len(list(spill.path.iterdir())) == len(tensors) and len(store) == len(tensors)
        for i, t in enumerate(tensors):
            got = store[f"layer.{i}"]
            assert got.dtype == t.dtype and got.shape == t.shape and got.is_contiguous()
            assert torch.equal(bits(got), bits(t)), i
        assert spill.bytes_written == spill.bytes_on_disk == spill.peak_bytes > sum(t.numel() * t.element_size() for t in tensors)
        del store["layer.0"]
        assert "layer.0" not in store and len(list(spill.path.iterdir())) == len(tensors) - 1
        assert spill.bytes_on_disk < spill.peak_bytes == spill.bytes_written
        store.clear()
        assert list(spill.path.iterdir()) == [] and spill.bytes_on_disk == 0
    assert os.listdir(tmp_path) == []


def test_factors_keep_their_norms_in_memory(tmp_path, monkeypatch):
    left, right = torch.randn(3, 40, 5), torch.randn(3, 29, 5)
    kept = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    with Spill(tmp_path) as spill:
        store = spill.store("factors")
        store["w"] = ResidualFactors(left, right, kept)
        got = store["w"]
        assert torch.equal(bits(got.left), bits(left)) and torch.equal(bits(got.right), bits(right))
        assert torch.equal(got.kept_sq, kept)

        def no_reads(*args, **kwargs):
            raise AssertionError("read a spilled file")

        monkeypatch.setattr("r2m_fast.spill.SafetensorsFile", no_reads)
        assert "w" in store and list(store) == ["w"]
        assert store.kept_squares()["w"] is not None and torch.equal(store.kept_squares()["w"], kept)
        with pytest.raises(AssertionError, match="read a spilled file"):
            store["w"]  # the check above can fail: a real read goes through SafetensorsFile
        store.clear()
        with pytest.raises(TypeError, match="cannot store"):
            store["x"] = [left]
    assert os.listdir(tmp_path) == []


def test_spill_folder_removed_at_interpreter_exit(tmp_path):
    code = (
        "import sys, torch\n"
        "from r2m_fast.spill import Spill\n"
        "spill = Spill(sys.argv[1])\n"  # never closed: only the exit hook can remove it
        "spill.store('sketches')['w'] = torch.ones(1000)\n"
        "print(len(list(spill.path.iterdir())))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"  # the file existed while the interpreter ran
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(spill_module._HEAP is None, reason="not glibc: there is no heap slack to release")
def test_heap_slack_released_only_after_growth():
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    release_heap_slack(growth=2**20)  # sets the mark
    assert not release_heap_slack(growth=2**20)  # no growth since
    # More than the heap has free, in chunks under glibc's mmap threshold: the heap must grow.
    free = spill_module._HEAP[0]().fordblks
    blocks = [libc.malloc(64 * 1024) for _ in range((free + 4 * 2**20) // (64 * 1024))]
    try:
        assert release_heap_slack(growth=2**20)
        assert not release_heap_slack(growth=2**20)  # the mark moved
    finally:
        for block in blocks:
            libc.free(block)


# --- merges ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_spilled_merge_equals_in_memory_bit_for_bit(tmp_path, dtype):
    models = model_family(3, dtype=dtype, seed=2)
    want = r2m_fast.merge(models[0], models[1:], CONFIG)
    got = r2m_fast.merge(models[0], models[1:], CONFIG, spill_dir=tmp_path)
    assert_bit_equal(got.state_dict, want.state_dict)
    for key in ("core_norm", "eta", "residual_norms", "eigenvalues", "ranks", "range_finder_dtype"):
        assert got.report[key] == want.report[key], key
    assert "spill_bytes" not in want.report
    layers = truncated_layers(models, CONFIG)
    N = len(models) - 1
    sketches = sum(4 * N * layer.matrix[0] * sketch_width(layer, CONFIG.oversample) for layer in layers)
    factors = sum(4 * N * (layer.matrix[0] + layer.matrix[1]) * layer.rank for layer in layers)
    headers = 400 * 2 * len(layers)  # each file's safetensors header, a few hundred bytes
    assert sketches + factors < got.report["spill_bytes"] < sketches + factors + headers
    assert factors < got.report["spill_peak_bytes"] < sketches + factors
    assert os.listdir(tmp_path) == []


def test_between_passes_the_tensors_are_files(tmp_path):
    """In pass 3 the spill folder holds one factors file per truncated layer and no sketch: each sketch
    was dropped once its layer was factored, and nothing waits in memory."""
    models = model_family(3)
    layers = truncated_layers(models, CONFIG)
    seen: list[list[str]] = []

    def sink(name, tensor):
        seen.append([p.name for p in (tmp_path).glob(f"{PREFIX}*/*")])

    result = run_merge(DictSource(models[0], models[1:]), CONFIG, sink=sink, spill_dir=tmp_path)
    assert len(seen) == len(models[0])
    first = seen[0]
    assert len(first) == len(layers) and all(name.startswith("factors-") for name in first), first
    assert result.report["spill_bytes"] > 0
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_in_pass_3_removes_the_spill(tmp_path, error):
    models = model_family(3)
    held: list[int] = []

    def sink(name, tensor):
        held.append(len(list(tmp_path.glob(f"{PREFIX}*/*"))))
        if len(held) == 4:
            raise error("sink failed")

    with pytest.raises(error, match="sink failed"):
        run_merge(DictSource(models[0], models[1:]), CONFIG, sink=sink, spill_dir=tmp_path)
    assert held[-1] > 0  # the spill held files when it failed
    assert os.listdir(tmp_path) == []


def test_nan_in_pass_1_removes_the_spill(tmp_path):
    models = model_family(3)
    models[2]["blocks.0.mlp.fc2.weight"][3, 3] = float("nan")
    with pytest.raises(MergeInputError, match="NaN"):
        r2m_fast.merge(models[0], models[1:], CONFIG, spill_dir=tmp_path)
    assert os.listdir(tmp_path) == []


def test_baseline_with_spill_dir_spills_nothing(tmp_path, family):
    want = r2m_fast.merge(family[0], family[1:], method="ties", density=0.3)
    got = r2m_fast.merge(family[0], family[1:], method="ties", density=0.3, spill_dir=tmp_path)
    assert_bit_equal(got.state_dict, want.state_dict)
    assert got.report["spill_bytes"] == 0
    with pytest.raises(MergeInputError, match="does not exist"):
        r2m_fast.merge(family[0], family[1:], method="ties", spill_dir=tmp_path / "missing")


# --- files and the command line ---------------------------------------------------------------


def test_merge_files_with_spill_equals_without(tmp_path, inputs):
    spill = tmp_path / "spill"
    spill.mkdir()
    want = r2m_fast.merge_files(inputs[0], inputs[1:], tmp_path / "a", CONFIG)
    got = r2m_fast.merge_files(inputs[0], inputs[1:], tmp_path / "b", CONFIG, spill_dir=spill)
    assert_bit_equal(load_file(str(tmp_path / "b" / "model.safetensors")), load_file(str(tmp_path / "a" / "model.safetensors")))
    report = json.loads((tmp_path / "b" / "merge_report.json").read_text())
    assert report["spill_bytes"] == got.report["spill_bytes"] > 0 and "spill_bytes" not in want.report
    assert os.listdir(spill) == []


def test_cli_spill_dir_round_trip(tmp_path, inputs):
    spill = tmp_path / "spill"
    spill.mkdir()
    assert main(flags(inputs, tmp_path / "plain")) == 0
    assert main(flags(inputs, tmp_path / "spilled") + ["--spill-dir", str(spill)]) == 0
    want = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert_bit_equal(load_file(str(tmp_path / "spilled" / "model.safetensors")), want)
    assert json.loads((tmp_path / "spilled" / "merge_report.json").read_text())["spill_bytes"] > 0
    # A run option, not a method parameter: the config written beside the output does not carry it.
    saved = yaml.safe_load((tmp_path / "spilled" / "merge_config.yaml").read_text())
    plain = yaml.safe_load((tmp_path / "plain" / "merge_config.yaml").read_text())
    assert not [key for key in saved if "spill" in key]
    assert {**saved, "output": None} == {**plain, "output": None}
    # the YAML key, as for device or shard_size
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"base": str(inputs[0]), "specialists": [str(p) for p in inputs[1:]],
                                      "output": str(tmp_path / "from_yaml"), "spill_dir": str(spill)}))
    assert main([str(config), "--quiet"]) == 0
    assert json.loads((tmp_path / "from_yaml" / "merge_report.json").read_text())["spill_bytes"] > 0
    assert os.listdir(spill) == []


def test_dry_run_counts_the_spill_as_disk(tmp_path, inputs, capsys):
    assert main(flags(inputs, tmp_path / "out")[:-1] + ["--dry-run"]) == 0
    plain = capsys.readouterr().out
    assert main(flags(inputs, tmp_path / "out")[:-1] + ["--dry-run", "--spill-dir", str(tmp_path)]) == 0
    spilled = capsys.readouterr().out
    assert "sketches and residual factors" in plain.splitlines()[-3] and "spilled to" not in plain
    assert f"spilled to {tmp_path}: sketches and residual factors" in spilled
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["missing", "file", "read-only", "mkdir-denied"])
def test_bad_spill_dir_is_one_line_and_writes_nothing(tmp_path, inputs, capsys, monkeypatch, kind):
    """Unwritable folders are simulated (the mode check says no, or creating the temporary folder
    raises PermissionError), so the test also runs as root, which writes anywhere whatever the mode."""
    bad = tmp_path / "bad"
    expected = f"{bad}: spill folder"
    if kind == "file":
        bad.write_text("not a folder")
    elif kind == "read-only":
        bad.mkdir()
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == bad else real_access(p, mode, **kw))
    elif kind == "mkdir-denied":
        bad.mkdir()
        real_mkdtemp = tempfile.mkdtemp

        def mkdtemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == bad:
                raise PermissionError(13, "Permission denied", str(dir))
            return real_mkdtemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
        expected = f"{bad}: cannot create a spill folder there: Permission denied"
    before = sorted(os.listdir(tmp_path))
    before_bad = sorted(os.listdir(bad)) if bad.is_dir() else None
    assert main(flags(inputs, tmp_path / "out") + ["--spill-dir", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"r2m-merge: error: {expected}"), err
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary folder
    with pytest.raises(MergeInputError, match=re.escape(expected)):
        r2m_fast.merge_files(inputs[0], inputs[1:], tmp_path / "out", CONFIG, spill_dir=bad)
    assert sorted(os.listdir(tmp_path)) == before
    if before_bad is not None:
        assert sorted(os.listdir(bad)) == before_bad


def test_save_state_refuses_spill_dir(tmp_path, inputs, capsys):
    code = main(flags(inputs, tmp_path / "out") + ["--save-state", "--spill-dir", str(tmp_path)])
    assert code == 2
    assert "--spill-dir does not combine with --save-state" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sigint_mid_merge_removes_the_spill(tmp_path, inputs):
    spill = tmp_path / "spill"
    spill.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env[SINK_DELAY_ENV] = "0.5"  # pass 3 writes a tensor every 0.5 s
    proc = subprocess.Popen([sys.executable, "-m", "r2m_fast"] + flags(inputs, tmp_path / "out") + ["--spill-dir", str(spill)],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith("factors-") for p in spill.glob(f"{PREFIX}*/*")):
        assert proc.poll() is None, proc.communicate()
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the merge never spilled its factors")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert os.listdir(spill) == []
    assert not (tmp_path / "out").exists()


def test_spill_of_a_killed_merge_is_removed_by_the_next_spill(tmp_path):
    # A folder named after a process that is gone (pid 2**22 + 1 is beyond the default pid_max and
    # reads as not running), one of this host's running process (ourselves: left alone) and one of an
    # older version without an owner in its name (left alone).
    from r2m_fast.safety import _host

    dead = tmp_path / f"{PREFIX}{_host()}-{2**22 + 1}-abcd1234"
    running = tmp_path / f"{PREFIX}{_host()}-{os.getppid()}-abcd1234"
    old = tmp_path / f"{PREFIX}abcd1234"
    for folder in (dead, running, old):
        folder.mkdir()
        (folder / "sketch.safetensors").write_bytes(b"x" * 100)
    with Spill(tmp_path) as spill:
        assert spill.path.name.startswith(f"{PREFIX}{_host()}-{os.getpid()}-")
    assert not dead.exists() and running.exists() and old.exists()


def test_spill_that_fills_its_disk_names_the_spill_folder(tmp_path, inputs, capsys, monkeypatch):
    import errno

    def full(path, items, sync=True):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spill_module, "write_safetensors", full)
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    assert main(flags(inputs, tmp_path / "out") + ["--spill-dir", str(spill_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{spill_dir}: no space left for the spill (--spill-dir)" in err[0], err
    assert list(spill_dir.iterdir()) == [] and not (tmp_path / "out").exists()
