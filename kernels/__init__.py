"""Triton backend of r2m_fast (installed as ``r2m_fast.kernels``; never import it as ``kernels``).

The four per-layer operations of :mod:`r2m_fast.ops_torch`, same signatures and results up to
rounding, as Triton kernels (DESIGN.md §3). They take CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1`` (tests only; the interpreter has no bf16).
"""

from r2m_fast.kernels.accumulate import accumulate
from r2m_fast.kernels.gram_sketch import gram_sketch
from r2m_fast.kernels.residual_project import residual_matmul
from r2m_fast.kernels.tsqr import orthonormalize

__all__ = ["gram_sketch", "residual_matmul", "orthonormalize", "accumulate"]
