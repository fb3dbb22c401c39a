"""Public entry point: r2m_fast.merge."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from r2m_fast.config import R2MConfig
from r2m_fast.engine import DictSource, run_merge
from r2m_fast.plan import ModelLike
from r2m_fast.result import MergeResult


def merge(
    base: ModelLike,
    specialists: Sequence[ModelLike],
    config: Optional[R2MConfig] = None,
    *,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
    **overrides: Any,
) -> MergeResult:
    """Merge specialists fine-tuned from `base` into one model by R²M.

    Args:
        base: the pretrained model θ₀, a state dict (name → tensor) or an nn.Module.
        specialists: N ≥ 2 fine-tuned models of the same architecture (same names, shapes, dtypes).
        config: an R2MConfig; keyword `overrides` replace its fields (e.g. ``rank_ratio=0.05``).
        device: where to compute (default: the base tensors' device); results go back to it too.
        progress: show a progress bar per pass.

    Returns:
        MergeResult with ``state_dict`` (same names, shapes and dtypes as the base unless
        ``out_dtype``) and ``report`` (core_norm, eta, residual_norms, ranks, backend, seconds, …).
    """
    config = (config or R2MConfig()).replace(**overrides) if overrides else (config or R2MConfig())
    source = DictSource(base, specialists, device=torch.device(device) if device is not None else None)
    return run_merge(source, config, progress=progress)
