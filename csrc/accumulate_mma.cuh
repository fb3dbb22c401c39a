// L Rᵀ of the accumulation on tensor cores with 3xTF32 (fp32-class accuracy): each fp32 operand x
// is split into big = tf32(x) and small = tf32(x − big), and acc += a_s·b_b + a_b·b_s + a_b·b_b on
// mma.sync.m16n8k8.tf32 with fp32 accumulation (the a_s·b_s term, ~2⁻²² relative, is dropped),
// about 1e-6 relative: inside the contract's ~1e-5 (plain TF32 would be ~1e-3).
//
// Block tile 128 (rows of L) x 64 (rows of R) x 16 (K), 256 threads = 8 warps in a 4x2 grid, each
// warp 32x32 = 2x4 mma tiles. L and R tiles sit in shared memory as fp32 with rows padded to 20
// floats, so the fragment loads (8 rows x 4 consecutive words per instruction) hit 32 distinct
// banks; global loads are 16-byte vectors (scalar, masked, at ragged or misaligned edges); the next
// k-tile is loaded to registers while the current one is multiplied.
#pragma once

#include "tile_io.cuh"

namespace r2m {

// Tile shapes, thread and fragment maps: tile_map.h (kAccM…, AccLTile, AccRTile, mma::tf32_a/b/acc).

struct AccSmem {
  float a[2][kAccM][kAccLd];
  float b[2][kAccN][kAccLd];
};

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void split_tf32(float x, uint32_t& big, uint32_t& small) {
  big = to_tf32(x);
  small = to_tf32(x - __uint_as_float(big));
}

__device__ __forceinline__ void mma_tf32_1688(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// m16n8k8 tiles per warp tile: 2 x 4.
constexpr int kAccMI = kAccWarpM / 16, kAccNI = kAccWarpN / 8;

// acc (per warp 32x32) = L[row0:row0+128] · R[col0:col0+64]ᵀ over the whole K.
template <bool VEC>
__device__ __forceinline__ void lrt_mma_mainloop(const F32Matrix<VEC>& L, const F32Matrix<VEC>& R, int64_t row0,
                                                 int64_t col0, AccSmem& sm, float (&acc)[kAccMI][kAccNI][4]) {
  const int lane = threadIdx.x & 31;
  const Coord wo = mma::warp_origin<kAccWarpsN, kAccWarpM, kAccWarpN>(threadIdx.x >> 5);
#pragma unroll
  for (int mi = 0; mi < kAccMI; ++mi)
#pragma unroll
    for (int ni = 0; ni < kAccNI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
  const int64_t k_total = L.cols;
  const int64_t k_tiles = (k_total + kAccK - 1) / kAccK;
  float ra[AccLTile::kPasses][4], rb[4];
  auto load = [&](int64_t k0) {
#pragma unroll
    for (int g = 0; g < AccLTile::kPasses; ++g) {
      const Coord a = AccLTile::slot(threadIdx.x, g);
      L.load(row0 + a.row, k0 + a.col, ra[g]);
    }
    const Coord b = AccRTile::slot(threadIdx.x, 0);
    R.load(col0 + b.row, k0 + b.col, rb);
  };
  auto store = [&](int buf) {
#pragma unroll
    for (int g = 0; g < AccLTile::kPasses; ++g) {
      const Coord a = AccLTile::slot(threadIdx.x, g);
      *reinterpret_cast<float4*>(&sm.a[buf][a.row][a.col]) = make_float4(ra[g][0], ra[g][1], ra[g][2], ra[g][3]);
    }
    const Coord b = AccRTile::slot(threadIdx.x, 0);
    *reinterpret_cast<float4*>(&sm.b[buf][b.row][b.col]) = make_float4(rb[0], rb[1], rb[2], rb[3]);
  };
  load(0);
  store(0);
  __syncthreads();
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    const int cur = int(kt & 1);
    const bool more = kt + 1 < k_tiles;
    if (more) load((kt + 1) * kAccK);
#pragma unroll
    for (int kk = 0; kk < kAccK; kk += 8) {
      uint32_t ab[kAccMI][4], as[kAccMI][4], bb[kAccNI][2], bs[kAccNI][2];
#pragma unroll
      for (int mi = 0; mi < kAccMI; ++mi)
#pragma unroll
        for (int reg = 0; reg < 4; ++reg) {
          const Coord a = mma::tf32_a(lane, reg);
          split_tf32(sm.a[cur][wo.row + mi * 16 + a.row][kk + a.col], ab[mi][reg], as[mi][reg]);
        }
#pragma unroll
      for (int ni = 0; ni < kAccNI; ++ni)
#pragma unroll
        for (int reg = 0; reg < 2; ++reg) {
          const Coord b = mma::tf32_b(lane, reg);
          split_tf32(sm.b[cur][wo.col + ni * 8 + b.col][kk + b.row], bb[ni][reg], bs[ni][reg]);
        }
#pragma unroll
      for (int mi = 0; mi < kAccMI; ++mi)
#pragma unroll
        for (int ni = 0; ni < kAccNI; ++ni) {  // small terms first, then the big product
          mma_tf32_1688(acc[mi][ni], as[mi], bb[ni]);
          mma_tf32_1688(acc[mi][ni], ab[mi], bs[ni]);
          mma_tf32_1688(acc[mi][ni], ab[mi], bb[ni]);
        }
    }
    if (more) store(cur ^ 1);
    __syncthreads();
  }
}

}  // namespace r2m
