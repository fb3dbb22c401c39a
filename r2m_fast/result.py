"""The value every merge returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class MergeResult:
    """A merged model and what the merge measured.

    Attributes:
        state_dict: merged tensors, same names and shapes as the base (empty when the merge streamed
            its output to files instead).
        report: at least ``core_norm``, ``eta``, ``residual_norms`` (per specialist), ``ranks``
            (per layer; None = not truncated), ``backend`` and ``seconds``.
    """

    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
