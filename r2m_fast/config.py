"""R2MConfig: every knob of an R²M merge, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch

BLOCK_NORMS = ("fro_sqrtP", "fro", "none")
RESIDUAL_SCALES = ("relative", "kit")
BACKEND_NAMES = ("auto", "torch", "triton", "cuda")
RANGE_FINDER_PRECISIONS = ("auto", "fp32", "bf16")

# q = 1 holds the accuracy contract (truncation error ≤ 1.05× the optimal rank-r error) on
# realistic spectra at half the passes of q = 2; see tests/test_engine.py::test_default_power_iters.
DEFAULT_POWER_ITERS = 1

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_dtype(value: Union[str, torch.dtype, None], field_name: str = "out_dtype") -> Optional[torch.dtype]:
    """A floating torch dtype from a dtype or a name such as 'bf16' / 'float32' / 'torch.float16'."""
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and not value.is_floating_point:
            raise ValueError(f"{field_name}: {value} is not a floating dtype")
        return value
    if isinstance(value, str):
        key = value.lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    raise ValueError(f"{field_name}: unknown dtype {value!r}; use one of {sorted(_DTYPE_NAMES)}")


@dataclass
class R2MConfig:
    """Options of an R²M merge (DESIGN.md §1). Defaults follow the authors' released script except
    where the README says otherwise (the Real component is a true projection; truncation is on).

    Attributes:
        k_real: dimension k of the Real subspace (clamped to the number of specialists N).
        rank_ratio: residual truncation rank per 2-D weight, r = max(1, ⌊ratio·min(m, n)⌋);
            None or 1.0 disables truncation (the released script does not truncate).
        alpha: η = alpha·‖τ_core‖ scales the aggregated unit-norm residuals.
        block_norm: per-layer weight γ_l of the Gram: "fro_sqrtP" (√P/‖A‖_F), "fro" (1/‖A‖_F), "none".
        exclude: substrings; a parameter whose name contains one is passthrough (τ_core = τ̄, no
            truncation) instead of decomposed.
        center: use the centred task matrix M − 1τ̄ᵀ (the paper) instead of M (the released script).
        real_blend_beta: τ_core ← (1−β)·τ̄ + β·τ_core.
        residual_scale: "relative" (unit-norm residuals, scale-invariant) or "kit" (rescale to the
            mean residual norm, as the released script).
        head_prefix: parameters under this prefix (e.g. "head.") are merged by plain averaging.
        oversample: extra sketch columns p of the randomized range finder (s = r + p).
        power_iters: power iterations q; None picks the package default (DEFAULT_POWER_ITERS).
        seed: seeds every random sketch; same inputs and seed give the same merge.
        backend: "auto", "torch", "triton" or "cuda" (see r2m_fast.backends).
        out_dtype: dtype of merged floating tensors; None keeps each base tensor's dtype.
        rank_overrides: {regex: ratio in (0, 1] or rank ≥ 1 (int)}; the first pattern that
            re.search-matches a parameter name sets its truncation instead of rank_ratio.
        skip_depthwise: do not truncate weights with min(m, n) ≤ 1 after reshaping (depthwise
            convolutions, embeddings of one row).
        range_finder_precision: operand precision of the products that only *find* the residual
            subspace (the sketch and the power iterations): "fp32", "bf16", or "auto" = bf16 where
            the hardware multiplies bf16 fast (CUDA; CPUs with AMX or AVX512-BF16), else fp32. Task
            vectors are always formed in fp32 first; the final projection QᵀF, the norms and the
            output are always fp32 (DESIGN §4).
    """

    k_real: int = 1
    rank_ratio: Optional[float] = 0.1
    alpha: float = 0.6
    block_norm: str = "fro_sqrtP"
    exclude: tuple[str, ...] = ("ln", "norm", "bias")
    center: bool = False
    real_blend_beta: float = 1.0
    residual_scale: str = "relative"
    head_prefix: Optional[str] = None
    oversample: int = 10
    power_iters: Optional[int] = None
    seed: int = 0
    backend: str = "auto"
    out_dtype: Optional[Union[str, torch.dtype]] = None
    rank_overrides: Optional[Mapping[str, Union[int, float]]] = field(default=None)
    skip_depthwise: bool = False
    range_finder_precision: str = "auto"

    def __post_init__(self) -> None:
        _check_int(self.k_real, "k_real", minimum=1)
        if self.rank_ratio is not None:
            _check_real(self.rank_ratio, "rank_ratio")
            if not 0.0 < float(self.rank_ratio) <= 1.0:
                raise ValueError(f"rank_ratio: must be in (0, 1] or None, got {self.rank_ratio!r}")
            self.rank_ratio = float(self.rank_ratio)
        _check_real(self.alpha, "alpha")
        if self.alpha < 0:
            raise ValueError(f"alpha: must be ≥ 0, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        _check_choice(self.block_norm, "block_norm", BLOCK_NORMS)
        if isinstance(self.exclude, str) or not all(isinstance(p, str) and p for p in self.exclude):
            raise ValueError(f"exclude: must be a sequence of non-empty strings, got {self.exclude!r}")
        self.exclude = tuple(self.exclude)
        if not isinstance(self.center, bool):
            raise ValueError(f"center: must be True or False, got {self.center!r}")
        _check_real(self.real_blend_beta, "real_blend_beta")
        self.real_blend_beta = float(self.real_blend_beta)
        _check_choice(self.residual_scale, "residual_scale", RESIDUAL_SCALES)
        if self.head_prefix is not None and (not isinstance(self.head_prefix, str) or not self.head_prefix):
            raise ValueError(f"head_prefix: must be a non-empty string or None, got {self.head_prefix!r}")
        _check_int(self.oversample, "oversample", minimum=0)
        if self.power_iters is not None:
            _check_int(self.power_iters, "power_iters", minimum=0)
        _check_int(self.seed, "seed", minimum=0)
        _check_choice(self.backend, "backend", BACKEND_NAMES)
        self.out_dtype = parse_dtype(self.out_dtype)
        if self.rank_overrides is not None:
            overrides = dict(self.rank_overrides)
            for pattern, value in overrides.items():
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"rank_overrides: bad pattern {pattern!r}: {exc}") from None
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"rank_overrides[{pattern!r}]: must be a ratio or a rank, got {value!r}")
                if isinstance(value, int) and value < 1 or isinstance(value, float) and not 0 < value <= 1:
                    raise ValueError(
                        f"rank_overrides[{pattern!r}]: an int is a rank ≥ 1, a float a ratio in (0, 1]; got {value!r}"
                    )
            self.rank_overrides = overrides
        if not isinstance(self.skip_depthwise, bool):
            raise ValueError(f"skip_depthwise: must be True or False, got {self.skip_depthwise!r}")
        _check_choice(self.range_finder_precision, "range_finder_precision", RANGE_FINDER_PRECISIONS)

    @property
    def effective_power_iters(self) -> int:
        return DEFAULT_POWER_ITERS if self.power_iters is None else self.power_iters

    def replace(self, **overrides: Any) -> "R2MConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown R2MConfig field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-friendly view (dtypes as strings)."""
        out = dataclasses.asdict(self)
        out["exclude"] = list(self.exclude)
        out["out_dtype"] = None if self.out_dtype is None else str(self.out_dtype).removeprefix("torch.")
        return out


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: must be an integer ≥ {minimum}, got {value!r}")


def _check_real(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
