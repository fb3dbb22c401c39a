// pybind11 module r2m_fast._cuda: the CUDA kernels behind plain integers (device addresses,
// element strides, dtype codes, device index, cudaStream_t). No torch headers: the module builds
// with nvcc + pybind11 alone and works with any torch. r2m_fast/cuda_ops.py validates tensors and
// is the only intended caller; the launchers re-check sizes and alignment and raise RuntimeError
// (std::runtime_error) naming the kernel and the CUDA cause.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>

#include "r2m_cuda.h"

#ifndef R2M_CUDA_ARCHS_STR
#define R2M_CUDA_ARCHS_STR "unknown"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "r2m_fast CUDA kernels (Gram + sketch pass, norm-scaled accumulation) and cuSOLVER's batched "
            "eigensolver (dlopen at first use); see r2m_fast.cuda_ops and r2m_fast.small_eigh";
  m.attr("DTYPE_FLOAT32") = int(r2m::kFloat32);
  m.attr("DTYPE_BFLOAT16") = int(r2m::kBFloat16);
  m.attr("DTYPE_FLOAT16") = int(r2m::kFloat16);
  m.attr("MAX_TASKS") = r2m::kMaxTasks;
  m.attr("COMPILED_ARCHS") = R2M_CUDA_ARCHS_STR;

  m.def(
      "device_count",
      []() {
        std::string error;
        int count = r2m::device_count(&error);
        return std::make_tuple(count, error);
      },
      "(count, error): CUDA devices this module's runtime sees; error says why when count is 0.");
  m.def("runtime_version", &r2m::runtime_version, "cudaRuntimeGetVersion of the linked runtime.");
  m.def("driver_version", &r2m::driver_version, "cudaDriverGetVersion (0 without a driver).");

  m.def("gram_partials", &r2m::gram_partials, py::arg("weights"), py::arg("strides"), py::arg("rows"),
        py::arg("cols"), py::arg("dtype"), py::arg("partial"), py::arg("grid"), py::arg("device"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Per-block fp64 N×N Gram partials of τⱼ = θⱼ − θ₀ into partial (grid, N, N).");
  m.def("sketch", &r2m::sketch, py::arg("weights"), py::arg("strides"), py::arg("rows"), py::arg("cols"),
        py::arg("dtype"), py::arg("omega"), py::arg("omega_stride"), py::arg("s"), py::arg("out"),
        py::arg("round_tau_bf16"), py::arg("use_mma"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Z (N, rows, s) fp32 = (θⱼ − θ₀) Ω (τ rounded to bf16 first when round_tau_bf16).");
  m.def("accumulate", &r2m::accumulate, py::arg("weights"), py::arg("strides"), py::arg("coeffs"),
        py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("left"), py::arg("left_stride"),
        py::arg("right"), py::arg("right_stride"), py::arg("k"), py::arg("out"), py::arg("out_dtype"),
        py::arg("grid"), py::arg("use_mma"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "out (rows, cols) = θ₀ + Σ aⱼ (θⱼ − θ₀) [+ L Rᵀ], fp32 arithmetic, cast once.");

  m.attr("DTYPE_FLOAT64") = int(r2m::kFloat64);
  m.def("small_eigh_load", &r2m::small_eigh_load, py::arg("candidates"),
        "Load cuSOLVER's cusolverDnXsyevBatched (dlopen): '' once loaded, else the reason.");
  m.def("small_eigh_library", &r2m::small_eigh_library, "The loaded cuSOLVER's path and version, or ''.");
  m.def("small_eigh_buffer_size", &r2m::small_eigh_buffer_size, py::arg("a"), py::arg("w"), py::arg("n"),
        py::arg("batch"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "(device bytes, host bytes) of cusolverDnXsyevBatched's workspace.");
  m.def("small_eigh", &r2m::small_eigh, py::arg("a"), py::arg("w"), py::arg("n"), py::arg("batch"), py::arg("dtype"),
        py::arg("work"), py::arg("work_bytes"), py::arg("info"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "cusolverDnXsyevBatched in place: eigenvectors over a, ascending eigenvalues into w, info per problem.");
}
