"""r2m_fast.small_eigh: the batched s×s eigensolver of pass 2 (cusolverDnXsyevBatched) and its fallback.

Without a GPU: the CPU path is exactly torch.linalg.eigh (and so the merge is bit-for-bit what it was),
bad input raises, the report names the solver, and the extension's cuSOLVER loader reports each way
it can fail — no library, a library too old for cusolverDnXsyevBatched — on stub libraries built
here with the C compiler (each in a subprocess: a successful load holds for the process).
On a GPU (marked gpu): the batched solver against float64 torch, eigenvalues and subspaces
(projectors, never eigenvectors, which are defined only up to sign and rotation in a cluster).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import r2m_fast
from r2m_fast import R2MConfig, engine, small_eigh
from r2m_fast.small_eigh import batched_eigh

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _ext():
    from r2m_fast import cuda_ops

    return cuda_ops._ext


def _spd_batch(batch: int, s: int, dtype=torch.float64, device="cpu", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(batch, s, s + 3, generator=g, dtype=torch.float64)
    return (b @ b.transpose(1, 2)).to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("batch,s", [(1, 1), (3, 8), (5, 33)])
def test_cpu_is_exactly_torch_eigh(batch, s, dtype):
    mats = _spd_batch(batch, s, dtype)
    before = mats.clone()
    evals, evecs = batched_eigh(mats)
    want_vals, want_vecs = torch.linalg.eigh(mats)
    assert torch.equal(evals, want_vals) and torch.equal(evecs, want_vecs)
    assert torch.equal(mats, before)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match=r"\(B, s, s\), got shape \(4, 4\)"):
        batched_eigh(torch.eye(4))
    with pytest.raises(ValueError, match=r"\(B, s, s\), got shape \(2, 3, 4\)"):
        batched_eigh(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="float32 or float64, got torch.int64"):
        batched_eigh(torch.zeros(2, 3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        batched_eigh([[1.0]])


def test_method_on_cpu_and_forced_torch(monkeypatch):
    assert small_eigh.method(torch.device("cpu")) == "torch.linalg.eigh (cpu tensors)"
    monkeypatch.setenv("R2M_SMALL_EIGH", "torch")
    assert small_eigh.method(torch.device("cuda")) == "torch.linalg.eigh (R2M_SMALL_EIGH=torch)"


def test_max_batch_keeps_cusolvers_size_limit():
    for s in (1, 8, 33, 420, 46341, 50000):
        assert small_eigh.max_batch(s) >= 1
        assert s * s * small_eigh.max_batch(s) <= 2**31 - 1 or small_eigh.max_batch(s) == 1
    assert small_eigh.max_batch(420) == (2**31 - 1) // (420 * 420)


def test_library_candidates_order(monkeypatch, tmp_path):
    wheel = tmp_path / "nvidia" / "cu13" / "lib"
    wheel.mkdir(parents=True)
    (wheel / "libcusolver.so.12").write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.setenv("R2M_CUSOLVER_LIBRARY", "/opt/mine/libcusolver.so.12")
    found = small_eigh.library_candidates()
    assert found[0] == "/opt/mine/libcusolver.so.12"
    assert str(wheel / "libcusolver.so.12") in found
    assert found[-2:] == ["libcusolver.so.12", "libcusolver.so.11"]  # the system search path last


def test_cpu_merge_unchanged_and_report_names_solver(family, monkeypatch):
    """The CPU merge is bit-for-bit the one torch.linalg.eigh gives, and the report says which ran."""
    config = R2MConfig(rank_ratio=0.25, seed=3)
    got = r2m_fast.merge(family[0], family[1:], config, backend="torch")
    assert got.report["small_eigh"] == "torch.linalg.eigh (cpu tensors)"
    monkeypatch.setattr(engine, "batched_eigh", torch.linalg.eigh)
    want = r2m_fast.merge(family[0], family[1:], config, backend="torch")
    assert got.state_dict.keys() == want.state_dict.keys()
    for name in want.state_dict:
        assert torch.equal(got.state_dict[name], want.state_dict[name]), name


# ------------------------------------- the Python glue, against an emulated extension on CPU memory
class EmulatedExtension:
    """r2m_fast._cuda's small_eigh entry points as cuSOLVER documents cusolverDnXsyevBatched: column-major
    matrices whose upper triangle is read, eigenvectors written over them column by column, eigenvalues
    ascending, info per problem. Works on CPU addresses, so the glue's layout, chunking and info
    handling are checked here without a GPU."""

    DTYPE_FLOAT32, DTYPE_FLOAT64 = 0, 3

    def __init__(self, unconverged=(), fail=False):
        self.unconverged, self.fail, self.calls = set(unconverged), fail, []

    def small_eigh_buffer_size(self, a, w, n, batch, dtype, device, stream):
        return (8 * n, 0)

    def small_eigh(self, a, w, n, batch, dtype, work, work_bytes, info, device, stream):
        import ctypes

        import numpy as np

        if self.fail:
            raise RuntimeError("small_eigh: cusolverDnXsyevBatched failed with CUSOLVER_STATUS_INTERNAL_ERROR (7)")
        assert work_bytes >= 8 * n and work != 0
        first = sum(c for c in self.calls)
        self.calls.append(batch)
        ctype = ctypes.c_float if dtype == self.DTYPE_FLOAT32 else ctypes.c_double
        mem = np.ctypeslib.as_array((ctype * (batch * n * n)).from_address(a)).reshape(batch, n, n)
        vals = np.ctypeslib.as_array((ctype * (batch * n)).from_address(w)).reshape(batch, n)
        infos = np.ctypeslib.as_array((ctypes.c_int32 * batch).from_address(info))
        col = mem.transpose(0, 2, 1)  # col[k, i, j] = memory[i + n·j + n²·k]
        upper = np.triu(col.astype(np.float64))
        sym = upper + np.triu(upper, 1).transpose(0, 2, 1)
        lam, vec = np.linalg.eigh(sym)
        col[:] = vec  # column j of problem k: its j-th eigenvector
        vals[:] = lam
        infos[:] = 0
        for k in range(batch):
            if first + k in self.unconverged:
                infos[k] = 3
                col[k] = 7.0  # garbage the glue must not return
                vals[k] = -1.0


@pytest.fixture()
def emulated(monkeypatch):
    import types

    def use(ext):
        monkeypatch.setattr(small_eigh, "_extension", lambda: (ext, None))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(small_eigh, "_runtime_failure", None)
        monkeypatch.setattr(small_eigh, "_warned", False)
        return ext

    return use


def _lower_differs(batch: int, s: int, dtype) -> torch.Tensor:
    """Symmetric in the lower triangle (which eigh reads), something else above it."""
    mats = _spd_batch(batch, s, dtype)
    return mats + torch.triu(torch.full_like(mats, 5.0), diagonal=1)


def test_extension_asks_cusolver_for_the_emulated_triangle_and_vectors():
    """The emulation above reads the column-major upper triangle and returns vectors: what the C++ asks for."""
    source = (ROOT / "csrc" / "small_eigh.cpp").read_text()
    assert "constexpr int kFillUpper = 1;      // CUBLAS_FILL_MODE_UPPER" in source
    assert "constexpr int kEigModeVector = 1;  // CUSOLVER_EIG_MODE_VECTOR" in source
    assert source.count("kEigModeVector, kFillUpper") == 3  # bufferSize twice, the solve once


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_glue_reads_torch_triangle_and_returns_torch_layout(emulated, monkeypatch, dtype):
    ext = emulated(EmulatedExtension())
    monkeypatch.setattr(small_eigh, "max_batch", lambda s: 3)
    mats = _lower_differs(7, 9, dtype)
    before = mats.clone()
    evals, evecs = small_eigh._solve_with_cusolver(mats)
    assert ext.calls == [3, 3, 1]  # split at max_batch
    want_vals, want_vecs = torch.linalg.eigh(mats)
    assert torch.equal(mats, before)
    assert evals.dtype == evecs.dtype == dtype and evecs.stride() == want_vecs.stride()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    scale = float(want_vals.abs().max())
    assert torch.allclose(evals, want_vals, atol=tol * scale)
    # Eigenvectors up to sign: compare projectors onto each (distinct) eigenvalue's line.
    proj = evecs[..., :, None, :] * evecs[..., None, :, :]
    want = want_vecs[..., :, None, :] * want_vecs[..., None, :, :]
    assert torch.allclose(proj, want, atol=100 * tol)


def test_glue_resolves_unconverged_problems_with_torch(emulated):
    emulated(EmulatedExtension(unconverged={1, 4}))
    mats = _spd_batch(6, 5, torch.float64)
    with pytest.warns(RuntimeWarning, match="did not converge on 2 of 6 problems"):
        evals, evecs = small_eigh._solve_with_cusolver(mats)
    want_vals, _ = torch.linalg.eigh(mats)
    assert torch.allclose(evals, want_vals, atol=1e-10 * float(want_vals.abs().max()))
    assert (evecs != 7.0).any(-1).any(-1).all()


def test_glue_failed_call_falls_back_and_is_reported(emulated):
    emulated(EmulatedExtension(fail=True))
    mats = _spd_batch(4, 6, torch.float32)
    with pytest.warns(RuntimeWarning, match="CUSOLVER_STATUS_INTERNAL_ERROR"):
        evals, evecs = small_eigh._solve_with_cusolver(mats)
    assert torch.equal(evals, torch.linalg.eigh(mats)[0])
    assert small_eigh.method(torch.device("cuda")).startswith(
        "torch.linalg.eigh (cusolverDnXsyevBatched failed: small_eigh: cusolverDnXsyevBatched failed with")


# ----------------------------------------------------------------- the loader, on stub libraries
STUB = r"""
#include <stdint.h>
#include <stddef.h>
typedef struct Ctx* H; typedef struct Par* P;
int cusolverDnCreate(H* h) { *h = (H)0; return 0; }
int cusolverDnSetStream(H h, void* s) { (void)h; (void)s; return 0; }
int cusolverDnCreateParams(P* p) { *p = (P)0; return 0; }
int cusolverGetProperty(int type, int* value) { *value = type == 0 ? 11 : type == 1 ? MINOR : 0; return 0; }
#ifdef WITH_BATCHED
int cusolverDnXsyevBatched_bufferSize(void) { return 0; }
int cusolverDnXsyevBatched(void) { return 0; }
#endif
"""


def _cc() -> str | None:
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and shutil.which(name.split()[0]):
            return name
    return None


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> dict[str, Path]:
    if _ext() is None:
        pytest.skip("the CUDA extension r2m_fast._cuda is not built here (nvcc and pybind11 build it)")
    cc = _cc()
    if cc is None:
        pytest.skip("no C compiler to build the stub libraries")
    folder = tmp_path_factory.mktemp("stubs")
    src = folder / "stub.c"
    src.write_text(STUB)
    out = {}
    for name, flags in (("old", ["-DMINOR=6"]), ("new", ["-DMINOR=7", "-DWITH_BATCHED"]),
                        ("alien", None)):
        lib = folder / f"libstub_{name}.so"
        if flags is None:  # a shared library that is not cuSOLVER at all
            (folder / "alien.c").write_text("int not_cusolver(void) { return 0; }\n")
            cmd = [*cc.split(), "-shared", "-fPIC", str(folder / "alien.c"), "-o", str(lib)]
        else:
            cmd = [*cc.split(), "-shared", "-fPIC", *flags, str(src), "-o", str(lib)]
        built = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert built.returncode == 0, built.stderr
        out[name] = lib
    return out


def _in_subprocess(code: str) -> dict:
    """Run `code` (which prints one JSON line last) in a fresh interpreter: a load holds for the process."""
    env = {k: v for k, v in os.environ.items() if k not in ("R2M_SMALL_EIGH", "R2M_CUSOLVER_LIBRARY")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=str(ROOT))
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_loader_reports_each_failure(stubs):
    missing = "/nonexistent/dir/libcusolver.so.12"
    got = _in_subprocess(f"""
        import json
        from r2m_fast import cuda_ops
        ext = cuda_ops._ext
        out = {{}}
        out["missing"] = ext.small_eigh_load([{missing!r}])
        out["alien"] = ext.small_eigh_load([{str(stubs["alien"])!r}])
        out["old"] = ext.small_eigh_load([{missing!r}, {str(stubs["old"])!r}])
        out["library"] = ext.small_eigh_library()
        print(json.dumps(out))
    """)
    assert got["missing"].startswith("no cuSOLVER library could be loaded (")
    assert missing in got["missing"]
    assert "is not a cuSOLVER library" in got["alien"]
    assert got["old"].startswith(f"cuSOLVER 11.6.0 at {stubs['old']} has no cusolverDnXsyevBatched")
    assert "11.7.1" in got["old"]
    assert got["library"] == ""


def test_loader_loads_a_new_enough_library_and_a_call_without_gpu_raises(stubs):
    got = _in_subprocess(f"""
        import json
        from r2m_fast import cuda_ops
        ext = cuda_ops._ext
        out = {{"load": ext.small_eigh_load([{str(stubs["old"])!r}, {str(stubs["new"])!r}])}}
        out["library"] = ext.small_eigh_library()
        out["again"] = ext.small_eigh_load(["/nonexistent/libcusolver.so.12"])  # loaded: stays loaded
        try:
            ext.small_eigh_buffer_size(0, 0, 8, 2, ext.DTYPE_FLOAT32, 0, 0)
            out["call"] = "no error"
        except RuntimeError as exc:
            out["call"] = str(exc)
        try:
            ext.small_eigh_buffer_size(0, 0, 8, 2, ext.DTYPE_BFLOAT16, 0, 0)
        except RuntimeError as exc:
            out["dtype"] = str(exc)
        print(json.dumps(out))
    """)
    assert got["load"] == "" and got["again"] == ""
    assert got["library"] == f"{stubs['new']} (cuSOLVER 11.7.0)"
    assert "not float32 or float64" in got["dtype"]
    if not HAS_CUDA:  # the stub is never called: the device is checked first
        assert got["call"].startswith("small_eigh: cudaSetDevice failed"), got["call"]


def test_python_fallback_names_the_reason(stubs):
    """small_eigh.method on a CUDA device whose only candidate is too old: the torch fallback, and why."""
    got = _in_subprocess(f"""
        import json, torch
        from r2m_fast import small_eigh
        small_eigh.library_candidates = lambda: [{str(stubs["old"])!r}]
        print(json.dumps({{"method": small_eigh.method(torch.device("cuda")), "lib": small_eigh.library()}}))
    """)
    assert got["method"].startswith(f"torch.linalg.eigh (cuSOLVER 11.6.0 at {stubs['old']} has no cusolverDnXsyevBatched")
    assert got["lib"] == ""


def test_extension_builds_without_cusolver_headers():
    """csrc/small_eigh.cpp compiles against the CUDA runtime headers alone: an include path with no
    cusolver*.h / cublas*.h (the CPU CI has none) must do."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    source = (ROOT / "csrc" / "small_eigh.cpp").read_text()
    assert "#include <cusolver" not in source and "#include <cublas" not in source
    # The dependency list of the preprocessed file: every header it opens, none of them cuSOLVER's
    # or cuBLAS's, whether or not this toolkit ships them.
    run = subprocess.run([nvcc, "-std=c++17", "-M", f"-I{ROOT / 'csrc'}", str(ROOT / "csrc" / "small_eigh.cpp")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "cusolver" not in run.stdout and "cublas" not in run.stdout, run.stdout


def test_built_extension_does_not_link_cusolver():
    """The extension resolves cuSOLVER at run time: no DT_NEEDED entry, no undefined cusolver symbol."""
    ext = _ext()
    if ext is None:
        pytest.skip("the CUDA extension r2m_fast._cuda is not built here")
    readelf, nm = shutil.which("readelf"), shutil.which("nm")
    if readelf is None or nm is None:
        pytest.skip("binutils (readelf, nm) not installed")
    needed = subprocess.run([readelf, "-d", ext.__file__], capture_output=True, text=True, check=True).stdout
    undefined = subprocess.run([nm, "-D", "--undefined-only", ext.__file__], capture_output=True, text=True,
                               check=True).stdout
    assert "NEEDED" in needed and "cusolver" not in needed.lower(), needed
    assert "cusolver" not in undefined.lower() and "dlopen" in undefined, undefined


# ------------------------------------------------------------------------------------------- GPU
def _projector(vecs: torch.Tensor, k: int) -> torch.Tensor:
    top = vecs[..., -k:]
    return top @ top.transpose(-1, -2)


def _problems(s: int, batch: int, device) -> torch.Tensor:
    """A batch mixing well-separated spectra, rank-deficient Grams and zero matrices (float64)."""
    g = torch.Generator().manual_seed(s * 1000 + batch)
    q, _ = torch.linalg.qr(torch.randn(batch, s, s, generator=g, dtype=torch.float64))
    lam = torch.linspace(1.0, 100.0, s, dtype=torch.float64).expand(batch, s).clone()
    mats = q @ torch.diag_embed(lam) @ q.transpose(1, 2)
    r = max(1, s // 3)
    low = torch.randn(batch, s, r, generator=g, dtype=torch.float64)
    for i in range(batch):
        if i % 3 == 1:
            mats[i] = low[i] @ low[i].T  # rank r < s: s − r zero eigenvalues
        elif i % 3 == 2 and i % 2 == 0:
            mats[i] = 0.0
    return mats.to(device)


@gpu
def test_gpu_uses_cusolver_batched():
    if _ext() is None:
        pytest.skip("the CUDA extension r2m_fast._cuda is not built")
    assert small_eigh.method(torch.device("cuda")) == small_eigh.CUSOLVER, small_eigh.method(torch.device("cuda"))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("s", [8, 33, 64, 100, 420])
@pytest.mark.parametrize("batch", [1, 7, 33])
def test_gpu_against_float64_torch(s, batch, dtype):
    if small_eigh.method(torch.device("cuda")) != small_eigh.CUSOLVER:
        pytest.skip(small_eigh.method(torch.device("cuda")))
    ref = _problems(s, batch, "cuda")
    mats = ref.to(dtype)
    before = mats.clone()
    evals, evecs = batched_eigh(mats)
    torch.cuda.synchronize()
    assert evals.shape == (batch, s) and evecs.shape == (batch, s, s)
    assert evals.dtype == dtype and evecs.dtype == dtype
    assert torch.equal(mats, before), "the input was modified"
    assert torch.isfinite(evals).all() and torch.isfinite(evecs).all()
    want_vals, want_vecs = torch.linalg.eigh(ref)
    eps = torch.finfo(dtype).eps
    scale = ref.flatten(1).abs().amax(-1).clamp_min(1.0)[:, None]  # eigenvalue errors scale with ‖A‖
    assert ((evals.double() - want_vals).abs() <= 50 * s * eps * scale).all()
    assert (evals[:, 1:] >= evals[:, :-1] - 50 * s * eps * scale).all(), "not ascending"
    eye = torch.eye(s, dtype=torch.float64, device="cuda")
    v = evecs.double()
    assert (v.transpose(1, 2) @ v - eye).abs().amax() <= 100 * s * eps
    recon = v @ torch.diag_embed(evals.double()) @ v.transpose(1, 2)
    assert ((recon - ref).flatten(1).abs().amax(-1) <= 100 * s * eps * scale[:, 0]).all()
    # Subspaces where the spectrum has a gap: the top third, compared as projectors.
    k = max(1, s // 3)
    for i in range(batch):
        if float(want_vals[i, -1]) == 0.0:
            continue  # the zero matrix: every orthonormal basis is right (checked above)
        gap = float(want_vals[i, -k] - want_vals[i, -k - 1]) if k < s else float(want_vals[i, -1])
        if gap <= 1e-3 * float(want_vals[i, -1]):
            continue
        err = (_projector(v[i], k) - _projector(want_vecs[i], k)).abs().amax()
        assert err <= 1e3 * eps * float(want_vals[i, -1]) / gap + 1e-12, (i, float(err))


@gpu
def test_gpu_zero_and_views_and_side_stream():
    if small_eigh.method(torch.device("cuda")) != small_eigh.CUSOLVER:
        pytest.skip(small_eigh.method(torch.device("cuda")))
    zero = torch.zeros(5, 64, 64, device="cuda")
    evals, evecs = batched_eigh(zero)
    assert torch.equal(evals, torch.zeros_like(evals))
    eye = torch.eye(64, device="cuda")
    assert (evecs.transpose(1, 2) @ evecs - eye).abs().amax() < 1e-5
    mats = _problems(40, 9, "cuda")
    view = mats.transpose(1, 2)[::2]  # strided: 5 problems
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        evals, evecs = batched_eigh(view)
    side.synchronize()
    want, _ = torch.linalg.eigh(view.contiguous())
    assert torch.allclose(evals, want, atol=1e-9 * float(want.abs().max()))


@gpu
def test_gpu_batches_above_cusolvers_limit_go_in_chunks(monkeypatch):
    if small_eigh.method(torch.device("cuda")) != small_eigh.CUSOLVER:
        pytest.skip(small_eigh.method(torch.device("cuda")))
    mats = _problems(33, 7, "cuda")
    whole = batched_eigh(mats)[0]
    monkeypatch.setattr(small_eigh, "max_batch", lambda s: 3)  # 3 + 3 + 1
    chunked = batched_eigh(mats)[0]
    want = torch.linalg.eigh(mats)[0]
    assert torch.allclose(chunked, want, atol=1e-10 * float(want.abs().max()))
    assert torch.allclose(chunked, whole, atol=1e-10 * float(want.abs().max()))


@gpu
def test_gpu_merge_matches_torch_eigh(family, monkeypatch):
    if small_eigh.method(torch.device("cuda")) != small_eigh.CUSOLVER:
        pytest.skip(small_eigh.method(torch.device("cuda")))
    models = [{k: v.cuda() for k, v in sd.items()} for sd in family]
    config = R2MConfig(rank_ratio=0.25, seed=3)
    got = r2m_fast.merge(models[0], models[1:], config, backend="torch")
    assert got.report["small_eigh"] == small_eigh.CUSOLVER
    monkeypatch.setenv("R2M_SMALL_EIGH", "torch")
    want = r2m_fast.merge(models[0], models[1:], config, backend="torch")
    assert want.report["small_eigh"] == "torch.linalg.eigh (R2M_SMALL_EIGH=torch)"
    for name, w in want.state_dict.items():
        g = got.state_dict[name]
        scale = float((w.double() - models[0][name].double()).norm()) + 1e-30
        assert float((g.double() - w.double()).norm()) <= 1e-5 * scale + 1e-6 * float(w.double().norm()), name


@gpu
def test_gpu_pass2_and_pass3_host_syncs_do_not_grow_with_layers():
    """Pass 2 on CUDA synchronizes per shape group (the eigensolver's and Cholesky's info checks), never
    per layer, and pass 3 (torch backend) not per layer either: 4 and 12 same-shape layers make the
    same number of synchronizing calls."""
    from r2m_fast.sources import DictSource
    from r2m_fast.engine import (
        accumulate_pass, factor_pass, gram_pass, new_state, residual_norms, residual_scales,
        solve_real_subspace,
    )
    from r2m_fast.backends import resolve_backend

    def syncs(layers: int) -> tuple[int, int]:
        g = torch.Generator(device="cuda").manual_seed(layers)
        shapes = {f"l{i}.weight": (96, 80) for i in range(layers)}
        base = {k: torch.randn(*v, generator=g, device="cuda") for k, v in shapes.items()}
        specs = [{k: v + 1e-3 * torch.randn(*v.shape, generator=g, device="cuda") for k, v in base.items()}
                 for _ in range(3)]
        source = DictSource(base, specs)
        config = R2MConfig(rank_ratio=0.25, seed=0)
        backend = resolve_backend("torch", source.device)
        ops = backend.ops()
        state = new_state(source, config, backend, None)
        gram_pass(source, state, config, ops)
        real = solve_real_subspace(state, config, 3)
        torch.cuda.synchronize()
        import warnings as w

        def counted(fn) -> tuple[int, object]:
            with w.catch_warnings(record=True) as caught:
                w.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    result = fn()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            return sum("synchronizing" in str(c.message) for c in caught), result

        pass2, factors = counted(lambda: factor_pass(source, state, real, config, ops))
        scales = residual_scales(residual_norms(state, real, factors, 3), config.alpha * real.core_norm,
                                 config.residual_scale)
        torch.cuda.synchronize()
        out = {}
        pass3, _ = counted(lambda: accumulate_pass(source, state, real, factors, scales, config, ops, out.__setitem__))
        assert len(out) == layers
        return pass2, pass3

    assert syncs(4) == syncs(12)
