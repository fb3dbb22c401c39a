"""The range finder's CholeskyQR product q·R⁻¹ (R⁻¹ upper triangular) on the OpenBLAS path: a GEMM
(numpy.matmul) against the in-place triangular product r2m_fast.cpu_blas.upper_triangular_matmul_
(numpy's OpenBLAS strmm: half the flops). Single-threaded, as each layer worker runs; N = 3 items of
m × 214 by 214 × 214 for the 1 B model's row counts.

    python benchmarks/bench_trmm.py --out benchmarks/results/cpu_blas_trmm_<date>.md

Rounds alternate between the two; the report gives medians in GFLOP/s counted as the GEMM's flops
(2·m·s² per item), so the ratio is the speed-up.
"""

from __future__ import annotations

import os

import numpy
import torch
from threadpoolctl import threadpool_limits

from bench_cpu_blas import alternating_rates, parse_args, write_report
from r2m_fast import cpu_blas

N = 3
SIZES = {"full": (214, [2048, 5632, 32000]), "quick": (24, [96, 200])}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, __doc__)
    if cpu_blas._strmm() is None:
        raise SystemExit("bench_trmm: needs numpy with an OpenBLAS that exports cblas_strmm")
    torch.set_num_threads(1)
    s, rows_list = SIZES["quick" if args.quick else "full"]
    gen = torch.Generator().manual_seed(0)
    rows = []
    previous = os.environ.get(cpu_blas.CPU_BLAS_ENV)
    os.environ[cpu_blas.CPU_BLAS_ENV] = "openblas"
    cpu_blas.cpu_blas.cache_clear()
    try:
        with threadpool_limits(1, user_api="blas"):
            for m in rows_list:
                q = torch.randn(N, m, s, generator=gen)
                upper = torch.randn(N, s, s, generator=gen).triu() + 4 * torch.eye(s)
                product = numpy.empty((N, m, s), dtype=numpy.float32)
                runs = {
                    "gemm": lambda q=q.numpy(), u=upper.numpy(): numpy.matmul(q, u, out=product),
                    "trmm": lambda q=q, u=upper: cpu_blas.upper_triangular_matmul_(q, u),
                }
                rates = alternating_rates(runs, 2 * N * m * s * s, args.rounds)
                rows.append((f"q·R⁻¹ ({N}×{m}×{s} by {s}×{s})", rates["gemm"], rates["trmm"]))
                print(f"{rows[-1][0]:<36} gemm {rates['gemm']:6.1f}  trmm {rates['trmm']:6.1f} GFLOP/s", flush=True)
    finally:
        if previous is None:
            os.environ.pop(cpu_blas.CPU_BLAS_ENV, None)
        else:
            os.environ[cpu_blas.CPU_BLAS_ENV] = previous
        cpu_blas.cpu_blas.cache_clear()
    write_report(
        f"q·R⁻¹: GEMM (numpy.matmul) against in-place strmm, one thread, {args.rounds} alternating rounds",
        f"python benchmarks/bench_trmm.py --rounds {args.rounds}",
        ["product", "gemm GFLOP/s", "trmm GFLOP/s (GEMM flops)", "trmm / gemm"],
        [(name, f"{g:.1f}", f"{t:.1f}", f"{t / g:.2f}") for name, g, t in rows],
        args.out,
    )

if __name__ == "__main__":
    main()
