/*
 * finevit_kernels.c -- the C API of finevit_kernels.h over the generated cubin table (aot_table.h).
 *
 * Each function: checks its arguments (no CUDA call), loads the driver (cuda_driver.c), reads the current
 * context's device and compute capability, picks the table entry (kernel, target, dtype, head dim or patch
 * size, aligned or generic variant), loads its cubin once per context (modules live until the process ends),
 * and launches it as the Python launcher does (grid, parameter order, scalars). The parameter order is
 * export.PARAMS, checked by the exporter against the kernels' signatures; a mismatch in count is caught here
 * at launch time against the table's num_params.
 */
#include "finevit_kernels.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "aot_table.h"
#include "cuda_driver.h"

#define MAX_CONTEXTS 16   /* contexts per table entry whose loaded module is cached */
#define MAX_PARAMS 32
#define WORKSPACE_ALIGN 256

/* ------------------------------------------------------------------------------------------------------ */
/* Status and messages                                                                                    */
/* ------------------------------------------------------------------------------------------------------ */

static _Thread_local char last_message[768];

static finevit_status fail(finevit_status status, const char *format, ...) {
  va_list args;
  va_start(args, format);
  vsnprintf(last_message, sizeof last_message, format, args);
  va_end(args);
  return status;
}

static finevit_status succeed(void) {
  last_message[0] = '\0';
  return FINEVIT_SUCCESS;
}

int finevit_version(void) {
  return FINEVIT_KERNELS_VERSION_MAJOR * 10000 + FINEVIT_KERNELS_VERSION_MINOR * 100 + FINEVIT_KERNELS_VERSION_PATCH;
}

const char *finevit_error_string(finevit_status status) {
  switch (status) {
    case FINEVIT_SUCCESS: return "FINEVIT_SUCCESS: no error";
    case FINEVIT_ERROR_INVALID_ARGUMENT: return "FINEVIT_ERROR_INVALID_ARGUMENT: an argument is invalid";
    case FINEVIT_ERROR_UNSUPPORTED:
      return "FINEVIT_ERROR_UNSUPPORTED: valid, but no exported kernel for this head dim, patch size, dtype, "
             "alignment or GPU";
    case FINEVIT_ERROR_NO_DRIVER: return "FINEVIT_ERROR_NO_DRIVER: the CUDA driver (libcuda.so.1) cannot be loaded";
    case FINEVIT_ERROR_CUDA: return "FINEVIT_ERROR_CUDA: a CUDA driver call failed";
  }
  return "unknown finevit_status";
}

const char *finevit_last_error_message(void) { return last_message; }

static const char *dtype_name(finevit_dtype dtype) { return dtype == FINEVIT_FLOAT16 ? "fp16" : "bf16"; }

static finevit_status check_cuda(const finevit_cuda_driver *cu, CUresult result, const char *what) {
  if (result == CUDA_SUCCESS) return FINEVIT_SUCCESS;
  const char *name = NULL, *text = NULL;
  cu->GetErrorName(result, &name);
  cu->GetErrorString(result, &text);
  return fail(FINEVIT_ERROR_CUDA, "%s failed: %s (%d): %s", what, name ? name : "?", (int)result, text ? text : "");
}

/* ------------------------------------------------------------------------------------------------------ */
/* Argument checks                                                                                        */
/* ------------------------------------------------------------------------------------------------------ */

static int fits_int32(int64_t value) { return value >= 0 && value <= INT32_MAX; }

static finevit_status check_dtype(finevit_dtype dtype) {
  if (dtype != FINEVIT_FLOAT16 && dtype != FINEVIT_BFLOAT16)
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "dtype must be FINEVIT_FLOAT16 (0) or FINEVIT_BFLOAT16 (1), got %d",
                (int)dtype);
  return FINEVIT_SUCCESS;
}

static finevit_status check_sizes(int64_t total_tokens, int num_heads, int head_dim) {
  if (!fits_int32(total_tokens))
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "total_tokens must be in [0, 2^31), got %lld", (long long)total_tokens);
  if (num_heads < 1 || num_heads > 65535)
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "num_heads must be in [1, 65535], got %d", num_heads);
  if (head_dim < 32 || head_dim > 256 || head_dim % 8 != 0)
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "head_dim must be a multiple of 8 from 32 to 256, got %d", head_dim);
  return FINEVIT_SUCCESS;
}

static finevit_status check_view(const char *name, finevit_view view) {
  if (view.data == NULL) return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "%s.data must be a device pointer, got NULL", name);
  if (!fits_int32(view.stride_token) || !fits_int32(view.stride_head))
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "%s's strides must be in [0, 2^31) elements, got (%lld, %lld)", name,
                (long long)view.stride_token, (long long)view.stride_head);
  return FINEVIT_SUCCESS;
}

static int aligned16(const void *pointer) { return ((uintptr_t)pointer) % 16 == 0; }

/* Aligned attention and RoPE entries take their strides in units of 16 bytes (export.ALIGNED_UNITS): the entry's
 * align (ALIGN = 8 fp16/bf16 elements) for q, k, v, x and out, ALIGNED_TABLE_UNIT floats for RoPE's cos/sin rows;
 * generic entries take them in elements (align 1). */
#define ALIGNED_UNIT 8
#define ALIGNED_TABLE_UNIT 4

static int view_aligned(finevit_view view) {
  return aligned16(view.data) && view.stride_token % ALIGNED_UNIT == 0 && view.stride_head % ALIGNED_UNIT == 0;
}

static size_t round_up(size_t bytes) { return (bytes + WORKSPACE_ALIGN - 1) / WORKSPACE_ALIGN * WORKSPACE_ALIGN; }

/* ------------------------------------------------------------------------------------------------------ */
/* Dispatch: table entries, devices, loaded modules                                                       */
/* ------------------------------------------------------------------------------------------------------ */

/* The cubin target for compute capability major.minor: 8.x -> 80, 9.0 -> 90 (sm_90a), else 0. */
static int target_of(int major, int minor) {
  if (major == 8) return 80;
  if (major == 9 && minor == 0) return 90;
  return 0;
}

/* The entry for (kernel, target, dtype, dim, has_bias), the aligned variant when `aligned` allows it. */
static int find_entry(int kernel, int target, int dtype, int dim, int aligned, int has_bias) {
  int found = -1;
  for (int i = 0; i < finevit_aot_num_entries; ++i) {
    const finevit_aot_entry *e = &finevit_aot_entries[i];
    if (e->kernel != kernel || e->sm != target || e->dtype != dtype || e->dim != dim || e->has_bias != has_bias)
      continue;
    if (e->aligned && !aligned) continue;
    if (found < 0 || e->aligned) found = i;
  }
  return found;
}

int finevit_is_exported(const char *op, int dim, finevit_dtype dtype, int sm) {
  if (op == NULL || check_dtype(dtype) != FINEVIT_SUCCESS) return 0;
  int target = target_of(sm / 10, sm % 10);
  if (target == 0) return 0;
  if (strcmp(op, "varlen_attention") == 0)
    return find_entry(FINEVIT_AOT_ATTENTION, target, dtype, dim, 0, 0) >= 0 &&
           find_entry(FINEVIT_AOT_ROPE, target, dtype, dim, 0, 0) >= 0 &&
           find_entry(FINEVIT_AOT_CU_BLOCKS, target, -1, 0, 0, 0) >= 0;
  if (strcmp(op, "apply_rope") == 0) return find_entry(FINEVIT_AOT_ROPE, target, dtype, dim, 0, 0) >= 0;
  if (strcmp(op, "patch_embed") == 0)
    return find_entry(FINEVIT_AOT_PATCH_EMBED, target, dtype, dim, 1, 0) >= 0 &&
           find_entry(FINEVIT_AOT_PATCH_EMBED, target, dtype, dim, 1, 1) >= 0;
  return 0;
}

finevit_status finevit_driver_status(void) {
  const char *why = "";
  if (finevit_cuda(&why) == NULL) return fail(FINEVIT_ERROR_NO_DRIVER, "%s", why);
  return succeed();
}

/* The driver, the current context, its device and cubin target. */
typedef struct device_state {
  const finevit_cuda_driver *cu;
  CUcontext context;
  CUdevice device;
  int target;
} device_state;

static finevit_status current_device(device_state *state) {
  const char *why = "";
  state->cu = finevit_cuda(&why);
  if (state->cu == NULL) return fail(FINEVIT_ERROR_NO_DRIVER, "%s", why);
  const finevit_cuda_driver *cu = state->cu;
  finevit_status status = check_cuda(cu, cu->CtxGetCurrent(&state->context), "cuCtxGetCurrent");
  if (status != FINEVIT_SUCCESS) return status;
  if (state->context == NULL)
    return fail(FINEVIT_ERROR_CUDA, "no CUDA context is current on this thread: make the stream's context current "
                                    "(cudaSetDevice, cuCtxSetCurrent) before the call");
  if ((status = check_cuda(cu, cu->CtxGetDevice(&state->device), "cuCtxGetDevice")) != FINEVIT_SUCCESS) return status;
  int major = 0, minor = 0;
  if ((status = check_cuda(cu, cu->DeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                                                      state->device), "cuDeviceGetAttribute")) != FINEVIT_SUCCESS ||
      (status = check_cuda(cu, cu->DeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                                                      state->device), "cuDeviceGetAttribute")) != FINEVIT_SUCCESS)
    return status;
  state->target = target_of(major, minor);
  if (state->target == 0)
    return fail(FINEVIT_ERROR_UNSUPPORTED, "the current device has compute capability %d.%d; libfinevit_kernels has "
                                           "cubins for 8.x (sm_80) and 9.0 (sm_90)", major, minor);
  return FINEVIT_SUCCESS;
}

typedef struct loaded_function {
  CUcontext context;
  CUfunction function;
} loaded_function;

static pthread_mutex_t modules_lock = PTHREAD_MUTEX_INITIALIZER;
static loaded_function *modules; /* finevit_aot_num_entries x MAX_CONTEXTS, allocated at first use */

/* Load `entry`'s cubin in the current context (once) and allow its dynamic shared memory. */
static finevit_status load_function(const device_state *state, int index, CUfunction *function) {
  const finevit_aot_entry *entry = &finevit_aot_entries[index];
  const finevit_cuda_driver *cu = state->cu;
  finevit_status status = FINEVIT_SUCCESS;
  pthread_mutex_lock(&modules_lock);
  if (modules == NULL) modules = calloc((size_t)finevit_aot_num_entries * MAX_CONTEXTS, sizeof *modules);
  if (modules == NULL) {
    status = fail(FINEVIT_ERROR_CUDA, "out of host memory for the module cache");
    goto done;
  }
  loaded_function *slots = &modules[(size_t)index * MAX_CONTEXTS];
  int slot = 0;
  for (; slot < MAX_CONTEXTS && slots[slot].context != NULL; ++slot) {
    if (slots[slot].context == state->context) {
      *function = slots[slot].function;
      goto done;
    }
  }
  if (slot == MAX_CONTEXTS) {
    status = fail(FINEVIT_ERROR_CUDA, "%s was loaded in %d CUDA contexts already, the most this library caches",
                  entry->function, MAX_CONTEXTS);
    goto done;
  }
  if (entry->shared > 49152) {
    int optin = 0;
    status = check_cuda(cu, cu->DeviceGetAttribute(&optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                                                   state->device), "cuDeviceGetAttribute");
    if (status != FINEVIT_SUCCESS) goto done;
    if (entry->shared > optin) {
      status = fail(FINEVIT_ERROR_UNSUPPORTED, "%s (%s) needs %d bytes of shared memory per block, the device offers %d",
                    entry->function, entry->config, entry->shared, optin);
      goto done;
    }
  }
  CUmodule module = NULL;
  CUfunction loaded = NULL;
  if ((status = check_cuda(cu, cu->ModuleLoadData(&module, entry->cubin), "cuModuleLoadData")) != FINEVIT_SUCCESS)
    goto done;
  if ((status = check_cuda(cu, cu->ModuleGetFunction(&loaded, module, entry->function), "cuModuleGetFunction")) !=
      FINEVIT_SUCCESS)
    goto done;
  if (entry->shared > 49152) {
    int static_shared = 0;
    if ((status = check_cuda(cu, cu->FuncGetAttribute(&static_shared, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, loaded),
                             "cuFuncGetAttribute")) != FINEVIT_SUCCESS ||
        (status = check_cuda(cu, cu->FuncSetCacheConfig(loaded, CU_FUNC_CACHE_PREFER_SHARED), "cuFuncSetCacheConfig")) !=
            FINEVIT_SUCCESS ||
        (status = check_cuda(cu, cu->FuncSetAttribute(loaded, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                      entry->shared), "cuFuncSetAttribute")) != FINEVIT_SUCCESS)
      goto done;
  }
  slots[slot].function = loaded;
  slots[slot].context = state->context;
  *function = loaded;
done:
  pthread_mutex_unlock(&modules_lock);
  return status;
}

/* Launch table entry `index` on grid (x, y, 1) with its runtime parameters `params` (pointers to the values). */
static finevit_status launch(const device_state *state, int index, unsigned grid_x, unsigned grid_y, void **params,
                             int num_params, CUstream stream) {
  const finevit_aot_entry *entry = &finevit_aot_entries[index];
  if (num_params != entry->num_params || num_params + entry->num_scratch > MAX_PARAMS)
    return fail(FINEVIT_ERROR_CUDA, "%s in the table takes %d parameters, the runtime passes %d: rebuild the "
                                    "library with the exporter of the same FineViT version", entry->function,
                entry->num_params, num_params);
  if (grid_x == 0 || grid_y == 0) return FINEVIT_SUCCESS;
  CUfunction function = NULL;
  finevit_status status = load_function(state, index, &function);
  if (status != FINEVIT_SUCCESS) return status;
  static const CUdeviceptr no_scratch = 0;
  void *all[MAX_PARAMS];
  for (int i = 0; i < num_params; ++i) all[i] = params[i];
  for (int i = 0; i < entry->num_scratch; ++i) all[num_params + i] = (void *)&no_scratch;
  return check_cuda(state->cu, state->cu->LaunchKernel(function, grid_x, grid_y, 1, 32u * (unsigned)entry->num_warps,
                                                       1, 1, (unsigned)entry->shared, stream, all, NULL),
                    entry->function);
}

static unsigned cdiv(int64_t a, int64_t b) { return (unsigned)((a + b - 1) / b); }

/* ------------------------------------------------------------------------------------------------------ */
/* RoPE                                                                                                   */
/* ------------------------------------------------------------------------------------------------------ */

/* Launch the rope entry: x -> out, (tokens, heads, head_dim), cos/sin rows head_dim / 2 apart. */
static finevit_status launch_rope(const device_state *state, finevit_view x, finevit_view out, const float *cos,
                                  const float *sin, int64_t total_tokens, int num_heads, int head_dim,
                                  finevit_dtype dtype, CUstream stream) {
  int half = head_dim / 2;
  int aligned = view_aligned(x) && view_aligned(out) && aligned16(cos) && aligned16(sin) &&
                half % ALIGNED_TABLE_UNIT == 0;
  int index = find_entry(FINEVIT_AOT_ROPE, state->target, dtype, head_dim, aligned, 0);
  if (index < 0)
    return fail(FINEVIT_ERROR_UNSUPPORTED, "no RoPE kernel exported for head_dim %d, %s, sm_%d (see "
                                           "finevit_is_exported)", head_dim, dtype_name(dtype), state->target);
  const finevit_aot_entry *e = &finevit_aot_entries[index];
  CUdeviceptr px = (CUdeviceptr)x.data, pcos = (CUdeviceptr)cos, psin = (CUdeviceptr)sin, pout = (CUdeviceptr)out.data;
  int32_t tokens = (int32_t)total_tokens, heads = num_heads;
  int64_t unit = e->align, table_unit = e->aligned ? ALIGNED_TABLE_UNIT : 1;
  int32_t sx_tok = (int32_t)(x.stride_token / unit), sx_head = (int32_t)(x.stride_head / unit);
  int32_t so_tok = (int32_t)(out.stride_token / unit), so_head = (int32_t)(out.stride_head / unit);
  int32_t s_cs = (int32_t)(half / table_unit);
  void *params[] = {&px, &pcos, &psin, &pout, &tokens, &heads, &sx_tok, &sx_head, &so_tok, &so_head, &s_cs, &s_cs};
  return launch(state, index, cdiv(total_tokens, e->tiles[0]), cdiv(num_heads, e->tiles[1]), params,
                (int)(sizeof params / sizeof params[0]), stream);
}

finevit_status finevit_apply_rope(finevit_view x, finevit_view out, const float *cos, const float *sin,
                                  int64_t total_tokens, int num_heads, int head_dim, finevit_dtype dtype,
                                  finevit_stream stream) {
  finevit_status status;
  if ((status = check_dtype(dtype)) || (status = check_sizes(total_tokens, num_heads, head_dim)) ||
      (status = check_view("x", x)) || (status = check_view("out", out)))
    return status;
  if (cos == NULL || sin == NULL)
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "cos and sin must be device pointers, got %s", cos ? "sin NULL" : "cos NULL");
  if (x.data == out.data)
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "out must not overlap x (in-place rotation is not supported)");
  device_state state;
  if ((status = current_device(&state))) return status;
  if ((status = launch_rope(&state, x, out, cos, sin, total_tokens, num_heads, head_dim, dtype, (CUstream)stream)))
    return status;
  return succeed();
}

/* ------------------------------------------------------------------------------------------------------ */
/* Varlen attention                                                                                       */
/* ------------------------------------------------------------------------------------------------------ */

/* Byte offsets of the workspace parts: work list, log-sum-exp, rotated q, rotated k; [4] = the total. */
static void attention_workspace(int64_t total_tokens, int num_heads, int head_dim, int num_seqs, int with_rope,
                                size_t offsets[5]) {
  size_t tokens = (size_t)total_tokens, heads = (size_t)num_heads;
  size_t rotated = with_rope ? round_up(tokens * heads * (size_t)head_dim * 2) : 0;  /* fp16 / bf16: 2 bytes */
  offsets[0] = 0;
  offsets[1] = round_up(5 * ((size_t)num_seqs + 1) * sizeof(int32_t)); /* the work list: 4 block sizes + order */
  offsets[2] = offsets[1] + round_up(heads * tokens * sizeof(float));
  offsets[3] = offsets[2] + rotated;
  offsets[4] = offsets[3] + rotated;
}

size_t finevit_varlen_attention_workspace_size(int64_t total_tokens, int num_heads, int head_dim, int num_seqs,
                                               finevit_dtype dtype, int with_rope) {
  if (check_dtype(dtype) || check_sizes(total_tokens, num_heads, head_dim) || num_seqs < 0 || num_seqs >= INT32_MAX)
    return 0;
  size_t offsets[5];
  attention_workspace(total_tokens, num_heads, head_dim, num_seqs, with_rope, offsets);
  return offsets[4];
}

finevit_status finevit_varlen_attention(finevit_view q, finevit_view k, finevit_view v, finevit_view out,
                                        const int32_t *cu_seqlens, int num_seqs, int64_t total_tokens, int num_heads,
                                        int head_dim, finevit_dtype dtype, float softmax_scale, const float *cos,
                                        const float *sin, void *workspace, size_t workspace_size,
                                        finevit_stream stream) {
  finevit_status status;
  if ((status = check_dtype(dtype)) || (status = check_sizes(total_tokens, num_heads, head_dim)) ||
      (status = check_view("q", q)) || (status = check_view("k", k)) || (status = check_view("v", v)) ||
      (status = check_view("out", out)))
    return status;
  if (cu_seqlens == NULL) return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "cu_seqlens must be a device pointer, got NULL");
  if (num_seqs < 0 || num_seqs >= INT32_MAX || (num_seqs == 0 && total_tokens > 0))
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "num_seqs must be >= 1 (0 only without tokens), got %d for %lld tokens",
                num_seqs, (long long)total_tokens);
  if ((cos == NULL) != (sin == NULL))
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "cos and sin must be both given or both NULL, got %s NULL",
                cos == NULL ? "cos" : "sin");
  if (out.data == q.data || out.data == k.data || out.data == v.data)
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "out must not overlap q, k or v");
  if (!isfinite(softmax_scale))
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "softmax_scale must be finite (<= 0 for head_dim^-0.5), got %g",
                (double)softmax_scale);
  int with_rope = cos != NULL;
  size_t offsets[5];
  attention_workspace(total_tokens, num_heads, head_dim, num_seqs, with_rope, offsets);
  if (workspace == NULL || workspace_size < offsets[4] || !aligned16(workspace))
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "workspace must be a 16-byte aligned device buffer of at least %zu "
                "bytes (finevit_varlen_attention_workspace_size), got %p of %zu bytes", offsets[4], workspace,
                workspace_size);

  device_state state;
  if ((status = current_device(&state))) return status;
  CUstream cu_stream = (CUstream)stream;
  int target = state.target;
  int blocks_index = find_entry(FINEVIT_AOT_CU_BLOCKS, target, -1, 0, 0, 0);
  if (blocks_index < 0 || find_entry(FINEVIT_AOT_ATTENTION, target, dtype, head_dim, 0, 0) < 0 ||
      (with_rope && find_entry(FINEVIT_AOT_ROPE, target, dtype, head_dim, 0, 0) < 0))
    return fail(FINEVIT_ERROR_UNSUPPORTED, "no attention kernel exported for head_dim %d, %s, sm_%d (see "
                                           "finevit_is_exported)", head_dim, dtype_name(dtype), target);

  char *base = (char *)workspace;
  CUdeviceptr cu = (CUdeviceptr)cu_seqlens, blocks = (CUdeviceptr)(base + offsets[0]);
  CUdeviceptr lse = (CUdeviceptr)(base + offsets[1]);
  int32_t seqs = num_seqs;
  /* 1. The (sequence, block) work list, longest sequences first, as attention._cu_blocks: one program. */
  void *block_params[] = {&cu, &blocks, &seqs};
  if ((status = launch(&state, blocks_index, 1, 1, block_params, 3, cu_stream))) return status;
  /* 2. With RoPE, q and k rotated once into the workspace, as attention_fwd does with rope_fwd. */
  if (with_rope) {
    finevit_view q_rot = {base + offsets[2], (int64_t)num_heads * head_dim, head_dim};
    finevit_view k_rot = {base + offsets[3], (int64_t)num_heads * head_dim, head_dim};
    if ((status = launch_rope(&state, q, q_rot, cos, sin, total_tokens, num_heads, head_dim, dtype, cu_stream)) ||
        (status = launch_rope(&state, k, k_rot, cos, sin, total_tokens, num_heads, head_dim, dtype, cu_stream)))
      return status;
    q = q_rot;
    k = k_rot;
  }
  /* 3. The forward kernel over the flat work list, heads fastest: grid ((cdiv(tokens, BLOCK_M) + num_seqs) * heads). */
  int aligned = view_aligned(q) && view_aligned(k) && view_aligned(v) && view_aligned(out) && aligned16(cu_seqlens);
  int index = find_entry(FINEVIT_AOT_ATTENTION, target, dtype, head_dim, aligned, 0);
  const finevit_aot_entry *e = &finevit_aot_entries[index];
  CUdeviceptr pq = (CUdeviceptr)q.data, pk = (CUdeviceptr)k.data, pv = (CUdeviceptr)v.data;
  CUdeviceptr po = (CUdeviceptr)out.data;
  int32_t heads = num_heads, tokens = (int32_t)total_tokens, dim = head_dim, bucket = 0; /* bucket: unused key */
  int64_t unit = e->align;
  int32_t strides[8] = {(int32_t)(q.stride_token / unit), (int32_t)(q.stride_head / unit),
                        (int32_t)(k.stride_token / unit), (int32_t)(k.stride_head / unit),
                        (int32_t)(v.stride_token / unit), (int32_t)(v.stride_head / unit),
                        (int32_t)(out.stride_token / unit), (int32_t)(out.stride_head / unit)};
  float scale = softmax_scale > 0.0f ? softmax_scale : 1.0f / sqrtf((float)head_dim);
  float qk_scale = scale * 1.4426950408889634f; /* log2(e): the kernel works in the exp2 domain */
  void *params[] = {&pq, &pk, &pv, &po, &lse, &cu, &blocks, &seqs, &heads, &tokens,
                    &strides[0], &strides[1], &strides[2], &strides[3], &strides[4], &strides[5], &strides[6],
                    &strides[7], &qk_scale, &dim, &bucket};
  uint64_t programs = ((uint64_t)cdiv(total_tokens, e->tiles[0]) + (uint64_t)num_seqs) * (uint64_t)num_heads;
  if (programs > INT32_MAX)
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "(total_tokens / %d + num_seqs) * num_heads must be < 2^31 (one "
                "launch), got %llu", e->tiles[0], (unsigned long long)programs);
  if ((status = launch(&state, index, (unsigned)programs, 1, params, (int)(sizeof params / sizeof params[0]),
                       cu_stream)))
    return status;
  return succeed();
}

/* ------------------------------------------------------------------------------------------------------ */
/* Patch embedding                                                                                        */
/* ------------------------------------------------------------------------------------------------------ */

finevit_status finevit_patch_embed_norm_table(const float *mean, const float *std, int num_channels, float *table) {
  if (mean == NULL || std == NULL || table == NULL)
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "mean, std and table must be host pointers, got %s NULL",
                mean == NULL ? "mean" : std == NULL ? "std" : "table");
  if (num_channels < 1) return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "num_channels must be >= 1, got %d", num_channels);
  for (int c = 0; c < num_channels; ++c) {
    if (!(std[c] > 0.0f) || !isfinite(std[c]) || !isfinite(mean[c]))
      return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "std[%d] must be finite and > 0 and mean[%d] finite, got %g, %g", c,
                  c, (double)std[c], (double)mean[c]);
  }
  for (int c = 0; c < num_channels; ++c) {
    table[2 * c] = (float)(1.0 / (255.0 * (double)std[c]));
    table[2 * c + 1] = (float)(-(double)mean[c] / (double)std[c]);
  }
  return succeed();
}

finevit_status finevit_patch_embed(const uint8_t *patches, int64_t patch_row_stride, const void *weight,
                                   const void *bias, const float *norm, void *out, int64_t num_patches,
                                   int num_channels, int patch_size, int out_features, finevit_dtype dtype,
                                   finevit_stream stream) {
  finevit_status status;
  if ((status = check_dtype(dtype))) return status;
  if (patches == NULL || weight == NULL || norm == NULL || out == NULL)
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "%s must be a device pointer, got NULL",
                patches == NULL ? "patches" : weight == NULL ? "weight" : norm == NULL ? "norm" : "out");
  if (!fits_int32(num_patches))
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "num_patches must be in [0, 2^31), got %lld", (long long)num_patches);
  if (num_channels < 1 || patch_size < 1 || out_features < 1)
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "num_channels, patch_size and out_features must be >= 1, got %d, %d, %d",
                num_channels, patch_size, out_features);
  int64_t features = (int64_t)num_channels * patch_size * patch_size;
  if (!fits_int32(features) || !fits_int32((int64_t)out_features * features))
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "weight (out_features x C*P*P = %d x %lld) must have < 2^31 elements",
                out_features, (long long)features);
  if (patch_row_stride < features || !fits_int32(patch_row_stride))
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "patch_row_stride must be in [C*P*P = %lld, 2^31), got %lld",
                (long long)features, (long long)patch_row_stride);
  if (!aligned16(patches) || !aligned16(weight) || !aligned16(bias) || !aligned16(norm) || !aligned16(out))
    return fail(FINEVIT_ERROR_INVALID_ARGUMENT, "patches, weight, bias, norm and out must be 16-byte aligned");

  device_state state;
  if ((status = current_device(&state))) return status;
  int has_bias = bias != NULL;
  int index = find_entry(FINEVIT_AOT_PATCH_EMBED, state.target, dtype, patch_size, 1, has_bias);
  if (index < 0)
    return fail(FINEVIT_ERROR_UNSUPPORTED, "no patch embedding exported for patch_size %d, %s, sm_%d (see "
                                           "finevit_is_exported)", patch_size, dtype_name(dtype), state.target);
  const finevit_aot_entry *e = &finevit_aot_entries[index];
  int align = e->align;
  if (features % align || out_features % align || patch_row_stride % align)
    return fail(FINEVIT_ERROR_UNSUPPORTED, "the patch embedding for P = %d was compiled for C*P*P, out_features and "
                "patch_row_stride multiples of %d, got %lld, %d, %lld", patch_size, align, (long long)features,
                out_features, (long long)patch_row_stride);
  CUdeviceptr px = (CUdeviceptr)patches, pw = (CUdeviceptr)weight, pnorm = (CUdeviceptr)norm, py = (CUdeviceptr)out;
  CUdeviceptr pbias = has_bias ? (CUdeviceptr)bias : pw; /* unread without HAS_BIAS */
  int32_t rows = (int32_t)num_patches, out_units = out_features / align, in_units = (int32_t)(features / align);
  int32_t stride_x = (int32_t)(patch_row_stride / align), stride_w = in_units, stride_y = out_units, bucket = 0;
  void *params[] = {&px, &pw, &pbias, &pnorm, &py, &rows, &out_units, &in_units, &stride_x, &stride_w, &stride_y,
                    &bucket};
  unsigned grid = cdiv(num_patches, e->tiles[0]) * cdiv(out_features, e->tiles[1]);
  if ((status = launch(&state, index, grid, 1, params, (int)(sizeof params / sizeof params[0]), (CUstream)stream)))
    return status;
  return succeed();
}
