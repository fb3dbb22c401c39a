"""Incremental re-merge: add equals a from-scratch merge with the same seed bit for bit (CPU, torch
backend, one thread: the saved sketches are the very products a fresh merge computes, and the add
recomputes the whole Gram in the same GEMM); remove reuses the old Gram block, which a fresh merge of
the kept models may round differently (MKL picks small-GEMM kernels by shape), so it is checked to a
tolerance far below any model difference."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import r2m_fast
from models import model_family
from r2m_fast import cli
from r2m_fast import incremental as inc
from r2m_fast.config import R2MConfig
from r2m_fast.io import load_state_dict
from r2m_fast.plan import MergeInputError
from tolerances import REMOVE_UPDATE, STATE_GRAM_RTOL

CONFIG = R2MConfig(rank_ratio=0.2, head_prefix="head.", backend="torch", range_finder_precision="fp32")


def assert_close_update(got: dict, want: dict, base: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        update = (want[name].double() - base[name].double()).norm()
        err = (got[name].double() - want[name].double()).norm()
        assert err <= REMOVE_UPDATE[1] * update + REMOVE_UPDATE[0], f"{name}: {err:.3g} vs update {update:.3g}"


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), f"{name}: max diff {(got[name].double() - want[name].double()).abs().max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_add_then_remove_equal_from_scratch(dtype):
    models = model_family(4, dtype, seed=11)
    base, specs = models[0], models[1:]
    first, state = inc.merge_with_state(base, specs[:3], CONFIG)
    assert_same(first.state_dict, r2m_fast.merge(base, specs[:3], CONFIG).state_dict)

    added, state4 = inc.add_specialist(state, base, specs[:3], specs[3])
    assert_same(added.state_dict, r2m_fast.merge(base, specs, CONFIG).state_dict)
    assert state4.num_specialists == 4 and added.report["incremental"]["operation"] == "add"

    removed, state3 = inc.remove_specialist(state4, base, specs, 1)
    kept = [specs[0], specs[2], specs[3]]
    assert_close_update(removed.state_dict, r2m_fast.merge(base, kept, CONFIG).state_dict, base)
    # The state after a remove is the state a fresh merge of the kept models would save (sketches
    # exactly; Grams up to the rounding of a GEMM of another shape).
    _, fresh = inc.merge_with_state(base, kept, CONFIG)
    for name, gram in fresh.grams.items():
        assert torch.allclose(state3.grams[name], gram, rtol=STATE_GRAM_RTOL, atol=0), name
    for name in fresh.sketch_names:
        assert torch.equal(state3.sketch(name), fresh.sketch(name)), name


def test_remerge_options_and_their_limits():
    models = model_family(3, seed=2)
    base, specs = models[0], models[1:]
    _, state = inc.merge_with_state(base, specs[:2], CONFIG)
    # α does not enter pass 1: an add may change it and still equals a fresh merge with it.
    added, _ = inc.add_specialist(state, base, specs[:2], specs[2], alpha=0.3)
    assert_same(added.state_dict, r2m_fast.merge(base, specs, CONFIG.replace(alpha=0.3)).state_dict)
    with pytest.raises(ValueError, match="cannot change seed"):
        inc.add_specialist(state, base, specs[:2], specs[2], seed=1)
    with pytest.raises(MergeInputError, match="R²M needs at least 2"):
        inc.remove_specialist(state, base, specs[:2], 0)
    with pytest.raises(MergeInputError, match="holds 2 specialists, 1 were given"):
        inc.add_specialist(state, base, specs[:1], specs[2])


def test_changed_old_model_is_refused_in_memory():
    models = model_family(3, seed=4)
    base, specs = models[0], models[1:]
    _, state = inc.merge_with_state(base, specs, CONFIG)
    changed = dict(specs[1])
    w = changed["blocks.0.mlp.fc1.weight"]
    changed["blocks.0.mlp.fc1.weight"] = w + 0.5 * (w - base["blocks.0.mlp.fc1.weight"])
    old = [specs[0], changed, specs[2]]
    with pytest.raises(MergeInputError, match=r"specialists\[1\]: tensor 'blocks.0.mlp.fc1.weight' differs from the model merged"):
        inc.add_specialist(state, base, old, specs[0])
    # A remove has no pass 1: the kept models are checked at their first load, before anything is returned.
    with pytest.raises(MergeInputError, match=r"differs from the model merged when the state was saved"):
        inc.remove_specialist(state, base, old, 0)


def _write(models, folder):
    folder.mkdir()
    paths = []
    for i, model in enumerate(models):
        path = folder / ("base.safetensors" if i == 0 else f"s{i}.safetensors")
        save_file(model, str(path))
        paths.append(path)
    return paths[0], paths[1:]


def test_files_state_round_trip_add_and_remove_cli(tmp_path):
    models = model_family(3, seed=7)
    base, specs = _write(models, tmp_path / "in")
    out = tmp_path / "merged"
    inc.merge_files_with_state(base, specs[:2], out, CONFIG, shard_size=20_000)
    assert_same(load_state_dict(out), r2m_fast.merge(models[0], models[1:3], CONFIG).state_dict)

    # Round trip: the loaded state is the in-memory one.
    _, mem = inc.merge_with_state(models[0], models[1:3], CONFIG)
    loaded = inc.load_state(out)  # the merged folder or its r2m_state/ both work
    meta = json.loads((out / inc.STATE_DIR / inc.STATE_JSON).read_text())
    assert meta["num_specialists"] == 2 and meta["seed"] == 0 and len(meta["specialists"]) == 2
    assert loaded.config == mem.config and loaded.range_finder_dtype == mem.range_finder_dtype
    for name, gram in mem.grams.items():
        assert torch.equal(loaded.grams[name], gram), name
    for name in mem.sketch_names:
        assert torch.equal(loaded.sketch(name), mem.sketch(name)), name

    # add through the CLI, in place (no --output: the merged folder is rewritten with its new state)
    assert cli.main(["add", "--state", str(out / inc.STATE_DIR), "--specialist", str(specs[2]), "--quiet"]) == 0
    assert_same(load_state_dict(out), r2m_fast.merge(models[0], models[1:], CONFIG).state_dict)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["incremental"]["operation"] == "add" and inc.load_state(out).num_specialists == 3

    # remove by recorded path into a new folder; the removed model is not read, so it may be gone
    specs[0].rename(tmp_path / "moved.safetensors")
    out2 = tmp_path / "removed"
    assert cli.main(["remove", "--state", str(out), "--specialist", str(specs[0]), "--output", str(out2), "--quiet"]) == 0
    want = r2m_fast.merge(models[0], [models[2], models[3]], CONFIG).state_dict
    assert_close_update(load_state_dict(out2), want, models[0])


def test_changed_file_is_refused_before_reading(tmp_path, capsys):
    models = model_family(3, seed=9)
    base, specs = _write(models, tmp_path / "in")
    out = tmp_path / "merged"
    assert cli.main(["merge", "--save-state", "--base", str(base), "--specialist", str(specs[0]), "--specialist", str(specs[1]),
                     "--output", str(out), "--rank-ratio", "0.2", "--head-prefix", "head.", "--backend", "torch",
                     "--range-finder-precision", "fp32", "--quiet"]) == 0
    assert inc.load_state(out).config == CONFIG
    changed = dict(models[2])
    changed["pos_embed"] = changed["pos_embed"] + 1e-3
    save_file(changed, str(specs[1]))
    with pytest.raises(MergeInputError, match=r"s2.safetensors: checkpoint file has changed since the state was saved \(content differs\)"):
        inc.add_specialist_files(out, specs[2], output=tmp_path / "o")
    assert cli.main(["add", "--state", str(out), "--specialist", str(specs[2]), "--output", str(tmp_path / "o")]) == 1
    assert "has changed since the state was saved" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_r2m_merge_command_dispatches_add_and_remove(tmp_path):
    """`r2m-merge --save-state`, `r2m-merge add` and `r2m-merge remove` reach the incremental commands."""
    from safetensors.torch import save_file

    models = model_family(3, with_buffer=False)
    paths = []
    for i, sd in enumerate(models):
        path = tmp_path / f"m{i}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        paths.append(str(path))
    out = tmp_path / "merged"
    args = ["--base", paths[0], "--specialist", paths[1], "--specialist", paths[2], "--output", str(out), "--quiet"]
    assert cli.main(args + ["--save-state"]) == 0
    assert (out / "r2m_state").is_dir()
    assert cli.main(["add", "--state", str(out / "r2m_state"), "--specialist", paths[3], "--quiet"]) == 0
    assert cli.main(["remove", "--state", str(out / "r2m_state"), "--index", "2", "--quiet"]) == 0


def test_save_state_is_a_flag_of_merge_with_one_line_errors(tmp_path, capsys):
    """--save-state is parsed as any flag (after a subcommand or a CONFIG too), and what it cannot do
    is refused with exit 2 and one line; the old `python -m r2m_fast.incremental` form still works."""
    import subprocess
    import sys

    assert cli.build_parser().parse_args(["c.yaml", "--save-state"]).save_state
    models = model_family(2, seed=3, with_buffer=False)
    base, specs = _write(models, tmp_path / "in")
    args = ["--base", str(base), "--specialist", str(specs[0]), "--specialist", str(specs[1]), "--quiet"]
    assert cli.main(["merge", "--save-state", "--method", "ties", "--output", str(tmp_path / "t"), *args]) == 2
    assert cli.main(["--save-state", "--spill-dir", str(tmp_path), "--output", str(tmp_path / "s"), *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["r2m-merge: error: --save-state: a merge state exists for method r2m only",
                   "r2m-merge: error: --spill-dir does not combine with --save-state"]
    assert cli.main(["add", "--state", str(tmp_path / "missing"), "--specialist", str(specs[0]), "--bogus"]) == 2
    assert "r2m-merge add: error: unrecognized arguments: --bogus" in capsys.readouterr().err
    run = subprocess.run([sys.executable, "-m", "r2m_fast.incremental", "merge", "--output", str(tmp_path / "m"),
                          "--rank-ratio", "0.2", *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert inc.load_state(tmp_path / "m").num_specialists == 2
