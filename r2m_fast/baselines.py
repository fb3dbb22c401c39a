"""Baseline merges in the same streaming engine as R²M: one pass over a LayerSource, one sink.

Every baseline is local to a tensor, so each reads one parameter of the N+1 models, merges it and
hands it to the sink before reading the next: the memory bound and the writer are R²M's.

    average          θ* = (1/N) Σᵢ θᵢ                                   (= θ₀ + τ̄)
                     with weights: Σᵢ wᵢθᵢ / Σᵢ wᵢ (mergekit's "linear"; normalize=False: Σᵢ wᵢθᵢ)
    task_arithmetic  θ* = θ₀ + λ Σᵢ wᵢτᵢ                                 (Ilharco et al. 2023; λ "scaling";
                     weights 1 by default; normalize=True divides by Σᵢ wᵢ)
    ties             θ* = θ₀ + λ · disjoint_mean(sign_elect(trim_k(τᵢ)))  (Yadav et al. 2023, mergekit's
                     "ties": per task keep the top ⌊density·P⌋ entries of |τᵢ|; elected sign = sign of
                     the sum of the trimmed τᵢ (≥ 0 → +); mean over the tasks that agree with it;
                     with weights, as mergekit: wᵢ·trimmed τᵢ elect the sign, and the agreeing
                     entries' sum is divided by their weights' sum (not at all with normalize=False))
    tsvm             TSV-M (Gargiulo et al., CVPR 2025): per weight matrix (a conv kernel
                     (out, in, kh, kw) as the (out, in·kh·kw) matrix, as R²M), each task keeps its top
                     ⌊min(m, n)/N⌋ singular triplets; the concatenated U and V are orthogonalized
                     by their polar factors (U⊥ = P Qᵀ from the SVD U = P S Qᵀ), merged τ = U⊥ Σ V⊥ᵀ;
                     θ* = θ₀ + α τ. Other tensors (and matrices with min(m, n) < N) average τ.

Integer and bool buffers are copied from the base; with ``head_prefix`` set, the head is averaged as
in R²M so that the backbones are what is compared.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import torch

from r2m_fast.config import R2MConfig
from r2m_fast.pipeline import one_thread_per_worker
from r2m_fast.plan import MergeInputError, check_finite, matrix_view
from r2m_fast.result import MergeResult

Sink = Callable[[str, torch.Tensor], None]


# Per-model weights (mergekit's `weight`): None is 1 for every specialist. `normalize` divides by
# their sum as mergekit does (linear: Σwᵢθᵢ/Σwᵢ; task_arithmetic: by Σwᵢ; ties: by the sum of the
# weights that agree with the elected sign, per entry).
Weights = Optional[tuple[float, ...]]


@dataclass(frozen=True)
class AverageOptions:
    weights: Weights = None
    normalize: bool = True


@dataclass(frozen=True)
class TaskArithmeticOptions:
    scaling: float = 0.3  # λ
    weights: Weights = None
    normalize: bool = False


@dataclass(frozen=True)
class TiesOptions:
    density: Union[float, tuple[float, ...]] = 0.2  # fraction of entries of each τᵢ kept per tensor (or one per model)
    scaling: float = 1.0  # λ
    weights: Weights = None
    normalize: bool = True


@dataclass(frozen=True)
class TsvmOptions:
    scaling: float = 1.0  # α


METHOD_OPTIONS: dict[str, Optional[type]] = {
    "r2m": None,  # R²M's options are R2MConfig fields
    "average": AverageOptions,
    "task_arithmetic": TaskArithmeticOptions,
    "ties": TiesOptions,
    "tsvm": TsvmOptions,
}
METHODS = tuple(METHOD_OPTIONS)
# Every option name any baseline takes (the CLI and YAML accept them at top level).
OPTION_NAMES = tuple(sorted({f.name for cls in METHOD_OPTIONS.values() if cls for f in dataclasses.fields(cls)}))


def method_options(method: str, options: Optional[Mapping[str, Any]] = None) -> Any:
    """The validated options object of a baseline; ValueError naming an unknown method or option."""
    if method not in METHOD_OPTIONS:
        raise ValueError(f"method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    cls = METHOD_OPTIONS[method]
    options = dict(options or {})
    if cls is None:
        if options:
            raise ValueError(f"method 'r2m': unknown option(s) {', '.join(sorted(options))} (R²M takes R2MConfig fields)")
        return None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"method {method!r}: unknown option(s) {', '.join(unknown)}; it takes {', '.join(sorted(known)) or 'none'}"
        )
    values: dict[str, Any] = {}
    for name, value in options.items():
        if name == "normalize":
            if not isinstance(value, bool):
                raise ValueError(f"method {method!r}: option normalize must be true or false, got {value!r}")
            values[name] = value
            continue
        many = name == "weights" or (name == "density" and isinstance(value, (list, tuple)))
        items = value if many and isinstance(value, (list, tuple)) else [value] if not many else None
        if items is None or (many and not items) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in items):
            what = "a list of numbers, one per specialist" if many else "a number"
            raise ValueError(f"method {method!r}: option {name} must be {what}, got {value!r}")
        if name == "density" and not all(0.0 < float(v) <= 1.0 for v in items):
            raise ValueError(f"method {method!r}: option density must be in (0, 1], got {value!r}")
        values[name] = tuple(float(v) for v in items) if many else float(value)
    return cls(**values)


def _model_weights(options: Any, n: int, work: torch.dtype) -> Optional[torch.Tensor]:
    """The per-model weights as an (n,) tensor, or None when not given (all 1)."""
    weights = getattr(options, "weights", None)
    if weights is None:
        return None
    if len(weights) != n:
        raise ValueError(f"option weights: {len(weights)} given for {n} specialists")
    return torch.tensor(weights, dtype=work)


# ----------------------------------------------------------------------------------------------
# Per-tensor rules (fp32 inputs, τ formed in fp32 before anything else; DESIGN §4)
# ----------------------------------------------------------------------------------------------


def _task_vectors(tensors: list[torch.Tensor], work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    base = tensors[0].to(work)
    return base, torch.stack([t.to(work) - base for t in tensors[1:]])


def _per_model(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return weights.reshape((-1,) + (1,) * (like.dim() - 1))


def merge_average(base: torch.Tensor, taus: torch.Tensor, options: AverageOptions) -> torch.Tensor:
    w = _model_weights(options, taus.shape[0], taus.dtype)
    if w is None:
        return base + taus.mean(0)
    # Σwᵢθᵢ (/Σwᵢ) written with θᵢ = θ₀ + τᵢ.
    total = float(w.sum())
    if options.normalize and total == 0:
        raise ValueError("option weights: they sum to 0, so normalize cannot divide by their sum")
    divisor = total if options.normalize else 1.0
    return base * (total / divisor) + (_per_model(w, taus) * taus).sum(0) / divisor


def merge_task_arithmetic(base: torch.Tensor, taus: torch.Tensor, options: TaskArithmeticOptions) -> torch.Tensor:
    w = _model_weights(options, taus.shape[0], taus.dtype)
    mixed = taus.sum(0) if w is None else (_per_model(w, taus) * taus).sum(0)
    if options.normalize:
        total = float(w.sum()) if w is not None else float(taus.shape[0])
        mixed = mixed / (total if abs(total) >= 1e-8 else 1.0)  # mergekit's guard
    return base + options.scaling * mixed


def ties_trim(taus: torch.Tensor, density: Union[float, tuple[float, ...]]) -> torch.Tensor:
    """Keep the k = ⌊density·P⌋ largest |τᵢ| entries of each task (at least one), zero the rest;
    `density` is one fraction for every task or one per task."""
    if isinstance(density, tuple):
        if len(density) != taus.shape[0]:
            raise ValueError(f"option density: {len(density)} given for {taus.shape[0]} specialists")
        return torch.stack([ties_trim(t[None], d)[0] for t, d in zip(taus, density)])
    flat = taus.reshape(taus.shape[0], -1)
    numel = flat.shape[1]
    if density >= 1.0 or numel == 0:
        return taus
    k = max(1, int(density * numel))  # mergekit asserts k > 0; one entry is the nearest sane answer
    idx = flat.abs().topk(k, dim=1).indices
    mask = torch.zeros_like(flat).scatter_(1, idx, 1.0)
    return (flat * mask).reshape(taus.shape)


def merge_ties(base: torch.Tensor, taus: torch.Tensor, options: TiesOptions) -> torch.Tensor:
    trimmed = ties_trim(taus, options.density)
    w = _model_weights(options, taus.shape[0], taus.dtype)
    if w is not None:  # mergekit weighs the trimmed task vectors before electing signs
        trimmed = _per_model(w, trimmed) * trimmed
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(trimmed.dtype)  # sign by total mass
    agree = (torch.sign(trimmed) == elected).to(trimmed.dtype)   # zero entries agree with nothing
    mixed = (trimmed * agree).sum(0)
    if options.normalize:
        count = agree.sum(0) if w is None else (_per_model(w, agree) * agree).sum(0)
        mixed = mixed / torch.where(count == 0, 1.0, count)
    return base + options.scaling * mixed


def tsvm_tau(taus: torch.Tensor) -> torch.Tensor:
    """TSV-M's merged task vector of one 2-D weight from its N task vectors (N, m, n)."""
    N, m, n = taus.shape
    r = min(m, n) // N
    if r == 0:
        return taus.mean(0)
    U, S, Vh = torch.linalg.svd(taus, full_matrices=False)
    u = U[:, :, :r].permute(1, 0, 2).reshape(m, N * r)    # [U₁,r … U_N,r]   (m, N·r)
    s = S[:, :r].reshape(N * r)
    vh = Vh[:, :r, :].reshape(N * r, n)                    # [V₁,r … V_N,r]ᵀ (N·r, n)
    pu, _, qu = torch.linalg.svd(u, full_matrices=False)
    pv, _, qv = torch.linalg.svd(vh, full_matrices=False)
    return ((pu @ qu) * s) @ (pv @ qv)


def merge_tsvm(base: torch.Tensor, taus: torch.Tensor, options: TsvmOptions) -> torch.Tensor:
    if taus.dim() < 3:  # 0-D and 1-D tensors have no singular vectors: average
        return base + options.scaling * taus.mean(0)
    # A conv kernel (out, in, kh, kw) is the (out, in·kh·kw) matrix R²M truncates (plan.matrix_view).
    m, n = matrix_view(tuple(base.shape))
    tau = tsvm_tau(taus.reshape(taus.shape[0], m, n)).reshape(base.shape)
    return base + options.scaling * tau


# ----------------------------------------------------------------------------------------------
# CPU fast paths: the same float64 arithmetic, done in cache-sized chunks
# ----------------------------------------------------------------------------------------------

# Elements per chunk: float64 work buffers of 256 KiB stay in cache. Whole-tensor float64 copies
# of every input cost more than the arithmetic: each is fresh memory the kernel must fault in and
# zero (~1 s per GB here) and a trip through DRAM. Below torch's intra-op grain (32768), so each
# chunk runs on one thread: torch's OpenMP barriers stall a whole op whenever one of its threads
# is descheduled, 10-20× slower on a shared machine; threads here take chunks independently.
CHUNK = 1 << 15
# The linear rules' numpy chunks (see _linear_cpu) pay less per call: larger chunks, fewer calls
# (168 M, N = 3: 1.9 s at 2¹⁵, 1.6 s at 2¹⁷; TIES, still torch, gained nothing from them).
LINEAR_CHUNK = 1 << 17


def _run_chunks(numel: int, body: Callable[[int, int, dict], bool], chunk: Optional[int] = None) -> bool:
    """body(start, stop, scratch) over [0, numel) in pieces of `chunk` (default CHUNK) on
    torch.get_num_threads() threads, each with its own scratch dict; True when every body returned True."""
    chunk = chunk or CHUNK
    starts = range(0, numel, chunk)
    workers = max(1, min(torch.get_num_threads(), len(starts)))
    # One shared iterator: a thread that was descheduled takes fewer chunks instead of holding the
    # others up at the end (a fixed split would be the barrier again). next() on it holds the GIL.
    pending = iter(starts)

    def work(_: int) -> bool:
        scratch: dict = {}
        ok = True
        for start in pending:
            ok &= body(start, min(start + chunk, numel), scratch)
        return ok

    if workers == 1:
        return work(0)
    from concurrent.futures import ThreadPoolExecutor

    # A torch op on a chunk over its intra-op grain would otherwise run on every thread, from each.
    with one_thread_per_worker(workers), ThreadPoolExecutor(workers) as pool:
        return all(pool.map(work, range(workers)))


def _buffers(scratch: dict, count: int, size: int) -> list[torch.Tensor]:
    """`count` float64 work buffers of `size` elements, kept in `scratch` from chunk to chunk (the
    first chunk of a tensor is its largest)."""
    bufs = scratch.get(count)
    if bufs is None or bufs[0].numel() < size:
        bufs = scratch[count] = [torch.empty(size, dtype=torch.float64) for _ in range(count)]
    return [b[:size] for b in bufs]


# dtypes numpy computes with: a chunk of these is read and written in place, through numpy.
_NUMPY_DTYPES = (torch.float64, torch.float32, torch.float16)


def _numpy_view(t: torch.Tensor):
    """t as a numpy array on the same memory, or None for a dtype numpy lacks (bf16, fp8)."""
    return t.numpy() if t.dtype in _NUMPY_DTYPES else None


def _bf16_bits(t: torch.Tensor):
    """A bf16 tensor's bits as a numpy uint16 array on the same memory, or None for another dtype."""
    return t.view(torch.int16).numpy().view("uint16") if t.dtype == torch.bfloat16 else None


def _not_finite(name: str, tensors: list[torch.Tensor], labels: Any) -> None:
    """A non-finite result: name the input that holds NaN/Inf, else the overflow."""
    check_finite(name, tensors, labels)
    raise MergeInputError(f"tensor {name!r}: the merged value overflows its dtype")


def _linear_cpu(name: str, tensors: list[torch.Tensor], labels: Any, scale: float, divide: bool,
                out_dtype: torch.dtype) -> torch.Tensor:
    """θ₀ + s·Σᵢ(θᵢ − θ₀) (or θ₀ + Σᵢ(θᵢ − θ₀)/N when `divide`): float64 in the order of the
    float64 references (τᵢ exact, summed in order, scaled, added to θ₀), rounded once to
    `out_dtype`. NaN/Inf in any input reaches the result, so only the result is checked.

    The chunks are numpy arithmetic: the same IEEE operations in the same order as torch's (so the
    same bits), at a sixth of the per-call overhead, which is most of what a chunk costs (168 M
    parameters, N = 3: 2.7 s → 1.6 s). numpy reads fp32/fp16 inputs as they are (converted
    exactly to float64 inside the ufunc), bf16 as its 16 bits shifted into an fp32; fp8 chunks are
    converted by torch first."""
    import numpy

    flat = [t.reshape(-1) for t in tensors]
    numel = flat[0].numel()
    out = torch.empty(numel, dtype=out_dtype)
    n = len(flat) - 1
    arrays = [_numpy_view(x) for x in flat]
    bf16_bits = [_bf16_bits(x) for x in flat]
    out_array = _numpy_view(out)

    def body(start: int, stop: int, scratch: dict) -> bool:
        base, acc, tmp = (b.numpy() for b in _buffers(scratch, 3, stop - start))

        def chunk(i: int):
            if arrays[i] is not None:
                return arrays[i][start:stop]
            wide = _buffers(scratch, 1, stop - start)[0]
            if bf16_bits[i] is not None:
                # A bf16 number is the fp32 number with its top 16 bits: exact, and one numpy call.
                bits = wide.numpy().view("uint32")[: stop - start]
                numpy.left_shift(bf16_bits[i][start:stop], 16, out=bits, dtype="uint32")
                return bits.view("float32")
            # Converted (exactly) into float64 by torch: numpy has no such dtype (fp8).
            return wide.copy_(flat[i][start:stop]).numpy()

        numpy.copyto(base, chunk(0))
        numpy.subtract(chunk(1), base, out=acc)
        for i in range(2, n + 1):
            acc += numpy.subtract(chunk(i), base, out=tmp)
        if divide:
            acc /= n
        else:
            acc *= scale
        acc += base
        if out_array is not None:
            merged = out_array[start:stop]
            with numpy.errstate(over="ignore"):  # an overflow is named below (_not_finite), not warned
                numpy.copyto(merged, acc, casting="same_kind")
            return bool(numpy.isfinite(merged).all())
        merged = out[start:stop].copy_(torch.from_numpy(acc))
        return bool(torch.isfinite(merged).all())

    if not _run_chunks(numel, body, LINEAR_CHUNK):
        _not_finite(name, tensors, labels)
    return out.reshape(tensors[0].shape)


def _ties_masks(flat: list[torch.Tensor], density: float) -> Optional[list[torch.Tensor]]:
    """Per task, the k = ⌊density·P⌋ largest |τᵢ| (at least one) as a bool mask, found by selection
    (kthvalue) rather than a top-k sort; ties at the threshold keep the lowest indices, as a stable
    sort by −|τᵢ| does. None when nothing is trimmed."""
    numel = flat[0].numel()
    if density >= 1.0 or numel == 0:
        return None
    k = max(1, int(density * numel))
    base = flat[0].double()
    masks = []
    for x in flat[1:]:
        mag = torch.sub(x, base).abs_()  # float64: τᵢ exact, so the ranking is the exact one
        threshold = mag.kthvalue(numel - k + 1).values
        mask = mag > threshold
        need = k - int(mask.sum())
        if need > 0:
            mask[(mag == threshold).nonzero().squeeze(1)[:need]] = True
        masks.append(mask)
        del mag
    return masks


def _ties_cpu(name: str, tensors: list[torch.Tensor], labels: Any, options: TiesOptions,
              out_dtype: torch.dtype) -> torch.Tensor:
    """merge_ties in float64, chunk by chunk after the per-task trim masks; the same operations in
    the same order, so the same result, without N float64 copies of the tensor at once."""
    flat = [t.reshape(-1) for t in tensors]
    numel = flat[0].numel()
    masks = _ties_masks(flat, options.density)
    out = torch.empty(numel, dtype=out_dtype)
    n = len(flat) - 1

    def body(start: int, stop: int, scratch: dict) -> bool:
        base, total, mixed, count, *trimmed = _buffers(scratch, 4 + n, stop - start)
        base.copy_(flat[0][start:stop])
        for i, x in enumerate(flat[1:]):
            trimmed[i].copy_(x[start:stop]).sub_(base)
            if masks is not None:
                trimmed[i].mul_(masks[i][start:stop])  # a product, not a select: NaN/Inf still reach `total`
        total.copy_(trimmed[0])
        for t in trimmed[1:]:
            total.add_(t)
        if not bool(torch.isfinite(total).all()):
            return False
        elected = torch.where(total >= 0, 1.0, -1.0).to(torch.float64)
        mixed.zero_()
        count.zero_()
        for t in trimmed:
            agree = (torch.sign(t) == elected).to(torch.float64)
            count.add_(agree)
            mixed.add_(t.mul_(agree))
        mixed.div_(torch.where(count == 0, 1.0, count))
        chunk = out[start:stop]
        chunk.copy_(mixed.mul_(options.scaling).add_(base))
        return bool(torch.isfinite(chunk).all())

    if not _run_chunks(numel, body):
        _not_finite(name, tensors, labels)
    return out.reshape(tensors[0].shape)


def _fast_rule(method: str, options: Any) -> Optional[Callable[..., torch.Tensor]]:
    """The chunked CPU form of a baseline, or None: TSV-M (its SVDs want whole matrices), and
    per-model weights, per-model densities or a non-default `normalize` (mergekit's forms, which
    the chunked kernels do not implement; the whole-tensor rules above do)."""
    if getattr(options, "weights", None) is not None:
        return None
    if method == "average":
        return lambda name, tensors, labels, dt: _linear_cpu(name, tensors, labels, 1.0, True, dt)
    if method == "task_arithmetic" and not options.normalize:
        return lambda name, tensors, labels, dt: _linear_cpu(name, tensors, labels, options.scaling, False, dt)
    if method == "ties" and options.normalize and not isinstance(options.density, tuple):
        return lambda name, tensors, labels, dt: _ties_cpu(name, tensors, labels, options, dt)
    return None


_RULES: dict[str, Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]] = {
    "average": merge_average,
    "task_arithmetic": merge_task_arithmetic,
    "ties": merge_ties,
    "tsvm": merge_tsvm,
}


@torch.no_grad()
def run_baseline(
    source: Any,
    method: str,
    options: Any = None,
    config: Optional[R2MConfig] = None,
    sink: Optional[Sink] = None,
    progress: bool = False,
) -> MergeResult:
    """One streaming pass of a baseline over a LayerSource (see r2m_fast.engine.LayerSource).

    `options` is the method's options object or a mapping (validated by method_options); from
    `config` only ``out_dtype`` and ``head_prefix`` apply. Without a sink the merged tensors are
    returned in the result's state_dict.
    """
    if method not in _RULES:
        raise ValueError(f"method: {method!r} is not a baseline; choose one of {', '.join(_RULES)}")
    if options is None or isinstance(options, Mapping):
        options = method_options(method, options)
    config = config or R2MConfig()
    rule = _RULES[method]
    start = time.perf_counter()
    out: dict[str, torch.Tensor] = {}
    sink = sink or out.__setitem__
    # fp64 where it is cheap (CPU) so the baselines are references in their own right; fp32 on GPUs.
    work = torch.float64 if source.device.type == "cpu" else torch.float32
    counts = {"merged": 0, "head": 0, "copy": 0}
    specs = source.specs()
    names = list(specs)
    if progress:
        from tqdm.auto import tqdm

        names = tqdm(names, desc=f"{method}: merged weights", unit="layer", leave=False)
    fast = _fast_rule(method, options) if work == torch.float64 else None
    for name in names:
        shape, dtype = specs[name]
        tensors = source.load(name)
        if not dtype.is_floating_point:
            sink(name, tensors[0].clone())
            counts["copy"] += 1
            continue
        head = config.head_prefix is not None and name.startswith(config.head_prefix)
        if fast is not None:
            out_dtype = config.out_dtype or dtype
            if head:
                merged = _linear_cpu(name, tensors, source.labels, 1.0, True, out_dtype)
            else:
                merged = fast(name, tensors, source.labels, out_dtype)
            counts["head" if head else "merged"] += 1
            sink(name, merged)
            del tensors, merged
            continue
        check_finite(name, tensors, source.labels)
        base, taus = _task_vectors(tensors, work)
        if config.head_prefix is not None and name.startswith(config.head_prefix):
            merged = base + taus.mean(0)
            counts["head"] += 1
        else:
            merged = rule(base, taus, options)
            counts["merged"] += 1
        sink(name, merged.to(config.out_dtype or dtype))
        del tensors, base, taus, merged
    seconds = time.perf_counter() - start
    report = {
        "method": method,
        "options": dataclasses.asdict(options),
        "device": str(source.device),
        "compute_dtype": str(work).removeprefix("torch."),
        "layers": counts,
        "pass_seconds": {"merge": seconds},
        "seconds": seconds,
    }
    return MergeResult(state_dict=out, report=report)


def run_method(
    source: Any,
    config: Optional[R2MConfig] = None,
    method: str = "r2m",
    options: Optional[Mapping[str, Any]] = None,
    sink: Optional[Sink] = None,
    progress: bool = False,
    spill_dir: Optional[Any] = None,
) -> MergeResult:
    """R²M (the engine) or a baseline over a LayerSource, through the same sink. `spill_dir`: where
    R²M keeps its between-pass tensors (r2m_fast.spill); a baseline keeps none, so it only checks
    the folder and reports 0 bytes."""
    method_options(method, options)  # validates the method name and its options first
    if method == "r2m":
        from r2m_fast.engine import run_merge

        return run_merge(source, config or R2MConfig(), sink=sink, progress=progress, spill_dir=spill_dir)
    if spill_dir is None:
        return run_baseline(source, method, options, config, sink=sink, progress=progress)
    from r2m_fast.spill import check_spill_dir

    check_spill_dir(spill_dir)
    result = run_baseline(source, method, options, config, sink=sink, progress=progress)
    result.report.update(spill_bytes=0, spill_peak_bytes=0)
    return result
