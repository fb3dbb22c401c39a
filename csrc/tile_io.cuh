// The global-memory operands of the tiled kernels, as the two sources every tile loader reads:
// an fp32 matrix (Ω, L, R) and a task vector τ = θ − θ₀ formed in fp32 from two weight matrices
// (never stored; never a product of raw θ, DESIGN §4). Each reads the four elements (r, c … c+3)
// through load4_masked (tile_map.h): one vector load where the variant is aligned (VEC) and all four
// exist, element by element with zeros outside the matrix otherwise. Which thread reads which four,
// and where they go in shared memory, is the kernel's Vec4Tile (tile_map.h).
#pragma once

#include "common.cuh"
#include "tile_map.h"

namespace r2m {

// Row-major fp32 matrix, row stride ld (elements). VEC: p and ld allow 16-byte loads.
template <bool VEC>
struct F32Matrix {
  const float* p;
  int64_t ld, rows, cols;
  __device__ __forceinline__ void load(int64_t r, int64_t c, float (&v)[4]) const {
    load4_masked<VEC>(
        r, rows, c, cols, v, [&](float (&x)[4]) { load4(p + r * ld + c, x); },
        [&](int e) { return __ldg(p + r * ld + c + e); });
  }
};

// τ = θ − θ₀ of two row-major T matrices (row strides ld_base, ld_w), in fp32. round_bf16: then
// round τ to bf16 (the product then runs at a bf16 Ω's precision, as the torch contract does; the
// products and sums stay fp32). VEC: both pointers and strides allow 4-element vector loads.
template <typename T, bool VEC>
struct TauMatrix {
  const T* base;
  const T* w;
  int64_t ld_base, ld_w, rows, cols;
  bool round_bf16;
  __device__ __forceinline__ void load(int64_t r, int64_t c, float (&v)[4]) const {
    load4_masked<VEC>(
        r, rows, c, cols, v,
        [&](float (&y)[4]) {
          float b[4];
          load4(base + r * ld_base + c, b);
          load4(w + r * ld_w + c, y);
#pragma unroll
          for (int e = 0; e < 4; ++e) y[e] -= b[e];
        },
        [&](int e) { return to_float(w[r * ld_w + c + e]) - to_float(base[r * ld_base + c + e]); });
    if (round_bf16) {
#pragma unroll
      for (int e = 0; e < 4; ++e) v[e] = __bfloat162float(__float2bfloat16_rn(v[e]));
    }
  }
};

}  // namespace r2m
