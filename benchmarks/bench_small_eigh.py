"""Pass 2's s×s eigenproblems four ways, side by side on one machine: cuSOLVER on the GPU, LAPACK
on the host in one call, and host thread pools with and without single-threaded LAPACK per worker.

    python benchmarks/bench_small_eigh.py [--batch 64] [--sizes 86 112] [--device cuda]

Prints the median milliseconds of each for the whole batch (a 2xViT-B+2xViT-L merge at N = 8 has
64 matrices of each size). The engine's choice is r2m_fast.engine.host_eigh.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from r2m_fast.engine import host_eigh


def pooled(mats: torch.Tensor, workers: int) -> None:
    host = mats.cpu()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(torch.linalg.eigh, host.chunk(workers)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[86, 112])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    print(f"# {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"{threads} intra-op threads; batch {args.batch}")
    for s in args.sizes:
        g = torch.Generator().manual_seed(s)
        a = torch.randn(args.batch, s, 2 * s, generator=g, dtype=torch.float64)
        mats = (a @ a.transpose(1, 2)).to(device)
        ways = {
            "device eigh": lambda: torch.linalg.eigh(mats),
            "host, one call": lambda: torch.linalg.eigh(mats.cpu()),
            f"host pool {threads}, full LAPACK threads": lambda: pooled(mats, threads),
            "host_eigh (pool, 1 LAPACK thread each)": lambda: host_eigh(mats),
        }
        for name, fn in ways.items():
            fn()
            times = []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append((time.perf_counter() - start) * 1e3)
            print(f"s={s:<4d} {name:<42s} {statistics.median(times):9.2f} ms")


if __name__ == "__main__":
    main()
