"""Standalone rotary embedding (rotate-half RoPE) as one Triton kernel, forward and backward.

Shapes and layout:
    x:        (total_tokens, num_heads, head_dim), fp16 / bf16 / fp32 (fp64 works too, computed in fp64).
              The channel dim must be contiguous; the token and head strides are arbitrary, so x may be a
              view of a fused projection, e.g. `qkv.view(T, 3, H, D).unbind(1)[0]`. Stride 0 is fine.
    cos, sin: float32 (total_tokens, r // 2) with even r <= head_dim, channel dim contiguous, any row stride.
    output:   a new contiguous tensor of x's shape and dtype; x is never written.

Forward (rotate-half on the first r channels, the rest copied through; fp32 math, cast back on store):
    x1 = x[..., :r/2], x2 = x[..., r/2:r]
    x1' = x1·cos − x2·sin
    x2' = x2·cos + x1·sin
Backward: the output is linear in x with the rotation [[cos, −sin], [sin, cos]] as its Jacobian, so the
gradient w.r.t. x is the transposed (conjugate) rotation of the incoming gradient, i.e. the same kernel
with sin -> −sin (`CONJUGATE=True`):
    dx1 = dy1·cos + dy2·sin
    dx2 = dy2·cos − dy1·sin
The incoming gradient's token/head strides are honoured (`out.sum()` hands over stride 0 everywhere); one
whose channel dim is not contiguous is copied to a contiguous tensor first.
The gradient w.r.t. cos and sin (rarely needed: tables are usually built from integer positions) is a
reduction over heads done with torch ops, and only when cos or sin requires grad.

Semantics are Qwen2-VL's `apply_rotary_pos_emb_vision` with its duplicated cos/sin halves removed (see
`finevit.kernels.reference.apply_rope`); the one-kernel-with-a-CONJUGATE-flag design follows
flash-attention's `flash_attn/ops/triton/rotary.py`. Unlike that kernel, one program rotates a tile of
BLOCK_T tokens × BLOCK_H heads, so each cos/sin row is loaded once and reused by every head of the tile.

The kernel is bandwidth-bound (read x once, write the output once, cos/sin amortized over heads), so the
tile sizes come from a fixed heuristic rather than autotuning: the tile holds ~4K rotated elements, which
keeps 4 warps busy with vectorized loads while the tile shape depends only on (num_heads, head_dim), never
on the token count, so ragged batches under torch.compile reuse one compiled kernel. Strides come divided by
ALIGN (x, out) and TABLE_ALIGN (cos, sin), the largest powers of two up to 16 bytes that divide them
(`_dispatch.alignment`): at head dim 72 the head stride of 72 elements would otherwise hide every row's
alignment from Triton and make each element a 2-byte access.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _dispatch, reference
from ._validation import FLOAT_DTYPES, check_cos_sin, check_int, check_positive_float, check_tensor, fail

# ----------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _load_pairs(x_rows, rows_mask, START: tl.constexpr, REAL: tl.constexpr, WIDTH: tl.constexpr,
                ROTARY_HALF: tl.constexpr):
    """Both halves of the REAL rotate-half pairs from pair START of every row of the tile, each a
    (BLOCK_T, BLOCK_H, WIDTH) tile (lanes past REAL read 0)."""
    offs = START + tl.arange(0, WIDTH)
    mask = rows_mask & (offs < START + REAL)[None, None, :]
    x1 = tl.load(x_rows + offs[None, None, :], mask=mask, other=0.0)
    x2 = tl.load(x_rows + ROTARY_HALF + offs[None, None, :], mask=mask, other=0.0)
    return x1, x2


@triton.jit
def _rotate_store(out_rows, rows_mask, x1, x2, COS, SIN, offs_t, mask_t, stride_cos_tok, stride_sin_tok,
                  START: tl.constexpr, REAL: tl.constexpr, WIDTH: tl.constexpr, ROTARY_HALF: tl.constexpr,
                  CONJUGATE: tl.constexpr):
    """Rotate the pairs that `_load_pairs` loaded by their tokens' angles and store them in OUT's dtype.
    cos/sin rows are (BLOCK_T, WIDTH), broadcast over the tile's heads; masked lanes rotate by the identity."""
    offs = START + tl.arange(0, WIDTH)
    lanes = offs < START + REAL
    cs_mask = mask_t[:, None] & lanes[None, :]
    cos = tl.load(COS + offs_t[:, None] * stride_cos_tok + offs[None, :], mask=cs_mask, other=1.0)
    sin = tl.load(SIN + offs_t[:, None] * stride_sin_tok + offs[None, :], mask=cs_mask, other=0.0)
    if CONJUGATE:
        sin = -sin
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    # Multiplying by the fp32 tables promotes fp16/bf16 to fp32 (fp64 stays fp64): the math is in >= fp32.
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    mask = rows_mask & lanes[None, None, :]
    tl.store(out_rows + offs[None, None, :], out1.to(out_rows.dtype.element_ty), mask=mask)
    tl.store(out_rows + ROTARY_HALF + offs[None, None, :], out2.to(out_rows.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    # pointers
    X,
    COS,
    SIN,
    OUT,
    # sizes
    num_tokens,
    num_heads,
    # strides (the channel dim is contiguous everywhere): x's and out's in units of ALIGN elements, the tables' in
    # units of TABLE_ALIGN elements, so that Triton knows where rows start (`_dispatch.alignment`)
    stride_x_tok,
    stride_x_head,
    stride_out_tok,
    stride_out_head,
    stride_cos_tok,
    stride_sin_tok,
    # constexprs: tile shapes must be compile-time powers of two (tl.arange), and ROTARY_HALF / HEAD_DIM /
    # CONJUGATE fix offsets and signs that the compiler folds into the address and FMA code
    ROTARY_HALF: tl.constexpr,  # r / 2: channel j pairs with channel j + r/2
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_H: tl.constexpr,  # heads per program (all share the tile's cos/sin rows)
    BLOCK_PAIRS: tl.constexpr,  # the largest power of two <= ROTARY_HALF: pairs [0, BLOCK_PAIRS), no masked lane
    BLOCK_REST: tl.constexpr,  # next power of two >= ROTARY_HALF - BLOCK_PAIRS (0 if none): the other pairs
    BLOCK_PASS: tl.constexpr,  # next power of two >= HEAD_DIM - 2·ROTARY_HALF, 0 when nothing passes through
    CONJUGATE: tl.constexpr,  # rotate by −angle (the backward)
    ALIGN: tl.constexpr,
    TABLE_ALIGN: tl.constexpr,
):
    stride_x_tok, stride_x_head = stride_x_tok * ALIGN, stride_x_head * ALIGN
    stride_out_tok, stride_out_head = stride_out_tok * ALIGN, stride_out_head * ALIGN
    stride_cos_tok, stride_sin_tok = stride_cos_tok * TABLE_ALIGN, stride_sin_tok * TABLE_ALIGN
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    # int64 token index: tokens × stride_x_tok passes 2^31 for large packed batches of fused qkv views.
    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_t = offs_t < num_tokens
    mask_h = offs_h < num_heads

    # (BLOCK_T, BLOCK_H, 1) row starts of every (token, head) of the tile
    x_rows = X + offs_t[:, None, None] * stride_x_tok + offs_h[None, :, None] * stride_x_head
    out_rows = OUT + offs_t[:, None, None] * stride_out_tok + offs_h[None, :, None] * stride_out_head
    rows_mask = mask_t[:, None, None] & mask_h[None, :, None]

    # x first: its loads are in flight while cos/sin are loaded and broadcast over the heads (a layout
    # change through shared memory, behind barriers that the x loads would otherwise wait for: two memory
    # latencies per program instead of one).
    x1, x2 = _load_pairs(x_rows, rows_mask, 0, BLOCK_PAIRS, BLOCK_PAIRS, ROTARY_HALF)
    if BLOCK_REST > 0:
        rest1, rest2 = _load_pairs(x_rows, rows_mask, BLOCK_PAIRS, ROTARY_HALF - BLOCK_PAIRS, BLOCK_REST,
                                   ROTARY_HALF)
    if BLOCK_PASS > 0:  # channels [r, head_dim) are copied through bit for bit
        offs_p = 2 * ROTARY_HALF + tl.arange(0, BLOCK_PASS)
        pass_mask = rows_mask & (offs_p < HEAD_DIM)[None, None, :]
        passed = tl.load(x_rows + offs_p[None, None, :], mask=pass_mask)

    _rotate_store(out_rows, rows_mask, x1, x2, COS, SIN, offs_t, mask_t, stride_cos_tok, stride_sin_tok,
                  0, BLOCK_PAIRS, BLOCK_PAIRS, ROTARY_HALF, CONJUGATE)
    if BLOCK_REST > 0:
        _rotate_store(out_rows, rows_mask, rest1, rest2, COS, SIN, offs_t, mask_t, stride_cos_tok,
                      stride_sin_tok, BLOCK_PAIRS, ROTARY_HALF - BLOCK_PAIRS, BLOCK_REST, ROTARY_HALF, CONJUGATE)
    if BLOCK_PASS > 0:
        tl.store(out_rows + offs_p[None, None, :], passed, mask=pass_mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

_ROTATED_PAIRS_PER_PROGRAM = 2048  # ×2 channels ≈ 4K elements: 32 per thread at 4 warps
_MAX_BLOCK_H = 16


def _power_of_2_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _block_sizes(num_heads: int, head_dim: int, rotary_half: int) -> dict[str, int]:
    """Tile shape from (num_heads, head_dim, r/2) only, so the token count never triggers a recompile.

    The r/2 pairs of a row are split into a power-of-two part and a remainder (36 -> 32 + 4, 40 -> 32 + 8),
    each its own power-of-two tile, so that at head dims like 72 and 80 no thread holds only masked lanes
    (one tile of next_power_of_2(r/2) = 64 lanes left 44 % and 38 % of them empty).
    """
    block_pairs = _power_of_2_at_most(rotary_half)
    block_rest = triton.next_power_of_2(rotary_half - block_pairs) if rotary_half > block_pairs else 0
    num_pass = head_dim - 2 * rotary_half
    block_h = min(triton.next_power_of_2(num_heads), _MAX_BLOCK_H)
    block_t = _power_of_2_at_most(max(1, _ROTATED_PAIRS_PER_PROGRAM // (block_h * (block_pairs + block_rest))))
    return {
        "BLOCK_T": block_t,
        "BLOCK_H": block_h,
        "BLOCK_PAIRS": block_pairs,
        "BLOCK_REST": block_rest,
        "BLOCK_PASS": triton.next_power_of_2(num_pass) if num_pass > 0 else 0,
    }


def rope_fwd(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    conjugate: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotates x (T, H, D) by the angles of cos/sin (T, r/2) — by their negatives with `conjugate` — into
    `out` (any (T, H, D) tensor of x's dtype with a contiguous channel dim, not overlapping x), by default
    a new contiguous tensor. Asserts the layout contract of the module docstring; no host syncs."""
    assert x.ndim == 3 and x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64), (
        f"x must be a (T, H, D) float tensor, got {x.dtype} of shape {tuple(x.shape)}")
    total_tokens, num_heads, head_dim = x.shape
    rotary_half = cos.shape[-1]
    assert cos.dtype == sin.dtype == torch.float32, f"cos/sin must be float32, got {cos.dtype}, {sin.dtype}"
    assert cos.shape == sin.shape == (total_tokens, rotary_half), (
        f"cos/sin must be (T={total_tokens}, r/2), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    assert 1 <= rotary_half and 2 * rotary_half <= head_dim, f"r/2={rotary_half} does not fit head_dim={head_dim}"
    assert x.stride(-1) == 1, f"x's channel dim must be contiguous, got strides {x.stride()}"
    assert rotary_half == 1 or cos.stride(-1) == sin.stride(-1) == 1, "cos/sin's channel dim must be contiguous"

    if out is None:
        out = torch.empty((total_tokens, num_heads, head_dim), dtype=x.dtype, device=x.device)
    assert out.shape == x.shape and out.dtype == x.dtype and out.stride(-1) == 1, (
        f"out must be a {tuple(x.shape)} {x.dtype} tensor with a contiguous channel dim, got "
        f"{out.dtype} of shape {tuple(out.shape)}, strides {out.stride()}")
    if out.numel() == 0:
        return out
    blocks = _block_sizes(num_heads, head_dim, rotary_half)
    grid = (triton.cdiv(total_tokens, blocks["BLOCK_T"]), triton.cdiv(num_heads, blocks["BLOCK_H"]))
    align, strides = _dispatch.strides_in_units(x, out)
    table_strides = (cos.stride(0), sin.stride(0))
    table_align = _dispatch.alignment(*table_strides, limit=4)  # float32 elements
    wrap_triton(_rope_kernel)[grid](
        x, cos, sin, out,
        total_tokens, num_heads,
        *strides,
        *(s // table_align for s in table_strides),
        ROTARY_HALF=rotary_half,
        HEAD_DIM=head_dim,
        CONJUGATE=conjugate,
        ALIGN=align,
        TABLE_ALIGN=table_align,
        num_warps=4,
        **blocks,
    )
    return out


# ----------------------------------------------------------------------------------------------------
# torch.library registration (eager, torch.compile, FakeTensor) and autograd
# ----------------------------------------------------------------------------------------------------


@triton_op("finevit::apply_rope", mutates_args=())
def _apply_rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, conjugate: bool) -> torch.Tensor:
    return rope_fwd(x, cos, sin, conjugate=conjugate)


@_apply_rope_op.register_fake
def _(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, conjugate: bool) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output) -> None:
    x, cos, sin, conjugate = inputs
    ctx.conjugate = conjugate
    # x is needed only for the (rare) gradient w.r.t. the tables.
    tables_need_grad = cos.requires_grad or sin.requires_grad
    ctx.save_for_backward(cos, sin, x if tables_need_grad else None)


def _backward(ctx, grad_out: torch.Tensor):
    cos, sin, x = ctx.saved_tensors
    grad_x = grad_cos = grad_sin = None
    if ctx.needs_input_grad[0]:
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        # The backward of a rotation is the opposite rotation: the same op with the flag flipped (so it is
        # itself differentiable, for double backward).
        grad_x = _apply_rope_op(grad_out, cos, sin, not ctx.conjugate)
    if x is not None:
        # y1 = x1·cos − s·x2·sin, y2 = x2·cos + s·x1·sin with s = ±1: reduce over heads.
        half = cos.shape[-1]
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        g1, g2 = grad_out[..., :half].to(compute), grad_out[..., half : 2 * half].to(compute)  # (T, H, r/2)
        x1, x2 = x[..., :half].to(compute), x[..., half : 2 * half].to(compute)
        sign = -1.0 if ctx.conjugate else 1.0
        grad_cos = (g1 * x1 + g2 * x2).sum(dim=1).to(cos.dtype)  # (T, r/2)
        grad_sin = (sign * (g2 * x1 - g1 * x2)).sum(dim=1).to(sin.dtype)
    return grad_x, grad_cos, grad_sin, None


_apply_rope_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Public functions: apply_rope, and the cos/sin tables it takes
# ----------------------------------------------------------------------------------------------------


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on x, the same rotation `varlen_attention` fuses; differentiable w.r.t. x (and cos, sin).

    Arguments:
        x: (total_tokens, num_heads, head_dim), fp16 / bf16 / fp32, channel dim contiguous; token and head
            strides are free (a view of a fused (T, 3, H, D) qkv projection works without a copy).
        cos, sin: float32 (total_tokens, rotary_dim // 2) with even rotary_dim <= head_dim, channel dim
            contiguous; build them with `rope_2d_cos_sin` (images) / `rope_1d_cos_sin` (text).
    Returns:
        A new contiguous (total_tokens, num_heads, head_dim) tensor in x's dtype: with r = rotary_dim,
        x1 = x[..., :r/2], x2 = x[..., r/2:r], it holds x1·cos − x2·sin, x2·cos + x1·sin, then x[..., r:]
        unchanged. Computed in fp32. The backward is the conjugate rotation (sin -> −sin).
    """
    check_tensor("apply_rope", "x", x, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_cos_sin("apply_rope", cos, sin, x.shape[0], x.shape[2], x.device)
    if not _dispatch.use_triton("apply_rope", x.device):
        return reference.apply_rope(x, cos, sin)
    return _apply_rope_op(x, cos, sin, False)


def _check_table_inputs(op: str, positions, head_dim, theta, rotary_dim, *, axes: int) -> None:
    """A cos/sin builder's inputs. `axes`: 1 (text positions) or 2 (image (row, col) positions)."""
    shape = "(total_tokens, 2)" if axes == 2 else "(total_tokens,)"
    check_tensor(op, "positions", positions, ndim=2 if axes == 2 else 1, dtypes=(torch.int32, torch.int64))
    if axes == 2 and positions.shape[1] != 2:
        fail(op, f"positions must have shape {shape} holding (row, col), got {tuple(positions.shape)}")
    check_int(op, "head_dim", head_dim, minimum=1)
    check_positive_float(op, "theta", theta)
    r = head_dim if rotary_dim is None else rotary_dim
    check_int(op, "rotary_dim", r, minimum=1)
    # Each axis needs whole rotate-half pairs: 2 channels per frequency, `axes` angle groups.
    multiple = 2 * axes
    if r % multiple or r > head_dim:
        fail(op, f"rotary_dim must be a multiple of {multiple} and <= head_dim={head_dim}, got {r}")


def rope_2d_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, rotary_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables for 2D RoPE from patch positions, equal to Qwen2-VL's vision rotary embedding.

    positions: int (total_tokens, 2) = (row, col) of each patch in its image. With r = rotary_dim or
    head_dim (a multiple of 4), inv_freq = theta ** (-arange(0, r/2, 2) / (r/2)) and the angles are
    [row·inv_freq | col·inv_freq]. Returns float32 cos, sin of shape (total_tokens, r/2).
    """
    _check_table_inputs("rope_2d_cos_sin", positions, head_dim, theta, rotary_dim, axes=2)
    return reference.rope_2d_cos_sin(positions, head_dim, theta, rotary_dim)


def rope_1d_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, rotary_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables for 1D (text) RoPE: positions int (total_tokens,), r = rotary_dim or head_dim (even),
    inv_freq = theta ** (-arange(0, r, 2) / r), angles positions·inv_freq -> float32 (total_tokens, r/2).
    """
    _check_table_inputs("rope_1d_cos_sin", positions, head_dim, theta, rotary_dim, axes=1)
    return reference.rope_1d_cos_sin(positions, head_dim, theta, rotary_dim)
