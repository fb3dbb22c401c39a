// Index maps of the r2m_fast CUDA kernels, in one place and as plain C++: which tile element each
// thread loads, which elements each lane holds in the mma.sync fragments, which outputs each thread
// writes, how a persistent grid walks a matrix in vector chunks, and the masks of ragged edges.
//
// The kernels index only through these functions, and they are __host__ __device__ constexpr so
// that csrc/tests/tile_map_test.cpp (built with the host compiler by tests/test_cuda_host.py, no GPU)
// can check them: the fragment maps against the PTX ISA's tables ("Matrix Fragments for
// mma.m16n8k16 / mma.m16n8k8"), every map for exactly-once coverage, and each tile's product,
// emulated lane by lane through these maps, against a plain triple loop on ragged shapes.
//
// No CUDA header here: this file must compile with g++ alone.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define R2M_HD __host__ __device__ __forceinline__
#define R2M_UNROLL _Pragma("unroll")
#else
#define R2M_HD inline
#define R2M_UNROLL
#endif

namespace r2m {

// A (row, column) position inside a tile; for a B operand or a k-major tile, row is k.
struct Coord {
  int row, col;
};

// ---------------------------------------------------------------------------- global → shared tiles
// A kRows x kWidth tile, contiguous along kWidth, loaded by kThreads threads in vectors of four
// consecutive elements: pass p (< kPasses) of thread t covers row t / (kWidth/4) + p·kRowsPerPass,
// columns 4·(t % (kWidth/4)) … +3. Every tile loader of the kernels is one instance:
//   gemm_tile.cuh   τ or L/R tile  64 x 16 (rows x k)       Vec4Tile<64, 16, 256>   1 pass
//                   Ω tile         16 x 64 (k x columns)    Vec4Tile<16, 64, 256>   1 pass
//   sketch_mma.cuh  τ tile        128 x 32 (rows x k)       Vec4Tile<128, 32, 256>  4 passes
//                   Ω tile         32 x 128 (k x columns)   Vec4Tile<32, 128, 256>  4 passes
//   accumulate_mma  L tile        128 x 16, R tile 64 x 16  Vec4Tile<128|64, 16, 256> 2|1 passes
template <int kRows, int kWidth, int kThreads>
struct Vec4Tile {
  static constexpr int kPerRow = kWidth / 4;
  static constexpr int kRowsPerPass = kThreads / kPerRow;
  static constexpr int kPasses = kRows / kRowsPerPass;
  static_assert(kWidth % 4 == 0 && kThreads % kPerRow == 0 && kRows % kRowsPerPass == 0,
                "a Vec4Tile must be covered by whole passes of whole vectors");
  // Unsigned division: thread indices are never negative, and this keeps it a shift.
  R2M_HD static constexpr Coord slot(int t, int pass) {
    return {int(unsigned(t) / unsigned(kPerRow)) + pass * kRowsPerPass, int(unsigned(t) % unsigned(kPerRow)) * 4};
  }
};

// ---------------------------------------------------------------------------- ragged-edge masks
// Element (r, c) of a rows x cols matrix exists: loads outside read 0, stores outside are skipped.
R2M_HD constexpr bool inside(int64_t r, int64_t rows, int64_t c, int64_t cols) { return r < rows && c < cols; }

// The four elements (r, c … c+3) all exist, so one vector load may fetch them (when the variant's
// pointers and strides are aligned; otherwise, or at an edge, each element is loaded alone).
R2M_HD constexpr bool inside4(int64_t r, int64_t rows, int64_t c, int64_t cols) { return r < rows && c + 3 < cols; }

// The masked load of (r, c … c+3) that every tile loader does: vec4(v) fetches all four at once
// where VEC allows it and all four exist; otherwise elem(e) fetches element c+e where it exists,
// and the others are 0 (a zero row or column adds nothing to a product).
template <bool VEC, class Vec4, class Elem>
R2M_HD void load4_masked(int64_t r, int64_t rows, int64_t c, int64_t cols, float (&v)[4], Vec4&& vec4, Elem&& elem) {
  if (VEC && inside4(r, rows, c, cols)) {
    vec4(v);
  } else {
    R2M_UNROLL
    for (int e = 0; e < 4; ++e) v[e] = inside(r, rows, c + e, cols) ? elem(e) : 0.f;
  }
}

// ---------------------------------------------------------------------------- SIMT 64x64 outputs
// The 64x64x16 fp32 GEMM (gemm_tile.cuh): thread t owns rows ty + 16·i and columns tx + 16·j,
// i, j < 4, with tx = t % 16, ty = t / 16 (B reads consecutive across a half warp, A reads broadcast).
R2M_HD constexpr Coord simt_out(int t, int i, int j) {
  return {int(unsigned(t) >> 4) + 16 * i, int(unsigned(t) & 15u) + 16 * j};
}

// The SIMT epilogue's walk: store(r, c, i, j) for each of thread t's outputs (acc[i][j]) of the
// tile at (row0, col0) that lies inside rows x cols.
template <class Store>
R2M_HD void simt_outputs(int t, int64_t row0, int64_t col0, int64_t rows, int64_t cols, Store&& store) {
  R2M_UNROLL
  for (int i = 0; i < 4; ++i) {
    const int64_t r = row0 + simt_out(t, i, 0).row;
    if (r >= rows) continue;
    R2M_UNROLL
    for (int j = 0; j < 4; ++j) {
      const int64_t c = col0 + simt_out(t, 0, j).col;
      if (c < cols) store(r, c, i, j);
    }
  }
}

// ---------------------------------------------------------------------------- mma.sync fragments
// PTX ISA names: groupID = lane >> 2, threadID_in_group = lane % 4. Each function gives the tile
// position of one fragment register (for 16-bit types, of its low half; the high half is the next
// column of A or the next k of B, as the tests check against the ISA's element numbering).
namespace mma {

R2M_HD constexpr int group(int lane) { return lane >> 2; }
R2M_HD constexpr int thread_in_group(int lane) { return lane & 3; }

// m16n8k16, .bf16 A (16 x 16, row-major): registers 0..3 hold a0a1, a2a3, a4a5, a6a7.
R2M_HD constexpr Coord bf16_a(int lane, int reg) {
  return {group(lane) + 8 * (reg & 1), thread_in_group(lane) * 2 + 8 * (reg >> 1)};
}
// m16n8k16, .bf16 B (16 x 8, k x n, "col" = k contiguous per n): registers 0..1 hold b0b1, b2b3.
R2M_HD constexpr Coord bf16_b(int lane, int reg) { return {thread_in_group(lane) * 2 + 8 * reg, group(lane)}; }

// m16n8k8, .tf32 A (16 x 8): registers 0..3 hold a0..a3.
R2M_HD constexpr Coord tf32_a(int lane, int reg) {
  return {group(lane) + 8 * (reg & 1), thread_in_group(lane) + 4 * (reg >> 1)};
}
// m16n8k8, .tf32 B (8 x 8, k x n): registers 0..1 hold b0, b1.
R2M_HD constexpr Coord tf32_b(int lane, int reg) { return {thread_in_group(lane) + 4 * reg, group(lane)}; }

// .f32 accumulator C/D (16 x 8) of both shapes: c0..c3.
R2M_HD constexpr Coord acc(int lane, int i) {
  return {group(lane) + 8 * (i >> 1), thread_in_group(lane) * 2 + (i & 1)};
}

// Origin of warp w's kWarpM x kWarpN sub-tile when a block's warps form a grid kWarpsN wide.
template <int kWarpsN, int kWarpM, int kWarpN>
R2M_HD constexpr Coord warp_origin(int warp) {
  return {int(unsigned(warp) / unsigned(kWarpsN)) * kWarpM, int(unsigned(warp) % unsigned(kWarpsN)) * kWarpN};
}

// The mma epilogue's walk over a warp's MI x NI grid of m16n8 accumulators at (row0, col0):
// store(r, c, mi, ni, i) for each element acc[mi][ni][i] of this lane that lies inside rows x cols.
template <int MI, int NI, class Store>
R2M_HD void outputs(int lane, int64_t row0, int64_t col0, int64_t rows, int64_t cols, Store&& store) {
  R2M_UNROLL
  for (int mi = 0; mi < MI; ++mi) {
    R2M_UNROLL
    for (int half = 0; half < 2; ++half) {  // c0, c1 on row group; c2, c3 on row group + 8
      const int64_t r = row0 + mi * 16 + acc(lane, 2 * half).row;
      if (r >= rows) continue;
      R2M_UNROLL
      for (int ni = 0; ni < NI; ++ni) {
        R2M_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int64_t c = col0 + ni * 8 + acc(lane, 2 * half + e).col;
          if (c < cols) store(r, c, mi, ni, 2 * half + e);
        }
      }
    }
  }
}

}  // namespace mma

// ---------------------------------------------------------------------------- persistent grids
// Chunk q of a rows x cols matrix walked in chunks of v elements along each row (the last chunk of
// a row may be short): its row and first column.
struct Chunk {
  int64_t row, col;
};
R2M_HD constexpr Chunk chunk_at(int64_t q, int64_t chunks_per_row, int v) {
  const int64_t row = q / chunks_per_row;  // one 64-bit division (it is expanded before CSE could merge two)
  return {row, (q - row * chunks_per_row) * v};
}

// Index of the Gram pair (i, j), i <= j < NMAX, in the packed upper triangle (row by row).
template <int NMAX>
R2M_HD constexpr int pair_index(int i, int j) {
  return i * NMAX - i * (i - 1) / 2 + (j - i);
}

// ---------------------------------------------------------------------------- the kernels' tiles
// 64x64x16 fp32 SIMT GEMM (gemm_tile.cuh: sketch with an fp32 Ω, accumulate without tensor cores).
constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kGemmThreads = 256;
constexpr int kPad = 4;  // keeps shared rows 16-byte aligned and spreads the transposed stores over banks
using GemmKTile = Vec4Tile<kTileM, kTileK, kGemmThreads>;  // 64 rows x 16 k: τ, L, or R (for Rᵀ)
using GemmNTile = Vec4Tile<kTileK, kTileN, kGemmThreads>;  // 16 k x 64 columns: Ω
static_assert(kTileM == kTileN && GemmKTile::kPasses == 1 && GemmNTile::kPasses == 1, "one vector per thread");

// bf16 tensor-core sketch (sketch_mma.cuh): 128 rows x 128 sketch columns x 32 k, 8 warps in a
// 4 x 2 grid of 32 x 64 warp tiles (2 x 8 m16n8k16 tiles each).
constexpr int kMmaM = 128, kMmaN = 128, kMmaK = 32, kMmaThreads = 256;
constexpr int kMmaLd = kMmaK + 8;  // bf16 elements per shared row (20 words: conflict-free fragment loads)
constexpr int kMmaWarpsN = 2, kMmaWarpM = 32, kMmaWarpN = 64;
using MmaATile = Vec4Tile<kMmaM, kMmaK, kMmaThreads>;  // τ: 4 passes
using MmaBTile = Vec4Tile<kMmaK, kMmaN, kMmaThreads>;  // Ω: 4 passes
static_assert(MmaATile::kPasses == 4 && MmaBTile::kPasses == 4, "MmaLoader holds four vectors of each");

// 3xTF32 L Rᵀ (accumulate_mma.cuh): 128 rows of L x 64 rows of R x 16 k, 8 warps in a 4 x 2 grid
// of 32 x 32 warp tiles (2 x 4 m16n8k8 tiles each).
constexpr int kAccM = 128, kAccN = 64, kAccK = 16, kAccThreads = 256;
constexpr int kAccLd = kAccK + 4;  // fp32 per shared row (20 words: conflict-free fragment loads)
constexpr int kAccWarpsN = 2, kAccWarpM = 32, kAccWarpN = 32;
using AccLTile = Vec4Tile<kAccM, kAccK, kAccThreads>;  // 2 passes
using AccRTile = Vec4Tile<kAccN, kAccK, kAccThreads>;  // 1 pass
static_assert(AccLTile::kPasses == 2 && AccRTile::kPasses == 1, "lrt_mma_mainloop holds ra[2], rb");

// Memory-bound persistent kernels (gram_sketch.cu, accumulate.cu).
constexpr int kGramThreads = 256, kCombineThreads = 256;
template <int NMAX>
struct GramCfg {
  static constexpr int kPairs = NMAX * (NMAX + 1) / 2;
  static constexpr int kUnroll = NMAX <= 4 ? 2 : 1;  // chunks per iteration: keep ≥ 6 loads in flight
  // Bytes per load: 16, except at NMAX = 16 where 17 raw 16-byte vectors plus 136 accumulators
  // exceed 255 registers (ptxas spilled); 17 8-byte loads still keep 136 bytes per thread in flight.
  static constexpr int kVecBytes = NMAX >= 16 ? 8 : 16;
};

}  // namespace r2m
