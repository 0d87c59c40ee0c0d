/*
 * aot_table.h -- the table of exported cubins that `python -m finevit.kernels.export` generates
 * (finevit_aot_table.c) and finevit_kernels.c dispatches on. Internal: not installed.
 */
#ifndef FINEVIT_AOT_TABLE_H
#define FINEVIT_AOT_TABLE_H

#include <stddef.h>

/* Kernel ids: export.KERNEL_IDS. */
enum {
  FINEVIT_AOT_CU_BLOCKS = 0,   /* attention.py _cu_blocks_kernel: the attention's work list */
  FINEVIT_AOT_ROPE = 1,        /* rope.py _rope_kernel, forward rotation, rotary_dim = head_dim */
  FINEVIT_AOT_ATTENTION = 2,   /* attention.py _attn_fwd_kernel on already rotated q, k */
  FINEVIT_AOT_PATCH_EMBED = 3  /* patch_embed.py _patch_embed_fwd_kernel on uint8 patches */
};

typedef struct finevit_aot_entry {
  int kernel;            /* FINEVIT_AOT_* */
  int sm;                /* target: 80 (runs on 8.x) or 90 (sm_90a: runs on 9.0) */
  int dtype;             /* finevit_dtype, -1 when the kernel has no data dtype */
  int dim;               /* head dim (rope, attention), patch size (patch embedding), 0 */
  int aligned;           /* compiled assuming 16-byte aligned pointers (attention, RoPE: and strides passed in
                            units of 16 bytes, finevit_kernels.c's ALIGNED_UNIT / ALIGNED_TABLE_UNIT) */
  int has_bias;          /* patch embedding: HAS_BIAS */
  int align;             /* the kernel's ALIGN: strides (patch embedding: and sizes) are passed divided by it */
  int tiles[3];          /* tile constexprs the grid needs: cu_blocks {BLOCK_S}, rope {BLOCK_T, BLOCK_H},
                            attention {BLOCK_M}, patch embedding {BLOCK_M, BLOCK_N} */
  int num_warps;
  int shared;            /* dynamic shared memory, bytes */
  int num_params;        /* runtime parameters (export.PARAMS), in the order finevit_kernels.c passes them */
  int num_scratch;       /* trailing scratch pointers Triton appends, passed as 0 */
  const char *function;  /* the kernel's name in the cubin */
  const unsigned char *cubin;
  size_t cubin_size;
  const char *config;    /* e.g. "M128 N64 / 8w 3s" */
} finevit_aot_entry;

extern const finevit_aot_entry finevit_aot_entries[];
extern const int finevit_aot_num_entries;
extern const char finevit_aot_triton_version[];

#endif /* FINEVIT_AOT_TABLE_H */
