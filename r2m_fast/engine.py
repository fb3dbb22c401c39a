"""The fast merge: three streaming passes over the layers around a tiny N×N solve.

Pass 1 reads every layer once and keeps its Gram Gˡ = Aˡ Aˡᵀ and, for truncated layers, the
sketches Zⱼ = τⱼ Ω. The Real subspace and every layer's core coefficients w come from the Grams
alone. Pass 2 factors each truncated residual Fᵢ = τᵢ − Σⱼ wⱼ τⱼ with a seeded randomized range
finder started from Yᵢ = Zᵢ − Σⱼ wⱼ Zⱼ (linearity: no pass to sketch residuals). The residual norms
nᵢ are only known once every layer is factored, so pass 3 writes the output:
θ* = θ₀ + Σⱼ aⱼ τⱼ + Σᵢ sᵢ Lᵢ Rᵢᵀ. A layer of N+1 models is the unit of memory.

The sequence is written once, in run_passes: a fresh merge, an incremental add or remove
(r2m_fast.incremental) differ only in the pass 1 they hand it, one process or many
(r2m_fast.distributed) only in the Exchange. The layer operations come from a backend
(r2m_fast.backends); everything here is small tensors.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, MutableMapping, Optional, Protocol, Sequence, TypeVar, Union

import torch

from r2m_fast import cpu_blas, ops_torch
from r2m_fast.backends import Backend, resolve_backend
from r2m_fast.config import R2MConfig
from r2m_fast.factors import RealSubspace, ResidualFactors
from r2m_fast.plan import (
    COPY, DECOMPOSED, EIGEN_RTOL, HEAD, NEGLIGIBLE_RESIDUAL_RTOL, PASSTHROUGH, LayerPlan, build_plan,
    MergeInputError, check_finite,
)
from r2m_fast.pipeline import cpu_workers, one_thread_per_worker, ordered_map
from r2m_fast.result import MergeResult
from r2m_fast.small_eigh import batched_eigh, method as small_eigh_method
from r2m_fast.sources import LayerSource
from r2m_fast.spill import Spill, open_spill

if TYPE_CHECKING:
    import os

    from r2m_fast.backends import LayerOps

Sink = Callable[[str, torch.Tensor], None]
T = TypeVar("T")

# Relative gap under which λ_k and λ_{k+1} are a tie and the Real subspace is ambiguous.
TIE_RTOL = 1e-6


@dataclass
class MergeState:
    """What the passes produce and later passes (or an incremental re-merge) reuse."""

    plan: list[LayerPlan]
    grams: dict[str, torch.Tensor] = field(default_factory=dict)     # (N, N) fp64, CPU
    sketches: MutableMapping[str, torch.Tensor] = field(default_factory=dict)  # (N, m, s) fp32, compute device
    # Operand dtype of the subspace-finding products (Ω and the power iterations).
    range_finder_dtype: torch.dtype = torch.float32
    # Where the sketches and residual factors wait between passes: memory (None) or files (r2m_fast.spill).
    spill: Optional[Spill] = None

    def __post_init__(self) -> None:
        self.use_spill(self.spill)

    def use_spill(self, spill: Optional[Spill]) -> None:
        """Keep the between-pass tensors in `spill` (None: memory); the sketches go there from now on."""
        self.spill = spill
        if spill is not None and not self.sketches:
            self.sketches = self.new_store("sketches")

    def new_store(self, kind: str) -> MutableMapping:
        """An empty layer name → tensor mapping: a dict, or a SpillStore when spilling."""
        return {} if self.spill is None else self.spill.store(kind)


def new_state(source: LayerSource, config: R2MConfig, backend: Backend) -> MergeState:
    """The empty state of a merge of `source` with `config` on `backend`."""
    return MergeState(
        plan=build_plan(source.specs(), config),
        range_finder_dtype=range_finder_dtype(config, source.device, backend.name),
    )


def layer_seed(seed: int, name: str) -> int:
    """Seed of one layer's sketch matrix Ω: depends on the merge seed and the name only, so any order of
    processing (or any rank of a distributed merge) draws the same Ω."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)


def sketch_width(layer: LayerPlan, oversample: int) -> int:
    return min(layer.rank + oversample, min(layer.matrix))


def range_finder_dtype(config: R2MConfig, device: torch.device, backend: str) -> torch.dtype:
    """Operand dtype of the subspace-finding products (see R2MConfig.range_finder_precision).

    "auto" takes bf16 on CUDA, and on CPUs with AMX/AVX512-BF16 for the torch backend (the
    Triton interpreter, the only CPU user of the triton backend, has no bf16)."""
    if config.range_finder_precision == "auto":
        fast_bf16 = device.type == "cuda" or (
            device.type == "cpu"
            and backend == "torch"
            and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
        )
        return torch.bfloat16 if fast_bf16 else torch.float32
    return torch.bfloat16 if config.range_finder_precision == "bf16" else torch.float32


def sketch_matrix(layer: LayerPlan, config: R2MConfig, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Ω (n, s), standard Gaussian drawn in fp32 and seeded per layer, then cast to `dtype`."""
    generator = torch.Generator(device=device).manual_seed(layer_seed(config.seed, layer.name))
    n, s = layer.matrix[1], sketch_width(layer, config.oversample)
    omega = torch.randn(n, s, generator=generator, device=device, dtype=torch.float32)
    return omega.to(dtype)


def costliest_first(layers: Sequence[LayerPlan], oversample: int, workers: int) -> list[LayerPlan]:
    """The order layer workers take `layers` in passes 1 and 2, whose results are kept by name.

    In plan order the embeddings and the LM head (5–6× an MLP matrix at 1 B) came first and last:
    the first held the in-order window while the other worker ran dry, the last ran alone at the end
    of the pass. Costliest first (by m·n·s, stable) leaves small layers for the end (longest
    processing time first). One worker keeps plan order: the files are read front to back."""
    if workers <= 1:
        return list(layers)

    def cost(layer: LayerPlan) -> int:
        return math.prod(layer.matrix) * (sketch_width(layer, oversample) if layer.rank is not None else 1)

    return sorted(layers, key=cost, reverse=True)


def _in_layer_slot(fn: Callable[..., T]) -> Callable[..., T]:
    """fn, run with a slot of the active scratch pool (ops_torch.layer_slot) on whichever worker
    thread calls it; looked up here, on the pass's thread, which the workers' context does not see."""
    slot = ops_torch.layer_slot()

    def run(*args):
        with slot():
            return fn(*args)

    return run


def _matrices(tensors: Sequence[torch.Tensor], layer: LayerPlan) -> list[torch.Tensor]:
    return [t.reshape(layer.matrix) for t in tensors]


def _progress(items: Sequence[LayerPlan], desc: str, enabled: bool):
    """A per-layer progress bar over `items` (iterate it, or call .update when items go in batches)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="layer", leave=False, disable=not enabled)


def gram_pass(
    source: LayerSource, state: MergeState, config: R2MConfig, ops, progress: bool = False
) -> None:
    """Pass 1: Grams of every merged layer, sketches of every truncated one.

    NaN/Inf anywhere in θ₀…θ_N makes a diagonal entry of the Gram non-finite, so the inputs are
    checked through the Grams without another pass over the weights; only then are the tensors
    searched to name the culprit. The Grams stay on the device until the pass ends (one transfer).
    """
    layers = [layer for layer in state.plan if layer.merged]
    grams: dict[str, torch.Tensor] = {}

    def one(layer: LayerPlan, weights: list[torch.Tensor]):
        omega = (
            sketch_matrix(layer, config, source.device, state.range_finder_dtype) if layer.rank is not None else None
        )
        gram, sketch = ops.gram_sketch(_matrices(weights, layer), omega)
        return gram.detach().to(torch.float64), sketch

    workers = cpu_workers(source.device)
    order = costliest_first(layers, config.oversample, workers)
    with one_thread_per_worker(workers):
        results = ordered_map(_in_layer_slot(one), ((layer, source.load(layer.name)) for layer in order), workers)
        for layer, (gram, sketch) in zip(_progress(order, "pass 1/3: Grams and sketches", progress), results):
            grams[layer.name] = gram
            if sketch is not None:
                state.sketches[layer.name] = sketch
    if not grams:
        return
    stacked = torch.stack([grams[layer.name] for layer in layers]).cpu()
    finite = torch.isfinite(stacked).flatten(1).all(1)
    for layer, gram, ok in zip(layers, stacked, finite.tolist()):
        if not ok:
            check_finite(layer.name, source.load(layer.name), source.labels)
            raise MergeInputError(f"tensor {layer.name!r}: its Gram overflowed (task vectors too large for fp32)")
        state.grams[layer.name] = gram


def solve_real_subspace(state: MergeState, config: R2MConfig, num_specialists: int) -> RealSubspace:
    """Step 1 from the Grams alone: C = Σ_l γ_l Gˡ, its top-k eigenvectors, and w per layer."""
    N = num_specialists
    ones = torch.full((N,), 1.0 / N, dtype=torch.float64)
    center = torch.eye(N, dtype=torch.float64) - 1.0 / N if config.center else torch.eye(N, dtype=torch.float64)
    C = torch.zeros(N, N, dtype=torch.float64)
    C_raw = torch.zeros(N, N, dtype=torch.float64)  # Σ γ H Gˡ H's uncentred twin, for a = H·C_raw·1/N
    for layer in state.plan:
        if layer.kind != DECOMPOSED:
            continue
        gram = center @ state.grams[layer.name] @ center
        gamma = _block_weight(gram, layer.numel, config.block_norm)
        C += gamma * gram
        C_raw += gamma * state.grams[layer.name]
    evals, U = torch.linalg.eigh(C)
    evals, U = evals.flip(0), U.flip(1)
    k = min(config.k_real, N)
    lam_max = float(evals[0])
    keep = evals[:k] > EIGEN_RTOL * lam_max if lam_max > 0 else torch.zeros(k, dtype=torch.bool)
    U_k, lam_k = U[:, :k][:, keep], evals[:k][keep]
    if k < N and bool(keep[-1]) and float(evals[k - 1] - evals[k]) <= TIE_RTOL * float(evals[k - 1]):
        warnings.warn(
            f"R²M: eigenvalues {k} and {k + 1} of the Real-subspace Gram tie ({float(evals[k - 1]):.6g} vs "
            f"{float(evals[k]):.6g}); the Real component is ambiguous — consider k_real={k + 1}",
            RuntimeWarning,
            stacklevel=3,
        )
    if config.center:
        # Projection of τ̄ on the span of the centred task matrix: w = H U_k Λ⁻¹ U_kᵀ H C 1/N.
        w = center @ U_k @ ((U_k.T @ center @ C_raw @ ones) / lam_k)
    else:
        # Uncentred, Λ⁻¹ U_kᵀ C = U_kᵀ: w = U_k U_kᵀ 1/N, sign-free (DESIGN §1).
        w = U_k @ (U_k.T @ ones)
    beta = config.real_blend_beta
    coeffs = {}
    core_sq = 0.0
    for layer in state.plan:
        if layer.kind == DECOMPOSED:
            coeffs[layer.name] = (1 - beta) * ones + beta * w
        elif layer.kind == PASSTHROUGH:
            coeffs[layer.name] = ones.clone()
        else:
            continue
        c = coeffs[layer.name]
        core_sq += float(c @ state.grams[layer.name] @ c)
    return RealSubspace(evals.tolist(), int(U_k.shape[1]), coeffs, math.sqrt(max(core_sq, 0.0)))


def _block_weight(gram: torch.Tensor, numel: int, block_norm: str) -> float:
    fro = math.sqrt(max(float(torch.trace(gram)), 0.0))  # ‖Aˡ‖_F² = tr Gˡ
    if block_norm == "none":
        return 1.0
    if fro == 0.0:
        return 0.0
    return (1.0 if block_norm == "fro" else math.sqrt(numel)) / fro


def factorize_residuals(
    ops,
    matmuls: Sequence[Callable[[torch.Tensor, bool], torch.Tensor]],
    core_coeffs: Sequence[torch.Tensor],
    sketches: Sequence[torch.Tensor],
    rank: int,
    power_iters: int,
    fast_dtype: torch.dtype = torch.float32,
) -> list[ResidualFactors]:
    """Halko–Martinsson–Tropp range finder for the N residuals of one or more same-shape layers.

    For each layer, ``matmuls[l](rhs, transpose)`` multiplies every residual Fᵢ = τᵢ − Σⱼ wⱼτⱼ (or
    Fᵢᵀ) by its own right-hand side, and Yᵢ = Zᵢ − Σⱼ wⱼ Zⱼ is Fᵢ Ω by linearity. The small dense
    steps (CholeskyQR, the s×s eigenproblems) run batched over all the layers given, so a GPU pays
    their launch and solver latency once per layer shape, not once per layer. q power iterations,
    each half step re-orthonormalized (fp32 subspace iteration loses small directions otherwise).
    The s×s eigenproblem of BᵢBᵢᵀ replaces the SVD of Bᵢ = QᵢᵀFᵢ: only the top r ≤ s values are
    kept, far from where squaring the spectrum loses digits. The power iterations multiply at
    `fast_dtype` (they only steer the subspace); Bᵢ is always formed in fp32.
    """
    count = len(matmuls)

    def each(stacked: torch.Tensor, transpose: bool) -> torch.Tensor:
        if count == 1:
            return matmuls[0](stacked, transpose)
        parts = stacked.chunk(count)
        return torch.cat([matmul(part, transpose) for matmul, part in zip(matmuls, parts)])

    starts = [z - torch.einsum("j,jms->ms", w.to(z), z) for w, z in zip(core_coeffs, sketches)]
    y = starts[0] if count == 1 else torch.cat(starts)
    # Intermediate bases only steer the subspace: one (shifted) CholeskyQR step, which keeps every
    # direction above the shift and only damps those below it; the basis Bᵢ is formed on gets 3 (below).
    # A second step did not move the truncation error of any contract case (q = 1 and 2, fp32 and
    # bf16: worst ratio 1.0237 either way) and cost 2 of the 7 steps; with none, bf16 missed it (1.067).
    # The final basis gets CholeskyQR3, its third step applied on the s × s side: after two steps
    # q₂ is orthonormal to ~1e-5..1e-2, so Q = q₂R⁻¹ (Rᵀ R = q₂ᵀq₂ + shift, cond(R) ≈ 1) needs no
    # product of its own: Bᵀ = FᵀQ = (Fᵀq₂)R⁻¹ and BBᵀ = R⁻ᵀ(q₂ᵀF Fᵀq₂)R⁻¹, and R⁻¹ folds into the s × r
    # matrices that form L and R below (one m × s × s product fewer per residual).
    q = ops.orthonormalize(y, steps=1 if power_iters else 2)
    for i in range(power_iters):
        p = ops.orthonormalize(each(q.to(fast_dtype), True), steps=1)
        q = ops.orthonormalize(each(p.to(fast_dtype), False), steps=2 if i == power_iters - 1 else 1)
    r_inv = ops_torch.inverse_cholesky_factor(cpu_blas.matmul(q.transpose(1, 2), q)).double()
    bt = each(q, True)  # (L·N, n, s) = Fᵢᵀ q₂ᵢ = Bᵢᵀ Rᵢ
    bt64 = bt.double()
    gram = cpu_blas.matmul(bt64.transpose(1, 2), bt64)  # one buffer: a syrk where the BLAS has one
    small = r_inv.transpose(1, 2) @ gram @ r_inv  # Bᵢ Bᵢᵀ
    small = (small + small.transpose(1, 2)) / 2
    evals, evecs = batched_eigh(small)  # CUDA: one cuSOLVER call for the whole batch; CPU: torch.linalg.eigh
    evals, evecs = evals.flip(-1)[:, :rank], evecs.flip(-1)[:, :, :rank]
    sigma = evals.clamp_min(0.0).sqrt()
    to_left = r_inv @ evecs  # q₂ → the left singular vectors: Uᵢ = q₂ᵢ R⁻¹ Vᵢ
    left = cpu_blas.matmul(q, (to_left * sigma[:, None, :]).to(q.dtype))  # Uᵢ Σᵢ, Σ on the s × r side
    inv_sigma = torch.where(sigma > 0, 1.0 / torch.where(sigma > 0, sigma, 1.0), 0.0)
    right = cpu_blas.matmul(bt, (to_left * inv_sigma[:, None, :]).to(bt.dtype))
    kept_sq = (sigma**2).sum(-1).cpu()
    return [
        ResidualFactors(l_, r_, k_)
        for l_, r_, k_ in zip(left.chunk(count), right.chunk(count), kept_sq.chunk(count))
    ]


def factor_pass(
    source: LayerSource, state: MergeState, real: RealSubspace, config: R2MConfig, ops, progress: bool = False,
) -> MutableMapping[str, ResidualFactors]:
    """Pass 2: rank-r factors of every truncated layer's residuals.

    On CPU one layer at a time, each layer's residuals formed once by ``residual_operator``
    (memory: one layer × N). On CUDA, layers of one shape and rank go through
    the range finder together (see factorize_residuals); their weights are read in place. Each
    layer's sketch is dropped from `state` once factored; the factors go to `state.new_store`.
    """
    layers = [layer for layer in state.plan if layer.rank is not None and layer.kind == DECOMPOSED]
    workers = cpu_workers(source.device)
    if source.device.type == "cuda":
        groups: dict[tuple, list[LayerPlan]] = {}
        for layer in layers:
            groups.setdefault((layer.matrix, layer.rank), []).append(layer)
        batches = list(groups.values())
    else:
        batches = [[layer] for layer in costliest_first(layers, config.oversample, workers)]
    factors = state.new_store("factors")
    # Every layer's w in one host→device copy: a blocking copy to CUDA synchronizes the stream, so one
    # per layer would drain the GPU's queue once per layer (the values are the same either way).
    rows = {layer.name: i for i, layer in enumerate(layers)}
    all_w = torch.stack([real.coeffs[layer.name] for layer in layers]).to(source.device, torch.float32) if layers else None
    bar = _progress(layers, "pass 2/3: residual factors", progress)

    def one(batch: list[LayerPlan], loaded: list[list[torch.Tensor]], sketches: list[torch.Tensor]):
        matmuls, coeffs = [], []
        for layer, tensors in zip(batch, loaded):
            weights = _matrices(tensors, layer)
            w = all_w[rows[layer.name]]
            if len(batch) == 1:
                matmuls.append(ops.residual_operator(weights, w))
            else:
                matmuls.append(functools.partial(_residual_matmul, ops, weights, w))
            coeffs.append(w)
        try:
            return factorize_residuals(
                ops, matmuls, coeffs, sketches, batch[0].rank, config.effective_power_iters, state.range_finder_dtype,
            )
        except torch.linalg.LinAlgError as exc:
            # Finite inputs always factor (orthonormalize scales and shifts every Gram); what is left
            # is an overflow in fp32 products of huge task vectors. Name the layer, not LAPACK.
            names = ", ".join(repr(layer.name) for layer in batch)
            raise MergeInputError(
                f"tensor {names}: its residuals could not be factored in fp32 (the range finder's "
                "Gram overflowed or became non-finite); check that tensor's task vectors"
            ) from exc

    # Loads and the sketches (a SpillStore reads files) on this thread; the range finders on the workers.
    args = ((batch, [source.load(layer.name) for layer in batch], [state.sketches[layer.name] for layer in batch])
            for batch in batches)
    with one_thread_per_worker(workers):
        for batch, results in zip(batches, ordered_map(_in_layer_slot(one), args, workers)):
            factors.update((layer.name, result) for layer, result in zip(batch, results))
            for layer in batch:
                del state.sketches[layer.name]  # only the range finder's start: free it (memory or disk) now
            bar.update(len(batch))
    bar.close()
    return factors


def _residual_matmul(ops, weights, core_coeffs, rhs: torch.Tensor, transpose: bool) -> torch.Tensor:
    return ops.residual_matmul(weights, core_coeffs, rhs, transpose)


def residual_norms(state: MergeState, real: RealSubspace, factors: Mapping[str, ResidualFactors], N: int) -> torch.Tensor:
    """nᵢ = ‖f̃ᵢ‖ over all merged parameters: kept σ² where truncated, cᵢᵀ Gˡ cᵢ (cᵢ = eᵢ − w) elsewhere;
    0 where it is negligible against ‖τᵢ‖ (see NEGLIGIBLE_RESIDUAL_RTOL)."""
    return residual_norms_from_kept(state, real, kept_squares(factors), N)


def kept_squares(factors: Mapping[str, ResidualFactors]) -> dict[str, torch.Tensor]:
    """Each truncated layer's kept σ², (N,) fp64; a SpillStore has them in memory and reads no factor back."""
    held = getattr(factors, "kept_squares", None)
    return held() if held is not None else {name: f.kept_sq for name, f in factors.items()}


def residual_norms_from_kept(
    state: MergeState, real: RealSubspace, kept_sq: Mapping[str, torch.Tensor], N: int
) -> torch.Tensor:
    """residual_norms from each truncated layer's kept σ² alone (N,) fp64, so a distributed merge can
    exchange those few numbers instead of the factors; summed in plan order on every rank, the
    result is bit-identical to the single-process one."""
    sq = torch.zeros(N, dtype=torch.float64)
    tau_sq = torch.zeros(N, dtype=torch.float64)
    eye = torch.eye(N, dtype=torch.float64)
    for layer in state.plan:
        if not layer.merged:
            continue
        tau_sq += torch.diagonal(state.grams[layer.name])
        if layer.name in kept_sq:
            sq += kept_sq[layer.name]
        else:
            c = eye - real.coeffs[layer.name][None, :]  # row i: eᵢ − w
            sq += torch.einsum("ij,jk,ik->i", c, state.grams[layer.name], c)
    norms = sq.clamp_min(0.0).sqrt()
    return torch.where(norms > NEGLIGIBLE_RESIDUAL_RTOL * tau_sq.sqrt(), norms, 0.0)


def residual_scales(norms: torch.Tensor, eta: float, residual_scale: str) -> torch.Tensor:
    """sᵢ with θ* = θ₀ + τ_core + Σᵢ sᵢ f̃ᵢ: η/(N nᵢ) ("relative") or η m̄/(N nᵢ) ("kit"); 0 where nᵢ = 0."""
    N = norms.shape[0]
    target = float(norms.mean()) if residual_scale == "kit" else 1.0
    safe = torch.where(norms > 0, norms, 1.0)
    return torch.where(norms > 0, eta * target / (N * safe), 0.0)


def accumulate_pass(
    source: LayerSource, state: MergeState, real: RealSubspace, factors: Mapping[str, ResidualFactors],
    scales: torch.Tensor, config: R2MConfig, ops, sink: Sink, progress: bool = False,
) -> None:
    """Pass 3: every output tensor, written once."""
    N = scales.shape[0]
    # No residual term at all (e.g. every specialist equals the base): no zero L·Rᵀ to add.
    has_residual = bool(scales.any())
    # Host→CUDA copies block on the stream: copy the scales once, and hand each layer's coefficients
    # to the op on the host (every backend takes them there: torch and cuda read them as numbers,
    # triton queues an asynchronous copy), so the pass does not drain the GPU's queue once per layer.
    device_scales = scales.to(device=source.device, dtype=torch.float32)

    def output_dtype(layer: LayerPlan) -> torch.dtype:
        return config.out_dtype or layer.dtype

    def one(
        layer: LayerPlan, tensors: list[torch.Tensor], f: Optional[ResidualFactors], place: Optional[torch.Tensor],
        rows: Optional[slice],
    ) -> torch.Tensor:
        if layer.kind == COPY:
            return tensors[0].clone() if place is None else place.copy_(tensors[0])
        left = right = None
        if layer.kind == HEAD:
            check_finite(layer.name, tensors, source.labels)  # heads skip pass 1 and its check
            coeffs = torch.full((N,), 1.0 / N, dtype=torch.float64)
        elif layer.name in factors:
            coeffs = real.coeffs[layer.name]
            if f is not None:
                f_left = (f.left if rows is None else f.left[:, rows]).permute(1, 0, 2)  # (m, N, r)
                # sᵢLᵢ side by side, (m, N·r), written in that layout by the product itself (scaling and
                # then reshaping the permuted result copied L twice).
                left = torch.empty(f_left.shape, dtype=f_left.dtype, device=f_left.device)
                left = torch.mul(f_left, device_scales.to(f_left)[None, :, None], out=left).flatten(1)
                right = f.right.permute(1, 0, 2).reshape(layer.matrix[1], -1)  # (n, N·r)
        else:
            # Untruncated: τ_core + Σᵢ sᵢ (τᵢ − τ_core) is a plain combination, aⱼ = wⱼ + sⱼ − wⱼ Σᵢ sᵢ.
            w = real.coeffs[layer.name]
            coeffs = w + scales - w * scales.sum()
        out_dtype = output_dtype(layer)
        if left is None and not bool(coeffs.any()):
            # θ* = θ₀ exactly (e.g. every specialist equals the base): the base itself, bit for bit,
            # whichever backend; a kernel's θ₀ + 0 would turn its -0.0 entries into +0.0.
            return tensors[0].to(out_dtype, copy=True) if place is None else place.copy_(tensors[0])
        weights = _matrices(tensors, layer)
        if rows is not None:  # a row block, written into its rows of the layer's place, which it returns
            ops.accumulate([w[rows] for w in weights], coeffs.to(torch.float32), left, right, out_dtype,
                           out=place.view(layer.matrix)[rows])
            return place
        out = None if place is None else place.view(layer.matrix)
        return ops.accumulate(weights, coeffs.to(torch.float32), left, right, out_dtype, out=out).reshape(layer.shape)

    # Loads and factors (a SpillStore reads files) on this thread, in order; outputs sunk in order.
    workers = cpu_workers(source.device)
    with_residual = {layer.name for layer in state.plan if has_residual and layer.name in factors}
    tasks = output_tasks(state.plan, with_residual, split=source.device.type == "cpu")
    # A sink writing into a mapped file hands out each tensor's place in it: computed there, the
    # output needs no memory of its own and no copy (a device's results go to the sink as they are).
    destination = getattr(sink, "destination", None) if source.device.type == "cpu" else None

    def task_args():
        loaded = None  # a layer's tensors, factors and place, loaded once for all its row blocks
        for layer, rows in tasks:
            if loaded is None or loaded[0] is not layer:
                f = factors[layer.name] if layer.name in with_residual else None
                place = destination(layer.name) if destination is not None else None
                if place is None and rows is not None:  # row blocks gather in one tensor of the layer
                    place = torch.empty(layer.shape, dtype=output_dtype(layer), device=source.device)
                loaded = (layer, source.load(layer.name), f, place)
            yield (*loaded, rows)

    bar = _progress(state.plan, "pass 3/3: merged weights", progress)
    with one_thread_per_worker(workers):
        for (layer, rows), merged in zip(tasks, ordered_map(_in_layer_slot(one), task_args(), workers)):
            if rows is not None and rows.stop < layer.matrix[0]:
                continue  # results come in order: the layer is whole once its last row block is
            sink(layer.name, merged)
            bar.update(1)
    bar.close()


def output_tasks(
    plan: Sequence[LayerPlan], with_residual: set[str], split: bool
) -> list[tuple[LayerPlan, Optional[slice]]]:
    """Pass 3's work items in plan order: (layer, None) for a whole layer, and with `split` (on CPU)
    (layer, rows) for each row block of a layer whose L·Rᵀ product costs over twice the median one.

    The output goes out in plan order, so pass 3 cannot take the costliest layers first as passes 1
    and 2 do. At 1 B the embeddings (first) and the LM head (last) cost 5.7× an MLP matrix: the first
    held the in-order window while the other worker ran dry, the last ran alone (~1.3 s each on a
    2-core machine). Their row blocks, about a median product each, keep every worker busy. The blocks
    depend on the plan alone, not on the number of workers: a block's product can differ from the
    whole matrix's in the last bit, and one CPU merge should give the same bits on any core count."""
    costs = sorted(math.prod(layer.matrix) for layer in plan if layer.name in with_residual)
    if not split or not costs:
        return [(layer, None) for layer in plan]
    median = costs[len(costs) // 2]
    tasks: list[tuple[LayerPlan, Optional[slice]]] = []
    for layer in plan:
        m = layer.matrix[0]
        cost = math.prod(layer.matrix)
        if layer.name not in with_residual or cost <= 2 * median:
            tasks.append((layer, None))
            continue
        step = -(-m // min(m, round(cost / median)))
        tasks.extend((layer, slice(start, min(m, start + step))) for start in range(0, m, step))
    return tasks


FirstPass = Callable[[LayerSource, MergeState, R2MConfig, "LayerOps", bool], None]


class Exchange(Protocol):
    """What the processes of one merge share between its passes (DESIGN §2). One process:
    :class:`LocalExchange`; several: r2m_fast.distributed.Comm (torch.distributed collectives).
    Each exchange is of a few numbers per layer, and exact, so any number of processes gives the
    single-process merge bit for bit."""

    leader: bool  # the process that shows progress

    def run(self, fn: Callable[[], T]) -> T:
        """fn() here; when any process fails, every process raises instead of waiting in a collective."""

    def local_state(self, state: MergeState, spill: Optional[Spill]) -> MergeState:
        """The state of the layers this process reads, factors and writes."""

    def share_grams(self, state: MergeState, local: MergeState, N: int) -> None:
        """Fill `state.grams` with every merged layer's (N, N) Gram from the processes' `local.grams`."""

    def solve(self, fn: Callable[[], RealSubspace]) -> RealSubspace:
        """The Real subspace, solved once and the same answer everywhere."""

    def share_kept(self, plan: Sequence[LayerPlan], kept: Mapping[str, torch.Tensor], N: int) -> Mapping[str, torch.Tensor]:
        """Every truncated layer's kept σ², (N,) each, from each process's own."""

    def finish_report(self, report: dict, local: MergeState, seconds: Mapping[str, float], start: float) -> None:
        """Add the spill's counters and the wall time (and, across processes, each one's share)."""


class LocalExchange:
    """One process: every layer is local and there is nothing to exchange."""

    leader = True

    def run(self, fn: Callable[[], T]) -> T:
        return fn()

    def local_state(self, state: MergeState, spill: Optional[Spill]) -> MergeState:
        state.use_spill(spill)
        return state

    def share_grams(self, state: MergeState, local: MergeState, N: int) -> None:
        pass  # the same state

    def solve(self, fn: Callable[[], RealSubspace]) -> RealSubspace:
        return fn()

    def share_kept(self, plan: Sequence[LayerPlan], kept: Mapping[str, torch.Tensor], N: int) -> Mapping[str, torch.Tensor]:
        return kept

    def finish_report(self, report: dict, local: MergeState, seconds: Mapping[str, float], start: float) -> None:
        if local.spill is not None:
            report.update(local.spill.report())
        report["seconds"] = time.perf_counter() - start


@torch.no_grad()
def run_passes(
    source: LayerSource,
    state: MergeState,
    config: R2MConfig,
    backend: Backend,
    *,
    first_pass: FirstPass = gram_pass,
    exchange: Optional[Exchange] = None,
    sink: Optional[Sink] = None,
    progress: bool = False,
    spill_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
    after_first_pass: Optional[Callable[[MergeState], None]] = None,
    start: Optional[float] = None,
) -> MergeResult:
    """The R²M pass sequence, the one place it is written: pass 1 → the N×N solve → pass 2 → the
    residual norms → pass 3 → the report.

    `state` is the empty state of the whole plan (new_state). `first_pass` fills its Grams and
    sketches: gram_pass for a fresh merge; an incremental add or remove brings its own
    (r2m_fast.incremental). `exchange` spreads the layers over processes (default: this one).
    `after_first_pass(state)` sees the state once pass 1 is done (an incremental merge saves it).
    Without a sink the merged tensors come back in the result. With `spill_dir` the sketches and
    residual factors wait between passes in a temporary folder there (r2m_fast.spill): the same
    result, bit for bit. Timing, progress and the report are done here."""
    start = time.perf_counter() if start is None else start
    exchange = exchange or LocalExchange()
    ops = backend.ops()
    N = len(source.labels) - 1
    out: dict[str, torch.Tensor] = {}
    sink = sink or out.__setitem__
    show = progress and exchange.leader
    sync = torch.cuda.synchronize if source.device.type == "cuda" else lambda: None
    seconds: dict[str, float] = {}

    with exchange.run(lambda: open_spill(spill_dir, source.device)) as spill:
        local = exchange.local_state(state, spill)

        # Work buffers stay from layer to layer and from pass 1 to pass 2 (the τ buffers), then go;
        # pass 3 keeps its own (ops_torch.scratch_pool).
        with ops_torch.scratch_pool():
            t = time.perf_counter()
            exchange.run(lambda: first_pass(source, local, config, ops, show))
            exchange.share_grams(state, local, N)
            if after_first_pass is not None:
                after_first_pass(state)
            real = exchange.solve(lambda: solve_real_subspace(state, config, N))
            sync()
            seconds["grams_and_solve"] = time.perf_counter() - t

            t = time.perf_counter()
            factors = exchange.run(lambda: factor_pass(source, local, real, config, ops, show))
            local.sketches.clear()  # sketches are only the range finder's start
            kept = exchange.share_kept(state.plan, kept_squares(factors), N)
            norms = residual_norms_from_kept(state, real, kept, N)
            eta = config.alpha * real.core_norm
            scales = residual_scales(norms, eta, config.residual_scale)
            sync()
            seconds["factors"] = time.perf_counter() - t

        with ops_torch.scratch_pool():
            t = time.perf_counter()
            exchange.run(lambda: accumulate_pass(source, local, real, factors, scales, config, ops, sink, show))
            sync()
            seconds["accumulate"] = time.perf_counter() - t

        report = merge_report(state, real, norms, eta, config, backend, source.device, seconds)
        exchange.finish_report(report, local, seconds, start)
    return MergeResult(state_dict=out, report=report)


def run_merge(
    source: LayerSource,
    config: R2MConfig,
    sink: Optional[Sink] = None,
    progress: bool = False,
    spill_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
) -> MergeResult:
    """A fresh R²M merge of a LayerSource in this process (run_passes with gram_pass)."""
    start = time.perf_counter()
    backend = resolve_backend(config.backend, source.device)
    state = new_state(source, config, backend)
    return run_passes(source, state, config, backend, sink=sink, progress=progress, spill_dir=spill_dir, start=start)


def merge_report(
    state: MergeState, real: RealSubspace, norms: torch.Tensor, eta: float, config: R2MConfig,
    backend: Backend, device: torch.device, seconds: Mapping[str, float],
) -> dict:
    """The report of an R²M merge (every path that runs the passes writes the same fields)."""
    kinds = [layer.kind for layer in state.plan]
    return {
        "method": "r2m",
        "backend": backend.name,
        "ops": dict(backend.routes),  # which backend ran each op (r2m_fast.backends)
        "device": str(device),
        "core_norm": real.core_norm,
        "eta": eta,
        "residual_norms": norms.tolist(),
        "ranks": {layer.name: layer.rank for layer in state.plan if layer.kind == DECOMPOSED},
        "eigenvalues": real.eigenvalues,
        "k_real": real.k,
        "core_coeffs": next(
            (real.coeffs[layer.name].tolist() for layer in state.plan if layer.kind == DECOMPOSED), []
        ),
        "layers": {kind: kinds.count(kind) for kind in (DECOMPOSED, PASSTHROUGH, HEAD, COPY)},
        "power_iters": config.effective_power_iters,
        "range_finder_dtype": str(state.range_finder_dtype).removeprefix("torch."),
        "oversample": config.oversample,
        "seed": config.seed,
        "pass_seconds": dict(seconds),
        "small_eigh": small_eigh_method(device),  # pass 2's s×s solver: "cusolver_batched" or the torch fallback and why
        "cpu_blas": cpu_blas.cpu_blas() if device.type == "cpu" else None,  # which BLAS multiplied (r2m_fast.cpu_blas)
    }
