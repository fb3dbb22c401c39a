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

#include "common.cuh"

namespace r2m {

constexpr int kAccM = 128, kAccN = 64, kAccK = 16, kAccThreads = 256;
constexpr int kAccLd = kAccK + 4;

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

// Loads 4 consecutive k of row r of a K-contiguous fp32 matrix (zeros outside rows x k_total).
template <bool VEC>
__device__ __forceinline__ float4 load_k4(const float* p, int64_t ld, int64_t r, int64_t rows, int64_t k,
                                          int64_t k_total) {
  if (VEC && r < rows && k + 3 < k_total) return __ldg(reinterpret_cast<const float4*>(p + r * ld + k));
  float v[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) v[e] = (r < rows && k + e < k_total) ? __ldg(p + r * ld + k + e) : 0.f;
  return make_float4(v[0], v[1], v[2], v[3]);
}

// acc (per warp 32x32) = L[row0:row0+128] · R[col0:col0+64]ᵀ over the whole K.
template <bool VEC>
__device__ __forceinline__ void lrt_mma_mainloop(const float* left, int64_t ld_left, const float* right,
                                                 int64_t ld_right, int64_t rows, int64_t cols, int64_t k_total,
                                                 int64_t row0, int64_t col0, AccSmem& sm, float (&acc)[2][4][4]) {
  const int t = threadIdx.x;
  const int lane = t & 31, warp = t >> 5;
  const int wm = warp >> 1, wn = warp & 1;
  const int grp = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
  const int64_t k_tiles = (k_total + kAccK - 1) / kAccK;
  const int lr = t >> 2, lk = (t & 3) * 4;  // this thread's load slot: row lr (+64), k lk..lk+3
  float4 ra[2], rb;
  auto load = [&](int64_t k0) {
    ra[0] = load_k4<VEC>(left, ld_left, row0 + lr, rows, k0 + lk, k_total);
    ra[1] = load_k4<VEC>(left, ld_left, row0 + lr + 64, rows, k0 + lk, k_total);
    rb = load_k4<VEC>(right, ld_right, col0 + lr, cols, k0 + lk, k_total);
  };
  auto store = [&](int buf) {
    *reinterpret_cast<float4*>(&sm.a[buf][lr][lk]) = ra[0];
    *reinterpret_cast<float4*>(&sm.a[buf][lr + 64][lk]) = ra[1];
    *reinterpret_cast<float4*>(&sm.b[buf][lr][lk]) = rb;
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
      uint32_t ab[2][4], as[2][4], bb[4][2], bs[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int r = wm * 32 + mi * 16 + grp;
        split_tf32(sm.a[cur][r][kk + tig], ab[mi][0], as[mi][0]);
        split_tf32(sm.a[cur][r + 8][kk + tig], ab[mi][1], as[mi][1]);
        split_tf32(sm.a[cur][r][kk + tig + 4], ab[mi][2], as[mi][2]);
        split_tf32(sm.a[cur][r + 8][kk + tig + 4], ab[mi][3], as[mi][3]);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int c = wn * 32 + ni * 8 + grp;
        split_tf32(sm.b[cur][c][kk + tig], bb[ni][0], bs[ni][0]);
        split_tf32(sm.b[cur][c][kk + tig + 4], bb[ni][1], bs[ni][1]);
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {  // small terms first, then the big product
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
