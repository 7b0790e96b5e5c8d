// Masked AdamW step with HAFL's optional importance update (see fedlora.h for the arithmetic).
//
// Only the elements of trained components are visited: the mask is turned into runs of
// contiguous trained elements, and each run goes through one vectorisable loop, so half the
// components masked costs about half the time of all of them on. The loop needs true fused
// multiply-adds (torch's lerp and addcmul use them); on x86 it is compiled twice, for AVX2+FMA
// and for the baseline ISA (where std::fma is a library call: slower, same values).
#include <algorithm>
#include <vector>

#include "common.hpp"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FEDLORA_X86_DISPATCH 1
#define FEDLORA_INLINE inline __attribute__((always_inline))
#else
#define FEDLORA_INLINE inline
#endif

namespace fedlora {
namespace {

constexpr int64_t kChunk = 16384;  // longest run one call processes (load balance over threads)

// Contiguous elements [offset, offset + len) of one slot, all trained (col_mask == nullptr); or,
// for a column mask with short spans, `len` whole rows of `cols` elements starting at offset,
// where only the columns with col_mask[k] != 0 are trained.
struct Run {
  int64_t offset, len, slot;
  const uint32_t* col_mask;  // [len * cols] select words: all ones (trained) or 0
};

struct Consts {  // float32 constants, each rounded once from its float64 value (as torch does)
  float decay, lerp_coeff, one_minus_b2, b2, eps, ib1, one_minus_ib1, ib2, one_minus_ib2;
  bool lerp_small;
};

struct Job {
  float* param;
  const void* grad;
  float *m, *v, *ema, *unc;
  const Run* runs;
  int64_t cols;    // row length
  int64_t period;  // length of a column pattern: whole rows, at least 256 elements
  const float* neg_step_size;  // [slots]
  const float* bc2_sqrt;       // [slots]
  Consts c;
};

template <class G>
FEDLORA_INLINE float grad_at(const G* g, int64_t i);
template <>
FEDLORA_INLINE float grad_at<float>(const float* g, int64_t i) { return g[i]; }
template <>
FEDLORA_INLINE float grad_at<uint16_t>(const uint16_t* g, int64_t i) { return bf16_to_f32(g[i]); }

// One element's update (see fedlora.h); returns the new param, m, v (and ema, unc).
struct Updated {
  float p, m, v, ema, unc;
};

template <bool kImportance, bool kTensorStep>
FEDLORA_INLINE Updated update(const Consts& c, float p0, float gi, float m0, float v0, float e0,
                              float u0, float neg_ss, float bc) {
  Updated r{};
  if (kImportance) {
    const float sens = std::fabs(p0 * gi);
    r.ema = e0 * c.ib1 + sens * c.one_minus_ib1;
    r.unc = u0 * c.ib2 + std::fabs(sens - r.ema) * c.one_minus_ib2;
  }
  const float pd = p0 * c.decay;
  r.m = std::fma(c.lerp_coeff, gi - m0, c.lerp_small ? m0 : gi);
  r.v = std::fma(c.one_minus_b2 * gi, gi, v0 * c.b2);
  const float denom = std::sqrt(r.v) / bc + c.eps;
  r.p = kTensorStep ? std::fma(r.m / denom, neg_ss, pd) : pd + (neg_ss * r.m) / denom;
  return r;
}

template <bool kImportance, bool kTensorStep, class G>
FEDLORA_INLINE void process_runs(const Job& job, int64_t r0, int64_t r1) {
  const Consts c = job.c;
  for (int64_t r = r0; r < r1; ++r) {
    const Run run = job.runs[r];
    float* __restrict p = job.param + run.offset;
    const G* __restrict g = static_cast<const G*>(job.grad) + run.offset;
    float* __restrict m = job.m + run.offset;
    float* __restrict v = job.v + run.offset;
    float* __restrict ema = kImportance ? job.ema + run.offset : nullptr;
    float* __restrict unc = kImportance ? job.unc + run.offset : nullptr;
    const float neg_ss = job.neg_step_size[run.slot], bc = job.bc2_sqrt[run.slot];
    if (run.col_mask == nullptr) {
      for (int64_t i = 0; i < run.len; ++i) {
        const Updated u = update<kImportance, kTensorStep>(
            c, p[i], grad_at(g, i), m[i], v[i], kImportance ? ema[i] : 0.0f,
            kImportance ? unc[i] : 0.0f, neg_ss, bc);
        p[i] = u.p;
        m[i] = u.m;
        v[i] = u.v;
        if (kImportance) {
          ema[i] = u.ema;
          unc[i] = u.unc;
        }
      }
      continue;
    }
    // short column spans: compute every element of the rows (vectorised) and select per
    // element with the slot's repeating column pattern; a masked element is stored back with
    // its own bits (never with a computed value)
    const uint32_t* __restrict keep = run.col_mask;  // one period: job.period elements
    const int64_t n = run.len * job.cols, period = job.period;
    for (int64_t b = 0; b < n; b += period) {
      const int64_t len = std::min(period, n - b);
      for (int64_t k = 0; k < len; ++k) {
        const int64_t i = b + k;
        const float p0 = p[i], m0 = m[i], v0 = v[i];
        const float e0 = kImportance ? ema[i] : 0.0f, u0 = kImportance ? unc[i] : 0.0f;
        const Updated u =
            update<kImportance, kTensorStep>(c, p0, grad_at(g, i), m0, v0, e0, u0, neg_ss, bc);
        const bool on = keep[k] != 0;
        p[i] = on ? u.p : p0;
        m[i] = on ? u.m : m0;
        v[i] = on ? u.v : v0;
        if (kImportance) {
          ema[i] = on ? u.ema : e0;
          unc[i] = on ? u.unc : u0;
        }
      }
    }
  }
}

template <bool kImportance, bool kTensorStep, class G>
void runs_baseline(const Job& job, int64_t r0, int64_t r1) {
  process_runs<kImportance, kTensorStep, G>(job, r0, r1);
}

#ifdef FEDLORA_X86_DISPATCH
template <bool kImportance, bool kTensorStep, class G>
__attribute__((target("avx2,fma"))) void runs_fma(const Job& job, int64_t r0, int64_t r1) {
  process_runs<kImportance, kTensorStep, G>(job, r0, r1);
}

bool cpu_has_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

using RunsFn = void (*)(const Job&, int64_t, int64_t);

template <bool kImportance, bool kTensorStep, class G>
RunsFn pick() {
#ifdef FEDLORA_X86_DISPATCH
  if (cpu_has_fma()) return &runs_fma<kImportance, kTensorStep, G>;
#endif
  return &runs_baseline<kImportance, kTensorStep, G>;
}

template <bool kImportance, bool kTensorStep>
RunsFn pick_grad(int grad_dtype) {
  return grad_dtype == FEDLORA_BFLOAT16 ? pick<kImportance, kTensorStep, uint16_t>()
                                        : pick<kImportance, kTensorStep, float>();
}

int64_t pattern_period(int64_t cols) { return cols * std::max<int64_t>(1, 256 / cols); }

void push_chunked(std::vector<Run>& runs, int64_t offset, int64_t len, int64_t slot) {
  for (int64_t done = 0; done < len; done += kChunk)
    runs.push_back(Run{offset + done, std::min(kChunk, len - done), slot, nullptr});
}

// The work over all slots: runs of contiguous trained elements, or (columns masked in short
// spans) blocks of rows with a column mask.
std::vector<Run> trained_runs(const uint8_t* mask, int64_t slots, int64_t rows, int64_t cols,
                              int rank_dim, std::vector<uint32_t>& words) {
  std::vector<Run> runs;
  const int64_t rank = rank_dim == 0 ? rows : cols;
  // rank_dim = 1 with short spans: per slot, its column mask repeated over whole rows to at
  // least 256 elements, as select words (all ones or 0): blocks of rows are flat loops
  const int64_t period = pattern_period(cols);
  if (rank_dim == 1) words.assign(static_cast<size_t>(slots * period), 0u);
  std::vector<std::pair<int64_t, int64_t>> spans;  // [j0, j1) of trained components
  for (int64_t s = 0; s < slots; ++s) {
    spans.clear();
    int64_t trained = 0;
    const uint8_t* ms = mask + s * rank;
    for (int64_t j = 0; j < rank;) {
      if (!ms[j]) {
        ++j;
        continue;
      }
      int64_t j1 = j;
      while (j1 < rank && ms[j1]) ++j1;
      spans.emplace_back(j, j1);
      trained += j1 - j;
      j = j1;
    }
    const int64_t base = s * rows * cols;
    if (spans.empty()) continue;
    if (rank_dim == 0) {
      for (auto& sp : spans)
        push_chunked(runs, base + sp.first * cols, (sp.second - sp.first) * cols, s);
    } else if (trained == cols) {
      push_chunked(runs, base, rows * cols, s);  // every column on: the slot is one run
    } else if (trained < 64 * static_cast<int64_t>(spans.size())) {
      // spans shorter than a few cache lines on average: whole rows (the same cache lines are
      // touched anyway), computed vectorised, stores selected by column
      uint32_t* pattern = words.data() + s * period;
      for (int64_t i = 0; i < period; ++i) pattern[i] = ms[i % cols] ? 0xFFFFFFFFu : 0u;
      const int64_t per = std::max<int64_t>(1, kChunk / cols);
      for (int64_t r = 0; r < rows; r += per)
        runs.push_back(Run{base + r * cols, std::min(per, rows - r), s, pattern});
    } else {
      for (int64_t r = 0; r < rows; ++r)
        for (auto& sp : spans)
          runs.push_back(Run{base + r * cols + sp.first, sp.second - sp.first, s, nullptr});
    }
  }
  return runs;
}

void check_beta(double v, const char* name) {
  if (!(v >= 0.0 && v < 1.0))
    fail(FEDLORA_ERR_INVALID_VALUE, std::string(name) + " must lie in [0, 1), got " + num(v));
}

void check_nonneg(double v, const char* name) {
  if (!(v >= 0.0) || !std::isfinite(v))
    fail(FEDLORA_ERR_INVALID_VALUE, std::string(name) + " must be finite and >= 0, got " + num(v));
}

}  // namespace
}  // namespace fedlora

using namespace fedlora;

extern "C" int fedlora_masked_adamw(float* param, const void* grad, int grad_dtype,
                                    float* exp_avg, float* exp_avg_sq, float* ema, float* unc,
                                    const uint8_t* mask, int64_t slots, int64_t rows,
                                    int64_t cols, int rank_dim, const double* steps,
                                    const fedlora_adamw_config* config, int num_threads) {
  return guarded([&] {
    require_ptr(param, "param");
    require_ptr(grad, "grad");
    require_ptr(exp_avg, "exp_avg");
    require_ptr(exp_avg_sq, "exp_avg_sq");
    require_ptr(mask, "mask");
    require_ptr(steps, "steps");
    require_ptr(config, "config");
    if ((ema == nullptr) != (unc == nullptr))
      fail(FEDLORA_ERR_NULL_POINTER, "ema and unc must both be given or both be NULL");
    require_dtype(grad_dtype, "grad_dtype");
    require_positive(slots, "slots");
    require_positive(rows, "rows");
    require_positive(cols, "cols");
    if (rank_dim != 0 && rank_dim != 1)
      fail(FEDLORA_ERR_INVALID_VALUE, "rank_dim must be 0 (rows) or 1 (columns), got " +
                                          std::to_string(rank_dim));
    const int64_t total = checked_mul(checked_mul(slots, rows, "slots * rows * cols"), cols,
                                      "slots * rows * cols");
    const int64_t bytes = array_bytes(param, total, 4, "param");
    for (auto [a, name] : {std::pair<const void*, const char*>{exp_avg, "exp_avg"},
                           {exp_avg_sq, "exp_avg_sq"}, {ema, "ema"}, {unc, "unc"}})
      array_bytes(a, total, 4, name);
    const int64_t grad_bytes = array_bytes(grad, total, dtype_size(grad_dtype), "grad");
    array_bytes(steps, slots, 8, "steps");
    array_bytes(mask, checked_mul(slots, rank_dim == 0 ? rows : cols, "mask size"), 1, "mask");
    const fedlora_adamw_config& cfg = *config;
    if (cfg.flags & ~FEDLORA_ADAMW_TENSOR_STEP)
      fail(FEDLORA_ERR_UNSUPPORTED, "config.flags has unknown bits: " + std::to_string(cfg.flags));
    check_nonneg(cfg.lr, "config.lr");
    check_beta(cfg.beta1, "config.beta1");
    check_beta(cfg.beta2, "config.beta2");
    check_nonneg(cfg.eps, "config.eps");
    check_nonneg(cfg.weight_decay, "config.weight_decay");
    if (ema != nullptr) {
      check_beta(cfg.importance_beta1, "config.importance_beta1");
      check_beta(cfg.importance_beta2, "config.importance_beta2");
    }
    const int64_t rank = rank_dim == 0 ? rows : cols;
    require_flags(mask, slots * rank, rank, "mask");
    for (int64_t s = 0; s < slots; ++s)
      if (!(steps[s] >= 1.0) || !std::isfinite(steps[s]) || steps[s] != std::floor(steps[s]))
        fail(FEDLORA_ERR_INVALID_VALUE, "steps[" + std::to_string(s) +
                                            "] must be a whole number >= 1, got " + num(steps[s]));
    const struct {
      const void* p;
      const char* name;
      int64_t bytes;
    } arrays[] = {{param, "param", bytes},     {exp_avg, "exp_avg", bytes},
                  {exp_avg_sq, "exp_avg_sq", bytes}, {ema, "ema", bytes},
                  {unc, "unc", bytes},         {grad, "grad", grad_bytes}};
    for (int a = 0; a < 5; ++a)
      for (int b = a + 1; b < 6; ++b)
        if (overlaps(arrays[a].p, arrays[a].bytes, arrays[b].p, arrays[b].bytes))
          fail(FEDLORA_ERR_OVERLAP, std::string(arrays[a].name) + " and " + arrays[b].name +
                                        " share memory (the arrays updated in place must be "
                                        "distinct from each other and from grad)");

    // per-slot bias terms: float64 as torch.optim forms them, then rounded to float32
    const bool tensor_step = (cfg.flags & FEDLORA_ADAMW_TENSOR_STEP) != 0;
    std::vector<float> neg_ss(static_cast<size_t>(slots)), bc2(static_cast<size_t>(slots));
    for (int64_t s = 0; s < slots; ++s) {
      const double ss = cfg.lr / (1.0 - std::pow(cfg.beta1, steps[s]));
      const double one_minus = 1.0 - std::pow(cfg.beta2, steps[s]);
      const double bc = tensor_step ? std::sqrt(one_minus) : std::pow(one_minus, 0.5);
      neg_ss[s] = tensor_step ? -static_cast<float>(ss) : static_cast<float>(-ss);
      bc2[s] = static_cast<float>(bc);
    }
    Consts c{};
    c.decay = static_cast<float>(1.0 - cfg.lr * cfg.weight_decay);
    const float w = static_cast<float>(1.0 - cfg.beta1);
    c.lerp_small = std::fabs(w) < 0.5f;
    c.lerp_coeff = c.lerp_small ? w : w - 1.0f;
    c.one_minus_b2 = static_cast<float>(1.0 - cfg.beta2);
    c.b2 = static_cast<float>(cfg.beta2);
    c.eps = static_cast<float>(cfg.eps);
    c.ib1 = static_cast<float>(cfg.importance_beta1);
    c.one_minus_ib1 = static_cast<float>(1.0 - cfg.importance_beta1);
    c.ib2 = static_cast<float>(cfg.importance_beta2);
    c.one_minus_ib2 = static_cast<float>(1.0 - cfg.importance_beta2);

    std::vector<uint32_t> words;
    const std::vector<Run> runs = trained_runs(mask, slots, rows, cols, rank_dim, words);
    if (runs.empty()) return;
    int64_t work = 0;
    for (const Run& r : runs) work = sat_add(work, r.col_mask != nullptr ? r.len * cols : r.len);
    Job job{param,       grad, exp_avg,
            exp_avg_sq,  ema,  unc,
            runs.data(), cols, pattern_period(cols),
            neg_ss.data(), bc2.data(), c};
    RunsFn fn = ema != nullptr
                    ? (tensor_step ? pick_grad<true, true>(grad_dtype) : pick_grad<true, false>(grad_dtype))
                    : (tensor_step ? pick_grad<false, true>(grad_dtype) : pick_grad<false, false>(grad_dtype));
    const int threads = resolve_threads(num_threads, work, int64_t(1) << 15);
    parallel_for(static_cast<int64_t>(runs.size()), threads,
                 [&](int64_t r0, int64_t r1) { fn(job, r0, r1); });
  });
}
