// Tensor-core sketch for a bf16 Ω (the engine's default range-finder precision on CUDA):
// Zⱼ = bf16(θⱼ − θ₀) · Ω with bf16 operands and fp32 accumulation — exactly the torch contract's
// product for a bf16 Ω (τ formed in fp32, rounded once to bf16), on mma.sync.m16n8k16 (sm_80+).
//
// Block tile 128 (rows) x 128 (sketch columns) x 32 (k), 256 threads = 8 warps in a 4x2 grid, each
// warp 32x64 = 2x8 mma tiles (64 fp32 accumulators per thread). 128 columns cover s = r + p for
// ranks up to 118 in one column tile, so each τ tile is read once; wider sketches re-read it per
// 128 columns. A (τ, row-major [m][k]) and B (Ω
// transposed, [s][k]) sit in shared memory as bf16 with rows padded to 40 elements (20 words), so
// the fragment loads (one 32-bit word per lane, 8 rows x 4 words) hit 32 distinct banks. The next
// k-tile is loaded to registers (τ formed and rounded there) while the current one is multiplied.
#pragma once

#include "common.cuh"

namespace r2m {

constexpr int kMmaM = 128, kMmaN = 128, kMmaK = 32, kMmaThreads = 256;
constexpr int kMmaLd = kMmaK + 8;  // bf16 elements per shared row

struct MmaSmem {
  __nv_bfloat16 a[2][kMmaM][kMmaLd];
  __nv_bfloat16 b[2][kMmaN][kMmaLd];
};

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo, round to nearest even
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Per thread and k-tile: 4 groups of 4 consecutive k of τ (rows t/8 + 32·g, k = 4·(t%8)), and 4
// groups of 4 consecutive sketch columns of Ω (k = t/32 + 8·g, columns 4·(t%32)).
template <typename T, bool VEC, bool OVEC>
struct MmaLoader {
  const T* base;
  const T* w;
  int64_t ld_base, ld_w, rows, cols, row0;
  const float* omega;
  int64_t ld_omega, s, col0;

  __device__ __forceinline__ void load(int64_t k0, uint32_t (&ra)[4][2], float (&rb)[4][4]) const {
    const int t = threadIdx.x;
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const int64_t r = row0 + (t >> 3) + 32 * g;
      const int64_t k = k0 + (t & 7) * 4;
      float v[4];
      if (VEC && r < rows && k + 3 < cols) {
        float b[4];
        load4(base + r * ld_base + k, b);
        load4(w + r * ld_w + k, v);
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] -= b[e];
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          v[e] = (r < rows && k + e < cols) ? to_float(w[r * ld_w + k + e]) - to_float(base[r * ld_base + k + e]) : 0.f;
      }
      ra[g][0] = pack_bf16(v[0], v[1]);
      ra[g][1] = pack_bf16(v[2], v[3]);
    }
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const int64_t k = k0 + (t >> 5) + 8 * g;
      const int64_t c = col0 + (t & 31) * 4;
      if (OVEC && k < cols && c + 3 < s) {
        load4(omega + k * ld_omega + c, rb[g]);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) rb[g][e] = (k < cols && c + e < s) ? __ldg(omega + k * ld_omega + c + e) : 0.f;
      }
    }
  }

  __device__ __forceinline__ void store(MmaSmem& sm, int buf, const uint32_t (&ra)[4][2],
                                        const float (&rb)[4][4]) const {
    const int t = threadIdx.x;
#pragma unroll
    for (int g = 0; g < 4; ++g)
      *reinterpret_cast<uint2*>(&sm.a[buf][(t >> 3) + 32 * g][(t & 7) * 4]) = make_uint2(ra[g][0], ra[g][1]);
#pragma unroll
    for (int g = 0; g < 4; ++g)
#pragma unroll
      for (int e = 0; e < 4; ++e)  // Ω is bf16-valued already (widened by the wrapper): exact
        sm.b[buf][(t & 31) * 4 + e][(t >> 5) + 8 * g] = __float2bfloat16_rn(rb[g][e]);
  }
};

template <typename T, bool VEC, bool OVEC>
__global__ void __launch_bounds__(kMmaThreads) sketch_mma_kernel(WeightPtrs w, int n, int64_t rows, int64_t cols,
                                                                const float* __restrict__ omega, int64_t omega_ld,
                                                                int64_t s, float* __restrict__ out) {
  __shared__ __align__(16) MmaSmem sm;
  const int task = blockIdx.x % n;
  const int64_t col0 = int64_t(blockIdx.x / n) * kMmaN;
  const int64_t row_tiles = (rows + kMmaM - 1) / kMmaM;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp >> 1, wn = warp & 1;  // 4 x 2 warps, each 32 rows x 64 columns
  const int grp = lane >> 2, tig = lane & 3;
  float* z = out + int64_t(task) * rows * s;
  const int64_t k_tiles = (cols + kMmaK - 1) / kMmaK;

  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const int64_t row0 = rt * kMmaM;
    MmaLoader<T, VEC, OVEC> ld{static_cast<const T*>(w.ptr[0]), static_cast<const T*>(w.ptr[task + 1]),
                               w.stride[0], w.stride[task + 1], rows, cols, row0, omega, omega_ld, s, col0};
    float acc[2][8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 8; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

    uint32_t ra[4][2];
    float rb[4][4];
    ld.load(0, ra, rb);
    ld.store(sm, 0, ra, rb);
    __syncthreads();
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      const int cur = int(kt & 1);
      const bool more = kt + 1 < k_tiles;
      if (more) ld.load((kt + 1) * kMmaK, ra, rb);
#pragma unroll
      for (int kk = 0; kk < kMmaK; kk += 16) {
        uint32_t af[2][4], bfr[8][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const int r = wm * 32 + mi * 16 + grp;
          af[mi][0] = *reinterpret_cast<const uint32_t*>(&sm.a[cur][r][kk + tig * 2]);
          af[mi][1] = *reinterpret_cast<const uint32_t*>(&sm.a[cur][r + 8][kk + tig * 2]);
          af[mi][2] = *reinterpret_cast<const uint32_t*>(&sm.a[cur][r][kk + tig * 2 + 8]);
          af[mi][3] = *reinterpret_cast<const uint32_t*>(&sm.a[cur][r + 8][kk + tig * 2 + 8]);
        }
#pragma unroll
        for (int ni = 0; ni < 8; ++ni) {
          const int c = wn * 64 + ni * 8 + grp;
          bfr[ni][0] = *reinterpret_cast<const uint32_t*>(&sm.b[cur][c][kk + tig * 2]);
          bfr[ni][1] = *reinterpret_cast<const uint32_t*>(&sm.b[cur][c][kk + tig * 2 + 8]);
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 8; ++ni)
            mma_bf16_16816(acc[mi][ni], af[mi][0], af[mi][1], af[mi][2], af[mi][3], bfr[ni][0], bfr[ni][1]);
      }
      if (more) ld.store(sm, cur ^ 1, ra, rb);
      __syncthreads();
    }

#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t r = row0 + wm * 32 + mi * 16 + grp + 8 * half;
        if (r >= rows) continue;
#pragma unroll
        for (int ni = 0; ni < 8; ++ni) {
          const int64_t c = col0 + wn * 64 + ni * 8 + tig * 2;
          if (c < s) z[r * s + c] = acc[mi][ni][2 * half];
          if (c + 1 < s) z[r * s + c + 1] = acc[mi][ni][2 * half + 1];
        }
      }
    }
  }
}

}  // namespace r2m
