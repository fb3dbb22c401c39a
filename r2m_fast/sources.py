"""Where a merge reads its models from: the LayerSource protocol and the in-memory source.

The file sources (r2m_fast.inputs.FileSource, over safetensors, pickles, Hugging Face folders and LoRA adapters) implement
the same protocol; the passes (r2m_fast.engine) read only through it.
"""

from __future__ import annotations

from typing import Mapping, Optional, Protocol, Sequence

import torch

from r2m_fast.plan import ModelLike, as_state_dict, check_compatible

Specs = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


class LayerSource(Protocol):
    """Where a merge reads its models from, one parameter of all N+1 models at a time."""

    device: torch.device
    labels: list[str]  # "base", then one label per specialist, for error messages

    def specs(self) -> Specs:
        """Name → (shape, dtype) of the base, in merge order; specialists already checked against it."""

    def load(self, name: str) -> list[torch.Tensor]:
        """[θ₀, θ₁, …, θ_N] of one parameter on `device`."""


class DictSource:
    """A LayerSource over in-memory state dicts (or modules)."""

    def __init__(self, base: ModelLike, specialists: Sequence[ModelLike], device: Optional[torch.device] = None):
        self.labels = ["base"] + [f"specialists[{i}]" for i in range(len(specialists))]
        self._models = [as_state_dict(base, "base")] + [
            as_state_dict(s, label) for s, label in zip(specialists, self.labels[1:])
        ]
        specs = [{k: (tuple(v.shape), v.dtype) for k, v in sd.items()} for sd in self._models]
        check_compatible(list(specs[0]), specs[0], specs[1:], self.labels[1:])
        self._specs = specs[0]
        first = next(iter(self._models[0].values()), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))

    def specs(self) -> Specs:
        return self._specs

    def load(self, name: str) -> list[torch.Tensor]:
        return [sd[name].to(self.device) for sd in self._models]
