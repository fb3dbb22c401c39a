"""``r2m-merge --example DIR``: a synthetic ViT-like base and three specialists, merged end to end.

Nothing is downloaded. The specialists look like fine-tunes: every 2-D weight moves by a low-rank
update shared by all tasks (what R²M calls Real), plus a low-rank update of its own, plus noise,
about 2e-3 of the weight's norm in all; norms and biases drift a little; each specialist trains its
own 10-class ``head.``, which is merged by averaging (``head_prefix: head.``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch

if TYPE_CHECKING:
    from r2m_fast.result import MergeResult

EMBED, DEPTH, MLP, PATCH, CLASSES, TOKENS = 192, 4, 768, 16, 10, 197
SPECIALISTS = ("cars", "flowers", "satellite")
TASK_NORM = 2e-3   # ‖τᵢ‖ / ‖θ₀‖ per weight, the order of real fine-tunes
HEAD_NORM = 5e-2   # heads move much more than the backbone


def vit_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, EMBED),
        "pos_embed": (1, TOKENS, EMBED),
        "patch_embed.proj.weight": (EMBED, 3, PATCH, PATCH),
        "patch_embed.proj.bias": (EMBED,),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (EMBED,), b + "norm1.bias": (EMBED,),
            b + "attn.qkv.weight": (3 * EMBED, EMBED), b + "attn.qkv.bias": (3 * EMBED,),
            b + "attn.proj.weight": (EMBED, EMBED), b + "attn.proj.bias": (EMBED,),
            b + "norm2.weight": (EMBED,), b + "norm2.bias": (EMBED,),
            b + "mlp.fc1.weight": (MLP, EMBED), b + "mlp.fc1.bias": (MLP,),
            b + "mlp.fc2.weight": (EMBED, MLP), b + "mlp.fc2.bias": (EMBED,),
        })
    shapes.update({"norm.weight": (EMBED,), "norm.bias": (EMBED,),
                   "head.weight": (CLASSES, EMBED), "head.bias": (CLASSES,)})
    return shapes


def _low_rank(m: int, n: int, rank: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)


def build_models(num_specialists: int = len(SPECIALISTS), seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """[base, specialist₁, …] fp32 state dicts of the synthetic ViT."""
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    for name, shape in vit_shapes().items():
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
            base[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            base[name] = 0.01 * torch.randn(shape, generator=g)
        else:
            base[name] = 0.02 * torch.randn(shape, generator=g)
    shared = {
        name: _low_rank(shape[0], t.numel() // shape[0], 2, g)
        for name, (shape, t) in ((n, (tuple(t.shape), t)) for n, t in base.items()) if t.dim() >= 2
    }
    models = [base]
    for _ in range(num_specialists):
        sd = {}
        for name, w in base.items():
            if name.startswith("head."):
                delta = torch.randn(w.shape, generator=g)
                scale = HEAD_NORM
            elif w.dim() >= 2:
                m, n = w.shape[0], w.numel() // w.shape[0]
                own = _low_rank(m, n, 4, g)
                noise = torch.randn(m, n, generator=g)
                delta = (shared[name] / shared[name].norm() + own / own.norm() + 0.3 * noise / noise.norm()).reshape(w.shape)
                scale = TASK_NORM
            else:
                delta = torch.randn(w.shape, generator=g)
                scale = TASK_NORM
            sd[name] = w + scale * delta * (w.norm() / delta.norm())
        models.append(sd)
    return models


def write_example(folder: Union[str, os.PathLike]) -> tuple[Path, list[Path]]:
    """Write base.safetensors and one file per specialist under `folder`, plus merge.yaml."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    models = build_models()
    names = ["base"] + [f"specialist_{s}" for s in SPECIALISTS]
    paths = [folder / f"{name}.safetensors" for name in names]
    for sd, path in zip(models, paths):
        save_file(sd, str(path))
    (folder / "merge.yaml").write_text(
        "# r2m-merge " + str(folder / "merge.yaml") + "\n"
        f"base: {paths[0]}\n"
        "specialists:\n" + "".join(f"  - {p}\n" for p in paths[1:]) +
        f"output: {folder / 'merged'}\n"
        "method: r2m\n"
        "rank_ratio: 0.1\n"
        "alpha: 0.6\n"
        "head_prefix: head.\n"
        "seed: 0\n"
    )
    return paths[0], paths[1:]


def run_example(
    folder: Union[str, os.PathLike], force: bool = False, quiet: bool = False, device: Optional[str] = None,
    threads: Optional[int] = 1, spill_dir: Optional[Union[str, os.PathLike]] = None,
) -> "MergeResult":
    """Build the example models under `folder` and merge them into folder/merged (the caller prints
    the summary: r2m-merge --example does).

    Runs on one CPU thread unless `threads` says otherwise: its layers are small enough that more
    threads only add synchronization, and on a busy two-core machine OpenMP threads spinning for a
    core turned a 1.5 s merge into 14 s (measured). None keeps torch's setting.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_example(Path(folder), force, quiet, device, spill_dir)
    finally:
        torch.set_num_threads(previous)


def _run_example(
    folder: Path, force: bool, quiet: bool, device: Optional[str], spill_dir: Optional[Union[str, os.PathLike]],
) -> "MergeResult":
    from r2m_fast.config import R2MConfig
    from r2m_fast.api import merge_files

    base, specialists = write_example(folder)
    if not quiet:
        print(f"wrote a synthetic ViT ({sum(t.numel() for t in build_models(0)[0].values()) / 1e6:.1f} M parameters) "
              f"and {len(specialists)} specialists under {folder}")
        print(f"merging: r2m-merge {folder / 'merge.yaml'}")
    return merge_files(
        base, specialists, folder / "merged", R2MConfig(head_prefix="head."), device=device, force=force,
        progress=not quiet, spill_dir=spill_dir,
    )
