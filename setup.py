"""Build and install r2m_fast.

The Triton kernels live in the top-level ``kernels/`` folder and install as ``r2m_fast.kernels``
(a bare ``kernels`` import is taken on PyPI).

The CUDA extension ``r2m_fast._cuda`` (``csrc/``) is built with nvcc and pybind11 alone — no torch
C++ ABI, so it works with whatever torch is installed — and linked against the static CUDA runtime.
Environment:

* ``R2M_BUILD_CUDA``: ``0`` skips the extension; ``1`` forces it and fails loudly when nvcc (or
  pybind11) is missing; unset builds it only where a GPU could use it — nvcc is found
  (``$CUDA_HOME/bin/nvcc``, ``$CUDA_PATH/bin/nvcc`` or ``nvcc`` on PATH) *and* an NVIDIA GPU is
  visible (``nvidia-smi -L`` lists one, or without nvidia-smi ``/dev/nvidia0`` exists) — and
  otherwise prints one line saying why it skipped. The build takes minutes: a machine with the
  toolkit but no GPU (a CI runner, a login node) should not pay for a module it cannot run.
  Build machines for GPU wheels set ``R2M_BUILD_CUDA=1``.
* ``R2M_CUDA_ARCHS``: architectures, separated by ``;``, ``,`` or spaces. ``90a`` (or ``sm_90a``)
  embeds SASS, ``compute_80`` embeds PTX only, ``80+PTX`` both. Default ``90a;compute_80``: Hopper
  SASS plus portable PTX that the driver JIT-compiles on any sm_80+ GPU.
* ``MAX_JOBS``: parallel compile jobs (ninja ``-j``); ``NVCC_THREADS``: ``nvcc --threads`` (default 1).
* ``R2M_CUDA_DEBUG=1``: ``-lineinfo -Xptxas -v`` (the register/spill report) in the build log.

Without nvcc the package installs as usual and runs on its torch/triton backends.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CUDA_EXT_NAME = "r2m_fast._cuda"
DEFAULT_CUDA_ARCHS = "90a;compute_80"


def _log(msg: str) -> None:
    print(f"r2m_fast setup: {msg}", flush=True)


def _announce(msg: str) -> None:
    """_log, and the same line on the terminal: pip hides a build's output unless -v, and a
    silent multi-minute compile looks like a hang."""
    _log(msg)
    if sys.stdout.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(f"r2m_fast setup: {msg}\n")
    except OSError:  # no controlling terminal (CI, containers): the log line is all there is
        pass


def _gpu_visible() -> bool:
    """An NVIDIA GPU on this machine: `nvidia-smi -L` lists one (without nvidia-smi, /dev/nvidia0)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return Path("/dev/nvidia0").exists()
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.startswith("GPU ") for line in out.splitlines())


def _find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _pybind11_include() -> str | None:
    """pybind11's headers: from this interpreter, else (pip's isolated build env lacks pybind11)
    from the base interpreter outside the isolation."""
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    for exe in dict.fromkeys([getattr(sys, "_base_executable", sys.executable), sys.executable]):
        try:
            out = subprocess.run(
                [exe, "-c", "import pybind11; print(pybind11.get_include())"],
                env=env, capture_output=True, text=True, timeout=60, check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if out and (Path(out) / "pybind11" / "pybind11.h").is_file():
            return out
    return None


def cuda_gencode_flags(archs: str) -> list[str]:
    """nvcc -gencode flags for an R2M_CUDA_ARCHS string (see the module docstring)."""
    flags: list[str] = []
    for token in re.split(r"[;,\s]+", archs.strip()):
        if not token:
            continue
        ptx_only = token.startswith("compute_")
        both = token.upper().endswith("+PTX")
        arch = token[: -len("+PTX")] if both else token
        arch = arch.replace("compute_", "").replace("sm_", "").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise ValueError(f"R2M_CUDA_ARCHS: cannot parse {token!r} (use e.g. '90a', '80+PTX', 'compute_80')")
        if not ptx_only:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx_only or both:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    if not flags:
        raise ValueError("R2M_CUDA_ARCHS selects no architecture")
    return flags


class CUDAExtension(Extension):
    """An extension whose sources nvcc compiles and links (see BuildExtWithCUDA)."""


class BuildExtWithCUDA(build_ext):
    """build_ext that compiles CUDAExtension sources with nvcc, through ninja when available."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CUDAExtension):
            return super().build_extension(ext)
        mode = os.environ.get("R2M_BUILD_CUDA", "").strip()
        forced = mode == "1"
        nvcc = _find_nvcc()
        pybind_inc = _pybind11_include() if nvcc else None
        if nvcc is None or pybind_inc is None:
            why = "nvcc not found (set CUDA_HOME or put nvcc on PATH)" if nvcc is None else (
                "pybind11 not importable (pip install pybind11; with pip use --no-build-isolation)")
            if forced:
                raise RuntimeError(f"R2M_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
            _log(f"skipping the CUDA extension {ext.name}: {why}")
            return
        _announce(f"building the CUDA extension {ext.name} with {nvcc} (a few minutes; "
                  "R2M_BUILD_CUDA=0 skips it, pip install -v shows the compiler's progress)")
        try:
            self._build_cuda(ext, nvcc, pybind_inc)
        except Exception as exc:
            if forced or mode == "":
                # nvcc was found, so a failure is a real build error: say it loudly.
                raise RuntimeError(f"building the CUDA extension {ext.name} failed: {exc}") from exc
            raise

    def _build_cuda(self, ext: Extension, nvcc: str, pybind_inc: str) -> None:
        archs = os.environ.get("R2M_CUDA_ARCHS", "").strip() or DEFAULT_CUDA_ARCHS
        gencode = cuda_gencode_flags(archs)
        debug = os.environ.get("R2M_CUDA_DEBUG", "0") not in ("", "0")
        nvcc_threads = os.environ.get("NVCC_THREADS", "1")
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        tmp = Path(self.build_temp).resolve() / "r2m_cuda"
        tmp.mkdir(parents=True, exist_ok=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)

        includes = [f"-I{CSRC}", f"-I{pybind_inc}", f"-I{sysconfig.get_paths()['include']}"]
        common = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                  f'-DR2M_CUDA_ARCHS_STR="{archs}"']
        cu_flags = common + ["--threads", nvcc_threads, "-Xptxas", "-warn-spills", *gencode]
        if debug:
            cu_flags += ["-lineinfo", "-Xptxas", "-v"]
        cxx_flags = common  # bindings.cpp: nvcc hands it to the host compiler
        # Static CUDA runtime: no libcudart.so to find at import time; the driver is loaded lazily,
        # so importing the module works without a GPU or driver.
        link_flags = ["-shared", "-cudart", "static", "-Xcompiler", "-fPIC"]

        sources = [Path(s) if Path(s).is_absolute() else ROOT / s for s in ext.sources]
        objects = []
        compile_cmds = []
        for src in sources:
            obj = tmp / (src.name + ".o")
            flags = cu_flags if src.suffix == ".cu" else cxx_flags
            compile_cmds.append((src, obj, [nvcc, *flags, *includes, "-c", str(src), "-o", str(obj)]))
            objects.append(obj)
        link_cmd = [nvcc, *link_flags, *map(str, objects), "-o", str(out_path)]
        headers = sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh"))

        ninja = shutil.which("ninja")
        if ninja:
            build_file = tmp / "build.ninja"
            lines = ["ninja_required_version = 1.3", ""]
            lines += ["rule compile", "  command = $cmd", "  description = nvcc $in", ""]
            lines += ["rule link", "  command = $cmd", "  description = link $out", ""]
            dep_headers = " ".join(_ninja_escape(str(h)) for h in headers)
            for src, obj, cmd in compile_cmds:
                lines.append(f"build {_ninja_escape(str(obj))}: compile {_ninja_escape(str(src))} | {dep_headers}")
                lines.append(f"  cmd = {shlex.join(cmd)}")
            lines.append(f"build {_ninja_escape(str(out_path))}: link " + " ".join(_ninja_escape(str(o)) for o in objects))
            lines.append(f"  cmd = {shlex.join(link_cmd)}")
            build_file.write_text("\n".join(lines) + "\n")
            cmd = [ninja, "-f", str(build_file)]
            if os.environ.get("MAX_JOBS"):
                cmd += ["-j", os.environ["MAX_JOBS"]]
            _log(f"building {ext.name} with ninja ({', '.join(gencode)})")
            subprocess.run(cmd, check=True, cwd=str(tmp))
        else:
            _log(f"building {ext.name} with nvcc, no ninja ({', '.join(gencode)})")
            for _, _, cmd in compile_cmds:
                _log(shlex.join(cmd))
                subprocess.run(cmd, check=True)
            subprocess.run(link_cmd, check=True)
        _log(f"built {out_path}")


def _ninja_escape(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _ext_modules() -> list[Extension]:
    mode = os.environ.get("R2M_BUILD_CUDA", "").strip()
    if mode == "0":
        _log("R2M_BUILD_CUDA=0: skipping the CUDA extension")
        return []
    # Decided here, not in build_ext: an extension dropped from the list leaves no missing file for
    # an editable or --inplace install to trip over.
    if mode != "1":
        if _find_nvcc() is None:
            _log("skipping the CUDA extension: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
            return []
        if not _gpu_visible():
            _log("skipping the CUDA extension: no NVIDIA GPU visible (nvidia-smi -L, /dev/nvidia0); "
                 "R2M_BUILD_CUDA=1 builds it anyway")
            return []
    srcs = ["csrc/gram_sketch.cu", "csrc/accumulate.cu", "csrc/small_eigh.cpp", "csrc/bindings.cpp"]
    return [CUDAExtension(CUDA_EXT_NAME, sources=srcs)]


setup(
    name="r2m_fast",
    version="0.1.0",
    description="Fast, memory-bounded R²M (Real-aware Residual Model Merging) with Triton and CUDA kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["r2m_fast", "r2m_fast.*"]) + ["r2m_fast.kernels"],
    package_dir={"r2m_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "threadpoolctl>=3", "safetensors>=0.4", "pyyaml", "tqdm"],
    extras_require={
        # mergekit: the baselines' parity test (tests/test_baselines.py) runs against this release;
        # transformers/peft: Hugging Face folders and LoRA adapters. All install beside the CPU torch.
        "test": ["pytest", "pytest-benchmark", "hypothesis", "mergekit==0.1.5", "transformers>=5", "peft"],
        "triton": ["triton>=3.0"],
        "cuda": ["pybind11>=2.10", "ninja"],
    },
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": BuildExtWithCUDA},
    entry_points={"console_scripts": ["r2m-merge=r2m_fast.cli:main"]},
)
