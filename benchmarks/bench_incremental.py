"""Incremental re-merge and multi-process merging, timed on a synthetic ViT (CPU).

    python benchmarks/bench_incremental.py                      # width 384, depth 6, writes results/incremental_<date>.md
    python benchmarks/bench_incremental.py --width 768 --depth 12 --repeats 3

Part 1 (in memory, one thread): a full merge of N+1 specialists vs an add of the (N+1)-th to the saved
state of N, at N = 4 → 5 and 8 → 9, and a remove back to N; the add is checked bit-identical to the
full merge. Part 2 (files on disk): the same merge by 1 process (1 and 2 threads) and by 1 and 2 gloo
ranks of one thread each, the outputs compared with the single-process one. Times are the best of
`--repeats`; every figure comes from one run of this script on one machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import synthetic_family, vit_shapes  # noqa: E402

import r2m_fast  # noqa: E402
from r2m_fast import incremental as inc  # noqa: E402
from r2m_fast.config import R2MConfig  # noqa: E402

CONFIG = R2MConfig(rank_ratio=0.1, backend="torch", range_finder_precision="fp32")


def best(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def max_rel_diff(a: dict, b: dict, base: dict) -> float:
    """max over tensors of ‖a − b‖ / ‖b − θ₀‖ (0 when bit-identical)."""
    worst = 0.0
    for k in b:
        update = float((b[k].double() - base[k].double()).norm())
        worst = max(worst, float((a[k].double() - b[k].double()).norm()) / max(update, 1e-30))
    return worst


def incremental_rows(shapes, sizes, repeats, config=None, device="cpu"):
    config = config or CONFIG
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for n in sizes:
        models = synthetic_family(shapes, n + 1, seed=n, device=device)
        base, specs = models[0], models[1:]
        _, state = inc.merge_with_state(base, specs[:n], config)

        def timed(fn):
            def run():
                out = fn()
                sync()
                return out
            return run

        t_full, full = best(timed(lambda: r2m_fast.merge(base, specs, config)), repeats)
        t_add, (added, state_big) = best(timed(lambda: inc.add_specialist(state, base, specs[:n], specs[n])), repeats)
        t_full_n, full_n = best(timed(lambda: r2m_fast.merge(base, specs[:n], config)), repeats)
        t_rm, (removed, _) = best(timed(lambda: inc.remove_specialist(state_big, base, specs, n)), repeats)
        rows.append({
            "diff_add": max_rel_diff(added.state_dict, full.state_dict, base),
            "diff_remove": max_rel_diff(removed.state_dict, full_n.state_dict, base),
            "backend": full.report["backend"],
            "N": f"{n} → {n + 1}", "full": t_full, "add": t_add, "speedup_add": t_full / t_add,
            "full_n": t_full_n, "remove": t_rm, "speedup_remove": t_full_n / t_rm,
            "bitwise": same(added.state_dict, full.state_dict),
            "pass_full": full.report["pass_seconds"], "pass_add": added.report["pass_seconds"],
        })
        print(rows[-1], flush=True)
        del models, base, specs, state, state_big, full, added, removed, full_n
    return rows


def _rank(rank, world, port, folder, n, threads, queue):
    from r2m_fast.distributed import merge_files_distributed

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    d = Path(folder)
    out = d / f"out_w{world}"
    t = time.perf_counter()
    merge_files_distributed(d / "base.safetensors", [d / f"s{i}.safetensors" for i in range(1, n + 1)], out, CONFIG,
                            force=True)
    seconds = time.perf_counter() - t
    if rank == 0:
        queue.put(seconds)
    dist.destroy_process_group()


def distributed_rows(shapes, n, repeats, worlds, total_threads):
    """One process with `total_threads` threads vs `world` gloo ranks of total_threads/world threads each
    (same cores in all rows); times exclude process start, outputs compared with the one process."""
    from safetensors.torch import save_file

    from r2m_fast.io import load_state_dict

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        d = Path(folder)
        models = synthetic_family(shapes, n, seed=100)
        base = models[0]
        save_file(models[0], str(d / "base.safetensors"))
        for i, m in enumerate(models[1:], 1):
            save_file(m, str(d / f"s{i}.safetensors"))
        del models
        paths = [d / f"s{i}.safetensors" for i in range(1, n + 1)]
        torch.set_num_threads(total_threads)
        t_single, _ = best(lambda: r2m_fast.merge_files(d / "base.safetensors", paths, d / "single", CONFIG,
                                                        force=True), repeats)
        reference = load_state_dict(d / "single")
        rows.append({"setup": f"1 process × {total_threads} thread(s)", "seconds": t_single, "speedup": 1.0})
        print(rows[-1], flush=True)
        for world in worlds:
            threads = max(1, total_threads // world)
            times = []
            ctx = mp.get_context("spawn")
            for _ in range(repeats):
                queue = ctx.SimpleQueue()
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                mp.start_processes(_rank, args=(world, port, folder, n, threads, queue), nprocs=world,
                                   start_method="spawn")
                times.append(queue.get())
            got = load_state_dict(d / f"out_w{world}")
            rows.append({"setup": f"{world} gloo rank(s) × {threads} thread(s)", "seconds": min(times),
                         "speedup": t_single / min(times), "bitwise": same(got, reference),
                         "diff": max_rel_diff(got, reference, base)})
            print(rows[-1], flush=True)
        torch.set_num_threads(1)
    return rows


def table(rows) -> list[str]:
    out = [
        "| N | full merge of N+1 (s) | add (s) | add speed-up | add − full, rel. | full merge of N (s) | remove back to N (s) | remove speed-up | remove − full, rel. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(f"| {r['N']} | {r['full']:.2f} | {r['add']:.2f} | {r['speedup_add']:.2f}× | "
                   f"{'0 (bit-identical)' if r['bitwise'] else format(r['diff_add'], '.1e')} | {r['full_n']:.2f} | "
                   f"{r['remove']:.2f} | {r['speedup_remove']:.2f}× | "
                   f"{'0 (bit-identical)' if r['diff_remove'] == 0 else format(r['diff_remove'], '.1e')} |")
    return out


def gpu_main(args) -> None:
    """Part 1 on the GPU for the torch and auto backends; part 2: torchrun with one NCCL rank."""
    import subprocess

    from safetensors.torch import save_file

    from r2m_fast.io import load_state_dict

    shapes = vit_shapes(args.width, args.depth)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    lines = [f"# GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"Command: `python benchmarks/bench_incremental.py {' '.join(sys.argv[1:])}`; synthetic ViT width "
             f"{args.width}, depth {args.depth} ({params / 1e6:.1f} M parameters, fp32, on the GPU), best of {args.repeats}", ""]
    for backend in ("torch", "auto"):
        config = R2MConfig(rank_ratio=0.1, backend=backend)
        rows = incremental_rows(shapes, args.sizes, args.repeats, config, args.device)
        lines += [f"## backend {backend} (ran: {rows[0]['backend']})", ""] + table(rows) + [""]
    with tempfile.TemporaryDirectory() as folder:
        d = Path(folder)
        models = synthetic_family(shapes, args.dist_n, seed=100)
        save_file(models[0], str(d / "base.safetensors"))
        for i, m in enumerate(models[1:], 1):
            save_file(m, str(d / f"s{i}.safetensors"))
        paths = [str(d / f"s{i}.safetensors") for i in range(1, args.dist_n + 1)]
        t = time.perf_counter()
        r2m_fast.merge_files(d / "base.safetensors", paths, d / "single", R2MConfig(rank_ratio=0.1), device="cuda")
        t_single = time.perf_counter() - t
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
               "--master-port", "29533", "-m", "r2m_fast.distributed", "--base", str(d / "base.safetensors")]
        for path in paths:
            cmd += ["--specialist", path]
        cmd += ["--output", str(d / "dist"), "--rank-ratio", "0.1", "--device", "cuda", "--quiet"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        t_dist = time.perf_counter() - t
        lines += ["## torchrun, 1 NCCL rank vs 1 process (files, N = %d)" % args.dist_n, ""]
        if proc.returncode != 0:
            lines.append(f"torchrun failed (rc {proc.returncode}): {proc.stderr[-1500:]}")
        else:
            a, b = load_state_dict(d / "dist"), load_state_dict(d / "single")
            import json
            rep = json.loads((d / "dist" / "merge_report.json").read_text())
            lines.append(f"1 process: {t_single:.2f} s; torchrun 1 rank ({rep['distributed']['comm_backend']}): "
                         f"{t_dist:.2f} s with process start, merge {rep['timings']['total_seconds']:.2f} s; "
                         f"output bit-identical: {same(a, b)}; rel. diff {max_rel_diff(a, b, models[0]):.1e}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 8])
    p.add_argument("--dist-n", type=int, default=4)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="gloo world sizes of part 2")
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all of part 2 (split across ranks)")
    p.add_argument("--skip-incremental", action="store_true", help="part 2 only")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cpu", help="cuda: part 1 on the GPU (torch and auto backends), part 2 "
                   "a single-process merge vs torchrun with one NCCL rank")
    args = p.parse_args()
    if args.device.startswith("cuda"):
        return gpu_main(args)
    torch.set_num_threads(1)
    shapes = vit_shapes(args.width, args.depth)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    inc_rows = [] if args.skip_incremental else incremental_rows(shapes, args.sizes, args.repeats)
    dist_rows = distributed_rows(shapes, args.dist_n, args.repeats, args.worlds, args.threads)

    now = datetime.datetime.now(datetime.timezone.utc)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cmd = "python benchmarks/bench_incremental.py " + " ".join(sys.argv[1:])
    lines = [
        f"# Incremental re-merge and multi-process merging — {now:%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {cpu}, {os.cpu_count()} logical CPUs (shared with other jobs while measured), "
        f"{platform.platform()}  ",
        f"Versions: r2m_fast {r2m_fast.__version__}, torch {torch.__version__}, Python {platform.python_version()}  ",
        f"Model: synthetic ViT width {args.width}, depth {args.depth} ({params / 1e6:.1f} M parameters, fp32), "
        f"rank_ratio {CONFIG.rank_ratio}, power_iters {CONFIG.effective_power_iters}, fp32 range finder, "
        f"torch backend; best of {args.repeats}.",
        "",
    ]
    if inc_rows:
        lines += ["## Add vs full re-merge (in memory, 1 thread)", ""] + table(inc_rows)
    if inc_rows:
        lines += ["", "Per pass (s): " + "; ".join(
        f"N {r['N']}: full " + ", ".join(f"{k} {v:.2f}" for k, v in r["pass_full"].items())
        + " / add " + ", ".join(f"{k} {v:.2f}" for k, v in r["pass_add"].items()) for r in inc_rows), ""]
    lines += [
        f"## 1 process vs gloo ranks (files on disk, N = {args.dist_n}, {args.threads} CPU thread(s) in every row)",
        "",
        "| setup | merge (s) | speed-up | output vs 1 process |",
        "|---|---|---|---|",
    ]
    for r in dist_rows:
        eq = "reference" if "bitwise" not in r else (
            "bit-identical" if r["bitwise"] else f"rel. diff {r['diff']:.1e} (GEMM thread split)")
        lines.append(f"| {r['setup']} | {r['seconds']:.2f} | {r['speedup']:.2f}× | {eq} |")
    lines.append("")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"incremental_{now:%Y-%m-%d}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
