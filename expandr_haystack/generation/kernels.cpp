// Fused CPU kernels of the int8 packed decoder (expandr_haystack/generation/kernels.py compiles and loads them).
//
// A decode step of the packed decoder at 16 rows is ~1,200 tensor ops whose arithmetic is tiny: each costs its
// dispatch, allocation and thread fork more than its work. These kernels do in one pass what took several:
//   expandr::row_input        an int8 layer's input: scale, RMSNorm factor, per-row max and the division by it
//   expandr::row_codes        the same as oneDNN's uint8 input codes
//   expandr::gated_row_input  the MLP's silu(gate) * up, then down's per-row max and division
//   expandr::decode_attention one new token per row: rotary embedding, KV cache write and grouped attention
//   expandr::sample_nucleus   temperature + nucleus sampling of each row
//   expandr::int8_product     int8 products (fastest at a decode step's few rows), FBGEMM's bit for bit
// The math is `quantize.int8_row_input`, `quantize.rms_factor`, `packed_llama._Attention`'s and
// `local.sample_rows`'; the loops are written for the compiler to vectorize (`#pragma omp simd`), threads come from
// ATen's pool.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// float32's smallest normal, the floor of a row's largest magnitude (as `quantize.int8_row_input`'s clamp): an
// all-zero row stays 0, not NaN
constexpr float kTiny = 1.1754943508222875e-38f;

// rows per thread task: one task below ~32K elements (a thread fork costs more than such a pass)
inline int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

// e^x for x <= 88.7 in float32 (Cephes' expf: range reduction by ln 2 in two parts, degree-5 polynomial; ~1 ulp),
// written without library calls so that loops over it vectorize.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.37626f);
  float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// A cache row to float32 / float32 to a cache row: F16C's conversions where the CPU has them (8 at a time),
// else c10::Half's.
inline void load_floats(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void store_floats(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void load_floats(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void store_floats(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

void check_rows(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(), op, ": `",
              name, "` must be a contiguous 2-D float32 CPU tensor; got ", x.sizes(), " ", x.scalar_type());
}

// Divides each row of `out` [rows, k] (in place) by its largest magnitude and returns that magnitude: the 8-bit
// kernel's input on its fixed [-1, 1] grid (`quantize.int8_row_input`).
inline float divide_by_row_max(float* out, int64_t k) {
  float largest = 0.0f;
#pragma omp simd reduction(max : largest)
  for (int64_t j = 0; j < k; ++j) largest = std::max(largest, std::fabs(out[j]));
  largest = std::max(largest, kTiny);
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) out[j] = out[j] / largest;
  return largest;
}

// One row of `row_input`: o = scale * x / a (in place of o), returns a * f (see there).
inline float prepare_row(const float* xr, const float* weights, bool has_eps, float epsilon, float* o, int64_t k) {
  float squares = 0.0f;
  if (weights != nullptr) {
#pragma omp simd reduction(+ : squares)
    for (int64_t j = 0; j < k; ++j) {
      o[j] = xr[j] * weights[j];
      squares += xr[j] * xr[j];
    }
  } else {
#pragma omp simd reduction(+ : squares)
    for (int64_t j = 0; j < k; ++j) {
      o[j] = xr[j];
      squares += xr[j] * xr[j];
    }
  }
  const float a = divide_by_row_max(o, k);
  return has_eps ? a / std::sqrt(squares / static_cast<float>(k) + epsilon) : a;
}

// The per-row driver of `row_input` and `row_codes` (`x` checked by them): `scale`, RMSNorm's eps, threads. Row r
// is prepared (`prepare_row`, k floats) into `rows_out` + r k where given, else into a per-thread row, and then
// handed to `write(r, row)`; returns the row scales [rows, 1].
template <typename Write>
at::Tensor prepare_rows(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& scale,
                        const std::optional<at::Tensor>& eps, float* rows_out, Write write) {
  const int64_t rows = x.size(0), k = x.size(1);
  const float* weights = nullptr;
  if (scale.has_value()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->numel() == k, op,
                ": `scale` must be a contiguous float32 tensor of ", k, " values");
    weights = scale->data_ptr<float>();
  }
  const bool has_eps = eps.has_value();
  const float epsilon = has_eps ? eps->item<float>() : 0.0f;
  at::Tensor factors = at::empty({rows, 1}, x.options());
  const float* in = x.data_ptr<float>();
  float* row_factors = factors.data_ptr<float>();
  at::parallel_for(0, rows, row_grain(k), [&](int64_t first, int64_t last) {
    std::vector<float> scratch(rows_out == nullptr ? k : 0);
    for (int64_t r = first; r < last; ++r) {
      float* row = rows_out != nullptr ? rows_out + r * k : scratch.data();
      row_factors[r] = prepare_row(in + r * k, weights, has_eps, epsilon, row, k);
      write(r, row);
    }
  });
  return factors;
}

// (scale * x / a, a * f) per row of x [rows, k]: a = max |scale * x| (`int8_row_input`), f = 1 / sqrt(mean(x^2) +
// eps) (`rms_factor`; 1 without eps). `scale` [k] is optional, as is `eps` (a 0-d tensor).
std::tuple<at::Tensor, at::Tensor> row_input(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                                             const std::optional<at::Tensor>& eps) {
  check_rows(x, "expandr::row_input", "x");
  at::Tensor out = at::empty_like(x);
  at::Tensor factors =
      prepare_rows("expandr::row_input", x, scale, eps, out.data_ptr<float>(), [](int64_t, const float*) {});
  return {out, factors};
}

// `row_input`'s rows as the uint8 codes of the input grid (`quantize.fbgemm_input_grid`: `input_scale`,
// `zero_point`), as FBGEMM's dynamic linear and ``torch.quantize_per_tensor(rows, input_scale, zero_point,
// torch.quint8).int_repr()`` quantize them: fma(v, 1 / scale, zero point) rounded once to float32, clamped to 0..255,
// then to the nearest integer, half to even. (Rounding v / scale first and adding the zero point after differs at
// ~1 value in 50,000: a code FBGEMM would not give, so another product than FBGEMM's.) oneDNN's int8 kernel's input.
// (The loop apart, its bounds and pointers local: inside `row_codes`' lambda the compiler vectorized it with
// gathers, 3x slower.)
inline void write_codes(const float* __restrict__ v, uint8_t* __restrict__ o, int64_t n, float inverse, float zero) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float t = std::min(std::max(std::fma(v[j], inverse, zero), 0.0f), 255.0f);
    o[j] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(t)));
  }
}

std::tuple<at::Tensor, at::Tensor> row_codes(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                                             const std::optional<at::Tensor>& eps, double input_scale,
                                             int64_t zero_point) {
  check_rows(x, "expandr::row_codes", "x");
  const float inverse = 1.0f / static_cast<float>(input_scale);
  const float zero = static_cast<float>(zero_point);
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  uint8_t* out = codes.data_ptr<uint8_t>();
  const int64_t k = x.size(-1);
  at::Tensor factors = prepare_rows("expandr::row_codes", x, scale, eps, nullptr, [&](int64_t r, const float* v) {
    write_codes(v, out + r * k, k, inverse, zero);
  });
  return {codes, factors};
}

// (h / a, a) per row for h = silu(gate) * up, gate_up [rows, 2 * half] = [gate | up]: the input of the MLP's down
// projection (`_Layer`'s F.silu(gate) * up, then `int8_row_input`).
std::tuple<at::Tensor, at::Tensor> gated_row_input(const at::Tensor& gate_up) {
  check_rows(gate_up, "expandr::gated_row_input", "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "expandr::gated_row_input: `gate_up` needs an even width; got ",
              gate_up.size(1));
  const int64_t rows = gate_up.size(0), half = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, half}, gate_up.options()), scales = at::empty({rows, 1}, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* outs = out.data_ptr<float>();
  float* row_scales = scales.data_ptr<float>();
  at::parallel_for(0, rows, row_grain(2 * half), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float* gate = in + r * 2 * half;
      const float* up = gate + half;
      float* o = outs + r * half;
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) o[j] = gate[j] / (1.0f + exp_approx(-gate[j])) * up[j];
      row_scales[r] = divide_by_row_max(o, half);
    }
  });
  return {out, scales};
}

// The rotary embedding of `pairs` interleaved pairs (x, y) -> (x cos - y sin, x sin + y cos) (a complex product by
// e^(i theta), `turn` = (cos, sin) per pair).
inline void rotate(const float* in, const float* turn, float* out, int64_t pairs) {
  for (int64_t i = 0; i < pairs; ++i) {
    const float c = turn[2 * i], s = turn[2 * i + 1], x = in[2 * i], y = in[2 * i + 1];
    out[2 * i] = x * c - y * s;
    out[2 * i + 1] = x * s + y * c;
  }
}

// One (row, KV head) of `decode_attention`. `D` is the head size when known at compile time (64, 128: the loops
// over it unroll), 0 to read it from `dim`. Slots below `shared` are read from `shared_keys`/`shared_values` (the
// first row's cache of this head), the rest from the row's own.
template <typename T, int D>
void attend_group(const float* row, const float* turn, T* key_cache, T* value_cache, const T* shared_keys,
                  const T* shared_values, int64_t shared, const T* row_bias, float* out, int64_t heads,
                  int64_t kv_heads, int64_t g, int64_t runtime_dim, int64_t end, float* query, float* keys_f,
                  float* values_f, float* scores, float* biases) {
  const int64_t dim = D > 0 ? D : runtime_dim, group = heads / kv_heads, pairs = dim / 2, start = end - 1;
  const float softmax_scale = 1.0f / std::sqrt(static_cast<float>(dim));
  // rotary embedding of keys and queries; the new key and value go to cache slot `start`; the queries are rounded
  // to the cache's dtype (as the SDPA path's)
  float* new_key = keys_f + start * dim;  // (the slot is read back with the others below)
  rotate(row + (heads + g) * dim, turn, new_key, pairs);
  store_floats(new_key, key_cache + start * dim, dim);
  store_floats(row + (heads + kv_heads + g) * dim, value_cache + start * dim, dim);
  for (int64_t h = 0; h < group; ++h) rotate(row + (g * group + h) * dim, turn, query + h * dim, pairs);
  if constexpr (!std::is_same_v<T, float>) {  // round the queries as the cache is rounded, eight at a time
    T rounded[8];
    for (int64_t i = 0; i < group * dim; i += 8) {
      const int64_t n = std::min<int64_t>(8, group * dim - i);
      store_floats(query + i, rounded, n);
      load_floats(rounded, query + i, n);
    }
  }
  // the cache's slots 0 .. start in float32 (the new key's too, rounded as stored), and the mask's bias (0 or -inf)
  load_floats(shared_keys, keys_f, shared * dim);
  load_floats(key_cache + shared * dim, keys_f + shared * dim, (end - shared) * dim);
  load_floats(shared_values, values_f, shared * dim);
  load_floats(value_cache + shared * dim, values_f + shared * dim, (end - shared) * dim);
  load_floats(row_bias, biases, end);
  for (int64_t h = 0; h < group; ++h) {
    const float* q = query + h * dim;
    float* p = scores + h * end;
    // scores: four slots side by side (four independent sums instead of one chain of dependent additions)
    for (int64_t j = 0; j < end; j += 4) {
      const int64_t n = std::min<int64_t>(4, end - j);
      const float* k0 = keys_f + j * dim;
      const float* k1 = k0 + (n > 1 ? dim : 0);
      const float* k2 = k0 + (n > 2 ? 2 * dim : 0);
      const float* k3 = k0 + (n > 3 ? 3 * dim : 0);
      float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t d = 0; d < dim; ++d) {
        a0 += q[d] * k0[d];
        a1 += q[d] * k1[d];
        a2 += q[d] * k2[d];
        a3 += q[d] * k3[d];
      }
      const float dots[4] = {a0, a1, a2, a3};
      for (int64_t i = 0; i < n; ++i) p[j + i] = dots[i] * softmax_scale + biases[j + i];
    }
    // softmax over the slots (masked ones are exactly 0)
    float top = -INFINITY;
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < end; ++j) top = std::max(top, p[j]);
    float mass = 0.0f;
#pragma omp simd reduction(+ : mass)
    for (int64_t j = 0; j < end; ++j) {
      p[j] = p[j] == -INFINITY ? 0.0f : exp_approx(p[j] - top);
      mass += p[j];
    }
    // the weighted sum of the values
    float sums[D > 0 ? D : 1];
    float* acc = D > 0 ? sums : out + (g * group + h) * dim;
    std::fill(acc, acc + dim, 0.0f);
    for (int64_t j = 0; j < end; ++j) {
      const float weight = p[j];
      const float* value = values_f + j * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) acc[d] += weight * value[d];
    }
    float* o = out + (g * group + h) * dim;
    const float inverse = 1.0f / mass;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) o[d] = acc[d] * inverse;
  }
}

template <typename T>
void attend(const float* qkv, const float* rotation, T* keys, T* values, const T* bias, float* out, int64_t rows,
            int64_t heads, int64_t kv_heads, int64_t dim, int64_t capacity, int64_t start, int64_t shared,
            int64_t qkv_stride, int64_t rotation_stride, int64_t bias_stride) {
  const int64_t group = heads / kv_heads, end = start + 1;
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t first, int64_t last) {
    std::vector<float> query(group * dim), keys_f(end * dim), values_f(end * dim), scores(group * end), biases(end);
    for (int64_t task = first; task < last; ++task) {
      const int64_t r = task / kv_heads, g = task % kv_heads;
      auto run = [&](auto size) {
        attend_group<T, decltype(size)::value>(
            qkv + r * qkv_stride, rotation + r * rotation_stride, keys + (r * kv_heads + g) * capacity * dim,
            values + (r * kv_heads + g) * capacity * dim, keys + g * capacity * dim, values + g * capacity * dim,
            shared, bias + r * bias_stride, out + r * heads * dim, heads, kv_heads, g, dim, end, query.data(),
            keys_f.data(), values_f.data(), scores.data(), biases.data());
      };
      if (dim == 64) {
        run(std::integral_constant<int, 64>{});
      } else if (dim == 128) {
        run(std::integral_constant<int, 128>{});
      } else {
        run(std::integral_constant<int, 0>{});
      }
    }
  });
}

// One new token per row: `qkv` [rows, (heads + 2 kv_heads) * dim] (queries and keys with interleaved rotary pairs,
// `packed_llama.interleave_rotary_halves`), `rotation` [rows, ..., dim / 2] complex (e^(i theta) at the token's
// position), `keys`/`values` [rows, kv_heads, capacity, dim] (written at slot `start`), `bias` [rows, ..., start + 1]
// in the cache's dtype (0 = attend, -inf = masked). Returns the attention's output [rows, heads * dim] (float32).
// `shared`: the first slots every row holds the same keys and values in (the prompts' common prefix, copied to each
// row by the prefill), read from the first row's cache for all rows: one copy's memory traffic instead of one per row.
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& rotation, const at::Tensor& keys,
                            const at::Tensor& values, int64_t start, const at::Tensor& bias, int64_t heads,
                            int64_t shared) {
  const char* op = "expandr::decode_attention";
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat && qkv.stride(1) == 1, op,
              ": `qkv` must be a 2-D float32 tensor with contiguous rows");
  TORCH_CHECK(keys.dim() == 4 && keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes() &&
                  keys.scalar_type() == values.scalar_type(),
              op, ": `keys` and `values` must be contiguous [rows, kv_heads, capacity, dim] tensors of one dtype");
  const int64_t rows = keys.size(0), kv_heads = keys.size(1), capacity = keys.size(2), dim = keys.size(3);
  TORCH_CHECK(heads % kv_heads == 0 && dim % 2 == 0 && qkv.size(0) == rows &&
                  qkv.size(1) == (heads + 2 * kv_heads) * dim,
              op, ": `qkv` of ", qkv.sizes(), " does not match ", heads, " heads and the cache's ", keys.sizes());
  TORCH_CHECK(start >= 0 && start < capacity, op, ": `start` ", start, " is outside the cache's ", capacity, " slots");
  TORCH_CHECK(shared >= 0 && shared <= start, op, ": `shared` ", shared, " must be in 0 .. start (", start, ")");
  at::Tensor turn = at::view_as_real(rotation.reshape({rows, dim / 2}));
  TORCH_CHECK(turn.scalar_type() == at::kFloat && turn.stride(2) == 1 && turn.stride(1) == 2, op,
              ": `rotation` must be complex64 [rows, dim / 2] with contiguous rows");
  at::Tensor row_bias = bias.reshape({rows, -1});
  TORCH_CHECK(row_bias.size(1) == start + 1 && row_bias.stride(1) == 1 && row_bias.scalar_type() == keys.scalar_type(),
              op, ": `bias` must hold start + 1 = ", start + 1, " values a row in the cache's dtype; got ",
              bias.sizes());
  at::Tensor out = at::empty({rows, heads * dim}, qkv.options());
  if (keys.scalar_type() == at::kFloat) {
    attend<float>(qkv.data_ptr<float>(), turn.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(),
                  row_bias.data_ptr<float>(), out.data_ptr<float>(), rows, heads, kv_heads, dim, capacity, start,
                  shared, qkv.stride(0), turn.stride(0), row_bias.stride(0));
  } else {
    TORCH_CHECK(keys.scalar_type() == at::kHalf, op, ": the cache must be float32 or float16; got ",
                keys.scalar_type());
    attend<c10::Half>(qkv.data_ptr<float>(), turn.data_ptr<float>(), keys.data_ptr<c10::Half>(),
                      values.data_ptr<c10::Half>(), row_bias.data_ptr<c10::Half>(), out.data_ptr<float>(), rows,
                      heads, kv_heads, dim, capacity, start, shared, qkv.stride(0), turn.stride(0),
                      row_bias.stride(0));
  }
  return out;
}

// The largest of x[0 .. n) (NaN-free input): sixteen running maxima side by side, one vector, instead of one chain.
inline float largest_of(const float* x, int64_t n) {
  float lanes[16];
  std::fill(lanes, lanes + 16, -INFINITY);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int lane = 0; lane < 16; ++lane) lanes[lane] = x[i + lane] > lanes[lane] ? x[i + lane] : lanes[lane];
  for (; i < n; ++i) lanes[0] = std::max(lanes[0], x[i]);
  return *std::max_element(lanes, lanes + 16);
}

constexpr int kBuckets = 512;   // `sample_nucleus`' histogram buckets over the span below the most likely token
constexpr float kSpan = 40.0f;  // e-folds: beyond, one last bucket (probabilities below 4e-18 of the top)

// splitmix64: a row's stream of uniform draws for one sampling step, from one 64-bit seed drawn from its generator.
inline uint64_t next_random(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// One token per row of `logits` [rows, vocab] (float32) by temperature + nucleus (top-p) sampling, as
// `local.sample_rows` defines it: the nucleus is the most likely tokens, in order, while the mass before a token is
// below `top_p`; the token is drawn from it in proportion to its probability by the exponential race (argmax of
// p / e, e ~ Exp(1) drawn per nucleus token from `seeds[r]`); temperature <= 0 is greedy (the lowest id of ties).
// The nucleus is found without sorting the vocabulary: a histogram of the probabilities by e-folds below the most
// likely token locates the bucket where the mass reaches `top_p`; only that bucket's tokens are sorted.
at::Tensor sample_nucleus(const at::Tensor& logits, const at::Tensor& temperatures, double top_p,
                          const at::Tensor& seeds) {
  check_rows(logits, "expandr::sample_nucleus", "logits");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab >= 1, "expandr::sample_nucleus: the vocabulary is empty");
  TORCH_CHECK(temperatures.scalar_type() == at::kFloat && temperatures.is_contiguous() && temperatures.numel() == rows,
              "expandr::sample_nucleus: `temperatures` must be float32 with one value a row");
  TORCH_CHECK(seeds.scalar_type() == at::kLong && seeds.is_contiguous() && seeds.numel() == rows,
              "expandr::sample_nucleus: `seeds` must be int64 with one value a row");
  at::Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* all = logits.data_ptr<float>();
  const float* temps = temperatures.data_ptr<float>();
  const int64_t* row_seeds = seeds.data_ptr<int64_t>();
  int64_t* out = tokens.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    std::vector<float> probs(vocab);
    std::vector<int32_t> bucket_of(vocab);
    std::vector<int64_t> nucleus, crossing;
    for (int64_t r = first; r < last; ++r) {
      const float* l = all + r * vocab;
      const float top = largest_of(l, vocab);  // (NaN logits are never the largest, nor drawn)
      TORCH_CHECK(top > -INFINITY, "expandr::sample_nucleus: `logits` row ", r, " has no finite logit");
      const float inverse_t = 1.0f / temps[r];
      const int64_t first_top = std::find(l, l + vocab, top) - l;
      if (!(temps[r] > 0.0f) || !(inverse_t < INFINITY) || top == INFINITY) {  // greedy: the first largest
        out[r] = first_top;
        continue;
      }
      float* p_out = probs.data();
      int32_t* b_out = bucket_of.data();
#pragma omp simd
      for (int64_t i = 0; i < vocab; ++i) {
        const float x = l[i], below = (top - x) * inverse_t;  // e-folds below the top (+inf: -inf logits; NaN)
        p_out[i] = below < 100.0f ? exp_approx(-below) : 0.0f;
        b_out[i] = below < kSpan ? static_cast<int32_t>(below * (kBuckets / kSpan)) : kBuckets;
      }
      float mass = 0.0f;
#pragma omp simd reduction(+ : mass)
      for (int64_t i = 0; i < vocab; ++i) mass += p_out[i];
      // the bucket where the mass of the more likely buckets reaches top_p: the tokens above it are all in the
      // nucleus; of its own tokens, the most likely while the mass before them stays below top_p
      const float target = top_p >= 1.0 ? INFINITY : static_cast<float>(top_p) * mass;
      float partial[4][kBuckets + 1] = {};  // four interleaved histograms: neighbours rarely wait on one bucket
      int64_t i = 0;
      for (; i + 4 <= vocab; i += 4)
        for (int lane = 0; lane < 4; ++lane) partial[lane][bucket_of[i + lane]] += probs[i + lane];
      for (; i < vocab; ++i) partial[0][bucket_of[i]] += probs[i];
      float bucket_mass[kBuckets + 1];
      for (int b = 0; b <= kBuckets; ++b)
        bucket_mass[b] = (partial[0][b] + partial[1][b]) + (partial[2][b] + partial[3][b]);
      int32_t cut = kBuckets + 1;  // every bucket whole (top_p >= 1 or rounding short of the target)
      float before = 0.0f;
      for (int32_t b = 0; b <= kBuckets; ++b) {
        if (before + bucket_mass[b] >= target) {
          cut = b;
          break;
        }
        before += bucket_mass[b];
      }
      nucleus.clear();
      crossing.clear();
      for (int64_t j = 0; j < vocab; ++j) {
        if (bucket_of[j] < cut) {
          if (probs[j] > 0.0f) nucleus.push_back(j);
        } else if (bucket_of[j] == cut) {
          crossing.push_back(j);
        }
      }
      const float* p = probs.data();
      std::sort(crossing.begin(), crossing.end(),
                [p](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
      for (int64_t j : crossing) {
        if (before >= target || p[j] == 0.0f) break;
        nucleus.push_back(j);
        before += p[j];
      }
      // the exponential race: argmax p / e over the nucleus, e = -log(u), u uniform in (0, 1) (53 bits)
      uint64_t state = static_cast<uint64_t>(row_seeds[r]);
      int64_t best = first_top;  // (an empty nucleus, top_p <= 0: the most likely token)
      double best_score = -1.0;
      for (int64_t j : nucleus) {
        const double u = (static_cast<double>(next_random(state) >> 11) + 0.5) * 0x1p-53;
        const double score = p[j] / -std::log(u);
        if (score > best_score) {
          best_score = score;
          best = j;
        }
      }
      out[r] = best;
    }
  });
  return tokens;
}

// The int8 product (built for a decode step's few rows; `quantize._OwnInt8Linear` runs a prefill's through it too):
// y[r, n] = float(sum_k codes[r, k] w[n, k] - zero_point colsum[n]) * scales[n], the integer sums exact, as FBGEMM's
// dynamic linear computes them (its epilogue: the int32 sum less the zero point's share, to float32, times the one
// scale input scale x weight scale), so the same bits. The weights are packed by `quantize.pack_product_weights` in
// blocks of `kProductBlock` outputs: [out / B, in / 4, B, 4] int8, four inputs of one output adjacent, which is the
// operand layout of VNNI's vpdpbusd (16 outputs x 4 inputs a 512-bit register) and of AVX2's vpmaddubsw + vpmaddwd (8 x
// 4; exact for weights within +-64, the 7-bit weights FBGEMM without VNNI takes too). Each thread takes whole output
// blocks: a block's weights (in x B bytes, 9-24 KB here) come from memory once and stay in L1 while 16 rows at a time
// run over them, each row's four codes broadcast against the block.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr int64_t kProductBlock = 16;
#elif defined(__AVX2__)
constexpr int64_t kProductBlock = 8;
#else
constexpr int64_t kProductBlock = 0;  // no int8 product kernel (FBGEMM itself needs AVX2)
#endif

// weights asked for this many bytes ahead of the one multiplied (the next blocks: each thread's are adjacent);
// without it the product streams its weights from memory at half the speed (2-vCPU Xeon, 121 products at 16 rows:
// 16.0 against 9.1-9.7 ms for 2-16 KB ahead)
constexpr int64_t kPrefetchAhead = 8192;

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
template <int R>
inline void product_rows(const uint8_t* codes, int64_t in, const int8_t* block, int64_t quads, __m512i offset,
                         __m512 scale, float* out, int64_t out_stride) {
  // S sums a row over alternate quads where rows are few: independent chains instead of one chain of vpdpbusd
  // latencies (integer sums: the same total)
  constexpr int S = R < 4 ? 4 / R : 1;
  __m512i acc[R][S];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < S; ++u) acc[r][u] = _mm512_setzero_si512();
  int64_t q = 0;
  for (; q + S <= quads; q += S) {
    for (int u = 0; u < S; ++u) {
      _mm_prefetch(reinterpret_cast<const char*>(block + (q + u) * 64 + kPrefetchAhead), _MM_HINT_T0);
      const __m512i w = _mm512_loadu_si512(block + (q + u) * 64);
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, codes + r * in + 4 * (q + u), 4);
        acc[r][u] = _mm512_dpbusd_epi32(acc[r][u], _mm512_set1_epi32(four), w);
      }
    }
  }
  for (; q < quads; ++q) {
    const __m512i w = _mm512_loadu_si512(block + q * 64);
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, codes + r * in + 4 * q, 4);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], _mm512_set1_epi32(four), w);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m512i sum = acc[r][0];
    for (int u = 1; u < S; ++u) sum = _mm512_add_epi32(sum, acc[r][u]);
    _mm512_storeu_ps(out + r * out_stride, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum, offset)), scale));
  }
}
#elif defined(__AVX2__)
template <int R>
inline void product_rows(const uint8_t* codes, int64_t in, const int8_t* block, int64_t quads, __m256i offset,
                         __m256 scale, float* out, int64_t out_stride) {
  __m256i acc[R];
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
  for (int64_t q = 0; q < quads; ++q) {
    if (q % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(block + q * 32 + kPrefetchAhead), _MM_HINT_T0);
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + q * 32));
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, codes + r * in + 4 * q, 4);
      const __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi32(four), w);  // exact: |w| <= 64
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(pairs, ones));
    }
  }
  for (int r = 0; r < R; ++r)
    _mm256_storeu_ps(out + r * out_stride, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r], offset)), scale));
}
#endif

// `codes` [rows, in] uint8 (`row_codes`), `packed` [out / B, in / 4, B, 4] int8, `offsets` [out] int32 (zero point x
// the output's weight sum), `scales` [out] float32: y [rows, out] float32.
at::Tensor int8_product(const at::Tensor& codes, const at::Tensor& packed, const at::Tensor& offsets,
                        const at::Tensor& scales) {
  const char* op = "expandr::int8_product";
  TORCH_CHECK(kProductBlock > 0, op, ": built without AVX2");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(), op,
              ": `codes` must be a contiguous 2-D uint8 tensor");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
                  packed.size(2) == kProductBlock && packed.size(3) == 4 && packed.size(1) * 4 == codes.size(1),
              op, ": `packed` must be [out / ", kProductBlock, ", in / 4, ", kProductBlock, ", 4] int8 for `codes` of ",
              codes.sizes(), "; got ", packed.sizes());
  const int64_t rows = codes.size(0), in = codes.size(1), blocks = packed.size(0), out = blocks * kProductBlock;
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.is_contiguous() && offsets.numel() == out &&
                  scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == out,
              op, ": `offsets` (int32) and `scales` (float32) must hold one value per output (", out, ")");
  at::Tensor y = at::empty({rows, out}, codes.options().dtype(at::kFloat));
  const uint8_t* x = codes.data_ptr<uint8_t>();
  const int8_t* w = packed.data_ptr<int8_t>();
  const int32_t* off = offsets.data_ptr<int32_t>();
  const float* sc = scales.data_ptr<float>();
  float* o = y.data_ptr<float>();
  const int64_t quads = in / 4;
  // (every product is worth both threads: at one row the weights' streaming is the work)
  at::parallel_for(0, blocks, 4, [&](int64_t first, int64_t last) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) || defined(__AVX2__)
    for (int64_t b = first; b < last; ++b) {
      const int8_t* block = w + b * quads * 4 * kProductBlock;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
      const __m512i offset = _mm512_loadu_si512(off + b * kProductBlock);
      const __m512 scale = _mm512_loadu_ps(sc + b * kProductBlock);
#else
      const __m256i offset = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off + b * kProductBlock));
      const __m256 scale = _mm256_loadu_ps(sc + b * kProductBlock);
#endif
      constexpr int kRows = kProductBlock == 16 ? 16 : 8;  // accumulators held in registers
      int64_t r = 0;
      for (; r + kRows <= rows; r += kRows)
        product_rows<kRows>(x + r * in, in, block, quads, offset, scale, o + r * out + b * kProductBlock, out);
      auto tail = [&](auto count) {
        product_rows<decltype(count)::value>(x + r * in, in, block, quads, offset, scale,
                                             o + r * out + b * kProductBlock, out);
      };
      switch (rows - r) {
        case 0: break;
        case 1: tail(std::integral_constant<int, 1>{}); break;
        case 2: tail(std::integral_constant<int, 2>{}); break;
        case 3: tail(std::integral_constant<int, 3>{}); break;
        case 4: tail(std::integral_constant<int, 4>{}); break;
        case 5: tail(std::integral_constant<int, 5>{}); break;
        case 6: tail(std::integral_constant<int, 6>{}); break;
        case 7: tail(std::integral_constant<int, 7>{}); break;
        case 8: tail(std::integral_constant<int, 8>{}); break;
        case 9: tail(std::integral_constant<int, 9>{}); break;
        case 10: tail(std::integral_constant<int, 10>{}); break;
        case 11: tail(std::integral_constant<int, 11>{}); break;
        case 12: tail(std::integral_constant<int, 12>{}); break;
        case 13: tail(std::integral_constant<int, 13>{}); break;
        case 14: tail(std::integral_constant<int, 14>{}); break;
        default: tail(std::integral_constant<int, 15>{}); break;
      }
    }
#endif
  });
  return y;
}

int64_t int8_product_block() { return kProductBlock; }

}  // namespace

TORCH_LIBRARY(expandr, m) {
  m.def("row_input(Tensor x, Tensor? scale, Tensor? eps) -> (Tensor, Tensor)", &row_input);
  m.def("row_codes(Tensor x, Tensor? scale, Tensor? eps, float input_scale, int zero_point) -> (Tensor, Tensor)",
        &row_codes);
  m.def("gated_row_input(Tensor gate_up) -> (Tensor, Tensor)", &gated_row_input);
  m.def("sample_nucleus(Tensor logits, Tensor temperatures, float top_p, Tensor seeds) -> Tensor", &sample_nucleus);
  m.def("decode_attention(Tensor qkv, Tensor rotation, Tensor(a!) keys, Tensor(b!) values, int start, Tensor bias, "
        "int heads, int shared=0) -> Tensor",
        &decode_attention);
  m.def("int8_product(Tensor codes, Tensor packed, Tensor offsets, Tensor scales) -> Tensor", &int8_product);
  m.def("int8_product_block() -> int", &int8_product_block);
}
