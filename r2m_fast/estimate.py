"""What --dry-run predicts: seconds and peak RSS of a file merge, from probes of this machine.

A fixed assumed rate is off by 5× or more between machines (and on one machine under load), so the
dry run measures, in well under a second each: the read rate of the first input (its mapped pages
copied once), the fp32 GEMM rate at R²M's shapes, the per-element cost of the merge's elementwise
work (the method's own CPU code on synthetic tensors) and the write rate of the output's folder
(with an fsync when the writer does one). The process's own RSS (torch alone is hundreds of MB) and its
start-up time so far are counted as they are.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from r2m_fast import cpu_blas
from r2m_fast.pipeline import cpu_workers, one_thread_per_worker, ordered_map, proc_kib_field

PROBE_ELEMENTS = 1 << 22


@dataclass
class Rates:
    read_bytes_per_s: float
    write_bytes_per_s: float
    gemm_flops: float
    element_seconds: float   # per element of one tensor of the N+1 models, the method's elementwise work
    startup_seconds: float   # this process so far (interpreter, imports)
    baseline_rss: int        # bytes resident now


def process_rss() -> int:
    rss = proc_kib_field("/proc/self/status", "VmRSS")
    if rss is not None:
        return rss
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def process_age() -> float:
    """Seconds since this process started (0 where /proc is missing)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def probe_read(source, limit: int = 64 * 2**20) -> float:
    """Bytes/s of the first tensors of the base as a merge reads them (mapped pages copied once)."""
    done, seconds = 0, 0.0
    for name in source.specs():
        view = source._checkpoints[0].view(name)
        if not view.dtype.is_floating_point or view.numel() == 0:
            continue
        flat = view.reshape(-1)[: max(1, limit // view.element_size())]
        buf = torch.empty_like(flat)
        buf.fill_(0)  # fault the destination in first: only the read is timed
        t = time.perf_counter()
        buf.copy_(flat)
        seconds += time.perf_counter() - t
        done += flat.numel() * flat.element_size()
        source._checkpoints[0].release(name)
        if done >= limit:
            break
    return done / seconds if seconds > 0 else 1e9


def probe_write(folder: Path, sync: bool, nbytes: int = 32 * 2**20) -> float:
    folder = folder if folder.is_dir() else Path(tempfile.gettempdir())
    data = bytes(nbytes)
    try:
        fd, path = tempfile.mkstemp(prefix=".r2m-probe-", dir=folder)
    except OSError:
        return 1e9
    try:
        t = time.perf_counter()
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        return nbytes / max(time.perf_counter() - t, 1e-6)
    finally:
        os.unlink(path)


def probe_gemm(device: torch.device, width: int = 1024, cols: int = 112, batch: int = 3) -> float:
    """fp32 GEMM rate as the merge multiplies: with its BLAS (r2m_fast.cpu_blas) and, on a CPU, one
    product per layer worker at a time, each single-threaded (see r2m_fast.pipeline.cpu_workers)."""
    workers = cpu_workers(device)
    a = torch.randn(batch, 2 * width, width, device=device)
    b = torch.randn(batch, width, cols, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def products() -> None:
        list(ordered_map(lambda: cpu_blas.matmul(a, b), [()] * workers, workers))
        sync()

    best = math.inf
    with one_thread_per_worker(workers):
        products()
        for _ in range(3):
            t = time.perf_counter()
            products()
            best = min(best, time.perf_counter() - t)
    return workers * 2 * batch * 2 * width * width * cols / best


def probe_elements(method: str, N: int, dtype: torch.dtype = torch.float32) -> float:
    """Seconds per element (of one tensor) of the method's elementwise work over N+1 inputs of
    `dtype` (the models' own: a bf16 element costs less to read and convert than an fp32 one), best
    of two; for R²M the average stands in for one pass's task-vector and combination work."""
    from r2m_fast.baselines import TiesOptions, _linear_cpu, _ties_cpu

    tensors = [torch.randn(PROBE_ELEMENTS).to(dtype) for _ in range(N + 1)]
    labels = ["probe"] * (N + 1)
    run = (lambda: _ties_cpu("probe", tensors, labels, TiesOptions(), dtype)) if method == "ties" else (
        lambda: _linear_cpu("probe", tensors, labels, 1.0, True, dtype))
    run()
    best = math.inf
    for _ in range(2):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best / PROBE_ELEMENTS


def main_dtype(specs) -> torch.dtype:
    """The floating dtype that holds most of a model's elements (fp32 for a model without one)."""
    counts: dict[torch.dtype, int] = {}
    for shape, dtype in specs.values():
        if dtype.is_floating_point:
            counts[dtype] = counts.get(dtype, 0) + math.prod(shape)
    return max(counts, key=counts.get) if counts else torch.float32


def calibrate(source, method: str, N: int, output: Optional[str]) -> Rates:
    from r2m_fast.pipeline import fsync_output

    startup = process_age()
    rss = process_rss()
    out_parent = Path(output).absolute().parent if output else Path.cwd()
    return Rates(
        read_bytes_per_s=probe_read(source),
        write_bytes_per_s=probe_write(out_parent, fsync_output()),
        gemm_flops=probe_gemm(source.device),
        element_seconds=probe_elements(method, N, main_dtype(source.specs())),
        startup_seconds=startup,
        baseline_rss=rss,
    )
