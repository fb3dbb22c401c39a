"""Failing well (issue 12): exit codes and one-line errors for every bad flag and YAML value, devices
that cannot run here, refused pickles, leftovers of killed merges, full disks, Ctrl-C at start-up,
and the small API promises (r2m_fast.reference, generators of specialists)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import r2m_fast
from helpers import merge_flags as flags, wait_until_writing
from r2m_fast import cli, io, output, safety
from r2m_fast import inputs as input_readers
from r2m_fast.cli import main

REPO = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("r2m-merge: error: "), err
    assert "Traceback" not in err and "usage:" not in err and "\x1b" not in err, err
    return err


def _fails(argv, capsys, code: int) -> str:
    assert main(argv) == code
    captured = capsys.readouterr()
    return _one_line(captured.err)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --- 2. exit codes: 2 for a bad value, naming the flag or key ------------------------------------------


@pytest.mark.parametrize("extra,named", [
    (["--rank-ratio", "3"], "--rank-ratio"),
    (["--rank-ratio", "0"], "--rank-ratio"),
    (["--rank-ratio", "abc"], "--rank-ratio"),
    (["--alpha", "nan"], "--alpha"),
    (["--alpha", "inf"], "--alpha"),
    (["--alpha", "-1"], "--alpha"),
    (["--k-real", "0"], "--k-real"),
    (["--k-real", "1.5"], "--k-real"),
    (["--seed", "-1"], "--seed"),
    (["--out-dtype", "foo"], "--out-dtype"),
    (["--out-dtype", "int32"], "--out-dtype"),
    (["--shard-size", "abc"], "--shard-size"),
    (["--shard-size", "0"], "--shard-size"),
    (["--threads", "0"], "--threads"),
    (["--oversample", "-1"], "--oversample"),
    (["--power-iters", "two"], "--power-iters"),
    (["--real-blend-beta", "nan"], "--real-blend-beta"),
    (["--method", "ties", "--density", "0"], "--density"),
    (["--method", "ties", "--scaling", "inf"], "--scaling"),
    (["--method", "foo"], "--method"),
    (["--device", "foo"], "device"),
    (["--bogus"], "--bogus"),
    (["--head-prefix", ""], "argument --head-prefix"),
    (["--exclude", ""], "argument --exclude"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_flag_exits_2_naming_it(tmp_path, inputs, capsys, extra, named):
    err = _fails(flags(inputs, tmp_path / "out") + extra, capsys, code=2)
    assert named in err and "_ratio_or_none" not in err and "invalid float" not in err, err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("key,value", [
    ("base", ["a.safetensors", "b.safetensors"]),
    ("base", 3),
    ("specialists", "a.safetensors"),
    ("specialists", [1, 2]),
    ("output", ["x"]),
    ("method", 5),
    ("method", "foo"),
    ("prefix", ["backbone."]),
    ("shard_size", "abc"),
    ("shard_size", [1]),
    ("device", "foo"),
    ("options", 3),
    ("allow_safe_globals", "yes"),
    ("rank_ratio", "x"),
    ("rank_ratio", 3),
    ("alpha", float("nan")),
    ("k_real", 0),
    ("seed", -1),
    ("seed", "3"),
    ("out_dtype", "foo"),
    ("exclude", "norm"),
    ("center", "yes"),
    ("power_iters", 1.5),
], ids=lambda v: repr(v) if not isinstance(v, str) else v)
def test_bad_yaml_value_exits_2_naming_the_key(tmp_path, inputs, capsys, key, value):
    data = {"base": str(inputs[0]), "specialists": [str(p) for p in inputs[1:]], "output": str(tmp_path / "out")}
    data[key] = value
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(data))
    err = _fails([str(config), "--quiet"], capsys, code=2)
    assert key in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options", [{"density": "x"}, {"density": 1.5}, {"scaling": float("inf")}], ids=str)
def test_bad_method_option_in_yaml_exits_2(tmp_path, inputs, capsys, options):
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"base": str(inputs[0]), "specialists": [str(p) for p in inputs[1:]],
                                      "output": str(tmp_path / "out"), "method": "ties", "options": options}))
    assert next(iter(options)) in _fails([str(config)], capsys, code=2)


def test_yaml_rank_ratio_none_string_means_no_truncation_and_null_run_keys_the_default(tmp_path, inputs, family):
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"base": str(inputs[0]), "specialists": [str(p) for p in inputs[1:]],
                                      "output": str(tmp_path / "out"), "rank_ratio": "none", "device": None,
                                      "prefix": None, "spill_dir": None, "shard_size": None, "options": None}))
    assert main([str(config), "--quiet"]) == 0
    expected = r2m_fast.merge(family[0], family[1:], rank_ratio=None).state_dict
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_data_failure_still_exits_1(tmp_path, inputs, capsys):
    inputs[2].write_bytes(inputs[1].read_bytes()[:-64])
    assert "truncated" in _fails(flags(inputs, tmp_path / "out"), capsys, code=1)


def test_k_real_above_n_is_recorded_as_used(tmp_path, inputs, family):
    assert main(flags(inputs, tmp_path / "out") + ["--k-real", "99"]) == 0
    written = yaml.safe_load((tmp_path / "out" / "merge_config.yaml").read_text())
    assert written["k_real"] == 3  # N
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["k_real"] <= 3
    expected = r2m_fast.merge(family[0], family[1:], k_real=3).state_dict
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # The recorded config repeats the merge.
    assert main([str(tmp_path / "out" / "merge_config.yaml"), "--output", str(tmp_path / "again"), "--quiet"]) == 0
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(again[k], expected[k]) for k in expected)


def test_cli_method_names_match_the_registry():
    from r2m_fast.baselines import METHODS

    assert cli.METHOD_NAMES == METHODS


def test_bad_flag_in_a_subprocess_is_one_line_exit_2(tmp_path, inputs):
    proc = subprocess.run([sys.executable, "-m", "r2m_fast"] + flags(inputs, tmp_path / "out") + ["--rank-ratio", "abc"],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "r2m-merge: error: argument --rank-ratio: expected a number in (0, 1] or 'none', got 'abc' "
        "(see r2m-merge --help)"]


def test_incremental_commands_follow_the_same_rules(tmp_path, inputs, capsys):
    assert main(["add", "--state", str(tmp_path), "--specialist", str(inputs[1]), "--k-real", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r2m-merge add: error: argument --k-real") and err.count("\n") == 1, err
    assert main(["remove", "--state", str(tmp_path), "--index", "-1"]) == 2
    assert "--index" in capsys.readouterr().err
    assert main(["add", "--state", str(tmp_path), "--specialist", str(inputs[1]), "--device", "foo"]) == 2
    assert "unknown device 'foo'" in capsys.readouterr().err
    assert main(["--save-state"] + flags(inputs, tmp_path / "o") + ["--alpha", "nan"]) == 2
    assert "--alpha" in capsys.readouterr().err


# --- 3. a device that cannot run here -------------------------------------------------------------------


@pytest.fixture()
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_without_gpu_cli_fails_before_any_work(tmp_path, inputs, capsys, monkeypatch, no_gpu):
    def never(*a, **k):
        raise AssertionError("a checkpoint was opened")

    monkeypatch.setattr(input_readers, "open_checkpoint", never)  # what every reader opens a checkpoint with
    for extra in (["--device", "cuda"], ["--device", "cuda", "--dry-run"], ["--device", "cuda:1", "--method", "ties"]):
        err = _fails(flags(inputs, tmp_path / "out") + extra, capsys, code=2)
        assert "no usable CUDA GPU" in err and "cuda" in err
    assert capsys.readouterr().out == ""  # the dry run estimated nothing
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"base": str(inputs[0]), "specialists": [str(p) for p in inputs[1:]],
                                      "output": str(tmp_path / "out"), "device": "cuda"}))
    assert "no usable CUDA GPU" in _fails([str(config)], capsys, code=2)
    assert "no usable CUDA GPU" in _fails(["--example", str(tmp_path / "ex"), "--device", "cuda"], capsys, code=2)
    assert not (tmp_path / "ex").exists()


def test_cuda_without_gpu_api(tmp_path, inputs, family, no_gpu):
    with pytest.raises(r2m_fast.DeviceUnavailable, match=r"device 'cuda': no usable CUDA GPU"):
        r2m_fast.merge(family[0], family[1:], device="cuda")
    with pytest.raises(r2m_fast.DeviceUnavailable, match=r"no usable CUDA GPU"):
        r2m_fast.merge(family[0], family[1:], method="ties", device=torch.device("cuda", 0))
    with pytest.raises(r2m_fast.DeviceUnavailable, match=r"no usable CUDA GPU"):
        r2m_fast.merge_files(inputs[0], inputs[1:], tmp_path / "out", device="cuda")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_cuda_index_out_of_range(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(r2m_fast.DeviceUnavailable, match=r"'cuda:3': only 1 CUDA device"):
        safety.check_device("cuda:3")
    assert safety.check_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        safety.check_device("gpu")


# --- 4. refused pickles ------------------------------------------------------------------------------


class CustomConfig:
    """A training script's own class: not loadable with weights_only=True, and never allowed."""

    def __init__(self):
        self.lr = 0.1


def _pickles(tmp_path, family):
    """base.pt plain; ns.pt with argparse.Namespace; np.pt with a numpy scalar and array; cls.pt with a custom class."""
    paths = {"base": tmp_path / "base.pt", "ns": tmp_path / "ns.pt", "np": tmp_path / "np.pt", "cls": tmp_path / "cls.pt"}
    torch.save(family[0], paths["base"])
    torch.save({"state_dict": family[1], "args": argparse.Namespace(lr=0.1, epochs=3)}, paths["ns"])
    torch.save({"state_dict": family[2], "best": np.float64(0.93), "history": np.arange(3, dtype=np.float32)},
               paths["np"])
    torch.save({"state_dict": family[3], "config": CustomConfig(), "args": argparse.Namespace(lr=0.1)}, paths["cls"])
    return paths


def test_refused_pickle_message_is_whole_plain_and_says_what_to_do(tmp_path, family, capsys):
    p = _pickles(tmp_path, family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torch warning may surface
        err = _fails(flags([p["base"], p["ns"], p["np"]], tmp_path / "out"), capsys, code=1)
    assert f"{p['ns']}: refused to unpickle argparse.Namespace" in err
    assert "--allow-safe-globals" in err and ".safetensors" in err and err.rstrip().endswith(".safetensors")
    err = _fails(flags([p["base"], p["np"], p["ns"]], tmp_path / "out"), capsys, code=1)
    assert str(p["np"]) in err and "numpy" in err and "scalar" in err and "--allow-safe-globals" in err
    err = _fails(flags([p["base"], p["cls"], p["ns"]], tmp_path / "out"), capsys, code=1)
    assert f"{CustomConfig.__module__}.CustomConfig" in err and "never allows it" in err and "safetensors" in err


def test_refused_legacy_pickle_names_the_global(tmp_path, family):
    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": family[1], "args": argparse.Namespace(lr=0.1)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(r2m_fast.MergeInputError, match=r"legacy\.pt: refused to unpickle argparse\.Namespace"):
        io.load_state_dict(path)
    with io.allowing_safe_globals():
        assert torch.equal(io.load_state_dict(path)["blocks.0.attn.qkv.weight"], family[1]["blocks.0.attn.qkv.weight"])


def test_allow_safe_globals_loads_numpy_and_namespace_only(tmp_path, family, capsys):
    p = _pickles(tmp_path, family)
    expected = r2m_fast.merge(family[0], family[1:3]).state_dict
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(flags([p["base"], p["ns"], p["np"]], out) + ["--allow-safe-globals"]) == 0
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert yaml.safe_load((out / "merge_config.yaml").read_text())["allow_safe_globals"] is True
    # The custom class stays refused, and only it is named.
    err = _fails(flags([p["base"], p["ns"], p["cls"]], tmp_path / "o2") + ["--allow-safe-globals"], capsys, code=1)
    assert "CustomConfig" in err and "argparse.Namespace" not in err
    # The API and YAML take the same option.
    result = r2m_fast.merge_files(p["base"], [p["ns"], p["np"]], tmp_path / "api", allow_safe_globals=True)
    assert result.report["output"] == str(tmp_path / "api")
    with pytest.raises(r2m_fast.MergeInputError, match="allow_safe_globals=True"):
        r2m_fast.merge_files(p["base"], [p["ns"], p["np"]], tmp_path / "api2")


def test_known_safe_globals_cover_numpy_1_names():
    names = safety.known_safe_global_names()
    for name in ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
                 "numpy.core.multiarray._reconstruct", "numpy.ndarray", "argparse.Namespace"):
        assert name in names
    assert not any(n.startswith(("builtins.", "os.", "subprocess.", "torch.")) for n in names)


def test_unparseable_pickle_says_so_briefly(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(r2m_fast.MergeInputError) as info:
        io.load_state_dict(tmp_path / "junk.pt")
    message = str(info.value)
    assert "junk.pt: not a readable PyTorch checkpoint" in message and "\n" not in message and "\x1b" not in message


# --- 5. leftovers of killed merges ----------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_folder_name_records_its_owner(tmp_path):
    tmp = safety.make_temp_dir(tmp_path, "out")
    assert tmp.name.startswith(f".out.tmp-{safety._host()}-{os.getpid()}-")


def test_next_merge_removes_temp_folders_of_dead_merges(tmp_path, inputs, caplog):
    host = safety._host()
    dead = tmp_path / f".out.tmp-{host}-{_dead_pid()}-abcd1234"
    dead_old = tmp_path / f".out.old-{host}-{_dead_pid()}-efgh5678"
    for folder in (dead, dead_old):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 5000)
    live = tmp_path / f".out.tmp-{host}-{os.getppid()}-live0000"  # pytest's parent runs
    other_host = tmp_path / f".out.tmp-elsewhere-{_dead_pid()}-remote00"
    legacy = tmp_path / ".out.tmp-k3j4h5g6"
    other_output = tmp_path / f".other.tmp-{host}-{_dead_pid()}-xxxx0000"
    for folder in (live, other_host, legacy, other_output):
        folder.mkdir()
    with caplog.at_level(logging.WARNING, logger="r2m_fast"):
        assert main(flags(inputs, tmp_path / "out")) == 0
    assert not dead.exists() and not dead_old.exists()
    assert live.exists() and other_host.exists() and legacy.exists() and other_output.exists()
    text = caplog.text
    assert f"removed {dead}" in text and "5.00 KB" in text and f"removed {dead_old}" in text
    assert str(live) in text and str(other_host) in text and str(legacy) in text and str(other_output) not in text


def test_sigkill_leftover_is_removed_by_the_next_merge(tmp_path, inputs, family):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "r2m_fast"] + flags(inputs, out) + ["--shard-size", "1KB"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(**{output.SINK_DELAY_ENV: "0.5"}),
    )
    temp = wait_until_writing(proc, tmp_path, timeout=90)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert temp.exists() and f"-{proc.pid}-" in temp.name  # what SIGKILL leaves behind
    assert main(flags(inputs, out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in inputs] + ["out"])
    expected = r2m_fast.merge(family[0], family[1:]).state_dict
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# --- 6. a full disk -------------------------------------------------------------------------------------


def _fake_free(monkeypatch, free: int):
    real = shutil.disk_usage

    def disk_usage(path):
        total, used, _ = real(path)
        return type(real(path))(total, used, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def test_output_that_does_not_fit_is_refused_before_pass_1(tmp_path, inputs, capsys, monkeypatch):
    _fake_free(monkeypatch, 20_000)

    def never(self, name):
        raise AssertionError("pass 1 started")

    monkeypatch.setattr(input_readers.FileSource, "load", never)
    err = _fails(flags(inputs, tmp_path / "out"), capsys, code=1)
    assert f"{tmp_path / 'out'}: not enough disk space in {tmp_path}" in err
    assert "the output needs" in err and "20.0 KB free" in err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    with pytest.raises(r2m_fast.OutputError) as info:
        r2m_fast.merge_files(inputs[0], inputs[1:], tmp_path / "api")
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)


def test_dry_run_reports_and_checks_the_space(tmp_path, inputs, capsys, monkeypatch):
    assert main(flags(inputs, tmp_path / "out") + ["--dry-run"]) == 0
    assert f"output disk space: needs" in capsys.readouterr().out
    _fake_free(monkeypatch, 20_000)
    assert main(flags(inputs, tmp_path / "out") + ["--dry-run"]) == 1
    captured = capsys.readouterr()
    assert "estimated time" in captured.out and "20.0 KB free" in captured.out
    assert "not enough disk space" in _one_line(captured.err)


def test_enospc_while_allocating_the_shards_removes_the_partial_output(tmp_path, inputs, capsys, monkeypatch):
    """The shards are allocated on the disk whole before pass 1 (the writer maps them): a disk that
    fills up under the merge fails there, with the shards allocated so far removed."""
    real = os.posix_fallocate
    calls = []

    def fallocate(fd, offset, length):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, length)

    def never(self, name):
        raise AssertionError("pass 1 started")

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    monkeypatch.setattr(input_readers.FileSource, "load", never)
    err = _fails(flags(inputs, tmp_path / "out") + ["--shard-size", "1KB"], capsys, code=1)
    assert f"{tmp_path / 'out'}: no space left on the device of {tmp_path}" in err
    assert "the output needs" in err and "free after removing the partial output" in err and ".tmp-" not in err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_enospc_while_writing_removes_the_partial_output(tmp_path, inputs, capsys, monkeypatch):
    """Where the file system cannot allocate a file ahead (no fallocate), the writer writes the
    tensors one by one, and a disk full at the third is the error."""
    real = output.write_tensor_data
    calls = []

    def write(handle, tensor):
        calls.append(1)
        if len(calls) == 3:
            real(handle, tensor[: tensor.shape[0] // 2])  # part of it made it to the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real(handle, tensor)

    def no_fallocate(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", no_fallocate)
    monkeypatch.setattr(output, "write_tensor_data", write)
    err = _fails(flags(inputs, tmp_path / "out") + ["--shard-size", "1KB"], capsys, code=1)
    assert f"{tmp_path / 'out'}: no space left on the device of {tmp_path}" in err
    assert "the output needs" in err and "free after removing the partial output" in err and ".tmp-" not in err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_enospc_at_flush_and_commit_removes_the_partial_output(tmp_path, inputs, capsys, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setenv("R2M_FSYNC", "1")  # the flush is opt-in; a disk full at write time is the test above
    err = _fails(flags(inputs, tmp_path / "out"), capsys, code=1)
    assert "no space left" in err and ".tmp-" not in err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# --- 8. small ones --------------------------------------------------------------------------------------


def test_permission_error_names_the_output_not_its_temp_folder(tmp_path, inputs, capsys, monkeypatch):
    import tempfile

    def mkdtemp(prefix="", dir=None, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "abcd"))

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    err = _fails(flags(inputs, tmp_path / "out"), capsys, code=1)
    assert err.startswith(f"r2m-merge: error: {tmp_path / 'out'}: cannot write the output folder") and ".tmp-" not in err
    assert "Permission denied" in err


def test_replaced_output_survives_a_failed_rename(tmp_path, inputs, monkeypatch):
    out = tmp_path / "out"
    assert main(flags(inputs, out)) == 0
    before = (out / "model.safetensors").read_bytes()
    real = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    assert main(flags(inputs, out) + ["--force", "--seed", "3"]) == 1
    assert (out / "model.safetensors").read_bytes() == before and _leftovers(tmp_path) == []

    def rename_old(src, dst):  # moving the old output aside fails
        if Path(src) == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(src))
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename_old)
    assert main(flags(inputs, out) + ["--force", "--seed", "3"]) == 1
    assert (out / "model.safetensors").read_bytes() == before and _leftovers(tmp_path) == []


def test_reference_is_an_attribute_after_import_r2m_fast():
    code = ("import sys, r2m_fast; assert 'torch' not in sys.modules; f = r2m_fast.reference.r2m_merge; "
            "import torch; sd = {'w': torch.ones(4, 3)}; "
            "r = r2m_fast.reference.r2m_merge(sd, [{'w': torch.ones(4, 3) * 1.1}, {'w': torch.ones(4, 3) * 0.9}], "
            "r2m_fast.R2MConfig()); print(type(r).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "MergeResult", proc.stderr


def test_generator_of_specialists(tmp_path, inputs, family):
    expected = r2m_fast.merge(family[0], family[1:]).state_dict
    got = r2m_fast.merge(family[0], (sd for sd in family[1:])).state_dict
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    ties = r2m_fast.merge(family[0], iter(family[1:]), method="ties").state_dict
    assert all(torch.equal(ties[k], v) for k, v in r2m_fast.merge(family[0], family[1:], method="ties").state_dict.items())
    r2m_fast.merge_files(inputs[0], (p for p in inputs[1:]), tmp_path / "out")
    written = yaml.safe_load((tmp_path / "out" / "merge_config.yaml").read_text())
    assert len(written["specialists"]) == 3
    files = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(files[k], expected[k]) for k in expected)


def test_ctrl_c_during_start_up_exits_130_in_process(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["--help"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "r2m-merge: interrupted; no partial output was left\n"


def test_cli_import_does_not_load_torch():
    code = "import sys, r2m_fast.cli; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


def test_ctrl_c_while_torch_loads_exits_130_without_traceback(tmp_path, inputs):
    # The console script's own two lines; torch is not loaded yet when main() starts, so SIGINT lands
    # while main() imports it (or later, in the merge): both inside main's handler.
    code = ("import sys\nfrom r2m_fast.cli import main\nprint('torch loaded:', 'torch' in sys.modules, flush=True)\n"
            f"sys.exit(main({[str(a) for a in flags(inputs, tmp_path / 'out')]!r}))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(**{output.SINK_DELAY_ENV: "0.5"}))
    assert proc.stdout.readline().strip() == "torch loaded: False"
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err == "r2m-merge: interrupted; no partial output was left\n"
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
