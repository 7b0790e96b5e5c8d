/*
 * libfedlora: CPU kernels for federated LoRA behind a plain C ABI.
 *
 * For FL clients and servers that are not Python (a C++ Flower client, an on-device trainer, a
 * Rust or Go aggregation service), and for the CPU path of the Python package fedlora_kernels,
 * which loads this library with ctypes.
 *
 * Conventions (the same as the Python package, see DESIGN.md section 2):
 *   - LoRA factors in PEFT's layout: A is [R, d_in] (rows are rank components), B is [d_out, R]
 *     (columns are components). Every array is dense and row-major (C order).
 *   - Sizes are int64_t; a size that must be positive and is not, a NULL pointer where an array
 *     is required, a NaN or negative weight, a mask entry other than 0/1, or arrays that overlap
 *     where they must not: the function returns an error code, fedlora_last_error() says what
 *     was wrong, and NOTHING has been written to any output.
 *   - Sizes are checked for overflow before any other arithmetic on them: an array whose size in
 *     bytes overflows int64, or whose span would run past the end of the address space, is
 *     refused with FEDLORA_ERR_INVALID_SIZE and a message saying it is "too big".
 *   - 0/1 flag arrays (the uint8 mask of fedlora_masked_adamw, has of fedlora_masked_combine)
 *     hold exactly 0 or 1: any other byte is refused with FEDLORA_ERR_INVALID_VALUE.
 *   - No C++ exception crosses this interface: every function returns an int status
 *     (FEDLORA_OK = 0 on success).
 *   - num_threads: 0 picks a default (the environment variable FEDLORA_NUM_THREADS if set, else
 *     the number of hardware threads); results never depend on the number of threads (every
 *     output element is computed by one thread, in one fixed order).
 *   - Arithmetic is float32 (bfloat16 accepted where noted: it is widened exactly and the result
 *     rounded to nearest even), computed in the order documented per function, so the results
 *     equal the Python reference (fedlora_kernels/reference.py) bitwise where that order is the
 *     same.
 */
#ifndef FEDLORA_H
#define FEDLORA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#if defined(FEDLORA_BUILDING)
#define FEDLORA_API __declspec(dllexport)
#else
#define FEDLORA_API __declspec(dllimport)
#endif
#else
#define FEDLORA_API __attribute__((visibility("default")))
#endif

/* Version of this header; fedlora_version() returns the library's, which a caller should check
 * against FEDLORA_ABI_VERSION (the ABI changes only when the major version does). */
#define FEDLORA_VERSION_MAJOR 0
#define FEDLORA_VERSION_MINOR 1
#define FEDLORA_VERSION_PATCH 0
#define FEDLORA_VERSION_STRING "0.1.0"
#define FEDLORA_ABI_VERSION 1

/* Status codes returned by every function. */
enum {
  FEDLORA_OK = 0,
  FEDLORA_ERR_NULL_POINTER = 1,  /* a required pointer is NULL */
  FEDLORA_ERR_INVALID_SIZE = 2,  /* a size is zero/negative where it must be positive, or too big */
  FEDLORA_ERR_INVALID_VALUE = 3, /* NaN/inf/negative weight, mask not 0/1, bad hyperparameter */
  FEDLORA_ERR_UNSUPPORTED = 4,   /* unknown dtype or option */
  FEDLORA_ERR_OVERLAP = 5,       /* arrays that must be distinct share memory */
  FEDLORA_ERR_INTERNAL = 6       /* out of memory or another failure inside the library */
};

/* Element types of the arrays that accept more than float32. */
typedef enum fedlora_dtype { FEDLORA_FLOAT32 = 0, FEDLORA_BFLOAT16 = 1 } fedlora_dtype;

/* "MAJOR.MINOR.PATCH" of the library (a static string). */
FEDLORA_API const char* fedlora_version(void);
/* FEDLORA_ABI_VERSION the library was built with. */
FEDLORA_API int fedlora_abi_version(void);
/* The message of the last failed call on THIS thread ("" after a successful call). The pointer
 * stays valid until the next libfedlora call on the same thread. */
FEDLORA_API const char* fedlora_last_error(void);
/* A short constant description of a status code. */
FEDLORA_API const char* fedlora_status_string(int status);
/* The number of threads num_threads = 0 stands for. */
FEDLORA_API int fedlora_default_num_threads(void);

/* ---------------------------------------------------------------------------------------------
 * Masked weighted mean over ragged client tensors (the server's reduction).
 *
 * Client k holds an array of shape [outer, r_k, inner] (rank dimension in the middle: A [R, d_in]
 * is outer = 1, inner = d_in; B [d_out, R] is outer = d_out, inner = 1), 0 <= r_k <= rank. The
 * output is [outer, rank, inner]:
 *
 *     out[o, j, i] = sum_k w_k m_kj X_k[o, j, i] / sum_k w_k m_kj      (m_kj = 0 for j >= r_k)
 *
 * and fallback[o, j, i] (or 0 when fallback is NULL) where the denominator is 0. No client array
 * is padded or copied. Evaluated as a convex combination sum_k coef[k, j] X_k[o, j, i] with
 *
 *     w'_k = w_k / max_k w_k,  m'_kj = m_kj / max_kj m_kj   (each only when its maximum is > 0),
 *     c_kj = w'_k m'_kj (0 beyond r_k),  den_j = sum_k c_kj (float64, client order),
 *     coef[k, j] = (float)(c_kj / den_j),  has[j] = den_j > 0,
 *
 * formed in float64, so weights anywhere in float64's range (1e308 and 1e-300 alike) work, and
 * every partial sum stays between the smallest and largest contributing values: finite inputs
 * never overflow, even near the float32 maximum. The sum runs in float32 in client order,
 * acc = acc + X_k * coef[k, j], skipping coefficients equal to 0 (a NaN in a masked-out element
 * does not propagate). This is fedlora_kernels.reference.masked_mean_coefficients followed by the
 * reference sum.
 * ------------------------------------------------------------------------------------------- */

/* The coefficients above: coef [num_clients, rank] float32, has [rank] (0/1). weights [C]
 * (finite, >= 0), mask [C, rank] (finite, >= 0) or NULL (all ones), ranks [C]. */
FEDLORA_API int fedlora_masked_mean_coefficients(int64_t num_clients, int64_t rank,
                                                 const int64_t* ranks, const double* weights,
                                                 const double* mask, float* coef, uint8_t* has);

/* out = sum_k coef[k, j] X_k (has[j]) or fallback (not has[j]), given the coefficients (e.g. from
 * fedlora_masked_mean_coefficients). tensors[k] may be NULL when ranks[k] = 0. in_dtype: the
 * clients' element type; out_dtype: the element type of fallback (if given) and out. out may be
 * fallback itself (an in-place update of the global state), but must not overlap a client. */
FEDLORA_API int fedlora_masked_combine(int64_t num_clients, const void* const* tensors,
                                       const int64_t* ranks, int in_dtype, int64_t outer,
                                       int64_t rank, int64_t inner, const float* coef,
                                       const uint8_t* has, const void* fallback, void* out,
                                       int out_dtype, int num_threads);

/* fedlora_masked_mean_coefficients followed by fedlora_masked_combine. num_clients may be 0
 * only with a fallback (out is then a copy of it). */
FEDLORA_API int fedlora_masked_weighted_mean(int64_t num_clients, const void* const* tensors,
                                             const int64_t* ranks, int in_dtype, int64_t outer,
                                             int64_t rank, int64_t inner, const double* weights,
                                             const double* mask, const void* fallback, void* out,
                                             int out_dtype, int num_threads);

/* ---------------------------------------------------------------------------------------------
 * Masked AdamW step, in place, with HAFL's optional importance update.
 *
 * param, exp_avg, exp_avg_sq (and ema, unc) are float32 [slots, rows, cols]; grad has the same
 * shape, float32 or bfloat16 (grad_dtype). mask [slots, R] (each entry 0 or 1) selects rank
 * components: rows (rank_dim = 0, R = rows: A) or columns (rank_dim = 1, R = cols: B). Elements
 * of masked components keep param, both moments, ema and unc bitwise: masked rows, and masked
 * column spans of 64 elements or more, are not touched at all; shorter column spans (B of a
 * small rank, where the trained and frozen columns share cache lines) are computed alongside
 * and stored back with their own bits by a select, never with a computed value. For a trained element, with b1 = beta1, b2 = beta2 and step t = steps[slot] (a whole
 * number >= 1), exactly as torch.optim.AdamW (and fedlora_kernels.reference.masked_adamw_):
 *
 *   (importance, from the weight before the step)  I = |p*g|,
 *       ema = ema*ib1 + I*(1-ib1),  unc = unc*ib2 + |I - ema|*(1-ib2)    (the new ema)
 *   p = p*(1 - lr*wd);  m = lerp(m, g, 1-b1);  v = fma((1-b2)*g, g, v*b2)
 *   denom = sqrt(v) / sqrt(1 - b2^t) + eps
 *   p = p + (-(lr/(1-b1^t)) * m) / denom                  (flags = 0: a Python-number step)
 *   p = fma(m / denom, -(float)(lr/(1-b1^t)), p)           (FEDLORA_ADAMW_TENSOR_STEP)
 *
 * every constant rounded to float32 from its float64 value; lerp(a, b, w) = fma(w, b-a, a) for
 * w < 0.5, else fma(w-1, b-a, b) (torch's). FEDLORA_ADAMW_TENSOR_STEP reproduces torch's
 * arithmetic for a per-slot step tensor (the bias terms rounded to float32 first).
 * ------------------------------------------------------------------------------------------- */

#define FEDLORA_ADAMW_TENSOR_STEP 1

typedef struct fedlora_adamw_config {
  double lr;           /* >= 0 */
  double beta1;        /* [0, 1) */
  double beta2;        /* [0, 1) */
  double eps;          /* >= 0 */
  double weight_decay; /* >= 0 */
  double importance_beta1; /* [0, 1); read only when ema and unc are given */
  double importance_beta2; /* [0, 1); read only when ema and unc are given */
  int flags;               /* 0 or FEDLORA_ADAMW_TENSOR_STEP */
} fedlora_adamw_config;

/* ema and unc: both NULL (no importance update) or both given. steps [slots]. The in-place arrays
 * (param, exp_avg, exp_avg_sq, ema, unc) must not overlap each other or grad. */
FEDLORA_API int fedlora_masked_adamw(float* param, const void* grad, int grad_dtype,
                                     float* exp_avg, float* exp_avg_sq, float* ema, float* unc,
                                     const uint8_t* mask, int64_t slots, int64_t rows,
                                     int64_t cols, int rank_dim, const double* steps,
                                     const fedlora_adamw_config* config, int num_threads);

/* ---------------------------------------------------------------------------------------------
 * Segment-aware adapter forwards for small batches (float32). Rows seg_offsets[t] to
 * seg_offsets[t+1] of x [n, d_in] form segment t (seg_offsets [num_segments+1]: starts at 0,
 * non-decreasing, ends at n) and use adapter slot seg_adapter[t] in [0, slots). seg_offsets
 * and seg_adapter may both be NULL (one segment, slot 0). y [n, d_out] is written, not
 * accumulated. Dot products accumulate in float32 in a fixed order (8 interleaved partial sums,
 * then a fixed tree), so the result differs from a BLAS matmul by rounding only.
 * ------------------------------------------------------------------------------------------- */

/* y = scale * ((x A_c^T) * m_t) B_c^T; A [slots, rank, d_in], B [slots, d_out, rank],
 * rank_mask [num_segments, rank] (0/1 floats) or NULL. */
FEDLORA_API int fedlora_masked_lora_forward(const float* x, int64_t n, int64_t d_in,
                                            const float* A, const float* B, int64_t slots,
                                            int64_t rank, int64_t d_out, double scale,
                                            const float* rank_mask, const int64_t* seg_offsets,
                                            const int64_t* seg_adapter, int64_t num_segments,
                                            float* y, int num_threads);

/* y = scale * sum_i s[c,i] ((x A_i^T) H[c,i]^T) B_i^T; A [heads, r, d_in], B [heads, d_out, r],
 * H [slots, heads, r, r], s [slots, heads]. */
FEDLORA_API int fedlora_multihead_forward(const float* x, int64_t n, int64_t d_in,
                                          const float* A, const float* B, const float* H,
                                          const float* s, int64_t slots, int64_t heads,
                                          int64_t r, int64_t d_out, double scale,
                                          const int64_t* seg_offsets, const int64_t* seg_adapter,
                                          int64_t num_segments, float* y, int num_threads);

#ifdef __cplusplus
}
#endif

#endif /* FEDLORA_H */
