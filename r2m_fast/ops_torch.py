"""The four per-layer operations of the fast path, written with torch ops.

This module is both the `torch` backend (CPU fast path and CUDA fallback) and the contract the
Triton (`r2m_fast.kernels`) and CUDA (`r2m_fast.cuda_ops`) backends implement: same names, same
arguments, same results up to floating-point rounding. DESIGN.md section 3 describes them.

Every operation takes a layer's ``weights``: a sequence of N+1 tensors of one shape (m, n) and one
floating dtype, ``weights[0]`` the base θ₀ and ``weights[1:]`` the specialists θ₁…θ_N. Task vectors
τⱼ = θⱼ − θ₀ are formed in fp32 *before* any product (DESIGN §4: τ is ~1e-3 of θ, so a product of
raw θ in reduced precision would cancel it away).
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import torch

from r2m_fast import cpu_blas

Weights = Sequence[torch.Tensor]

_scratch = threading.local()
# A request for fewer elements than this is served from a larger held buffer, however large.
SCRATCH_KEEP_BELOW = 1 << 20


def scratch(key: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A work buffer reused from layer to layer (CPU only; contents undefined).

    Every fresh large CPU tensor is memory the kernel must fault in and zero, which costs more than
    the arithmetic done in it (~1 s per GB on a VM). Inside a merge (``scratch_pool``) the buffers
    belong to the layer's slot and only grow: the pool frees them when the merge is done with them.
    Outside one they belong to the calling thread, and a buffer over 4× the request is replaced (after
    the embeddings, say, it would hold their size for the thread's life), unless the request is small
    (SCRATCH_KEEP_BELOW: a norm's (1, 2048) between two MLP matrices would otherwise cost a fresh
    buffer for the next matrix). The caller must be done with it before asking for `key` again. On
    CUDA the caching allocator already does this."""
    shape = tuple(shape)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    held = getattr(_scratch, "buffers", None)
    if held is None:
        held = _scratch.buffers = {}
    numel = math.prod(shape)
    buf = held.get((key, dtype))
    shrink = not getattr(_scratch, "in_pool", False) and numel >= SCRATCH_KEEP_BELOW
    if buf is None or buf.numel() < numel or (shrink and buf.numel() > 4 * numel):
        buf = held[(key, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def release_scratch() -> None:
    """Free this thread's work buffers (those outside a scratch_pool)."""
    _scratch.buffers = {}


class ScratchPool:
    """Work buffers that outlive a pass's worker threads: each layer takes a free slot (a set of
    buffers) for its ops and gives it back, so the slots, as many as layers ever ran at once, keep
    the largest buffers of the layers they ran. Thread-local buffers died with each pass's workers,
    and the shrink rule dropped them after the embeddings: at 1 B bf16 the τ buffers alone were
    faulted in eight times (3.7 GB, ~0.9 M page faults) where two allocations serve."""

    def __init__(self) -> None:
        self._free: queue.SimpleQueue = queue.SimpleQueue()

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Run one layer's ops on this thread with buffers no other running layer holds."""
        try:
            buffers = self._free.get_nowait()
        except queue.Empty:
            buffers = {}
        outer = getattr(_scratch, "buffers", None), getattr(_scratch, "in_pool", False)
        _scratch.buffers, _scratch.in_pool = buffers, True
        try:
            yield
        finally:
            _scratch.buffers, _scratch.in_pool = outer
            self._free.put(buffers)


_active_pool: ContextVar[Optional[ScratchPool]] = ContextVar("r2m_scratch_pool", default=None)


@contextmanager
def scratch_pool() -> Iterator[ScratchPool]:
    """Keep the work buffers of the layers run inside the block (layer_slot) until it ends."""
    token = _active_pool.set(ScratchPool())
    try:
        yield _active_pool.get()
    finally:
        _active_pool.reset(token)


def layer_slot() -> Callable[[], ContextManager[None]]:
    """The slot context of one layer, to enter on whichever thread runs it: the active scratch_pool's,
    or none (thread-local buffers). Call it on the thread that opened the pool: workers do not see
    its context."""
    pool = _active_pool.get()
    return pool.slot if pool is not None else contextlib.nullcontext


# Elements per row block of the CPU's elementwise work (~1 MB fp32 per buffer): the N+2 buffers a
# block touches stay in cache while every step of it runs, so each input is read from memory once
# (the whole-matrix steps read and wrote each τⱼ four times; 2× slower at 2048 × 5632, N = 3).
ROW_BLOCK_ELEMENTS = 1 << 18


def row_blocks(shape: Sequence[int], device: torch.device) -> list[slice]:
    """Row ranges of an (m, n) matrix, each of about ROW_BLOCK_ELEMENTS; one range off the CPU (a GPU
    wants one large kernel per step, not many small ones)."""
    m, n = shape
    step = m if device.type != "cpu" else max(1, ROW_BLOCK_ELEMENTS // max(n, 1))
    return [slice(r, min(m, r + step)) for r in range(0, m, max(step, 1))]


def block_scratch(key: str, blocks: Sequence[slice], n: int, device: torch.device) -> torch.Tensor:
    """A scratch fp32 buffer of one row block's shape (the first block is the tallest), for work done a
    block at a time."""
    return scratch(key, (blocks[0].stop if blocks else 0, n), torch.float32, device)


def base_rows_buffer(key: str, base: torch.Tensor, blocks: Sequence[slice]) -> Optional[torch.Tensor]:
    """Where fp32_rows converts a block of a non-fp32 θ₀; None for an fp32 θ₀ (its rows serve as they are)."""
    return None if base.dtype == torch.float32 else block_scratch(key, blocks, base.shape[1], base.device)


def fp32_rows(w: torch.Tensor, rows: slice, buffer: Optional[torch.Tensor]) -> torch.Tensor:
    """w[rows] in fp32: the rows themselves when `buffer` is None (w is fp32), else converted into it."""
    return w[rows] if buffer is None else buffer[: rows.stop - rows.start].copy_(w[rows])


def task_vectors(
    weights: Weights, each_block: Optional[Callable[[slice, torch.Tensor], None]] = None
) -> torch.Tensor:
    """τ as one fp32 tensor of shape (N, m, n), in a scratch buffer on CPU (valid until the next call).

    Formed one row block at a time (row_blocks); ``each_block(rows, τ[:, rows])`` runs on each block
    as soon as it is formed, while it is in cache."""
    m, n = weights[0].shape
    device = weights[0].device
    tau = scratch("tau", (len(weights) - 1, m, n), torch.float32, device)
    blocks = row_blocks((m, n), device)
    base_rows = base_rows_buffer("tau_base", weights[0], blocks)
    for rows in blocks:
        base = fp32_rows(weights[0], rows, base_rows)
        block = tau[:, rows]
        for out, w in zip(block, weights[1:]):
            fp32_difference(out, w[rows], base)
        if each_block is not None:
            each_block(rows, block)
    return tau


def fp32_difference(out: torch.Tensor, w: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """out = w − base in fp32 (`base` fp32): one pass when w is fp32 too; otherwise θ converted exactly
    to fp32 first, then the difference (a mixed-dtype torch.sub is 3-6× slower). Same bits either way."""
    if w.dtype == base.dtype:
        return torch.sub(w, base, out=out)
    return out.copy_(w).sub_(base)


def gram_sketch(
    weights: Weights, omega: Optional[torch.Tensor]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gram matrix of the layer's task vectors and, optionally, their sketches.

    Args:
        weights: N+1 tensors (m, n), fp32/bf16/fp16.
        omega: (n, s) Gaussian test matrix, or None for the Gram alone. fp32 or bf16: the sketch
            product runs at omega's precision (τ is formed in fp32, then rounded to it).

    Returns:
        gram: (N, N) float64, Gᵢⱼ = ⟨τᵢ, τⱼ⟩ over all m·n elements.
        sketch: (N, m, s) float32, Zⱼ = τⱼ Ω, or None when omega is None.
    """
    N = len(weights) - 1
    gram = torch.zeros(N, N, dtype=torch.float64, device=weights[0].device)

    def add_gram(rows: slice, block: torch.Tensor) -> None:
        gram.add_(task_gram(block.reshape(N, -1)))

    tau = task_vectors(weights, add_gram)
    sketch = None if omega is None else cpu_blas.matmul(tau.to(omega.dtype), omega).float()
    return gram, sketch


# Columns per block of task_gram on CPU: three fp32 rows of it stay in a core's L2 cache.
GRAM_BLOCK = 32768


def task_gram(flat: torch.Tensor) -> torch.Tensor:
    """(N, N) float64 Gram of the rows of `flat` (N, K) fp32.

    On CPU in column blocks, each block's product summed in fp64: one GEMM with K in the millions
    accumulated in fp32 rounded the Gram by ~1e-3 relative (MKL, K = 11.5 M), the blocks by ~1e-7,
    and they read each element once while it is in cache (1.5× faster). The whole blocks go as one
    batched product (an N × N product per call is all overhead: 0.82 → 0.60 ms per 3 × 2¹⁸ block)."""
    if flat.device.type != "cpu":
        return (flat @ flat.T).double()
    N, K = flat.shape
    whole = K - K % GRAM_BLOCK
    gram = torch.zeros(N, N, dtype=torch.float64)
    if whole:
        blocks = flat[:, :whole].unflatten(1, (-1, GRAM_BLOCK)).transpose(0, 1)  # (K // GRAM_BLOCK, N, GRAM_BLOCK)
        gram += torch.bmm(blocks, blocks.transpose(1, 2)).double().sum(0)
    if whole < K:
        rest = flat[:, whole:]
        gram += (rest @ rest.T).double()
    return gram


def residual_matmul(
    weights: Weights, core_coeffs: torch.Tensor, rhs: torch.Tensor, transpose: bool
) -> torch.Tensor:
    """Products of every residual Fᵢ = τᵢ − Σⱼ wⱼ τⱼ with its own right-hand side.

    The residuals are never stored beyond one layer: τ_core = Σⱼ wⱼ τⱼ is formed once, so the
    combination costs O(N) per element, not O(N²) (DESIGN §3).

    Args:
        weights: N+1 tensors (m, n).
        core_coeffs: (N,) the Real-component coefficients w of this layer.
        rhs: (N, n, s) when transpose is False, (N, m, s) when it is True; fp32, or bf16 for a
            product at bf16 precision (the residual is formed in fp32, then rounded).
        transpose: multiply Fᵢᵀ instead of Fᵢ.

    Returns:
        (N, m, s) = Fᵢ rhsᵢ, or (N, n, s) = Fᵢᵀ rhsᵢ when transpose; fp32.
    """
    return residual_operator(weights, core_coeffs)(rhs, transpose)


def residual_operator(
    weights: Weights, core_coeffs: torch.Tensor
) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """residual_matmul with the layer's residuals formed once, (N, m, n) fp32, for the 2q+1
    products of one layer's range finder (the engine uses this when a backend offers it)."""
    blocks = row_blocks(weights[0].shape, weights[0].device)
    core = block_scratch("core", blocks, weights[0].shape[1], weights[0].device)

    def subtract_core(rows: slice, block: torch.Tensor) -> None:
        block.sub_(combination(block, core_coeffs, core[: rows.stop - rows.start]))

    residuals = {torch.float32: task_vectors(weights, subtract_core)}

    def matmul(rhs: torch.Tensor, transpose: bool) -> torch.Tensor:
        if rhs.dtype not in residuals:
            residuals[rhs.dtype] = residuals[torch.float32].to(rhs.dtype)
        residual = residuals[rhs.dtype]
        if transpose:
            # Fᵢᵀ rhsᵢ as (rhsᵢᵀ Fᵢ)ᵀ: a row-major Fᵢ on the right keeps the GEMM's long dimension
            # contiguous, 1.3–2× faster on CPU BLAS (oneDNN/MKL) than the transposed-A product.
            return cpu_blas.matmul(rhs.transpose(1, 2), residual).transpose(1, 2).float()
        return cpu_blas.matmul(residual, rhs).float()

    return matmul


def combination(tau: torch.Tensor, coeffs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Σⱼ cⱼ τⱼ of tau (N, m, n) fp32: into `out` (m, n) on CPU, by one scaled add per τⱼ (the einsum
    of it is a BLAS gemv there, 2.5× slower on these long rows); elsewhere one einsum kernel (and no
    host read of coeffs, which would synchronize the stream)."""
    if tau.device.type != "cpu":
        return torch.einsum("j,jmn->mn", coeffs.to(tau), tau)
    first, *rest = coeffs.tolist()
    torch.mul(tau[0], first, out=out)
    for c, t in zip(rest, tau[1:]):
        out.add_(t, alpha=c)
    return out


def orthonormalize(y: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Orthonormal bases of a batch of tall-skinny matrices by shifted CholeskyQR3.

    Householder QR is slow batched on GPUs (pytorch#143281); CholeskyQR needs only a Gram, a tiny
    Cholesky and a triangular solve, all in fp32 (an fp64 Gram costs 7× more on CPUs). Each step
    is Q ← Q R⁻¹ with Rᵀ R = QᵀQ + δ·I, δ = 1e-6 · max diag: the first step's shift bounds
    cond(Q) by ~1e3 whatever the sketch's conditioning, so two more fp32 steps restore
    orthogonality to fp32 rounding (Fukaya et al., shifted CholeskyQR3). The shift also keeps a
    rank-deficient sketch (a zero or low-rank residual) from breaking the Cholesky or inflating
    rounding noise into unit columns: such directions come out small, and a small column only adds
    a zero singular value later. Full-rank columns come out the unique thin-QR factor, their
    squared norms biased by ~1e-6.

    Args:
        y: (B, m, s) fp32 with s ≤ m.
        steps: CholeskyQR steps. 3 give orthonormality to fp32 rounding up to cond(y) ~ 1e7;
            2 leave ‖QᵀQ − I‖ ≈ 3e-5 at cond(y) = 1e4 and 0.15 at 1e6 (measured, m = 3072,
            s = 86), enough for a power iteration's intermediate basis, which only has to span
            the sketch's subspace stably: the final basis gets 2, and its third step is applied
            on the s × s side (engine.factorize_residuals).

    Returns:
        (B, m, s) fp32 with orthonormal columns wherever y has full column rank; a rank-deficient
        y gives small columns, a zero one (max squared column norm < ZERO_GRAM) a zero basis,
        never NaN, with or without subnormals flushed.
    """
    q = y.float()
    if steps and q is y:
        q = q.clone()  # the products below write into q
    for _ in range(steps):
        gram = cpu_blas.matmul(q.transpose(1, 2), q)
        cpu_blas.upper_triangular_matmul_(q, inverse_cholesky_factor(gram))
    return q


# A batch item whose largest squared column norm is below this counts as a zero sketch (entries
# < 2⁻⁵⁰ ≈ 1e-15) and gets a zero basis. Closer to fp32's subnormal range (< 2⁻¹²⁶), the products a
# flushing BLAS or GPU drops stop being negligible against the Gram itself, and the basis would
# depend on the machine (DESIGN §4).
ZERO_GRAM = 2.0**-100


def inverse_cholesky_factor(gram: torch.Tensor) -> torch.Tensor:
    """R⁻¹ with Rᵀ R = gram + δ·I, δ = 1e-6 · max diag; 0 for an item whose max diag < ZERO_GRAM.

    The Cholesky runs on the Gram scaled by a power of two 4ᵉ that brings its largest diagonal
    into [1, 4): the shift δ and every pivot (≥ ~δ) are then normal fp32 numbers whatever the
    sketch's scale, so no step depends on how the BLAS treats subnormals (on an unscaled tiny
    Gram, 1e-6 · max diag was subnormal and a flushing BLAS saw a singular matrix). The scaling
    is exact: with R_s the factor of the scaled Gram, R = 2ᵉ·R_s and R⁻¹ = R_s⁻¹ / 2ᵉ.
    """
    s = gram.shape[-1]
    eye = torch.eye(s, dtype=gram.dtype, device=gram.device)
    top = torch.diagonal(gram, dim1=-2, dim2=-1).amax(-1)
    zero = top < ZERO_GRAM  # a NaN/Inf Gram is not "zero": the Cholesky below refuses it
    half_exp = torch.floor(torch.log2(torch.where(zero, 1.0, top)) / 2)
    root = torch.exp2(half_exp)[:, None, None]  # 2ᵉ, exact
    scaled = torch.where(zero[:, None, None], eye, gram / (root * root))
    top_scaled = torch.diagonal(scaled, dim1=-2, dim2=-1).amax(-1)
    r = torch.linalg.cholesky(scaled + (1e-6 * top_scaled)[:, None, None] * eye, upper=True)
    r_inv = torch.linalg.solve_triangular(r, eye.expand_as(r), upper=True)
    return torch.where(zero[:, None, None], 0.0, r_inv / root)


def accumulate(
    weights: Weights,
    coeffs: torch.Tensor,
    left: Optional[torch.Tensor],
    right: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The merged layer: θ₀ + Σⱼ aⱼ τⱼ + L Rᵀ, computed in fp32 and cast once.

    Args:
        weights: N+1 tensors (m, n).
        coeffs: (N,) the coefficients a of the task vectors.
        left: (m, K) fp32 or None; right: (n, K) fp32 or None (both or neither).
        out_dtype: dtype of the result.
        out: where to write the result, (m, n) of out_dtype with unit column stride (the merge hands
            its place in the output file, see r2m_fast.output.ShardedSafetensorsWriter.destination),
            or None for a new tensor.

    Returns:
        (m, n) tensor of out_dtype on the weights' device: `out` when given.
    """
    (m, n), device = weights[0].shape, weights[0].device
    check_destination(out, (m, n), out_dtype)
    if out_dtype == torch.float32:
        # The result leaves (to the writer): fresh memory, not scratch, unless it has a place to go.
        acc = out if out is not None else torch.empty(m, n, device=device)
    else:  # only the cast below leaves: the fp32 sum can be scratch (fresh memory costs a fault per page)
        acc = scratch("acc_out", (m, n), torch.float32, device)
    terms = [(a, w) for a, w in zip(coeffs.tolist(), weights[1:]) if a != 0.0]
    blocks = row_blocks((m, n), device)
    base_rows = base_rows_buffer("acc_base", weights[0], blocks)
    tau = block_scratch("acc_tau", blocks, n, device)
    for rows in blocks:  # θ₀ + Σⱼ aⱼ τⱼ block by block, each block's inputs read once
        k = rows.stop - rows.start
        base = fp32_rows(weights[0], rows, base_rows)
        block = acc[rows].copy_(base)
        for a, w in terms:
            block.add_(fp32_difference(tau[:k], w[rows], base), alpha=a)
    if left is not None:
        cpu_blas.matmul_add_(acc, left.float(), right.float().T)
    if out is None:
        return acc.to(out_dtype)
    return out if acc is out else out.copy_(acc)


def check_destination(out: Optional[torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> None:
    """Refuse an accumulate `out` of another shape or dtype, or without unit column stride."""
    if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != dtype or (out.numel() and out.stride(1) != 1)):
        raise ValueError(
            f"accumulate: out must be {tuple(shape)} {dtype} with unit column stride, "
            f"got {tuple(out.shape)} {out.dtype} with strides {out.stride()}"
        )
