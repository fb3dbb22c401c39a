"""The GPU suite's summary rows (issue 16): pass 2's small eigensolver and whole merges at ViT-L and
Llama-3-8B shapes against their roofline floor and the naive randomized merge.

benchmarks/gpu_suite.py calls :func:`run_summary`, which writes
``<out>/gpu_<card>_<date>/summary.json`` with exactly::

    {"card", "date", "commit",
     "small_eigh": [{"s", "batch", "dtype", "torch_ms", "r2m_ms"}],
     "merges": [{"model", "N", "dtype", "backend", "seconds", "naive_seconds", "floor_seconds", "launches"}]}

and returns the longer rows (pass seconds, bytes, flops, the eigensolver each merge used) for the
suite's own JSON. What each number is:

* small_eigh: ``torch.linalg.eigh`` against ``r2m_fast.small_eigh.batched_eigh`` on the same (batch,
  s, s) symmetric fp32 (and fp64, the engine's dtype) matrices, median wall milliseconds with a
  device sync (both block on an info check).
* merges: ``r2m_fast.merge`` per backend, median wall seconds of whole merges after a warm-up;
  ``naive_seconds`` the naive randomized merge (benchmarks/naive_merge.py) on the same models;
  ``launches`` the device kernels of one merge (torch.profiler's CUDA kernel events; on CPU, where
  nothing is launched, its operator events); ``floor_seconds`` = max(bytes / bandwidth, flops /
  dense bf16 GEMM rate), bytes = the N+1 inputs once per pass (three passes) plus the output once
  (DESIGN §5), flops = the range finder's products, the Grams and the output's L Rᵀ, both
  bandwidth and rate measured here. Rows streamed from pinned host memory divide the bytes by the
  measured host→device bandwidth instead.
* models: ``vit-l-<k>blocks`` (timm ViT-L blocks, 1024 wide) resident, N = 3 and 8, fp32 and bf16;
  ``llama3-8b-<k>blocks+embed`` (Llama-3-8B's q/o 4096², k/v 1024×4096, gate/up 14336×4096, down
  4096×14336, the 128256×4096 embeddings and the RMSNorm vectors) in bf16, N = 3 resident on the
  GPU and N = 8 streamed from pinned host memory (model name ending ``/pinned-host``). A full 8B
  model has 32 blocks: k blocks keep a run inside a short GPU lease; the floor scales with the same
  shapes, so the ratio to it carries over.

On CPU (``--device cpu --quick``) the shapes are Llama's and ViT-L's divided by 128 and the numbers
only prove the code runs.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import r2m_fast
from r2m_fast import R2MConfig, small_eigh
from r2m_fast.plan import build_plan

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
SUMMARY_KEYS = ("card", "date", "commit", "small_eigh", "merges")
SMALL_EIGH_KEYS = ("s", "batch", "dtype", "torch_ms", "r2m_ms")
MERGE_KEYS = ("model", "N", "dtype", "backend", "seconds", "naive_seconds", "floor_seconds", "launches")
PASSES = 3  # pass 1 (Grams, sketches), pass 2 (range finder), pass 3 (output) each read the N+1 inputs


def card_name(device: torch.device) -> str:
    """"h200" for "NVIDIA H200"; "cpu" off the GPU."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip()
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_") or "gpu"


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runs(fn: Callable[[], object], device: torch.device, reps: int, warmup: bool = True) -> list[float]:
    """Wall milliseconds of `reps` runs (after one warm-up unless told not to), each ended by a
    device sync."""
    if warmup:
        fn()
        sync_device(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync_device(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def timed_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: bool = True) -> float:
    """Median wall milliseconds of `reps` runs (see timed_runs)."""
    return statistics.median(timed_runs(fn, device, reps, warmup))


# ----------------------------------------------------------------------------- machine rates
def gemm_rate(device: torch.device, quick: bool) -> float:
    """FLOP/s of a dense bf16 matmul (8192³ on the GPU; a small one elsewhere, meaningless)."""
    n = 8192 if device.type == "cuda" and not quick else 256
    a = torch.randn(n, n, device=device).bfloat16()
    b = torch.randn(n, n, device=device).bfloat16()
    ms = timed_ms(lambda: a @ b, device, reps=3 if quick else 10)
    return 2.0 * n**3 / (ms * 1e-3)


def host_to_device_bandwidth(device: torch.device, quick: bool) -> Optional[float]:
    """Bytes/s of a pinned host → device copy; None off the GPU."""
    if device.type != "cuda":
        return None
    numel = (1 << 22) if quick else (1 << 28)
    src = torch.empty(numel, dtype=torch.float32, pin_memory=True).uniform_()
    dst = torch.empty(numel, dtype=torch.float32, device=device)
    ms = timed_ms(lambda: dst.copy_(src, non_blocking=True), device, reps=3)
    return src.numel() * 4 / (ms * 1e-3)


# ----------------------------------------------------------------------------- models
def llama3_8b_shapes(blocks: int, scale: int = 1) -> dict[str, tuple[int, ...]]:
    """Llama-3-8B's parameter shapes for `blocks` decoder blocks and the embeddings (÷ scale)."""
    h, kv, ff, vocab = 4096 // scale, 1024 // scale, 14336 // scale, 128256 // scale
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for b in range(blocks):
        p = f"model.layers.{b}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
            p + "mlp.down_proj.weight": (h, ff),
        })
    return shapes


def vit_l_shapes(blocks: int, scale: int = 1) -> dict[str, tuple[int, ...]]:
    from synthetic import vit_block_shapes

    shapes = {}
    for b in range(blocks):
        for suffix, shape in vit_block_shapes(1024 // scale).items():
            shapes[f"blocks.{b}.{suffix}"] = shape
    return shapes


def make_family(shapes: dict[str, tuple[int, ...]], N: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """[base, specialists…] made on `device` layer by layer (no fp32 copy of a whole model): unit-scale
    base rows, updates ~1e-3 of the base, low rank (16) plus noise, as fine-tunes look."""
    g = torch.Generator(device=device).manual_seed(seed)
    models: list[dict[str, torch.Tensor]] = [{} for _ in range(N + 1)]
    for name, shape in shapes.items():
        m, n = (shape[0], shape[-1]) if len(shape) > 1 else (1, shape[0])
        base = torch.randn(m, n, generator=g, device=device) / math.sqrt(n)
        models[0][name] = base.to(dtype).reshape(shape)
        k = min(16, m, n)
        for i in range(N):
            delta = torch.randn(m, k, generator=g, device=device) @ torch.randn(k, n, generator=g, device=device)
            delta += 0.1 * delta.std() * torch.randn(m, n, generator=g, device=device)
            delta *= 1e-3 * base.norm() / delta.norm()
            models[i + 1][name] = (base + delta).to(dtype).reshape(shape)
            del delta
        del base
    return models


def to_pinned_host(models: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The models in page-locked host memory (what a streamed merge reads from)."""
    out = []
    for sd in models:
        out.append({k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v) for k, v in sd.items()})
    return out


# ----------------------------------------------------------------------------- floors, launches
def merge_cost(shapes: dict[str, tuple[int, ...]], N: int, dtype: torch.dtype, config: R2MConfig) -> tuple[int, float]:
    """(bytes, flops) of an ideal merge: the N+1 inputs read once per pass and the output written once;
    per truncated layer N·(2q+2) products of 2mns flops, the output's 2mn·N·r, every merged layer's Gram."""
    plan = build_plan({k: (v, dtype) for k, v in shapes.items()}, config)
    esize = torch.finfo(dtype).bits // 8
    numel = sum(math.prod(s) for s in shapes.values())
    nbytes = (PASSES * (N + 1) + 1) * numel * esize
    q = config.effective_power_iters
    flops = 0.0
    for layer in plan:
        m, n = layer.matrix
        if layer.merged:
            flops += N * (N + 1) * m * n  # the Gram's upper triangle, 2 flops per product
        if layer.rank is not None:
            s = min(layer.rank + config.oversample, m, n)
            flops += N * (2 * q + 2) * 2.0 * m * n * s + 2.0 * m * n * N * layer.rank
    return nbytes, flops


def count_launches(fn: Callable[[], object], device: torch.device) -> int:
    """Kernels one call launches (torch.profiler's CUDA kernel events; CPU: its operator events)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync_device(device)
    kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    return sum(
        1 for e in prof.events()
        if e.device_type == kind and not e.name.startswith(("Memcpy", "Memset", "cudaMemcpy", "cudaMemset"))
    )


# ----------------------------------------------------------------------------- the sections
def bench_small_eigh(device: torch.device, quick: bool, over_budget: Callable[[str], bool]) -> list[dict]:
    """torch.linalg.eigh against batched_eigh on (batch, s, s) symmetric matrices."""
    if quick:
        cases = [(s, b, torch.float32) for s in (8, 33) for b in (3, 8)] + [(33, 8, torch.float64)]
    else:
        cases = [(s, b, torch.float32) for s in (32, 64, 128, 256, 420) for b in (8, 64, 256)]
        cases += [(s, 64, torch.float64) for s in (64, 128, 256, 420)]  # the engine's dtype
    print(f"# small_eigh: batched_eigh uses {small_eigh.method(device)}")
    rows = []
    for s, batch, dtype in cases:
        if over_budget(f"small_eigh s={s} batch={batch} {DTYPE_NAMES[dtype]}"):
            continue
        g = torch.Generator(device=device).manual_seed(s + batch)
        b = torch.randn(batch, s, s + 8, generator=g, device=device, dtype=dtype)
        mats = b @ b.transpose(1, 2)
        reps = 2 if quick or (s >= 256 and batch >= 256) else 3
        torch_ms = timed_ms(lambda: torch.linalg.eigh(mats), device, reps)
        r2m_ms = timed_ms(lambda: small_eigh.batched_eigh(mats), device, reps)
        rows.append(dict(s=s, batch=batch, dtype=DTYPE_NAMES[dtype], torch_ms=torch_ms, r2m_ms=r2m_ms,
                         method=small_eigh.method(device)))
        print(f"# small_eigh s={s:<4d} batch={batch:<4d} {DTYPE_NAMES[dtype]}: torch {torch_ms:9.2f} ms, "
              f"r2m {r2m_ms:9.2f} ms ({torch_ms / r2m_ms:.1f}x)")
        del b, mats
    return rows


def merge_cases(device: torch.device, quick: bool, llm_blocks: int, vit_blocks: int) -> list[dict]:
    """(model name, shapes, N, dtype, streamed) of every summary merge row, ViT-L first."""
    cuda = device.type == "cuda"
    scale = 128 if quick else 1
    vit = vit_l_shapes(1 if quick else vit_blocks, scale)
    llm = llama3_8b_shapes(1 if quick else llm_blocks, scale)
    vit_name = f"vit-l-{1 if quick else vit_blocks}blocks" + (f"/scaled-1/{scale}" if quick else "")
    llm_name = f"llama3-8b-{1 if quick else llm_blocks}blocks+embed" + (f"/scaled-1/{scale}" if quick else "")
    dtypes = [torch.float32, torch.bfloat16] if cuda else [torch.float32]
    cases = [dict(model=vit_name, shapes=vit, N=N, dtype=d, streamed=False) for N in (3, 8) for d in dtypes]
    # bf16 is the LLM's dtype; CPU smoke runs keep fp32 (bf16 GEMMs are emulated slowly there).
    llm_dtype = torch.bfloat16 if cuda else torch.float32
    cases.append(dict(model=llm_name, shapes=llm, N=3, dtype=llm_dtype, streamed=False))
    cases.append(dict(model=llm_name + "/pinned-host", shapes=llm, N=8, dtype=llm_dtype, streamed=True))
    return cases


def bench_merges(
    device: torch.device, quick: bool, backends: list[str], config: R2MConfig, bandwidth: float,
    h2d_bandwidth: Optional[float], rate: float, over_budget: Callable[[str], bool], llm_blocks: int, vit_blocks: int,
    after_each: Callable[[list[dict]], None] = lambda rows: None,
) -> list[dict]:
    """Every merge case; `after_each(rows so far)` runs after each model, so a run killed midway keeps its rows."""
    from naive_merge import naive_merge

    rows = []
    for case in merge_cases(device, quick, llm_blocks, vit_blocks):
        model, shapes, N, dtype, streamed = case["model"], case["shapes"], case["N"], case["dtype"], case["streamed"]
        label = f"{model} N={N} {DTYPE_NAMES[dtype]}"
        if over_budget(f"merge rows of {label}"):
            continue
        try:
            models = make_family(shapes, N, dtype, device)
            if streamed and device.type == "cuda":
                models = to_pinned_host(models)
                torch.cuda.empty_cache()
        except torch.cuda.OutOfMemoryError as exc:
            print(f"# {label}: out of memory making the models: {exc}")
            continue
        nbytes, flops = merge_cost(shapes, N, dtype, config)
        bw = h2d_bandwidth if streamed and h2d_bandwidth else bandwidth
        floor = max(nbytes / bw, flops / rate)
        # A streamed 8B merge takes seconds: one timed run after the warm-up keeps the suite in a short lease.
        reps = 1 if streamed else 2 if quick or model.startswith("llama") else 3
        base, specs = models[0], models[1:]

        def naive() -> object:
            return naive_merge(base, specs, config, device=device)

        try:  # `reps` timed runs after a warm-up; streamed: one, warm from the resident rows of the same
            # shapes (a streamed naive 8B merge takes many seconds); its launches are not counted (time)
            naive_s = timed_ms(naive, device, reps=1 if streamed else reps, warmup=not streamed) * 1e-3
        except Exception as exc:  # the baseline failing (e.g. memory) must not lose the fast rows
            print(f"# {label}: naive merge failed: {exc!r}")
            naive_s = None
        rows.append(dict(model=model, N=N, dtype=DTYPE_NAMES[dtype], backend="naive_svd_lowrank", seconds=naive_s,
                         naive_seconds=naive_s, floor_seconds=floor, launches=None, bytes=nbytes,
                         flops=flops, streamed=streamed, summary=False))
        for name in backends:
            if over_budget(f"{name} on {label}"):
                continue
            reports: list[dict] = []

            def fast(name: str = name) -> object:
                result = r2m_fast.merge(base, specs, config, backend=name, device=device)
                reports.append(result.report)
                return result

            try:
                seconds = timed_ms(fast, device, reps) * 1e-3
                launches = count_launches(fast, device)
            except Exception as exc:
                print(f"# {label}: backend {name} failed: {exc!r}")
                continue
            report = reports[-1]
            rows.append(dict(model=model, N=N, dtype=DTYPE_NAMES[dtype], backend=name, seconds=seconds,
                             naive_seconds=naive_s, floor_seconds=floor, launches=launches, bytes=nbytes, flops=flops,
                             streamed=streamed, pass_seconds=report.get("pass_seconds"),
                             small_eigh=report.get("small_eigh"), summary=True))
            naive_ratio = f"{naive_s / seconds:.2f}x naive" if naive_s else "naive failed"
            print(f"# merge {label} {name}: {seconds:.3f} s ({seconds / floor:.1f}x floor {floor:.4f} s, "
                  f"{naive_ratio}), {launches} launches, pass 2 eigh: {report.get('small_eigh')}")
        del models, base, specs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        after_each(rows)
    return rows


def run_summary(
    device: torch.device, quick: bool, backends: list[str], out: Path, commit: str, bandwidth: float,
    over_budget: Callable[[str], bool], llm_blocks: int = 2, vit_blocks: int = 2,
    config: Optional[R2MConfig] = None,
) -> tuple[Path, dict]:
    """Both sections; writes <out>/gpu_<card>_<date>/summary.json and returns (its path, the full rows)."""
    config = config or R2MConfig(rank_ratio=0.1, oversample=10, power_iters=2, seed=0)
    rate = gemm_rate(device, quick)
    h2d = host_to_device_bandwidth(device, quick)
    print(f"# dense bf16 GEMM {rate / 1e12:.1f} TFLOP/s"
          + (f"; pinned host→device {h2d / 1e9:.1f} GB/s" if h2d else ""))
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    folder = out / f"gpu_{card_name(device)}_{date}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.json"

    def write(eigh_rows: list[dict], merge_rows: list[dict]) -> None:
        """The whole file again (through a temporary name), after every section and model: a run that
        a timeout kills keeps a valid summary.json of what it measured."""
        summary = {
            "card": card_name(device),
            "date": date,
            "commit": commit,
            "small_eigh": [{k: r[k] for k in SMALL_EIGH_KEYS} for r in eigh_rows],
            "merges": [{k: r[k] for k in MERGE_KEYS} for r in merge_rows if r["summary"]],
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        tmp.replace(path)

    eigh_rows = bench_small_eigh(device, quick, over_budget)
    write(eigh_rows, [])
    merge_rows = bench_merges(device, quick, backends, config, bandwidth, h2d, rate, over_budget, llm_blocks,
                              vit_blocks, after_each=lambda rows: write(eigh_rows, rows))
    write(eigh_rows, merge_rows)
    print(f"# wrote {path}")
    full = dict(gemm_flops_per_s=rate, h2d_bytes_per_s=h2d, copy_bytes_per_s=bandwidth, small_eigh=eigh_rows,
                merges=merge_rows, config=dict(rank_ratio=config.rank_ratio, oversample=config.oversample,
                                               power_iters=config.power_iters))
    return path, full


def print_summary(summary_path: Path) -> None:
    """The short table of summary.json, with the issue's targets beside each figure."""
    data = json.loads(summary_path.read_text())
    print(f"== summary.json ({data['card']}, {data['date']}, {data['commit']}) ==")
    print(f"{'s':>4}{'batch':>6}{'dtype':>6}{'torch ms':>11}{'r2m ms':>10}{'speedup':>9}  (target ≥ 10x at s ≥ 64)")
    for r in data["small_eigh"]:
        print(f"{r['s']:>4}{r['batch']:>6}{r['dtype']:>6}{r['torch_ms']:>11.2f}{r['r2m_ms']:>10.2f}"
              f"{r['torch_ms'] / r['r2m_ms']:>8.1f}x")
    print(f"{'model':<42}{'N':>3}{'dtype':>6}{'backend':>8}{'s':>9}{'x floor':>9}{'x naive':>9}{'launches':>10}")
    for r in data["merges"]:
        vs_naive = f"{r['naive_seconds'] / r['seconds']:.2f}" if r["naive_seconds"] else "-"
        print(f"{r['model']:<42}{r['N']:>3}{r['dtype']:>6}{r['backend']:>8}{r['seconds']:>9.3f}"
              f"{r['seconds'] / r['floor_seconds']:>9.1f}{vs_naive:>9}{r['launches']:>10}")
    print("targets: 8b N=3 within 3x of the floor; >= 3x naive on every vit-l row")
