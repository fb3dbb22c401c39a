"""Smoke run of benchmarks/bench_trmm.py (small shapes, one round): the script CI keeps working."""

import pytest

from bench_trmm import main
from r2m_fast import cpu_blas


def test_bench_trmm_quick(tmp_path):
    if cpu_blas._strmm() is None:
        pytest.skip("needs numpy with an OpenBLAS that exports cblas_strmm")
    out = tmp_path / "trmm.md"
    main(["--quick", "--rounds", "1", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| q·R⁻¹")]
    assert len(rows) == 2 and all(float(row.split("|")[2]) > 0 and float(row.split("|")[3]) > 0 for row in rows)
