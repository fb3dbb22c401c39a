import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models import model_family
from r2m_fast import cpu_blas

# Triton's @jit reads TRITON_INTERPRET when kernels are decorated, so a run that wants the
# interpreter must set it in the environment before pytest starts (see scripts/test.sh).


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_interpreter: Triton kernel test that also runs under TRITON_INTERPRET=1 on CPU")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_thread():
    # Two shared cores: several OpenMP threads on tiny linear algebra spin far more than they work.
    # It also fixes GEMM rounding (which may depend on the thread count) for the bit-for-bit tests,
    # e.g. an incremental re-merge against a from-scratch merge.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["torch", "openblas"])
def cpu_blas_choice(request, monkeypatch):
    """Each BLAS the CPU path can multiply with (r2m_fast.cpu_blas), whichever this machine picks."""
    if request.param == "openblas" and cpu_blas._numpy_openblas() is None:
        pytest.skip("numpy's BLAS is not OpenBLAS here")
    monkeypatch.setenv(cpu_blas.CPU_BLAS_ENV, request.param)
    cpu_blas.cpu_blas.cache_clear()
    yield request.param
    cpu_blas.cpu_blas.cache_clear()  # the next test picks again, under the environment it restores


@pytest.fixture(scope="module")
def family():
    """A base and three specialists (tests/models.py), shared by a module's tests."""
    return model_family(3)


@pytest.fixture()
def inputs(tmp_path, family):
    """The family written as tmp_path/m0.safetensors (base) … m3.safetensors, for file and CLI merges."""
    paths = []
    for i, sd in enumerate(family):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(sd, str(paths[-1]))
    return paths
