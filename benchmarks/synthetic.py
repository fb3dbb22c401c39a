"""Synthetic model families at real architectures' shapes, for benchmarks (no downloads)."""

from __future__ import annotations

import torch

# name suffix → shape of one transformer block's parameters, as in timm's ViT.
def vit_block_shapes(width: int, mlp_ratio: int = 4) -> dict[str, tuple[int, ...]]:
    hidden = width * mlp_ratio
    return {
        "norm1.weight": (width,), "norm1.bias": (width,),
        "attn.qkv.weight": (3 * width, width), "attn.qkv.bias": (3 * width,),
        "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
        "norm2.weight": (width,), "norm2.bias": (width,),
        "mlp.fc1.weight": (hidden, width), "mlp.fc1.bias": (hidden,),
        "mlp.fc2.weight": (width, hidden), "mlp.fc2.bias": (width,),
    }


ARCHITECTURES = {
    "vit_b16": dict(width=768, depth=12),
    "vit_l16": dict(width=1024, depth=24),
}


def vit_shapes(width: int, depth: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for block in range(depth):
        for suffix, shape in vit_block_shapes(width).items():
            shapes[f"blocks.{block}.{suffix}"] = shape
    return shapes


def synthetic_family(
    shapes: dict[str, tuple[int, ...]],
    num_specialists: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    update_scale: float = 1e-3,
    update_rank: int = 32,
) -> list[dict[str, torch.Tensor]]:
    """[base, specialist_1, …, specialist_N]: unit-scale base weights and fine-tuning-like updates,
    a shared and an own low-rank part with decaying spectrum plus noise, ~update_scale of the base."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    models: list[dict[str, torch.Tensor]] = [{} for _ in range(num_specialists + 1)]
    for name, shape in shapes.items():
        m = shape[0] if len(shape) > 1 else 1
        n = shape[-1] if len(shape) > 1 else shape[0]
        base = torch.randn(m, n, generator=g) / n**0.5
        k = min(update_rank, m, n)
        decay = 0.85 ** torch.arange(k, dtype=torch.float32)

        def low_rank() -> torch.Tensor:
            return (torch.randn(m, k, generator=g) * decay) @ torch.randn(k, n, generator=g) / (m * n) ** 0.25

        shared = low_rank()
        models[0][name] = base.reshape(shape).to(device=device, dtype=dtype)
        for i in range(num_specialists):
            delta = 0.5 * shared + low_rank() + 0.05 * torch.randn(m, n, generator=g) * shared.std()
            delta *= update_scale * base.norm() / delta.norm()
            models[i + 1][name] = (base + delta).reshape(shape).to(device=device, dtype=dtype)
    return models
