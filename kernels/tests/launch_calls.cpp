// One C API call on fake device addresses, for the launch check of tests/aot/test_cmake_build.py (run with
// FINEVIT_CUDA_LIBRARY=libfake_cuda.so, which writes the launches down instead of running them). Prints the
// status name and exits 0 on FINEVIT_SUCCESS.
//   launch_calls attention DTYPE TOKENS HEADS HEAD_DIM NUM_SEQS ROPE PAD   q, k, v views of a fused (T, 3, H, D)
//                                                                          buffer whose rows have PAD extra elements
//   launch_calls rope DTYPE TOKENS HEADS HEAD_DIM
//   launch_calls patch_embed DTYPE ROWS CHANNELS PATCH WIDTH BIAS
// Addresses (the Python side expects the same): QKV 0x10000000, OUT 0x20000000, CU_SEQLENS 0x30000000,
// COS 0x40000000, SIN 0x50000000, WORKSPACE 0x60000000; rope: X = QKV; patch embedding: PATCHES = QKV,
// WEIGHT 0x70000000, BIAS 0x80000000, NORM 0x90000000.
#include <finevit_kernels.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

static void *at(uintptr_t address) { return reinterpret_cast<void *>(address); }

int main(int argc, char **argv) {
  if (argc < 3) return 2;
  std::string op = argv[1];
  auto arg = [&](int i) { return std::atoll(argv[i]); };
  finevit_dtype dtype = static_cast<finevit_dtype>(arg(2));
  finevit_status status;
  if (op == "attention" && argc == 9) {
    int64_t tokens = arg(3), heads = arg(4), dim = arg(5), seqs = arg(6), rope = arg(7), pad = arg(8);
    int64_t row = 3 * heads * dim + pad, esize = 2;
    char *qkv = static_cast<char *>(at(0x10000000));
    finevit_view q{qkv, row, dim}, k{qkv + heads * dim * esize, row, dim}, v{qkv + 2 * heads * dim * esize, row, dim};
    finevit_view out{at(0x20000000), heads * dim, dim};
    size_t bytes = finevit_varlen_attention_workspace_size(tokens, int(heads), int(dim), int(seqs), dtype, int(rope));
    status = finevit_varlen_attention(q, k, v, out, static_cast<const int32_t *>(at(0x30000000)), int(seqs), tokens,
                                      int(heads), int(dim), dtype, 0.0f,
                                      rope ? static_cast<const float *>(at(0x40000000)) : nullptr,
                                      rope ? static_cast<const float *>(at(0x50000000)) : nullptr, at(0x60000000),
                                      bytes, nullptr);
  } else if (op == "rope" && argc == 6) {
    int64_t tokens = arg(3), heads = arg(4), dim = arg(5);
    finevit_view x{at(0x10000000), heads * dim, dim}, out{at(0x20000000), heads * dim, dim};
    status = finevit_apply_rope(x, out, static_cast<const float *>(at(0x40000000)),
                                static_cast<const float *>(at(0x50000000)), tokens, int(heads), int(dim), dtype, nullptr);
  } else if (op == "patch_embed" && argc == 8) {
    int64_t rows = arg(3), channels = arg(4), patch = arg(5), width = arg(6), bias = arg(7);
    status = finevit_patch_embed(static_cast<const uint8_t *>(at(0x10000000)), channels * patch * patch,
                                 at(0x70000000), bias ? at(0x80000000) : nullptr,
                                 static_cast<const float *>(at(0x90000000)), at(0x20000000), rows, int(channels),
                                 int(patch), int(width), dtype, nullptr);
  } else {
    std::fprintf(stderr, "bad arguments\n");
    return 2;
  }
  std::printf("%s %s\n", finevit_error_string(status), finevit_last_error_message());
  return status == FINEVIT_SUCCESS ? 0 : 1;
}
