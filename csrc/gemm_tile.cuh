// A 64x64x16 shared-memory-tiled fp32 SIMT GEMM main loop (256 threads, 4x4 outputs per thread,
// double-buffered shared memory with a register prefetch of the next k-tile), parameterized by
// operand loaders so the sketch (A = τⱼ formed from θ₀ and θⱼ in the prologue) and the
// accumulation (A = L, B = Rᵀ) share it. Every product is an fp32 FMA: the accumulation needs
// ~1e-5 relative accuracy and the sketch of τ must not lose τ's low bits.
//
// Layout (simt_out in tile_map.h): thread t owns rows ty + 16·i and columns tx + 16·j (tx = t % 16,
// ty = t / 16, i, j < 4), so shared-memory reads of B are consecutive across a half warp and A reads
// are broadcasts, and the epilogue (simt_outputs) touches 16 consecutive columns per half warp.
#pragma once

#include "tile_io.cuh"

namespace r2m {

// Tile shapes and thread maps: tile_map.h (kTileM, GemmKTile, GemmNTile, simt_out).
struct GemmSmem {
  float a[2][kTileK][kTileM + kPad];
  float b[2][kTileK][kTileN + kPad];
};

// Operand tile of a K-contiguous source (τ as a TauMatrix, L or R as an F32Matrix): rows
// origin … +63, element (row, k) read at (row, k); stored transposed, smem[k][row].
template <class Src>
struct KMajorOperand {
  Src src;
  int64_t origin;
  __device__ __forceinline__ void load(int64_t k0, float (&v)[4]) const {
    const Coord s = GemmKTile::slot(threadIdx.x, 0);
    src.load(origin + s.row, k0 + s.col, v);
  }
  __device__ __forceinline__ void store(float (*sm)[kTileM + kPad], const float (&v)[4]) const {
    const Coord s = GemmKTile::slot(threadIdx.x, 0);
#pragma unroll
    for (int e = 0; e < 4; ++e) sm[s.col + e][s.row] = v[e];
  }
};

// Operand tile of an N-contiguous source (Ω as an F32Matrix): columns origin … +63, element
// (k, column) read at (k, column); stored as is (one 16-byte shared store).
template <class Src>
struct NMajorOperand {
  Src src;
  int64_t origin;
  __device__ __forceinline__ void load(int64_t k0, float (&v)[4]) const {
    const Coord s = GemmNTile::slot(threadIdx.x, 0);
    src.load(k0 + s.row, origin + s.col, v);
  }
  __device__ __forceinline__ void store(float (*sm)[kTileN + kPad], const float (&v)[4]) const {
    const Coord s = GemmNTile::slot(threadIdx.x, 0);
    *reinterpret_cast<float4*>(&sm[s.row][s.col]) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

// acc[i][j] = Σ_k A(simt_out(t, i, j).row, k) · B(k, simt_out(t, i, j).col) over the whole K extent.
template <class ALoad, class BLoad>
__device__ __forceinline__ void gemm_mainloop(const ALoad& A, const BLoad& B, int64_t k_total, GemmSmem& sm,
                                              float (&acc)[4][4]) {
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
      for (int i = 0; i < 4; ++i) a[i] = sm.a[cur][k][simt_out(threadIdx.x, i, 0).row];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sm.b[cur][k][simt_out(threadIdx.x, 0, j).col];
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
