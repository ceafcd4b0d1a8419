// y = x W^T for quantized weights with fp32 activations and fp32 sums: the strict class's compact
// CPU kernel (cpu_kernel.py builds it). Weights come in blocks of 32 along a row:
//   Q4: 16 bytes of codes c in 0..15 (code j in the low nibble of byte j, code j + 16 in its high
//       nibble), one scale s and one zero z: W = c * s + z;
//   Q8: 32 int8 codes q, one scale per 16 of them and one zero: W = q * s + z.
// The zero is optional in both (absent: 0).
// Both are exact images of GGUF blocks (quants.py maps each format onto one of them).
//
// Every output is summed in one fixed order whatever the number of rows, the row's place in the
// batch, the tile or the thread count: one 16-lane accumulator over the blocks of a row, then the
// lanes in order, then the zero terms. So a session's row has the same bits alone as in any batch
// (batch-invariant), while the rows of a batch share each block's decoding and a tile of outputs
// shares each load of x. GCC/Clang vector extensions: one source for AVX-512, AVX2 and NEON.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
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

struct Q4 {
  static constexpr int64_t kBytes = 16, kScales = 1;
  static inline void decode(const uint8_t* w, const float* s, f32x16& lo, f32x16& hi) {
    u8x16 q;
    std::memcpy(&q, w, 16);
    lo = to_float(q & 15) * s[0];
    hi = to_float(q >> 4) * s[0];
  }
};

struct Q8 {
  static constexpr int64_t kBytes = 32, kScales = 2;
  static inline void decode(const uint8_t* w, const float* s, f32x16& lo, f32x16& hi) {
    u8x16 a, b;
    std::memcpy(&a, w, 16);
    std::memcpy(&b, w + 16, 16);
    lo = to_float_signed(a) * s[0];
    hi = to_float_signed(b) * s[1];
  }
};

// sum_b z[b] * xs[b], in 16 lanes and then in order: the zero terms of one output.
inline float zero_terms(const float* z, const float* xs, int64_t nb) {
  if (z == nullptr) return 0.f;
  f32x16 acc = {};
  int64_t b = 0;
  for (; b + 16 <= nb; b += 16) acc += load16(z + b) * load16(xs + b);
  float s = lanes_sum(acc);
  for (; b < nb; ++b) s += z[b] * xs[b];
  return s;
}

// Outputs n .. n + T - 1 (w, s, z at output n) for rows 0 .. R - 1 of x. Each (output, row) has
// one accumulator that every block adds to in the same two steps whatever T and R.
template <typename F, int T, int R>
inline void tile(const float* x, int64_t ldx, const uint8_t* w, const float* s, const float* z,
                 const float* xs, int64_t nb, float* y, int64_t ldy) {
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
      F::decode(w + (t * nb + b) * F::kBytes, s + (t * nb + b) * F::kScales, lo, hi);
      for (int r = 0; r < R; ++r) {
        acc[t][r] += lo * xl[r];
        acc[t][r] += hi * xh[r];
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r)
      y[r * ldy + t] = lanes_sum(acc[t][r]) + zero_terms(z ? z + t * nb : nullptr, xs + r * nb, nb);
}

constexpr int64_t kOutTile = 4;  // outputs sharing each load of x
constexpr int64_t kRowTile = 4;  // rows sharing each decoded block

template <typename F, int R>
void outputs(const float* x, int64_t ldx, const uint8_t* w, const float* s, const float* z,
             const float* xs, int64_t nb, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  auto at = [&](int64_t n) { return std::make_tuple(w + n * nb * F::kBytes, s + n * nb * F::kScales,
                                                    z ? z + n * nb : nullptr); };
  int64_t n = n0;
  for (; n + kOutTile <= n1; n += kOutTile) {
    auto [wn, sn, zn] = at(n);
    tile<F, kOutTile, R>(x, ldx, wn, sn, zn, xs, nb, y + n, ldy);
  }
  for (; n < n1; ++n) {
    auto [wn, sn, zn] = at(n);
    tile<F, 1, R>(x, ldx, wn, sn, zn, xs, nb, y + n, ldy);
  }
}

template <typename F>
void rows(const float* x, int64_t m, int64_t k, const uint8_t* w, const float* s, const float* z,
          const float* xs, int64_t nb, float* y, int64_t n, int64_t n0, int64_t n1) {
  for (int64_t r = 0; r < m; r += kRowTile) {
    const float* xr = x + r * k;
    const float* xsr = xs + r * nb;
    float* yr = y + r * n;
    switch (std::min(kRowTile, m - r)) {
      case 4: outputs<F, 4>(xr, k, w, s, z, xsr, nb, yr, n, n0, n1); break;
      case 3: outputs<F, 3>(xr, k, w, s, z, xsr, nb, yr, n, n0, n1); break;
      case 2: outputs<F, 2>(xr, k, w, s, z, xsr, nb, yr, n, n0, n1); break;
      default: outputs<F, 1>(xr, k, w, s, z, xsr, nb, yr, n, n0, n1);
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
  if (zero)
    for (int64_t i = 0; i < m * nb; ++i) xs[i] = lanes_sum(load16(xp + i * 32) + load16(xp + i * 32 + 16));
  const float* xsp = xs.data();
  const uint8_t* w = static_cast<const uint8_t*>(codes.data_ptr());
  const float* s = scale.data_ptr<float>();
  const float* z = zero ? zero->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (m > 0)
    at::parallel_for(0, n, kOutTile * 4, [&](int64_t n0, int64_t n1) {
      if (q8)
        rows<Q8>(xp, m, k, w, s, z, xsp, nb, yp, n, n0, n1);
      else
        rows<Q4>(xp, m, k, w, s, z, xsp, nb, yp, n, n0, n1);
    });
  auto shape = x_in.sizes().vec();
  shape.back() = n;
  return y.view(shape);
}

// Rows [n0, n1) of W in fp32, each weight exactly as `linear` uses it (c * s + z, or q * s):
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
        const int64_t blk = r * nb + j;
        f32x16 lo, hi;
        if (q8)
          Q8::decode(w + blk * Q8::kBytes, s + blk * Q8::kScales, lo, hi);
        else
          Q4::decode(w + blk * Q4::kBytes, s + blk * Q4::kScales, lo, hi);
        if (z) {
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x W^T: quantized W, fp32 x and sums, batch-invariant");
  m.def("dequant", &dequant, "rows [n0, n1) of the quantized W in fp32");
}
