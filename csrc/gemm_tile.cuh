// A 64x64x16 shared-memory-tiled fp32 SIMT GEMM main loop (256 threads, 4x4 outputs per thread,
// double-buffered shared memory with a register prefetch of the next k-tile), parameterized by
// operand loaders so the sketch (A = τⱼ formed from θ₀ and θⱼ in the prologue) and the
// accumulation (A = L, B = Rᵀ) share it. Every product is an fp32 FMA: the accumulation needs
// ~1e-5 relative accuracy and the sketch of τ must not lose τ's low bits.
//
// Layout: thread t owns rows ty + 16·i and columns tx + 16·j (tx = t % 16, ty = t / 16, i, j < 4),
// so shared-memory reads of B are consecutive across a half warp and A reads are broadcasts, and
// the epilogue touches 16 consecutive columns per half warp.
#pragma once

#include "common.cuh"

namespace r2m {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kGemmThreads = 256;
constexpr int kPad = 4;  // keeps rows 16-byte aligned and spreads the transposed stores over banks

struct GemmSmem {
  float a[2][kTileK][kTileM + kPad];
  float b[2][kTileK][kTileN + kPad];
};

// K-contiguous fp32 operand (L of the accumulation, R of Rᵀ): element (r, k) at p[r·ld + k].
// Thread t loads row t/4, k = 4·(t%4) … +3, and stores it transposed into smem[k][row].
template <bool VEC>
struct KContigF32 {
  const float* p;
  int64_t ld, rows, k_total, row0;
  __device__ __forceinline__ void load(int64_t k0, float (&v)[4]) const {
    const int t = threadIdx.x;
    const int64_t r = row0 + (t >> 2);
    const int64_t k = k0 + (t & 3) * 4;
    if (r < rows && VEC && k + 3 < k_total) {
      load4(p + r * ld + k, v);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) v[e] = (r < rows && k + e < k_total) ? __ldg(p + r * ld + k + e) : 0.f;
    }
  }
  __device__ __forceinline__ void store(float (*s)[kTileM + kPad], const float (&v)[4]) const {
    const int t = threadIdx.x;
#pragma unroll
    for (int e = 0; e < 4; ++e) s[(t & 3) * 4 + e][t >> 2] = v[e];
  }
};

// τⱼ = θⱼ − θ₀ formed in fp32 as it is loaded (never stored): element (r, k) of θ at p[r·ld + k].
// round_bf16: round τ to bf16 (the product then runs at a bf16 Ω's precision, as the torch contract
// does for a bf16 Ω; products and sums stay fp32).
template <typename T, bool VEC>
struct TauLoader {
  const T* base;
  const T* w;
  int64_t ld_base, ld_w, rows, k_total, row0;
  bool round_bf16;
  __device__ __forceinline__ void load(int64_t k0, float (&v)[4]) const {
    const int t = threadIdx.x;
    const int64_t r = row0 + (t >> 2);
    const int64_t k = k0 + (t & 3) * 4;
    if (r < rows && VEC && k + 3 < k_total) {
      float b[4];
      load4(base + r * ld_base + k, b);
      load4(w + r * ld_w + k, v);
#pragma unroll
      for (int e = 0; e < 4; ++e) v[e] -= b[e];
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        v[e] = (r < rows && k + e < k_total)
                   ? to_float(w[r * ld_w + k + e]) - to_float(base[r * ld_base + k + e])
                   : 0.f;
    }
    if (round_bf16) {
#pragma unroll
      for (int e = 0; e < 4; ++e) v[e] = __bfloat162float(__float2bfloat16_rn(v[e]));
    }
  }
  __device__ __forceinline__ void store(float (*s)[kTileM + kPad], const float (&v)[4]) const {
    const int t = threadIdx.x;
#pragma unroll
    for (int e = 0; e < 4; ++e) s[(t & 3) * 4 + e][t >> 2] = v[e];
  }
};

// N-contiguous fp32 operand (Ω of the sketch): element (k, c) at p[k·ld + c]. Thread t loads
// k = t/16, c = 4·(t%16) … +3 and stores it as is (one 16-byte shared store).
template <bool VEC>
struct NContigF32 {
  const float* p;
  int64_t ld, k_total, cols, col0;
  __device__ __forceinline__ void load(int64_t k0, float (&v)[4]) const {
    const int t = threadIdx.x;
    const int64_t k = k0 + (t >> 4);
    const int64_t c = col0 + (t & 15) * 4;
    if (k < k_total && VEC && c + 3 < cols) {
      load4(p + k * ld + c, v);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) v[e] = (k < k_total && c + e < cols) ? __ldg(p + k * ld + c + e) : 0.f;
    }
  }
  __device__ __forceinline__ void store(float (*s)[kTileN + kPad], const float (&v)[4]) const {
    const int t = threadIdx.x;
    *reinterpret_cast<float4*>(&s[t >> 4][(t & 15) * 4]) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

// acc[i][j] = Σ_k A(ty + 16i, k) · B(k, tx + 16j) over the whole K extent.
template <class ALoad, class BLoad>
__device__ __forceinline__ void gemm_mainloop(const ALoad& A, const BLoad& B, int64_t k_total, GemmSmem& sm,
                                              float (&acc)[4][4]) {
  const int tx = threadIdx.x & 15;
  const int ty = threadIdx.x >> 4;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  const int64_t k_tiles = (k_total + kTileK - 1) / kTileK;
  if (k_tiles == 0) return;
  float ra[4], rb[4];
  A.load(0, ra);
  B.load(0, rb);
  A.store(sm.a[0], ra);
  B.store(sm.b[0], rb);
  __syncthreads();
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    const int cur = int(kt & 1);
    const bool more = kt + 1 < k_tiles;
    if (more) {  // issue the next tile's global loads before computing on this one
      A.load((kt + 1) * kTileK, ra);
      B.load((kt + 1) * kTileK, rb);
    }
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sm.a[cur][k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sm.b[cur][k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    if (more) {
      A.store(sm.a[cur ^ 1], ra);
      B.store(sm.b[cur ^ 1], rb);
    }
    __syncthreads();
  }
}

}  // namespace r2m
