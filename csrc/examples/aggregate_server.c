/*
 * fedlora_aggregate: a server-side aggregation round in plain C on top of libfedlora.
 *
 *     fedlora_aggregate ROUND_DIR OUT_FILE
 *
 * ROUND_DIR holds what the clients uploaded, as the Python side writes it (see
 * tests/test_csrc.py, write_round()):
 *
 *   manifest.txt   fedlora-aggregate 1
 *                  clients C
 *                  weights w_0 ... w_{C-1}
 *                  tensors T
 *                  then T lines:  NAME RANK_DIM NDIM d_0 ... d_{NDIM-1} r_0 ... r_{C-1}
 *   global.bin     the global state: the T tensors (their full shapes), float32 little-endian,
 *                  C order, one after the other in manifest order
 *   client<k>.bin  client k's upload: the same tensors, except that dimension RANK_DIM has size
 *                  r_k (a rank prefix, PreLort/HetLoRA style)
 *
 * Per tensor, rank index j of the result is the weighted mean of the clients that hold it
 * (r_k > j), the global value where none does: PreLort's segment-wise rule, which is FedIT's
 * weighted mean when every client holds the full rank. RANK_DIM = -1 marks a tensor without a
 * rank dimension (a classifier head, say): the plain weighted mean over every client. The result
 * (the global shapes, in manifest order) is written to OUT_FILE in the same raw format.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fedlora.h"

#define MAX_DIMS 8
#define MAX_NAME 512

static int fail(const char* what) {
  fprintf(stderr, "fedlora_aggregate: %s\n", what);
  return 1;
}

static int read_floats(FILE* f, float* dst, int64_t n, const char* what) {
  if (n > 0 && fread(dst, sizeof(float), (size_t)n, f) != (size_t)n) {
    fprintf(stderr, "fedlora_aggregate: %s is shorter than the manifest says\n", what);
    return 1;
  }
  return 0;
}

static FILE* open_in(const char* dir, const char* name, const char* mode) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = fopen(path, mode);
  if (f == NULL) fprintf(stderr, "fedlora_aggregate: cannot open %s\n", path);
  return f;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s ROUND_DIR OUT_FILE\n", argv[0]);
    return 2;
  }
  if (fedlora_abi_version() != FEDLORA_ABI_VERSION) return fail("libfedlora ABI mismatch");
  const char* dir = argv[1];
  FILE* manifest = open_in(dir, "manifest.txt", "r");
  if (manifest == NULL) return 1;
  int version = 0;
  long long clients = 0, tensors = 0;
  if (fscanf(manifest, "fedlora-aggregate %d clients %lld weights", &version, &clients) != 2 ||
      version != 1 || clients < 1 || clients > 100000)
    return fail("manifest.txt: expected 'fedlora-aggregate 1', 'clients C', 'weights ...'");
  double* weights = malloc(sizeof(double) * (size_t)clients);
  int64_t* ranks = malloc(sizeof(int64_t) * (size_t)clients);
  float** data = calloc((size_t)clients, sizeof(float*));
  FILE** files = calloc((size_t)clients, sizeof(FILE*));
  if (weights == NULL || ranks == NULL || data == NULL || files == NULL) return fail("out of memory");
  for (long long k = 0; k < clients; ++k)
    if (fscanf(manifest, "%lf", &weights[k]) != 1) return fail("manifest.txt: too few weights");
  if (fscanf(manifest, " tensors %lld", &tensors) != 1 || tensors < 0)
    return fail("manifest.txt: expected 'tensors T'");

  FILE* global = open_in(dir, "global.bin", "rb");
  FILE* out = fopen(argv[2], "wb");
  if (global == NULL || out == NULL) return fail("cannot open global.bin or the output file");
  for (long long k = 0; k < clients; ++k) {
    char name[64];
    snprintf(name, sizeof name, "client%lld.bin", k);
    if ((files[k] = open_in(dir, name, "rb")) == NULL) return 1;
  }

  for (long long t = 0; t < tensors; ++t) {
    char name[MAX_NAME];
    int rank_dim = 0, ndim = 0;
    long long dims[MAX_DIMS];
    if (fscanf(manifest, "%511s %d %d", name, &rank_dim, &ndim) != 3 || ndim < 1 ||
        ndim > MAX_DIMS || rank_dim < -1 || rank_dim >= ndim)
      return fail("manifest.txt: bad tensor line (NAME RANK_DIM NDIM dims... ranks...)");
    int64_t numel = 1, outer = 1, inner = 1, rank = 1;
    for (int d = 0; d < ndim; ++d) {
      if (fscanf(manifest, "%lld", &dims[d]) != 1 || dims[d] < 1)
        return fail("manifest.txt: bad dimension");
      numel *= dims[d];
      if (rank_dim >= 0 && d < rank_dim) outer *= dims[d];
      if (rank_dim >= 0 && d > rank_dim) inner *= dims[d];
    }
    if (rank_dim >= 0) {
      rank = dims[rank_dim];
    } else { /* no rank dimension: one "component" holding the whole tensor */
      inner = numel;
    }
    for (long long k = 0; k < clients; ++k) {
      long long r = 0;
      if (fscanf(manifest, "%lld", &r) != 1 || r < 0 || r > rank)
        return fail("manifest.txt: a client rank is missing or out of range");
      ranks[k] = (int64_t)r;
      free(data[k]);
      data[k] = malloc(sizeof(float) * (size_t)(outer * r * inner + 1));
      if (data[k] == NULL) return fail("out of memory");
      if (read_floats(files[k], data[k], outer * r * inner, "a client file")) return 1;
    }
    float* fallback = malloc(sizeof(float) * (size_t)numel);
    float* result = malloc(sizeof(float) * (size_t)numel);
    if (fallback == NULL || result == NULL) return fail("out of memory");
    if (read_floats(global, fallback, numel, "global.bin")) return 1;

    int status = fedlora_masked_weighted_mean(
        (int64_t)clients, (const void* const*)data, ranks, FEDLORA_FLOAT32, outer, rank, inner,
        weights, NULL, fallback, result, FEDLORA_FLOAT32, 0);
    if (status != FEDLORA_OK) {
      fprintf(stderr, "fedlora_aggregate: %s: %s (%s)\n", name, fedlora_last_error(),
              fedlora_status_string(status));
      return 1;
    }
    if (fwrite(result, sizeof(float), (size_t)numel, out) != (size_t)numel)
      return fail("cannot write the output file");
    free(fallback);
    free(result);
  }
  if (fclose(out) != 0) return fail("cannot write the output file");
  printf("fedlora_aggregate: %lld tensors from %lld clients (libfedlora %s)\n", tensors, clients,
         fedlora_version());
  return 0;
}
