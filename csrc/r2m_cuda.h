// r2m_fast CUDA kernels: host-side launcher declarations shared by the .cu files and bindings.cpp.
//
// No torch C++ ABI: every launcher takes raw device addresses (as uintptr_t), element strides, a
// dtype code, the device index and the cudaStream_t (as uintptr_t), and throws std::runtime_error
// naming the kernel and the CUDA cause on any error. The Python wrapper (r2m_fast/cuda_ops.py)
// validates tensors first; the launchers re-check cheaply (sizes, counts, alignment for the vector
// variants) so a bad call raises instead of producing garbage.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace r2m {

// Element dtype codes, shared with cuda_ops.py (_DTYPE_CODES).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };  // kFloat64: small_eigh only

// Most task vectors one call handles (θ₀ plus kMaxTasks specialists travel in one by-value
// kernel-parameter struct; the wrapper falls back to torch above this).
constexpr int kMaxTasks = 16;

// Number of CUDA devices this extension's runtime sees, and the error text when it sees none.
int device_count(std::string* error);

// cudaRuntimeGetVersion / cudaDriverGetVersion (0 when the driver is missing).
int runtime_version();
int driver_version();

// Gram partials: per block, the full symmetric N x N matrix Σ τᵢ τⱼ over the block's elements, in
// float64, row-major at partial[(block * N + i) * N + j] (the wrapper allocates (grid, N, N) and
// sums over blocks). Row strides must be ≥ cols wherever rows > 1 (checked).
// `weights` holds N+1 addresses of (rows, cols) matrices with row strides `strides` (elements).
void gram_partials(const std::vector<uintptr_t>& weights, const std::vector<int64_t>& strides,
                   int64_t rows, int64_t cols, int dtype, uintptr_t partial, int grid,
                   int device, uintptr_t stream);

// Sketches Z[j] = (θⱼ₊₁ − θ₀) Ω for j < N: Z (N, rows, s) fp32 contiguous, Ω (cols, s) fp32 with
// row stride omega_stride. round_tau_bf16: round τ to bf16 before the (fp32) product, which is
// the torch contract's product for a bf16 Ω (the wrapper passes that Ω widened to fp32, exactly);
// with use_mma that product runs on bf16 tensor cores (mma.sync, fp32 accumulation).
void sketch(const std::vector<uintptr_t>& weights, const std::vector<int64_t>& strides,
            int64_t rows, int64_t cols, int dtype, uintptr_t omega, int64_t omega_stride, int64_t s,
            uintptr_t out, bool round_tau_bf16, bool use_mma, int device, uintptr_t stream);

// out = θ₀ + Σⱼ aⱼ (θⱼ − θ₀) [+ L Rᵀ], fp32 arithmetic, cast once to out_dtype; out (rows, cols)
// contiguous. left (rows, K) / right (cols, K) fp32 with row strides; K == 0 means no product.
// use_mma: L Rᵀ on tensor cores in 3xTF32 (fp32-class accuracy), else fp32 SIMT FMA.
void accumulate(const std::vector<uintptr_t>& weights, const std::vector<int64_t>& strides,
                const std::vector<double>& coeffs, int64_t rows, int64_t cols, int dtype,
                uintptr_t left, int64_t left_stride, uintptr_t right, int64_t right_stride,
                int64_t k, uintptr_t out, int out_dtype, int grid, bool use_mma, int device, uintptr_t stream);

// Batched small symmetric eigensolver (csrc/small_eigh.cpp): cuSOLVER's cusolverDnXsyevBatched,
// resolved with dlopen/dlsym at first use (no cuSOLVER header or link-time dependency).
// small_eigh_load: tries a cuSOLVER already in the process, then each candidate (paths or sonames);
// returns "" once loaded (for the process), else why not (a later call may try other candidates).
std::string small_eigh_load(const std::vector<std::string>& candidates);
// The loaded library's path and version ("" when not loaded).
std::string small_eigh_library();
// (device bytes, host bytes) of workspace for `batch` n×n problems of dtype kFloat32 or kFloat64.
std::tuple<int64_t, int64_t> small_eigh_buffer_size(uintptr_t a, uintptr_t w, int64_t n, int64_t batch, int dtype,
                                                    int device, uintptr_t stream);
// In place on `stream`: a (batch, n, n) symmetric matrices (the row-major lower triangle is read),
// overwritten by the eigenvectors (column j of matrix k, column-major = row j row-major);
// w (batch, n) eigenvalues ascending; info (batch,) int32, nonzero where a problem did not
// converge; work: device workspace of work_bytes (≥ small_eigh_buffer_size's device bytes).
void small_eigh(uintptr_t a, uintptr_t w, int64_t n, int64_t batch, int dtype, uintptr_t work, int64_t work_bytes,
                uintptr_t info, int device, uintptr_t stream);

}  // namespace r2m
