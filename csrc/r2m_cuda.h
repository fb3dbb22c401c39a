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
#include <vector>

namespace r2m {

// Element dtype codes, shared with cuda_ops.py (_DTYPE_CODES).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

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

}  // namespace r2m
