"""Smoke run of benchmarks/bench_cpu_blas.py (small shapes, one round): the script CI keeps working."""

from bench_cpu_blas import main


def test_bench_cpu_blas_quick(tmp_path):
    out = tmp_path / "cpu_blas.md"
    main(["--quick", "--rounds", "1", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| F·P") or line.startswith("| L·Rᵀ")]
    assert len(rows) == 4 and all(float(row.split("|")[2]) > 0 for row in rows)
