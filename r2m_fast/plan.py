"""What happens to each parameter: input checks and the per-layer plan shared by every path."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from r2m_fast.config import R2MConfig

StateDict = Mapping[str, torch.Tensor]
ModelLike = Union[StateDict, nn.Module]

# How a parameter is merged (DESIGN §1):
DECOMPOSED = "decomposed"    # enters the Real subspace; residual truncated when `rank` is set
PASSTHROUGH = "passthrough"  # matches an exclude pattern: τ_core = τ̄, residual kept whole
HEAD = "head"                # under head_prefix: plain average of the specialists
COPY = "copy"                # integer/bool buffer: copied from the base untouched


# An eigenvalue of C below this fraction of the largest is numerically zero: its direction carries
# no task signal, and dividing by it would amplify rounding. Both the reference and the engine use it.
EIGEN_RTOL = 1e-12

# A residual below this fraction of its own task vector's norm is the rounding noise left when a
# specialist equals the Real component (identical specialists): it stays 0 instead of being
# rescaled to unit norm, where it would inject pure noise. Both the reference and the engine use it.
NEGLIGIBLE_RESIDUAL_RTOL = 1e-5


class MergeInputError(ValueError):
    """The models given to a merge do not fit together; the message names the tensor or model."""


@dataclass(frozen=True)
class LayerPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    matrix: tuple[int, int]  # (m, n): the 2-D view the kernels see (conv kernels: out × rest)
    rank: Optional[int]      # truncation rank r, or None when the residual is kept whole

    @property
    def numel(self) -> int:
        return self.matrix[0] * self.matrix[1]

    @property
    def merged(self) -> bool:
        """Takes part in the Real subspace, the residual norms and η."""
        return self.kind in (DECOMPOSED, PASSTHROUGH)


def as_state_dict(model: ModelLike, label: str) -> dict[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        return {k: v.detach() for k, v in model.state_dict().items()}
    if not isinstance(model, Mapping):
        raise MergeInputError(f"{label}: expected a state dict (mapping name → tensor) or an nn.Module, got {type(model).__name__}")
    for key, value in model.items():
        if not isinstance(value, torch.Tensor):
            raise MergeInputError(f"{label}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(model)


def check_compatible(
    names: Sequence[str],
    base_specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    specialist_specs: Sequence[Mapping[str, tuple[tuple[int, ...], torch.dtype]]],
    labels: Sequence[str],
) -> None:
    """Same names, shapes and dtypes in every specialist as in the base; at least two specialists."""
    if len(specialist_specs) < 2:
        raise MergeInputError(f"R²M needs at least 2 specialists, got {len(specialist_specs)}")
    base_names = set(names)
    for specs, label in zip(specialist_specs, labels):
        missing = sorted(base_names - set(specs))
        extra = sorted(set(specs) - base_names)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {_some(missing)}")
            if extra:
                parts.append(f"unexpected {_some(extra)}")
            raise MergeInputError(f"{label}: keys differ from the base: {'; '.join(parts)}")
        for name in names:
            shape, dtype = specs[name]
            base_shape, base_dtype = base_specs[name]
            if tuple(shape) != tuple(base_shape):
                raise MergeInputError(f"{label}: tensor {name!r} has shape {tuple(shape)}, the base has {tuple(base_shape)}")
            if dtype != base_dtype:
                raise MergeInputError(f"{label}: tensor {name!r} has dtype {dtype}, the base has {base_dtype}")


def _some(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (1, shape[0])
    return (shape[0], math.prod(shape[1:]))


def truncation_rank(name: str, shape: tuple[int, ...], config: R2MConfig) -> Optional[int]:
    """r = max(1, ⌊ratio·min(m, n)⌋) for 2-D+ weights (DESIGN §1 step 3); None when not truncated."""
    if len(shape) < 2:
        return None
    m, n = matrix_view(shape)
    full = min(m, n)
    if config.skip_depthwise and full <= 1:
        return None
    ratio: Optional[Union[int, float]] = config.rank_ratio
    for pattern, value in (config.rank_overrides or {}).items():
        if re.search(pattern, name):
            ratio = value
            break
    if ratio is None:
        return None
    rank = min(ratio, full) if isinstance(ratio, int) else max(1, math.floor(ratio * full))
    return rank if rank < full else None


def build_plan(
    base_specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]], config: R2MConfig
) -> list[LayerPlan]:
    plan = []
    for name, (shape, dtype) in base_specs.items():
        shape = tuple(shape)
        if not dtype.is_floating_point:
            kind, rank = COPY, None
        elif config.head_prefix is not None and name.startswith(config.head_prefix):
            kind, rank = HEAD, None
        elif any(pattern in name for pattern in config.exclude):
            kind, rank = PASSTHROUGH, None
        else:
            kind, rank = DECOMPOSED, truncation_rank(name, shape, config)
        plan.append(LayerPlan(name, shape, dtype, kind, matrix_view(shape), rank))
    if not any(layer.kind == DECOMPOSED for layer in plan):
        raise MergeInputError(
            "no parameter is decomposed: every floating tensor matches exclude "
            f"{config.exclude!r} or head_prefix {config.head_prefix!r}"
        )
    return plan


def check_finite(name: str, tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> None:
    for tensor, label in zip(tensors, labels):
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise MergeInputError(f"{label}: tensor {name!r} has {bad} NaN/Inf value(s)")
