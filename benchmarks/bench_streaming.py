"""Peak RSS and time of a streamed merge (r2m-merge on safetensors files) beside the in-memory API.

    python benchmarks/bench_streaming.py                  # writes benchmarks/results/streaming_<date>.md
    python benchmarks/bench_streaming.py --layers 12 48 --width 1024 --specialists 3
    python benchmarks/bench_streaming.py --layers 12 48 --spill --modes stream --repeats 3   # R²M with --spill-dir

Synthetic models of `layers` square fp32 weights (width × width) plus a norm and a bias per layer are
written as .safetensors under a scratch folder. Every measurement runs in a fresh subprocess and
reads its own peak RSS (VmHWM; ru_maxrss where there is no /proc), so import overhead is the same in each row; a subprocess that only imports
torch and r2m_fast gives that floor. The "bound" column is one layer of the N+1 inputs plus the N+1
fp32 working copies, the merged layer and the sketches and residual factors R²M keeps across layers
(DESIGN §2: memory is one layer × (N+2) plus sketches, never the model). With ``--spill`` each R²M
streamed merge also runs with ``--spill-dir`` (r2m_fast.spill), whose bound is the layer alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CHILD = r"""
import json, resource, sys, time

def peak_rss_mb():
    # VmHWM is this process image's own high-water mark. ru_maxrss is not: Linux carries the
    # parent's high-water mark across fork+exec, so a child of a big parent reports the parent's.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

import torch
torch.set_num_threads(int(sys.argv[2]))
import r2m_fast
from r2m_fast.cli import main as cli_main
from r2m_fast.io import load_state_dict
args = json.loads(sys.argv[1])
start = time.perf_counter()
extra = {}
if args["mode"] in ("stream", "spill"):
    spill = ["--spill-dir", args["spill_dir"]] if args["mode"] == "spill" else []
    code = cli_main(["--base", args["paths"][0]] + sum((["--specialist", p] for p in args["paths"][1:]), [])
                    + ["--output", args["output"], "--quiet", "--force", "--method", args["method"]] + spill)
    assert code == 0
    report = json.load(open(args["output"] + "/merge_report.json"))
    extra = {k: report[k] for k in ("spill_bytes", "spill_peak_bytes") if k in report}
elif args["mode"] == "memory":
    models = [load_state_dict(p) for p in args["paths"]]
    result = r2m_fast.merge(models[0], models[1:], method=args["method"])
    assert len(result.state_dict) == len(models[0])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "maxrss_mb": peak_rss_mb(), **extra}))
"""


def write_models(folder: Path, layers: int, width: int, specialists: int, seed: int = 0) -> list[str]:
    """Base + specialists (low-rank-plus-noise task vectors of 1e-3 relative norm), one layer at a time."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    models: list[dict] = [{} for _ in range(specialists + 1)]
    for i in range(layers):
        w = torch.randn(width, width, generator=g) / width**0.5
        models[0][f"layers.{i}.weight"] = w
        models[0][f"layers.{i}.norm.weight"] = torch.ones(width)
        models[0][f"layers.{i}.bias"] = torch.zeros(width)
        for sd in models[1:]:
            delta = torch.randn(width, 8, generator=g) @ torch.randn(8, width, generator=g) + 0.3 * torch.randn(width, width, generator=g)
            sd[f"layers.{i}.weight"] = w + 1e-3 * delta * (w.norm() / delta.norm())
            sd[f"layers.{i}.norm.weight"] = 1 + 1e-3 * torch.randn(width, generator=g)
            sd[f"layers.{i}.bias"] = 1e-3 * torch.randn(width, generator=g)
    paths = []
    for j, sd in enumerate(models):
        paths.append(str(folder / f"model{j}.safetensors"))
        save_file(sd, paths[-1])
    return paths


def run_child(args: dict, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env["OMP_NUM_THREADS"] = str(threads)
    env["R2M_RESIDENT"] = "0"  # the streamed bound is what this measures (r2m-merge keeps inputs mapped when they fit)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args), str(threads)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args['mode']} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def floor_rss(threads: int) -> float:
    code = ("import torch, r2m_fast, r2m_fast.cli, r2m_fast.io\n"
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) / 1024)")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout)


def bound_mb(width: int, N: int, rank_ratio: float = 0.1, oversample: int = 10) -> tuple[float, float]:
    """(largest layer: N+1 inputs, N+1 fp32 copies, the output; per truncated layer: its sketches
    Zⱼ (pass 1 → 2) or its rank-r factors (pass 2 → 3), whichever is larger: pass 2 frees each
    layer's sketches as it stores its factors)."""
    layer = width * width * 4
    r = max(1, int(rank_ratio * width))
    s = r + oversample
    sketches = 4 * N * (width * s)
    factors = 4 * N * (2 * width * r)
    return (layer * (N + 1) * 2 + layer) / 2**20, max(sketches, factors) / 2**20


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = f", {int(open('/proc/meminfo').readline().split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs{mem}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[12, 48])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--specialists", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["r2m"])
    p.add_argument("--modes", nargs="+", choices=("stream", "spill", "memory"), default=["stream", "memory"],
                   help="stream: r2m-merge; spill: r2m-merge --spill-dir (R²M only); memory: load_state_dict + merge")
    p.add_argument("--spill", action="store_true", help="add the spill mode (R²M streamed with --spill-dir)")
    p.add_argument("--repeats", type=int, default=1, help="runs per row: the fastest time, the highest (and lowest) peak RSS")
    p.add_argument("--scratch", default=None, help="folder for the synthetic checkpoints (default: a temp folder)")
    p.add_argument("--out", default=None, help="markdown file (default benchmarks/results/streaming_<date>.md)")
    args = p.parse_args(argv)

    import safetensors
    import torch

    import r2m_fast

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="r2m_bench_stream_"))
    scratch.mkdir(parents=True, exist_ok=True)
    modes = list(dict.fromkeys(args.modes + (["spill"] if args.spill else [])))
    spill_dir = scratch / "spill"
    spill_dir.mkdir(exist_ok=True)
    base_rss = floor_rss(args.threads)
    layer_mb, kept_mb = bound_mb(args.width, args.specialists)
    rows = []
    try:
        for layers in args.layers:
            folder = scratch / f"L{layers}"
            folder.mkdir(exist_ok=True)
            paths = write_models(folder, layers, args.width, args.specialists)
            model_mb = os.path.getsize(paths[0]) / 2**20
            for method in args.methods:
                for mode in modes:
                    if mode == "spill" and method != "r2m":
                        continue  # the baselines keep nothing across layers
                    runs = [run_child({"mode": mode, "paths": paths, "output": str(folder / "merged"), "method": method,
                                       "spill_dir": str(spill_dir)}, args.threads) for _ in range(args.repeats)]
                    res = {**runs[0], "seconds": min(r["seconds"] for r in runs),
                           "maxrss_mb": max(r["maxrss_mb"] for r in runs), "minrss_mb": min(r["maxrss_mb"] for r in runs)}
                    assert not os.listdir(spill_dir), "the spill folder must be empty after a merge"
                    rows.append({"layers": layers, "model_mb": model_mb, "method": method, "mode": mode, **res})
                    print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(folder)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)

    today = datetime.date.today().isoformat()
    out = Path(args.out or HERE / "results" / f"streaming_{today}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    N = args.specialists
    lines = [
        f"# Streaming merge: peak RSS and time ({today})",
        "",
        f"- command: `python benchmarks/bench_streaming.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        f"- machine: {machine()}; torch threads {args.threads}",
        f"- versions: r2m_fast {r2m_fast.__version__}, torch {torch.__version__}, safetensors {safetensors.__version__}, "
        f"python {platform.python_version()}",
        f"- models: N = {N} specialists + base, fp32 .safetensors, per layer one {args.width}×{args.width} weight, "
        "a norm and a bias; R²M defaults (rank_ratio 0.1, q = 1)",
        f"- floor: a process that imports torch and r2m_fast peaks at {base_rss:.0f} MB RSS",
        f"- expected bound above that floor: {layer_mb:.0f} MB for the largest layer (N+1 inputs, N+1 fp32 "
        f"copies, the output), independent of depth, + {kept_mb:.1f} MB per truncated layer of residual factors "
        "(or sketches, whichever is larger) that R²M keeps between passes in memory (DESIGN §3), none with "
        "--spill-dir; bound column = both",
        "- stream = `r2m-merge --base … --specialist … --output …` (reads, merges and writes one layer at a time); "
        "spill = the same with `--spill-dir` (sketches and factors wait in files between passes); "
        "memory = load every model with r2m_fast.io.load_state_dict, then `r2m_fast.merge`",
        f"- {args.repeats} run(s) per row, each a fresh process: the fastest time and the highest peak RSS "
        "(lowest in brackets when it differs by 5 MB or more: glibc's heap slack depends on the address-space layout); "
        "spilled = bytes written to the spill folder, disk peak = most held there at once (merge_report.json)",
        "",
        "| layers | model size (MB) | all inputs (MB) | method | mode | bound (MB) | peak RSS (MB) | RSS above floor (MB) "
        "| time (s) | spilled (MB) | disk peak (MB) |",
        "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        kept = kept_mb * r["layers"] if r["method"] == "r2m" and r["mode"] != "spill" else 0
        low = f" ({r['minrss_mb']:.0f})" if r["maxrss_mb"] - r["minrss_mb"] >= 5 else ""
        spilled = (f"{r['spill_bytes'] / 2**20:.0f} | {r['spill_peak_bytes'] / 2**20:.0f}"
                   if "spill_bytes" in r else "– | –")
        lines.append(
            f"| {r['layers']} | {r['model_mb']:.0f} | {r['model_mb'] * (N + 1):.0f} | {r['method']} | {r['mode']} | "
            f"{layer_mb + kept:.0f} | {r['maxrss_mb']:.0f}{low} | {r['maxrss_mb'] - base_rss:.0f} | {r['seconds']:.1f} | "
            f"{spilled} |"
        )
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
