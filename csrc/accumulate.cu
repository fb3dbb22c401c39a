// Pass 2's last step (DESIGN §3.4): the merged layer
//     out = θ₀ + Σⱼ aⱼ (θⱼ − θ₀) + L Rᵀ
// computed in fp32 (each difference formed before it is scaled, never Σ aⱼ θⱼ − (Σ aⱼ) θ₀, which
// cancels), cast once to the output dtype, each output element written once.
//
// combine kernel (no L Rᵀ; memory-bound): persistent grid-stride loop over 16-byte chunks, all
// N+1 loads of a chunk issued before the arithmetic, streaming stores of the cast result.
// accumulate_mma kernel (default): L Rᵀ on tensor cores in 3xTF32 (accumulate_mma.cuh, ~1e-6
// relative) with the linear combination of the weight tiles in its epilogue. accumulate_gemm kernel
// (R2M_CUDA_ACCUMULATE_MMA=0): the same on the 64x64x16 fp32 SIMT GEMM of gemm_tile.cuh.
#include "accumulate_mma.cuh"
#include "gemm_tile.cuh"

namespace r2m {

// Store V fp32 values as V elements of TO at p (aligned to V·sizeof(TO)); streaming stores.
template <typename TO, int V>
__device__ __forceinline__ void store_vec(TO* p, const float (&v)[V]) {
  constexpr int kWords = V * int(sizeof(TO)) / 4;
  uint32_t word[kWords];
#pragma unroll
  for (int k = 0; k < kWords; ++k) {
    if constexpr (sizeof(TO) == 4) {
      word[k] = __float_as_uint(v[k]);
    } else {
      TO lo = from_float<TO>(v[2 * k]), hi = from_float<TO>(v[2 * k + 1]);
      word[k] = uint32_t(*reinterpret_cast<const uint16_t*>(&lo)) |
                (uint32_t(*reinterpret_cast<const uint16_t*>(&hi)) << 16);
    }
  }
  uint32_t* q = reinterpret_cast<uint32_t*>(p);
#pragma unroll
  for (int k = 0; k + 4 <= kWords; k += 4)
    __stcs(reinterpret_cast<uint4*>(q + k), make_uint4(word[k], word[k + 1], word[k + 2], word[k + 3]));
  if constexpr (kWords % 4 == 2)
    __stcs(reinterpret_cast<uint2*>(q + kWords - 2), make_uint2(word[kWords - 2], word[kWords - 1]));
}

// One element: θ₀ + Σⱼ aⱼ (θⱼ − θ₀) in the order of the torch contract (base, then each term).
template <typename T>
__device__ __forceinline__ float combine_scalar(const WeightPtrs& w, const Coeffs& a, int n, int64_t r, int64_t c) {
  const float b = to_float(static_cast<const T*>(w.ptr[0])[r * w.stride[0] + c]);
  float x[kMaxTasks];
#pragma unroll
  for (int j = 0; j < kMaxTasks; ++j)
    x[j] = (j < n) ? to_float(static_cast<const T*>(w.ptr[j + 1])[r * w.stride[j + 1] + c]) : 0.f;
  float v = b;
#pragma unroll
  for (int j = 0; j < kMaxTasks; ++j)
    if (j < n) v = fmaf(a.a[j], x[j] - b, v);
  return v;
}

template <typename T, typename TO, bool VEC>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(WeightPtrs w, Coeffs a, int n, int64_t rows,
                                                                 int64_t cols, TO* __restrict__ out) {
  constexpr int V = VEC ? 16 / int(sizeof(T)) : 1;
  const int64_t chunks_per_row = (cols + V - 1) / V;
  const int64_t total = rows * chunks_per_row;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < total; q += step) {
    const Chunk ch = chunk_at(q, chunks_per_row, V);
    const int64_t r = ch.row, c = ch.col;
    bool done = false;
    if constexpr (VEC) {
     if (c + V <= cols) {
      RawVec<16> raw[kMaxTasks + 1];
#pragma unroll
      for (int j = 0; j <= kMaxTasks; ++j)  // every load in flight before the arithmetic
        if (j <= n) raw[j] = ld_stream<16>(static_cast<const T*>(w.ptr[j]) + r * w.stride[j] + c);
      float b[V], v[V];
      unpack_raw<T, 16>(raw[0], b);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = b[e];
#pragma unroll
      for (int j = 0; j < kMaxTasks; ++j) {
        if (j < n) {
          float x[V];
          unpack_raw<T, 16>(raw[j + 1], x);
#pragma unroll
          for (int e = 0; e < V; ++e) v[e] = fmaf(a.a[j], x[e] - b[e], v[e]);
        }
      }
      store_vec<TO, V>(out + r * cols + c, v);
      done = true;
     }
    }
    if (!done) {  // scalar variant, or the ragged tail of a row
      for (int64_t cc = c; cc < c + V && cc < cols; ++cc) out[r * cols + cc] = from_float<TO>(combine_scalar<T>(w, a, n, r, cc));
    }
  }
}

template <typename T, typename TO, bool LVEC>
__global__ void __launch_bounds__(kGemmThreads) accumulate_gemm_kernel(WeightPtrs w, Coeffs a, int n, int64_t rows,
                                                                      int64_t cols, const float* __restrict__ left,
                                                                      int64_t ld_left, const float* __restrict__ right,
                                                                      int64_t ld_right, int64_t k_total,
                                                                      TO* __restrict__ out) {
  __shared__ __align__(16) GemmSmem sm;
  const int64_t col0 = int64_t(blockIdx.x) * kTileN;
  const int64_t row_tiles = (rows + kTileM - 1) / kTileM;
  const KMajorOperand<F32Matrix<LVEC>> B{{right, ld_right, cols, k_total}, col0};
  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const int64_t row0 = rt * kTileM;
    const KMajorOperand<F32Matrix<LVEC>> A{{left, ld_left, rows, k_total}, row0};
    float acc[4][4];
    gemm_mainloop(A, B, k_total, sm, acc);
    simt_outputs(threadIdx.x, row0, col0, rows, cols, [&](int64_t r, int64_t c, int i, int j) {
      out[r * cols + c] = from_float<TO>(combine_scalar<T>(w, a, n, r, c) + acc[i][j]);
    });
  }
}

template <typename T, typename TO, bool LVEC>
__global__ void __launch_bounds__(kAccThreads) accumulate_mma_kernel(WeightPtrs w, Coeffs a, int n, int64_t rows,
                                                                    int64_t cols, const float* __restrict__ left,
                                                                    int64_t ld_left, const float* __restrict__ right,
                                                                    int64_t ld_right, int64_t k_total,
                                                                    TO* __restrict__ out) {
  __shared__ __align__(16) AccSmem sm;
  const int64_t col0 = int64_t(blockIdx.x) * kAccN;
  const int64_t row_tiles = (rows + kAccM - 1) / kAccM;
  const int lane = threadIdx.x & 31;
  const Coord wo = mma::warp_origin<kAccWarpsN, kAccWarpM, kAccWarpN>(threadIdx.x >> 5);
  const F32Matrix<LVEC> L{left, ld_left, rows, k_total}, R{right, ld_right, cols, k_total};
  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const int64_t row0 = rt * kAccM;
    float acc[kAccMI][kAccNI][4];
    lrt_mma_mainloop<LVEC>(L, R, row0, col0, sm, acc);
    mma::outputs<kAccMI, kAccNI>(lane, row0 + wo.row, col0 + wo.col, rows, cols,
                                 [&](int64_t r, int64_t c, int mi, int ni, int i) {
                                   out[r * cols + c] = from_float<TO>(combine_scalar<T>(w, a, n, r, c) + acc[mi][ni][i]);
                                 });
  }
}

void accumulate(const std::vector<uintptr_t>& weights, const std::vector<int64_t>& strides,
                const std::vector<double>& coeffs, int64_t rows, int64_t cols, int dtype, uintptr_t left,
                int64_t left_stride, uintptr_t right, int64_t right_stride, int64_t k, uintptr_t out, int out_dtype,
                int grid, bool use_mma, int device, uintptr_t stream_handle) {
  const bool gemm = k > 0;
  const char* kname = gemm ? (use_mma ? "accumulate_mma_kernel" : "accumulate_gemm_kernel") : "combine_kernel";
  // θ₀ alone (every coefficient zero) is allowed: the wrapper drops zero terms.
  const WeightPtrs w = make_ptrs(weights, strides, rows, cols, kname, 0);
  const int n = int(weights.size()) - 1;
  if (coeffs.size() != size_t(n)) fail(kname, "one coefficient per specialist expected");
  Coeffs a{};
  for (int j = 0; j < n; ++j) a.a[j] = float(coeffs[j]);
  if (k < 0) fail(kname, "negative shape");
  if (out == 0) fail(kname, "out is a null pointer");
  if (rows == 0 || cols == 0) return;
  const size_t esize = dtype_size(dtype, kname);
  const size_t osize = dtype_size(out_dtype, kname);
  if (!aligned(out, osize)) fail(kname, "out is not aligned to its element size");
  if (gemm) {  // every argument checked before the device is touched
    if (left == 0 || right == 0) fail(kname, "left/right is a null pointer");
    if (!aligned(left, 4) || !aligned(right, 4)) fail(kname, "left/right must be 4-byte aligned");
    check_stride("left", left_stride, rows, k, kname);
    check_stride("right", right_stride, cols, k, kname);
  } else if (grid < 1 || grid > (1 << 20)) {
    fail(kname, "grid must be in [1, 2^20], got " + std::to_string(grid));
  }
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  set_device(device, kname);
  if (gemm) {
    const bool lvec = aligned(left, 16) && aligned(right, 16) && left_stride % 4 == 0 && right_stride % 4 == 0;
    const int64_t tile_m = use_mma ? kAccM : kTileM, tile_n = use_mma ? kAccN : kTileN;
    const int64_t row_tiles = (rows + tile_m - 1) / tile_m;
    const int64_t col_tiles = (cols + tile_n - 1) / tile_n;
    if (col_tiles > 0x7fffffff) fail(kname, "too many column tiles");
    dim3 g(unsigned(col_tiles), unsigned(row_tiles < 65535 ? row_tiles : 65535));
    const float* L = reinterpret_cast<const float*>(left);
    const float* R = reinterpret_cast<const float*>(right);
    if (use_mma) {
      R2M_DISPATCH_DTYPE(dtype, T, kname, {
        R2M_DISPATCH_DTYPE(out_dtype, TO, kname, {
          R2M_BOOL_SWITCH(lvec, LVEC, {
            accumulate_mma_kernel<T, TO, LVEC><<<g, kAccThreads, 0, stream>>>(
                w, a, n, rows, cols, L, left_stride, R, right_stride, k, reinterpret_cast<TO*>(out));
          });
        });
      });
    } else {
      R2M_DISPATCH_DTYPE(dtype, T, kname, {
        R2M_DISPATCH_DTYPE(out_dtype, TO, kname, {
          R2M_BOOL_SWITCH(lvec, LVEC, {
            accumulate_gemm_kernel<T, TO, LVEC><<<g, kGemmThreads, 0, stream>>>(
                w, a, n, rows, cols, L, left_stride, R, right_stride, k, reinterpret_cast<TO*>(out));
          });
        });
      });
    }
  } else {
    const int elems = int(16 / esize);
    // Output chunks are aligned when the output is aligned and rows start at multiples of V.
    const bool vec = vector_ok(weights, strides, rows, esize, elems) && aligned(out, osize * elems) &&
                     (rows == 1 || cols % elems == 0);
    R2M_DISPATCH_DTYPE(dtype, T, kname, {
      R2M_DISPATCH_DTYPE(out_dtype, TO, kname, {
        R2M_BOOL_SWITCH(vec, VEC, {
          combine_kernel<T, TO, VEC><<<grid, kCombineThreads, 0, stream>>>(w, a, n, rows, cols, reinterpret_cast<TO*>(out));
        });
      });
    });
  }
  check_launch(kname, stream);
}

}  // namespace r2m
