"""The GPU suite must not waste a GPU session on a crash: its --quick --device cpu mode runs the
whole script (checks, op timings, end-to-end merges, JSON/CSV output) on tiny CPU shapes in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).with_name("gpu_suite.py")


def test_gpu_suite_quick_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, str(SUITE), "--quick", "--device", "cpu", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, f"gpu_suite failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    (result,) = tmp_path.glob("gpu_suite_*.json")
    data = json.loads(result.read_text())
    assert data["checks"] and all(check["ok"] for check in data["checks"])
    providers = {row["provider"] for row in data["rows"]}
    assert {"torch", "naive_svd_lowrank"} <= providers, providers
    assert list(tmp_path.glob("gpu_suite_*.csv"))
    (profile,) = tmp_path.glob("gpu_suite_*_profile.txt")
    assert "## torch: pass seconds" in profile.read_text()
    assert all(row.get("pass_seconds") for row in data["rows"] if row["op"] == "merge_e2e" and row["provider"] == "torch")
    assert "checks:" in res.stdout and "passed" in res.stdout
