// Host-side checks of the CUDA kernels' index maps (csrc/tile_map.h), no GPU needed. Built with
// the host C++ compiler and run by tests/test_cuda_host.py; prints one line per check and exits 1
// on any failure.
//
// 1. Fragment maps against the PTX ISA tables ("Matrix Fragments for mma.m16n8k16 with floating
//    point type", "... for mma.m16n8k8", .bf16 and .tf32 multiplicands, .f32 accumulators), written
//    out below independently of tile_map.h, and exactly-once coverage of every tile by every map
//    (fragments, Vec4Tile loaders, SIMT and mma output walks, warp grids, persistent chunk walks,
//    the Gram's packed pairs).
// 2. Block-tile emulations: each tiled kernel's main loop replayed on the host — every thread's
//    loads through Vec4Tile::slot and load4_masked (bounds-checked reads of the real operand
//    matrices, so a mask that lets a read past an edge fails), the shared-memory stores, every
//    lane's fragment gathers through mma::bf16_a/b or tf32_a/b, each mma.sync evaluated by the
//    PTX ISA's own element numbering, and the epilogue through mma::outputs / simt_outputs — on
//    ragged shapes, against a plain triple loop. bf16 rounding (round to nearest even) and the
//    3xTF32 split (cvt.rna.tf32.f32: +0x1000, clear 13 bits, as the SASS does) are emulated bit by
//    bit. Also the Gram kernel's chunk walk, tail and fp64 reduction, and the combine kernel's walk.
//
// What this cannot check: the inline PTX itself (mma.sync / cvt operand order beyond the maps),
// the tensor cores' internal accumulation order, shared-memory races and __syncthreads placement,
// vector-load alignment faults, and warp shuffles; see README "CUDA kernels without a GPU".
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../tile_map.h"

using namespace r2m;

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond, ...)                                                       \
  do {                                                                         \
    ++g_checks;                                                                \
    if (!(cond)) {                                                             \
      if (++g_failures <= 30) {                                                \
        std::fprintf(stderr, "FAIL %s:%d: (%s) ", __FILE__, __LINE__, #cond); \
        std::fprintf(stderr, __VA_ARGS__);                                     \
        std::fputc('\n', stderr);                                              \
      }                                                                        \
    }                                                                          \
  } while (0)

void report(const char* name, int failures_before) {
  std::printf("%-60s %s\n", name, g_failures == failures_before ? "ok" : "FAILED");
}

// ------------------------------------------------------------------------------ PTX ISA tables
// Written from the ISA's formulas, element index i as the ISA numbers it (a0, a1, …), not from
// tile_map.h. groupID = laneid >> 2, threadID_in_group = laneid % 4.
Coord ptx_bf16_a(int lane, int i) {  // m16n8k16 .bf16 A, i = 0..7
  const int g = lane >> 2, t = lane % 4;
  const int row = ((0 <= i && i < 2) || (4 <= i && i < 6)) ? g : g + 8;
  const int col = i < 4 ? t * 2 + (i & 0x1) : t * 2 + (i & 0x1) + 8;
  return {row, col};
}
Coord ptx_bf16_b(int lane, int i) {  // m16n8k16 .bf16 B (k, n), i = 0..3
  const int g = lane >> 2, t = lane % 4;
  const int row = i < 2 ? t * 2 + (i & 0x1) : t * 2 + (i & 0x1) + 8;
  return {row, g};
}
Coord ptx_tf32_a(int lane, int i) {  // m16n8k8 .tf32 A, i = 0..3
  const int g = lane >> 2, t = lane % 4;
  const int row = (i == 0 || i == 2) ? g : g + 8;
  const int col = (i == 0 || i == 1) ? t : t + 4;
  return {row, col};
}
Coord ptx_tf32_b(int lane, int i) {  // m16n8k8 .tf32 B (k, n), i = 0..1
  const int g = lane >> 2, t = lane % 4;
  return {i == 0 ? t : t + 4, g};
}
Coord ptx_f32_c(int lane, int i) {  // m16n8k16 / m16n8k8 .f32 C/D, i = 0..3
  const int g = lane >> 2, t = lane % 4;
  return {i < 2 ? g : g + 8, t * 2 + (i & 0x1)};
}

bool same(Coord a, Coord b) { return a.row == b.row && a.col == b.col; }

// Counts hits per cell of a rows x cols tile; ok() when every cell was hit exactly once.
struct Cover {
  int rows, cols;
  std::vector<int> hits;
  bool out_of_range = false;
  Cover(int r, int c) : rows(r), cols(c), hits(size_t(r) * c, 0) {}
  void hit(int r, int c) {
    if (r < 0 || r >= rows || c < 0 || c >= cols) out_of_range = true;
    else ++hits[size_t(r) * cols + c];
  }
  bool ok() const {
    if (out_of_range) return false;
    for (int h : hits)
      if (h != 1) return false;
    return true;
  }
};

void check_fragments() {
  const int before = g_failures;
  Cover a16(16, 16), b16(16, 8), a8(16, 8), b8(8, 8), c(16, 8);
  for (int lane = 0; lane < 32; ++lane) {
    for (int reg = 0; reg < 4; ++reg) {  // bf16 A: register reg holds a[2 reg] (low half), a[2 reg + 1]
      const Coord lo = mma::bf16_a(lane, reg), hi = {lo.row, lo.col + 1};
      CHECK(same(lo, ptx_bf16_a(lane, 2 * reg)) && same(hi, ptx_bf16_a(lane, 2 * reg + 1)),
            "bf16 A lane %d reg %d", lane, reg);
      a16.hit(lo.row, lo.col);
      a16.hit(hi.row, hi.col);
    }
    for (int reg = 0; reg < 2; ++reg) {  // bf16 B: b[2 reg] (low half, k), b[2 reg + 1] (k + 1)
      const Coord lo = mma::bf16_b(lane, reg), hi = {lo.row + 1, lo.col};
      CHECK(same(lo, ptx_bf16_b(lane, 2 * reg)) && same(hi, ptx_bf16_b(lane, 2 * reg + 1)),
            "bf16 B lane %d reg %d", lane, reg);
      b16.hit(lo.row, lo.col);
      b16.hit(hi.row, hi.col);
    }
    for (int reg = 0; reg < 4; ++reg) {
      CHECK(same(mma::tf32_a(lane, reg), ptx_tf32_a(lane, reg)), "tf32 A lane %d reg %d", lane, reg);
      a8.hit(mma::tf32_a(lane, reg).row, mma::tf32_a(lane, reg).col);
    }
    for (int reg = 0; reg < 2; ++reg) {
      CHECK(same(mma::tf32_b(lane, reg), ptx_tf32_b(lane, reg)), "tf32 B lane %d reg %d", lane, reg);
      b8.hit(mma::tf32_b(lane, reg).row, mma::tf32_b(lane, reg).col);
    }
    for (int i = 0; i < 4; ++i) {
      CHECK(same(mma::acc(lane, i), ptx_f32_c(lane, i)), "f32 C lane %d c%d", lane, i);
      c.hit(mma::acc(lane, i).row, mma::acc(lane, i).col);
    }
  }
  CHECK(a16.ok() && b16.ok() && a8.ok() && b8.ok() && c.ok(), "a fragment map misses or repeats a tile element");
  report("fragment maps = PTX ISA tables, each element once", before);
}

template <class Tile>
void check_vec4_tile(const char* name, int rows, int width) {
  const int before = g_failures;
  CHECK(Tile::kPasses * Tile::kRowsPerPass == rows && Tile::kPerRow * 4 == width, "%s shape", name);
  Cover cover(rows, width);
  for (int t = 0; t < 256; ++t)
    for (int p = 0; p < Tile::kPasses; ++p) {
      const Coord s = Tile::slot(t, p);
      CHECK(s.col % 4 == 0, "%s: thread %d pass %d starts at column %d", name, t, p, s.col);
      for (int e = 0; e < 4; ++e) cover.hit(s.row, s.col + e);
    }
  CHECK(cover.ok(), "%s: the 256 threads do not load each element once", name);
  report((std::string("Vec4Tile ") + name + ": each element loaded once").c_str(), before);
}

void check_output_maps() {
  const int before = g_failures;
  Cover simt(kTileM, kTileN);
  for (int t = 0; t < kGemmThreads; ++t)
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) simt.hit(simt_out(t, i, j).row, simt_out(t, i, j).col);
  CHECK(simt.ok(), "SIMT 64x64 outputs");

  auto warp_grid = [&](auto origin, int wm, int wn, int block_m, int block_n, const char* name) {
    Cover cover(block_m, block_n);
    for (int warp = 0; warp < 8; ++warp) {
      const Coord o = origin(warp);
      for (int lane = 0; lane < 32; ++lane)
        for (int mi = 0; mi < wm / 16; ++mi)
          for (int ni = 0; ni < wn / 8; ++ni)
            for (int i = 0; i < 4; ++i)
              cover.hit(o.row + mi * 16 + mma::acc(lane, i).row, o.col + ni * 8 + mma::acc(lane, i).col);
    }
    CHECK(cover.ok(), "%s: warps x lanes x accumulators do not cover the block tile once", name);
  };
  warp_grid(mma::warp_origin<kMmaWarpsN, kMmaWarpM, kMmaWarpN>, kMmaWarpM, kMmaWarpN, kMmaM, kMmaN, "sketch_mma");
  warp_grid(mma::warp_origin<kAccWarpsN, kAccWarpM, kAccWarpN>, kAccWarpM, kAccWarpN, kAccM, kAccN, "accumulate_mma");
  CHECK(kMmaThreads == 32 * (kMmaM / kMmaWarpM) * (kMmaN / kMmaWarpN), "sketch_mma warp grid vs threads");
  CHECK(kAccThreads == 32 * (kAccM / kAccWarpM) * (kAccN / kAccWarpN), "accumulate_mma warp grid vs threads");

  // Ragged edges: the walks store exactly the tile's elements inside the matrix, once each.
  for (int64_t rows : {1, 7, 64, 77, 128, 300})
    for (int64_t cols : {1, 5, 63, 64, 130}) {
      for (int64_t row0 : {int64_t(0), int64_t(64), int64_t(128)}) {
        std::vector<int> hits(size_t(rows * cols), 0);
        bool outside = false;
        auto store = [&](int64_t r, int64_t c) {
          if (r < 0 || r >= rows || c < 0 || c >= cols) outside = true;
          else ++hits[size_t(r * cols + c)];
        };
        for (int t = 0; t < kGemmThreads; ++t)
          simt_outputs(t, row0, 0, rows, cols, [&](int64_t r, int64_t c, int, int) { store(r, c); });
        bool ok = !outside;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) {
            const bool in_tile = r >= row0 && r < row0 + kTileM && c < kTileN;
            ok = ok && hits[size_t(r * cols + c)] == (in_tile ? 1 : 0);
          }
        CHECK(ok, "simt_outputs rows %lld cols %lld row0 %lld", (long long)rows, (long long)cols, (long long)row0);

        std::fill(hits.begin(), hits.end(), 0);
        outside = false;
        for (int warp = 0; warp < 8; ++warp) {
          const Coord o = mma::warp_origin<kMmaWarpsN, kMmaWarpM, kMmaWarpN>(warp);
          for (int lane = 0; lane < 32; ++lane)
            mma::outputs<kMmaWarpM / 16, kMmaWarpN / 8>(lane, row0 + o.row, o.col, rows, cols,
                                                         [&](int64_t r, int64_t c, int, int, int) { store(r, c); });
        }
        ok = !outside;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) {
            const bool in_tile = r >= row0 && r < row0 + kMmaM && c < kMmaN;
            ok = ok && hits[size_t(r * cols + c)] == (in_tile ? 1 : 0);
          }
        CHECK(ok, "mma::outputs rows %lld cols %lld row0 %lld", (long long)rows, (long long)cols, (long long)row0);
      }
    }
  report("output walks: tiles covered once, ragged edges masked", before);
}

void check_masks() {
  const int before = g_failures;
  for (int64_t rows = 0; rows < 6; ++rows)
    for (int64_t cols = 0; cols < 12; ++cols)
      for (int64_t r = 0; r < 7; ++r)
        for (int64_t c = 0; c < 13; ++c) {
          bool all = true;
          for (int e = 0; e < 4; ++e) all = all && r < rows && c + e < cols;
          CHECK(inside(r, rows, c, cols) == (r < rows && c < cols), "inside(%lld, %lld, %lld, %lld)", (long long)r,
                (long long)rows, (long long)c, (long long)cols);
          CHECK(inside4(r, rows, c, cols) == all, "inside4(%lld, %lld, %lld, %lld)", (long long)r, (long long)rows,
                (long long)c, (long long)cols);
        }
  report("inside / inside4: exactly the elements of the matrix", before);
}

void check_pairs() {
  const int before = g_failures;
  auto one = [&](auto nmax_tag) {
    constexpr int NMAX = decltype(nmax_tag)::value;
    std::vector<int> hits(GramCfg<NMAX>::kPairs, 0);
    for (int i = 0; i < NMAX; ++i)
      for (int j = i; j < NMAX; ++j) {
        const int p = pair_index<NMAX>(i, j);
        CHECK(p >= 0 && p < GramCfg<NMAX>::kPairs, "pair_index<%d>(%d, %d) = %d", NMAX, i, j, p);
        if (p >= 0 && p < GramCfg<NMAX>::kPairs) ++hits[p];
      }
    for (int h : hits) CHECK(h == 1, "pair_index<%d> is not a bijection", NMAX);
  };
  one(std::integral_constant<int, 2>());
  one(std::integral_constant<int, 4>());
  one(std::integral_constant<int, 8>());
  one(std::integral_constant<int, 16>());
  report("pair_index: packed upper triangle, each pair once", before);
}

// ------------------------------------------------------------------------------ number formats
uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
// __float2bfloat16_rn / __floats2bfloat162_rn: round to nearest, ties to even (finite inputs).
uint16_t bf16_rne(float x) {
  const uint32_t u = bits(x);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
float bf16_to_float(uint16_t h) { return from_bits(uint32_t(h) << 16); }
// cvt.rna.tf32.f32 as sm_80/sm_90 SASS implements it: add half an ulp of tf32 (0x1000) unless the
// input is Inf/NaN, then clear the 13 low bits (so the register reads back as a float exactly).
uint32_t tf32_rna(float x) {
  uint32_t u = bits(x);
  if (std::isfinite(x)) u += 0x1000u;
  return u & 0xffffe000u;
}

// Bounds-checked row-major matrix: a read outside the allocation is a test failure (a mask that
// lets a thread read past a ragged edge), not undefined behaviour.
struct Matrix {
  int64_t rows, cols, ld;
  std::vector<float> v;
  const char* name;
  mutable bool bad = false;
  Matrix(int64_t r, int64_t c, int64_t pad, const char* n) : rows(r), cols(c), ld(c + pad), v(size_t(r * (c + pad)), 0.f), name(n) {}
  float& at(int64_t r, int64_t c) { return v[size_t(r * ld + c)]; }
  float read(int64_t r, int64_t c) const {
    if (r < 0 || r >= rows || c < 0 || c >= cols) {
      if (!bad) std::fprintf(stderr, "  %s read outside the matrix at (%lld, %lld) of %lldx%lld\n", name, (long long)r,
                             (long long)c, (long long)rows, (long long)cols);
      bad = true;
      return NAN;
    }
    return v[size_t(r * ld + c)];
  }
};

// The kernels' F32Matrix / TauMatrix load, with host memory: the same load4_masked, the same mask.
template <bool VEC>
void load_f32(const Matrix& m, int64_t r, int64_t c, float (&v)[4]) {
  load4_masked<VEC>(
      r, m.rows, c, m.cols, v,
      [&](float (&x)[4]) {
        for (int e = 0; e < 4; ++e) x[e] = m.read(r, c + e);
      },
      [&](int e) { return m.read(r, c + e); });
}
template <bool VEC>
void load_tau(const Matrix& base, const Matrix& w, bool round_bf16, int64_t r, int64_t c, float (&v)[4]) {
  load4_masked<VEC>(
      r, base.rows, c, base.cols, v,
      [&](float (&x)[4]) {
        for (int e = 0; e < 4; ++e) x[e] = w.read(r, c + e) - base.read(r, c + e);
      },
      [&](int e) { return w.read(r, c + e) - base.read(r, c + e); });
  if (round_bf16)
    for (int e = 0; e < 4; ++e) v[e] = bf16_to_float(bf16_rne(v[e]));
}

void fill(Matrix& m, std::mt19937& rng, float scale, float offset) {
  std::normal_distribution<float> n(0.f, 1.f);
  for (int64_t r = 0; r < m.rows; ++r)
    for (int64_t c = 0; c < m.cols; ++c) m.at(r, c) = offset + scale * n(rng);
}

// mma.sync evaluated from the registers of all 32 lanes, with the ISA's element numbering (not
// tile_map.h): D = A B + C, products exact in fp32 (bf16 x bf16, tf32 x tf32), sums in fp32.
void mma_bf16_16816(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], float (&c)[32][4]) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 8; ++i) {
      const uint32_t reg = a[lane][i / 2];
      const Coord p = ptx_bf16_a(lane, i);
      A[p.row][p.col] = bf16_to_float(uint16_t(i % 2 ? reg >> 16 : reg & 0xffffu));
    }
    for (int i = 0; i < 4; ++i) {
      const uint32_t reg = b[lane][i / 2];
      const Coord p = ptx_bf16_b(lane, i);
      B[p.row][p.col] = bf16_to_float(uint16_t(i % 2 ? reg >> 16 : reg & 0xffffu));
    }
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const Coord p = ptx_f32_c(lane, i);
      float d = c[lane][i];
      for (int k = 0; k < 16; ++k) d += A[p.row][k] * B[k][p.col];
      c[lane][i] = d;
    }
}
void mma_tf32_1688(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], float (&c)[32][4]) {
  float A[16][8], B[8][8];
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4; ++i) A[ptx_tf32_a(lane, i).row][ptx_tf32_a(lane, i).col] = from_bits(a[lane][i]);
    for (int i = 0; i < 2; ++i) B[ptx_tf32_b(lane, i).row][ptx_tf32_b(lane, i).col] = from_bits(b[lane][i]);
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const Coord p = ptx_f32_c(lane, i);
      float d = c[lane][i];
      for (int k = 0; k < 8; ++k) d += A[p.row][k] * B[k][p.col];
      c[lane][i] = d;
    }
}

// Output of an emulated kernel: a write outside the matrix is a test failure, not a crash.
struct Output {
  int64_t rows, cols;
  std::vector<float> v;
  bool bad = false;
  Output(int64_t r, int64_t c) : rows(r), cols(c), v(size_t(r * c), NAN) {}
  void put(int64_t r, int64_t c, float x) {
    if (r < 0 || r >= rows || c < 0 || c >= cols) bad = true;
    else v[size_t(r * cols + c)] = x;
  }
};

// The kernels' double-buffered main loop, in their order: stage k-tile 0; then for each k-tile,
// prefetch the next into registers, compute on the current buffer, store the prefetch into the
// other buffer (the kernels' __syncthreads separate these phases; here they run one after another).
template <class Load, class Store, class Compute>
void k_loop(int64_t k_total, int tile_k, Load&& load, Store&& store, Compute&& compute) {
  const int64_t k_tiles = (k_total + tile_k - 1) / tile_k;
  load(0);
  store(0);
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    const int cur = int(kt & 1);
    const bool more = kt + 1 < k_tiles;
    if (more) load((kt + 1) * tile_k);
    compute(cur);
    if (more) store(cur ^ 1);
  }
}

// Every lane's epilogue of an 8-warp block of MI x NI mma tiles: put(r, c, acc[warp][mi][ni][lane][i]).
template <int kWarpsN, int kWarpM, int kWarpN, class Acc, class Put>
void mma_epilogue(const Acc& acc, int64_t row0, int64_t col0, int64_t rows, int64_t cols, Put&& put) {
  for (int warp = 0; warp < 8; ++warp) {
    const Coord wo = mma::warp_origin<kWarpsN, kWarpM, kWarpN>(warp);
    for (int lane = 0; lane < 32; ++lane)
      mma::outputs<kWarpM / 16, kWarpN / 8>(lane, row0 + wo.row, col0 + wo.col, rows, cols,
                                           [&](int64_t r, int64_t c, int mi, int ni, int i) {
                                             put(r, c, acc[warp][mi][ni][lane][i]);
                                           });
  }
}

double max_rel_error(const std::vector<float>& got, const std::vector<double>& ref, bool& unwritten) {
  double scale = 0, err = 0;
  for (double x : ref) scale = std::max(scale, std::fabs(x));
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isnan(got[i])) unwritten = true;
    err = std::max(err, std::fabs(double(got[i]) - ref[i]));
  }
  return err / (scale > 0 ? scale : 1);
}

// ------------------------------------------------------------------------------ sketch_mma
// Z = bf16(θ₁ − θ₀) · Ω over every (row tile, column tile) block, replaying sketch_mma_kernel.
template <bool VEC, bool OVEC>
void emulate_sketch_mma(int64_t rows, int64_t cols, int64_t s, std::mt19937& rng) {
  const int before = g_failures;
  Matrix base(rows, cols, VEC ? 4 : 3, "theta0"), w(rows, cols, VEC ? 4 : 3, "theta1"), omega(cols, s, OVEC ? 4 : 1, "omega");
  fill(base, rng, 1.f, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) w.at(r, c) = base.at(r, c) + 1e-2f * std::normal_distribution<float>()(rng);
  fill(omega, rng, 1.f, 0.f);
  for (float& x : omega.v) x = bf16_to_float(bf16_rne(x));  // a bf16 Ω, widened by the wrapper
  Output z(rows, s);

  uint16_t sa[2][kMmaM][kMmaLd], sb[2][kMmaN][kMmaLd];
  for (int64_t row0 = 0; row0 < rows; row0 += kMmaM)
    for (int64_t col0 = 0; col0 < s; col0 += kMmaN) {
      std::memset(sa, 0xff, sizeof sa);  // NaN-ish garbage: a fragment read of an unwritten cell shows
      std::memset(sb, 0xff, sizeof sb);
      uint32_t ra[kMmaThreads][4][2];
      float rb[kMmaThreads][4][4];
      auto load = [&](int64_t k0) {
        for (int t = 0; t < kMmaThreads; ++t) {
          for (int g = 0; g < MmaATile::kPasses; ++g) {
            const Coord a = MmaATile::slot(t, g);
            float v[4];
            load_tau<VEC>(base, w, false, row0 + a.row, k0 + a.col, v);
            ra[t][g][0] = uint32_t(bf16_rne(v[0])) | uint32_t(bf16_rne(v[1])) << 16;  // pack_bf16
            ra[t][g][1] = uint32_t(bf16_rne(v[2])) | uint32_t(bf16_rne(v[3])) << 16;
          }
          for (int g = 0; g < MmaBTile::kPasses; ++g) {
            const Coord b = MmaBTile::slot(t, g);
            load_f32<OVEC>(omega, k0 + b.row, col0 + b.col, rb[t][g]);
          }
        }
      };
      auto store = [&](int buf) {
        for (int t = 0; t < kMmaThreads; ++t) {
          for (int g = 0; g < MmaATile::kPasses; ++g) {  // one uint2: four bf16, little-endian
            const Coord a = MmaATile::slot(t, g);
            sa[buf][a.row][a.col + 0] = uint16_t(ra[t][g][0]);
            sa[buf][a.row][a.col + 1] = uint16_t(ra[t][g][0] >> 16);
            sa[buf][a.row][a.col + 2] = uint16_t(ra[t][g][1]);
            sa[buf][a.row][a.col + 3] = uint16_t(ra[t][g][1] >> 16);
          }
          for (int g = 0; g < MmaBTile::kPasses; ++g) {
            const Coord b = MmaBTile::slot(t, g);
            for (int e = 0; e < 4; ++e) sb[buf][b.col + e][b.row] = bf16_rne(rb[t][g][e]);
          }
        }
      };
      constexpr int MI = kMmaWarpM / 16, NI = kMmaWarpN / 8;
      static float acc[8][MI][NI][32][4];
      std::memset(acc, 0, sizeof acc);
      k_loop(cols, kMmaK, load, store, [&](int cur) {
        for (int warp = 0; warp < 8; ++warp) {
          const Coord wo = mma::warp_origin<kMmaWarpsN, kMmaWarpM, kMmaWarpN>(warp);
          for (int kk = 0; kk < kMmaK; kk += 16) {
            uint32_t af[MI][32][4], bfr[NI][32][2];
            for (int lane = 0; lane < 32; ++lane) {
              for (int mi = 0; mi < MI; ++mi)
                for (int reg = 0; reg < 4; ++reg) {  // the kernel's 32-bit shared load: low half first
                  const Coord a = mma::bf16_a(lane, reg);
                  const uint16_t* p = &sa[cur][wo.row + mi * 16 + a.row][kk + a.col];
                  af[mi][lane][reg] = uint32_t(p[0]) | uint32_t(p[1]) << 16;
                }
              for (int ni = 0; ni < NI; ++ni)
                for (int reg = 0; reg < 2; ++reg) {
                  const Coord b = mma::bf16_b(lane, reg);
                  const uint16_t* p = &sb[cur][wo.col + ni * 8 + b.col][kk + b.row];
                  bfr[ni][lane][reg] = uint32_t(p[0]) | uint32_t(p[1]) << 16;
                }
            }
            for (int mi = 0; mi < MI; ++mi)
              for (int ni = 0; ni < NI; ++ni) mma_bf16_16816(af[mi], bfr[ni], acc[warp][mi][ni]);
          }
        }
      });
      mma_epilogue<kMmaWarpsN, kMmaWarpM, kMmaWarpN>(acc, row0, col0, rows, s,
                                                     [&](int64_t r, int64_t c, float x) { z.put(r, c, x); });
    }

  std::vector<double> ref(size_t(rows * s), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k) {
      const double t = bf16_to_float(bf16_rne(w.at(r, k) - base.at(r, k)));
      for (int64_t c = 0; c < s; ++c) ref[size_t(r * s + c)] += t * omega.at(k, c);
    }
  bool unwritten = false;
  const double err = max_rel_error(z.v, ref, unwritten);
  CHECK(!base.bad && !w.bad && !omega.bad, "a load read outside its matrix");
  CHECK(!z.bad, "a store wrote outside the output");
  CHECK(!unwritten, "an output element was never written");
  CHECK(err < 1e-5, "relative error %.3g (fp32 sums of exact bf16 products should give < 1e-5)", err);
  char name[128];
  std::snprintf(name, sizeof name, "sketch_mma  %lldx%lld s=%lld VEC=%d OVEC=%d (rel err %.1e)", (long long)rows,
                (long long)cols, (long long)s, VEC, OVEC, err);
  report(name, before);
}

// ------------------------------------------------------------------------------ accumulate_mma
// L Rᵀ in 3xTF32, replaying lrt_mma_mainloop and the accumulate_mma epilogue (without θ terms).
template <bool VEC>
void emulate_lrt_mma(int64_t rows, int64_t cols, int64_t k_total, std::mt19937& rng) {
  const int before = g_failures;
  Matrix L(rows, k_total, VEC ? 4 : 1, "L"), R(cols, k_total, VEC ? 0 : 3, "R");
  fill(L, rng, 1.f, 0.f);
  fill(R, rng, 1.f, 0.5f);
  Output out3(rows, cols), out1(rows, cols);
  float sa[2][kAccM][kAccLd], sb[2][kAccN][kAccLd];
  constexpr int MI = kAccWarpM / 16, NI = kAccWarpN / 8;
  for (int64_t row0 = 0; row0 < rows; row0 += kAccM)
    for (int64_t col0 = 0; col0 < cols; col0 += kAccN) {
      std::fill(&sa[0][0][0], &sa[0][0][0] + sizeof sa / 4, NAN);
      std::fill(&sb[0][0][0], &sb[0][0][0] + sizeof sb / 4, NAN);
      float ra[kAccThreads][AccLTile::kPasses][4], rb[kAccThreads][4];
      auto load = [&](int64_t k0) {
        for (int t = 0; t < kAccThreads; ++t) {
          for (int g = 0; g < AccLTile::kPasses; ++g) {
            const Coord a = AccLTile::slot(t, g);
            load_f32<VEC>(L, row0 + a.row, k0 + a.col, ra[t][g]);
          }
          const Coord b = AccRTile::slot(t, 0);
          load_f32<VEC>(R, col0 + b.row, k0 + b.col, rb[t]);
        }
      };
      auto store = [&](int buf) {
        for (int t = 0; t < kAccThreads; ++t) {
          for (int g = 0; g < AccLTile::kPasses; ++g) {
            const Coord a = AccLTile::slot(t, g);
            for (int e = 0; e < 4; ++e) sa[buf][a.row][a.col + e] = ra[t][g][e];
          }
          const Coord b = AccRTile::slot(t, 0);
          for (int e = 0; e < 4; ++e) sb[buf][b.row][b.col + e] = rb[t][e];
        }
      };
      static float acc3[8][MI][NI][32][4], acc1[8][MI][NI][32][4];
      std::memset(acc3, 0, sizeof acc3);
      std::memset(acc1, 0, sizeof acc1);
      k_loop(k_total, kAccK, load, store, [&](int cur) {
        for (int warp = 0; warp < 8; ++warp) {
          const Coord wo = mma::warp_origin<kAccWarpsN, kAccWarpM, kAccWarpN>(warp);
          for (int kk = 0; kk < kAccK; kk += 8) {
            uint32_t ab[MI][32][4], as[MI][32][4], bb[NI][32][2], bs[NI][32][2];
            for (int lane = 0; lane < 32; ++lane) {
              for (int mi = 0; mi < MI; ++mi)
                for (int reg = 0; reg < 4; ++reg) {  // split_tf32
                  const Coord a = mma::tf32_a(lane, reg);
                  const float x = sa[cur][wo.row + mi * 16 + a.row][kk + a.col];
                  ab[mi][lane][reg] = tf32_rna(x);
                  as[mi][lane][reg] = tf32_rna(x - from_bits(ab[mi][lane][reg]));
                }
              for (int ni = 0; ni < NI; ++ni)
                for (int reg = 0; reg < 2; ++reg) {
                  const Coord b = mma::tf32_b(lane, reg);
                  const float x = sb[cur][wo.col + ni * 8 + b.col][kk + b.row];
                  bb[ni][lane][reg] = tf32_rna(x);
                  bs[ni][lane][reg] = tf32_rna(x - from_bits(bb[ni][lane][reg]));
                }
            }
            for (int mi = 0; mi < MI; ++mi)
              for (int ni = 0; ni < NI; ++ni) {
                mma_tf32_1688(as[mi], bb[ni], acc3[warp][mi][ni]);  // small terms first, then the big product
                mma_tf32_1688(ab[mi], bs[ni], acc3[warp][mi][ni]);
                mma_tf32_1688(ab[mi], bb[ni], acc3[warp][mi][ni]);
                mma_tf32_1688(ab[mi], bb[ni], acc1[warp][mi][ni]);  // plain TF32, for contrast
              }
          }
        }
      });
      mma_epilogue<kAccWarpsN, kAccWarpM, kAccWarpN>(acc3, row0, col0, rows, cols,
                                                     [&](int64_t r, int64_t c, float x) { out3.put(r, c, x); });
      mma_epilogue<kAccWarpsN, kAccWarpM, kAccWarpN>(acc1, row0, col0, rows, cols,
                                                     [&](int64_t r, int64_t c, float x) { out1.put(r, c, x); });
    }
  std::vector<double> ref(size_t(rows * cols), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      double x = 0;
      for (int64_t k = 0; k < k_total; ++k) x += double(L.at(r, k)) * R.at(c, k);
      ref[size_t(r * cols + c)] = x;
    }
  bool unwritten = false;
  const double err3 = max_rel_error(out3.v, ref, unwritten), err1 = max_rel_error(out1.v, ref, unwritten);
  CHECK(!L.bad && !R.bad, "a load read outside its matrix");
  CHECK(!out3.bad, "a store wrote outside the output");
  CHECK(!unwritten, "an output element was never written");
  CHECK(err3 < 5e-6, "3xTF32 relative error %.3g (expected fp32-class, < 5e-6)", err3);
  CHECK(err1 > 20 * err3, "plain TF32 (%.3g) should be far worse than 3xTF32 (%.3g): is the split doing anything?", err1, err3);
  char name[128];
  std::snprintf(name, sizeof name, "accumulate_mma %lldx%lld K=%lld VEC=%d (3xTF32 %.1e, TF32 %.1e)", (long long)rows,
                (long long)cols, (long long)k_total, VEC, err3, err1);
  report(name, before);
}

// ------------------------------------------------------------------------------ SIMT 64x64 GEMM
// gemm_mainloop with KMajorOperand A (τ, or L) and either NMajorOperand B (Ω: the sketch kernel)
// or KMajorOperand B (R: accumulate_gemm_kernel).
template <bool VEC, bool B_IS_OMEGA>
void emulate_simt(int64_t rows, int64_t cols, int64_t k_total, bool round_bf16, std::mt19937& rng) {
  const int before = g_failures;
  Matrix base(rows, k_total, VEC ? 4 : 1, "A base"), w(rows, k_total, VEC ? 4 : 1, "A");
  Matrix b_mat = B_IS_OMEGA ? Matrix(k_total, cols, VEC ? 0 : 1, "omega") : Matrix(cols, k_total, VEC ? 4 : 2, "R");
  fill(base, rng, 1.f, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < k_total; ++c) w.at(r, c) = base.at(r, c) + 1e-2f * std::normal_distribution<float>()(rng);
  fill(b_mat, rng, 1.f, 0.f);
  Output out(rows, cols);
  float sa[2][kTileK][kTileM + kPad], sb[2][kTileK][kTileN + kPad];
  for (int64_t row0 = 0; row0 < rows; row0 += kTileM)
    for (int64_t col0 = 0; col0 < cols; col0 += kTileN) {
      std::fill(&sa[0][0][0], &sa[0][0][0] + sizeof sa / 4, NAN);
      std::fill(&sb[0][0][0], &sb[0][0][0] + sizeof sb / 4, NAN);
      float ra[kGemmThreads][4], rb[kGemmThreads][4];
      auto load = [&](int64_t k0) {
        for (int t = 0; t < kGemmThreads; ++t) {
          const Coord a = GemmKTile::slot(t, 0);
          load_tau<VEC>(base, w, round_bf16, row0 + a.row, k0 + a.col, ra[t]);
          if (B_IS_OMEGA) {
            const Coord b = GemmNTile::slot(t, 0);
            load_f32<VEC>(b_mat, k0 + b.row, col0 + b.col, rb[t]);
          } else {
            const Coord b = GemmKTile::slot(t, 0);
            load_f32<VEC>(b_mat, col0 + b.row, k0 + b.col, rb[t]);
          }
        }
      };
      auto store = [&](int buf) {
        for (int t = 0; t < kGemmThreads; ++t) {
          const Coord a = GemmKTile::slot(t, 0);
          for (int e = 0; e < 4; ++e) sa[buf][a.col + e][a.row] = ra[t][e];  // transposed: [k][row]
          if (B_IS_OMEGA) {
            const Coord b = GemmNTile::slot(t, 0);
            for (int e = 0; e < 4; ++e) sb[buf][b.row][b.col + e] = rb[t][e];  // as is: [k][column]
          } else {
            const Coord b = GemmKTile::slot(t, 0);
            for (int e = 0; e < 4; ++e) sb[buf][b.col + e][b.row] = rb[t][e];
          }
        }
      };
      static float acc[kGemmThreads][4][4];
      std::memset(acc, 0, sizeof acc);
      k_loop(k_total, kTileK, load, store, [&](int cur) {
        for (int t = 0; t < kGemmThreads; ++t)
          for (int k = 0; k < kTileK; ++k)
            for (int i = 0; i < 4; ++i)
              for (int j = 0; j < 4; ++j)
                acc[t][i][j] = std::fma(sa[cur][k][simt_out(t, i, 0).row], sb[cur][k][simt_out(t, 0, j).col], acc[t][i][j]);
      });
      for (int t = 0; t < kGemmThreads; ++t)
        simt_outputs(t, row0, col0, rows, cols,
                     [&](int64_t r, int64_t c, int i, int j) { out.put(r, c, acc[t][i][j]); });
    }
  std::vector<double> ref(size_t(rows * cols), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < k_total; ++k) {
      float t = w.at(r, k) - base.at(r, k);
      if (round_bf16) t = bf16_to_float(bf16_rne(t));
      for (int64_t c = 0; c < cols; ++c) ref[size_t(r * cols + c)] += double(t) * (B_IS_OMEGA ? b_mat.at(k, c) : b_mat.at(c, k));
    }
  bool unwritten = false;
  const double err = max_rel_error(out.v, ref, unwritten);
  CHECK(!base.bad && !w.bad && !b_mat.bad, "a load read outside its matrix");
  CHECK(!out.bad, "a store wrote outside the output");
  CHECK(!unwritten, "an output element was never written");
  CHECK(err < 1e-5, "relative error %.3g", err);
  char name[128];
  std::snprintf(name, sizeof name, "%s %lldx%lld K=%lld VEC=%d bf16=%d (rel err %.1e)",
                B_IS_OMEGA ? "sketch SIMT    " : "accumulate SIMT", (long long)rows, (long long)cols, (long long)k_total,
                VEC, round_bf16, err);
  report(name, before);
}

// ------------------------------------------------------------------------------ persistent walks
// gram_partials_kernel's walk (U chunks of V elements per iteration, scalar tail of each row) and
// its reduction: every element counted once, the Gram exact to fp32 sums.
template <int NMAX, bool VEC>
void emulate_gram(int n, int64_t rows, int64_t cols, int grid, std::mt19937& rng) {
  const int before = g_failures;
  constexpr int esize = 4;  // fp32 weights; V depends only on the bytes per vector
  constexpr int V = VEC ? GramCfg<NMAX>::kVecBytes / esize : 1;
  constexpr int U = GramCfg<NMAX>::kUnroll;
  constexpr int P = GramCfg<NMAX>::kPairs;
  std::vector<Matrix> w;
  for (int j = 0; j <= n; ++j) w.emplace_back(rows, cols, 0, "theta");
  for (auto& m : w) fill(m, rng, 1.f, 0.f);
  std::vector<int> visits(size_t(rows * cols), 0);
  std::vector<double> gram(size_t(n * n), 0.0);
  const int64_t chunks_per_row = (cols + V - 1) / V;
  const int64_t total = rows * chunks_per_row;
  const int64_t step = int64_t(grid) * kGramThreads;
  for (int block = 0; block < grid; ++block) {
    std::vector<double> block_pairs(P, 0.0);
    for (int tid = 0; tid < kGramThreads; ++tid) {
      float acc[P] = {};
      auto add = [&](int64_t r, int64_t c) {
        ++visits[size_t(r * cols + c)];
        float tau[NMAX] = {};
        for (int j = 0; j < n; ++j) tau[j] = w[j + 1].read(r, c) - w[0].read(r, c);
        for (int i = 0; i < NMAX; ++i)
          for (int j = i; j < NMAX; ++j) acc[pair_index<NMAX>(i, j)] = std::fma(tau[i], tau[j], acc[pair_index<NMAX>(i, j)]);
      };
      for (int64_t q0 = int64_t(block) * kGramThreads + tid; q0 < total; q0 += step * U)
        for (int u = 0; u < U; ++u) {
          const int64_t q = q0 + u * step;
          const Chunk ch = chunk_at(q, chunks_per_row, V);
          const bool full = q < total && ch.col + V <= cols;
          if (full)
            for (int e = 0; e < V; ++e) add(ch.row, ch.col + e);
          else if (q < total)
            for (int64_t c = ch.col; c < cols; ++c) add(ch.row, c);
        }
      for (int p = 0; p < P; ++p) block_pairs[p] += acc[p];
    }
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        const int a = i < j ? i : j, b = i < j ? j : i;
        gram[size_t(i * n + j)] += block_pairs[pair_index<NMAX>(a, b)];
      }
  }
  bool once = true;
  for (int v : visits) once = once && v == 1;
  double err = 0, scale = 0;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      double x = 0;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          x += double(w[i + 1].at(r, c) - w[0].at(r, c)) * double(w[j + 1].at(r, c) - w[0].at(r, c));
      scale = std::max(scale, std::fabs(x));
      err = std::max(err, std::fabs(x - gram[size_t(i * n + j)]));
    }
  CHECK(once, "an element was visited 0 or 2+ times");
  CHECK(err <= 1e-5 * scale, "Gram relative error %.3g", err / scale);
  char name[128];
  std::snprintf(name, sizeof name, "gram walk NMAX=%d N=%d %lldx%lld grid=%d V=%d U=%d", NMAX, n, (long long)rows,
                (long long)cols, grid, V, U);
  report(name, before);
}

// combine_kernel's walk: every output element written once (vector chunks, then the row's tail).
void check_combine_walk(int64_t rows, int64_t cols, int v, int grid) {
  const int before = g_failures;
  std::vector<int> writes(size_t(rows * cols), 0);
  const int64_t chunks_per_row = (cols + v - 1) / v, total = rows * chunks_per_row;
  const int64_t step = int64_t(grid) * kCombineThreads;
  for (int64_t start = 0; start < step; ++start)
    for (int64_t q = start; q < total; q += step) {
      const Chunk ch = chunk_at(q, chunks_per_row, v);
      for (int64_t c = ch.col; c < ch.col + v && c < cols; ++c) ++writes[size_t(ch.row * cols + c)];
    }
  bool once = true;
  for (int x : writes) once = once && x == 1;
  CHECK(once, "combine walk rows %lld cols %lld V %d", (long long)rows, (long long)cols, v);
  char name[96];
  std::snprintf(name, sizeof name, "combine walk %lldx%lld V=%d grid=%d", (long long)rows, (long long)cols, v, grid);
  report(name, before);
}

void check_number_formats() {
  const int before = g_failures;
  // bf16 round to nearest even: ties go to the even mantissa.
  CHECK(bf16_rne(from_bits(0x3f808000u)) == 0x3f80, "tie to even (down)");
  CHECK(bf16_rne(from_bits(0x3f818000u)) == 0x3f82, "tie to even (up)");
  CHECK(bf16_rne(from_bits(0x3f808001u)) == 0x3f81, "above the tie");
  // tf32 rna: ties away from zero, 13 low bits cleared, the split exact.
  CHECK(tf32_rna(from_bits(0x3f801000u)) == 0x3f802000u, "tie away from zero");
  CHECK(tf32_rna(from_bits(0xbf801000u)) == 0xbf802000u, "negative tie away from zero");
  std::mt19937 rng(5);
  std::normal_distribution<float> n(0.f, 1.f);
  for (int i = 0; i < 10000; ++i) {
    const float x = n(rng) * std::ldexp(1.f, int(rng() % 40) - 20);
    const float big = from_bits(tf32_rna(x)), small = from_bits(tf32_rna(x - big));
    CHECK((tf32_rna(x) & 0x1fffu) == 0, "low bits");
    CHECK(std::fabs(x - big) <= std::ldexp(std::fabs(x), -11), "tf32 rounding error of %g", x);
    CHECK(std::fabs(double(x) - big - small) <= std::ldexp(std::fabs(double(x)), -21), "3xTF32 split of %g", x);
  }
  report("bf16 RNE and tf32 RNA emulation", before);
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  check_number_formats();
  check_fragments();
  check_vec4_tile<GemmKTile>("GemmKTile 64x16", kTileM, kTileK);
  check_vec4_tile<GemmNTile>("GemmNTile 16x64", kTileK, kTileN);
  check_vec4_tile<MmaATile>("MmaATile 128x32", kMmaM, kMmaK);
  check_vec4_tile<MmaBTile>("MmaBTile 32x128", kMmaK, kMmaN);
  check_vec4_tile<AccLTile>("AccLTile 128x16", kAccM, kAccK);
  check_vec4_tile<AccRTile>("AccRTile 64x16", kAccN, kAccK);
  check_output_maps();
  check_masks();
  check_pairs();

  // Ragged in every tile dimension (and exact multiples), both load variants.
  emulate_sketch_mma<true, true>(150, 70, 37, rng);
  emulate_sketch_mma<true, true>(131, 71, 39, rng);  // columns ≡ 3 (mod 4): the vector path's last edge
  emulate_sketch_mma<false, false>(129, 33, 130, rng);
  emulate_sketch_mma<true, false>(128, 64, 128, rng);
  emulate_sketch_mma<false, true>(5, 3, 2, rng);
  emulate_lrt_mma<true>(150, 70, 37, rng);
  emulate_lrt_mma<true>(67, 131, 39, rng);
  emulate_lrt_mma<false>(129, 65, 17, rng);
  emulate_lrt_mma<true>(128, 64, 32, rng);
  emulate_simt<true, true>(70, 37, 45, false, rng);
  emulate_simt<true, true>(66, 39, 47, true, rng);
  emulate_simt<true, false>(33, 71, 43, false, rng);
  emulate_simt<false, true>(65, 130, 17, true, rng);
  emulate_simt<true, false>(64, 64, 32, false, rng);
  emulate_simt<false, false>(77, 65, 3, false, rng);

  emulate_gram<2, true>(1, 3, 37, 2, rng);
  emulate_gram<4, true>(3, 17, 45, 1, rng);
  emulate_gram<8, true>(5, 9, 33, 3, rng);
  emulate_gram<16, true>(16, 5, 23, 1, rng);
  emulate_gram<4, false>(4, 7, 13, 2, rng);
  emulate_gram<16, false>(9, 3, 11, 1, rng);
  check_combine_walk(1, 1000, 4, 1);
  check_combine_walk(37, 45, 8, 2);
  check_combine_walk(300, 7, 1, 1);

  std::printf("%d checks, %d failed\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
