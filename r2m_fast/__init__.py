"""r2m_fast: fast, memory-bounded R²M (Real-aware Residual Model Merging)."""

from r2m_fast.api import merge, merge_files
from r2m_fast.backends import BackendUnavailable
from r2m_fast.baselines import METHODS
from r2m_fast.config import R2MConfig
from r2m_fast.plan import MergeInputError
from r2m_fast.result import MergeResult

__version__ = "0.1.0"

__all__ = [
    "R2MConfig", "MergeResult", "MergeInputError", "BackendUnavailable", "METHODS", "merge", "merge_files",
    "__version__",
]
