"""GPU suite: correctness and timing of every backend's layer ops, and of the whole merge.

    python benchmarks/gpu_suite.py [--out DIR] [--quick] [--device cuda|cpu] [--no-e2e] [--no-summary]

1. Checks every available backend (torch on the device, triton, cuda) op by op against the same
   math in fp64 (inputs upcast), with a per-dtype tolerance; a failed check makes the exit status 1.
2. Times r2m_fast.merge end to end on a synthetic model (2 ViT-B + 2 ViT-L blocks) for each backend,
   the naive randomized merge (torch.svd_lowrank per materialized residual, benchmarks/naive_merge.py)
   and, once on a small case, the fp64 CPU reference.
3. Times each op with triton.testing.do_bench (p50/p20/p80) at ViT-B, ViT-L and a 4096×4096
   LLM layer, N = 3 and 8, fp32 and bf16 weights, with the range finder at the engine's CUDA
   default (bf16 Ω and power-iteration operands; Bᵢ = QᵢᵀFᵢ in fp32), until --budget-s is spent.
3a. The summary (benchmarks/gpu_summary.py), before the timings of 2 and 3: pass 2's small
   eigensolver (r2m_fast.small_eigh against torch.linalg.eigh) and whole merges at ViT-L and
   Llama-3-8B shapes (bf16, N = 3 resident, N = 8 streamed from pinned host memory) with their
   roofline floor, the naive merge and kernel launches, written to
   <out>/gpu_<card>_<date>/summary.json.
4. Divides each time by its memory floor: bytes moved at the measured device-to-device copy
   bandwidth (op level: the op's own bytes; end to end: the N+1 inputs read twice plus the output
   written once, DESIGN §5).
5. Profiles one whole merge per backend on the last end-to-end case (torch.profiler: the top ops
   by device and by host time, and each pass's seconds) into *_profile.txt: where an end-to-end
   time sits far above its floor, this says whether launches, syncs or a kernel are to blame.
6. Writes JSON and CSV under --out (default benchmarks/results/) and prints a short table last.

`--quick --device cpu` (with TRITON_INTERPRET=1 for the triton rows) only proves the script runs:
tiny shapes, and CPU/interpreter timings mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # synthetic.py, naive_merge.py

import r2m_fast  # noqa: E402
from r2m_fast import R2MConfig  # noqa: E402
from r2m_fast.backends import BACKENDS  # noqa: E402
from gpu_summary import sync_device as _sync, timed_runs  # noqa: E402

LAYER_SETS = {
    "vit_b": [(768, 2304), (768, 768), (3072, 768), (768, 3072)],
    "vit_l": [(1024, 3072), (1024, 1024), (4096, 1024), (1024, 4096)],
    "llm": [(4096, 4096)],
}
QUICK_LAYER_SETS = {"tiny": [(65, 129), (33, 47)]}
RANK_RATIO = 0.1
OVERSAMPLE = 10
POWER_ITERS = 2
# Relative error (Frobenius) against fp64 math allowed per weight dtype. fp32 ops are fp32-accurate
# (3xTF32/ieee products); a bf16 Ω / bf16 power-iteration operand rounds τ to bf16 (~4e-3).
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}
CSV_COLUMNS = [
    "op", "provider", "shape", "dtype", "N", "ms_p50", "ms_p20", "ms_p80", "GB/s", "speedup_vs_torch",
    "x_floor", "gpu_name", "torch", "triton", "git_sha", "timestamp",
]
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def bench(fn: Callable[[], object], device: torch.device, quick: bool) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds: do_bench on CUDA, a few perf_counter runs elsewhere."""
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(
            fn, warmup=5, rep=10 if quick else 25, quantiles=[0.5, 0.2, 0.8]
        )
        return float(p50), float(p20), float(p80)
    return host_bench(fn, device, reps=2 if quick else 3)


def host_bench(fn: Callable[[], object], device: torch.device, reps: int) -> tuple[float, float, float]:
    """One warm-up then `reps` timed runs, for calls too long or too host-bound for do_bench."""
    times = timed_runs(fn, device, reps)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(round(f * (len(times) - 1))))]  # noqa: E731
    return statistics.median(times), q(0.2), q(0.8)


def copy_bandwidth(device: torch.device, quick: bool) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    numel = (1 << 22) if quick or device.type != "cuda" else (1 << 28)  # 1 GiB of fp32 on the GPU
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms, _, _ = bench(lambda: dst.copy_(src), device, quick)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def providers(device: torch.device, names: list[str]) -> tuple[dict[str, object], dict[str, str]]:
    """Backends among `names` that run on `device` → their op modules; the others → why not."""
    ops, skipped = {}, {}
    for name in ("torch", "triton", "cuda"):
        if name not in names:
            skipped[name] = "not asked for (--providers)"
            continue
        reason = BACKENDS[name].unavailable_reason(device)
        if reason is None:
            try:
                ops[name] = BACKENDS[name].ops()
            except Exception as exc:  # a broken install is reported, not fatal to the other backends
                skipped[name] = f"import failed: {exc!r}"
        else:
            skipped[name] = reason
    return ops, skipped


def layer(N: int, m: int, n: int, dtype: torch.dtype, device: torch.device, seed: int) -> list[torch.Tensor]:
    """[θ₀, …, θ_N] with fine-tuning-like updates (~1e-3 of θ, low rank plus noise), made on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(m, n, generator=g, device=device) / math.sqrt(n)
    k = min(16, m, n)
    out = [base]
    for _ in range(N):
        delta = torch.randn(m, k, generator=g, device=device) @ torch.randn(k, n, generator=g, device=device)
        delta += 0.1 * torch.randn(m, n, generator=g, device=device) * delta.std()
        out.append(base + delta * (1e-3 * base.norm() / delta.norm()))
    return [w.to(dtype) for w in out]


class OpCase:
    """Inputs of the four ops for one (shape, N, dtype), as the engine would pass them."""

    def __init__(self, N: int, m: int, n: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.N, self.m, self.n, self.dtype = N, m, n, dtype
        self.weights = layer(N, m, n, dtype, device, seed)
        r = max(1, int(RANK_RATIO * min(m, n)))
        self.s = s = min(r + OVERSAMPLE, min(m, n))
        g = torch.Generator(device=device).manual_seed(seed + 1)
        fast = torch.bfloat16 if device.type == "cuda" else torch.float32  # engine's range-finder dtype
        self.fast_dtype = fast
        self.omega = torch.randn(n, s, generator=g, device=device).to(fast)
        self.core = torch.full((N,), 1.0 / N, device=device)
        self.rhs_n = torch.randn(N, n, s, generator=g, device=device).to(fast)  # power iteration: F P
        self.rhs_m = torch.randn(N, m, s, generator=g, device=device)  # fp32: Bᵀ = Fᵀ Q
        self.y = torch.randn(N, m, s, generator=g, device=device)
        K = N * r
        self.coeffs = torch.linspace(0.1, 0.3, N, device=device)
        self.left = torch.randn(m, K, generator=g, device=device) * 1e-3 / math.sqrt(K)
        self.right = torch.randn(n, K, generator=g, device=device) / math.sqrt(n)

    def calls(self, ops) -> dict[str, Callable[[], object]]:
        w = self.weights
        return {
            "gram_sketch": lambda: ops.gram_sketch(w, self.omega),
            "residual_matmul": lambda: ops.residual_matmul(w, self.core, self.rhs_n, False),
            "residual_matmul_T": lambda: ops.residual_matmul(w, self.core, self.rhs_m, True),
            "orthonormalize": lambda: ops.orthonormalize(self.y),
            "accumulate": lambda: ops.accumulate(w, self.coeffs, self.left, self.right, self.dtype),
        }

    def bytes(self, op: str) -> int:
        """Bytes an ideal implementation moves (inputs read once, outputs written once)."""
        N, m, n, s = self.N, self.m, self.n, self.s
        e = self.weights[0].element_size()
        f = torch.finfo(self.fast_dtype).bits // 8
        weights = (N + 1) * m * n * e
        K = self.left.shape[1]
        return {
            "gram_sketch": weights + n * s * f + N * m * s * 4,
            "residual_matmul": weights + N * n * s * f + N * m * s * 4,
            "residual_matmul_T": weights + N * m * s * 4 + N * n * s * 4,
            # three CholeskyQR steps, each reading Y twice (Gram, product) and writing Q
            "orthonormalize": 3 * 3 * N * m * s * 4,
            "accumulate": weights + m * n * e + (m + n) * K * 4,
        }[op]


def expected(case: OpCase, op: str) -> torch.Tensor:
    """The op's result in fp64 math from the same (upcast) inputs."""
    w = [t.double() for t in case.weights]
    tau = torch.stack([t - w[0] for t in w[1:]])
    resid = tau - torch.einsum("j,jmn->mn", case.core.double(), tau) if op.startswith("residual") else None
    if op == "gram":
        flat = tau.reshape(case.N, -1)
        return flat @ flat.T
    if op == "sketch":
        return tau @ case.omega.double()
    if op == "residual_matmul":
        return resid @ case.rhs_n.double()
    if op == "residual_matmul_T":
        return resid.transpose(1, 2) @ case.rhs_m.double()
    if op == "accumulate":
        out = w[0] + torch.einsum("j,jmn->mn", case.coeffs.double(), tau) + case.left.double() @ case.right.double().T
        return out
    raise ValueError(op)


def rel_err(actual: torch.Tensor, want: torch.Tensor) -> float:
    a, b = actual.double(), want.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def check_case(case: OpCase, name: str, ops) -> list[dict]:
    """Relative errors of one provider's ops against fp64 math (orthonormalize: QᵀQ = I and span)."""
    tol = CHECK_TOL[case.dtype]
    # A bf16 range-finder operand rounds τ to bf16 whatever the weights' dtype.
    rf_tol = max(tol, CHECK_TOL[case.fast_dtype])
    rows = []

    def add(op: str, err: float, limit: float) -> None:
        rows.append(dict(op=op, provider=name, shape=f"{case.m}x{case.n}", dtype=DTYPE_NAMES[case.dtype],
                         N=case.N, rel_err=err, tol=limit, ok=bool(err <= limit)))

    try:
        gram, sketch = ops.gram_sketch(case.weights, case.omega)
        add("gram", rel_err(gram, expected(case, "gram")), 1e-4)
        add("sketch", rel_err(sketch, expected(case, "sketch")), rf_tol)
        add("residual_matmul", rel_err(ops.residual_matmul(case.weights, case.core, case.rhs_n, False),
                                       expected(case, "residual_matmul")), rf_tol)
        add("residual_matmul_T", rel_err(ops.residual_matmul(case.weights, case.core, case.rhs_m, True),
                                         expected(case, "residual_matmul_T")), 1e-4)
        q = ops.orthonormalize(case.y).double()
        eye = torch.eye(case.s, dtype=torch.float64, device=q.device)
        add("orthonormality", float((q.transpose(1, 2) @ q - eye).abs().max()), 1e-4)
        y = case.y.double()
        add("orthonormalize_span", rel_err(q @ (q.transpose(1, 2) @ y), y), 1e-4)
        merged = ops.accumulate(case.weights, case.coeffs, case.left, case.right, case.dtype).double()
        want = expected(case, "accumulate")
        if case.dtype == torch.float32:
            # Relative to the update (~1e-3 of θ), so the check sees more than θ₀'s digits.
            err = rel_err(merged - case.weights[0].double(), want - case.weights[0].double())
            add("accumulate(update-relative)", err, 1e-3)
        else:
            # Rounded once to the output dtype: within one unit roundoff of the weights (eps = 2u).
            add("accumulate", rel_err(merged, want), torch.finfo(case.dtype).eps)
    except Exception as exc:
        rows.append(dict(op="exception", provider=name, shape=f"{case.m}x{case.n}", dtype=DTYPE_NAMES[case.dtype],
                         N=case.N, rel_err=float("nan"), tol=0.0, ok=False, error=repr(exc)))
        traceback.print_exc()
    return rows


def e2e_models(blocks: list[tuple[int, int]], device: torch.device, num_specialists: int) -> list[dict]:
    """[base, specialists…] in fp32 on `device`: `count` ViT blocks of each `width` in `blocks`."""
    from synthetic import synthetic_family, vit_block_shapes

    shapes = {}
    for width, count in blocks:
        for b in range(count):
            for suffix, shape in vit_block_shapes(width).items():
                shapes[f"w{width}.blocks.{b}.{suffix}"] = shape
    return synthetic_family(shapes, num_specialists, torch.float32, device=str(device), seed=0)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    quick = args.quick
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})"
    meta = dict(gpu_name=gpu, torch=torch.__version__, triton=triton_version, git_sha=_git_sha(), timestamp=stamp)
    print(f"# gpu_suite {stamp} on {gpu}; torch {meta['torch']}, triton {triton_version}, git {meta['git_sha']}")
    if device.type != "cuda":
        print("# NOT A GPU: timings below only prove the script runs; never report them")

    deadline = time.perf_counter() + args.budget_s

    def over_budget(what: str) -> bool:
        """Past --budget-s the remaining timings are skipped (and said so), so the suite ends in time."""
        if time.perf_counter() < deadline:
            return False
        print(f"# time budget of {args.budget_s:.0f} s spent: skipped {what}")
        return True

    ops, skipped = providers(device, args.providers)
    for name, why in skipped.items():
        print(f"# provider {name} skipped: {why}")
    bw = copy_bandwidth(device, quick)
    print(f"# copy bandwidth {bw / 1e9:.1f} GB/s")

    layer_sets = QUICK_LAYER_SETS if quick else LAYER_SETS
    Ns = (2, 3) if quick else (3, 8)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])

    # 1. correctness, op by op: one shape per layer set, every N and dtype.
    checks: list[dict] = []
    for set_name, shapes in layer_sets.items():
        m, n = shapes[0]
        for N in Ns:
            for dtype in dtypes:
                case = OpCase(N, m, n, dtype, device)
                for name, mod in ops.items():
                    checks.extend(check_case(case, name, mod))
                del case
    failed = [c for c in checks if not c["ok"]]
    print(f"# checks: {len(checks) - len(failed)}/{len(checks)} passed")
    for c in failed:
        print(f"#   FAIL {c}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "".join(ch if ch.isalnum() else "_" for ch in gpu)[:40]
    prefix = out / f"gpu_suite_{tag}_{stamp.replace(':', '')}{'_quick' if quick else ''}"

    # 2a. the summary (benchmarks/gpu_summary.py): pass 2's eigensolver, then whole merges at ViT-L
    # and Llama-3-8B shapes against floor and naive. First, so a short budget keeps these rows.
    summary_path, summary_rows = None, None
    if not args.no_summary:
        from gpu_summary import run_summary

        # auto (the default on CUDA) first: if the budget runs out inside a model, its row is the one kept.
        backends = (["auto"] if device.type == "cuda" and set(ops) == {"torch", "triton", "cuda"} else []) + list(ops)
        summary_path, summary_rows = run_summary(
            device, quick, backends, out, args.commit or meta["git_sha"], bw, over_budget,
            llm_blocks=args.llm_blocks, vit_blocks=args.vit_blocks,
        )

    # 2. end to end and the profile of the last case, before the op timings: when --budget-s runs
    # out, the whole-merge numbers are the ones to keep.
    e2e: list[dict] = []
    if not args.no_e2e:
        e2e = run_e2e(device, quick, Ns, dtypes, ops, bw, meta, over_budget, Path(f"{prefix}_profile.txt"))

    # 3. op timings.
    rows: list[dict] = []
    for set_name, shapes in layer_sets.items():
        for (m, n) in shapes:
            for N in Ns:
                for dtype in dtypes:
                    if over_budget(f"op timings at {m}x{n} N={N} {DTYPE_NAMES[dtype]}"):
                        continue
                    case = OpCase(N, m, n, dtype, device)
                    base_ms: dict[str, float] = {}
                    for name, mod in ops.items():
                        for op, fn in case.calls(mod).items():
                            try:
                                p50, p20, p80 = bench(fn, device, quick)
                            except Exception as exc:
                                print(f"# {op} {name} {m}x{n} N={N} {DTYPE_NAMES[dtype]} failed: {exc!r}")
                                continue
                            if name == "torch":
                                base_ms[op] = p50
                            nbytes = case.bytes(op)
                            rows.append(dict(
                                op=op, provider=name, shape=f"{m}x{n}", dtype=DTYPE_NAMES[dtype], N=N,
                                ms_p50=p50, ms_p20=p20, ms_p80=p80, **{"GB/s": nbytes / (p50 * 1e-3) / 1e9},
                                speedup_vs_torch=(base_ms[op] / p50) if op in base_ms else None,
                                x_floor=p50 * 1e-3 / (nbytes / bw), **meta,
                            ))
                    del case
                    if device.type == "cuda":
                        torch.cuda.empty_cache()

    rows.extend(e2e)

    Path(f"{prefix}.json").write_text(json.dumps(
        dict(meta=meta, copy_bandwidth_GBps=bw / 1e9, skipped_providers=skipped, checks=checks, rows=rows,
             config=dict(rank_ratio=RANK_RATIO, oversample=OVERSAMPLE, power_iters=POWER_ITERS, quick=quick),
             summary=summary_rows, summary_json=str(summary_path) if summary_path else None),
        indent=1,
    ))
    with open(f"{prefix}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"# wrote {prefix}.json and {prefix}.csv")
    print_tables(rows, checks, device)
    if summary_path is not None:
        from gpu_summary import print_summary

        print_summary(summary_path)
    return 1 if failed else 0


def run_e2e(
    device, quick, Ns, dtypes, ops, bw, meta, over_budget: Callable[[str], bool], profile_path: Optional[Path] = None,
) -> list[dict]:
    """Whole merges: each backend and the naive svd_lowrank merge on the 2 ViT-B + 2 ViT-L model for
    every N and dtype; the fp64 CPU reference is slow, so it runs on one small case (one ViT-B
    block, N = Ns[0], fp32) timed once, beside every other provider on that same case."""
    from naive_merge import naive_merge
    from r2m_fast.reference import r2m_merge

    small = [(32, 1)] if quick else [(768, 1)]
    large = [(64, 2)] if quick else [(768, 2), (1024, 2)]
    cases = [("tiny-ref" if quick else "1xViT-B", small, Ns[0], torch.float32, True)]
    cases += [("tiny" if quick else "2xViT-B+2xViT-L", large, N, dtype, False) for N in Ns for dtype in dtypes]
    config = R2MConfig(rank_ratio=RANK_RATIO, oversample=OVERSAMPLE, power_iters=POWER_ITERS, seed=0)
    rows = []
    family: dict[tuple, list[dict]] = {}
    for label, blocks, N, dtype, with_reference in cases:
        if over_budget(f"end-to-end {label} N={N} {DTYPE_NAMES[dtype]}"):
            continue
        key = tuple(blocks)
        if key not in family:
            family = {key: e2e_models(blocks, device, max(Ns))}  # one model family in memory at a time
        models = [{k: v.to(dtype) for k, v in m.items()} for m in family[key][: N + 1]]
        numel = sum(v.numel() for v in models[0].values())
        e = torch.finfo(dtype).bits // 8
        moved = ((N + 1) * 2 + 1) * numel * e  # N+1 inputs read twice, output written once
        runs: dict[str, Callable[[], object]] = {
            "naive_svd_lowrank": lambda: naive_merge(models[0], models[1:], config),
        }
        passes: dict[str, dict] = {}

        def fast_merge(name: str) -> None:
            passes[name] = r2m_fast.merge(models[0], models[1:], config, backend=name).report["pass_seconds"]

        merged = list(ops)
        if device.type == "cuda" and set(ops) == {"torch", "triton", "cuda"}:
            merged.append("auto")  # one backend per op (r2m_fast.backends._AUTO_ROUTES)
        for name in merged:
            runs[name] = lambda name=name: fast_merge(name)
        times = {}
        for name, fn in runs.items():
            try:
                times[name] = host_bench(fn, device, reps=2 if quick else 3)
            except Exception as exc:
                print(f"# e2e {name} {label} N={N} {DTYPE_NAMES[dtype]} failed: {exc!r}")
        if with_reference:
            cpu_models = [{k: v.cpu() for k, v in m.items()} for m in models]
            start = time.perf_counter()
            r2m_merge(cpu_models[0], cpu_models[1:], config)
            ms = (time.perf_counter() - start) * 1e3
            times["reference_cpu_fp64"] = (ms, ms, ms)
        for name, (p50, p20, p80) in times.items():
            rows.append(dict(
                op="merge_e2e", provider=name, shape=label, dtype=DTYPE_NAMES[dtype], N=N,
                ms_p50=p50, ms_p20=p20, ms_p80=p80, **{"GB/s": moved / (p50 * 1e-3) / 1e9},
                speedup_vs_torch=times["torch"][0] / p50 if "torch" in times else None,
                x_floor=p50 * 1e-3 / (moved / bw), pass_seconds=passes.get(name), **meta,
            ))
        last = (label, N, dtype, models, config, [name for name in merged if name in times])
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rows and profile_path is not None and not over_budget("the profiled merges"):
        profile_merges(device, *last, profile_path)
    return rows


def profile_merges(
    device: torch.device, label: str, N: int, dtype: torch.dtype, models: list[dict], config: R2MConfig,
    backends: list[str], path: Path,
) -> None:
    """One profiled merge per backend: top ops by device and by host time, and the pass seconds."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_device = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    lines = [f"# profiled merges: {label}, N={N}, {DTYPE_NAMES[dtype]}, device {device}"]
    for name in backends:
        try:
            with profile(activities=activities) as prof:
                result = r2m_fast.merge(models[0], models[1:], config, backend=name)
                _sync(device)
        except Exception as exc:
            lines.append(f"## {name}: failed: {exc!r}")
            continue
        table = prof.key_averages()
        lines += [
            f"## {name}: pass seconds {result.report['pass_seconds']}",
            f"### top by {sort_device}", table.table(sort_by=sort_device, row_limit=15),
            "### top by self_cpu_time_total", table.table(sort_by="self_cpu_time_total", row_limit=15),
        ]
    path.write_text("\n".join(lines) + "\n")
    print(f"# wrote {path}")


def print_tables(rows: list[dict], checks: list[dict], device: torch.device) -> None:
    """The short summary, printed last: checks, op geomeans per provider, end-to-end rows."""
    print()
    print("== op timings: geometric mean over shapes of x_floor and speedup vs torch ==")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["op"] != "merge_e2e":
            groups.setdefault((r["op"], r["provider"], r["dtype"], r["N"]), []).append(r)

    def gmean(values: list[float]) -> float:
        values = [v for v in values if v and v > 0]
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")

    print(f"{'op':<20}{'provider':<9}{'dtype':<6}{'N':>3}{'x_floor':>10}{'vs torch':>10}")
    for (op, provider, dtype, N), rs in sorted(groups.items()):
        print(f"{op:<20}{provider:<9}{dtype:<6}{N:>3}{gmean([r['x_floor'] for r in rs]):>10.2f}"
              f"{gmean([r['speedup_vs_torch'] for r in rs]):>10.2f}")
    e2e = [r for r in rows if r["op"] == "merge_e2e"]
    if e2e:
        print("== end-to-end merge ==")
        print(f"{'model':<17}{'provider':<20}{'dtype':<6}{'N':>3}{'ms_p50':>11}{'x_floor':>9}{'vs torch':>10}")
        for r in e2e:
            sp = r["speedup_vs_torch"]
            print(f"{r['shape']:<17}{r['provider']:<20}{r['dtype']:<6}{r['N']:>3}{r['ms_p50']:>11.1f}{r['x_floor']:>9.1f}"
                  f"{(f'{sp:.2f}' if sp else '-'):>10}")
    bad = [c for c in checks if not c["ok"]]
    print(f"== checks: {len(checks) - len(bad)}/{len(checks)} passed" + (" ==" if not bad else ", FAILED: " + "; ".join(
        f"{c['op']}/{c['provider']}/{c['dtype']}/N{c['N']} err {c['rel_err']:.2g} > {c['tol']:.2g}" for c in bad) + " =="))
    if device.type != "cuda":
        print("(not a GPU run: timings are meaningless)")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON and CSV results")
    parser.add_argument("--quick", action="store_true", help="tiny smoke version")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end merges")
    parser.add_argument("--providers", default="torch,triton,cuda", type=lambda v: v.split(","),
                        help="comma-separated backends to check and time (a kernel fault poisons the whole "
                             "process, so run_gpu.sh leaves cuda out until its tests have passed)")
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="wall-clock seconds after which remaining timing cases are skipped (checks always run); "
                             "the summary rows go first, then the end-to-end merges, then the op timings")
    parser.add_argument("--no-summary", action="store_true",
                        help="skip the summary rows (small_eigh, ViT-L and Llama-3-8B merges, summary.json)")
    parser.add_argument("--llm-blocks", type=int, default=2,
                        help="Llama-3-8B decoder blocks in the summary's 8B model (plus the embeddings; 32 is the full model)")
    parser.add_argument("--vit-blocks", type=int, default=2, help="ViT-L blocks in the summary's ViT-L model")
    parser.add_argument("--commit", default="",
                        help="commit recorded in summary.json (default: git rev-parse of this checkout)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is visible; use --device cpu --quick for a smoke run")
    if args.llm_blocks < 1 or args.vit_blocks < 1:
        parser.error(f"--llm-blocks and --vit-blocks must be at least 1, got {args.llm_blocks} and {args.vit_blocks}")
    if args.device == "cpu" and not args.quick:
        parser.error("--device cpu runs only with --quick (full shapes would take hours on CPU / the interpreter)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and args.device != "cpu":
        parser.error("TRITON_INTERPRET=1 runs kernels on CPU tensors: use --device cpu")
    with torch.no_grad():
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
