"""Sharded merges on 2 gloo ranks (CPU, 127.0.0.1) equal the single-process merge bit for bit.

Every rank runs one thread, as the single-process reference here does: the exchanged Grams and kept
σ² are exact, so the only thing that could differ is GEMM rounding, which depends on thread counts.
Each spawn is bounded (init timeout and a join deadline), so a hang fails instead of blocking CI.
"""

from __future__ import annotations

import datetime
import os
import stat
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

import r2m_fast
from models import model_family
from r2m_fast.config import R2MConfig
from r2m_fast.distributed import assign_layers
from r2m_fast.io import load_state_dict
from r2m_fast.output import umask
from r2m_fast.plan import build_plan

CONFIG = R2MConfig(rank_ratio=0.2, head_prefix="head.", backend="torch", range_finder_precision="fp32")
WORLD = 2
DEADLINE_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, folder: str) -> None:
    """One rank: an in-memory merge (its layers saved for the parent), a file merge, a failing merge."""
    from r2m_fast.distributed import RankFailed, merge_distributed, merge_files_distributed
    from r2m_fast.sources import DictSource

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    d = Path(folder)
    try:
        models = torch.load(d / "models.pt")
        result = merge_distributed(DictSource(models[0], models[1:]), CONFIG)
        torch.save({"state_dict": result.state_dict, "report": result.report}, d / f"part{rank}.pt")
        # Each rank spilling its sketches and factors into a folder of its own under d/spill.
        result = merge_distributed(DictSource(models[0], models[1:]), CONFIG, spill_dir=d / "spill")
        torch.save({"state_dict": result.state_dict, "report": result.report}, d / f"spilled{rank}.pt")
        specialists = [d / f"s{i}.safetensors" for i in range(1, len(models))]
        merge_files_distributed(d / "base.safetensors", specialists, d / "out", CONFIG, shard_size=20_000)
        # bad.safetensors has a NaN in a tensor one rank owns: every rank must stop with its message.
        try:
            merge_files_distributed(d / "base.safetensors", [specialists[0], d / "bad.safetensors"], d / "bad_out",
                                    CONFIG)
            (d / f"error{rank}.txt").write_text("no error")
        except (RankFailed, ValueError) as exc:
            (d / f"error{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
    except BaseException:
        (d / f"crash{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(folder: Path) -> None:
    ctx = mp.start_processes(_worker, args=(free_port(), str(folder)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed merge did not finish in {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def test_two_gloo_ranks_equal_single_process(tmp_path):
    models = model_family(3, seed=5)
    torch.save(models, tmp_path / "models.pt")
    (tmp_path / "spill").mkdir()
    save_file(models[0], str(tmp_path / "base.safetensors"))
    for i, model in enumerate(models[1:], 1):
        save_file(model, str(tmp_path / f"s{i}.safetensors"))
    bad = dict(models[2])
    bad["blocks.0.mlp.fc1.weight"] = bad["blocks.0.mlp.fc1.weight"].clone()
    bad["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(bad, str(tmp_path / "bad.safetensors"))

    run_ranks(tmp_path)
    for rank in range(WORLD):
        assert not (tmp_path / f"crash{rank}.txt").exists(), (tmp_path / f"crash{rank}.txt").read_text()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = r2m_fast.merge(models[0], models[1:], CONFIG)
    finally:
        torch.set_num_threads(threads)

    parts = [torch.load(tmp_path / f"part{rank}.pt") for rank in range(WORLD)]
    assert all(p["state_dict"] for p in parts), "every rank merges some layers"
    assert not set(parts[0]["state_dict"]) & set(parts[1]["state_dict"]), "each layer on one rank"
    got = {**parts[0]["state_dict"], **parts[1]["state_dict"]}
    assert set(got) == set(want.state_dict)
    for name, tensor in want.state_dict.items():
        assert torch.equal(got[name], tensor), name
    for key in ("core_norm", "eta", "residual_norms", "eigenvalues", "core_coeffs", "layers", "ranks"):
        assert parts[0]["report"][key] == want.report[key] == parts[1]["report"][key], key
    assert parts[0]["report"]["distributed"]["world_size"] == WORLD

    spilled = [torch.load(tmp_path / f"spilled{rank}.pt") for rank in range(WORLD)]
    got = {**spilled[0]["state_dict"], **spilled[1]["state_dict"]}
    assert set(got) == set(want.state_dict)
    for name, tensor in want.state_dict.items():
        assert torch.equal(got[name], tensor), name
    ranks = spilled[0]["report"]["distributed"]["ranks"]
    assert all(r["spill_bytes"] > 0 for r in ranks)
    assert spilled[0]["report"]["spill_bytes"] == sum(r["spill_bytes"] for r in ranks)
    assert os.listdir(tmp_path / "spill") == []

    out = tmp_path / "out"
    written = load_state_dict(out)
    assert set(written) == set(want.state_dict)
    for name, tensor in want.state_dict.items():
        assert torch.equal(written[name], tensor), name
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "merge_report.json" in files and "merge_config.yaml" in files
    assert "README.md" in files  # the model card, as a single-process merge writes it
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")], "temporary folders removed"

    errors = [(tmp_path / f"error{rank}.txt").read_text() for rank in range(WORLD)]
    assert all("NaN/Inf" in e for e in errors), errors
    assert sum(e.startswith("MergeInputError") for e in errors) == 1  # the owner raises, the other names it
    assert any(e.startswith("RankFailed: rank") for e in errors)
    assert not (tmp_path / "bad_out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad_out")]


def test_torchrun_entry_point(tmp_path):
    models = model_family(2, seed=1)
    save_file(models[0], str(tmp_path / "base.safetensors"))
    for i, model in enumerate(models[1:], 1):
        save_file(model, str(tmp_path / f"s{i}.safetensors"))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "r2m_fast.distributed",
        "--base", str(tmp_path / "base.safetensors"), "--specialist", str(tmp_path / "s1.safetensors"),
        "--specialist", str(tmp_path / "s2.safetensors"), "--output", str(tmp_path / "out"),
        "--rank-ratio", "0.2", "--backend", "torch", "--range-finder-precision", "fp32", "--threads", "1",
        "--quiet", "--dist-timeout", "60",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE_S, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = r2m_fast.merge(models[0], models[1:], R2MConfig(rank_ratio=0.2, backend="torch", range_finder_precision="fp32"))
    finally:
        torch.set_num_threads(threads)
    got = load_state_dict(tmp_path / "out")
    for name, tensor in want.state_dict.items():
        assert torch.equal(got[name], tensor), name


def test_assignment_is_balanced_and_deterministic():
    specs = {f"l{i}": ((64, 64), torch.float32) for i in range(6)}
    specs.update({"big": ((256, 64), torch.float32), "b": ((64,), torch.float32)})
    plan = build_plan(specs, R2MConfig())
    owner = assign_layers(plan, 2)
    assert owner == assign_layers(plan, 2) and set(owner) == set(specs)
    loads = [sum(layer.numel for layer in plan if owner[layer.name] == r) for r in range(2)]
    assert owner["big"] == 0 and abs(loads[0] - loads[1]) <= 64 * 64
    equal = build_plan({f"l{i}": ((8, 8), torch.float32) for i in range(5)}, R2MConfig())
    assert [assign_layers(equal, 3)[f"l{i}"] for i in range(5)] == [0, 1, 2, 0, 1]  # round robin


def test_entry_point_refuses_bad_values_with_exit_2_before_any_process_group(tmp_path, capsys):
    """r2m_fast.distributed's entry point shares r2m-merge's error handler (r2m_fast.cli.run_command)."""
    from safetensors.torch import save_file

    from r2m_fast.distributed import main

    path = str(tmp_path / "m.safetensors")
    save_file({"w": torch.zeros(2, 2)}, path)
    common = ["--base", path, "--specialist", path, "--output", str(tmp_path / "out")]
    assert main([*common, "--specialist", path, "--method", "ties"]) == 2
    assert main(common) == 2
    assert capsys.readouterr().err.splitlines() == [
        "r2m_fast.distributed: error: the distributed merge runs method r2m only, without --example or --dry-run",
        "r2m_fast.distributed: error: need at least 2 specialists: --specialist PATH (repeat) or 'specialists:' in the config",
    ]
