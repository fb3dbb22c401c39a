"""The ``r2m-merge`` command (also ``python -m r2m_fast``).

    r2m-merge CONFIG.yaml [flags]
    r2m-merge --base PATH --specialist PATH --specialist PATH ... --output DIR [flags]
    r2m-merge --example DIR

Flags override the YAML. Errors print one line on stderr and exit non-zero (1: the merge failed,
2: bad command line, 130/143: interrupted by SIGINT/SIGTERM); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

from r2m_fast.baselines import METHODS, OPTION_NAMES

PROG = "r2m-merge"
# YAML keys that are not R2MConfig fields or method options.
RUN_KEYS = ("base", "specialists", "output", "method", "options", "prefix", "shard_size", "device", "spill_dir")


class Terminated(BaseException):
    """Raised from the SIGTERM handler so that every cleanup (the writer's temporary folder) runs."""


class CommandError(Exception):
    """A usage problem found after parsing (missing base, unknown YAML key, ...): exit code 2."""


def _ratio_or_none(text: str) -> Optional[float]:
    return None if text.lower() in ("none", "off") else float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Merge fine-tuned specialists of one base model by R²M (or a baseline), streaming "
        "one layer at a time. Inputs: .safetensors, Hugging Face folders, .pt/.pth/.bin state dicts.",
        epilog="YAML keys: base, specialists, output, method, any R2MConfig field (rank_ratio, alpha, "
        "k_real, ...), method options (scaling, density), prefix, shard_size, device, spill_dir. Flags override it. "
        "Incremental re-merges: `r2m-merge add --state DIR --specialist PATH` and "
        "`r2m-merge remove --state DIR (--specialist PATH | --index I)` on a merge run with --save-state.",
    )
    p.add_argument("config", nargs="?", help="YAML file with the merge (flags override its values)")
    io = p.add_argument_group("inputs and output")
    io.add_argument("--base", help="the pretrained model θ₀")
    io.add_argument("--specialist", action="append", dest="specialists", metavar="PATH",
                    help="a fine-tuned model (repeat, at least twice)")
    io.add_argument("--save-state", action="store_true",
                    help="also save the merge state (Grams, sketches) in OUTPUT/r2m_state for `r2m-merge add/remove`")
    io.add_argument("--output", help="output folder (written atomically)")
    io.add_argument("--force", action="store_true", help="replace an existing output folder")
    io.add_argument("--shard-size", help="largest shard, e.g. 5GB (default), 500MB, 2GiB or bytes")
    io.add_argument("--prefix", help="merge only tensors named PREFIX* and strip PREFIX (e.g. 'backbone.')")
    io.add_argument("--example", metavar="DIR",
                    help="build a small synthetic ViT and 3 specialists under DIR, merge them, print the report")
    m = p.add_argument_group("method")
    m.add_argument("--method", choices=METHODS, help="r2m (default), average, task_arithmetic, ties, tsvm")
    m.add_argument("--scaling", "--lambda", type=float, dest="scaling",
                   help="task_arithmetic λ (0.3), ties λ (1.0), tsvm α (1.0)")
    m.add_argument("--density", type=float, help="ties: fraction of each task vector kept per tensor (0.2)")
    r = p.add_argument_group("R²M options (R2MConfig)")
    r.add_argument("--rank-ratio", type=_ratio_or_none, default=argparse.SUPPRESS, help="residual rank ratio (0.1); 'none' keeps residuals whole")
    r.add_argument("--alpha", type=float, help="η = alpha·‖τ_core‖ (0.6)")
    r.add_argument("--k-real", type=int, help="dimension of the Real subspace (1)")
    r.add_argument("--seed", type=int, help="seed of the random sketches (0)")
    r.add_argument("--head-prefix", help="parameters under this prefix are averaged (e.g. 'head.')")
    r.add_argument("--exclude", action="append", help="substring of passthrough parameters (repeat; default ln, norm, bias)")
    r.add_argument("--block-norm", choices=("fro_sqrtP", "fro", "none"))
    r.add_argument("--residual-scale", choices=("relative", "kit"))
    r.add_argument("--center", action="store_true", default=None, help="centred task matrix (the paper)")
    r.add_argument("--real-blend-beta", type=float)
    r.add_argument("--oversample", type=int)
    r.add_argument("--power-iters", type=int)
    r.add_argument("--range-finder-precision", choices=("auto", "fp32", "bf16"))
    r.add_argument("--skip-depthwise", action="store_true", default=None)
    e = p.add_argument_group("execution")
    e.add_argument("--device", help="cpu (default), cuda, cuda:1, ...")
    e.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"))
    e.add_argument("--threads", type=int, help="CPU threads for torch (torch.set_num_threads)")
    e.add_argument("--out-dtype", help="dtype of merged floating tensors (default: each base tensor's)")
    e.add_argument("--spill-dir", metavar="DIR",
                   help="keep R²M's sketches and residual factors between passes in a temporary folder inside "
                   "DIR (an existing folder) instead of memory: memory no longer grows with the model; same result")
    e.add_argument("--dry-run", action="store_true", help="print the plan and estimates, write nothing")
    e.add_argument("--quiet", action="store_true", help="no progress bars, no summary")
    e.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    return p


# Flag dest → R2MConfig field, for the flags that set one.
CONFIG_FLAGS = (
    "rank_ratio", "alpha", "k_real", "seed", "head_prefix", "exclude", "block_norm", "residual_scale", "center",
    "real_blend_beta", "oversample", "power_iters", "range_finder_precision", "skip_depthwise", "backend",
    "out_dtype",
)


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CommandError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CommandError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CommandError(f"{path}: the config must be a mapping of keys to values")
    return data


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """YAML values overridden by flags, split into run settings, R2MConfig fields and method options."""
    from r2m_fast.config import R2MConfig

    data = load_yaml(args.config) if args.config else {}
    fields = {f.name for f in dataclasses.fields(R2MConfig)}
    unknown = sorted(set(data) - fields - set(RUN_KEYS) - set(OPTION_NAMES))
    if unknown:
        raise CommandError(f"{args.config}: unknown key(s) {', '.join(unknown)}")
    options = dict(data.pop("options", None) or {})
    options.update({k: data.pop(k) for k in OPTION_NAMES if k in data})
    for name in OPTION_NAMES:
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    run = {k: data.pop(k) for k in RUN_KEYS if k in data}
    for key, value in (("base", args.base), ("specialists", args.specialists), ("output", args.output),
                       ("method", args.method), ("prefix", args.prefix), ("shard_size", args.shard_size),
                       ("device", args.device), ("spill_dir", args.spill_dir)):
        if value is not None:
            run[key] = value
    for key in CONFIG_FLAGS:
        # --rank-ratio none means None, so that flag is "absent" by default rather than None.
        if key == "rank_ratio":
            if hasattr(args, key):
                data[key] = args.rank_ratio
        elif getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if isinstance(data.get("exclude"), list):
        data["exclude"] = tuple(data["exclude"])
    if "base" not in run:
        raise CommandError("no base model: give --base PATH or 'base:' in the config")
    specialists = run.get("specialists") or []
    if not isinstance(specialists, list) or len(specialists) < 2:
        raise CommandError("need at least 2 specialists: --specialist PATH (repeat) or 'specialists:' in the config")
    if "output" not in run and not args.dry_run:
        raise CommandError("no output folder: give --output DIR or 'output:' in the config")
    config = R2MConfig(**data)
    method = run.get("method", "r2m")
    if method == "r2m" and options:
        raise CommandError(f"method r2m takes no option(s) {', '.join(sorted(options))} (they belong to a baseline)")
    from r2m_fast.baselines import method_options

    method_options(method, options)
    return {"config": config, "method": method, "options": options, **run, "specialists": [str(s) for s in specialists]}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def dry_run(settings: dict[str, Any], out=None) -> None:
    """Print the plan (layers, kinds, ranks) and the estimated peak memory, flops and time."""
    out = out or sys.stdout
    import torch

    from r2m_fast.engine import sketch_width
    from r2m_fast.io import FileSource
    from r2m_fast.estimate import calibrate
    from r2m_fast.pipeline import resident_fits
    from r2m_fast.plan import DECOMPOSED, PASSTHROUGH, build_plan

    config, method = settings["config"], settings["method"]
    N = len(settings["specialists"])
    with FileSource(settings["base"], settings["specialists"], device=settings.get("device"),
                    prefix=settings.get("prefix")) as source:
        specs = source.specs()
        rates = calibrate(source, method, N, settings.get("output"))
    device = torch.device(settings.get("device") or "cpu")
    model_bytes = sum(math.prod(s) * d.itemsize for s, d in specs.values())
    print(f"{PROG} --dry-run: method {method}, {N} specialists, {len(specs)} tensors, "
          f"{_fmt_bytes(model_bytes)} per model", file=out)
    print(f"  base: {settings['base']}", file=out)
    for s in settings["specialists"]:
        print(f"  specialist: {s}", file=out)
    print(f"  output: {settings.get('output')}", file=out)
    flops = 0.0
    resident = 0.0  # most bytes of sketches (pass 1 → 2) and factors (pass 2 → 3) held at once
    kept: list[tuple[int, int]] = []  # per truncated layer: its sketches' and its factors' bytes
    largest = 0.0
    print(f"{'layer':<48} {'shape':<20} {'dtype':<9} {'kind':<12} rank", file=out)
    if method == "r2m":
        plan = build_plan(specs, config)
        q = config.effective_power_iters
        for layer in plan:
            m, n = layer.matrix
            numel = m * n
            largest = max(largest, numel * (layer.dtype.itemsize * (N + 1) + 4 * (N + 1)))
            if layer.kind in (DECOMPOSED, PASSTHROUGH):
                flops += N * N * numel  # Gram
                flops += 2 * (N + 1) * numel  # output combination
            if layer.rank is not None and layer.kind == DECOMPOSED:
                s = sketch_width(layer, config.oversample)
                flops += 2 * N * m * n * s * (1 + 2 * q + 1)  # sketch, power iterations, QᵀF
                flops += 2 * m * n * N * layer.rank           # accumulation L Rᵀ
                kept.append((4 * N * m * s, 4 * N * (m + n) * layer.rank))
            rank = "-" if layer.rank is None else str(layer.rank)
            dtype = str(layer.dtype).removeprefix("torch.")
            print(f"{layer.name:<48} {str(layer.shape):<20} {dtype:<9} {layer.kind:<12} {rank}", file=out)
        passes = 3
        # Pass 2 frees each layer's sketches as it stores its factors.
        held = resident = sum(sketch for sketch, _ in kept)
        for sketch, factor in kept:
            held += factor - sketch
            resident = max(resident, held)
    else:
        for name, (shape, dtype) in specs.items():
            numel = math.prod(shape)
            largest = max(largest, numel * (dtype.itemsize * (N + 1) + 8 * (N + 2)))
            kind = "copy" if not dtype.is_floating_point else (
                "head" if config.head_prefix and name.startswith(config.head_prefix) else "merged")
            flops += 3 * (N + 1) * numel
            if method == "tsvm" and len(shape) == 2 and kind == "merged":
                k = min(shape)
                flops += N * 4 * shape[0] * shape[1] * k + 4 * shape[0] * shape[1] * k
            print(f"{name:<48} {str(tuple(shape)):<20} {str(dtype).removeprefix('torch.'):<9} {kind:<12} -", file=out)
        passes = 1
    # Peak RSS: this process now (torch and all), the mapped inputs (all N+1 models when R²M keeps
    # them resident, else the last few layers, of which the largest two count), the largest layer's
    # work buffers and up to three merged tensors in flight to the writer thread.
    inputs_bytes = (N + 1) * model_bytes
    resident_inputs = method == "r2m" and not settings.get("spill_dir") and resident_fits(inputs_bytes)
    numel_max = max((math.prod(s) for s, d in specs.values() if d.is_floating_point), default=0)
    out_size = config.out_dtype.itemsize if config.out_dtype is not None else max(
        (d.itemsize for _, d in specs.values()), default=4)
    layer_in = max((math.prod(s) * d.itemsize * (N + 1) for s, d in specs.values()), default=0)
    mapped = inputs_bytes if resident_inputs else 2 * layer_in
    if method == "r2m":
        work = 4 * numel_max * (N + 2) + 3 * numel_max * max(out_size, 4)
    else:
        work = 3 * numel_max * out_size
        if method == "ties":
            work += numel_max * (16 + N)  # |τᵢ| and kthvalue's copy in float64, the N trim masks
        elif method == "tsvm":
            work = max(work, largest)
    spill = settings.get("spill_dir") if method == "r2m" else None
    peak = rates.baseline_rss + mapped + work + (0 if spill else resident)
    elements = sum(math.prod(s) for s, d in specs.values() if d.is_floating_point)
    read_passes = 1 if (method != "r2m" or resident_inputs) else passes
    read_s = read_passes * inputs_bytes / rates.read_bytes_per_s
    element_s = (passes if method == "r2m" else 1) * elements * rates.element_seconds
    gemm_s = flops / rates.gemm_flops if method in ("r2m", "tsvm") else 0.0
    write_s = sum(math.prod(s) * (out_size if d.is_floating_point else d.itemsize) for s, d in specs.values()) \
        / rates.write_bytes_per_s
    seconds = rates.startup_seconds + read_s + element_s + gemm_s + write_s
    where = ("inputs resident between passes" if resident_inputs else "inputs streamed layer by layer")
    print(f"estimated peak memory: {_fmt_bytes(peak)} (this process now {_fmt_bytes(rates.baseline_rss)}; "
          f"{where}, mapped {_fmt_bytes(mapped)}; largest layer's work {_fmt_bytes(work)}"
          + (f", sketches and residual factors {_fmt_bytes(resident)}" if method == "r2m" and not spill else "")
          + ")", file=out)
    if spill:
        print(f"spilled to {spill}: sketches and residual factors, at most {_fmt_bytes(resident)} of disk", file=out)
    print(f"estimated work: {flops / 1e9:.2f} GFLOP, {_fmt_bytes(read_passes * inputs_bytes)} read in "
          f"{passes} pass(es), {_fmt_bytes(model_bytes)} written", file=out)
    print(f"estimated time: {seconds:.1f} s (start-up {rates.startup_seconds:.1f} s, reading {read_s:.1f} s at "
          f"{rates.read_bytes_per_s / 1e9:.1f} GB/s, elementwise {element_s:.1f} s, GEMMs {gemm_s:.1f} s at "
          f"{rates.gemm_flops / 1e9:.0f} GFLOP/s, writing {write_s:.1f} s at {rates.write_bytes_per_s / 1e9:.1f} "
          f"GB/s; rates measured now on {device.type})", file=out)


def summarize(result, out=None) -> None:
    """Print a short summary of a finished file merge (its report)."""
    out = out or sys.stdout
    r = result.report
    print(f"merged with {r['method']} into {r['output']} ({', '.join(r['files'])}) "
          f"in {r['timings']['total_seconds']:.2f} s", file=out)
    if r["method"] == "r2m":
        norms = ", ".join(f"{x:.4g}" for x in r["residual_norms"])
        print(f"  backend {r['backend']} on {r['device']}; k_real {r['k_real']}, ‖τ_core‖ {r['core_norm']:.4g}, "
              f"η {r['eta']:.4g}, residual norms [{norms}]; layers {r['layers']}", file=out)
    else:
        print(f"  options {r['options']}; layers {r['layers']}", file=out)
    print(f"  report: {Path(r['output']) / 'merge_report.json'}", file=out)


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``r2m-merge``; returns the exit code (also raised as SystemExit by the script)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Incremental re-merges (r2m_fast.incremental): `r2m-merge add|remove ...`, and a merge that
    # saves the state they need with `--save-state`.
    if argv and argv[0] in ("add", "remove"):
        from r2m_fast import incremental

        return incremental.add_main(argv[1:]) if argv[0] == "add" else incremental.remove_main(argv[1:])
    if "--save-state" in argv:
        from r2m_fast import incremental

        return incremental.merge_main([a for a in argv if a != "--save-state"])
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave SIGTERM alone
        pass
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no partial output was left", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{PROG}: terminated; no partial output was left", file=sys.stderr)
        return 143
    except CommandError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # one clear line for the user; --debug shows where
        if args.debug:
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise CommandError(f"--threads: must be ≥ 1, got {args.threads}")
    if args.example is not None:
        from r2m_fast.example import run_example

        run_example(args.example, force=args.force, quiet=args.quiet, device=args.device,
                    threads=args.threads if args.threads is not None else 1, spill_dir=args.spill_dir)
        return 0
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.config is None and args.base is None and not args.specialists:
        raise CommandError("give a CONFIG.yaml, or --base PATH --specialist PATH --specialist PATH --output DIR "
                           "(or --example DIR to try it); see --help")
    settings = resolve(args)
    if args.dry_run:
        dry_run(settings)
        return 0
    from r2m_fast.io import DEFAULT_SHARD_SIZE, merge_checkpoints

    result = merge_checkpoints(
        settings["base"], settings["specialists"], settings["output"], settings["config"],
        method=settings["method"], options=settings["options"], prefix=settings.get("prefix"),
        device=settings.get("device"), shard_size=settings.get("shard_size") or DEFAULT_SHARD_SIZE,
        force=args.force, progress=not args.quiet, spill_dir=settings.get("spill_dir"),
    )
    if not args.quiet:
        summarize(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
