// Masked weighted mean over ragged client tensors: the server-side reduction (see fedlora.h).
#include <algorithm>
#include <vector>

#include "common.hpp"

namespace fedlora {
namespace {

constexpr int64_t kTile = 4096;  // output elements per tile: a 16 KiB float32 accumulator

struct Layout {
  int64_t outer, rank, inner, row;  // row = rank * inner: one output row
};

template <class T>
inline float load(const T* p, int64_t i);
template <>
inline float load<float>(const float* p, int64_t i) { return p[i]; }
template <>
inline float load<uint16_t>(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }

template <class T>
inline void store(T* p, int64_t i, float v);
template <>
inline void store<float>(float* p, int64_t i, float v) { p[i] = v; }
template <>
inline void store<uint16_t>(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }

// acc[p - lo] += X[p] * c (skipping c == 0) for positions p in [lo, hi) of one output row,
// where X is the client's row (its first r_k * inner positions) and c = coef[p / inner].
template <class In>
inline void accumulate_row(float* acc, const In* x, const float* coef, int64_t lo, int64_t hi,
                           int64_t inner) {
  if (inner == 1) {
    for (int64_t p = lo; p < hi; ++p) {
      float c = coef[p];
      float v = load(x, p) * c;
      acc[p - lo] += c != 0.0f ? v : 0.0f;
    }
    return;
  }
  for (int64_t j = lo / inner; j * inner < hi; ++j) {
    float c = coef[j];
    if (c == 0.0f) continue;
    int64_t q0 = std::max(lo, j * inner), q1 = std::min(hi, (j + 1) * inner);
    float* a = acc + (q0 - lo);
    const In* xs = x + q0;
    for (int64_t q = 0; q < q1 - q0; ++q) a[q] += load(xs, q) * c;
  }
}

template <class In, class Out>
void combine_tiles(int64_t t0, int64_t t1, const Layout& L, int64_t num_clients,
                   const void* const* tensors, const int64_t* ranks, const float* coef,
                   const uint8_t* has, const void* fallback, void* out) {
  const int64_t total = L.outer * L.row;
  std::vector<float> acc_buf(static_cast<size_t>(kTile));
  float* acc = acc_buf.data();
  const Out* fb = static_cast<const Out*>(fallback);
  Out* y = static_cast<Out*>(out);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t e0 = t * kTile, e1 = std::min(total, e0 + kTile);
    std::fill(acc, acc + (e1 - e0), 0.0f);
    for (int64_t k = 0; k < num_clients; ++k) {
      const int64_t rk = ranks[k];
      if (rk == 0) continue;
      const In* x = static_cast<const In*>(tensors[k]);
      const int64_t client_row = rk * L.inner;
      const float* ck = coef + k * L.rank;
      for (int64_t o = e0 / L.row; o * L.row < e1; ++o) {
        const int64_t base = o * L.row;
        const int64_t lo = std::max<int64_t>(e0 - base, 0);
        const int64_t hi = std::min<int64_t>(e1 - base, client_row);
        if (lo >= hi) continue;
        accumulate_row(acc + (base + lo - e0), x + o * client_row, ck, lo, hi, L.inner);
      }
    }
    for (int64_t o = e0 / L.row; o * L.row < e1; ++o) {
      const int64_t base = o * L.row;
      const int64_t lo = std::max<int64_t>(e0 - base, 0), hi = std::min<int64_t>(e1 - base, L.row);
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t e = base + p;
        float v = has[p / L.inner] ? acc[e - e0] : (fb != nullptr ? load(fb, e) : 0.0f);
        store(y, e, v);
      }
    }
  }
}

void check_layout(int64_t num_clients, int64_t outer, int64_t rank, int64_t inner) {
  if (num_clients < 0)
    fail(FEDLORA_ERR_INVALID_SIZE, "num_clients must be >= 0, got " + std::to_string(num_clients));
  require_positive(outer, "outer");
  require_positive(rank, "rank");
  require_positive(inner, "inner");
  const int64_t total =
      checked_mul(checked_mul(outer, rank, "outer * rank * inner"), inner, "outer * rank * inner");
  checked_mul(total, 4, "the output's size in bytes");
  checked_mul(checked_mul(num_clients, rank, "num_clients * rank"), 8, "mask's size in bytes");
}

void check_ranks(int64_t num_clients, int64_t rank, const int64_t* ranks) {
  if (num_clients > 0) require_ptr(ranks, "ranks");
  for (int64_t k = 0; k < num_clients; ++k)
    if (ranks[k] < 0 || ranks[k] > rank)
      fail(FEDLORA_ERR_INVALID_SIZE, "ranks[" + std::to_string(k) + "] must lie in [0, rank=" +
                                         std::to_string(rank) + "], got " +
                                         std::to_string(ranks[k]));
}

void check_nonnegative(const double* v, int64_t n, const char* name, int64_t row = 0) {
  for (int64_t i = 0; i < n; ++i)
    if (!(v[i] >= 0.0) || !std::isfinite(v[i])) {
      std::string where = row > 0 ? "[" + std::to_string(i / row) + ", " +
                                        std::to_string(i % row) + "]"
                                  : "[" + std::to_string(i) + "]";
      fail(FEDLORA_ERR_INVALID_VALUE,
           std::string(name) + where + " must be finite and >= 0, got " + num(v[i]));
    }
}

void coefficients(int64_t num_clients, int64_t rank, const int64_t* ranks, const double* weights,
                  const double* mask, float* coef, uint8_t* has) {
  double wmax = 0.0, mmax = 0.0;
  for (int64_t k = 0; k < num_clients; ++k) wmax = std::max(wmax, weights[k]);
  if (mask != nullptr)
    for (int64_t i = 0; i < num_clients * rank; ++i) mmax = std::max(mmax, mask[i]);
  std::vector<double> c(static_cast<size_t>(num_clients * rank));
  std::vector<double> den(static_cast<size_t>(rank), 0.0);
  for (int64_t k = 0; k < num_clients; ++k) {
    const double w = wmax > 0.0 ? weights[k] / wmax : weights[k];
    for (int64_t j = 0; j < rank; ++j) {
      double v = w * (j < ranks[k] ? 1.0 : 0.0);
      if (mask != nullptr) v *= mmax > 0.0 ? mask[k * rank + j] / mmax : mask[k * rank + j];
      c[k * rank + j] = v;
      den[j] += v;
    }
  }
  for (int64_t j = 0; j < rank; ++j) has[j] = den[j] > 0.0 ? 1 : 0;
  for (int64_t k = 0; k < num_clients; ++k)
    for (int64_t j = 0; j < rank; ++j)
      coef[k * rank + j] = static_cast<float>(c[k * rank + j] / (has[j] ? den[j] : 1.0));
}

void combine(int64_t num_clients, const void* const* tensors, const int64_t* ranks, int in_dtype,
             int64_t outer, int64_t rank, int64_t inner, const float* coef, const uint8_t* has,
             const void* fallback, void* out, int out_dtype, int num_threads) {
  const Layout L{outer, rank, inner, rank * inner};
  const int64_t total = outer * L.row;
  const int64_t tiles = (total + kTile - 1) / kTile;
  int64_t work = 0;
  for (int64_t k = 0; k < num_clients; ++k) work = sat_add(work, ranks[k] * inner * outer);
  const int threads = resolve_threads(num_threads, sat_add(work, total), int64_t(1) << 16);
  auto run = [&](auto in_tag, auto out_tag) {
    using In = decltype(in_tag);
    using Out = decltype(out_tag);
    parallel_for(tiles, threads, [&](int64_t t0, int64_t t1) {
      combine_tiles<In, Out>(t0, t1, L, num_clients, tensors, ranks, coef, has, fallback, out);
    });
  };
  if (in_dtype == FEDLORA_FLOAT32 && out_dtype == FEDLORA_FLOAT32) run(float{}, float{});
  else if (in_dtype == FEDLORA_FLOAT32) run(float{}, uint16_t{});
  else if (out_dtype == FEDLORA_FLOAT32) run(uint16_t{}, float{});
  else run(uint16_t{}, uint16_t{});
}

void check_combine_arrays(int64_t num_clients, const void* const* tensors, const int64_t* ranks,
                          int in_dtype, int64_t outer, int64_t rank, int64_t inner,
                          const void* fallback, const void* out, int out_dtype) {
  require_dtype(in_dtype, "in_dtype");
  require_dtype(out_dtype, "out_dtype");
  require_ptr(out, "out");
  if (num_clients > 0) require_ptr(tensors, "tensors");
  const int64_t out_bytes = array_bytes(out, outer * rank * inner, dtype_size(out_dtype), "out");
  array_bytes(fallback, outer * rank * inner, dtype_size(out_dtype), "fallback");
  if (fallback != nullptr && fallback != out && overlaps(fallback, out_bytes, out, out_bytes))
    fail(FEDLORA_ERR_OVERLAP, "out overlaps fallback (out may be fallback itself, not part of it)");
  for (int64_t k = 0; k < num_clients; ++k) {
    if (ranks[k] == 0) continue;
    if (tensors[k] == nullptr)
      fail(FEDLORA_ERR_NULL_POINTER, "tensors[" + std::to_string(k) + "] is NULL (its rank is " +
                                         std::to_string(ranks[k]) + ")");
    const int64_t bytes = array_bytes(tensors[k], outer * ranks[k] * inner, dtype_size(in_dtype),
                                      "tensors[k]");
    if (overlaps(tensors[k], bytes, out, out_bytes))
      fail(FEDLORA_ERR_OVERLAP, "out overlaps tensors[" + std::to_string(k) + "]");
  }
}

void check_coef(int64_t num_clients, int64_t rank, const float* coef, const uint8_t* has) {
  require_ptr(has, "has");
  if (num_clients > 0) require_ptr(coef, "coef");
  require_flags(has, rank, 0, "has");
  for (int64_t i = 0; i < num_clients * rank; ++i)
    if (!(coef[i] >= 0.0f) || !std::isfinite(coef[i]))
      fail(FEDLORA_ERR_INVALID_VALUE, "coef[" + std::to_string(i / rank) + ", " +
                                          std::to_string(i % rank) +
                                          "] must be finite and >= 0, got " + num(coef[i]));
}

}  // namespace
}  // namespace fedlora

using namespace fedlora;

extern "C" {

int fedlora_masked_mean_coefficients(int64_t num_clients, int64_t rank, const int64_t* ranks,
                                     const double* weights, const double* mask, float* coef,
                                     uint8_t* has) {
  return guarded([&] {
    check_layout(num_clients, 1, rank, 1);
    require_positive(num_clients, "num_clients");
    require_ptr(weights, "weights");
    require_ptr(coef, "coef");
    require_ptr(has, "has");
    check_ranks(num_clients, rank, ranks);
    check_nonnegative(weights, num_clients, "weights");
    if (mask != nullptr) check_nonnegative(mask, num_clients * rank, "mask", rank);
    coefficients(num_clients, rank, ranks, weights, mask, coef, has);
  });
}

int fedlora_masked_combine(int64_t num_clients, const void* const* tensors, const int64_t* ranks,
                           int in_dtype, int64_t outer, int64_t rank, int64_t inner,
                           const float* coef, const uint8_t* has, const void* fallback, void* out,
                           int out_dtype, int num_threads) {
  return guarded([&] {
    check_layout(num_clients, outer, rank, inner);
    check_ranks(num_clients, rank, ranks);
    check_coef(num_clients, rank, coef, has);
    check_combine_arrays(num_clients, tensors, ranks, in_dtype, outer, rank, inner, fallback, out,
                         out_dtype);
    combine(num_clients, tensors, ranks, in_dtype, outer, rank, inner, coef, has, fallback, out,
            out_dtype, num_threads);
  });
}

int fedlora_masked_weighted_mean(int64_t num_clients, const void* const* tensors,
                                 const int64_t* ranks, int in_dtype, int64_t outer, int64_t rank,
                                 int64_t inner, const double* weights, const double* mask,
                                 const void* fallback, void* out, int out_dtype,
                                 int num_threads) {
  return guarded([&] {
    check_layout(num_clients, outer, rank, inner);
    check_ranks(num_clients, rank, ranks);
    if (num_clients == 0 && fallback == nullptr)
      fail(FEDLORA_ERR_INVALID_SIZE, "num_clients is 0 and fallback is NULL: nothing to return");
    if (num_clients > 0) {
      require_ptr(weights, "weights");
      check_nonnegative(weights, num_clients, "weights");
      if (mask != nullptr) check_nonnegative(mask, num_clients * rank, "mask", rank);
    }
    check_combine_arrays(num_clients, tensors, ranks, in_dtype, outer, rank, inner, fallback, out,
                         out_dtype);
    std::vector<float> coef(static_cast<size_t>(num_clients * rank));
    std::vector<uint8_t> has(static_cast<size_t>(rank), 0);
    if (num_clients > 0)
      coefficients(num_clients, rank, ranks, weights, mask, coef.data(), has.data());
    combine(num_clients, tensors, ranks, in_dtype, outer, rank, inner, coef.data(), has.data(),
            fallback, out, out_dtype, num_threads);
  });
}

}  // extern "C"
