"""The ``r2m-merge`` command (also ``python -m r2m_fast``).

    r2m-merge [merge] CONFIG.yaml [OUTPUT] [flags]
    r2m-merge [merge] --base PATH --specialist PATH --specialist PATH ... --output DIR [--save-state] [flags]
    r2m-merge [merge] --example DIR
    r2m-merge add --state DIR --specialist PATH [flags]
    r2m-merge remove --state DIR (--specialist PATH | --index I) [flags]

``merge`` is the default subcommand. Flags override the YAML. Every subcommand, and the distributed
entry point (r2m_fast.distributed), reports errors through :func:`run_command`: one line on stderr
and the exit code of the README's table (1: the merge failed on its data or the disk, 2: a bad
command-line or config value, 130/143: interrupted by SIGINT/SIGTERM); ``--debug`` shows the
traceback. Only the standard library is imported before main() runs, so Ctrl-C while torch loads
still exits 130 without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

PROG = "r2m-merge"
# YAML keys that are not R2MConfig fields or method options.
RUN_KEYS = ("base", "specialists", "output", "method", "options", "prefix", "shard_size", "device", "spill_dir",
            "allow_safe_globals", "tokenizer_source", "copy_tokenizer")
# The methods, for --help and argparse's choices (r2m_fast.baselines.METHODS, which imports torch).
METHOD_NAMES = ("r2m", "average", "task_arithmetic", "ties", "tsvm")


class Terminated(BaseException):
    """Raised from the SIGTERM handler so that every cleanup (the writer's temporary folder) runs."""


class CommandError(Exception):
    """A usage problem found after parsing (missing base, unknown YAML key, ...): exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``PROG: error: argument --flag: ...``, exit 2), no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(minimum: Optional[float] = None, maximum: Optional[float] = None, *, integer: bool = False,
           open_minimum: bool = False, none: bool = False) -> Callable[[str], Any]:
    """An argparse ``type=``: a finite number (an integer with `integer`) in [minimum, maximum]
    (`open_minimum`: (minimum, maximum]); `none` also takes 'none'/'off' as None. Its error says
    what was expected, e.g. ``argument --k-real: expected an integer ≥ 1, got '0'``."""
    kind = "an integer" if integer else "a number"
    if minimum is not None and maximum is not None:
        want = f"{kind} in {'(' if open_minimum else '['}{minimum:g}, {maximum:g}]"
    elif minimum is not None:
        want = f"{kind} {'>' if open_minimum else '≥'} {minimum:g}"
    else:
        want = f"a finite {kind.split()[1]}"
    if none:
        want += " or 'none'"

    def parse(text: str) -> Any:
        if none and text.strip().lower() in ("none", "off"):
            return None
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            value = None
        ok = value is not None and math.isfinite(value)
        ok = ok and (minimum is None or (value > minimum if open_minimum else value >= minimum))
        ok = ok and (maximum is None or value <= maximum)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    return parse


def dtype_arg(text: str) -> str:
    """An argparse ``type=`` for --out-dtype: the name, checked by config.parse_dtype."""
    from r2m_fast.config import parse_dtype

    try:
        parse_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("out_dtype: ")) from None
    return text


def size_arg(text: str) -> str:
    """An argparse ``type=`` for --shard-size: the text, checked by io.parse_size."""
    from r2m_fast.io import parse_size

    try:
        parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("shard_size: ")) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Merge fine-tuned specialists of one base model by R²M (or a baseline), streaming "
        "one layer at a time. Inputs: .safetensors, Hugging Face folders, .pt/.pth/.bin state dicts.",
        epilog="YAML keys: base, specialists, output, method, any R2MConfig field (rank_ratio, alpha, "
        "k_real, ...), method options (scaling, density, weights, normalize), prefix, shard_size, device, spill_dir, "
        "tokenizer_source, copy_tokenizer. Flags override it. A mergekit YAML (merge_method:, base_model:, models:) "
        "is read with mergekit's semantics and defaults. "
        "Subcommands: merge (this one, the default), add and remove (incremental re-merges of a merge run "
        "with --save-state; see r2m-merge add --help).",
    )
    p.add_argument("config", nargs="?", help="YAML file with the merge (flags override its values); a mergekit "
                   "YAML (one with merge_method:) is read as mergekit reads it")
    p.add_argument("output_dir", nargs="?", metavar="OUTPUT", help="output folder, as mergekit-yaml takes it (= --output)")
    p.add_argument("--config", dest="config_option", metavar="CONFIG.yaml", help="the YAML file, as a flag")
    io = p.add_argument_group("inputs and output")
    io.add_argument("--base", help="the pretrained model θ₀ (file, folder or cached Hugging Face id org/name)")
    io.add_argument("--specialist", action="append", dest="specialists", metavar="PATH",
                    help="a fine-tuned model or a PEFT LoRA adapter folder (repeat, at least twice)")
    io.add_argument("--tokenizer-source", metavar="PATH",
                    help="copy the tokenizer files from this model instead of the base (same vocabulary)")
    io.add_argument("--no-tokenizer", "--no-copy-tokenizer", action="store_true", dest="no_tokenizer",
                    help="write no tokenizer files into the output")
    io.add_argument("--save-state", action="store_true",
                    help="also save the merge state (Grams, sketches) in OUTPUT/r2m_state for `r2m-merge add/remove`")
    io.add_argument("--output", help="output folder (written atomically)")
    io.add_argument("--force", action="store_true", help="replace an existing output folder")
    io.add_argument("--shard-size", type=size_arg, help="largest shard, e.g. 5GB (default), 500MB, 2GiB or bytes")
    io.add_argument("--prefix", help="merge only tensors named PREFIX* and strip PREFIX (e.g. 'backbone.')")
    io.add_argument("--example", metavar="DIR",
                    help="build a small synthetic ViT and 3 specialists under DIR, merge them, print the report")
    m = p.add_argument_group("method")
    m.add_argument("--method", choices=METHOD_NAMES, help="r2m (default), average, task_arithmetic, ties, tsvm")
    m.add_argument("--scaling", "--lambda", type=number(), dest="scaling",
                   help="task_arithmetic λ (0.3), ties λ (1.0), tsvm α (1.0)")
    m.add_argument("--density", type=number(0, 1, open_minimum=True), help="ties: fraction of each task vector kept per tensor (0.2)")
    r = p.add_argument_group("R²M options (R2MConfig)")
    r.add_argument("--rank-ratio", type=number(0, 1, open_minimum=True, none=True), default=argparse.SUPPRESS, help="residual rank ratio (0.1); 'none' keeps residuals whole")
    r.add_argument("--alpha", type=number(0), help="η = alpha·‖τ_core‖ (0.6)")
    r.add_argument("--k-real", type=number(1, integer=True),
                   help="dimension of the Real subspace (1; more than the N specialists runs, and is recorded, as N)")
    r.add_argument("--seed", type=number(0, integer=True), help="seed of the random sketches (0)")
    r.add_argument("--head-prefix", help="parameters under this prefix are averaged (e.g. 'head.')")
    r.add_argument("--exclude", action="append", help="substring of passthrough parameters (repeat; default ln, norm, bias)")
    r.add_argument("--block-norm", choices=("fro_sqrtP", "fro", "none"))
    r.add_argument("--residual-scale", choices=("relative", "kit"))
    r.add_argument("--center", action="store_true", default=None, help="centred task matrix (the paper)")
    r.add_argument("--real-blend-beta", type=number())
    r.add_argument("--oversample", type=number(0, integer=True))
    r.add_argument("--power-iters", type=number(0, integer=True))
    r.add_argument("--range-finder-precision", choices=("auto", "fp32", "bf16"))
    r.add_argument("--skip-depthwise", action="store_true", default=None)
    e = p.add_argument_group("execution")
    e.add_argument("--device", help="cpu (default), cuda, cuda:1, ...")
    e.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"))
    e.add_argument("--threads", type=number(1, integer=True), help="CPU threads for torch (torch.set_num_threads)")
    e.add_argument("--out-dtype", type=dtype_arg, help="dtype of merged floating tensors (default: each base tensor's)")
    e.add_argument("--spill-dir", metavar="DIR",
                   help="keep R²M's sketches and residual factors between passes in a temporary folder inside "
                   "DIR (an existing folder) instead of memory: memory no longer grows with the model; same result")
    e.add_argument("--allow-safe-globals", action="store_true", default=None,
                   help="pickled (.pt/.bin) inputs may also hold numpy scalars, dtypes and arrays and "
                   "argparse.Namespace objects (added to torch.load(weights_only=True)'s allowlist; nothing else)")
    e.add_argument("--dry-run", action="store_true",
                   help="print the plan and estimates, check the device and the output's disk space, write nothing")
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


def _check_yaml_types(path: str, data: dict[str, Any]) -> None:
    """CommandError naming the key for a run setting of the wrong type (a list where a path goes, ...)."""
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise CommandError(f"{path}: {key}: must be {what}, got {data[key]!r}")

    for key in RUN_KEYS:  # `key: null` (or `key:`) means the default, as if absent
        if key in data and data[key] is None:
            del data[key]

    for key in ("base", "output", "prefix", "device", "spill_dir", "method"):
        if key in data:
            need(isinstance(data[key], str) and data[key] != "", key, "a non-empty string")
    if "specialists" in data:
        need(isinstance(data["specialists"], list)
             and all(isinstance(s, str) and s for s in data["specialists"]), "specialists", "a list of paths")
    if "shard_size" in data:
        need(isinstance(data["shard_size"], (int, str)) and not isinstance(data["shard_size"], bool),
             "shard_size", "a size such as 5GB or a number of bytes")
    if "options" in data and data["options"] is not None:
        need(isinstance(data["options"], dict), "options", "a mapping of option names to numbers")
    for key in ("allow_safe_globals", "copy_tokenizer"):
        if key in data:
            need(isinstance(data[key], bool), key, "true or false")
    if "tokenizer_source" in data:
        need(isinstance(data["tokenizer_source"], str) and data["tokenizer_source"] != "", "tokenizer_source",
             "a non-empty string")
    if isinstance(data.get("rank_ratio"), str) and data["rank_ratio"].strip().lower() in ("none", "off"):
        data["rank_ratio"] = None


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """YAML values overridden by flags, split into run settings, R2MConfig fields and method options.

    Every value is checked here, before anything is read: a bad one raises CommandError (exit 2)
    naming the flag or the YAML key, and so does a device that cannot run on this machine."""
    from r2m_fast.baselines import OPTION_NAMES, method_options
    from r2m_fast.config import R2MConfig
    from r2m_fast.io import parse_size
    from r2m_fast.safety import DeviceUnavailable, check_device

    data = load_yaml(args.config) if args.config else {}
    where = f"{args.config}: " if args.config else ""
    from r2m_fast import mergekit_config

    if mergekit_config.is_mergekit(data):
        try:
            data = mergekit_config.translate(data)
        except ValueError as exc:
            raise CommandError(f"{args.config}: {exc}") from None
    if args.output_dir is not None:
        if args.output is not None:
            raise CommandError("give the output folder once: OUTPUT or --output")
        args.output = args.output_dir
    fields = {f.name for f in dataclasses.fields(R2MConfig)}
    unknown = sorted(set(data) - fields - set(RUN_KEYS) - set(OPTION_NAMES))
    if unknown:
        raise CommandError(f"{args.config}: unknown key(s) {', '.join(unknown)}")
    if args.config:
        _check_yaml_types(args.config, data)
    options = dict(data.pop("options", None) or {})
    options.update({k: data.pop(k) for k in OPTION_NAMES if k in data})
    for name in OPTION_NAMES:
        if getattr(args, name, None) is not None:  # weights and normalize are YAML-only
            options[name] = getattr(args, name)
    run = {k: data.pop(k) for k in RUN_KEYS if k in data}
    for key, value in (("base", args.base), ("specialists", args.specialists), ("output", args.output),
                       ("method", args.method), ("prefix", args.prefix), ("shard_size", args.shard_size),
                       ("device", args.device), ("spill_dir", args.spill_dir),
                       ("allow_safe_globals", args.allow_safe_globals),
                       ("tokenizer_source", args.tokenizer_source)):
        if value is not None:
            run[key] = value
    if args.no_tokenizer:
        run["copy_tokenizer"] = False
    from_flags = set()
    for key in CONFIG_FLAGS:
        # --rank-ratio none means None, so that flag is "absent" by default rather than None.
        if key == "rank_ratio":
            if hasattr(args, key):
                data[key] = args.rank_ratio
                from_flags.add(key)
        elif getattr(args, key) is not None:
            data[key] = getattr(args, key)
            from_flags.add(key)
    if isinstance(data.get("exclude"), list):
        data["exclude"] = tuple(data["exclude"])
    if "base" not in run:
        raise CommandError("no base model: give --base PATH or 'base:' in the config")
    specialists = run.get("specialists") or []
    if not isinstance(specialists, list) or len(specialists) < 2:
        raise CommandError("need at least 2 specialists: --specialist PATH (repeat) or 'specialists:' in the config")
    if "output" not in run and not args.dry_run:
        raise CommandError("no output folder: give --output DIR or 'output:' in the config")
    from r2m_fast.inputs import check_inputs

    try:  # hub ids not cached, unsupported LoRA adapters: bad input, said before any work
        check_inputs(run["base"], specialists, run.get("tokenizer_source"))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    try:
        config = R2MConfig(**data)
    except (ValueError, TypeError) as exc:  # R2MConfig's messages start with the field's name
        field, _, rest = str(exc).partition(": ")
        if field in from_flags:
            raise CommandError(f"argument --{field.replace('_', '-')}: {rest}") from None
        raise CommandError(f"{where}{exc}") from None
    method = run.get("method", "r2m")
    if method == "r2m" and options:
        raise CommandError(f"method r2m takes no option(s) {', '.join(sorted(options))} (they belong to a baseline)")
    try:
        method_options(method, options)
        if run.get("shard_size") is not None:
            parse_size(run["shard_size"])
    except ValueError as exc:
        raise CommandError(f"{where}{exc}") from None
    try:
        check_device(run.get("device"))
    except (ValueError, DeviceUnavailable) as exc:
        raise CommandError(str(exc)) from None
    return {"config": config, "method": method, "options": options, **run, "specialists": [str(s) for s in specialists]}


def dry_run(settings: dict[str, Any], out=None) -> None:
    """Print the plan (layers, kinds, ranks), the estimated peak memory, flops and time, and the
    output's size against the free space where it goes (OutputError, exit 1, when it does not fit)."""
    out = out or sys.stdout
    import torch

    from r2m_fast.engine import sketch_width
    from r2m_fast.estimate import calibrate
    from r2m_fast.inputs import FileSource
    from r2m_fast.io import allowing_safe_globals
    from r2m_fast.output import DEFAULT_SHARD_SIZE, needed_bytes, output_layout
    from r2m_fast.pipeline import resident_fits
    from r2m_fast.plan import DECOMPOSED, PASSTHROUGH, build_plan
    from r2m_fast.safety import check_free_space, format_bytes, free_bytes

    config, method = settings["config"], settings["method"]
    N = len(settings["specialists"])
    with allowing_safe_globals(bool(settings.get("allow_safe_globals"))), \
            FileSource(settings["base"], settings["specialists"], device=settings.get("device"),
                       prefix=settings.get("prefix")) as source:
        specs = source.specs()
        rates = calibrate(source, method, N, settings.get("output"))
    device = torch.device(settings.get("device") or "cpu")
    model_bytes = sum(math.prod(s) * d.itemsize for s, d in specs.values())
    print(f"{PROG} --dry-run: method {method}, {N} specialists, {len(specs)} tensors, "
          f"{format_bytes(model_bytes)} per model", file=out)
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
    # work buffers (fp32: τ, the base, the sum and one more of its size for the range finder's
    # conversions and products) and up to three merged tensors in flight to the writer thread.
    inputs_bytes = (N + 1) * model_bytes
    resident_inputs = method == "r2m" and not settings.get("spill_dir") and resident_fits(inputs_bytes)
    numel_max = max((math.prod(s) for s, d in specs.values() if d.is_floating_point), default=0)
    out_size = config.out_dtype.itemsize if config.out_dtype is not None else max(
        (d.itemsize for _, d in specs.values()), default=4)
    layer_in = max((math.prod(s) * d.itemsize * (N + 1) for s, d in specs.values()), default=0)
    mapped = inputs_bytes if resident_inputs else 2 * layer_in
    if method == "r2m":
        work = 4 * numel_max * (N + 3) + 3 * numel_max * max(out_size, 4)
    else:
        work = 3 * numel_max * out_size
        if method == "ties":
            work += numel_max * (16 + N)  # |τᵢ| and kthvalue's copy in float64, the N trim masks
        elif method == "tsvm":
            work = max(work, largest)
    spill = settings.get("spill_dir") if method == "r2m" else None
    if settings.get("output") is not None:
        needed = needed_bytes(output_layout(specs, config.out_dtype), settings.get("shard_size") or DEFAULT_SHARD_SIZE)
        parent = Path(settings["output"]).absolute().parent
        free = free_bytes(parent)
        print(f"output disk space: needs {format_bytes(needed)} in {parent}, "
              f"{'unknown' if free is None else format_bytes(free)} free", file=out)
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
    print(f"estimated peak memory: {format_bytes(peak)} (this process now {format_bytes(rates.baseline_rss)}; "
          f"{where}, mapped {format_bytes(mapped)}; largest layer's work {format_bytes(work)}"
          + (f", sketches and residual factors {format_bytes(resident)}" if method == "r2m" and not spill else "")
          + ")", file=out)
    if spill:
        print(f"spilled to {spill}: sketches and residual factors, at most {format_bytes(resident)} of disk", file=out)
    print(f"estimated work: {flops / 1e9:.2f} GFLOP, {format_bytes(read_passes * inputs_bytes)} read in "
          f"{passes} pass(es), {format_bytes(model_bytes)} written", file=out)
    print(f"estimated time: {seconds:.1f} s (start-up {rates.startup_seconds:.1f} s, reading {read_s:.1f} s at "
          f"{rates.read_bytes_per_s / 1e9:.1f} GB/s, elementwise {element_s:.1f} s, GEMMs {gemm_s:.1f} s at "
          f"{rates.gemm_flops / 1e9:.0f} GFLOP/s, writing {write_s:.1f} s at {rates.write_bytes_per_s / 1e9:.1f} "
          f"GB/s; rates measured now on {device.type})", file=out)
    if settings.get("output") is not None:
        check_free_space(settings["output"], needed)


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


def run_command(prog: str, body: Callable[[], int], debug: bool = False) -> int:
    """Run a command's `body` with the one error policy of every r2m-merge subcommand and of
    ``r2m_fast.distributed``: its return value, or one line ``PROG: ...`` on stderr and the exit code
    (2 for a CommandError, a bad value found before any work; 1 for any other error, the merge failed
    on its data or disk; 130 for Ctrl-C; 143 for SIGTERM, which raises Terminated here so that every
    cleanup runs). ``debug`` prints the traceback first."""
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave SIGTERM alone
        pass
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no partial output was left", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated; no partial output was left", file=sys.stderr)
        return 143
    except CommandError as exc:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # one clear line for the user; --debug shows where
        if debug:
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``r2m-merge``; returns the exit code (also raised as SystemExit by the script)."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # during start-up (importing torch, parsing); run_command handles the merge's own
        print(f"{PROG}: interrupted; no partial output was left", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    command = "merge"
    if argv and argv[0] in SUBCOMMANDS:
        command, argv = argv[0], argv[1:]
    build, run = SUBCOMMANDS[command]
    try:
        parser = build()
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, its one line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    _import_torch()
    return run_command(parser.prog, lambda: run(args), debug=args.debug)


def _import_torch() -> None:
    """Import torch with the cyclic garbage collector off, then freeze what the import made: its ~10⁵
    objects live as long as the process, and every collection during the import and the merge
    would walk them again (0.2 s of the 3.3 s a torch import takes here, median of 8; with the merge,
    5.7 s instead of 6.5 s for a 168 M `--method average`). A process that has torch already (a
    test, a notebook calling main) is left as it is: there, freezing would keep its garbage for good."""
    if "torch" in sys.modules:
        return
    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        gc.freeze()
        gc.enable()


def _run(args: argparse.Namespace) -> int:
    if args.config_option is not None:
        if args.output_dir is not None or (args.config is not None and args.output is not None):
            raise CommandError("give the config once: CONFIG.yaml or --config, and the output once")
        # `--config X.yaml OUT`: the one positional is the output folder.
        args.config, args.output_dir = args.config_option, args.config
    if args.example is not None:
        if args.save_state:
            raise CommandError("--save-state does not combine with --example")
        from r2m_fast.example import run_example
        from r2m_fast.safety import DeviceUnavailable, check_device

        try:
            check_device(args.device)
        except (ValueError, DeviceUnavailable) as exc:
            raise CommandError(str(exc)) from None

        result = run_example(args.example, force=args.force, quiet=args.quiet, device=args.device,
                             threads=args.threads if args.threads is not None else 1, spill_dir=args.spill_dir)
        if not args.quiet:
            summarize(result)
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
    if args.save_state:
        return _merge_saving_state(args, settings)
    from r2m_fast.api import merge_files
    from r2m_fast.output import DEFAULT_SHARD_SIZE

    result = merge_files(
        settings["base"], settings["specialists"], settings["output"], settings["config"],
        method=settings["method"], options=settings["options"], prefix=settings.get("prefix"),
        device=settings.get("device"), shard_size=settings.get("shard_size") or DEFAULT_SHARD_SIZE,
        force=args.force, progress=not args.quiet, spill_dir=settings.get("spill_dir"),
        allow_safe_globals=bool(settings.get("allow_safe_globals")),
        copy_tokenizer=settings.get("copy_tokenizer", True), tokenizer_source=settings.get("tokenizer_source"),
    )
    if not args.quiet:
        summarize(result)
    return 0


def _merge_saving_state(args: argparse.Namespace, settings: dict[str, Any]) -> int:
    """``r2m-merge ... --save-state``: the merge, and its state in OUTPUT/r2m_state for add/remove."""
    from r2m_fast.incremental import STATE_DIR, merge_files_with_state
    from r2m_fast.io import allowing_safe_globals
    from r2m_fast.output import DEFAULT_SHARD_SIZE

    if settings["method"] != "r2m":
        raise CommandError("--save-state: a merge state exists for method r2m only")
    if settings.get("spill_dir") is not None:
        # save_state gathers every sketch in memory to write the state: spilling would not bound memory.
        raise CommandError("--spill-dir does not combine with --save-state")
    with allowing_safe_globals(bool(settings.get("allow_safe_globals"))):
        result = merge_files_with_state(
            settings["base"], settings["specialists"], settings["output"], settings["config"],
            prefix=settings.get("prefix"), device=settings.get("device"),
            shard_size=settings.get("shard_size") or DEFAULT_SHARD_SIZE, force=args.force, progress=not args.quiet)
    if not args.quiet:
        summarize(result)
        print(f"  state: {Path(result.report['output']) / STATE_DIR}")
    return 0


# ------------------------------------------------------------------------ add / remove (incremental)
def _incremental_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", required=True, help="the state folder (or the merged folder holding r2m_state/)")
    p.add_argument("--base", help="the base model (default: the path the state records)")
    p.add_argument("--old-specialist", action="append", dest="old", metavar="PATH",
                   help="the state's specialists, in order (repeat; default: the paths the state records)")
    p.add_argument("--output", help="output folder (default: the merged folder holding the state, replaced)")
    p.add_argument("--force", action="store_true", help="replace an existing --output folder")
    p.add_argument("--device", help="cpu (default) or cuda[:i]; must be the device type the state was made on")
    p.add_argument("--shard-size", type=size_arg, default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--alpha", type=number(0), help="change α (options that do not enter pass 1 may change)")
    p.add_argument("--k-real", type=number(1, integer=True))
    p.add_argument("--power-iters", type=number(0, integer=True))
    p.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"))
    p.add_argument("--out-dtype", type=dtype_arg)
    p.add_argument("--threads", type=number(1, integer=True), help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="full tracebacks on errors")


def build_add_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=f"{PROG} add", description="Add a specialist to a merge saved with its state (--save-state).")
    p.add_argument("--specialist", required=True, help="the new specialist")
    _incremental_flags(p)
    return p


def build_remove_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=f"{PROG} remove", description="Remove a specialist from a merge saved with its state.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--specialist", help="the specialist to drop, by the path the state records")
    which.add_argument("--index", type=number(0, integer=True), help="the specialist to drop, by its position (0-based)")
    _incremental_flags(p)
    return p


def _remerge(args: argparse.Namespace, operation: str) -> int:
    from r2m_fast import incremental
    from r2m_fast.safety import DeviceUnavailable, check_device

    try:
        check_device(args.device)  # before any work, exit 2 as a merge
    except (ValueError, DeviceUnavailable) as exc:
        raise CommandError(str(exc)) from None
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    overrides = {k: getattr(args, k) for k in ("alpha", "k_real", "power_iters", "backend", "out_dtype")
                 if getattr(args, k) is not None}
    common = dict(base=args.base, old_specialists=args.old, output=args.output, device=args.device,
                  shard_size=args.shard_size, force=args.force, progress=not args.quiet, **overrides)
    if operation == "add":
        result = incremental.add_specialist_files(args.state, args.specialist, **common)
    else:
        which = args.index if args.index is not None else args.specialist
        result = incremental.remove_specialist_files(args.state, which, **common)
    if not args.quiet:
        r = result.report
        print(f"{PROG} {operation}: merged {len(r['inputs']['specialists'])} specialists into {r['output']} "
              f"in {r['timings']['total_seconds']:.2f} s (state in {Path(r['output']) / incremental.STATE_DIR})")
    return 0


# Subcommand → (its parser, what runs it); "merge" when the first argument names none.
SUBCOMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[[argparse.Namespace], int]]] = {
    "merge": (lambda: build_parser(), lambda args: _run(args)),
    "add": (lambda: build_add_parser(), lambda args: _remerge(args, "add")),
    "remove": (lambda: build_remove_parser(), lambda args: _remerge(args, "remove")),
}


if __name__ == "__main__":
    sys.exit(main())
