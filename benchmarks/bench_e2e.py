"""End to end, folders in → folder out: r2m-merge beside mergekit-yaml on Llama-architecture folders.

    python benchmarks/bench_e2e.py --model 168m --dtype fp32 --rounds 3
    python benchmarks/bench_e2e.py --model 1b --dtype bf16 --rounds 1 --methods r2m average mergekit:linear
    python benchmarks/bench_e2e.py --model 168m --load 1 --out benchmarks/results/e2e_168m_fp32_load.json

Builds (once, cached under --data, default /work/bench_data or $R2M_BENCH_DATA) a base and three
specialists with the names and shapes of a LlamaForCausalLM (untied embeddings), one specialist
sharded (model.safetensors.index.json + shards), plus config.json. Task vectors are structured:
a low-rank component shared by all specialists, a low-rank one of each, and small noise, about
1e-3 of the weights — as fine-tuned checkpoints look.

Every run is a fresh subprocess, timed wall-clock from spawn to exit (imports included), its
peak RSS from os.wait4 (that child's own rusage). The parent never imports torch, so a child's
high-water mark (which Linux carries over exec from the forking process) is not inflated by it.
Runs alternate between providers round by round; the report gives medians, ratios to
mergekit ``linear``, r2m-merge's per-pass seconds (from the merge_report.json it writes) and two
floors: (a) reading every input once and writing the output once with safetensors.torch
load_file/save_file, (b) R²M's GEMM flops at the faster of the rates torch.bmm and numpy.matmul reach here.
``--load K`` keeps K competing CPU-bound processes running during the timed runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

MODELS = {
    # name: (layers, hidden, intermediate, vocab, heads)
    "168m": (8, 1024, 2816, 32000, 16),
    "1b": (16, 2048, 5632, 32000, 32),
}
N_SPECIALISTS = 3
R2M_METHODS = ("r2m", "average", "task_arithmetic", "ties")
MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties")
# Options of ours and mergekit's that make the same merge (scaling λ, TIES density).
TA_SCALING = 0.3
TIES_DENSITY = 0.2


# ----------------------------------------------------------------------------------------------
# Children (run as `python bench_e2e.py --child KIND ...`; they import torch, the parent doesn't)
# ----------------------------------------------------------------------------------------------


def llama_shapes(model: str) -> list[tuple[str, tuple[int, ...]]]:
    layers, h, inter, vocab, _ = MODELS[model]
    shapes = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (h, h)),
            (p + "self_attn.v_proj.weight", (h, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return shapes


def llama_config(model: str, dtype: str) -> dict:
    layers, h, inter, vocab, heads = MODELS[model]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": 10000.0,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
    }


def child_build(folder: Path, model: str, dtype_name: str) -> None:
    import torch
    from safetensors.torch import save_file

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    gen = torch.Generator().manual_seed(1234)
    shapes = llama_shapes(model)
    names = ["base"] + [f"specialist{i}" for i in range(1, N_SPECIALISTS + 1)]
    models: dict[str, dict] = {n: {} for n in names}
    for name, shape in shapes:
        if len(shape) == 1:
            base = 1.0 + 0.05 * torch.randn(shape, generator=gen)
            taus = [0.05e-3 * torch.randn(shape, generator=gen) for _ in range(N_SPECIALISTS)]
        else:
            m, n = shape
            base = 0.02 * torch.randn(shape, generator=gen)
            scale = 0.02e-3  # task vectors ~1e-3 of the weights
            rank = 8
            shared = torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen) / rank**0.5
            taus = []
            for _ in range(N_SPECIALISTS):
                own = torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen) / rank**0.5
                noise = torch.randn(shape, generator=gen)
                taus.append(scale * (0.6 * shared + 0.6 * own + 0.3 * noise))
        models["base"][name] = base.to(dtype).contiguous()
        for spec, tau in zip(names[1:], taus):
            models[spec][name] = (base + tau).to(dtype).contiguous()
    config = llama_config(model, dtype_name)
    for label, sd in models.items():
        out = folder / label
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2))
        if label == "specialist2":  # sharded like a Hugging Face upload
            total = sum(t.numel() * t.element_size() for t in sd.values())
            limit = total // 3 + 1
            shards, size = [[]], 0
            for key, t in sd.items():
                nbytes = t.numel() * t.element_size()
                if shards[-1] and size + nbytes > limit:
                    shards.append([])
                    size = 0
                shards[-1].append(key)
                size += nbytes
            weight_map = {}
            for i, keys in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file({k: sd[k] for k in keys}, str(out / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in keys})
            (out / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        else:
            save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (folder / "READY").write_text(json.dumps({"model": model, "dtype": dtype_name,
                                              "params": sum(t.numel() for t in models["base"].values())}))


def child_floor_io(folder: Path, output: Path) -> None:
    """Floor (a): every input read once and the output written once, plain safetensors."""
    from safetensors.torch import load_file, save_file

    kept = None
    for label in ["base"] + [f"specialist{i}" for i in range(1, N_SPECIALISTS + 1)]:
        sd = {}
        for f in sorted((folder / label).glob("*.safetensors")):
            sd.update(load_file(str(f)))
        kept = kept or sd  # the base stands in for the output (same size); the others are dropped
    output.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(output / "model.safetensors"), metadata={"format": "pt"})


def child_gemm_probe(model: str, threads: int) -> None:
    """fp32 GEMM rate at R²M's pass-2 shapes, (N·m, n) × (n, s), best of a few, of torch's BLAS and of
    numpy's (the OpenBLAS r2m_fast.cpu_blas multiplies with on AMD CPUs); the floor takes the faster."""
    import numpy
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    _, h, inter, _, _ = MODELS[model]
    s = int(0.1 * h) + 10
    rates: dict[str, list[float]] = {"torch": [], "numpy": []}
    with threadpool_limits(threads, user_api="blas"):
        for m, n in ((inter, h), (h, inter)):
            a = torch.randn(N_SPECIALISTS, m, n)
            b = torch.randn(N_SPECIALISTS, n, s)
            for name, product in (("torch", lambda: torch.bmm(a, b)), ("numpy", lambda: numpy.matmul(a.numpy(), b.numpy()))):
                product()
                best = float("inf")
                for _ in range(3):
                    t = time.perf_counter()
                    product()
                    best = min(best, time.perf_counter() - t)
                rates[name].append(2 * N_SPECIALISTS * m * n * s / best)
    mean = {name: statistics.mean(r) / 1e9 for name, r in rates.items()}
    print(json.dumps({"gflops": max(mean.values()), **{f"gflops_{name}": v for name, v in mean.items()}}))


def r2m_flops(model: str) -> float:
    """GEMM flops of R²M's defaults (rank_ratio 0.1, oversample 10, q = 1): pass 1 sketch, pass 2's
    2q products and BᵀQ, pass 3's L·Rᵀ, over every truncated 2-D weight (norms are not truncated)."""
    q, N = 1, N_SPECIALISTS
    flops = 0.0
    for _, shape in llama_shapes(model):
        if len(shape) != 2:
            continue
        m, n = shape
        r = max(1, int(0.1 * min(m, n)))
        s = min(r + 10, min(m, n))
        flops += 2 * N * m * n * s * (1 + 2 * q + 1) + 2 * m * n * N * r + N * N * m * n
    return flops


# ----------------------------------------------------------------------------------------------
# The parent: build, spawn, time
# ----------------------------------------------------------------------------------------------


def spawn(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run one command; wall seconds, peak RSS (MB) of the child from wait4, exit code, output tail."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "rc": proc.returncode,
            "tail": out.decode(errors="replace")[-2000:]}


def child_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", *args]


def ensure_folders(data: Path, model: str, dtype: str) -> Path:
    folder = data / f"llama_{model}_{dtype}"
    if not (folder / "READY").exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"building {folder} ...", flush=True)
        r = spawn(child_cmd("build", str(folder), model, dtype))
        if r["rc"] != 0:
            raise SystemExit(f"build failed:\n{r['tail']}")
        print(f"  built in {r['seconds']:.1f} s", flush=True)
    return folder


def inputs(folder: Path) -> tuple[Path, list[Path]]:
    return folder / "base", [folder / f"specialist{i}" for i in range(1, N_SPECIALISTS + 1)]


def r2m_command(method: str, folder: Path, output: Path) -> list[str]:
    base, specs = inputs(folder)
    exe = shutil.which("r2m-merge")
    head = [exe] if exe else [sys.executable, "-m", "r2m_fast"]
    cmd = head + ["--base", str(base)] + sum((["--specialist", str(s)] for s in specs), [])
    cmd += ["--output", str(output), "--force", "--quiet", "--method", method]
    if method == "task_arithmetic":
        cmd += ["--scaling", str(TA_SCALING)]
    if method == "ties":
        cmd += ["--density", str(TIES_DENSITY), "--scaling", "1.0"]
    return cmd


def mergekit_config(method: str, folder: Path, dtype: str) -> str:
    base, specs = inputs(folder)
    dt = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    lines = [f"merge_method: {method}", f"dtype: {dt}"]
    if method != "linear":
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for s in specs:
        lines.append(f"  - model: {s}")
        if method == "linear":
            lines.append("    parameters: {weight: 1.0}")
        elif method == "task_arithmetic":
            lines.append(f"    parameters: {{weight: {TA_SCALING}}}")
        else:
            lines.append(f"    parameters: {{weight: 1.0, density: {TIES_DENSITY}}}")
    if method == "task_arithmetic":
        lines.append("parameters: {normalize: false}")
    return "\n".join(lines) + "\n"


def mergekit_command(method: str, folder: Path, output: Path, dtype: str, work: Path) -> list[str]:
    cfg = work / f"mergekit_{method}.yml"
    cfg.write_text(mergekit_config(method, folder, dtype))
    # mergekit's defaults (CPU, its own thread count), as a new user runs it; the folders hold no tokenizer.
    return [shutil.which("mergekit-yaml"), str(cfg), str(output), "--no-copy-tokenizer", "--quiet"]


def median(xs):
    return statistics.median(xs) if xs else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--model", choices=tuple(MODELS), default="168m")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", nargs="+",
                   default=list(R2M_METHODS) + [f"mergekit:{m}" for m in MERGEKIT_METHODS],
                   help="r2m-merge methods and mergekit:<method> entries (default: all)")
    p.add_argument("--load", type=int, default=0, help="competing CPU-bound processes during the timed runs")
    p.add_argument("--no-floors", action="store_true", help="skip the floors")
    p.add_argument("--data", default=os.environ.get("R2M_BENCH_DATA", "/work/bench_data"))
    p.add_argument("--out", help="results .json (a .md table is written beside it)")
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            child_build(Path(rest[0]), rest[1], rest[2])
        elif kind == "floor_io":
            child_floor_io(Path(rest[0]), Path(rest[1]))
        elif kind == "gemm":
            child_gemm_probe(rest[0], int(rest[1]))
        return 0

    data = Path(args.data)
    folder = ensure_folders(data, args.model, args.dtype)
    work = data / f"runs_{args.model}_{args.dtype}"
    work.mkdir(parents=True, exist_ok=True)
    have_mergekit = shutil.which("mergekit-yaml") is not None
    providers = []
    for m in args.methods:
        if m.startswith("mergekit:"):
            if have_mergekit:
                providers.append(m)
            else:
                print(f"skipping {m}: mergekit-yaml is not installed")
        else:
            providers.append(m)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TQDM_DISABLE", "1")

    def command(provider: str, output: Path) -> list[str]:
        if provider.startswith("mergekit:"):
            return mergekit_command(provider.split(":", 1)[1], folder, output, args.dtype, work)
        return r2m_command(provider, folder, output)

    loaders = []
    if args.load:
        for _ in range(args.load):
            loaders.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
    runs: dict[str, list[dict]] = {p: [] for p in providers}
    floors: dict[str, list[dict]] = {"io": []}
    try:
        for rnd in range(args.rounds):
            order = providers if rnd % 2 == 0 else providers[::-1]
            if not args.no_floors:
                out = work / "out_floor_io"
                shutil.rmtree(out, ignore_errors=True)
                floors["io"].append(spawn(child_cmd("floor_io", str(folder), str(out)), env=env))
            for provider in order:
                out = work / f"out_{provider.replace(':', '_')}"
                shutil.rmtree(out, ignore_errors=True)
                r = spawn(command(provider, out), env=env)
                if r["rc"] != 0:
                    print(f"{provider} failed (rc {r['rc']}):\n{r['tail']}", file=sys.stderr)
                    return 1
                report = out / "merge_report.json"
                if report.exists():
                    rep = json.loads(report.read_text())
                    r["pass_seconds"] = rep.get("timings", {}).get("pass_seconds") or rep.get("pass_seconds")
                    r["merge_seconds"] = rep.get("timings", {}).get("merge_seconds")
                    r["resident"] = rep.get("resident_inputs")
                r.pop("tail")
                runs[provider].append(r)
                print(f"round {rnd + 1} {provider:<26} {r['seconds']:7.2f} s  {r['peak_rss_mb']:7.0f} MB"
                      + (f"  passes {json.dumps({k: round(v, 2) for k, v in r['pass_seconds'].items()})}"
                         if r.get("pass_seconds") else ""), flush=True)
        gemm, gemm_rates = None, {}
        if not args.no_floors:
            threads = os.cpu_count() or 1
            g = subprocess.run(child_cmd("gemm", args.model, str(threads)), capture_output=True, text=True, env=env)
            gemm_rates = json.loads(g.stdout.strip().splitlines()[-1]) if g.returncode == 0 else {}
            gemm = gemm_rates.get("gflops")
    finally:
        for proc in loaders:
            proc.kill()
            proc.wait()

    anchor = "mergekit:linear" if "mergekit:linear" in runs else None
    anchor_s = median([r["seconds"] for r in runs[anchor]]) if anchor else None
    io_s = median([r["seconds"] for r in floors["io"]])
    flops = r2m_flops(args.model)
    rows = []
    for provider, rs in runs.items():
        sec = median([r["seconds"] for r in rs])
        row = {
            "provider": provider if provider.startswith("mergekit:") else f"r2m-merge --method {provider}",
            "seconds_median": sec,
            "seconds_all": [round(r["seconds"], 3) for r in rs],
            "peak_rss_mb_median": median([r["peak_rss_mb"] for r in rs]),
            "x_mergekit_linear": sec / anchor_s if anchor_s else None,
            "x_io_floor": sec / io_s if io_s else None,
        }
        passes = [r["pass_seconds"] for r in rs if r.get("pass_seconds")]
        if passes:
            row["pass_seconds_median"] = {k: median([p[k] for p in passes if k in p]) for k in passes[0]}
        rows.append(row)
    result = {
        "command": "python benchmarks/bench_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": args.model, "dtype": args.dtype, "specialists": N_SPECIALISTS, "rounds": args.rounds,
        "load_processes": args.load, "cpus": os.cpu_count(), "platform": platform.platform(),
        "folders": str(folder),
        "floors": {
            "io_seconds_median": io_s,
            "io_peak_rss_mb": median([r["peak_rss_mb"] for r in floors["io"]]),
            "gemm_gflops": gemm,
            "gemm_gflops_by_blas": {k[len("gflops_"):]: v for k, v in gemm_rates.items() if k.startswith("gflops_")},
            "r2m_gflop": flops / 1e9,
            "r2m_flops_seconds": flops / (gemm * 1e9) if gemm else None,
        },
        "rows": rows,
    }
    md = to_markdown(result)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(md)
    return 0


def to_markdown(result: dict) -> str:
    f = result["floors"]
    lines = [
        f"# bench_e2e: {result['model']} {result['dtype']}, N = {result['specialists']}, "
        f"{result['rounds']} round(s), {result['load_processes']} competing process(es), {result['cpus']} CPUs",
        "", f"`{result['command']}` ({result['date']})", "",
        "| provider | median s | × mergekit linear | × I/O floor | peak RSS MB | passes (median s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        passes = ", ".join(f"{k} {v:.2f}" for k, v in (r.get("pass_seconds_median") or {}).items())
        fmt = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
        lines.append(f"| {r['provider']} | {fmt(r['seconds_median'])} | {fmt(r['x_mergekit_linear'])} | "
                     f"{fmt(r['x_io_floor'])} | {fmt(r['peak_rss_mb_median'], 0)} | {passes} |")
    if f["io_seconds_median"] is not None:
        lines += ["", f"Floors: read once + write once (safetensors load_file/save_file, fresh process) "
                  f"{f['io_seconds_median']:.2f} s, {f['io_peak_rss_mb']:.0f} MB; R²M GEMMs "
                  f"{f['r2m_gflop']:.0f} GFLOP at {f['gemm_gflops']:.0f} GFLOP/s (the faster of torch.bmm and numpy.matmul "
                  f"probes: {', '.join(f'{k} {v:.0f}' for k, v in f.get('gemm_gflops_by_blas', {}).items())}) = "
                  f"{f['r2m_flops_seconds']:.2f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
