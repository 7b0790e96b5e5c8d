// Segment-aware masked-LoRA and multi-head (Ravan) forwards for small batches (see fedlora.h).
#include <algorithm>
#include <vector>

#include "common.hpp"

namespace fedlora {
namespace {

// sum_q a[q] * b[q] in float32: 8 interleaved partial sums, then a fixed tree (deterministic,
// and vectorisable without reassociation)
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t q = 0;
  for (; q + 8 <= n; q += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[q + l] * b[q + l];
  for (int l = 0; q < n; ++q, ++l) acc[l] += a[q] * b[q];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// The segment of every row, validated: seg_offsets start at 0, never decrease, end at n.
std::vector<int64_t> row_slots(int64_t n, const int64_t* seg_offsets, const int64_t* seg_adapter,
                               int64_t num_segments, int64_t slots, std::vector<int64_t>* seg_of_row) {
  std::vector<int64_t> slot(static_cast<size_t>(n), 0);
  if (seg_of_row != nullptr) seg_of_row->assign(static_cast<size_t>(n), 0);
  if (seg_offsets == nullptr && seg_adapter == nullptr) {
    if (num_segments != 1 && num_segments != 0)
      fail(FEDLORA_ERR_INVALID_SIZE, "seg_offsets and seg_adapter are NULL (one segment) but "
                                     "num_segments is " + std::to_string(num_segments));
    return slot;
  }
  require_ptr(seg_offsets, "seg_offsets");
  require_ptr(seg_adapter, "seg_adapter");
  require_positive(num_segments, "num_segments");
  if (seg_offsets[0] != 0 || seg_offsets[num_segments] != n)
    fail(FEDLORA_ERR_INVALID_VALUE, "seg_offsets must start at 0 and end at n=" +
                                        std::to_string(n) + ", got " +
                                        std::to_string(seg_offsets[0]) + " ... " +
                                        std::to_string(seg_offsets[num_segments]));
  for (int64_t t = 0; t < num_segments; ++t) {
    if (seg_offsets[t + 1] < seg_offsets[t])
      fail(FEDLORA_ERR_INVALID_VALUE, "seg_offsets must be non-decreasing (entry " +
                                          std::to_string(t + 1) + ")");
    if (seg_adapter[t] < 0 || seg_adapter[t] >= slots)
      fail(FEDLORA_ERR_INVALID_VALUE, "seg_adapter[" + std::to_string(t) + "] must lie in [0, " +
                                          std::to_string(slots) + "), got " +
                                          std::to_string(seg_adapter[t]));
  }
  for (int64_t t = 0; t < num_segments; ++t)
    for (int64_t i = seg_offsets[t]; i < seg_offsets[t + 1]; ++i) {
      slot[i] = seg_adapter[t];
      if (seg_of_row != nullptr) (*seg_of_row)[i] = t;
    }
  return slot;
}

struct Sized {
  const void* p;
  int64_t count;
  const char* name;
};

// every float32 array's size in bytes fits (see array_bytes): before any other arithmetic
void check_sizes(std::initializer_list<Sized> arrays) {
  for (const Sized& a : arrays) array_bytes(a.p, a.count, 4, a.name);
}

void check_out(const float* y, int64_t y_len, std::initializer_list<std::pair<const float*, int64_t>> ins) {
  for (auto& in : ins)
    if (overlaps(y, y_len * 4, in.first, in.second * 4))
      fail(FEDLORA_ERR_OVERLAP, "y overlaps an input array");
}

}  // namespace
}  // namespace fedlora

using namespace fedlora;

extern "C" {

int fedlora_masked_lora_forward(const float* x, int64_t n, int64_t d_in, const float* A,
                                const float* B, int64_t slots, int64_t rank, int64_t d_out,
                                double scale, const float* rank_mask, const int64_t* seg_offsets,
                                const int64_t* seg_adapter, int64_t num_segments, float* y,
                                int num_threads) {
  return guarded([&] {
    for (auto [p, name] : {std::pair<const void*, const char*>{x, "x"}, {A, "A"}, {B, "B"}, {y, "y"}})
      require_ptr(p, name);
    require_positive(n, "n");
    require_positive(d_in, "d_in");
    require_positive(slots, "slots");
    require_positive(rank, "rank");
    require_positive(d_out, "d_out");
    if (!std::isfinite(scale)) fail(FEDLORA_ERR_INVALID_VALUE, "scale must be finite, got " + num(scale));
    const int64_t nx = checked_mul(n, d_in, "x (n * d_in)"), ny = checked_mul(n, d_out, "y (n * d_out)");
    const int64_t na = checked_mul(checked_mul(slots, rank, "A size"), d_in, "A size");
    const int64_t nb = checked_mul(checked_mul(slots, rank, "B size"), d_out, "B size");
    check_sizes({{x, nx, "x"}, {A, na, "A"}, {B, nb, "B"}, {y, ny, "y"}});
    if (rank_mask != nullptr)
      array_bytes(rank_mask, checked_mul(seg_offsets == nullptr ? 1 : num_segments, rank, "rank_mask size"), 4, "rank_mask");
    std::vector<int64_t> seg;
    const std::vector<int64_t> slot = row_slots(n, seg_offsets, seg_adapter, num_segments, slots, &seg);
    if (rank_mask != nullptr) {
      const int64_t segs = seg_offsets == nullptr ? 1 : num_segments;
      for (int64_t i = 0; i < segs * rank; ++i)
        if (rank_mask[i] != 0.0f && rank_mask[i] != 1.0f)
          fail(FEDLORA_ERR_INVALID_VALUE, "rank_mask entries must be 0 or 1, got " + num(rank_mask[i]) +
                                              " at [" + std::to_string(i / rank) + ", " +
                                              std::to_string(i % rank) + "]");
    }
    check_out(y, ny, {{x, nx}, {A, na}, {B, nb}});
    const float sc = static_cast<float>(scale);
    const int threads =
        resolve_threads(num_threads, sat_mul(sat_mul(n, sat_add(d_in, d_out)), rank), int64_t(1) << 17);
    parallel_for(n, threads, [&](int64_t r0, int64_t r1) {
      std::vector<float> t(static_cast<size_t>(rank));
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t c = slot[row];
        const float* xr = x + row * d_in;
        const float* Ac = A + c * rank * d_in;
        const float* Bc = B + c * d_out * rank;
        const float* mk = rank_mask != nullptr ? rank_mask + seg[row] * rank : nullptr;
        for (int64_t j = 0; j < rank; ++j) {
          float s = dot(xr, Ac + j * d_in, d_in);
          if (mk != nullptr) s = s * mk[j];  // as the reference: (S * m) * scale
          t[j] = s * sc;
        }
        float* yr = y + row * d_out;
        for (int64_t o = 0; o < d_out; ++o) yr[o] = dot(t.data(), Bc + o * rank, rank);
      }
    });
  });
}

int fedlora_multihead_forward(const float* x, int64_t n, int64_t d_in, const float* A,
                              const float* B, const float* H, const float* s, int64_t slots,
                              int64_t heads, int64_t r, int64_t d_out, double scale,
                              const int64_t* seg_offsets, const int64_t* seg_adapter,
                              int64_t num_segments, float* y, int num_threads) {
  return guarded([&] {
    for (auto [p, name] : {std::pair<const void*, const char*>{x, "x"}, {A, "A"}, {B, "B"},
                           {H, "H"}, {s, "s"}, {y, "y"}})
      require_ptr(p, name);
    require_positive(n, "n");
    require_positive(d_in, "d_in");
    require_positive(slots, "slots");
    require_positive(heads, "heads");
    require_positive(r, "r");
    require_positive(d_out, "d_out");
    if (!std::isfinite(scale)) fail(FEDLORA_ERR_INVALID_VALUE, "scale must be finite, got " + num(scale));
    const int64_t hr = checked_mul(heads, r, "heads * r");
    const int64_t nx = checked_mul(n, d_in, "x (n * d_in)"), ny = checked_mul(n, d_out, "y (n * d_out)");
    const int64_t na = checked_mul(hr, d_in, "A size"), nb = checked_mul(hr, d_out, "B size");
    const int64_t nh = checked_mul(checked_mul(slots, hr, "H size"), r, "H size");
    const int64_t ns = checked_mul(slots, heads, "s size");
    check_sizes({{x, nx, "x"}, {A, na, "A"}, {B, nb, "B"}, {H, nh, "H"}, {s, ns, "s"}, {y, ny, "y"}});
    const std::vector<int64_t> slot = row_slots(n, seg_offsets, seg_adapter, num_segments, slots, nullptr);
    check_out(y, ny, {{x, nx}, {A, na}, {B, nb}, {H, nh}, {s, ns}});
    const float sc = static_cast<float>(scale);
    // B regrouped once as [d_out, heads * r] (b_cat), so each output is one dot product
    std::vector<float> b_cat(static_cast<size_t>(nb));
    for (int64_t i = 0; i < heads; ++i)
      for (int64_t o = 0; o < d_out; ++o)
        for (int64_t j = 0; j < r; ++j) b_cat[o * hr + i * r + j] = B[(i * d_out + o) * r + j];
    const int threads =
        resolve_threads(num_threads, sat_mul(sat_mul(n, sat_add(d_in, d_out)), hr), int64_t(1) << 17);
    parallel_for(n, threads, [&](int64_t r0, int64_t r1) {
      std::vector<float> S(static_cast<size_t>(hr)), T(static_cast<size_t>(hr));
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t c = slot[row];
        const float* xr = x + row * d_in;
        for (int64_t q = 0; q < hr; ++q) S[q] = dot(xr, A + q * d_in, d_in);
        for (int64_t i = 0; i < heads; ++i) {
          const float* Hci = H + ((c * heads + i) * r) * r;
          const float si = s[c * heads + i];
          for (int64_t j = 0; j < r; ++j) T[i * r + j] = dot(S.data() + i * r, Hci + j * r, r) * si;
        }
        float* yr = y + row * d_out;
        for (int64_t o = 0; o < d_out; ++o) yr[o] = dot(T.data(), b_cat.data() + o * hr, hr) * sc;
      }
    });
  });
}

}  // extern "C"
