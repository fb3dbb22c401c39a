"""Small synthetic model families (base + specialists) with the parameter kinds of a real network."""

from __future__ import annotations

import torch

from helpers import layer_family

# A ViT-like block plus a conv stem, a classification head and an integer buffer.
SHAPES: dict[str, tuple[int, ...]] = {
    "patch_embed.proj.weight": (24, 3, 4, 4),   # conv kernel: out × (in·kh·kw) = 24 × 48
    "patch_embed.proj.bias": (24,),
    "blocks.0.norm1.weight": (24,),
    "blocks.0.attn.qkv.weight": (72, 24),
    "blocks.0.attn.qkv.bias": (72,),
    "blocks.0.attn.proj.weight": (24, 24),
    "blocks.0.mlp.fc1.weight": (97, 24),        # ragged
    "blocks.0.mlp.fc2.weight": (24, 97),
    "pos_embed": (1, 5, 24),
    "head.weight": (2, 24),
    "head.bias": (2,),
}


def model_family(
    num_specialists: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    shapes: dict[str, tuple[int, ...]] = SHAPES,
    with_buffer: bool = True,
    device: str = "cpu",
) -> list[dict[str, torch.Tensor]]:
    """[base, specialist_1, …, specialist_N] state dicts."""
    models: list[dict[str, torch.Tensor]] = [{} for _ in range(num_specialists + 1)]
    for i, (name, shape) in enumerate(shapes.items()):
        for model, tensor in zip(models, layer_family(num_specialists, shape, dtype, device, seed=seed * 1000 + i)):
            model[name] = tensor
    if with_buffer:
        for model in models:
            model["bn.num_batches_tracked"] = torch.tensor(7, device=device)
    return models


def gapped_family(num_specialists: int, m: int, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    """One 2-D layer whose task vectors are a shared rank-2 update plus a rank-1 update each, so every
    residual has rank ≤ 2 + N: with r above that, the randomized truncation is exact up to rounding."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5
    shared = torch.randn(m, 2, generator=g, dtype=torch.float64) @ torch.randn(2, n, generator=g, dtype=torch.float64)
    models = [{"w": base}]
    for _ in range(num_specialists):
        own = torch.randn(m, 1, generator=g, dtype=torch.float64) @ torch.randn(1, n, generator=g, dtype=torch.float64)
        delta = shared + own
        models.append({"w": base + 1e-3 * delta * base.norm() / delta.norm()})
    return [{k: v.to(dtype) for k, v in sd.items()} for sd in models]
