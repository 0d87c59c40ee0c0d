/*
 * cuda_driver.h -- the CUDA driver API, loaded at run time.
 *
 * The library must build and link on machines without an NVIDIA driver (CI), so it never links libcuda: the
 * first call that needs the driver dlopen()s libcuda.so.1 (or $FINEVIT_CUDA_LIBRARY) and resolves the
 * functions below by their ABI names with dlsym into one table. Types and constants come from cuda.h (the
 * one bundled with triton, or the CUDA toolkit's). Internal: not installed; symbols hidden. The GPU test
 * links the static library and uses the table too (the allocation and copy functions are there for it).
 */
#ifndef FINEVIT_CUDA_DRIVER_H
#define FINEVIT_CUDA_DRIVER_H

#include <cuda.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct finevit_cuda_driver {
  CUresult (*Init)(unsigned int flags);
  CUresult (*GetErrorName)(CUresult error, const char **name);
  CUresult (*GetErrorString)(CUresult error, const char **text);
  CUresult (*CtxGetCurrent)(CUcontext *ctx);
  CUresult (*CtxGetDevice)(CUdevice *device);
  CUresult (*CtxSetCurrent)(CUcontext ctx);
  CUresult (*CtxSynchronize)(void);
  CUresult (*DeviceGet)(CUdevice *device, int ordinal);
  CUresult (*DeviceGetCount)(int *count);
  CUresult (*DeviceGetAttribute)(int *value, CUdevice_attribute attribute, CUdevice device);
  CUresult (*DevicePrimaryCtxRetain)(CUcontext *ctx, CUdevice device);
  CUresult (*ModuleLoadData)(CUmodule *module, const void *image);
  CUresult (*ModuleGetFunction)(CUfunction *function, CUmodule module, const char *name);
  CUresult (*FuncGetAttribute)(int *value, CUfunction_attribute attribute, CUfunction function);
  CUresult (*FuncSetAttribute)(CUfunction function, CUfunction_attribute attribute, int value);
  CUresult (*FuncSetCacheConfig)(CUfunction function, CUfunc_cache config);
  CUresult (*LaunchKernel)(CUfunction f, unsigned int grid_x, unsigned int grid_y, unsigned int grid_z,
                           unsigned int block_x, unsigned int block_y, unsigned int block_z,
                           unsigned int shared_bytes, CUstream stream, void **params, void **extra);
  CUresult (*MemAlloc)(CUdeviceptr *ptr, size_t bytes);
  CUresult (*MemFree)(CUdeviceptr ptr);
  CUresult (*MemcpyHtoD)(CUdeviceptr dst, const void *src, size_t bytes);
  CUresult (*MemcpyDtoH)(void *dst, CUdeviceptr src, size_t bytes);
  CUresult (*MemsetD8)(CUdeviceptr dst, unsigned char value, size_t count);
} finevit_cuda_driver;

/* The loaded driver (cuInit done), or NULL when it cannot be loaded; *why then says why. Loads once. */
__attribute__((visibility("hidden"))) const finevit_cuda_driver *finevit_cuda(const char **why);

#ifdef __cplusplus
}
#endif

#endif /* FINEVIT_CUDA_DRIVER_H */
