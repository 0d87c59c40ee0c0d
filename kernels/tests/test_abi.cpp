// ctest abi_*: the C API without a GPU -- version, error strings, the exported table, argument checks that name
// the argument, and the no-driver path (ctest runs it with FINEVIT_CUDA_LIBRARY pointing nowhere, so every
// valid call must return FINEVIT_ERROR_NO_DRIVER, not crash). Arguments: the exported targets (e.g. 80 90).
#include <finevit_kernels.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>

static int failures = 0;

#define CHECK(condition)                                                       \
  do {                                                                         \
    if (!(condition)) {                                                        \
      std::printf("FAILED line %d: %s\n", __LINE__, #condition);              \
      ++failures;                                                              \
    }                                                                          \
  } while (0)

// `status` is `expected` and the thread's message mentions `word` (the argument's name).
#define CHECK_STATUS(call, expected, word)                                                            \
  do {                                                                                                \
    finevit_status status_ = (call);                                                                  \
    std::string message_ = finevit_last_error_message();                                              \
    if (status_ != (expected) || message_.find(word) == std::string::npos) {                          \
      std::printf("FAILED line %d: %s -> %d \"%s\", expected %d mentioning \"%s\"\n", __LINE__, #call, \
                  (int)status_, message_.c_str(), (int)(expected), word);                             \
      ++failures;                                                                                     \
    }                                                                                                 \
  } while (0)

static void *fake(uintptr_t address) { return reinterpret_cast<void *>(address); }  // never dereferenced

int main(int argc, char **argv) {
  std::set<int> targets;
  for (int i = 1; i < argc; ++i) targets.insert(std::atoi(argv[i]));
  CHECK(!targets.empty());

  // Version and error strings.
  CHECK(finevit_version() == FINEVIT_KERNELS_VERSION_MAJOR * 10000 + FINEVIT_KERNELS_VERSION_MINOR * 100 +
                                 FINEVIT_KERNELS_VERSION_PATCH);
  const finevit_status all[] = {FINEVIT_SUCCESS, FINEVIT_ERROR_INVALID_ARGUMENT, FINEVIT_ERROR_UNSUPPORTED,
                                FINEVIT_ERROR_NO_DRIVER, FINEVIT_ERROR_CUDA};
  const char *names[] = {"FINEVIT_SUCCESS", "FINEVIT_ERROR_INVALID_ARGUMENT", "FINEVIT_ERROR_UNSUPPORTED",
                         "FINEVIT_ERROR_NO_DRIVER", "FINEVIT_ERROR_CUDA"};
  std::set<std::string> strings;
  for (int i = 0; i < 5; ++i) {
    const char *text = finevit_error_string(all[i]);
    CHECK(text != nullptr && std::strncmp(text, names[i], std::strlen(names[i])) == 0);
    strings.insert(text);
  }
  CHECK(strings.size() == 5);
  CHECK(std::strstr(finevit_error_string(static_cast<finevit_status>(99)), "unknown") != nullptr);

  // The exported table: head dim 64 fp16 and patch size 16 are in every export (--quick included).
  for (int sm : {80, 90}) {
    bool built = targets.count(sm) > 0;
    CHECK(finevit_is_exported("varlen_attention", 64, FINEVIT_FLOAT16, sm) == built);
    CHECK(finevit_is_exported("apply_rope", 64, FINEVIT_FLOAT16, sm) == built);
    CHECK(finevit_is_exported("patch_embed", 16, FINEVIT_FLOAT16, sm) == built);
  }
  CHECK(finevit_is_exported("varlen_attention", 64, FINEVIT_FLOAT16, 86) == (targets.count(80) > 0));  // sm_80 cubins
  CHECK(finevit_is_exported("varlen_attention", 64, FINEVIT_FLOAT16, 75) == 0);
  CHECK(finevit_is_exported("varlen_attention", 64, FINEVIT_FLOAT16, 100) == 0);
  CHECK(finevit_is_exported("varlen_attention", 40, FINEVIT_FLOAT16, 90) == 0);
  CHECK(finevit_is_exported("patch_embed", 15, FINEVIT_FLOAT16, 90) == 0);
  CHECK(finevit_is_exported("siglip_loss", 64, FINEVIT_FLOAT16, 90) == 0);
  CHECK(finevit_is_exported(nullptr, 64, FINEVIT_FLOAT16, 90) == 0);
  CHECK(finevit_is_exported("varlen_attention", 64, static_cast<finevit_dtype>(5), 90) == 0);

  // Valid arguments (fake, aligned device pointers; a ragged batch of 3 sequences, 300 tokens, 4 heads of 64).
  const int heads = 4, dim = 64, seqs = 3;
  const int64_t tokens = 300;
  finevit_view q{fake(0x10000), 3 * heads * dim, dim}, k{fake(0x20000), 3 * heads * dim, dim};
  finevit_view v{fake(0x30000), 3 * heads * dim, dim}, out{fake(0x40000), heads * dim, dim};
  auto *cu = static_cast<const int32_t *>(fake(0x50000));
  auto *cos = static_cast<const float *>(fake(0x60000)), *sin = static_cast<const float *>(fake(0x70000));
  void *workspace = fake(0x80000);
  size_t plain = finevit_varlen_attention_workspace_size(tokens, heads, dim, seqs, FINEVIT_FLOAT16, 0);
  size_t rotated = finevit_varlen_attention_workspace_size(tokens, heads, dim, seqs, FINEVIT_FLOAT16, 1);
  CHECK(plain >= 4 * (seqs + 1) * 4 + heads * tokens * 4);
  CHECK(rotated >= plain + 2 * tokens * heads * dim * 2);
  CHECK(finevit_varlen_attention_workspace_size(tokens, heads, 70, seqs, FINEVIT_FLOAT16, 0) == 0);
  CHECK(finevit_varlen_attention_workspace_size(-1, heads, dim, seqs, FINEVIT_FLOAT16, 0) == 0);

  auto attention = [&](finevit_view q_, finevit_view out_, int seqs_, int dim_, const float *cos_, const float *sin_,
                       size_t size, float scale = 0.0f, finevit_dtype dtype = FINEVIT_FLOAT16) {
    return finevit_varlen_attention(q_, k, v, out_, cu, seqs_, tokens, heads, dim_, dtype, scale, cos_, sin_,
                                    workspace, size, nullptr);
  };
  const finevit_status invalid = FINEVIT_ERROR_INVALID_ARGUMENT;
  CHECK_STATUS(attention(finevit_view{nullptr, 768, 64}, out, seqs, dim, cos, sin, rotated), invalid, "q.data");
  CHECK_STATUS(attention(finevit_view{q.data, -5, 64}, out, seqs, dim, cos, sin, rotated), invalid, "q's strides");
  CHECK_STATUS(attention(q, out, seqs, 70, cos, sin, rotated), invalid, "head_dim");
  CHECK_STATUS(attention(q, out, seqs, dim, cos, nullptr, rotated), invalid, "cos and sin");
  CHECK_STATUS(attention(q, out, seqs, dim, cos, sin, plain), invalid, "workspace");
  CHECK_STATUS(attention(q, out, 0, dim, cos, sin, rotated), invalid, "num_seqs");
  CHECK_STATUS(attention(q, q, seqs, dim, cos, sin, rotated), invalid, "overlap");
  CHECK_STATUS(attention(q, out, seqs, dim, cos, sin, rotated, NAN), invalid, "softmax_scale");
  CHECK_STATUS(attention(q, out, seqs, dim, cos, sin, rotated, 0.0f, static_cast<finevit_dtype>(3)), invalid, "dtype");
  CHECK_STATUS(finevit_varlen_attention(q, k, v, out, nullptr, seqs, tokens, heads, dim, FINEVIT_FLOAT16, 0.0f,
                                        nullptr, nullptr, workspace, plain, nullptr), invalid, "cu_seqlens");
  CHECK_STATUS(finevit_varlen_attention(q, k, v, out, cu, seqs, tokens, 0, dim, FINEVIT_FLOAT16, 0.0f, nullptr,
                                        nullptr, workspace, plain, nullptr), invalid, "num_heads");
  CHECK_STATUS(finevit_apply_rope(q, out, cos, nullptr, tokens, heads, dim, FINEVIT_BFLOAT16, nullptr), invalid,
               "cos and sin");
  CHECK_STATUS(finevit_apply_rope(q, q, cos, sin, tokens, heads, dim, FINEVIT_BFLOAT16, nullptr), invalid, "overlap");
  CHECK_STATUS(finevit_apply_rope(q, out, cos, sin, int64_t(1) << 33, heads, dim, FINEVIT_BFLOAT16, nullptr), invalid,
               "total_tokens");

  auto *patches = static_cast<const uint8_t *>(fake(0x90000));
  const void *weight = fake(0xA0000), *bias = fake(0xB0000);
  auto *norm = static_cast<const float *>(fake(0xC0000));
  void *embedded = fake(0xD0000);
  const int features = 3 * 16 * 16;
  CHECK_STATUS(finevit_patch_embed(patches, features, nullptr, bias, norm, embedded, 100, 3, 16, 768,
                                   FINEVIT_BFLOAT16, nullptr), invalid, "weight");
  CHECK_STATUS(finevit_patch_embed(patches, features - 1, weight, bias, norm, embedded, 100, 3, 16, 768,
                                   FINEVIT_BFLOAT16, nullptr), invalid, "patch_row_stride");
  CHECK_STATUS(finevit_patch_embed(patches + 1, features, weight, bias, norm, embedded, 100, 3, 16, 768,
                                   FINEVIT_BFLOAT16, nullptr), invalid, "16-byte aligned");
  CHECK_STATUS(finevit_patch_embed(patches, features, weight, bias, norm, embedded, 100, 0, 16, 768,
                                   FINEVIT_BFLOAT16, nullptr), invalid, "num_channels");

  // The normalization table (x / 255 - mean) / std = x * a + b.
  const float mean[3] = {0.5f, 0.25f, 0.0f}, stdev[3] = {0.5f, 0.25f, 2.0f}, zero[3] = {0.5f, 0.0f, 1.0f};
  float table[6] = {0};
  CHECK(finevit_patch_embed_norm_table(mean, stdev, 3, table) == FINEVIT_SUCCESS);
  for (int c = 0; c < 3; ++c) {
    float x = 200.0f;
    CHECK(std::fabs(x * table[2 * c] + table[2 * c + 1] - (x / 255.0f - mean[c]) / stdev[c]) < 1e-5f);
  }
  CHECK(std::strcmp(finevit_last_error_message(), "") == 0);
  CHECK_STATUS(finevit_patch_embed_norm_table(mean, zero, 3, table), invalid, "std[1]");

  // Without a driver every valid call says so, with the library it tried.
  const char *library = std::getenv("FINEVIT_CUDA_LIBRARY");
  if (library != nullptr && std::strstr(library, "nonexistent") != nullptr) {
    const finevit_status none = FINEVIT_ERROR_NO_DRIVER;
    CHECK_STATUS(finevit_driver_status(), none, "nonexistent");
    CHECK_STATUS(attention(q, out, seqs, dim, cos, sin, rotated), none, "nonexistent");
    CHECK_STATUS(attention(q, out, seqs, dim, nullptr, nullptr, plain), none, "nonexistent");
    CHECK_STATUS(finevit_apply_rope(q, out, cos, sin, tokens, heads, dim, FINEVIT_BFLOAT16, nullptr), none, "cannot load");
    CHECK_STATUS(finevit_patch_embed(patches, features, weight, nullptr, norm, embedded, 100, 3, 16, 768,
                                     FINEVIT_FLOAT16, nullptr), none, "cannot load");
    CHECK_STATUS(finevit_patch_embed(patches, features, weight, bias, norm, embedded, 100, 3, 14, 768,
                                     FINEVIT_FLOAT16, nullptr), none, "CUDA driver");
  } else {
    std::printf("FINEVIT_CUDA_LIBRARY does not point nowhere: the no-driver checks are skipped\n");
  }

  std::printf("%s: %d failure(s)\n", argv[0], failures);
  return failures == 0 ? 0 : 1;
}
