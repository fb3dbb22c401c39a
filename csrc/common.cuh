// Shared device helpers for the r2m_fast CUDA kernels: dtype traits, 16-byte vector loads with
// fp32 conversion, the by-value pointer struct for θ₀…θ_N, launch checks and dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "r2m_cuda.h"

namespace r2m {

// θ₀…θ_N travel by value in the kernel parameters (17 pointers + 17 strides = 272 bytes), so no
// device-side pointer array has to be allocated or copied per layer.
struct WeightPtrs {
  const void* ptr[kMaxTasks + 1];
  int64_t stride[kMaxTasks + 1];  // row stride in elements; column stride is 1
};

struct Coeffs {
  float a[kMaxTasks];
};

// ----------------------------------------------------------------------------- conversions
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);  // round to nearest even, as torch's .to(bfloat16)
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Unpack a 32-bit word holding two 16-bit values (element 0 in the low half) into fp32.
__device__ __forceinline__ void unpack_word(uint32_t w, __nv_bfloat16*, float& lo, float& hi) {
  lo = __uint_as_float(w << 16);
  hi = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void unpack_word(uint32_t w, __half*, float& lo, float& hi) {
  __half2 h = *reinterpret_cast<const __half2*>(&w);
  float2 f = __half22float2(h);
  lo = f.x; hi = f.y;
}
// A raw vector of VB bytes (16 or 8) as 32-bit words, loaded with one streaming (evict-first)
// load: the Gram and elementwise passes read every byte once.
template <int VB> struct RawVec { uint32_t w[VB / 4]; };
template <int VB>
__device__ __forceinline__ RawVec<VB> ld_stream(const void* p) {
  RawVec<VB> r;
  if constexpr (VB == 16) {
    uint4 x = __ldcs(reinterpret_cast<const uint4*>(p));
    r.w[0] = x.x; r.w[1] = x.y; r.w[2] = x.z; r.w[3] = x.w;
  } else {
    uint2 x = __ldcs(reinterpret_cast<const uint2*>(p));
    r.w[0] = x.x; r.w[1] = x.y;
  }
  return r;
}
template <int VB> __device__ __forceinline__ RawVec<VB> raw_zero() {
  RawVec<VB> r;
#pragma unroll
  for (int k = 0; k < VB / 4; ++k) r.w[k] = 0u;
  return r;
}
template <typename T, int VB>
__device__ __forceinline__ void unpack_raw(const RawVec<VB>& r, float (&v)[VB / sizeof(T)]) {
#pragma unroll
  for (int k = 0; k < VB / 4; ++k) {
    if constexpr (sizeof(T) == 4) v[k] = __uint_as_float(r.w[k]);
    else unpack_word(r.w[k], (T*)nullptr, v[2 * k], v[2 * k + 1]);
  }
}

// Element e (a compile-time index after unrolling) of a raw vector, as fp32.
template <typename T, int VB>
__device__ __forceinline__ float raw_elem(const RawVec<VB>& r, int e) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(r.w[e]);
  } else {
    float lo, hi;
    unpack_word(r.w[e >> 1], (T*)nullptr, lo, hi);
    return (e & 1) ? hi : lo;
  }
}

// Four consecutive elements as fp32 (a 16-byte load for fp32, 8 bytes for 16-bit types); the
// caller guarantees alignment to 4 elements.
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  float4 r = __ldg(reinterpret_cast<const float4*>(p));
  v[0] = r.x; v[1] = r.y; v[2] = r.z; v[3] = r.w;
}
template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&v)[4]) {
  uint2 r = __ldg(reinterpret_cast<const uint2*>(p));
  unpack_word(r.x, (T*)nullptr, v[0], v[1]);
  unpack_word(r.y, (T*)nullptr, v[2], v[3]);
}

// ----------------------------------------------------------------------------- host helpers
inline bool sync_debug() {
  static const bool on = [] {
    const char* e = std::getenv("R2M_CUDA_SYNC");
    return e != nullptr && e[0] != '\0' && e[0] != '0';
  }();
  return on;
}

[[noreturn]] inline void fail(const char* kernel, const std::string& what) {
  throw std::runtime_error(std::string("r2m_fast._cuda.") + kernel + ": " + what);
}

inline void check_cuda(cudaError_t err, const char* kernel, const char* stage) {
  if (err != cudaSuccess)
    fail(kernel, std::string(stage) + " failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

// Select the device (this module links its own CUDA runtime, whose current device is separate
// from torch's), and clear nothing: a sticky error from an earlier call surfaces here.
inline void set_device(int device, const char* kernel) { check_cuda(cudaSetDevice(device), kernel, "cudaSetDevice"); }

// After a launch: the launch error itself, then (R2M_CUDA_SYNC=1) any asynchronous fault.
inline void check_launch(const char* kernel, cudaStream_t stream) {
  check_cuda(cudaGetLastError(), kernel, "kernel launch");
  if (sync_debug()) check_cuda(cudaStreamSynchronize(stream), kernel, "kernel execution (R2M_CUDA_SYNC=1)");
}

inline bool aligned(uintptr_t p, size_t bytes) { return (p % bytes) == 0; }

// A (rows, cols) operand's row stride: rows must not overlap or run backwards (a negative or short
// stride would read outside the tensor). Irrelevant for a single row.
inline void check_stride(const std::string& name, int64_t stride, int64_t rows, int64_t cols, const char* kernel) {
  if (rows > 1 && stride < cols)
    fail(kernel, name + " has row stride " + std::to_string(stride) + " < its " + std::to_string(cols) + " columns");
}

// θ₀ … θ_N as the kernels' by-value struct; min_specialists: 1 (Gram, sketch) or 0 (accumulate
// with every coefficient zero).
inline WeightPtrs make_ptrs(const std::vector<uintptr_t>& w, const std::vector<int64_t>& strides, int64_t rows,
                            int64_t cols, const char* kernel, size_t min_specialists = 1) {
  if (w.size() < min_specialists + 1)
    fail(kernel, "need θ₀ and at least " + std::to_string(min_specialists) + " specialist(s) (got " +
                     std::to_string(w.size()) + " weights)");
  if (w.size() > size_t(kMaxTasks + 1))
    fail(kernel, "at most " + std::to_string(kMaxTasks) + " specialists (got " + std::to_string(w.size() - 1) + ")");
  if (strides.size() != w.size()) fail(kernel, "one stride per weight expected");
  if (rows < 0 || cols < 0) fail(kernel, "negative shape");
  WeightPtrs p{};
  for (size_t i = 0; i < w.size(); ++i) {
    if (w[i] == 0) fail(kernel, "weights[" + std::to_string(i) + "] is a null pointer");
    check_stride("weights[" + std::to_string(i) + "]", strides[i], rows, cols, kernel);
    p.ptr[i] = reinterpret_cast<const void*>(w[i]);
    p.stride[i] = strides[i];
  }
  return p;
}

inline size_t dtype_size(int dtype, const char* kernel) {
  switch (dtype) {
    case kFloat32: return 4;
    case kBFloat16: case kFloat16: return 2;
    default: fail(kernel, "unknown dtype code " + std::to_string(dtype));
  }
}

// All weights (and their row strides) allow 16-byte vector loads of `elems` elements.
inline bool vector_ok(const std::vector<uintptr_t>& w, const std::vector<int64_t>& strides, int64_t rows,
                      size_t esize, int elems) {
  for (size_t i = 0; i < w.size(); ++i) {
    if (!aligned(w[i], esize * elems)) return false;
    if (rows > 1 && strides[i] % elems != 0) return false;
  }
  return true;
}

}  // namespace r2m

#define R2M_DISPATCH_DTYPE(code, T, KERNEL, ...)                              \
  switch (code) {                                                             \
    case ::r2m::kFloat32: { using T = float; __VA_ARGS__; break; }            \
    case ::r2m::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; }   \
    case ::r2m::kFloat16: { using T = __half; __VA_ARGS__; break; }           \
    default: ::r2m::fail(KERNEL, "unknown dtype code " + std::to_string(code)); \
  }

#define R2M_BOOL_SWITCH(cond, NAME, ...) \
  if (cond) { constexpr bool NAME = true; __VA_ARGS__; } else { constexpr bool NAME = false; __VA_ARGS__; }
