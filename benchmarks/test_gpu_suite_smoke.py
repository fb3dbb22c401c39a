"""The GPU suite must not waste a GPU session on a crash: its --quick --device cpu mode runs the
whole script (checks, op timings, end-to-end merges, JSON/CSV output) on tiny CPU shapes in CI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).with_name("gpu_suite.py")


def test_gpu_suite_quick_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # This checkout's r2m_fast, whatever an editable install elsewhere points at.
    env["PYTHONPATH"] = os.pathsep.join([str(SUITE.parent.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    res = subprocess.run(
        [sys.executable, str(SUITE), "--quick", "--device", "cpu", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, f"gpu_suite failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    (result,) = tmp_path.glob("gpu_suite_*_quick.json")
    data = json.loads(result.read_text())
    assert data["checks"] and all(check["ok"] for check in data["checks"])
    providers = {row["provider"] for row in data["rows"]}
    assert {"torch", "naive_svd_lowrank"} <= providers, providers
    assert list(tmp_path.glob("gpu_suite_*.csv"))
    (profile,) = tmp_path.glob("gpu_suite_*_profile.txt")
    assert "## torch: pass seconds" in profile.read_text()
    assert all(row.get("pass_seconds") for row in data["rows"] if row["op"] == "merge_e2e" and row["provider"] == "torch")
    assert "checks:" in res.stdout and "passed" in res.stdout
    check_summary(tmp_path, data)


def check_summary(out: Path, data: dict) -> None:
    """summary.json has exactly the issue-16 schema, one row per small_eigh case and per summary merge."""
    (path,) = out.glob("gpu_*_*/summary.json")
    summary = json.loads(path.read_text())
    assert path.parent.name == f"gpu_{summary['card']}_{summary['date']}"
    assert list(summary) == ["card", "date", "commit", "small_eigh", "merges"]
    assert summary["card"] == "cpu" and summary["commit"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", summary["date"])
    assert summary["small_eigh"] and summary["merges"]
    for row in summary["small_eigh"]:
        assert list(row) == ["s", "batch", "dtype", "torch_ms", "r2m_ms"]
        assert isinstance(row["s"], int) and isinstance(row["batch"], int) and row["dtype"] in ("fp32", "fp64")
        assert row["torch_ms"] > 0 and row["r2m_ms"] > 0
    assert {(r["s"], r["dtype"]) for r in summary["small_eigh"]} >= {(8, "fp32"), (33, "fp32"), (33, "fp64")}
    for row in summary["merges"]:
        assert list(row) == ["model", "N", "dtype", "backend", "seconds", "naive_seconds", "floor_seconds", "launches"]
        assert "vit-l" in row["model"] or "8b" in row["model"], row["model"]
        assert row["backend"] == "torch"  # the only backend on CPU without the interpreter
        assert row["seconds"] > 0 and row["naive_seconds"] > 0 and row["floor_seconds"] > 0
        assert isinstance(row["launches"], int) and row["launches"] > 0
    models = {(r["model"], r["N"]) for r in summary["merges"]}
    assert sum("vit-l" in m for m, _ in models) == 2, models  # N = 3 and 8
    assert any("8b" in m and N == 3 and "pinned-host" not in m for m, N in models), models
    assert any("8b" in m and N == 8 and m.endswith("/pinned-host") for m, N in models), models
    # The suite's own JSON keeps the longer rows: pass seconds and the solver each merge used.
    fast = [r for r in data["summary"]["merges"] if r["summary"]]
    assert all(r["pass_seconds"] and r["small_eigh"] == "torch.linalg.eigh (cpu tensors)" for r in fast)
    assert data["summary_json"] == str(path)
