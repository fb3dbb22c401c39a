"""r2m_fast: fast, memory-bounded R²M (Real-aware Residual Model Merging).

Names and submodules load on first use (PEP 562): ``import r2m_fast`` does not import torch, so
``r2m-merge`` can answer Ctrl-C and bad flags quickly, and ``r2m_fast.reference`` (or any other
submodule) is reachable as an attribute right after ``import r2m_fast``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name → the submodule that defines it.
_EXPORTS = {
    "merge": "api", "merge_files": "api", "BackendUnavailable": "backends", "METHODS": "baselines",
    "R2MConfig": "config", "MergeInputError": "plan", "MergeResult": "result",
    "DeviceUnavailable": "safety", "OutputError": "safety",
}

__all__ = [
    "R2MConfig", "MergeResult", "MergeInputError", "BackendUnavailable", "DeviceUnavailable", "OutputError",
    "METHODS", "merge", "merge_files", "__version__",
]

if TYPE_CHECKING:
    from r2m_fast.api import merge, merge_files
    from r2m_fast.backends import BackendUnavailable
    from r2m_fast.baselines import METHODS
    from r2m_fast.config import R2MConfig
    from r2m_fast.plan import MergeInputError
    from r2m_fast.result import MergeResult
    from r2m_fast.safety import DeviceUnavailable, OutputError


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"r2m_fast.{_EXPORTS[name]}"), name)
    elif not name.startswith("_"):
        try:
            value = importlib.import_module(f"r2m_fast.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"r2m_fast.{name}":
                raise  # the submodule exists but something it imports is missing
            raise AttributeError(f"module 'r2m_fast' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'r2m_fast' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
