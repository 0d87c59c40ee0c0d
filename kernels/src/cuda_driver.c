/* cuda_driver.c -- dlopen()s the CUDA driver once and resolves the functions of finevit_cuda_driver. */
#include "cuda_driver.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static finevit_cuda_driver driver;
static const finevit_cuda_driver *loaded;
static char failure[512];
static pthread_once_t once = PTHREAD_ONCE_INIT;

/* ABI names: cuda.h maps some API names to versioned symbols (cuMemAlloc -> cuMemAlloc_v2). */
#define FINEVIT_RESOLVE(field, symbol)                                                              \
  do {                                                                                              \
    *(void **)(&driver.field) = dlsym(library, symbol);                                             \
    if (driver.field == NULL) {                                                                     \
      snprintf(failure, sizeof failure, "the CUDA driver %s has no symbol %s", path, symbol);       \
      return;                                                                                       \
    }                                                                                               \
  } while (0)

static void load(void) {
  const char *path = getenv("FINEVIT_CUDA_LIBRARY");
  if (path == NULL || path[0] == '\0') path = "libcuda.so.1";
  void *library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (library == NULL) {
    const char *error = dlerror();
    snprintf(failure, sizeof failure, "cannot load the CUDA driver (%s): %s", path, error ? error : "unknown error");
    return;
  }
  FINEVIT_RESOLVE(Init, "cuInit");
  FINEVIT_RESOLVE(GetErrorName, "cuGetErrorName");
  FINEVIT_RESOLVE(GetErrorString, "cuGetErrorString");
  FINEVIT_RESOLVE(CtxGetCurrent, "cuCtxGetCurrent");
  FINEVIT_RESOLVE(CtxGetDevice, "cuCtxGetDevice");
  FINEVIT_RESOLVE(CtxSetCurrent, "cuCtxSetCurrent");
  FINEVIT_RESOLVE(CtxSynchronize, "cuCtxSynchronize");
  FINEVIT_RESOLVE(DeviceGet, "cuDeviceGet");
  FINEVIT_RESOLVE(DeviceGetCount, "cuDeviceGetCount");
  FINEVIT_RESOLVE(DeviceGetAttribute, "cuDeviceGetAttribute");
  FINEVIT_RESOLVE(DevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
  FINEVIT_RESOLVE(ModuleLoadData, "cuModuleLoadData");
  FINEVIT_RESOLVE(ModuleGetFunction, "cuModuleGetFunction");
  FINEVIT_RESOLVE(FuncGetAttribute, "cuFuncGetAttribute");
  FINEVIT_RESOLVE(FuncSetAttribute, "cuFuncSetAttribute");
  FINEVIT_RESOLVE(FuncSetCacheConfig, "cuFuncSetCacheConfig");
  FINEVIT_RESOLVE(LaunchKernel, "cuLaunchKernel");
  FINEVIT_RESOLVE(MemAlloc, "cuMemAlloc_v2");
  FINEVIT_RESOLVE(MemFree, "cuMemFree_v2");
  FINEVIT_RESOLVE(MemcpyHtoD, "cuMemcpyHtoD_v2");
  FINEVIT_RESOLVE(MemcpyDtoH, "cuMemcpyDtoH_v2");
  FINEVIT_RESOLVE(MemsetD8, "cuMemsetD8_v2");
  CUresult status = driver.Init(0);
  if (status != CUDA_SUCCESS) {
    const char *name = NULL;
    driver.GetErrorName(status, &name);
    snprintf(failure, sizeof failure, "cuInit failed: %s (%d)", name ? name : "unknown", (int)status);
    return;
  }
  loaded = &driver;
}

const finevit_cuda_driver *finevit_cuda(const char **why) {
  pthread_once(&once, load);
  if (loaded == NULL && why != NULL) *why = failure;
  return loaded;
}
