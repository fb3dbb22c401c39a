// Pass 1 of the fast path (DESIGN §3.1): the layer's Gram Gᵢⱼ = ⟨τᵢ, τⱼ⟩ and the sketches
// Zⱼ = τⱼ Ω, with τⱼ = θⱼ − θ₀ formed in fp32 registers from the raw weights (never stored, and
// never a product of raw θ: θ₀ dominates and would cancel τ's low bits, DESIGN §4).
//
// gram kernel (memory-bound): a persistent grid-stride loop over 16-byte chunks of the (rows, cols)
// matrices; each thread loads the chunk of all N+1 weights (N+1 independent 16-byte loads in
// flight, two chunks per iteration when N ≤ 4), forms τ in fp32 and accumulates the upper triangle
// of the Gram in fp32 registers. The block reduces it in fp64 (warp shuffles, then shared memory)
// and writes one fp64 N×N partial per block; the host sums the partials in fp64, so the result is
// deterministic (no atomics). N is a runtime value ≤ NMAX ∈ {2, 4, 8, 16}: loops are unrolled to
// NMAX with the accumulators in registers and the j ≥ N terms predicated off.
//
// sketch kernel: the 64x64x16 tiled fp32 GEMM of gemm_tile.cuh with τⱼ formed in the A prologue
// (fp32 Ω: the contract's fp32 product). sketch_mma kernel (sketch_mma.cuh): bf16 tensor cores for
// a bf16 Ω. In both, blockIdx.x enumerates (task, column tile) with the task fastest, so blocks
// that run together share the θ₀ row tile through L2.
#include "gemm_tile.cuh"
#include "sketch_mma.cuh"

namespace r2m {

template <typename T, int NMAX, bool VEC>
__global__ void __launch_bounds__(kGramThreads) gram_partials_kernel(WeightPtrs w, int n, int64_t rows,
                                                                    int64_t cols, double* __restrict__ partial) {
  constexpr int VB = GramCfg<NMAX>::kVecBytes;
  constexpr int V = VEC ? VB / int(sizeof(T)) : 1;
  constexpr int U = GramCfg<NMAX>::kUnroll;
  constexpr int P = GramCfg<NMAX>::kPairs;
  float acc[P];
#pragma unroll
  for (int p = 0; p < P; ++p) acc[p] = 0.f;

  const int64_t chunks_per_row = (cols + V - 1) / V;
  const int64_t total = rows * chunks_per_row;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;

  // τ of one element for every task, then its outer-product contribution.
  auto add_element = [&](const float (&tau)[NMAX]) {
#pragma unroll
    for (int i = 0; i < NMAX; ++i)
#pragma unroll
      for (int j = i; j < NMAX; ++j) acc[pair_index<NMAX>(i, j)] = fmaf(tau[i], tau[j], acc[pair_index<NMAX>(i, j)]);
  };

  for (int64_t q0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q0 < total; q0 += step * U) {
    if constexpr (VEC) {
      RawVec<VB> raw[U][NMAX + 1];
      bool full[U];
      int64_t rr[U], cc[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t q = q0 + u * step;
        const Chunk ch = chunk_at(q, chunks_per_row, V);
        rr[u] = ch.row;
        cc[u] = ch.col;
        full[u] = q < total && cc[u] + V <= cols;
#pragma unroll
        for (int j = 0; j <= NMAX; ++j) {
          raw[u][j] = raw_zero<VB>();
          if (full[u] && j <= n)
            raw[u][j] = ld_stream<VB>(static_cast<const T*>(w.ptr[j]) + rr[u] * w.stride[j] + cc[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t q = q0 + u * step;
        if (full[u]) {
#pragma unroll
          for (int e = 0; e < V; ++e) {  // unpack one element at a time: keeps registers for acc
            const float b = raw_elem<T, VB>(raw[u][0], e);
            float tau[NMAX];
#pragma unroll
            for (int j = 0; j < NMAX; ++j) tau[j] = (j < n) ? raw_elem<T, VB>(raw[u][j + 1], e) - b : 0.f;
            add_element(tau);
          }
        } else if (q < total) {  // ragged tail of a row: scalar loads
          for (int64_t c = cc[u]; c < cols; ++c) {
            const float b = to_float(static_cast<const T*>(w.ptr[0])[rr[u] * w.stride[0] + c]);
            float tau[NMAX];
#pragma unroll
            for (int j = 0; j < NMAX; ++j)
              tau[j] = (j < n) ? to_float(static_cast<const T*>(w.ptr[j + 1])[rr[u] * w.stride[j + 1] + c]) - b : 0.f;
            add_element(tau);
          }
        }
      }
    } else {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t q = q0 + u * step;
        if (q < total) {
          const Chunk ch = chunk_at(q, chunks_per_row, 1);  // V = 1: chunks_per_row = cols
          const float b = to_float(static_cast<const T*>(w.ptr[0])[ch.row * w.stride[0] + ch.col]);
          float tau[NMAX];
#pragma unroll
          for (int j = 0; j < NMAX; ++j)
            tau[j] = (j < n) ? to_float(static_cast<const T*>(w.ptr[j + 1])[ch.row * w.stride[j + 1] + ch.col]) - b : 0.f;
          add_element(tau);
        }
      }
    }
  }

  // Block reduction in fp64: warp shuffles, then one slot per warp in shared memory.
  constexpr int kWarps = kGramThreads / 32;
  __shared__ double red[kWarps][P];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    double v = acc[p];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) red[warp][p] = v;
  }
  __syncthreads();
  double* out = partial + int64_t(blockIdx.x) * n * n;
  for (int t = threadIdx.x; t < n * n; t += blockDim.x) {
    const int i = t / n, j = t - (t / n) * n;
    const int a = i < j ? i : j, b = i < j ? j : i;
    const int p = pair_index<NMAX>(a, b);
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) s += red[k][p];
    out[t] = s;
  }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kGemmThreads) sketch_kernel(WeightPtrs w, int n, int64_t rows, int64_t cols,
                                                             const float* __restrict__ omega, int64_t omega_ld,
                                                             int64_t s, float* __restrict__ out, bool omega_vec,
                                                             bool round_bf16) {
  __shared__ __align__(16) GemmSmem sm;
  const int task = blockIdx.x % n;
  const int64_t col0 = int64_t(blockIdx.x / n) * kTileN;
  const int64_t row_tiles = (rows + kTileM - 1) / kTileM;
  float* z = out + int64_t(task) * rows * s;
  const TauMatrix<T, VEC> tau{static_cast<const T*>(w.ptr[0]), static_cast<const T*>(w.ptr[task + 1]), w.stride[0],
                              w.stride[task + 1], rows, cols, round_bf16};
  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const int64_t row0 = rt * kTileM;
    const KMajorOperand<TauMatrix<T, VEC>> A{tau, row0};
    float acc[4][4];
    if (omega_vec) {
      gemm_mainloop(A, NMajorOperand<F32Matrix<true>>{{omega, omega_ld, cols, s}, col0}, cols, sm, acc);
    } else {
      gemm_mainloop(A, NMajorOperand<F32Matrix<false>>{{omega, omega_ld, cols, s}, col0}, cols, sm, acc);
    }
    simt_outputs(threadIdx.x, row0, col0, rows, s, [&](int64_t r, int64_t c, int i, int j) { z[r * s + c] = acc[i][j]; });
  }
}

int device_count(std::string* error) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    if (error) *error = std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
    cudaGetLastError();  // do not leave the error sticky for the next launch check
    return 0;
  }
  if (count == 0 && error) *error = "cudaGetDeviceCount reports 0 devices";
  return count;
}

int runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) cudaGetLastError();
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) cudaGetLastError();
  return v;
}

void gram_partials(const std::vector<uintptr_t>& weights, const std::vector<int64_t>& strides, int64_t rows,
                   int64_t cols, int dtype, uintptr_t partial, int grid, int device, uintptr_t stream_handle) {
  const char* kname = "gram_partials_kernel";
  WeightPtrs w = make_ptrs(weights, strides, rows, cols, kname);
  const int n = int(weights.size()) - 1;
  if (grid < 1 || grid > (1 << 20)) fail(kname, "grid must be in [1, 2^20], got " + std::to_string(grid));
  if (partial == 0) fail(kname, "partial is a null pointer");
  if (!aligned(partial, 8)) fail(kname, "partial must be 8-byte aligned");
  const size_t esize = dtype_size(dtype, kname);
  const int elems = int((n > 8 ? GramCfg<16>::kVecBytes : GramCfg<8>::kVecBytes) / esize);  // NMAX as dispatched below
  const bool vec = vector_ok(weights, strides, rows, esize, elems);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  set_device(device, kname);
  double* out = reinterpret_cast<double*>(partial);
  R2M_DISPATCH_DTYPE(dtype, T, kname, {
    R2M_BOOL_SWITCH(vec, VEC, {
      if (n <= 2) gram_partials_kernel<T, 2, VEC><<<grid, kGramThreads, 0, stream>>>(w, n, rows, cols, out);
      else if (n <= 4) gram_partials_kernel<T, 4, VEC><<<grid, kGramThreads, 0, stream>>>(w, n, rows, cols, out);
      else if (n <= 8) gram_partials_kernel<T, 8, VEC><<<grid, kGramThreads, 0, stream>>>(w, n, rows, cols, out);
      else gram_partials_kernel<T, 16, VEC><<<grid, kGramThreads, 0, stream>>>(w, n, rows, cols, out);
    });
  });
  check_launch(kname, stream);
}

void sketch(const std::vector<uintptr_t>& weights, const std::vector<int64_t>& strides, int64_t rows, int64_t cols,
            int dtype, uintptr_t omega, int64_t omega_stride, int64_t s, uintptr_t out, bool round_tau_bf16,
            bool use_mma, int device, uintptr_t stream_handle) {
  const char* kname = "sketch_kernel";
  WeightPtrs w = make_ptrs(weights, strides, rows, cols, kname);
  const int n = int(weights.size()) - 1;
  if (s < 0) fail(kname, "negative shape");
  if (omega == 0 || out == 0) fail(kname, "omega/out is a null pointer");
  check_stride("omega", omega_stride, cols, s, kname);
  if (!aligned(omega, 4) || !aligned(out, 4)) fail(kname, "omega/out must be 4-byte aligned");
  if (rows == 0 || s == 0) return;
  const size_t esize = dtype_size(dtype, kname);
  const bool vec = vector_ok(weights, strides, 2, esize, 4);  // 4-element loads along each row
  const bool omega_vec = aligned(omega, 16) && omega_stride % 4 == 0;
  const bool mma = use_mma && round_tau_bf16;
  const int64_t tile_m = mma ? kMmaM : kTileM, tile_n = mma ? kMmaN : kTileN;
  const int64_t col_tiles = (s + tile_n - 1) / tile_n;
  const int64_t row_tiles = (rows + tile_m - 1) / tile_m;
  if (col_tiles * n > 0x7fffffff) fail(kname, "too many column tiles");
  dim3 grid(unsigned(col_tiles * n), unsigned(row_tiles < 65535 ? row_tiles : 65535));
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  set_device(device, kname);
  const float* om = reinterpret_cast<const float*>(omega);
  float* z = reinterpret_cast<float*>(out);
  if (mma) {
    const char* mname = "sketch_mma_kernel";
    R2M_DISPATCH_DTYPE(dtype, T, mname, {
      R2M_BOOL_SWITCH(vec, VEC, {
        R2M_BOOL_SWITCH(omega_vec, OVEC, {
          sketch_mma_kernel<T, VEC, OVEC><<<grid, kMmaThreads, 0, stream>>>(w, n, rows, cols, om, omega_stride, s, z);
        });
      });
    });
    check_launch(mname, stream);
    return;
  }
  R2M_DISPATCH_DTYPE(dtype, T, kname, {
    R2M_BOOL_SWITCH(vec, VEC, {
      sketch_kernel<T, VEC><<<grid, kGemmThreads, 0, stream>>>(w, n, rows, cols, om, omega_stride, s, z, omega_vec,
                                                                   round_tau_bf16);
    });
  });
  check_launch(kname, stream);
}

}  // namespace r2m
