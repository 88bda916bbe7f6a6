// leapserve's two opaque ops of a compiled CPU model, in C++ so that a step runs no Python between its kernels.
//
// leapserve_cpu::packed_linear   y = x @ W.T + b through W's oneDNN-packed copy (kernels/packed_linear.py); up to
//                                twelve fp32 rows or four bf16 ones (three without AVX-512) through few_rows_linear,
//                                which streams W, and up to 16 bf16 rows through amx_linear where the CPU has AMX;
//                                where it has AVX-512's bf16 dot product but not AMX, W is packed k-major instead,
//                                and every row count goes through k_major_linear
// leapserve_cpu::paged_attention one layer's K/V write (row copies) and attention, executing the step's plan
//                                (kernels/reference.py plans it once per step): fp32 and bf16 sequences with few
//                                queries through short_attention, the rest through what `attend` runs
//
// Both find what is not a graph tensor in state set from Python: the packed copies by their plain weight's address,
// and the step (caches, slots, plan) on a stack pushed around each forward (cpu_ops.py).

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>
#include <ATen/record_function.h>

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define LEAPSERVE_AMX 1
#elif defined(__AVX512BF16__)
#define LEAPSERVE_K_MAJOR 1
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace {

std::unordered_map<int64_t, at::Tensor> packed;  // plain weight's data_ptr -> its oneDNN-packed copy
std::unordered_map<int64_t, at::Tensor> k_major;  // ... or its k-major copy (k_major_linear)

struct SeqPlan {  // one sequence's queries q[start:end] over its keys (reference.SeqPlan)
  int64_t start, end;
  int64_t key_start, key_len;       // flat cache slots key_start.. when `keys` is empty (consecutive blocks)
  std::optional<at::Tensor> keys;   // [L] int64 flat slots otherwise
  std::optional<at::Tensor> mask;   // bool [n, L]
  bool causal;
};

struct Step {
  std::vector<at::Tensor> k, v;  // per layer [num_blocks, block_size, Hkv, D]
  at::Tensor slot_mapping;       // [T] int64
  bool batched = false;          // reference.BatchedPlan: one padded SDPA call
  at::Tensor slots, mask, rows;  // [B * max_keys], bool [B, 1, max_q, max_keys], [T]
  int64_t max_q = 1;
  std::vector<SeqPlan> seqs;
};

std::vector<Step> steps;  // the steps being run, innermost last (a drafter's forward inside a target's)
bool native_attention = true;  // fp32 and bf16 sequences with few queries go to short_attention (else all to SDPA)
bool native_gemv = true;  // own_rows(...) rows go to few_rows_linear, amx_linear or k_major_linear, else oneDNN

// Flat slots [start, start + len) of a contiguous [num_blocks, block_size, H, D] cache as a [1, H, len, D] view.
at::Tensor heads_view(const at::Tensor& cache, int64_t start, int64_t len) {
  int64_t heads = cache.size(2), dim = cache.size(3);
  return cache.as_strided({1, heads, len, dim}, {0, dim, heads * dim, 1}, cache.storage_offset() + start * heads * dim);
}

// Queries per sequence up to which fp32 and bf16 attention runs `short_attention` (decoding, verifying draft trees);
// longer ones (prefill) go to SDPA, whose blocked GEMMs are faster there. reference.BATCHED_MAX_QUERIES, the same
// bound.
constexpr int64_t kShortQueries = 16;

// x in `dtype`: x itself where it already is (no dispatch)
at::Tensor as_dtype(const at::Tensor& x, at::ScalarType dtype) { return x.scalar_type() == dtype ? x : x.to(dtype); }

// what the ops compute in: fp32, also for bf16 tensors (as SDPA and oneDNN do)
at::Tensor compute(const at::Tensor& x) { return as_dtype(x, at::kFloat); }

typedef float vec8 __attribute__((vector_size(32)));  // 8 lanes: AVX2, or half an AVX-512 register
typedef int32_t ivec8 __attribute__((vector_size(32)));

inline vec8 load8(const float* x) {
  vec8 v;
  std::memcpy(&v, x, sizeof v);
  return v;
}

typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t uvec8 __attribute__((vector_size(32)));

inline vec8 load8(const at::BFloat16* x) {  // bf16 is fp32's upper half: exact
  u16x8 h;
  std::memcpy(&h, x, sizeof h);
  const uvec8 bits = __builtin_convertvector(h, uvec8) << 16;
  vec8 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// e^x for x <= 0 (scores less their row's maximum; -inf, a masked key, gives 0): Cephes' single-precision
// polynomial, relative error ~1e-7 (std::exp does not vectorize without -ffast-math).
inline vec8 exp_nonpositive(vec8 x) {
  const ivec8 zero = x < -87.0f;  // e^x < 2^-125: 0, as for a masked key
  x = zero ? vec8{} - 87.0f : x;
  const vec8 t = x * 1.44269504088896341f + 0.5f;
  vec8 k = __builtin_convertvector(__builtin_convertvector(t, ivec8), vec8);  // rounded toward 0 ...
  k = k > t ? k - 1.0f : k;                                                   // ... then down
  const vec8 r = x - k * 0.693359375f + k * 2.12194440e-4f;
  vec8 p = vec8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const ivec8 bits = (__builtin_convertvector(k, ivec8) + 127) << 23;
  vec8 two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  return zero ? vec8{} : p * two_k;
}

inline float lane_sum(vec8 s) { return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])); }

// Lane k of the result: a[k]'s lanes summed (in a fixed tree: pairs, then quads, then halves).
inline vec8 lane_sums(const vec8* a) {
  vec8 b[4], c[2];
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(c[0], c[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(c[0], c[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// Rows up to which fp32 inputs go to few_rows_linear; more go to oneDNN. With AVX-512 (32 vector registers), twelve:
// on a 2-core Xeon with AMX SmolLM2-135M's GEMMs stream as fast as through oneDNN or up to 1.4x faster at every
// count from 1 to 8 rows, and its forward over 9 to 12 tokens (a draft tree verified) takes 0.82-0.92 of its time
// through oneDNN (docs/compile.md). On AVX2 a row's accumulator takes two of its 16 registers: three rows, as
// measured there.
#ifdef __AVX512F__
constexpr int64_t kFewRows = 12;
#else
constexpr int64_t kFewRows = 3;
#endif
// bf16 rows: a bf16 weight streams in half the time, its rows' products cost as many instructions as fp32 ones and
// oneDNN computes more rows with AMX: four, measured on that Xeon (docs/compile.md)
constexpr int64_t kFewBf16Rows = kFewRows < 4 ? kFewRows : 4;

typedef float vec16 __attribute__((vector_size(64)));

inline vec16 load16(const float* x) {
  vec16 v;
  std::memcpy(&v, x, sizeof v);
  return v;
}

typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t uvec16 __attribute__((vector_size(64)));

inline vec16 load16(const at::BFloat16* x) {  // exact, as load8
  u16x16 h;
  std::memcpy(&h, x, sizeof h);
  const uvec16 bits = __builtin_convertvector(h, uvec16) << 16;
  vec16 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// 16 lanes summed: halves added, then lane_sum's tree
inline float lane_sum16(vec16 s) {
  return lane_sum(__builtin_shufflevector(s, s, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(s, s, 8, 9, 10, 11, 12, 13, 14, 15));
}

// `count` values of a thread's reused buffer (no allocation a call) from a 64-byte boundary: a vector's own start is
// not aligned, and loads split across cache lines otherwise
template <typename T>
T* aligned_scratch(std::vector<T>& buffer, int64_t count) {
  constexpr int64_t per_line = 64 / sizeof(T);
  buffer.resize(count + per_line);
  return buffer.data() + (per_line - reinterpret_cast<uintptr_t>(buffer.data()) / sizeof(T) % per_line) % per_line;
}

// y[m, n] = w[n] . x[m] + b[n] for M rows, x fp32 interleaved [K / 16, M, 16], W and y fp32 or bf16 (a bf16 weight
// widened exactly, products and sums in fp32 and y rounded once, as oneDNN computes bf16): each of W's rows streamed
// once, in order, against all M inputs, the next rows prefetched (oneDNN reads an fp32 W at about half the copy
// bandwidth here). Every output sums 16 lanes in k order, then a fixed lane tree, whatever M is: a row gets the same
// bits alone as beside others.
template <int M, int NB, typename W>
void few_rows_block(const float* x, const W* w, const float* b, W* y, int64_t n, int64_t k_dim, int64_t n_dim) {
  const W* row = w + n * k_dim;
  vec16 acc[NB][M] = {};
  for (int64_t k = 0; k < k_dim; k += 16) {
    vec16 wk[NB];
    for (int j = 0; j < NB; ++j) {
      // 8 fp32 or 16 bf16 rows ahead, into L2 (a non-temporal hint read 9 GB/s on a Xeon; into L1 too, where x's
      // rows sit, ran four to nine fp32 rows 1.2-1.6x slower on a Zen 4)
      __builtin_prefetch(row + j * k_dim + k + 8 * sizeof(float) / sizeof(W) * k_dim, 0, 2);
      wk[j] = load16(row + j * k_dim + k);
    }
    for (int m = 0; m < M; ++m) {
      const vec16 xk = load16(x + k * M + m * 16);
      for (int j = 0; j < NB; ++j) acc[j][m] += wk[j] * xk;
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < M; ++m) {
      const float sum = lane_sum16(acc[j][m]);
      y[m * n_dim + n + j] = static_cast<W>(b == nullptr ? sum : sum + b[n + j]);
    }
}

template <int M, typename W>
void few_rows_linear(const float* x, const W* w, const float* b, W* y, int64_t n0, int64_t n1, int64_t k_dim,
                     int64_t n_dim) {
  // from nine rows on, two of W's rows at a time: each input load feeds two FMAs (a few percent faster there; the
  // same at eight); a row's output is the same sum either way
  constexpr int NB = M >= 9 ? 2 : 1;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) few_rows_block<M, NB>(x, w, b, y, n, k_dim, n_dim);
  for (; n < n1; ++n) few_rows_block<M, 1>(x, w, b, y, n, k_dim, n_dim);
}

template <typename W>
void few_rows_linear(int64_t rows, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                     at::Tensor& y) {
  const int64_t k_dim = w.size(1), n_dim = w.size(0);
  // x in fp32, interleaved [K / 16, rows, 16] so that each step of the loop reads its rows' lanes from one place
  // (rows k_dim apart ran three rows 10% slower than oneDNN)
  thread_local std::vector<float> packed_x;
  float* xp = aligned_scratch(packed_x, k_dim * rows);
  const W* xs = x.data_ptr<W>();
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t k = 0; k < k_dim; ++k) xp[(k / 16 * rows + m) * 16 + k % 16] = static_cast<float>(xs[m * k_dim + k]);
  const at::Tensor b = bias.has_value() ? compute(*bias).contiguous() : at::Tensor();
  const float* bp = bias.has_value() ? b.data_ptr<float>() : nullptr;
  const W* wp = w.data_ptr<W>();
  W* yp = y.data_ptr<W>();
  at::parallel_for(0, n_dim, 256, [&](int64_t n0, int64_t n1) {
    switch (rows) {
      case 1: few_rows_linear<1>(xp, wp, bp, yp, n0, n1, k_dim, n_dim); break;
      case 2: few_rows_linear<2>(xp, wp, bp, yp, n0, n1, k_dim, n_dim); break;
      case 3: few_rows_linear<3>(xp, wp, bp, yp, n0, n1, k_dim, n_dim); break;
#ifdef __AVX512F__
      case 4: few_rows_linear<4>(xp, wp, bp, yp, n0, n1, k_dim, n_dim); break;
      case 5: few_rows_linear<5>(xp, wp, bp, yp, n0, n1, k_dim, n_dim); break;
      case 6: few_rows_linear<6>(xp, wp, bp, yp, n0, n1, k_dim, n_dim); break;
      case 7: few_rows_linear<7>(xp, wp, bp, yp, n0, n1, k_dim, n_dim); break;
      case 8: few_rows_linear<8>(xp, wp, bp, yp, n0, n1, k_dim, n_dim); break;
      case 9: few_rows_linear<9>(xp, wp, bp, yp, n0, n1, k_dim, n_dim); break;
      case 10: few_rows_linear<10>(xp, wp, bp, yp, n0, n1, k_dim, n_dim); break;
      case 11: few_rows_linear<11>(xp, wp, bp, yp, n0, n1, k_dim, n_dim); break;
      case 12: few_rows_linear<12>(xp, wp, bp, yp, n0, n1, k_dim, n_dim); break;
#endif
      default: TORCH_CHECK(false, "few_rows_linear: ", rows, " rows");
    }
  });
}

#ifdef LEAPSERVE_AMX
// bf16 rows up to a tile's 16 through AMX's tile multiply, where the CPU has it: y^T [16 outputs, M rows] += W
// [16 outputs, 32 k] . x^T [32 k, M rows] per instruction, W's tiles read straight from the row-major weight. The
// multiply is far from its limit at any M, so 1 to 16 rows cost about the same, streaming W, where the own loop's
// widened FMAs slow down from five rows and oneDNN streams W more slowly (docs/compile.md). Each output is its row's sum over k in the tile's order, whatever M is: a
// row gets the same bits alone as beside others. Taken for K % 32 == 0 and N % 16 == 0 (every SmolLM2 and drafter
// weight); other shapes keep the loop's rows.
constexpr int64_t kAmxRows = 16;

// Linux gives a process AMX's tile state only once asked (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA)
bool amx_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return permitted;
}

bool amx_takes(int64_t k_dim, int64_t n_dim) { return amx_permitted() && k_dim % 32 == 0 && n_dim % 16 == 0; }

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: y^T blocks [16 outputs, M] fp32; 4-6: W blocks [16 outputs, 32 k] bf16; 7: x^T [16 k pairs, M pairs].
TileConfig amx_config(int64_t rows) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = t >= 4 && t < 7 ? 64 : static_cast<uint16_t>(rows * 4);
  }
  return c;
}

// NB blocks of 16 outputs from output n, over all of K: y^T into c [NB][16][16]. The next `ahead_bytes` of W (the
// following blocks, contiguous) are prefetched into L2 along the way: without it the hardware's streams, 64 rows
// read 64 bytes at a time, left a forward 1.5x slower; into L1 instead, or two groups ahead, 5-9% slower.
template <int NB>
void amx_blocks(const uint16_t* xt, const uint16_t* w, int64_t n, int64_t k_dim, int64_t rows, const char* ahead,
                int64_t ahead_bytes, float* c) {
  const int64_t stride = k_dim * 2, steps = k_dim / 32;
  const int64_t lines = (ahead_bytes / 64 + steps - 1) / steps;  // prefetched cache lines per k step
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (NB > 2) _tile_zero(2);
  if constexpr (NB > 3) _tile_zero(3);
  const uint16_t* row = w + n * k_dim;
  for (int64_t s = 0; s < steps; ++s) {
    for (int64_t i = s * lines; i < std::min((s + 1) * lines, ahead_bytes / 64); ++i)
      _mm_prefetch(ahead + 64 * i, _MM_HINT_T1);
    const int64_t k = 32 * s;
    _tile_loadd(7, xt + k * rows, rows * 4);
    _tile_loadd(4, row + k, stride);
    _tile_dpbf16ps(0, 4, 7);
    if constexpr (NB > 1) {
      _tile_loadd(5, row + 16 * k_dim + k, stride);
      _tile_dpbf16ps(1, 5, 7);
    }
    if constexpr (NB > 2) {
      _tile_loadd(6, row + 32 * k_dim + k, stride);
      _tile_dpbf16ps(2, 6, 7);
    }
    if constexpr (NB > 3) {
      _tile_loadd(4, row + 48 * k_dim + k, stride);
      _tile_dpbf16ps(3, 4, 7);
    }
  }
  _tile_stored(0, c, 64);
  if constexpr (NB > 1) _tile_stored(1, c + 256, 64);
  if constexpr (NB > 2) _tile_stored(2, c + 512, 64);
  if constexpr (NB > 3) _tile_stored(3, c + 768, 64);
}

void amx_linear(int64_t rows, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                at::Tensor& y) {
  const int64_t k_dim = w.size(1), n_dim = w.size(0);
  // x^T in tile 7's layout: per 32 k, [16 pairs of k][rows][2]
  thread_local std::vector<uint16_t> packed_x;
  uint16_t* xt = aligned_scratch(packed_x, k_dim * rows);
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (int64_t k = 0; k < k_dim; k += 32)
    for (int64_t pair = 0; pair < 16; ++pair)
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t j = 0; j < 2; ++j) xt[k * rows + (pair * rows + m) * 2 + j] = xs[m * k_dim + k + 2 * pair + j];
  const at::Tensor b = bias.has_value() ? compute(*bias).contiguous() : at::Tensor();
  const float* bp = bias.has_value() ? b.data_ptr<float>() : nullptr;
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const TileConfig config = amx_config(rows);
  at::parallel_for(0, n_dim / 16, 4, [&](int64_t b0, int64_t b1) {  // in blocks of 16 outputs
    _tile_loadconfig(&config);
    alignas(64) float c[4 * 16 * 16];
    for (int64_t blk = b0; blk < b1; blk += 4) {
      const int64_t nb = std::min<int64_t>(4, b1 - blk), n = 16 * blk;
      const char* ahead = reinterpret_cast<const char*>(wp + (n + 16 * nb) * k_dim);  // the next blocks
      const int64_t ahead_bytes = std::min<int64_t>(4, b1 - blk - nb) * 16 * k_dim * 2;
      switch (nb) {
        case 1: amx_blocks<1>(xt, wp, n, k_dim, rows, ahead, ahead_bytes, c); break;
        case 2: amx_blocks<2>(xt, wp, n, k_dim, rows, ahead, ahead_bytes, c); break;
        case 3: amx_blocks<3>(xt, wp, n, k_dim, rows, ahead, ahead_bytes, c); break;
        default: amx_blocks<4>(xt, wp, n, k_dim, rows, ahead, ahead_bytes, c);
      }
      for (int64_t i = 0; i < 16 * nb; ++i)  // c [block][16 outputs][rows] -> y [rows, N]
        for (int64_t m = 0; m < rows; ++m) {
          const float sum = c[i * 16 + m];
          yp[m * n_dim + n + i] = static_cast<at::BFloat16>(bp == nullptr ? sum : sum + bp[n + i]);
        }
    }
    _tile_release();
  });
}
#else
constexpr int64_t kAmxRows = 0;
bool amx_takes(int64_t, int64_t) { return false; }
void amx_linear(int64_t, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::Tensor&) {}
#endif

#ifdef LEAPSERVE_K_MAJOR
// Every row count of an fp32 or bf16 weight through one kernel, where the CPU has AVX-512 with its bf16 dot product
// but not AMX (measured on a Zen 4; AMX CPUs and others keep the paths above): W is packed once k-major, 64 outputs
// a group, [N / 64, K, 64] fp32 or [N / 64, K / 2, 64, 2] bf16 (a last group of 16 nb < 64 outputs [K, 16 nb] or
// [K / 2, 16 nb, 2]; `packed_linear.k_major_copy`). A register holds 16 outputs' weights at one k (fp32) or pair of
// k (bf16, vdpbf16ps: each fp32 lane adds the products of a pair of bf16s), and each row's x at that step is
// broadcast to them. Each output adds its K products (K / 2 pairs) in k order in one lane, whatever the row count
// and tile: a row gets the same bits alone, beside a draft tree or in a prefill. A tile of up to six rows reuses
// each load of W over them (4 of W's registers, 24 of accumulators); the next tiles read W's group from L2. On a
// 2-core Zen 4 the 121 GEMMs of a SmolLM2 forward ran in 0.67-0.96 of oneDNN's time from 1 to 128 rows in bf16,
// 0.72-1.01 in fp32, and at 512 rows level in bf16, 1.04-1.05x in fp32 (docs/compile.md).
bool k_major_takes(at::ScalarType dtype, int64_t k_dim, int64_t n_dim) {
  return n_dim % 16 == 0 && (dtype == at::kFloat || (dtype == at::kBFloat16 && k_dim % 2 == 0));
}

// acc's 16 lanes += w's lanes times x's (fp32), or w's pairs dotted with x's pair (bf16)
template <typename T>
inline __m512 multiply_add(__m512 acc, __m512i w, __m512i x) {
  if constexpr (std::is_same_v<T, float>)
    return _mm512_fmadd_ps(_mm512_castsi512_ps(w), _mm512_castsi512_ps(x), acc);
  else
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
}

// Outputs n .. n + 16 NB of R rows: x [R, steps] 4-byte steps (an fp32, or a pair of bf16s), wg the group's
// [steps, 16 NB, 4 bytes]
template <typename T, int R, int NB>
void k_major_tile(const uint32_t* x, int64_t steps, const T* wg, const float* b, T* y, int64_t n, int64_t n_dim) {
  constexpr int64_t per_register = 64 / sizeof(T);
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < steps; ++p) {
    __m512i wk[NB];
    for (int j = 0; j < NB; ++j) wk[j] = _mm512_loadu_si512(wg + (p * NB + j) * per_register);
    for (int r = 0; r < R; ++r) {
      const __m512i xp = _mm512_set1_epi32(static_cast<int>(x[r * steps + p]));
      for (int j = 0; j < NB; ++j) acc[r][j] = multiply_add<T>(acc[r][j], wk[j], xp);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) {
      __m512 v = acc[r][j];
      if (b != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(b + n + 16 * j));
      if constexpr (std::is_same_v<T, float>)
        _mm512_storeu_ps(y + r * n_dim + n + 16 * j, v);
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * n_dim + n + 16 * j), (__m256i)_mm512_cvtneps_pbh(v));
    }
}

// Every row against one group, in tiles of R (more rows where the group is narrower: its accumulators fit)
template <typename T, int NB>
void k_major_group(int64_t rows, const uint32_t* x, int64_t steps, const T* wg, const float* b, T* y, int64_t n,
                   int64_t n_dim) {
  constexpr int R = NB == 4 ? 6 : NB == 3 ? 7 : 10;
  int64_t m = 0;
  for (; m + R <= rows; m += R) k_major_tile<T, R, NB>(x + m * steps, steps, wg, b, y + m * n_dim, n, n_dim);
  const uint32_t* xr = x + m * steps;
  T* yr = y + m * n_dim;
  switch (rows - m) {
    case 0: break;
    case 1: k_major_tile<T, 1, NB>(xr, steps, wg, b, yr, n, n_dim); break;
    case 2: k_major_tile<T, 2, NB>(xr, steps, wg, b, yr, n, n_dim); break;
    case 3: k_major_tile<T, 3, NB>(xr, steps, wg, b, yr, n, n_dim); break;
    case 4: k_major_tile<T, 4, NB>(xr, steps, wg, b, yr, n, n_dim); break;
    case 5: k_major_tile<T, 5, NB>(xr, steps, wg, b, yr, n, n_dim); break;
    case 6: if constexpr (R > 6) k_major_tile<T, 6, NB>(xr, steps, wg, b, yr, n, n_dim); break;
    case 7: if constexpr (R > 7) k_major_tile<T, 7, NB>(xr, steps, wg, b, yr, n, n_dim); break;
    case 8: if constexpr (R > 8) k_major_tile<T, 8, NB>(xr, steps, wg, b, yr, n, n_dim); break;
    default: if constexpr (R > 9) k_major_tile<T, 9, NB>(xr, steps, wg, b, yr, n, n_dim); break;
  }
}

template <typename T>
void k_major_linear(int64_t rows, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                    at::Tensor& y, int64_t k_dim, int64_t n_dim) {
  const int64_t steps = k_dim * sizeof(T) / 4, groups = (n_dim + 63) / 64;
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<T>());
  const T* wp = w.data_ptr<T>();
  const at::Tensor b = bias.has_value() ? compute(*bias).contiguous() : at::Tensor();
  const float* bp = bias.has_value() ? b.data_ptr<float>() : nullptr;
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n = 64 * g, nb = std::min<int64_t>(4, (n_dim - n) / 16);
      const T* wg = wp + n * k_dim;
      switch (nb) {
        case 1: k_major_group<T, 1>(rows, xp, steps, wg, bp, yp, n, n_dim); break;
        case 2: k_major_group<T, 2>(rows, xp, steps, wg, bp, yp, n, n_dim); break;
        case 3: k_major_group<T, 3>(rows, xp, steps, wg, bp, yp, n, n_dim); break;
        default: k_major_group<T, 4>(rows, xp, steps, wg, bp, yp, n, n_dim);
      }
    }
  });
}

void k_major_linear(int64_t rows, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                    at::Tensor& y) {
  const int64_t n_dim = y.size(-1), k_dim = x.size(-1);
  if (x.scalar_type() == at::kFloat)
    k_major_linear<float>(rows, x, w, bias, y, k_dim, n_dim);
  else
    k_major_linear<at::BFloat16>(rows, x, w, bias, y, k_dim, n_dim);
}
#else
bool k_major_takes(at::ScalarType, int64_t, int64_t) { return false; }
void k_major_linear(int64_t, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::Tensor&) {
  TORCH_CHECK(false, "leapserve_cpu: built without the k-major GEMM (a CPU with AVX-512's bf16 dot product, no AMX)");
}
#endif

// The most rows of `dtype` that the op streams through its loop or AMX's tiles for a [n_dim, k_dim] weight packed
// for oneDNN (more go to oneDNN): for bf16 AMX's where it takes the shape, else the loop's (a width divisible by 16).
int64_t streamed_rows(at::ScalarType dtype, int64_t k_dim, int64_t n_dim) {
  if (dtype == at::kBFloat16 && amx_takes(k_dim, n_dim)) return kAmxRows;
  if (k_dim % 16 != 0) return 0;
  return dtype == at::kFloat ? kFewRows : dtype == at::kBFloat16 ? kFewBf16Rows : 0;
}

// The most rows of `dtype` the op computes itself: every count of a weight packed k-major, else streamed_rows.
int64_t own_rows(at::ScalarType dtype, int64_t k_dim, int64_t n_dim) {
  return k_major_takes(dtype, k_dim, n_dim) ? std::numeric_limits<int64_t>::max() : streamed_rows(dtype, k_dim, n_dim);
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const int64_t k_dim = weight.size(1), n_dim = weight.size(0);
  const int64_t rows = x.dim() >= 2 && x.size(-1) == k_dim ? x.numel() / k_dim : 0;  // [..., K]: leading dims are rows
  const auto dtype = weight.scalar_type();
  auto in_k_major = k_major.find(reinterpret_cast<int64_t>(weight.data_ptr()));
  if (in_k_major != k_major.end()) {  // every row count, for the same bits; ATen's linear where told not to
    if (!native_gemv || rows < 1 || x.scalar_type() != dtype) return at::linear(x, weight, bias);
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = n_dim;
    at::Tensor y = at::detail::empty_cpu(shape, x.scalar_type());
    k_major_linear(rows, x.contiguous(), in_k_major->second, bias, y);
    return y;
  }
  if (native_gemv && rows >= 1 && rows <= streamed_rows(dtype, k_dim, n_dim) && x.scalar_type() == dtype &&
      weight.is_contiguous()) {
    const at::Tensor input = x.contiguous();
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = n_dim;
    at::Tensor y = at::detail::empty_cpu(shape, x.scalar_type());  // not through the dispatcher
    if (dtype == at::kFloat)
      few_rows_linear<float>(rows, input, weight, bias, y);
    else if (amx_takes(k_dim, n_dim))
      amx_linear(rows, input, weight, bias, y);
    else
      few_rows_linear<at::BFloat16>(rows, input, weight, bias, y);
    return y;
  }
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  auto it = packed.find(reinterpret_cast<int64_t>(weight.data_ptr()));
  TORCH_CHECK(it != packed.end(), "leapserve_cpu::packed_linear: this weight has no packed copy");
  torch::jit::Stack stack{x,
                          it->second,
                          bias,
                          std::string("none"),
                          c10::List<std::optional<at::Scalar>>(),
                          std::optional<std::string>(std::string())};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// Attention of sequences with few queries, read straight from the paged cache (no gather into a padded batch), in
// fp32 from an fp32 or bf16 cache (T), as SDPA computes a bf16 one (reference.attend).
// A task takes one sequence, and all its KV heads where there are sequences enough to keep every thread busy (each
// key row is then read whole, once); with fewer, one KV head and a block of its query rows (a tree's rows split so
// that no thread idles). It scores every query row of the group against eight keys at a time, then weighs each value
// row; a task with many rows over a bf16 cache first widens its keys and values to fp32 once (exactly), instead of
// once per row. A query row's result depends only on its own visible keys, in slot order: a token attended in a
// decode step or as a draft tree's root gets the same bits.
template <typename T>
void short_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const std::vector<const SeqPlan*>& seqs, double scale, at::Tensor& out) {
  const int64_t q_heads = q.size(1), kv_heads = k_cache.size(2), dim = k_cache.size(3), group = q_heads / kv_heads;
  const int64_t num_seqs = static_cast<int64_t>(seqs.size()), threads = at::get_num_threads();
  const int64_t heads_per_task = num_seqs >= 2 * threads ? kv_heads : 1, head_tasks = kv_heads / heads_per_task;
  constexpr int64_t kBlockRows = 4;  // the fewest query rows of a block (a decode step's group of 3 stays whole)
  constexpr int64_t kWidenRows = 4;  // rows of a task over a bf16 cache from which its K/V are widened first
  int64_t max_rows = 0;
  for (const SeqPlan* p : seqs) max_rows = std::max(max_rows, (p->end - p->start) * group);
  const int64_t row_blocks =  // tasks enough for every thread where the sequences alone do not make them
      num_seqs >= 2 * threads ? 1
                              : std::clamp<int64_t>((2 * threads + num_seqs * kv_heads - 1) / (num_seqs * kv_heads),
                                                    1, std::max<int64_t>(1, max_rows / kBlockRows));
  const float* qp = q.data_ptr<float>();
  const T* kp = k_cache.data_ptr<T>();  // [slots, Hkv, D]: contiguous (checked when pushed)
  const T* vp = v_cache.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale), neg_inf = -std::numeric_limits<float>::infinity();
  constexpr uint64_t kAllVisible = 0x0101010101010101ULL;  // eight true bools
  const std::vector<T> zero_row(dim, T(0.0f));  // a key of zeros padding the last eight
  const std::vector<float> zero_row_fp32(dim, 0.0f);
  at::parallel_for(0, num_seqs * head_tasks * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, total, k_rows, v_rows;
    for (int64_t task = begin; task < end; ++task) {
      const SeqPlan& p = *seqs[task / (head_tasks * row_blocks)];
      const int64_t n = p.end - p.start, rows = n * group, block = task % row_blocks;
      const int64_t r0 = rows * block / row_blocks, r1 = rows * (block + 1) / row_blocks;
      if (r0 == r1) continue;
      const int64_t num_keys = p.keys.has_value() ? p.keys->size(0) : p.key_len, ctx = num_keys - n;
      const int64_t stride = (num_keys + 7) / 8 * 8;
      const int64_t* slots = p.keys.has_value() ? p.keys->data_ptr<int64_t>() : nullptr;
      const bool* mask = p.mask.has_value() ? p.mask->data_ptr<bool>() : nullptr;
      auto slot = [&](int64_t j) { return slots ? slots[j] : p.key_start + j; };
      const int64_t h0 = task / row_blocks % head_tasks * heads_per_task;
      for (int64_t h = h0; h < h0 + heads_per_task; ++h) {
        // row r = i * group + g: query token i, query head h * group + g; rows r0..r1 of them here
        auto row_offset = [&](int64_t r) { return ((p.start + r / group) * q_heads + h * group + r % group) * dim; };
        // key_row(j), value_row(j): key j's K and V rows of head h (in the cache, or widened), zeros: a K row of 0s
        auto attend = [&](auto key_row, auto value_row, auto zeros) __attribute__((always_inline)) {
          scores.assign((r1 - r0) * stride, neg_inf);  // [rows, keys rounded up to 8]
          for (int64_t j0 = 0; j0 < num_keys; j0 += 8) {  // 8 keys at a time (the last group padded with zeros)
            const int64_t valid = std::min<int64_t>(8, num_keys - j0);
            decltype(zeros) keys[8];
            for (int64_t k = 0; k < 8; ++k) keys[k] = k < valid ? key_row(j0 + k) : zeros;
            for (int64_t r = r0; r < r1; ++r) {
              const float* query = qp + row_offset(r);
              vec8 acc8[8] = {};
              for (int64_t d = 0; d < dim; d += 8) {
                const vec8 x = load8(query + d);
                for (int k = 0; k < 8; ++k) acc8[k] += x * load8(keys[k] + d);
              }
              const vec8 dots = lane_sums(acc8) * sc;
              const int64_t i = r / group;
              float* row = scores.data() + (r - r0) * stride;
              uint64_t visible8 = 0;
              if (mask && valid == 8) std::memcpy(&visible8, mask + i * num_keys + j0, sizeof visible8);
              if (valid == 8 && (mask ? visible8 == kAllVisible : !p.causal || j0 + 7 <= ctx + i)) {
                std::memcpy(row + j0, &dots, sizeof dots);
                continue;
              }
              for (int64_t k = 0; k < valid; ++k) {
                const int64_t j = j0 + k;
                const bool visible = mask ? mask[i * num_keys + j] : (!p.causal || j <= ctx + i);
                row[j] = visible ? dots[k] : neg_inf;
              }
            }
          }
          total.assign(r1 - r0, 0.0f);
          for (int64_t r = 0; r < r1 - r0; ++r) {
            float* row = scores.data() + r * stride;
            float top = neg_inf;
            for (int64_t j = 0; j < num_keys; ++j) top = std::max(top, row[j]);
            if (top == neg_inf) continue;  // no visible key: the row stays 0 (SDPA would give NaN)
            // Lane l sums the visible keys of rank l mod 8 (rank: visible keys before it), in slot order: the same
            // sum however many keys follow the row's last visible one, and for a draft tree's node, whose masked
            // siblings sit among its keys, as for the same token decoded alone. Up to a masked row's first hidden
            // key's group, rank is j, eight keys at a time (the padding adds zeros); from there, key by key.
            const bool* visible = mask ? mask + (r0 + r) / group * num_keys : nullptr;
            int64_t by_rank = stride;
            if (visible) {  // memchr: a tree's rows over long contexts scanned key by key cost ~1 ms a step
              const void* hidden = std::memchr(visible, 0, num_keys);
              if (hidden != nullptr) by_rank = (static_cast<const bool*>(hidden) - visible) / 8 * 8;
            }
            vec8 sum = {};
            for (int64_t j = 0; j < stride; j += 8) {
              const vec8 e = exp_nonpositive(load8(row + j) - top);
              std::memcpy(row + j, &e, sizeof e);
              if (j < by_rank) sum += e;
            }
            for (int64_t j = by_rank, rank = by_rank; j < num_keys; ++j)
              if (visible[j]) sum[rank++ % 8] += row[j];
            total[r] = lane_sum(sum);
          }
          for (int64_t r = r0; r < r1; ++r) {  // each row's weighted values, 64 dims at a time held in registers
            const float* w = scores.data() + (r - r0) * stride;
            float* o = op + row_offset(r);
            const float inv = total[r - r0] > 0.0f ? 1.0f / total[r - r0] : 0.0f;
            for (int64_t d0 = 0; d0 < dim; d0 += 64) {
              const int64_t chunks = std::min<int64_t>(8, (dim - d0) / 8);
              vec8 acc8[8] = {};
              for (int64_t j = 0; j < num_keys; ++j) {
                if (w[j] == 0.0f) continue;  // masked (a stale slot may hold NaN) or negligible
                const auto value = value_row(j) + d0;
                for (int64_t c = 0; c < chunks; ++c) acc8[c] += w[j] * load8(value + 8 * c);
              }
              for (int64_t c = 0; c < chunks; ++c) {
                const vec8 y = acc8[c] * inv;
                std::memcpy(o + d0 + 8 * c, &y, sizeof y);
              }
            }
          }
        };
        if (std::is_same_v<T, float> || r1 - r0 < kWidenRows) {
          attend([&](int64_t j) { return kp + (slot(j) * kv_heads + h) * dim; },
                 [&](int64_t j) { return vp + (slot(j) * kv_heads + h) * dim; }, zero_row.data());
          continue;
        }
        k_rows.resize(num_keys * dim);
        v_rows.resize(num_keys * dim);
        for (int64_t j = 0; j < num_keys; ++j) {
          const T* k = kp + (slot(j) * kv_heads + h) * dim;
          const T* v = vp + (slot(j) * kv_heads + h) * dim;
          for (int64_t d = 0; d < dim; d += 8) {
            const vec8 kj = load8(k + d), vj = load8(v + d);
            std::memcpy(k_rows.data() + j * dim + d, &kj, sizeof kj);
            std::memcpy(v_rows.data() + j * dim + d, &vj, sizeof vj);
          }
        }
        attend([&](int64_t j) { return static_cast<const float*>(k_rows.data() + j * dim); },
               [&](int64_t j) { return static_cast<const float*>(v_rows.data() + j * dim); }, zero_row_fp32.data());
      }
    }
  });
}

// A contiguous [num_blocks, block_size, H, D] cache as [slots, H, D].
at::Tensor flat(const at::Tensor& cache) { return cache.view({-1, cache.size(2), cache.size(3)}); }

// One sequence's attention through SDPA, as reference.attend runs it: [n, Hq, D] in fp32.
at::Tensor attend_one(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const SeqPlan& p,
                      double scale) {
  at::Tensor keys, values;
  if (p.keys.has_value()) {
    keys = flat(k_cache).index_select(0, *p.keys).unsqueeze(0).transpose(1, 2);
    values = flat(v_cache).index_select(0, *p.keys).unsqueeze(0).transpose(1, 2);
  } else {
    keys = heads_view(k_cache, p.key_start, p.key_len);
    values = heads_view(v_cache, p.key_start, p.key_len);
  }
  auto queries = q.slice(0, p.start, p.end).transpose(0, 1).unsqueeze(0);
  return at::scaled_dot_product_attention(compute(queries), compute(keys), compute(values), p.mask, 0.0, p.causal,
                                          scale, true)[0]
      .transpose(0, 1);
}

// cache[slots[t]] = rows[t] for a contiguous [num_blocks, block_size, H, D] cache and rows [T, H, D] (a row's heads
// at any stride, its dims consecutive: v is a view into the fused qkv output): row copies, no dispatched op.
void write_rows(const at::Tensor& cache, const at::Tensor& slots, const at::Tensor& rows) {
  const int64_t heads = cache.size(2), dim = cache.size(3), num_slots = cache.size(0) * cache.size(1);
  if (rows.scalar_type() != cache.scalar_type() || rows.dim() != 3 || rows.size(1) != heads || rows.size(2) != dim ||
      rows.stride(2) != 1 || slots.scalar_type() != at::kLong || !slots.is_contiguous()) {
    flat(cache).index_copy_(0, slots, rows);
    return;
  }
  const int64_t n = slots.numel(), bytes = dim * static_cast<int64_t>(cache.element_size());
  TORCH_CHECK(rows.size(0) == n, "leapserve_cpu::paged_attention: ", rows.size(0), " new K/V rows for ", n, " slots");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const char* src = static_cast<const char*>(rows.data_ptr());
  char* dst = static_cast<char*>(cache.data_ptr());
  const int64_t row_stride = rows.stride(0) * rows.element_size(), head_stride = rows.stride(1) * rows.element_size();
  for (int64_t t = 0; t < n; ++t)  // all checked before any is written: a refused step leaves the cache as it was
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "leapserve_cpu::paged_attention: slot ", slot[t],
                " outside the cache's ", num_slots);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t h = 0; h < heads; ++h)
      std::memcpy(dst + (slot[t] * heads + h) * bytes, src + t * row_stride + h * head_stride, bytes);
  }
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t layer,
                           double scale) {
  TORCH_CHECK(!steps.empty(), "leapserve attention ran outside a forward_context (run the model through the engine)");
  const Step& s = steps.back();
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(s.k.size()), "leapserve_cpu::paged_attention: no layer ",
              layer, " in this step's cache");
  const at::Tensor& k_cache = s.k[layer];
  const at::Tensor& v_cache = s.v[layer];
  const int64_t kv_heads = k_cache.size(2), dim = k_cache.size(3), q_heads = q.size(1);
  write_rows(k_cache, s.slot_mapping, k);
  write_rows(v_cache, s.slot_mapping, v);

  const auto dtype = k_cache.scalar_type();
  if (native_attention && q.scalar_type() == dtype && (dtype == at::kFloat || dtype == at::kBFloat16) && dim % 8 == 0) {
    std::vector<const SeqPlan*> few;
    for (const SeqPlan& p : s.seqs)
      if (p.end - p.start <= kShortQueries) few.push_back(&p);
    if (!few.empty()) {
      const at::Tensor queries = compute(q).contiguous();  // [T, Hq, D] fp32
      at::Tensor out = at::detail::empty_cpu(queries.sizes(), at::kFloat);
      if (dtype == at::kFloat) short_attention<float>(queries, k_cache, v_cache, few, scale, out);
      else short_attention<at::BFloat16>(queries, k_cache, v_cache, few, scale, out);
      for (const SeqPlan& p : s.seqs)  // prefill
        if (p.end - p.start > kShortQueries)
          out.slice(0, p.start, p.end).copy_(attend_one(q, k_cache, v_cache, p, scale));
      return as_dtype(out, q.scalar_type());
    }
  }
  if (s.batched) {  // [B, H, max_q, max_keys], padded queries and keys masked
    const int64_t num_seqs = s.mask.size(0);
    at::Tensor queries =
        s.max_q == 1 ? q.unsqueeze(1) : q.new_zeros({num_seqs * s.max_q, q_heads, dim}).index_copy_(0, s.rows, q);
    queries = queries.view({num_seqs, s.max_q, q_heads, dim}).transpose(1, 2);
    auto keys = flat(k_cache).index_select(0, s.slots).view({num_seqs, -1, kv_heads, dim}).transpose(1, 2);
    auto values = flat(v_cache).index_select(0, s.slots).view({num_seqs, -1, kv_heads, dim}).transpose(1, 2);
    auto o = at::scaled_dot_product_attention(compute(queries), compute(keys), compute(values), s.mask, 0.0, false,
                                              scale, true);
    o = o.transpose(1, 2).reshape({num_seqs * s.max_q, q_heads, dim});
    return as_dtype(s.max_q == 1 ? o : o.index_select(0, s.rows), q.scalar_type());
  }
  at::Tensor out;
  if (s.seqs.size() != 1) out = at::empty_like(q);
  for (const SeqPlan& p : s.seqs) {
    auto o = attend_one(q, k_cache, v_cache, p, scale);
    if (s.seqs.size() == 1) return as_dtype(o, q.scalar_type());
    out.slice(0, p.start, p.end).copy_(o);
  }
  return out;
}

void register_packed(int64_t key, const at::Tensor& packed_weight, bool is_k_major) {
  (is_k_major ? k_major : packed)[key] = packed_weight;
}

void release_packed(int64_t key) {
  packed.erase(key);
  k_major.erase(key);
}

void set_native_attention(bool enabled) { native_attention = enabled; }

void set_native_gemv(bool enabled) { native_gemv = enabled; }

bool get_native_gemv() { return native_gemv; }

bool get_native_attention() { return native_attention; }

void push_step(std::vector<at::Tensor> k, std::vector<at::Tensor> v, const at::Tensor& slot_mapping,
               const std::optional<at::Tensor>& slots, const std::optional<at::Tensor>& mask,
               const std::optional<at::Tensor>& rows, int64_t max_q, const std::vector<int64_t>& starts,
               const std::vector<int64_t>& ends, const std::vector<int64_t>& key_starts,
               const std::vector<int64_t>& key_lens, const std::vector<std::optional<at::Tensor>>& keys,
               const std::vector<std::optional<at::Tensor>>& masks, const std::vector<bool>& causal) {
  for (size_t i = 0; i < k.size(); ++i)
    TORCH_CHECK(k[i].is_contiguous() && v[i].is_contiguous(), "leapserve_cpu: the KV cache must be contiguous");
  Step s;
  s.k = std::move(k);
  s.v = std::move(v);
  s.slot_mapping = slot_mapping;
  if (slots.has_value()) {
    s.batched = true;
    s.slots = *slots;
    s.mask = *mask;
    s.rows = *rows;
    s.max_q = max_q;
  }
  for (size_t i = 0; i < starts.size(); ++i)
    s.seqs.push_back({starts[i], ends[i], key_starts[i], key_lens[i],
                      keys[i].has_value() ? std::optional<at::Tensor>(keys[i]->contiguous()) : std::nullopt,
                      masks[i].has_value() ? std::optional<at::Tensor>(masks[i]->contiguous()) : std::nullopt,
                      causal[i]});
  steps.push_back(std::move(s));
}

void pop_step() {
  TORCH_CHECK(!steps.empty(), "leapserve_cpu: no step to pop");
  steps.pop_back();
}

}  // namespace

TORCH_LIBRARY(leapserve_cpu, m) {
  m.def("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("paged_attention(Tensor q, Tensor k, Tensor v, int layer, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(leapserve_cpu, CPU, m) {
  m.impl("packed_linear", packed_linear);
  m.impl("paged_attention", paged_attention);
}

// The same ops as C functions with inductor's C-shim ABI (declared to it in cpu_ops.py): its C++ wrapper calls these
// directly instead of through the dispatcher's boxed path (a schema lookup and a stack of IValues per call, ~150
// calls a step). The profiler still sees each call under the op's name.
extern "C" {

AOTITorchError aoti_torch_cpu_packed_linear(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle* bias,
                                            AtenTensorHandle* ret0) {
  using namespace torch::aot_inductor;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    RECORD_FUNCTION("leapserve_cpu::packed_linear", std::vector<c10::IValue>());
    const std::optional<at::Tensor> b =
        bias == nullptr ? std::nullopt : std::optional<at::Tensor>(*tensor_handle_to_tensor_pointer(*bias));
    *ret0 = new_tensor_handle(
        packed_linear(*tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(weight), b));
  });
}

AOTITorchError aoti_torch_cpu_paged_attention(AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v,
                                              int64_t layer, double scale, AtenTensorHandle* ret0) {
  using namespace torch::aot_inductor;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    RECORD_FUNCTION("leapserve_cpu::paged_attention", std::vector<c10::IValue>());
    *ret0 = new_tensor_handle(paged_attention(*tensor_handle_to_tensor_pointer(q), *tensor_handle_to_tensor_pointer(k),
                                              *tensor_handle_to_tensor_pointer(v), layer, scale));
  });
}

}  // extern "C"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("register_packed", &register_packed);
  m.def("release_packed", &release_packed);
  m.def("push_step", &push_step);
  m.def("pop_step", &pop_step);
  m.def("set_native_attention", &set_native_attention);
  m.def("native_attention", &get_native_attention);
  m.def("set_native_gemv", &set_native_gemv);
  m.def("native_gemv", &get_native_gemv);
  m.def("few_rows", [](bool bf16) { return bf16 ? kFewBf16Rows : kFewRows; });
  m.def("own_rows", [](bool bf16, int64_t k_dim, int64_t n_dim) {
    return own_rows(bf16 ? at::kBFloat16 : at::kFloat, k_dim, n_dim);
  });
}
