"""Every merge of the benchmark goes through the package API: r2m_fast.merge(..., method=...).

The methods and their options are the ones of the package's contract; the benchmark only picks
the hyper-parameters. The headline settings are each method's usual default (no tuning on the
test set); the sweeps are reported separately.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Mapping, Sequence

import torch

import r2m_fast

# Headline settings: R²M with the package defaults (rank_ratio 0.1, alpha 0.6, k_real 1) and the head
# averaged as the method prescribes; TA's usual λ = 0.3; TIES's top-20 % with λ = 1; TSV-M λ = 1.
HEADLINE: dict[str, dict[str, Any]] = {
    "average": {},
    "task_arithmetic": {"scaling": 0.3},
    "ties": {"density": 0.2, "scaling": 1.0},
    "tsvm": {"scaling": 1.0},
    "r2m": {"head_prefix": "head."},
}

# Ablations that separate the method from its surroundings (reported apart, same seeds):
# how the head is merged, and TSV-M given 4-D kernels (it averaged every conv until the package's
# TSV-M learned to decompose conv kernels itself; since then this row equals TSV-M's).
ABLATIONS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "r2m, head merged by R²M too": ("r2m", {}, True),
    "ties, head averaged": ("ties", {"density": 0.2, "scaling": 1.0, "head_prefix": "head."}, True),
    "task_arithmetic, head averaged": ("task_arithmetic", {"scaling": 0.3, "head_prefix": "head."}, True),
    "tsvm, conv kernels left 4-D": ("tsvm", {"scaling": 1.0}, False),
}

R2M_SWEEP = {"rank_ratio": (0.05, 0.1, 0.2, 1.0), "alpha": (0.4, 0.6, 0.8)}
TA_SWEEP = {"scaling": (0.3, 0.5, 1.0)}


def as_matrices(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Conv kernels (out, in, kh, kw) as (out, in·kh·kw) matrices, every other tensor unchanged.

    Why: the package's TSV-M used to decompose 2-D tensors only and average the rest, so on a CNN
    given 4-D kernels it was plain weight averaging (it now reshapes kernels itself, so the reshape
    is kept only so that the reported results stay reproducible). R²M already treats a kernel as this matrix
    (DESIGN §1) and averaging, task arithmetic and TIES are elementwise, so the reshape changes no
    other method's result; it lets TSV-M be TSV-M on MobileNetV2.
    """
    return {k: v.reshape(v.shape[0], -1) if v.dim() > 2 else v for k, v in state.items()}


class MethodUnavailable(RuntimeError):
    """The installed r2m_fast does not provide this merge method."""


def _accepts_method() -> bool:
    return "method" in inspect.signature(r2m_fast.merge).parameters


def merge(base: Mapping[str, torch.Tensor], specialists: Sequence[Mapping[str, torch.Tensor]], method: str,
          seed: int = 0, as_matrix: bool = True, **options: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(merged state dict, report with 'wall_seconds' = wall time of the call).

    as_matrix: pass conv kernels as 2-D matrices (see as_matrices); False hands the 4-D tensors over.
    """
    opts = dict(options)
    if method == "r2m":
        opts.setdefault("seed", seed)  # R²M's randomized range finder is seeded: reproducible merges
    shapes = {k: v.shape for k, v in base.items()}
    if as_matrix:
        base, specialists = as_matrices(base), [as_matrices(s) for s in specialists]
    kwargs: dict[str, Any] = {}
    if method != "r2m" and "head_prefix" in opts:
        # A baseline takes head_prefix from the config (its keyword options are its own).
        kwargs["config"] = r2m_fast.R2MConfig(head_prefix=opts.pop("head_prefix"))
    t0 = time.perf_counter()
    if _accepts_method():
        try:
            result = r2m_fast.merge(dict(base), [dict(s) for s in specialists], method=method, **kwargs, **opts)
        except (ValueError, KeyError, NotImplementedError) as exc:
            if method != "r2m" and "method" in str(exc).lower():
                raise MethodUnavailable(f"r2m_fast.merge rejects method={method!r}: {exc}") from exc
            raise
    elif method == "r2m":
        # Packages from before the method argument merge by R²M only.
        result = r2m_fast.merge(dict(base), [dict(s) for s in specialists], **opts)
    else:
        raise MethodUnavailable(f"the installed r2m_fast.merge has no method argument (no {method!r})")
    seconds = time.perf_counter() - t0
    report = dict(result.report or {})
    report["wall_seconds"] = seconds
    return {k: v.reshape(shapes[k]) for k, v in result.state_dict.items()}, report
