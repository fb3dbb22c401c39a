"""Smoke run of benchmarks/bench_trmm.py (small shapes, one round): the script CI keeps working."""

import pytest

from bench_trmm import main
from r2m_fast import cpu_blas


def test_bench_trmm_quick(tmp_path):
    if cpu_blas._scipy_trmm() is None or cpu_blas._numpy_openblas() is None:
        pytest.skip("needs numpy and scipy with OpenBLAS")
    out = tmp_path / "trmm.md"
    main(["--quick", "--rounds", "1", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| q·R⁻¹")]
    assert len(rows) == 2 and all(float(row.split("|")[2]) > 0 and float(row.split("|")[3]) > 0 for row in rows)
