"""Which BLAS multiplies R²M's CPU products faster here: torch's (MKL in the CPU wheels) or numpy's
(OpenBLAS in its wheels). Single-threaded, as each layer worker runs; the shapes of R²M's pass 2 at
the 1 B Llama model (N = 3, s = 214): F·P and Qᵀ·F for each matrix shape, and pass 3's L·Rᵀ.

    python benchmarks/bench_cpu_blas.py --out benchmarks/results/cpu_blas_<date>.md

Rounds alternate between the two BLAS; the report gives medians in GFLOP/s. r2m_fast.cpu_blas picks
OpenBLAS on AMD/Hygon CPUs (a fixed rule, not this timing, so one machine always gives one merge).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from typing import Callable

import numpy
import torch
from threadpoolctl import threadpool_limits

N = 3
SIZES = {"full": (214, [(2048, 2048), (2048, 5632), (5632, 2048)]), "quick": (24, [(96, 96), (96, 200), (200, 96)])}


def cases(size: str):
    S, shapes = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    for m, n in shapes:
        f = torch.randn(N, m, n, generator=gen)
        p = torch.randn(N, n, S, generator=gen)
        q = torch.randn(N, m, S, generator=gen)
        flops = 2 * N * m * n * S
        yield f"F·P ({N}×{m}×{n} by {n}×{S})", flops, (lambda f=f, p=p: torch.bmm(f, p)), (
            lambda f=f.numpy(), p=p.numpy(): numpy.matmul(f, p))
        yield f"Qᵀ·F ({N}×{S}×{m} by {m}×{n})", flops, (lambda f=f, q=q: torch.bmm(q.transpose(1, 2), f)), (
            lambda f=f.numpy(), q=q.numpy(): numpy.matmul(q.transpose(0, 2, 1), f))
    m, n = shapes[1]
    k = N * (S - 10)
    left, right = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    yield f"L·Rᵀ ({m}×{k} by {k}×{n})", 2 * m * n * k, (lambda: left @ right.T), (
        lambda a=left.numpy(), b=right.numpy(): numpy.matmul(a, b.T))


def parse_args(argv: list[str] | None, doc: str) -> argparse.Namespace:
    """--rounds, --quick and --out, the options of the single-threaded BLAS benchmarks."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small shapes (the CI smoke run)")
    parser.add_argument("--out", help="write the Markdown table here too")
    return parser.parse_args(argv)


def alternating_rates(runs: dict[str, Callable[[], object]], flops: float, rounds: int) -> dict[str, float]:
    """GFLOP/s of each run (`flops` per call): one warm-up call each, then `rounds` rounds that call
    them in turn, each run's median time."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    for run in runs.values():
        run()
    for _ in range(rounds):
        for label, run in runs.items():
            t = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - t)
    return {label: flops / statistics.median(ts) / 1e9 for label, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, __doc__)
    torch.set_num_threads(1)
    rows = []
    with threadpool_limits(1, user_api="blas"):
        for name, flops, with_torch, with_numpy in cases("quick" if args.quick else "full"):
            rates = alternating_rates({"torch": with_torch, "numpy": with_numpy}, flops, args.rounds)
            rows.append((name, rates["torch"], rates["numpy"]))
            print(f"{name:<36} torch {rates['torch']:6.1f}  numpy {rates['numpy']:6.1f} GFLOP/s", flush=True)
    write_report(
        f"CPU BLAS: torch (MKL) against numpy (OpenBLAS), one thread, {args.rounds} alternating rounds",
        f"python benchmarks/bench_cpu_blas.py --rounds {args.rounds}",
        ["product", "torch GFLOP/s", "numpy GFLOP/s", "numpy / torch"],
        [(name, f"{t:.1f}", f"{n:.1f}", f"{n / t:.2f}") for name, t, n in rows],
        args.out,
    )


def write_report(title: str, command: str, columns: list[str], rows: list[tuple[str, ...]], out: str | None) -> None:
    """Print a Markdown table of `rows` under its title, the command, the date, the CPU and the versions;
    write it to `out` too when given."""
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    lines = [
        f"# {title}",
        "",
        f"`{command}` — {datetime.date.today()}, {model}, "
        f"torch {torch.__version__}, numpy {numpy.__version__}, {platform.python_version()}",
        "",
        "| " + " | ".join(columns) + " |",
        "|---|" + "---:|" * (len(columns) - 1),
    ] + ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)

if __name__ == "__main__":
    main()
