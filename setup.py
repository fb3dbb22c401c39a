"""Build and install r2m_fast.

The Triton kernels live in the top-level ``kernels/`` folder and install as ``r2m_fast.kernels``
(a bare ``kernels`` import is taken on PyPI).
"""

from setuptools import find_packages, setup

setup(
    name="r2m_fast",
    version="0.1.0",
    description="Fast, memory-bounded R²M (Real-aware Residual Model Merging) with Triton and CUDA kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["r2m_fast", "r2m_fast.*"]) + ["r2m_fast.kernels"],
    package_dir={"r2m_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "safetensors>=0.4", "pyyaml", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "triton": ["triton>=3.0"],
    },
    entry_points={"console_scripts": ["r2m-merge=r2m_fast.cli:main"]},
)
