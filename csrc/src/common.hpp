// Internal helpers shared by the kernels: errors, argument checks, threads, dtype conversion.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <new>
#include <string>

#include "fedlora.h"

namespace fedlora {

// Thrown inside the library only; every exported function catches it (see guarded()).
struct Error {
  int code;
  std::string message;
};

[[noreturn]] inline void fail(int code, std::string message) {
  throw Error{code, std::move(message)};
}

void set_last_error(const char* message);

// Runs body() and turns anything it throws into a status code and fedlora_last_error().
template <class Body>
int guarded(Body&& body) noexcept {
  try {
    set_last_error("");
    body();
    return FEDLORA_OK;
  } catch (const Error& e) {
    set_last_error(e.message.c_str());
    return e.code;
  } catch (const std::bad_alloc&) {
    set_last_error("out of memory");
    return FEDLORA_ERR_INTERNAL;
  } catch (const std::exception& e) {
    set_last_error(e.what());
    return FEDLORA_ERR_INTERNAL;
  } catch (...) {
    set_last_error("unknown internal error");
    return FEDLORA_ERR_INTERNAL;
  }
}

inline void require_ptr(const void* p, const char* name) {
  if (p == nullptr) fail(FEDLORA_ERR_NULL_POINTER, std::string(name) + " is NULL");
}

inline void require_positive(int64_t v, const char* name) {
  if (v <= 0)
    fail(FEDLORA_ERR_INVALID_SIZE, std::string(name) + " must be > 0, got " + std::to_string(v));
}

// a * b, failing with "too big" instead of overflowing (sizes are validated >= 0 first). Every
// exported function forms its sizes in bytes with this before any other arithmetic on them.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  if (a != 0 && b > INT64_MAX / a)
    fail(FEDLORA_ERR_INVALID_SIZE, std::string(what) + " is too big (overflows int64)");
  return a * b;
}

// The size in bytes of an array of `count` elements of `elem` bytes at `p`, failing with "too
// big" when it overflows int64 or the span [p, p + bytes) would wrap around the address space
// (no such array can exist, and the overlap checks must not see a wrapped end).
inline int64_t array_bytes(const void* p, int64_t count, int64_t elem, const char* name) {
  const int64_t bytes = checked_mul(count, elem, name);
  if (p != nullptr &&
      static_cast<uint64_t>(bytes) > UINTPTR_MAX - reinterpret_cast<uintptr_t>(p))
    fail(FEDLORA_ERR_INVALID_SIZE, std::string(name) + " is too big (" + std::to_string(bytes) +
                                       " bytes past its address wrap around memory)");
  return bytes;
}

// a * b saturated at INT64_MAX (a work estimate, never a size): a, b >= 0
inline int64_t sat_mul(int64_t a, int64_t b) {
  return (a != 0 && b > INT64_MAX / a) ? INT64_MAX : a * b;
}

inline int64_t sat_add(int64_t a, int64_t b) { return b > INT64_MAX - a ? INT64_MAX : a + b; }

// a 0/1 flag array: any other byte is refused (a flag is never "any non-zero")
inline void require_flags(const uint8_t* flags, int64_t n, int64_t row, const char* name) {
  for (int64_t i = 0; i < n; ++i)
    if (flags[i] > 1)
      fail(FEDLORA_ERR_INVALID_VALUE,
           std::string(name) + "[" + (row > 0 ? std::to_string(i / row) + ", " +
                                                    std::to_string(i % row)
                                              : std::to_string(i)) +
               "] must be 0 or 1, got " + std::to_string(flags[i]));
}

inline std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

// Byte spans [begin, end) of arrays, to refuse overlapping in-place arguments.
inline bool overlaps(const void* a, int64_t a_bytes, const void* b, int64_t b_bytes) {
  if (a == nullptr || b == nullptr || a_bytes <= 0 || b_bytes <= 0) return false;
  auto a0 = reinterpret_cast<uintptr_t>(a), b0 = reinterpret_cast<uintptr_t>(b);
  return a0 < b0 + static_cast<uintptr_t>(b_bytes) && b0 < a0 + static_cast<uintptr_t>(a_bytes);
}

inline int64_t dtype_size(int dtype) { return dtype == FEDLORA_BFLOAT16 ? 2 : 4; }

inline void require_dtype(int dtype, const char* name) {
  if (dtype != FEDLORA_FLOAT32 && dtype != FEDLORA_BFLOAT16)
    fail(FEDLORA_ERR_UNSUPPORTED, std::string(name) + " must be FEDLORA_FLOAT32 (0) or "
                                  "FEDLORA_BFLOAT16 (1), got " + std::to_string(dtype));
}

// bfloat16 <-> float32, as torch converts (exact widening; round to nearest even, NaN kept NaN)
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// The number of threads to use for `work` units of roughly equal cost, at least `grain` each.
int resolve_threads(int requested, int64_t work, int64_t grain);

// Calls fn(begin, end) on `threads` contiguous parts of [0, n) (the calling thread runs one
// part). A part whose thread cannot be started runs on the calling thread: the result is the
// same, since parts write disjoint outputs.
void parallel_for(int64_t n, int threads, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace fedlora
