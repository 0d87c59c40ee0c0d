/*
 * finevit_kernels.h -- C API of libfinevit_kernels: FineViT's forward Triton kernels, compiled ahead of time
 * (sm_80 and sm_90 cubins) and launched through the CUDA driver API, without Python.
 *
 * Conventions
 * - Tensors are device pointers (`void *` from cudaMalloc / cuMemAlloc / torch's data_ptr()) in row-major
 *   layouts described per function, with strides in ELEMENTS (not bytes). The last (channel) dim is always
 *   contiguous. Sizes and strides must fit in int32; pointers must not alias unless stated.
 * - Every function runs asynchronously on `stream` (a CUstream or cudaStream_t; NULL is the legacy default
 *   stream) and needs the CUDA context of that stream to be current on the calling thread (with the runtime
 *   API, cudaSetDevice does this). Kernels are picked by the current device's compute capability: 8.x runs
 *   the sm_80 cubins, 9.0 the sm_90 ones; other devices get FINEVIT_ERROR_UNSUPPORTED.
 * - The CUDA driver (libcuda.so.1, or the file named by the environment variable FINEVIT_CUDA_LIBRARY) is
 *   loaded at the first call that needs it; without it such calls return FINEVIT_ERROR_NO_DRIVER.
 * - Arguments are checked first (FINEVIT_ERROR_INVALID_ARGUMENT, no CUDA call made); then the driver, the
 *   device and the exported specializations. finevit_last_error_message() says what was wrong (the argument,
 *   what was expected and what was given). Functions are thread-safe.
 * - dtype: fp16 or bf16 for every tensor of the call except the float32 cos/sin tables.
 *
 * Semantics are those of the Python package `finevit.kernels` (shared/DESIGN.md); the forward kernels here
 * are its Triton kernels, so results match `finevit.kernels` on the same GPU up to the tile config.
 */
#ifndef FINEVIT_KERNELS_H
#define FINEVIT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define FINEVIT_API
#else
#define FINEVIT_API __attribute__((visibility("default")))
#endif

#define FINEVIT_KERNELS_VERSION_MAJOR 0
#define FINEVIT_KERNELS_VERSION_MINOR 1
#define FINEVIT_KERNELS_VERSION_PATCH 0

/* The same type as CUstream (cuda.h) and cudaStream_t (cuda_runtime.h), declared here so that this header
 * needs neither. */
struct CUstream_st;
typedef struct CUstream_st *finevit_stream;

typedef enum finevit_status {
  FINEVIT_SUCCESS = 0,
  FINEVIT_ERROR_INVALID_ARGUMENT = 1, /* a null pointer, a bad size, stride, shape or dtype */
  FINEVIT_ERROR_UNSUPPORTED = 2,      /* valid, but not exported: head dim, patch size, alignment, GPU arch */
  FINEVIT_ERROR_NO_DRIVER = 3,        /* libcuda.so.1 could not be loaded (no NVIDIA driver) */
  FINEVIT_ERROR_CUDA = 4              /* a CUDA driver call failed (no current context, launch failure, ...) */
} finevit_status;

typedef enum finevit_dtype {
  FINEVIT_FLOAT16 = 0,
  FINEVIT_BFLOAT16 = 1
} finevit_dtype;

/* A (tokens, heads, head_dim) tensor: element [t, h, c] at data + t * stride_token + h * stride_head + c. */
typedef struct finevit_view {
  void *data;
  int64_t stride_token;
  int64_t stride_head;
} finevit_view;

/* Library version as MAJOR * 10000 + MINOR * 100 + PATCH (compare with FINEVIT_KERNELS_VERSION_*). */
FINEVIT_API int finevit_version(void);

/* A static English name and description of `status`, e.g. "FINEVIT_ERROR_NO_DRIVER: ...". */
FINEVIT_API const char *finevit_error_string(finevit_status status);

/* The message of the last failing call on this thread ("" after a success). Valid until the next call. */
FINEVIT_API const char *finevit_last_error_message(void);

/* 1 when a cubin exists for `op` ("varlen_attention", "apply_rope", "patch_embed"), `dim` (head dim; patch
 * size for patch_embed), `dtype` and compute capability `sm` (e.g. 80, 86, 90), else 0. No driver needed. */
FINEVIT_API int finevit_is_exported(const char *op, int dim, finevit_dtype dtype, int sm);

/* FINEVIT_SUCCESS when the driver is loaded (loading it if needed), else FINEVIT_ERROR_NO_DRIVER. */
FINEVIT_API finevit_status finevit_driver_status(void);

/*
 * Rotary embedding, rotate-half layout, on all head_dim channels (rotary_dim = head_dim):
 *   x1 = x[..., :D/2], x2 = x[..., D/2:];  out = [x1*cos - x2*sin, x2*cos + x1*sin]   (fp32 math)
 * x, out: (total_tokens, num_heads, head_dim) views, not overlapping; cos, sin: float32 (total_tokens,
 * head_dim / 2), rows contiguous (row stride head_dim / 2). Exported head dims: see finevit_is_exported.
 */
FINEVIT_API finevit_status finevit_apply_rope(finevit_view x, finevit_view out, const float *cos, const float *sin,
                                              int64_t total_tokens, int num_heads, int head_dim, finevit_dtype dtype,
                                              finevit_stream stream);

/*
 * Bytes of device workspace finevit_varlen_attention needs (a function of the sizes only; 0 on bad sizes).
 * It holds the work list (int32, 5 x (num_seqs + 1)), the log-sum-exp (float32, heads x tokens) and, with
 * RoPE, the rotated q and k (contiguous, 2 x tokens x heads x head_dim elements).
 */
FINEVIT_API size_t finevit_varlen_attention_workspace_size(int64_t total_tokens, int num_heads, int head_dim,
                                                           int num_seqs, finevit_dtype dtype, int with_rope);

/*
 * Non-causal attention within each packed sequence (flash-attention's varlen forward):
 *   out[t, h] = softmax(scale * q~[t, h] . k~[s, h] over the tokens s of t's sequence) . v[s, h]
 * with q~, k~ = q, k rotated by cos/sin (finevit_apply_rope) when cos and sin are given (both non-null), else
 * q, k. q, k, v, out: (total_tokens, num_heads, head_dim) views; out must not overlap the inputs.
 * cu_seqlens: int32 device array (num_seqs + 1): 0, cumulative sequence lengths, total_tokens (values are
 * trusted, not checked: reading them would sync the stream). softmax_scale <= 0 means head_dim^-0.5.
 * cos, sin: float32 (total_tokens, head_dim / 2), rows contiguous, or both NULL.
 * workspace: device memory of at least finevit_varlen_attention_workspace_size(...) bytes, 16-byte aligned,
 * not used by other work until the stream has finished this call.
 */
FINEVIT_API finevit_status finevit_varlen_attention(finevit_view q, finevit_view k, finevit_view v, finevit_view out,
                                                    const int32_t *cu_seqlens, int num_seqs, int64_t total_tokens,
                                                    int num_heads, int head_dim, finevit_dtype dtype,
                                                    float softmax_scale, const float *cos, const float *sin,
                                                    void *workspace, size_t workspace_size, finevit_stream stream);

/*
 * The per-channel normalization table of finevit_patch_embed, computed on the host: for c < num_channels,
 * table[2c] = 1 / (255 * std[c]), table[2c + 1] = -mean[c] / std[c]. Copy it to the device once.
 */
FINEVIT_API finevit_status finevit_patch_embed_norm_table(const float *mean, const float *std, int num_channels,
                                                          float *table);

/*
 * Patch embedding of uint8 pixels, normalized in the kernel (= Conv2d(C, D, P, stride=P) on (x/255 - mean)/std):
 *   out[n, d] = sum_k x^[n, k] * weight[d, k] + bias[d],  x^[n, k] = patches[n, k] * a[c] + b[c], c = k / (P*P)
 * patches: uint8 (num_patches, C*P*P) in (C, P, P) order, rows `patch_row_stride` bytes apart; weight:
 * contiguous (out_features, C*P*P) = conv.weight.reshape(D, -1); bias: (out_features,) or NULL; norm: device
 * float32 (C, 2) from finevit_patch_embed_norm_table; out: contiguous (num_patches, out_features). Pointers
 * 16-byte aligned. Exported patch sizes 14 and 16 (see finevit_is_exported); P = 14 needs out_features and
 * patch_row_stride multiples of 4 and C*P*P too (C = 3: yes), P = 16 multiples of 16.
 */
FINEVIT_API finevit_status finevit_patch_embed(const uint8_t *patches, int64_t patch_row_stride, const void *weight,
                                               const void *bias, const float *norm, void *out, int64_t num_patches,
                                               int num_channels, int patch_size, int out_features,
                                               finevit_dtype dtype, finevit_stream stream);

#ifdef __cplusplus
}
#endif

#endif /* FINEVIT_KERNELS_H */
