/*
 * fake_cuda.c -- a stand-in for libcuda.so.1 that launches nothing and writes down every launch, so that the
 * C runtime's launches can be checked on a machine without a GPU (tests/aot/test_cmake_build.py compares them
 * with the Python launchers' recorded launches). Loaded through FINEVIT_CUDA_LIBRARY; never installed.
 *
 * Environment: FAKE_CUDA_SM (compute capability of the fake device, e.g. 90), FAKE_CUDA_LOG (file the launches
 * are appended to), FAKE_CUDA_SIGNATURES ("name:kinds;..." with one character per runtime parameter, p pointer,
 * i int32, f float32, from finevit.kernels.export.PARAMS), so that parameter values can be read at their size.
 *
 * Device memory is host memory (malloc), so test_gpu.cpp's flow runs too, its outputs unwritten.
 * cuModuleLoadData accepts only ELF images and cuModuleGetFunction only names present in the image. A launch
 * is logged as one line: "name cubin_bytes grid_x grid_y grid_z block_x shared_bytes value value ...".
 */
#include <cuda.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

typedef struct fake_function {
  char name[128];
  size_t cubin_bytes;
} fake_function;

typedef struct fake_module {
  const unsigned char *image;
  size_t bytes;
} fake_module;

/* An ELF64 image's size: its section and program header tables come last. */
static size_t elf_size(const unsigned char *image) {
  uint64_t shoff, phoff;
  uint16_t phentsize, phnum, shentsize, shnum;
  memcpy(&phoff, image + 0x20, 8);
  memcpy(&shoff, image + 0x28, 8);
  memcpy(&phentsize, image + 0x36, 2);
  memcpy(&phnum, image + 0x38, 2);
  memcpy(&shentsize, image + 0x3A, 2);
  memcpy(&shnum, image + 0x3C, 2);
  size_t sections = (size_t)shoff + (size_t)shentsize * shnum, programs = (size_t)phoff + (size_t)phentsize * phnum;
  return sections > programs ? sections : programs;
}

EXPORT CUresult cuInit(unsigned int flags) { (void)flags; return CUDA_SUCCESS; }
EXPORT CUresult cuGetErrorName(CUresult error, const char **name) { (void)error; *name = "CUDA_ERROR_FAKE"; return CUDA_SUCCESS; }
EXPORT CUresult cuGetErrorString(CUresult error, const char **text) { (void)error; *text = "fake driver"; return CUDA_SUCCESS; }
EXPORT CUresult cuCtxGetCurrent(CUcontext *ctx) { *ctx = (CUcontext)0x1; return CUDA_SUCCESS; }
EXPORT CUresult cuCtxGetDevice(CUdevice *device) { *device = 0; return CUDA_SUCCESS; }
EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) { (void)ctx; return CUDA_SUCCESS; }
EXPORT CUresult cuCtxSynchronize(void) { return CUDA_SUCCESS; }
EXPORT CUresult cuDeviceGet(CUdevice *device, int ordinal) { *device = ordinal; return CUDA_SUCCESS; }
EXPORT CUresult cuDeviceGetCount(int *count) { *count = 1; return CUDA_SUCCESS; }
EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice device) { (void)device; *ctx = (CUcontext)0x1; return CUDA_SUCCESS; }

EXPORT CUresult cuDeviceGetAttribute(int *value, CUdevice_attribute attribute, CUdevice device) {
  (void)device;
  const char *sm = getenv("FAKE_CUDA_SM");
  int capability = sm ? atoi(sm) : 90;
  switch (attribute) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = capability / 10; return CUDA_SUCCESS;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = capability % 10; return CUDA_SUCCESS;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *value = capability >= 90 ? 232448 : 166912; return CUDA_SUCCESS;
    default: *value = 0; return CUDA_SUCCESS;
  }
}

EXPORT CUresult cuModuleLoadData(CUmodule *module, const void *image) {
  const unsigned char *bytes = (const unsigned char *)image;
  if (memcmp(bytes, "\x7f" "ELF", 4) != 0) return CUDA_ERROR_INVALID_IMAGE;
  fake_module *loaded = malloc(sizeof *loaded);
  loaded->image = bytes;
  loaded->bytes = elf_size(bytes);
  *module = (CUmodule)loaded;
  return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleGetFunction(CUfunction *function, CUmodule module, const char *name) {
  const fake_module *loaded = (const fake_module *)module;
  size_t length = strlen(name);
  int found = 0;
  for (size_t i = 0; i + length <= loaded->bytes && !found; ++i) found = memcmp(loaded->image + i, name, length) == 0;
  if (!found || length >= sizeof(((fake_function *)0)->name)) return CUDA_ERROR_NOT_FOUND;
  fake_function *result = calloc(1, sizeof *result);
  memcpy(result->name, name, length);
  result->cubin_bytes = loaded->bytes;
  *function = (CUfunction)result;
  return CUDA_SUCCESS;
}

EXPORT CUresult cuFuncGetAttribute(int *value, CUfunction_attribute attribute, CUfunction function) {
  (void)attribute; (void)function; *value = 0; return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncSetAttribute(CUfunction function, CUfunction_attribute attribute, int value) {
  (void)function; (void)attribute; (void)value; return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncSetCacheConfig(CUfunction function, CUfunc_cache config) {
  (void)function; (void)config; return CUDA_SUCCESS;
}

/* The kinds of `name`'s runtime parameters from FAKE_CUDA_SIGNATURES, or NULL. */
static const char *kinds_of(const char *name, char *buffer, size_t size) {
  const char *signatures = getenv("FAKE_CUDA_SIGNATURES");
  size_t length = strlen(name);
  for (const char *at = signatures; at && *at;) {
    const char *end = strchr(at, ';');
    size_t item = end ? (size_t)(end - at) : strlen(at);
    if (item > length && strncmp(at, name, length) == 0 && at[length] == ':' && item - length - 1 < size) {
      memcpy(buffer, at + length + 1, item - length - 1);
      buffer[item - length - 1] = '\0';
      return buffer;
    }
    at = end ? end + 1 : NULL;
  }
  return NULL;
}

EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned int grid_x, unsigned int grid_y, unsigned int grid_z,
                               unsigned int block_x, unsigned int block_y, unsigned int block_z,
                               unsigned int shared_bytes, CUstream stream, void **params, void **extra) {
  (void)block_y; (void)block_z; (void)stream; (void)extra;
  const fake_function *function = (const fake_function *)f;
  char buffer[128];
  const char *kinds = kinds_of(function->name, buffer, sizeof buffer);
  const char *path = getenv("FAKE_CUDA_LOG");
  if (kinds == NULL || path == NULL) return CUDA_ERROR_INVALID_VALUE;
  FILE *log = fopen(path, "a");
  if (log == NULL) return CUDA_ERROR_INVALID_VALUE;
  fprintf(log, "%s %zu %u %u %u %u %u", function->name, function->cubin_bytes, grid_x, grid_y, grid_z, block_x,
          shared_bytes);
  for (size_t i = 0; kinds[i]; ++i) {
    if (kinds[i] == 'p') fprintf(log, " %llu", (unsigned long long)*(const CUdeviceptr *)params[i]);
    else if (kinds[i] == 'i') fprintf(log, " %d", (int)*(const int32_t *)params[i]);
    else fprintf(log, " %.9g", (double)*(const float *)params[i]);
  }
  fprintf(log, "\n");
  fclose(log);
  return CUDA_SUCCESS;
}

/* Host memory stands in for device memory (for running test_gpu.cpp's flow, whose outputs stay unwritten). */
EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *ptr, size_t bytes) {
  void *memory = malloc(bytes);
  *ptr = (CUdeviceptr)(uintptr_t)memory;
  return memory ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
EXPORT CUresult cuMemFree_v2(CUdeviceptr ptr) { free((void *)(uintptr_t)ptr); return CUDA_SUCCESS; }
EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t bytes) {
  memcpy((void *)(uintptr_t)dst, src, bytes);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t bytes) {
  memcpy(dst, (const void *)(uintptr_t)src, bytes);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t count) {
  memset((void *)(uintptr_t)dst, value, count);
  return CUDA_SUCCESS;
}
