// Version, error state and the thread pool-free parallel_for of libfedlora.
#include "common.hpp"

#include <algorithm>
#include <cstdlib>
#include <thread>
#include <vector>

namespace fedlora {

namespace {
thread_local std::string g_last_error;
}

void set_last_error(const char* message) {
  try {
    g_last_error = message;
  } catch (...) {
    g_last_error.clear();  // out of memory for the message itself: leave it empty
  }
}

int resolve_threads(int requested, int64_t work, int64_t grain) {
  int threads = requested > 0 ? requested : fedlora_default_num_threads();
  if (grain < 1) grain = 1;
  int64_t useful = std::max<int64_t>(1, work / grain);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, useful)));
}

void parallel_for(int64_t n, int threads, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (threads > n) threads = static_cast<int>(n);
  if (threads <= 1) {
    fn(0, n);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(threads - 1));
  std::vector<std::pair<int64_t, int64_t>> inline_parts;
  for (int t = 1; t < threads; ++t) {
    int64_t b = n * t / threads, e = n * (t + 1) / threads;
    try {
      workers.emplace_back(fn, b, e);
    } catch (...) {
      inline_parts.emplace_back(b, e);
    }
  }
  fn(0, n / threads);
  for (auto& part : inline_parts) fn(part.first, part.second);
  for (auto& w : workers) w.join();
}

}  // namespace fedlora

extern "C" {

const char* fedlora_version(void) { return FEDLORA_VERSION_STRING; }

int fedlora_abi_version(void) { return FEDLORA_ABI_VERSION; }

const char* fedlora_last_error(void) { return fedlora::g_last_error.c_str(); }

const char* fedlora_status_string(int status) {
  switch (status) {
    case FEDLORA_OK: return "ok";
    case FEDLORA_ERR_NULL_POINTER: return "null pointer";
    case FEDLORA_ERR_INVALID_SIZE: return "invalid size";
    case FEDLORA_ERR_INVALID_VALUE: return "invalid value";
    case FEDLORA_ERR_UNSUPPORTED: return "unsupported";
    case FEDLORA_ERR_OVERLAP: return "overlapping arrays";
    case FEDLORA_ERR_INTERNAL: return "internal error";
    default: return "unknown status";
  }
}

int fedlora_default_num_threads(void) {
  const char* env = std::getenv("FEDLORA_NUM_THREADS");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    long v = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && v > 0 && v <= 1024) return static_cast<int>(v);
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

}  // extern "C"
