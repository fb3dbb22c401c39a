"""Shared test helpers: devices, a verbose assert_close, realistic synthetic weights."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import torch

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def test_devices() -> list[str]:
    """'cpu' plus 'cuda' when a GPU is present; R2M_TEST_DEVICE=cpu|cuda picks one."""
    forced = os.environ.get("R2M_TEST_DEVICE")
    if forced:
        return [forced]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def assert_close_verbose(
    actual: torch.Tensor,
    expected: torch.Tensor,
    atol: float,
    rtol: float,
    name: str = "tensor",
    reduce_dim: int = 1,
) -> None:
    """assert_close with atol scaled by sqrt(reduce_dim) and a message naming the worst element."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_mismatch = torch.isnan(actual) != torch.isnan(expected)
    assert not nan_mismatch.any(), f"{name}: NaN pattern differs at {nan_mismatch.nonzero()[:5].tolist()}"
    atol = atol * reduce_dim**0.5
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = err > bound
    if bad.any():
        worst = int(torch.argmax(err - bound))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{err.numel()} elements outside atol={atol:.3g} rtol={rtol:.3g}; "
            f"worst at {idx}: got {actual[idx].item():.6g}, expected {expected[idx].item():.6g}, "
            f"max abs err {err.max().item():.3g}"
        )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-300))


def low_rank_plus_noise(
    m: int, n: int, rank: int, generator: torch.Generator, decay: float = 0.7, noise: float = 0.05
) -> torch.Tensor:
    """An (m, n) float64 matrix with a geometrically decaying spectrum of `rank` terms plus noise,
    the shape of a real fine-tuning update."""
    rank = max(1, min(rank, m, n))
    u = torch.linalg.qr(torch.randn(m, rank, generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=generator, dtype=torch.float64))[0]
    s = decay ** torch.arange(rank, dtype=torch.float64)
    signal = (u * s) @ v.T
    return signal + noise * torch.randn(m, n, generator=generator, dtype=torch.float64) / (m * n) ** 0.5 * rank**0.5


def layer_family(
    num_specialists: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    scale: float = 1e-3,
    shared: float = 0.5,
) -> list[torch.Tensor]:
    """[θ₀, θ₁, …, θ_N] for one layer: a base of unit-scale weights and specialists that add a shared
    update plus their own low-rank-plus-noise update, each ~`scale` of the base (as in fine-tuning)."""
    g = torch.Generator().manual_seed(seed)
    m = shape[0]
    n = 1
    for d in shape[1:]:
        n *= d
    if len(shape) == 1:
        m, n = 1, shape[0]
    base = torch.randn(m, n, generator=g, dtype=torch.float64) / max(n, 1) ** 0.5
    rank = max(2, min(m, n) // 4)
    common = low_rank_plus_noise(m, n, rank, g)
    out = [base]
    for _ in range(num_specialists):
        own = low_rank_plus_noise(m, n, rank, g)
        delta = shared * common + own
        delta = delta * (scale * torch.linalg.vector_norm(base) / torch.linalg.vector_norm(delta).clamp_min(1e-300))
        out.append(base + delta)
    return [t.reshape(shape).to(dtype=dtype, device=device) for t in out]


test_devices.__test__ = False  # a helper that pytest would otherwise collect from `from helpers import *`


def merge_flags(paths, out) -> list[str]:
    """r2m-merge arguments merging paths[0] (base) and paths[1:] into `out`, quietly."""
    argv = ["--base", str(paths[0])]
    for p in paths[1:]:
        argv += ["--specialist", str(p)]
    return argv + ["--output", str(out), "--quiet"]


def has_written_tensors(shard: Path) -> bool:
    """Whether a shard being written holds tensor data yet. The writer allocates its shards whole
    before pass 1 (header written, data zero) and writes each tensor in place: a file that exists
    says only that the merge started, possibly still importing modules."""
    try:
        raw = shard.read_bytes()
    except OSError:
        return False
    if len(raw) < 8:
        return False
    return any(raw[8 + int.from_bytes(raw[:8], "little"):])


def wait_until_writing(proc: subprocess.Popen, folder: Path, timeout: float = 90.0) -> Path:
    """Block until the merge `proc` has written a tensor in its temporary output folder
    `folder/.out.tmp-*` (so a signal sent now lands mid-write) and return that folder; fail the test
    if the merge exits or never gets there."""
    import pytest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        temps = [p for p in folder.iterdir() if p.name.startswith(".out.tmp-")]
        if temps and any(has_written_tensors(shard) for shard in temps[0].glob("*.safetensors")):
            return temps[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the merge never started writing")
