"""The CUDA kernels' index maps, checked on the host (no GPU, no CUDA toolkit needed).

csrc/tile_map.h holds every thread/lane → tile-element map the kernels in csrc/ index through
(mma.sync fragments, tile loaders, output walks, persistent-grid chunks, ragged-edge masks) as plain
C++. csrc/tests/tile_map_test.cpp checks them against the PTX ISA's fragment tables and replays each
tiled kernel's block on the host, lane by lane, against a triple loop (see that file's header for
what it covers and what it cannot). This test builds it with the host C++ compiler and runs it; it
skips only where no C++ compiler is installed (nvcc needs one, so wherever the extension builds,
this runs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def _cxx() -> str | None:
    candidates = [os.environ.get("CXX", "")] + ["c++", "g++", "clang++"]
    for name in candidates:
        if name and shutil.which(name.split()[0]):
            return name
    return None


@pytest.fixture(scope="module")
def tile_map_test(tmp_path_factory) -> Path:
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler (CXX, c++, g++ or clang++) to build csrc/tests/tile_map_test.cpp")
    exe = tmp_path_factory.mktemp("cuda_host") / "tile_map_test"
    cmd = [*cxx.split(), "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}",
           str(CSRC / "tests" / "tile_map_test.cpp"), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"{' '.join(cmd)} failed:\n{build.stdout}\n{build.stderr}"
    return exe


def test_kernel_index_maps_and_tile_emulation(tile_map_test):
    run = subprocess.run([str(tile_map_test)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"tile_map_test failed:\n{run.stdout}\n{run.stderr}"
    lines = run.stdout.splitlines()
    assert lines and lines[-1].endswith(", 0 failed"), run.stdout
    # Every kernel family's emulation ran (a silently dropped call would shrink coverage).
    for family in ("fragment maps", "sketch_mma", "accumulate_mma", "sketch SIMT", "accumulate SIMT",
                   "gram walk", "combine walk"):
        assert any(line.startswith(family) and line.endswith(" ok") for line in lines), f"{family} missing:\n{run.stdout}"


def test_kernels_index_through_tile_map():
    """The kernels must use the maps the host test checks, not private copies of the arithmetic."""
    sources = {p.name: p.read_text() for p in CSRC.glob("*.cu*")}
    uses = {
        "sketch_mma.cuh": ["mma::bf16_a(", "mma::bf16_b(", "mma::outputs<", "MmaATile::slot(", "MmaBTile::slot("],
        "accumulate_mma.cuh": ["mma::tf32_a(", "mma::tf32_b(", "AccLTile::slot(", "AccRTile::slot("],
        "accumulate.cu": ["mma::outputs<", "simt_outputs(", "chunk_at("],
        "gemm_tile.cuh": ["GemmKTile::slot(", "GemmNTile::slot(", "simt_out("],
        "gram_sketch.cu": ["simt_outputs(", "chunk_at(", "pair_index<"],
        "tile_io.cuh": ["load4_masked<"],
    }
    for name, needles in uses.items():
        for needle in needles:
            assert needle in sources[name], f"csrc/{name} no longer uses {needle}: the host test would not cover it"
    for name, text in sources.items():  # the old private lane arithmetic must not come back
        for stale in ("grp = lane >> 2", "tig = lane & 3", "tig * 2"):
            assert stale not in text, f"csrc/{name} computes fragment indices itself ({stale!r}); use tile_map.h"
