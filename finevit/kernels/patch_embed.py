"""Patch embedding as one GEMM that reads uint8 pixels: per-channel normalization fused into the A operand.

Shapes (docs/design.md):
    patches:  (N, K), K = C·P·P flattened in (C, P, P) order, last dim contiguous, any row stride; uint8
              (normalized in the kernel) or the weight's dtype (used as is).
    weight:   (D, K) = Conv2d(C, D, P, stride=P).weight.reshape(D, -1), fp16 / bf16 / fp32, any strides.
    bias:     optional (D,).
    output:   (N, D) contiguous, weight's dtype.
N and K need not be multiples of a tile (P = 14 gives K = 196 or 588); every tile edge is masked.

Forward, with a the uint8 pixel of column k, c = k // (P·P) its channel and, per channel,
α_c = 1 / (255·std_c), β_c = −mean_c / std_c (a (C, 2) float32 table built on the host, cached):
    x̂[n, k] = fp32(a)·α_c + β_c   rounded to the weight's dtype in registers   (float input: x̂ = x)
    y[n, d] = Σ_k x̂[n, k] · W[d, k] + b[d]                                       fp32 accumulation
Backward (no atomics: split-N partial sums in separate fp32 buffers, summed with torch):
    dW[d, k] = Σ_n dy[n, d] · x̂[n, k]   x̂ recomputed from the uint8 input in the kernel, never stored
    db[d]    = Σ_n dy[n, d]             the extra column k = K of dyᵀ·[x̂ | 1] in the same kernel
    dx       = dy @ W                   float patches only: the forward kernel with B = W instead of Wᵀ

Why normalize in registers rather than fold the normalization into the weights (KERNELS.md's suggestion,
y = a·(W·diag α)ᵀ + (b + W β)): the folded W' = W·diag(α) must be rounded to bf16, and a·α spans [0, 1/std]
instead of the normalized range, so the folded GEMM's error is ~1.3-2× PyTorch's (measured on CPU with CLIP's
mean/std: max error 0.027 vs 0.020 in bf16, 0.018 vs 0.008 before the output rounding). Normalizing in
registers rounds x̂ exactly where PyTorch does, so the error matches PyTorch's. Its cost is one FMA per
loaded pixel on top of the uint8 -> float conversion either design needs (a tile's pixel feeds BLOCK_N MACs),
and no per-call weight copy. The conversion itself avoids I2F (16 results per clock per SM on sm_90, an
eighth of the FP32 FMA rate): the bits of 2^23 + a are `a | 0x4B000000`, so fp32(a) = bitcast(·) − 2^23,
one LOP3 and one FADD (the sm_90 SASS of the forward holds no I2F).

Operand roles: the forward computes yᵀ = W · x̂ᵀ, a (BLOCK_N, BLOCK_M) tile of output features × patches, and
stores it transposed. On sm_90 wgmma reads its B operand from shared memory only, so the normalized pixels
(the B operand) are written there once per k-step (cp.async global -> shared, LDS, normalize, STS), and all
the k-step's wgmmas are issued back to back with one wait. With x̂ as the A operand (y = x̂ · Wᵀ, the first
version) Triton fed wgmma from registers; each 64x128x16 wgmma reused the A fragments' registers and was
followed by a full wait, so no two wgmmas overlapped and the tensor cores ran about half the time (measured
297 TFLOP/s against cuBLAS's 590 on the same shape; bench/NOTES.md, 2026-12-06). The weight-gradient kernel
already had x̂ as its B operand. On sm_80 (mma.sync) both operands go through registers either way.

Alignment: Triton assumes an int argument not divisible by 16 has no divisor at all, so rows of 588 uint8
(or 1176 bytes of bf16) would be loaded byte by byte and, with the K-tail mask `k < K` varying at every
column, never through cp.async (seen in the sm_90 TTGIR: plain loads, no pipelining). The launchers pass
the feature counts and row strides divided by ALIGN, the largest power of two ≤ 16 dividing all of them
(4 for P = 14, 16 for P = 16 with D a multiple of 16), and the kernels multiply back by the constexpr: Triton
then knows that rows start, and the mask changes, only every ALIGN columns, and loads ALIGN-wide vectors
through cp.async into a pipelined shared-memory ring.

The grid of the forward runs the column tiles of one row block back to back, so a row block of pixels is
read from DRAM once and from L2 by the other D / BLOCK_N programs; the weight (≤ 2 MB) stays in L2.

Two strategies for uint8 patches (`FINEVIT_PATCH_EMBED`):
- "fused": the kernels above. The pixels are read once, at 1 byte each, but the normalization sits between
  the loads and the wgmmas of every k-step and does not overlap them.
- "two_pass": `_normalize_kernel` writes x̂ once (same formula and rounding, K padded with zero columns to a
  multiple of 8 elements so that cuBLAS gets 16-byte rows: 588 -> 592), then `F.linear`. Autograd keeps x̂
  for the weight gradient (a cuBLAS GEMM too). It moves 3 bytes per pixel more than "fused", about 0.15 ms
  at N = 262,144, K = 768 on an H100, against cuBLAS GEMMs that ran at 590-660 TFLOP/s, where "fused"
  measured ~300.
- "auto" (the default): on CUDA, each (device, dtype, D, K, row-count octave, bias, gradient) key times both
  at its first call, as autotuning times tiles, and keeps the faster one. Elsewhere, and inside torch.compile
  before any timing, it uses "fused". A compiled model can name one.
The AOT C library exports the fused forward.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _dispatch, reference
from ._autotune import autotune, configs
from ._validation import FLOAT_DTYPES, check_tensor, fail

# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _load_operand(ptrs, mask, alpha, beta, NORMALIZE: tl.constexpr, DTYPE: tl.constexpr):
    """A tile of patches as a dot operand of type DTYPE: uint8 pixels normalized (x̂ = fp32(a)·α + β, with α, β
    the per-column scale and shift broadcast to the tile), float patches as loaded. Masked pixels read as 0."""
    x = tl.load(ptrs, mask=mask, other=0)
    if NORMALIZE:
        # uint8 -> fp32 with integer ops: bits(2^23 + a) = a | 0x4B000000, exact for 0 <= a < 2^23.
        a = (x.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        x = (a * alpha + beta).to(DTYPE)
    return x


@triton.jit
def _channel_scale_shift(NORM, offs_k, mask_k, FEATURES_PER_CHANNEL: tl.constexpr):
    """α, β of the channel of each column in offs_k (0 for masked columns), from NORM (C, 2) float32."""
    channel = offs_k // FEATURES_PER_CHANNEL
    alpha = tl.load(NORM + 2 * channel, mask=mask_k, other=0.0)
    beta = tl.load(NORM + 2 * channel + 1, mask=mask_k, other=0.0)
    return alpha, beta


@triton.jit
def _patch_embed_fwd_kernel(
    # pointers
    X, W, BIAS, NORM, Y,  # NORM: (C, 2) float32 [α_c, β_c], read only when NORMALIZE
    # sizes: Y (rows, out_features) = x̂ (rows, in_features) @ Wᵀ, W (out_features, in_features)
    rows, out_features, in_features,  # the feature counts in units of ALIGN
    # strides in units of ALIGN; W has one unit stride (see W_IN_CONTIGUOUS), stride_w is the other one
    stride_x_row, stride_w, stride_y_row,
    rows_bucket,  # autotune key only
    # constexprs
    NORMALIZE: tl.constexpr,  # uint8 X: normalize in registers; else X has W's dtype
    FEATURES_PER_CHANNEL: tl.constexpr,  # P·P: the channel of column k is k // P·P (a compile-time divisor)
    HAS_BIAS: tl.constexpr,
    W_IN_CONTIGUOUS: tl.constexpr,  # W[n, k] at n·stride_w + k (the weight); else at n + k·stride_w (weightᵀ)
    ALIGN: tl.constexpr,  # largest power of two <= 16 dividing the sizes and strides above (module docstring)
    DOT_PRECISION: tl.constexpr,  # fp32: "ieee" (exact) or "tf32", as torch's matmul precision; fp16/bf16: unused
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # patches, output features, K-step
):
    out_features = out_features * ALIGN
    in_features = in_features * ALIGN
    stride_x_row = stride_x_row * ALIGN
    stride_w = stride_w * ALIGN
    stride_y_row = stride_y_row * ALIGN
    # Column tiles of one row block are consecutive programs: the pixels are read from DRAM once.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(out_features, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows / columns past the end re-read valid ones (modulo) and are never stored: loads need only K masks.
    rows_in = (offs_m % rows).to(tl.int64)
    cols_in = offs_n % out_features
    # yᵀ = W · x̂ᵀ: the normalized pixels are the B operand, which wgmma reads from shared memory (module
    # docstring, "Operand roles").
    x_ptrs = X + offs_k[:, None] + rows_in[None, :] * stride_x_row  # (BLOCK_K, BLOCK_M) tile of x̂ᵀ
    if W_IN_CONTIGUOUS:
        w_ptrs = W + cols_in[:, None] * stride_w + offs_k[None, :]  # (BLOCK_N, BLOCK_K) tile of W
        w_step = BLOCK_K
    else:
        w_ptrs = W + cols_in[:, None] + offs_k[None, :] * stride_w
        w_step = BLOCK_K * stride_w

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k in range(0, in_features, BLOCK_K):
        mask_k = offs_k < in_features - k  # constant over ALIGN columns: vector loads survive the mask
        if NORMALIZE:
            alpha, beta = _channel_scale_shift(NORM, k + offs_k, mask_k, FEATURES_PER_CHANNEL)
            alpha, beta = alpha[:, None], beta[:, None]
        else:
            alpha, beta = 0.0, 0.0  # unused
        x = _load_operand(x_ptrs, mask_k[:, None], alpha, beta, NORMALIZE, W.dtype.element_ty)
        w = tl.load(w_ptrs, mask=mask_k[None, :], other=0.0)
        acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += w_step

    mask_n = offs_n < out_features
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    y_ptrs = Y + offs_m.to(tl.int64)[None, :] * stride_y_row + offs_n[:, None]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_n[:, None] & (offs_m < rows)[None, :])


@triton.jit
def _patch_embed_dweight_kernel(
    # pointers
    DY, X, NORM, DW,  # DW: float32 (splits, out_features, in_features + HAS_BIAS) partial sums
    # sizes (the feature counts in units of ALIGN)
    rows, out_features, in_features, rows_per_split,
    # strides (stride_dy_row, stride_x_row in units of ALIGN)
    stride_dy_row, stride_x_row, stride_dw_split, stride_dw_row,
    rows_bucket,  # autotune key only
    # constexprs
    NORMALIZE: tl.constexpr, FEATURES_PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # also write db as column `in_features`: dyᵀ·[x̂ | 1]
    ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,  # BLOCK_R: rows per step
):
    """Program (d-tile, k-tile, split): DW[split, d, k] = Σ over the split's rows of dy[r, d] · x̂[r, k]."""
    out_features = out_features * ALIGN
    in_features = in_features * ALIGN
    stride_dy_row = stride_dy_row * ALIGN
    stride_x_row = stride_x_row * ALIGN
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k = offs_k < in_features
    # The column tile is fixed for the whole program: its α, β are loaded once. Column k = in_features
    # (the bias column) reads the masked pixel 0 and becomes 0·α + β = 1 (float input: 0 + 1).
    ones = offs_k == in_features
    if NORMALIZE:
        alpha, beta = _channel_scale_shift(NORM, offs_k, mask_k, FEATURES_PER_CHANNEL)
        if HAS_BIAS:
            beta = tl.where(ones, 1.0, beta)
        alpha, beta = alpha[None, :], beta[None, :]
    else:
        alpha, beta = 0.0, 0.0  # unused

    row_start = split * rows_per_split
    row_end = tl.minimum(rows, row_start + rows_per_split)
    rows_in = (row_start + offs_r).to(tl.int64)
    dy_ptrs = DY + rows_in[:, None] * stride_dy_row + (offs_d % out_features)[None, :]
    x_ptrs = X + rows_in[:, None] * stride_x_row + offs_k[None, :]
    acc = tl.zeros([BLOCK_D, BLOCK_K], dtype=tl.float32)
    for r in range(row_start, row_end, BLOCK_R):
        mask_r = offs_r < row_end - r
        dy = tl.load(dy_ptrs, mask=mask_r[:, None], other=0.0)  # rows past the split's end: dy = 0
        x = _load_operand(x_ptrs, mask_r[:, None] & mask_k[None, :], alpha, beta, NORMALIZE, DY.dtype.element_ty)
        if HAS_BIAS and not NORMALIZE:
            x += ones[None, :].to(x.dtype)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=DOT_PRECISION)
        dy_ptrs += BLOCK_R * stride_dy_row
        x_ptrs += BLOCK_R * stride_x_row

    dw_ptrs = DW + split * stride_dw_split + offs_d[:, None] * stride_dw_row + offs_k[None, :]
    tl.store(dw_ptrs, acc, mask=(offs_d < out_features)[:, None] & (offs_k < in_features + HAS_BIAS)[None, :])


@triton.jit
def _normalize_kernel(
    X, NORM, Y,  # X: (rows, in_features) uint8; Y: (rows, out_features) with out_features >= in_features
    rows, in_features, out_features,  # the feature counts in units of ALIGN
    stride_x_row, stride_y_row,  # in units of ALIGN
    FEATURES_PER_CHANNEL: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Y[r, k] = x̂[r, k], the forward kernel's normalization with its rounding, and 0 for the padding
    columns in_features <= k < out_features. Grid (cdiv(rows, BLOCK_R), cdiv(out_features, BLOCK_K))."""
    in_features = in_features * ALIGN
    out_features = out_features * ALIGN
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_r = offs_r < rows
    mask_k = offs_k < in_features  # α = β = 0 past it: the padding columns come out as 0
    alpha, beta = _channel_scale_shift(NORM, offs_k, mask_k, FEATURES_PER_CHANNEL)
    rows_in = offs_r.to(tl.int64)[:, None]
    x = _load_operand(X + rows_in * (stride_x_row * ALIGN) + offs_k[None, :], mask_r[:, None] & mask_k[None, :],
                      alpha[None, :], beta[None, :], True, Y.dtype.element_ty)
    tl.store(Y + rows_in * (stride_y_row * ALIGN) + offs_k[None, :], x,
             mask=mask_r[:, None] & (offs_k < out_features)[None, :])


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


# Autotune candidates (tiles, warps, stages), pruned with the ptxas reports compiled on CPU (sm_80 and sm_90,
# uint8 and float patches, K 588 / 768, `python -m finevit.kernels.compile_check`, docs/compile_report.md):
# configs that spill are out (forward, transposed form: 128x256x64 with 8 warps 208 B and 128x128x64 with
# 4 warps 304 B on sm_80). The forward's list mixes one-program-per-SM tiles that amortize each normalized
# pixel over 128-256 output features with tiles that fit two programs per SM (64x128x64 with 4 warps,
# 128x128x32 with 4 warps: ≤ 224 registers × 128 threads, ≤ 90 KB of shared memory), so that one program's
# normalization overlaps the other's wgmmas (bench/NOTES.md). fp32 weights get their own short lists: an
# "ieee" fp32 dot runs on FMA units with much larger register tiles (the 16-bit lists spill 1-40 KB there,
# the forward's 64x64x32 tile with 4 warps 344-368 B for uint8 patches); the weight gradient's 64x64x32
# tile spilled 368-480 B per thread with 4 warps and none with 8.
_FWD_SHAPES = [(128, 128, 64, 8, 4), (128, 256, 32, 8, 4), (256, 128, 32, 8, 4), (64, 128, 64, 4, 4),
               (128, 128, 32, 4, 5)]
_DWEIGHT_SHAPES = [(128, 128, 64, 8, 3), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
_FWD_SHAPES_FP32 = [(64, 64, 32, 8, 3), (64, 64, 16, 4, 3)]
_DWEIGHT_SHAPES_FP32 = [(64, 64, 32, 8, 3)]
_KEYS = ["out_features", "in_features", "rows_bucket", "NORMALIZE", "HAS_BIAS"]  # + the tensors' dtypes


def _autotuned(kernel, names, shapes, fp32_shapes, keys):
    """{is_fp32: the kernel autotuned over that dtype's list}."""
    return {fp32: autotune(configs(names, s), key=keys)(kernel)
            for fp32, s in ((False, shapes), (True, fp32_shapes))}


_fwd_tuned = _autotuned(_patch_embed_fwd_kernel, ["BLOCK_M", "BLOCK_N", "BLOCK_K"], _FWD_SHAPES, _FWD_SHAPES_FP32,
                        _KEYS + ["W_IN_CONTIGUOUS"])
_dweight_tuned = _autotuned(_patch_embed_dweight_kernel, ["BLOCK_D", "BLOCK_K", "BLOCK_R"], _DWEIGHT_SHAPES,
                            _DWEIGHT_SHAPES_FP32, _KEYS)
_INTERPRETER_BLOCKS = {  # the one tile of each kernel that the interpreter runs
    _patch_embed_fwd_kernel: {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64},
    _patch_embed_dweight_kernel: {"BLOCK_D": 32, "BLOCK_K": 64, "BLOCK_R": 32},
}
_INTERPRETER_ROWS_PER_SPLIT = 32  # small, so that the tests' row counts cover several splits
_MIN_ROWS_PER_SPLIT, _MAX_SPLITS = 1024, 16


def _rows_bucket(rows: int) -> int:
    """Autotune key: batches of different patch counts share a tuning within an octave."""
    return triton.next_power_of_2(max(rows, 1024))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _rows_per_split(rows: int, out_features: int, columns: int, device: torch.device) -> int:
    """Rows each split of the weight-gradient reduction covers (columns: K, + 1 with the bias column).

    The output is small (D × (K + 1)) and the reduction long (N), so N is split to give the GPU enough
    programs. For the nominal 128 × 128 tile, take the split count (at most 16, at least 1024 rows each) whose
    programs fill their last wave best, the fewest on ties: D 768, K 588 on 132 SMs -> 30 tiles × 13 splits
    = 390 programs, 98.5% of 3 waves (one wave of 30 × 4 would leave 9% of the SMs idle; the partial sums
    cost 13 · D · (K + 1) · 4 bytes = 24 MB, written once and summed once).
    """
    if _dispatch.interpreting() or device.type != "cuda":
        return _INTERPRETER_ROWS_PER_SPLIT
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    tiles = triton.cdiv(out_features, 128) * triton.cdiv(columns, 128)

    def last_wave_fill(splits: int) -> float:
        programs = tiles * splits
        return programs / (triton.cdiv(programs, sms) * sms)

    most = max(1, min(_MAX_SPLITS, rows // _MIN_ROWS_PER_SPLIT))
    splits = max(range(1, most + 1), key=lambda s: (round(last_wave_fill(s), 2), -s))
    return triton.cdiv(triton.cdiv(rows, splits), 256) * 256


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's fp32 matmul setting, as F.linear does: exact ("highest", the default) or TF32."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored for fp16 / bf16


@triton_op("finevit::patch_embed_fwd", mutates_args=())
def patch_embed_fwd(
    patches: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm: torch.Tensor | None,
    features_per_channel: int,
) -> torch.Tensor:
    """y (N, D) = x̂ @ weightᵀ + bias in weight's dtype; x̂ = patches normalized by `norm` (C, 2) when uint8.

    weight (D, K) needs one unit stride: the weight itself, or weight.t() in the backward's dy @ W.
    """
    rows, in_features = patches.shape
    out_features = weight.shape[0]
    normalize = patches.dtype == torch.uint8
    assert normalize == (norm is not None) and (normalize or patches.dtype == weight.dtype), (
        f"uint8 patches need a norm table, float patches weight's dtype: {patches.dtype}, {weight.dtype}")
    assert patches.stride(-1) == 1 or in_features == 1, f"patches need a contiguous last dim: {patches.stride()}"
    if weight.stride(1) != 1 and weight.stride(0) != 1:
        weight = weight.contiguous()
    w_in_contiguous = weight.stride(1) == 1
    stride_w = weight.stride(0) if w_in_contiguous else weight.stride(1)
    y = _dispatch.empty((rows, out_features), weight.dtype, weight.device)
    if rows == 0 or out_features == 0:
        return y
    bias = bias.contiguous() if bias is not None else None
    align = _dispatch.alignment(out_features, in_features, patches.stride(0), stride_w, y.stride(0))

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(out_features, meta["BLOCK_N"]),)

    _dispatch.launch(
        _fwd_tuned[weight.dtype == torch.float32], _patch_embed_fwd_kernel, grid,
        patches, weight, bias if bias is not None else weight, norm if normalize else weight, y,
        rows, out_features // align, in_features // align,
        patches.stride(0) // align, stride_w // align, y.stride(0) // align,
        _rows_bucket(rows),
        NORMALIZE=normalize, FEATURES_PER_CHANNEL=features_per_channel, HAS_BIAS=bias is not None,
        W_IN_CONTIGUOUS=w_in_contiguous, ALIGN=align, DOT_PRECISION=_dot_precision(weight.dtype),
        interpreter_blocks=_INTERPRETER_BLOCKS[_patch_embed_fwd_kernel],
    )
    return y


@triton_op("finevit::patch_embed_dweight", mutates_args=())
def patch_embed_dweight(
    grad: torch.Tensor, patches: torch.Tensor, norm: torch.Tensor | None, features_per_channel: int,
    with_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW (D, K), db (D,) or an empty (0,) tensor without bias) in grad's dtype, from dy (N, D) and patches."""
    rows, in_features = patches.shape
    out_features = grad.shape[1]
    normalize = patches.dtype == torch.uint8
    if grad.stride(-1) != 1:  # e.g. the expanded, stride-0 gradient of out.sum()
        grad = grad.contiguous()
    columns = in_features + int(with_bias)
    rows_per_split = max(1, _rows_per_split(rows, out_features, columns, grad.device))
    splits = max(1, triton.cdiv(rows, rows_per_split))  # rows == 0: one split of zeros
    partial = _dispatch.empty((splits, out_features, columns), torch.float32, grad.device)
    align = _dispatch.alignment(out_features, in_features, grad.stride(0), patches.stride(0))

    def grid(meta):
        return (triton.cdiv(out_features, meta["BLOCK_D"]), triton.cdiv(columns, meta["BLOCK_K"]), splits)

    if out_features and columns:
        _dispatch.launch(
            _dweight_tuned[grad.dtype == torch.float32], _patch_embed_dweight_kernel, grid,
            grad, patches, norm if normalize else grad, partial,
            rows, out_features // align, in_features // align, rows_per_split,
            grad.stride(0) // align, patches.stride(0) // align, partial.stride(0), partial.stride(1),
            _rows_bucket(rows),
            NORMALIZE=normalize, FEATURES_PER_CHANNEL=features_per_channel, HAS_BIAS=with_bias,
            ALIGN=align, DOT_PRECISION=_dot_precision(grad.dtype),
            interpreter_blocks=_INTERPRETER_BLOCKS[_patch_embed_dweight_kernel],
        )
    total = partial[0] if splits == 1 else partial.sum(0)  # (D, K + with_bias) float32, deterministic
    # Fresh contiguous outputs (the fake implementation's layout), never views of the partial sums.
    d_weight = total[:, :in_features].to(grad.dtype, copy=True)
    d_bias = total[:, in_features].to(grad.dtype, copy=True) if with_bias else grad.new_empty((0,))
    return d_weight, d_bias


_NORMALIZE_BLOCKS = {"BLOCK_R": 32, "BLOCK_K": 128}  # 32 pixels per thread at 4 warps; bandwidth-bound: untuned


def _gemm_features(in_features: int) -> int:
    """Width of the normalized patches in the two-pass path: K rounded up to 8 elements (16 bytes), the row
    alignment cuBLAS's fast kernels need (P = 14: K = 588 -> 592; the padding columns are zeros)."""
    return triton.cdiv(in_features, 8) * 8


@triton_op("finevit::normalize_patches", mutates_args=())
def normalize_patches(patches: torch.Tensor, norm: torch.Tensor, features_per_channel: int, out_features: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """x̂ (N, out_features) in `dtype` from uint8 patches (N, K), K <= out_features: the forward kernel's
    normalization and rounding, zeros in the columns past K."""
    rows, in_features = patches.shape
    out = _dispatch.empty((rows, out_features), dtype, patches.device)
    if rows == 0 or out_features == 0:
        return out
    align = _dispatch.alignment(in_features, out_features, patches.stride(0), out.stride(0))
    grid = (triton.cdiv(rows, _NORMALIZE_BLOCKS["BLOCK_R"]), triton.cdiv(out_features, _NORMALIZE_BLOCKS["BLOCK_K"]))
    wrap_triton(_normalize_kernel)[grid](
        patches, norm, out, rows, in_features // align, out_features // align,
        patches.stride(0) // align, out.stride(0) // align,
        FEATURES_PER_CHANNEL=features_per_channel, ALIGN=align, num_warps=4, **_NORMALIZE_BLOCKS,
    )
    return out


@normalize_patches.register_fake
def _(patches, norm, features_per_channel, out_features, dtype):
    return patches.new_empty((patches.shape[0], out_features), dtype=dtype)


@patch_embed_fwd.register_fake
def _(patches, weight, bias, norm, features_per_channel):
    return weight.new_empty((patches.shape[0], weight.shape[0]))


@patch_embed_dweight.register_fake
def _(grad, patches, norm, features_per_channel, with_bias):
    d_weight = grad.new_empty((grad.shape[1], patches.shape[1]))
    return d_weight, grad.new_empty((grad.shape[1],) if with_bias else (0,))


# ----------------------------------------------------------------------------------------------------
# Autograd and the public function
# ----------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    patches, weight, bias, norm, features_per_channel = inputs
    ctx.save_for_backward(patches, weight, norm)
    ctx.features_per_channel = features_per_channel
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    patches, weight, norm = ctx.saved_tensors
    needs_patches, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    d_patches = d_weight = d_bias = None
    if needs_weight or needs_bias:
        d_weight, d_bias = patch_embed_dweight(grad, patches, norm, ctx.features_per_channel,
                                               ctx.has_bias and needs_bias)
        d_weight = d_weight if needs_weight else None
        d_bias = d_bias if ctx.has_bias and needs_bias else None
    if needs_patches:  # float patches only (uint8 never requires grad): dx = dy @ W
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        d_patches = patch_embed_fwd(grad, weight.t(), None, None, 1)
    return d_patches, d_weight, d_bias, None, None


patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Two strategies for uint8 patches, and the choice between them
# ----------------------------------------------------------------------------------------------------

STRATEGIES = ("fused", "two_pass")
_fastest_strategy: dict[tuple, str] = {}  # measured choices, by `_strategy_key`


def _normalize_then_linear(patches, weight, bias, norm, features_per_channel):
    """The two-pass strategy: x̂ written once in weight's dtype (K padded to 16 bytes), then F.linear (cuBLAS).
    Autograd keeps x̂ (2 bytes per pixel) for the weight gradient, a cuBLAS GEMM too."""
    features = weight.shape[1]
    padded = _gemm_features(features)
    x = normalize_patches(patches, norm, features_per_channel, padded, weight.dtype)
    if padded != features:
        weight = F.pad(weight, (0, padded - features))
    return F.linear(x, weight, bias)


def _strategy_key(patches, weight, bias) -> tuple:
    with_grad = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    return (str(weight.device), weight.dtype, *weight.shape, _rows_bucket(patches.shape[0]), bias is not None,
            with_grad)


def _strategy(patches, weight, bias, norm, features_per_channel) -> str:
    """`FINEVIT_PATCH_EMBED`: "fused", "two_pass", or "auto" (unset): on CUDA the faster of the two for this
    (device, dtype, D, K, row-count octave, bias, gradient) key, timed at its first call and remembered, as
    autotuning does; elsewhere, and inside torch.compile, "fused" (a compiled model can name one)."""
    choice = os.environ.get("FINEVIT_PATCH_EMBED", "auto") or "auto"
    if choice in STRATEGIES:
        return choice
    if choice != "auto":
        raise ValueError(f"FINEVIT_PATCH_EMBED must be one of auto, {', '.join(STRATEGIES)}, got {choice!r}")
    if not _can_time(weight):
        return "fused"
    key = _strategy_key(patches, weight, bias)
    if key not in _fastest_strategy:
        _fastest_strategy[key] = _time_strategies(patches, weight, bias, norm, features_per_channel, key[-1])
    return _fastest_strategy[key]


def _can_time(weight: torch.Tensor) -> bool:
    """Whether the strategies can be timed here: compiled kernels on CUDA, outside torch.compile's tracing."""
    return weight.device.type == "cuda" and not _dispatch.interpreting() and not torch.compiler.is_compiling()


def _time_strategies(patches, weight, bias, norm, features_per_channel, with_grad: bool) -> str:
    """The faster strategy on these inputs: forward, plus the weight (and bias) gradient when one is needed."""
    from triton.testing import do_bench

    grad = torch.randn(patches.shape[0], weight.shape[0], device=weight.device, dtype=weight.dtype)

    def fused():
        patch_embed_fwd(patches, weight, bias, norm, features_per_channel)
        if with_grad:
            patch_embed_dweight(grad, patches, norm, features_per_channel, bias is not None)

    def two_pass():
        padded = _gemm_features(weight.shape[1])
        x = normalize_patches(patches, norm, features_per_channel, padded, weight.dtype)
        F.linear(x, F.pad(weight, (0, padded - weight.shape[1])), bias)
        if with_grad:
            torch.mm(grad.t(), x)
            if bias is not None:
                grad.sum(0)

    with torch.no_grad():
        times = {"fused": do_bench(fused, warmup=5, rep=25), "two_pass": do_bench(two_pass, warmup=5, rep=25)}
    return min(times, key=times.get)


def _scale_shift(mean: Sequence[float], std: Sequence[float], device: torch.device) -> torch.Tensor:
    """(C, 2) float32 rows [α_c, β_c] = [1 / (255·std_c), −mean_c / std_c]: (x / 255 − mean) / std = x·α + β."""
    values = [[1.0 / (255.0 * s), -m / s] for m, s in zip(mean, std)]
    return torch.tensor(values, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=32)
def _cached_scale_shift(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # A host-to-device copy synchronizes the stream: done once per (mean, std, device), not per call.
    return _scale_shift(mean, std, device)


def _check_inputs(patches, weight, bias, mean, std) -> None:
    op = "patch_embed"
    check_tensor(op, "weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "patches", patches, ndim=2, dtypes=(torch.uint8, weight.dtype), device=weight.device,
                 last_dim_contiguous=True)
    num_features = weight.shape[1]
    if patches.shape[1] != num_features:
        fail(op, f"patches must have shape (num_patches, C·P·P={num_features}) to match weight "
             f"{tuple(weight.shape)}, got {tuple(patches.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, dtypes=(weight.dtype,), device=weight.device)
        if bias.shape[0] != weight.shape[0]:
            fail(op, f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}")
    if patches.dtype != torch.uint8:
        if mean is not None or std is not None:
            fail(op, "mean and std normalize uint8 patches; float patches are used as is, pass neither")
        return
    if mean is None or std is None:
        fail(op, "uint8 patches need mean and std (one float per channel)")
    for name, values in (("mean", mean), ("std", std)):
        if isinstance(values, (str, torch.Tensor)) or not isinstance(values, Sequence):
            fail(op, f"{name} must be a sequence of floats (one per channel), got {type(values).__name__}",
                 TypeError)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(op, f"{name} must hold finite floats, got {list(values)}", TypeError)
    if len(mean) != len(std) or len(mean) == 0:
        fail(op, f"mean and std must have one value per channel (same length >= 1), "
             f"got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        fail(op, f"std must be positive, got {list(std)}")
    if num_features % len(mean):
        fail(op, f"patches have {num_features} features, not a multiple of C={len(mean)} channels "
             f"(the length of mean/std)")


def patch_embed(
    patches: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """Patch embedding as one GEMM: (num_patches, C·P·P) patches -> (num_patches, D) in weight's dtype.

    patches are flattened in (C, P, P) order, so weight = conv.weight.reshape(D, -1) of a
    Conv2d(C, D, P, stride=P) gives the conv's result. uint8 patches are normalized as
    (x / 255 − mean[c]) / std[c] (mean, std: one float per channel, required); float patches must have
    weight's dtype and are used as is. Differentiable w.r.t. weight, bias and float patches.
    float64 weights (a testing dtype: the kernels accumulate in fp32) always run the PyTorch reference.
    uint8 patches take one of two strategies, chosen by timing on CUDA or named by FINEVIT_PATCH_EMBED
    ("fused", "two_pass"; module docstring).
    """
    _check_inputs(patches, weight, bias, mean, std)
    if not _dispatch.use_triton("patch_embed", weight.device) or weight.dtype == torch.float64:
        return reference.patch_embed(patches, weight, bias, mean=mean, std=std)
    norm, features_per_channel = None, 1
    if patches.dtype == torch.uint8:
        if torch.compiler.is_compiling():  # traced once into a graph constant
            norm = _scale_shift(mean, std, weight.device)
        else:
            norm = _cached_scale_shift(tuple(map(float, mean)), tuple(map(float, std)), weight.device)
        features_per_channel = patches.shape[1] // len(mean)
        if _strategy(patches, weight, bias, norm, features_per_channel) == "two_pass":
            return _normalize_then_linear(patches, weight, bias, norm, features_per_channel)
    return patch_embed_fwd(patches, weight, bias, norm, features_per_channel)
