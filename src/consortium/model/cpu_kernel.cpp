// y = x W^T for quantized weights with fp32 activations and fp32 sums: the strict class's compact
// CPU kernel (cpu_kernel.py builds it). Weights come in blocks of 32 along a row:
//   Q4: 16 bytes of codes c in 0..15 (code j in the low nibble of byte j, code j + 16 in its high
//       nibble), one scale s and one zero z: W = c * s + z;
//   Q8: 32 int8 codes q, one scale per 16 of them and one zero: W = q * s + z.
// The zero is optional in both (absent: 0). Both are exact images of GGUF blocks (cpu_kernel.py
// maps each format onto one of them). Outputs are stored in tiles of 4, block-major within a
// tile (see `tile`), so the number of outputs is a multiple of 4.
//
// Every output is summed in one fixed order whatever the number of rows, the row's place in the
// batch, the tile or the thread count: one 16-lane accumulator over the blocks of a row, then the
// lanes in order, then the zero terms. So a session's row has the same bits alone as in any batch
// (batch-invariant), while the rows of a batch share each block's decoding and a tile of outputs
// shares each load of x. GCC/Clang vector extensions (one source for AVX-512, AVX2 and NEON),
// with AVX-512 intrinsics where GCC's generic code is slow.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef int8_t i8x16 __attribute__((vector_size(16)));

// 16 bytes to 16 floats, unsigned or signed. x86 uses its widening instructions: GCC 12 turns
// the generic conversion of bytes into scalar code in some contexts.
#if defined(__AVX512F__)
inline f32x16 to_float(u8x16 q) {
  return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32((__m128i)q));
}
inline f32x16 to_float_signed(u8x16 q) {
  return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32((__m128i)q));
}
#else
inline f32x16 to_float(u8x16 q) {
  return __builtin_convertvector(__builtin_convertvector(q, i32x16), f32x16);
}
inline f32x16 to_float_signed(u8x16 q) {
  return __builtin_convertvector(__builtin_convertvector((i8x16)q, i32x16), f32x16);
}
#endif

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The 16 lanes in one fixed tree: halves, quarters, eighths, then the last pair.
inline float lanes_sum(f32x16 v) {
  typedef float f32x8 __attribute__((vector_size(32)));
  typedef float f32x4 __attribute__((vector_size(16)));
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// Q4: each block's 16 possible weights c * s + z (one FMA, rounded once: the value llama.cpp's
// fp32 dequantization gives), looked up by code; the zero needs no separate term.
struct Q4 {
  static constexpr int64_t kBytes = 16, kScales = 1;
  static constexpr bool kZeroInTable = true;
  static inline void decode(const uint8_t* w, const float* s, const float* z, f32x16& lo, f32x16& hi) {
    const float zb = z ? z[0] : 0.f;
#if defined(__AVX512F__)
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(s[0]), _mm512_set1_ps(zb));
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    lo = (f32x16)_mm512_permutexvar_ps(v, table);  // an index's low 4 bits: the low nibble
    hi = (f32x16)_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
#else
    u8x16 q;
    std::memcpy(&q, w, 16);
    lo = to_float(q & 15) * s[0] + zb;
    hi = to_float(q >> 4) * s[0] + zb;
#endif
  }
};

struct Q8 {
  static constexpr int64_t kBytes = 32, kScales = 2;
  static constexpr bool kZeroInTable = false;  // zeros as separate terms (zero_terms)
  static inline void decode(const uint8_t* w, const float* s, const float*, f32x16& lo, f32x16& hi) {
    u8x16 a, b;
    std::memcpy(&a, w, 16);
    std::memcpy(&b, w + 16, 16);
    lo = to_float_signed(a) * s[0];
    hi = to_float_signed(b) * s[1];
  }
};

constexpr int64_t kOutTile = 4;  // outputs stored interleaved, sharing each load of x
constexpr int64_t kRowTile = 4;  // rows sharing each decoded block
constexpr int64_t kMaxHeadDim = 256;  // attend_decode's accumulators

// The zero terms of output t of a tile: sum_b z[b][t] * xs[b], in order.
inline float zero_terms(const float* z, int t, const float* xs, int64_t nb) {
  if (z == nullptr) return 0.f;
  float s = 0.f;
  for (int64_t b = 0; b < nb; ++b) s += z[b * kOutTile + t] * xs[b];
  return s;
}

// One tile of 4 outputs for rows 0 .. R - 1 of x. Storage is tile-major: block b of output t at
// w + (b * 4 + t) * kBytes, its scales at s + (b * 4 + t) * kScales, its zero at z[b * 4 + t], so
// a thread reads one stream of codes and one of scales. Each (output, row) has one accumulator
// that every block adds to in the same two steps whatever R.
template <typename F, int R>
inline void tile(const float* x, int64_t ldx, const uint8_t* w, const float* s, const float* z,
                 const float* xs, int64_t nb, float* y, int64_t ldy) {
  constexpr int T = kOutTile;
  f32x16 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = f32x16{};
  for (int64_t b = 0; b < nb; ++b) {
    f32x16 xl[R], xh[R];
    for (int r = 0; r < R; ++r) {
      xl[r] = load16(x + r * ldx + b * 32);
      xh[r] = load16(x + r * ldx + b * 32 + 16);
    }
    for (int t = 0; t < T; ++t) {
      f32x16 lo, hi;
      const int64_t at = b * T + t;
      F::decode(w + at * F::kBytes, s + at * F::kScales, z && F::kZeroInTable ? z + at : nullptr, lo, hi);
      for (int r = 0; r < R; ++r) {
#if defined(__AVX512F__)
        // explicit FMAs: the compiler may not contract or split them differently per tile shape
        acc[t][r] = (f32x16)_mm512_fmadd_ps((__m512)lo, (__m512)xl[r], (__m512)acc[t][r]);
        acc[t][r] = (f32x16)_mm512_fmadd_ps((__m512)hi, (__m512)xh[r], (__m512)acc[t][r]);
#else
        acc[t][r] += lo * xl[r];  // built with -ffp-contract=off: a product, then a sum, always
        acc[t][r] += hi * xh[r];
#endif
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r)
      y[r * ldy + t] = lanes_sum(acc[t][r]) + zero_terms(F::kZeroInTable ? nullptr : z, t, xs + r * nb, nb);
}

// Tiles [i0, i1) for every row of x, kRowTile rows at a time.
template <typename F>
void rows(const float* x, int64_t m, int64_t k, const uint8_t* w, const float* s, const float* z,
          const float* xs, int64_t nb, float* y, int64_t n, int64_t i0, int64_t i1) {
  for (int64_t r = 0; r < m; r += kRowTile) {
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* wi = w + i * nb * kOutTile * F::kBytes;
      const float* si = s + i * nb * kOutTile * F::kScales;
      const float* zi = z ? z + i * nb * kOutTile : nullptr;
      const float* xr = x + r * k;
      const float* xsr = xs + r * nb;
      float* yr = y + r * n + i * kOutTile;
      switch (std::min(kRowTile, m - r)) {
        case 4: tile<F, 4>(xr, k, wi, si, zi, xsr, nb, yr, n); break;
        case 3: tile<F, 3>(xr, k, wi, si, zi, xsr, nb, yr, n); break;
        case 2: tile<F, 2>(xr, k, wi, si, zi, xsr, nb, yr, n); break;
        default: tile<F, 1>(xr, k, wi, si, zi, xsr, nb, yr, n);
      }
    }
  }
}

// Shapes and dtypes of one weight; returns (format is Q8, blocks per row).
std::pair<bool, int64_t> check(const torch::Tensor& codes, const torch::Tensor& scale,
                               const c10::optional<torch::Tensor>& zero) {
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && !codes.is_cuda(),
              "codes must be a contiguous CPU matrix");
  const bool q8 = codes.dtype() == torch::kInt8;
  TORCH_CHECK(q8 || codes.dtype() == torch::kUInt8, "codes must be uint8 (Q4) or int8 (Q8)");
  const int64_t per_block = q8 ? Q8::kBytes : Q4::kBytes;
  TORCH_CHECK(codes.size(1) % per_block == 0, "a row of codes must hold whole blocks of 32");
  const int64_t n = codes.size(0), nb = codes.size(1) / per_block;
  TORCH_CHECK(n % kOutTile == 0, "the number of outputs must be a multiple of ", kOutTile);
  const int64_t scales = nb * (q8 ? Q8::kScales : Q4::kScales);
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(0) == n && scale.size(1) == scales,
              "scale must be contiguous float32 [N, ", scales, "]");
  if (zero)
    TORCH_CHECK(zero->dtype() == torch::kFloat32 && zero->is_contiguous() && zero->dim() == 2 &&
                    zero->size(0) == n && zero->size(1) == nb,
                "zero must be contiguous float32 [N, ", nb, "]");
  return {q8, nb};
}

}  // namespace

torch::Tensor linear(const torch::Tensor& x_in, const torch::Tensor& codes,
                     const torch::Tensor& scale, const c10::optional<torch::Tensor>& zero) {
  const auto [q8, nb] = check(codes, scale, zero);
  const int64_t n = codes.size(0), k = nb * 32;
  TORCH_CHECK(x_in.dtype() == torch::kFloat32 && x_in.dim() >= 1 && x_in.size(-1) == k &&
                  !x_in.is_cuda(),
              "x must be float32 [..., ", k, "] on the CPU");
  const auto x = x_in.reshape({-1, k}).contiguous();
  const int64_t m = x.size(0);
  auto y = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  std::vector<float> xs(m * nb);  // each row's block sums, for the zero terms
  if (zero && q8)
    for (int64_t i = 0; i < m * nb; ++i) xs[i] = lanes_sum(load16(xp + i * 32) + load16(xp + i * 32 + 16));
  const float* xsp = xs.data();
  const uint8_t* w = static_cast<const uint8_t*>(codes.data_ptr());
  const float* s = scale.data_ptr<float>();
  const float* z = zero ? zero->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (m > 0)
    at::parallel_for(0, n / kOutTile, 4, [&](int64_t i0, int64_t i1) {
      if (q8)
        rows<Q8>(xp, m, k, w, s, z, xsp, nb, yp, n, i0, i1);
      else
        rows<Q4>(xp, m, k, w, s, z, xsp, nb, yp, n, i0, i1);
    });
  auto shape = x_in.sizes().vec();
  shape.back() = n;
  return y.view(shape);
}

// Rows [n0, n1) of W in fp32, each weight exactly as `linear` uses it (c * s + z, or q * s + z):
// many rows of one session go through GEMM over these instead.
torch::Tensor dequant(const torch::Tensor& codes, const torch::Tensor& scale,
                      const c10::optional<torch::Tensor>& zero, int64_t n0, int64_t n1) {
  const auto [q8, nb] = check(codes, scale, zero);
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= codes.size(0), "row range out of bounds");
  auto out = torch::empty({n1 - n0, nb * 32}, scale.options());
  const uint8_t* w = static_cast<const uint8_t*>(codes.data_ptr());
  const float* s = scale.data_ptr<float>();
  const float* z = zero ? zero->data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r)
      for (int64_t j = 0; j < nb; ++j) {
        // block j of output r in the tile-major storage
        const int64_t blk = (r / kOutTile * nb + j) * kOutTile + r % kOutTile;
        f32x16 lo, hi;
        if (q8)
          Q8::decode(w + blk * Q8::kBytes, s + blk * Q8::kScales, nullptr, lo, hi);
        else
          Q4::decode(w + blk * Q4::kBytes, s + blk * Q4::kScales, z ? z + blk : nullptr, lo, hi);
        if (q8 && z) {
          lo += z[blk];
          hi += z[blk];
        }
        float* dst = o + ((r - n0) * nb + j) * 32;
        std::memcpy(dst, &lo, 64);
        std::memcpy(dst + 16, &hi, 64);
      }
  });
  return out;
}

// RMSNorm of fp32 rows in one pass: y = x / sqrt(mean(x^2) + eps) * w, the squares summed in 16
// lanes and then in order (one row's result never depends on the others). One call instead of
// the half-dozen ops of the composite (tens of microseconds a call for a decode row).
torch::Tensor rms_norm(const torch::Tensor& x_in, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x_in.dtype() == torch::kFloat32 && !x_in.is_cuda() && x_in.dim() >= 1,
              "x must be float32 on the CPU");
  const int64_t d = x_in.size(-1);
  TORCH_CHECK(w.dtype() == torch::kFloat32 && w.is_contiguous() && w.dim() == 1 && w.size(0) == d &&
                  d % 16 == 0,
              "w must be contiguous float32 [", d, "] with a multiple of 16 features");
  const auto x = x_in.reshape({-1, d}).contiguous();
  const int64_t m = x.size(0);
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = xp + r * d;
    f32x16 acc = {};
    for (int64_t i = 0; i < d; i += 16) acc += load16(xr + i) * load16(xr + i);
    const float scale = 1.f / std::sqrt(lanes_sum(acc) / static_cast<float>(d) + static_cast<float>(eps));
    for (int64_t i = 0; i < d; i += 16) {
      const f32x16 v = load16(xr + i) * scale * load16(wp + i);
      std::memcpy(yp + r * d + i, &v, 64);
    }
  }
  return y.view(x_in.sizes());
}

// One decode row of one session's attention, from its fused q|k|v projection: RoPE on q and k
// (adjacent pairs, as model.apply_rope), k and v written at `pos` of the session's caches, then
// for each query head softmax(q.K^T * scale) V over positions 0..pos of its KV head (grouped
// query attention: head h reads KV head h / (heads / kv_heads)). One call for what is a dozen
// small PyTorch ops per layer; fp32 throughout.
torch::Tensor attend_decode(const torch::Tensor& qkv, const torch::Tensor& rot, torch::Tensor& k_cache,
                            torch::Tensor& v_cache, int64_t pos, int64_t n_heads, double scale) {
  TORCH_CHECK(k_cache.dtype() == torch::kFloat32 && v_cache.dtype() == torch::kFloat32 &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 3 &&
                  k_cache.sizes() == v_cache.sizes(),
              "caches must be contiguous float32 [kv_heads, capacity, head_dim]");
  const int64_t kvh = k_cache.size(0), cap = k_cache.size(1), hd = k_cache.size(2);
  TORCH_CHECK(n_heads % kvh == 0 && hd % 16 == 0 && hd <= kMaxHeadDim && 0 <= pos && pos < cap,
              "bad heads, head size or position");
  TORCH_CHECK(qkv.dtype() == torch::kFloat32 && qkv.is_contiguous() &&
                  qkv.numel() == (n_heads + 2 * kvh) * hd,
              "qkv must be one contiguous float32 row of q|k|v");
  TORCH_CHECK(rot.dtype() == torch::kFloat32 && rot.is_contiguous() && rot.numel() == hd,
              "rot must be the position's [head_dim / 2, 2] cos/sin");
  const float* in = qkv.data_ptr<float>();
  const float* cs = rot.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  std::vector<float> q(n_heads * hd);
  auto rope = [&](const float* x, float* out) {
    for (int64_t i = 0; i < hd / 2; ++i) {
      const float a = x[2 * i], b = x[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
      out[2 * i] = a * c - b * s;
      out[2 * i + 1] = a * s + b * c;
    }
  };
  for (int64_t h = 0; h < n_heads; ++h) rope(in + h * hd, q.data() + h * hd);
  for (int64_t g = 0; g < kvh; ++g) {
    rope(in + (n_heads + g) * hd, kc + (g * cap + pos) * hd);
    std::memcpy(vc + (g * cap + pos) * hd, in + (n_heads + kvh + g) * hd, hd * sizeof(float));
  }
  auto out = torch::empty({1, n_heads * hd}, qkv.options());
  float* o = out.data_ptr<float>();
  const int64_t rep = n_heads / kvh, T = pos + 1;
  at::parallel_for(0, n_heads, std::max<int64_t>(1, 16384 / (T * hd)), [&](int64_t h0, int64_t h1) {
    std::vector<float> p(T);
    for (int64_t h = h0; h < h1; ++h) {
      const float* qh = q.data() + h * hd;
      const float* keys = kc + (h / rep) * cap * hd;
      const float* values = vc + (h / rep) * cap * hd;
      float top = -INFINITY;
      for (int64_t t = 0; t < T; ++t) {
        f32x16 d = {};
        for (int64_t i = 0; i < hd; i += 16) d += load16(qh + i) * load16(keys + t * hd + i);
        p[t] = lanes_sum(d) * static_cast<float>(scale);
        top = std::max(top, p[t]);
      }
      float sum = 0.f;
      for (int64_t t = 0; t < T; ++t) sum += (p[t] = std::exp(p[t] - top));
      // each 16 lanes of the output summed over positions in order; the lanes' chains side by
      // side (one chain at a time waited on each add's latency)
      f32x16 acc[kMaxHeadDim / 16] = {};
      const int64_t chunks = hd / 16;
      for (int64_t t = 0; t < T; ++t) {
        const float w = p[t] / sum;
        for (int64_t c = 0; c < chunks; ++c) acc[c] += w * load16(values + t * hd + c * 16);
      }
      std::memcpy(o + h * hd, acc, hd * sizeof(float));
    }
  });
  return out;
}

// SwiGLU of fp32 rows [gate | up] -> silu(gate) * up, silu(g) = g / (1 + exp(-g)): one call for
// PyTorch's chunk, silu and mul.
torch::Tensor swiglu(const torch::Tensor& x_in) {
  TORCH_CHECK(x_in.dtype() == torch::kFloat32 && !x_in.is_cuda() && x_in.dim() >= 1 &&
                  x_in.size(-1) % 2 == 0,
              "x must be float32 [..., 2F] on the CPU");
  const int64_t f = x_in.size(-1) / 2;
  const auto x = x_in.reshape({-1, 2 * f}).contiguous();
  const int64_t m = x.size(0);
  auto shape = x_in.sizes().vec();
  shape.back() = f;
  auto y = torch::empty({m, f}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < f; ++i) {
      const float g = xp[r * 2 * f + i];
      yp[r * f + i] = g / (1.f + std::exp(-g)) * xp[r * 2 * f + f + i];
    }
  return y.view(shape);
}

// One transformer block for decode rows (one per session), as model.Block computes them on a
// packed fp32 stage, op for op (the same kernels, adds and order, so the same bits) in one call
// instead of a dozen Python-level ones per layer. w: codes, scale, zero (empty: none) of each
// segment of wqkv, wo, w13 and w2, `segments` of each (their outputs concatenated, as
// model.Linear does); rot: each row's [head_dim / 2, 2] cos/sin; caches and positions per row.
// Checked by the caller (cpu_kernel.decode_layers).
torch::Tensor decode_block(const torch::Tensor& x, const torch::Tensor& attn_norm,
                           const torch::Tensor& ffn_norm, double eps, const std::vector<torch::Tensor>& w,
                           const std::vector<int64_t>& segments, const torch::Tensor& rot,
                           std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches,
                           const std::vector<int64_t>& pos, int64_t n_heads, double scale) {
  std::vector<int64_t> first = {0};
  for (const int64_t n : segments) first.push_back(first.back() + n);
  TORCH_CHECK(segments.size() == 4 && static_cast<size_t>(3 * first.back()) == w.size() && x.dim() == 2 &&
                  static_cast<size_t>(x.size(0)) == pos.size() && pos.size() == k_caches.size() &&
                  pos.size() == v_caches.size(),
              "decode_block: 4 linears' segments, one cache and position per row");
  auto lin = [&](const torch::Tensor& in, int i) {
    std::vector<torch::Tensor> parts;
    for (int64_t j = first[i]; j < first[i + 1]; ++j) {
      const auto& z = w[3 * j + 2];
      parts.push_back(linear(in, w[3 * j], w[3 * j + 1], z.numel() ? c10::optional<torch::Tensor>(z) : c10::nullopt));
    }
    return parts.size() == 1 ? parts[0] : torch::cat(parts, -1);
  };
  const auto qkv = lin(rms_norm(x, attn_norm, eps), 0);
  torch::Tensor att;
  const int64_t n = x.size(0);
  if (n == 1) {
    att = attend_decode(qkv, rot, k_caches[0], v_caches[0], pos[0], n_heads, scale);
  } else {
    std::vector<torch::Tensor> rows;
    for (int64_t i = 0; i < n; ++i)
      rows.push_back(attend_decode(qkv[i].contiguous(), rot[i].contiguous(), k_caches[i], v_caches[i], pos[i],
                                   n_heads, scale));
    att = torch::cat(rows);
  }
  auto h = x + lin(att, 1);
  return h.add_(lin(swiglu(lin(rms_norm(h, ffn_norm, eps), 2)), 3));
}

// Blocks of a stage for decode rows in one call: decode_block for each, in order, so the GIL is
// released once for the whole stage (not re-taken between blocks, where another thread holding it
// would stall the stage). Per block: its norms, eps, weights, segments, heads and scale, and
// each row's K and V cache of that layer.
torch::Tensor decode_blocks(torch::Tensor x, const std::vector<torch::Tensor>& attn_norms,
                            const std::vector<torch::Tensor>& ffn_norms, const std::vector<double>& eps,
                            const std::vector<std::vector<torch::Tensor>>& w,
                            const std::vector<std::vector<int64_t>>& segments, const torch::Tensor& rot,
                            const std::vector<std::vector<torch::Tensor>>& k_caches,
                            const std::vector<std::vector<torch::Tensor>>& v_caches,
                            const std::vector<int64_t>& pos, const std::vector<int64_t>& n_heads,
                            const std::vector<double>& scales) {
  const size_t n = attn_norms.size();
  TORCH_CHECK(ffn_norms.size() == n && eps.size() == n && w.size() == n && segments.size() == n &&
                  k_caches.size() == n && v_caches.size() == n && n_heads.size() == n && scales.size() == n,
              "decode_blocks: every argument per block");
  for (size_t i = 0; i < n; ++i)
    x = decode_block(x, attn_norms[i], ffn_norms[i], eps[i], w[i], segments[i], rot, k_caches[i], v_caches[i],
                     pos, n_heads[i], scales[i]);
  return x;
}

// Every function releases the GIL while it computes (they touch no Python object): in the
// coordinator, the sessions' threads, gRPC's and the audits' go on while its stage computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("linear", &linear, "x W^T: quantized W, fp32 x and sums, batch-invariant", nogil);
  m.def("dequant", &dequant, "rows [n0, n1) of the quantized W in fp32", nogil);
  m.def("rms_norm", &rms_norm, "RMSNorm of fp32 rows, one pass", nogil);
  m.def("swiglu", &swiglu, "silu(gate) * up of fp32 rows [gate | up]", nogil);
  m.def("attend_decode", &attend_decode, "one session's decode row of attention, RoPE and cache write", nogil);
  m.def("decode_blocks", &decode_blocks, "a stage's blocks for decode rows, one call", nogil);
}
