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

R2M_SWEEP = {"rank_ratio": (0.05, 0.1, 0.2, 1.0), "alpha": (0.4, 0.6, 0.8)}
TA_SWEEP = {"scaling": (0.3, 0.5, 1.0)}


class MethodUnavailable(RuntimeError):
    """The installed r2m_fast does not provide this merge method."""


def _accepts_method() -> bool:
    return "method" in inspect.signature(r2m_fast.merge).parameters


def merge(base: Mapping[str, torch.Tensor], specialists: Sequence[Mapping[str, torch.Tensor]], method: str,
          seed: int = 0, **options: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(merged state dict, report with 'seconds' = wall time of the call)."""
    opts = dict(options)
    if method == "r2m":
        opts.setdefault("seed", seed)  # R²M's randomized range finder is seeded: reproducible merges
    t0 = time.perf_counter()
    if _accepts_method():
        try:
            result = r2m_fast.merge(dict(base), [dict(s) for s in specialists], method=method, **opts)
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
    return dict(result.state_dict), report
