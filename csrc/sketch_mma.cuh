// Tensor-core sketch for a bf16 Ω (the engine's default range-finder precision on CUDA):
// Zⱼ = bf16(θⱼ − θ₀) · Ω with bf16 operands and fp32 accumulation — exactly the torch contract's
// product for a bf16 Ω (τ formed in fp32, rounded once to bf16), on mma.sync.m16n8k16 (sm_80+).
//
// Block tile 128 (rows) x 128 (sketch columns) x 32 (k), 256 threads = 8 warps in a 4x2 grid, each
// warp 32x64 = 2x8 mma tiles (64 fp32 accumulators per thread). 128 columns cover s = r + p for
// ranks up to 118 in one column tile, so each τ tile is read once; wider sketches re-read it per
// 128 columns. A (τ, row-major [m][k]) and B (Ω transposed, [s][k]) sit in shared memory as bf16 with rows padded to 40 elements (20 words), so
// the fragment loads (one 32-bit word per lane, 8 rows x 4 words) hit 32 distinct banks. The next
// k-tile is loaded to registers (τ formed and rounded there) while the current one is multiplied.
#pragma once

#include "tile_io.cuh"

namespace r2m {

// Tile shapes, thread and fragment maps: tile_map.h (kMmaM…, MmaATile, MmaBTile, mma::bf16_a/b/acc).

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

// Loads a k-tile of τ (rows row0 …, rounded to bf16 in registers) and of Ω (columns col0 …) into
// registers, four 4-element vectors of each per thread (MmaATile: 128 x 32, rows x k; MmaBTile:
// 32 x 128, k x sketch columns), and stores them to shared memory: τ as is ([row][k]), Ω
// transposed ([column][k]).
template <typename T, bool VEC, bool OVEC>
struct MmaLoader {
  TauMatrix<T, VEC> tau;
  F32Matrix<OVEC> omega;
  int64_t row0, col0;

  __device__ __forceinline__ void load(int64_t k0, uint32_t (&ra)[4][2], float (&rb)[4][4]) const {
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const Coord a = MmaATile::slot(threadIdx.x, g);
      float v[4];
      tau.load(row0 + a.row, k0 + a.col, v);
      ra[g][0] = pack_bf16(v[0], v[1]);
      ra[g][1] = pack_bf16(v[2], v[3]);
    }
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const Coord b = MmaBTile::slot(threadIdx.x, g);
      omega.load(k0 + b.row, col0 + b.col, rb[g]);
    }
  }

  __device__ __forceinline__ void store(MmaSmem& sm, int buf, const uint32_t (&ra)[4][2],
                                        const float (&rb)[4][4]) const {
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const Coord a = MmaATile::slot(threadIdx.x, g);
      *reinterpret_cast<uint2*>(&sm.a[buf][a.row][a.col]) = make_uint2(ra[g][0], ra[g][1]);
    }
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const Coord b = MmaBTile::slot(threadIdx.x, g);
#pragma unroll
      for (int e = 0; e < 4; ++e)  // Ω is bf16-valued already (widened by the wrapper): exact
        sm.b[buf][b.col + e][b.row] = __float2bfloat16_rn(rb[g][e]);
    }
  }
};

// Blocks per SM asked of ptxas: two for the aligned variant on sm_90, which then fits in 128
// registers without spilling (left alone, ptxas 13.0 gives it ~165: one block per SM). For sm_80
// (the embedded compute_80 PTX) that cap spills with 16-bit weights, so there, as for the scalar
// fallback, it is one. Check with scripts/cuda_codegen_report.py --arch sm_90a --arch sm_80.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define R2M_SKETCH_MMA_MIN_BLOCKS(VEC) 1
#else
#define R2M_SKETCH_MMA_MIN_BLOCKS(VEC) ((VEC) ? 2 : 1)
#endif

template <typename T, bool VEC, bool OVEC>
__global__ void __launch_bounds__(kMmaThreads, R2M_SKETCH_MMA_MIN_BLOCKS(VEC))
    sketch_mma_kernel(WeightPtrs w, int n, int64_t rows, int64_t cols, const float* __restrict__ omega,
                      int64_t omega_ld, int64_t s, float* __restrict__ out) {
  __shared__ __align__(16) MmaSmem sm;
  const int task = blockIdx.x % n;
  const int64_t col0 = int64_t(blockIdx.x / n) * kMmaN;
  const int64_t row_tiles = (rows + kMmaM - 1) / kMmaM;
  const int lane = threadIdx.x & 31;
  constexpr int MI = kMmaWarpM / 16, NI = kMmaWarpN / 8;  // m16n8 tiles per warp: 2 x 8
  const Coord wo = mma::warp_origin<kMmaWarpsN, kMmaWarpM, kMmaWarpN>(threadIdx.x >> 5);
  float* z = out + int64_t(task) * rows * s;
  const int64_t k_tiles = (cols + kMmaK - 1) / kMmaK;
  const TauMatrix<T, VEC> tau{static_cast<const T*>(w.ptr[0]), static_cast<const T*>(w.ptr[task + 1]), w.stride[0],
                              w.stride[task + 1], rows, cols, false};  // rounded to bf16 by pack_bf16

  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const int64_t row0 = rt * kMmaM;
    const MmaLoader<T, VEC, OVEC> ld{tau, {omega, omega_ld, cols, s}, row0, col0};
    float acc[MI][NI][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
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
        uint32_t af[MI][4], bfr[NI][2];  // one 32-bit word = two bf16 along k (low half first)
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int reg = 0; reg < 4; ++reg) {
            const Coord a = mma::bf16_a(lane, reg);
            af[mi][reg] = *reinterpret_cast<const uint32_t*>(&sm.a[cur][wo.row + mi * 16 + a.row][kk + a.col]);
          }
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
          for (int reg = 0; reg < 2; ++reg) {
            const Coord b = mma::bf16_b(lane, reg);
            bfr[ni][reg] = *reinterpret_cast<const uint32_t*>(&sm.b[cur][wo.col + ni * 8 + b.col][kk + b.row]);
          }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni)
            mma_bf16_16816(acc[mi][ni], af[mi][0], af[mi][1], af[mi][2], af[mi][3], bfr[ni][0], bfr[ni][1]);
      }
      if (more) ld.store(sm, cur ^ 1, ra, rb);
      __syncthreads();
    }

    mma::outputs<MI, NI>(lane, row0 + wo.row, col0 + wo.col, rows, s,
                         [&](int64_t r, int64_t c, int mi, int ni, int i) { z[r * s + c] = acc[mi][ni][i]; });
  }
}

}  // namespace r2m
