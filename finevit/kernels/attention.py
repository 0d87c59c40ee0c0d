"""Varlen (packed) non-causal attention with fused rotary embedding: Triton forward and backward.

Shapes (docs/design.md): q, k, v, o: (total_tokens, num_heads, head_dim), any token/head strides, last dim
contiguous; cu_seqlens int32 (num_seqs + 1,); cos, sin float32 (total_tokens, rotary_dim // 2); the
saved log-sum-exp `lse` is float32 (num_heads, total_tokens), in the log2 domain.

Forward (FA2, exp2 domain): per (sequence, q-block, head) program, loop over the sequence's k-blocks:
    s = q̃ k̃ᵀ · scale · log2(e);  m' = max(m, rowmax s);  p = 2^(s − m');  l = l·2^(m − m') + rowsum p
    acc = acc·2^(m − m') + p v;   finally o = acc / l,  lse = m + log2 l.
Backward (FA2 recompute; by default deterministic, no atomics):
    δ = rowsum(dO ∘ O)                                         (_attn_bwd_preprocess_kernel)
    p = 2^(s − lse),  dV = pᵀ dO,  dP = dO vᵀ,  dS = p ∘ (dP − δ),  dK̃ = scale · dSᵀ q̃
                                                               (_attn_bwd_dkdv_kernel: owns a k-block)
    dQ̃ = scale · dS k̃                                         (_attn_bwd_dq_kernel: owns a q-block)
The dQ kernel recomputes q·kᵀ and dO·vᵀ: 7 matmuls per (q-block, k-block) pair, against 2 in the forward.
With deterministic=False the dK/dV kernel also computes dQ̃ᵀ += k̃ᵀ·dSᵀ (5 matmuls per pair) and adds it into a
float32 (heads, channels, tokens) buffer with atomic adds (`_atomic_add_dot_t`), and `_attn_bwd_dq_store_kernel`
scales it, rotates it back and stores it; the order of the additions, so dQ's rounding, varies between runs.
Rotary embedding (rotate-half, Qwen2-VL), fused where it is cheap: the forward rotates q and k once with
the RoPE kernel (`rope.py`) into q̃, k̃, which autograd keeps for the backward; the backward kernels load
them as they are and apply the conjugate rotation to dQ̃, dK̃ in registers just before the store (each
program owns those rows, so that costs one rotation per row, not one per tile):
    x1' = x1·cos − x2·sin,  x2' = x2·cos + x1·sin;   dx1 = dx̃1·cos + dx̃2·sin,  dx2 = dx̃2·cos − dx̃1·sin.
The first version rotated q̃, k̃ in registers as every tile was loaded. That re-rotates each k (forward,
dQ) or q (dK/dV) tile once per program of its sequence, with two fp32 table loads per pair inside the
loop that should be tensor-core bound: on an H100 (d64, 1024-patch images) it made the forward kernel 60%
and the backward kernels 70-84% slower than the same kernels without RoPE (bench/NOTES.md, 2026-11-26).

Head dims that are not powers of two (72, 80, 88, ...) without padding to the next power of two:
`tl.dot` needs power-of-two tiles, but q·kᵀ is a sum over channels, so the channels may be grouped
into several power-of-two chunks whose dot products are added (any grouping used identically for q
and k). In the backward a rotary pair (i, i + r/2) must sit in one chunk, so rotary channels are
grouped by pairs there: a chunk of P pairs holds x1[i:i+P] and x2[i:i+P], interleaved by `tl.join`, so
that its gradient can be rotated back in registers. Chunks are at least 16 channels wide (the smallest
dot); a remainder is padded (masked):
    head_dim 72 -> 64 + 16 (8 real) = 80 of work;  80 -> 64 + 16 = 80;  88 -> 64 + 16 + 16 = 96;
    96 -> 64 + 32;  128 -> 128;  256 -> 128 + 128,
against 96 for 72/80/88 in FA2/FA3, whose kernels round head dims up to a multiple of 32. v and o
have no rotation and are split the same way by plain channel ranges. The plan is computed on the host
(`_chunk_plans`) and passed as two constexpr tuples, QK_CHUNKS and V_CHUNKS, of one (PAIRS, START, REAL, WIDTH)
per chunk (ROT_HALF = rotary_dim / 2 says where x2 starts), so power-of-two head dims compile to a single
chunk. In the kernels a block split by a plan is a tuple of tiles, one per chunk, and jit helpers unroll
the plan at compile time (`tl.static_range`): `_load_chunks` (load), `_load_dot_t` (load and q·kᵀ, the
scores), `_load_dot_t_acc`, `_load_rescale_acc`, `_dot_acc` (the products into per-chunk accumulators),
`_store_chunks` and `_store_grad_chunks` (store).

Ragged scheduling: instead of a (cdiv(max_seqlen, BLOCK), heads, num_seqs) grid, which launches
empty programs for every short sequence, the grid is a flat list of (sequence, block) work items times the
heads: `cu_blocks` (`_cu_blocks_kernel`: one small kernel, no host sync) holds the sequences in dispatch order
and their cumulative block counts, and each program binary-searches it. The grid size (cdiv(total_tokens,
BLOCK) + num_seqs) · heads is an upper bound known from shapes alone; programs past the last item return at once.
The order is longest sequences first (by octave of length), heads fastest: GPUs start programs in grid order as
slots free up, so this is the longest-processing-time-first schedule a persistent kernel would build with an
atomic work counter, and the shortest programs fill the last wave. Packing order instead can leave a long
sequence's programs for last, each costing up to 16× a short one (4096 vs 256 patches): in a simulation of the
dispatch (bench/schedule.py) mixed batches ran 2-7% over the ideal in packing order, 0.2-2% longest first.

Strides are passed divided by ALIGN, the largest power of two (at most 16 bytes of elements) that divides
them all, and multiplied back by the constexpr in the kernels (`_dispatch.alignment`). Triton specializes
integer arguments only on divisibility by 16, so a head stride of 72 (SigLIP so400m) told it nothing and every
q/k/v element at head dims 72 and 88 was a synchronous 2-byte load; with ALIGN = 8 they are 16-byte vectors
through cp.async, as at 64 or 128. The cos/sin row stride likewise comes in units of TABLE_ALIGN.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _dispatch, reference
from ._autotune import autotune, configs
from ._validation import FLOAT_DTYPES, check_cos_sin, check_cu_seqlens, check_positive_float, check_tensor, fail
from .rope import rope_fwd

LOG2E = 1.4426950408889634
CU_BLOCK_SIZES = (16, 32, 64, 128)  # block sizes that the `cu_blocks` table has a row for
ORDER_ROW = tl.constexpr(len(CU_BLOCK_SIZES))  # the `cu_blocks` row of the sequences in dispatch order
NUM_QK_CHUNKS, NUM_V_CHUNKS = 4, 3  # the most chunks a q/k and a v/o plan may have


# ----------------------------------------------------------------------------------------------------
# Kernels: helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _find_work_item(CU_SEQLENS, CU_BLOCKS, num_seqs, num_heads, BLOCK: tl.constexpr):
    """Map this program to (valid, first token of its sequence, sequence length, block index, head).

    Programs run heads fastest: program p takes head p % num_heads of work item p // num_heads, the
    (sequence, block) pairs of the `_cu_blocks_kernel` work list, longest sequences first.
    """
    pid = tl.program_id(0)
    work = pid // num_heads
    head = pid % num_heads
    if BLOCK == 16:
        size_index = 0
    elif BLOCK == 32:
        size_index = 1
    elif BLOCK == 64:
        size_index = 2
    else:
        tl.static_assert(BLOCK == 128)
        size_index = 3
    row = CU_BLOCKS + size_index * (num_seqs + 1)
    valid = work < tl.load(row + num_seqs)
    # Binary search for the last slot of the order whose first block is <= work (empty sequences own no block).
    lo = 0
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        take = tl.load(row + mid) <= work
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid)
    block = work - tl.load(row + lo)
    seq = tl.load(CU_BLOCKS + ORDER_ROW * (num_seqs + 1) + lo)
    seq_start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - seq_start
    return valid, seq_start.to(tl.int64), seqlen, block, head.to(tl.int64)


@triton.jit
def _in_elements(ALIGN: tl.constexpr, a, b, c, d):
    """Four strides given in units of ALIGN elements, in elements: products by a constexpr, so Triton knows each
    is a multiple of ALIGN (and the rows and heads they address start on ALIGN-element boundaries)."""
    return a * ALIGN, b * ALIGN, c * ALIGN, d * ALIGN


@triton.jit
def _load_chunk(X, stride_x_tok, rows, mask_rows,
                ROT_HALF: tl.constexpr, PAIRS: tl.constexpr, START: tl.constexpr, REAL: tl.constexpr,
                WIDTH: tl.constexpr):
    """One (len(rows), WIDTH) channel chunk (PAIRS, START, REAL, WIDTH) of X's `rows` (int32 offsets from
    the sequence's first token, whose address is already folded into X), in X's dtype.

    PAIRS: the chunk holds REAL rotate-half pairs from pair START (x1 channels START.., x2 channels
    ROT_HALF + START..), interleaved as [x1_0, x2_0, x1_1, x2_1, ...] (the same permutation for q and k
    leaves q·kᵀ unchanged). Otherwise: REAL plain channels from channel START. Rows outside `mask_rows`
    and channels past REAL are zeros.

    Every chunk is a row-masked load of contiguous channels (two for a pair chunk, joined): Triton sees the
    contiguity, loads 16-byte vectors and pipelines them through shared memory (cp.async, `num_stages`). A partial
    chunk (head dim 72's 8 of 16, 88's 8 of 16) reads channel START + (c mod REAL) in lane c, its real channels
    again, which keeps every address in bounds and REAL-wide runs contiguous, and `tl.where` zeroes the padding
    lanes. Masks are never channel-varying: on an H100 with triton 3.6, loads of partial chunks with masks that
    varied along the channels hit illegal addresses (bench/NOTES.md, 2026-11-26); the workaround that clamped
    every address instead (`tl.where` on the offsets) hid the contiguity and made every element a synchronous
    2-byte load, which the mod form does not.
    """
    if PAIRS:
        offs = tl.arange(0, WIDTH // 2)
        if REAL < WIDTH // 2:
            offs = offs % REAL
        ptr = X + rows[:, None] * stride_x_tok + (START + offs)[None, :]
        x1 = tl.load(ptr, mask=mask_rows[:, None], other=0.0)
        x2 = tl.load(ptr + ROT_HALF, mask=mask_rows[:, None], other=0.0)
        x = tl.reshape(tl.join(x1, x2), (rows.shape[0], WIDTH))  # (N, WIDTH / 2, 2) -> (N, WIDTH)
        if REAL < WIDTH // 2:
            # Zero after the interleave, with a mask of the interleaved layout (channel c holds pair c // 2).
            # Zeroing x1 and x2 before `tl.join` is the same math, but triton <= 3.6 cannot compile it where the
            # tile feeds `tl.dot` both as it is and transposed (the backward's q and k tiles): its
            # TritonGPUOptimizeDotOperands pass builds an illegal shared layout for the reshaped buffer
            # ("expected collapsed shapePerCTA to be at least [8, 32]").
            x = tl.where(((tl.arange(0, WIDTH) // 2) < REAL)[None, :], x, tl.zeros_like(x))
        return x
    else:
        offs = tl.arange(0, WIDTH)
        if REAL < WIDTH:
            offs = offs % REAL
        x = tl.load(X + rows[:, None] * stride_x_tok + (START + offs)[None, :], mask=mask_rows[:, None], other=0.0)
        if REAL < WIDTH:
            x = tl.where((tl.arange(0, WIDTH) < REAL)[None, :], x, tl.zeros_like(x))
        return x


@triton.jit
def _store_chunk(X, stride_x_tok, rows, mask_rows, value, PAIRS: tl.constexpr, START: tl.constexpr,
                 REAL: tl.constexpr, WIDTH: tl.constexpr):
    """Store a float32 (len(rows), WIDTH) chunk of plain channels START.. (REAL of them) in X's dtype."""
    tl.static_assert(not PAIRS, "o and dV chunks are plain channel ranges")
    offs = tl.arange(0, WIDTH)
    mask = mask_rows[:, None] & (offs < REAL)[None, :]
    tl.store(X + rows[:, None] * stride_x_tok + START + offs[None, :], value.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _store_grad_chunk(X, stride_x_tok, rows, mask_rows, value, COS, SIN, stride_cs_tok,
                      ROT_HALF: tl.constexpr, PAIRS: tl.constexpr, START: tl.constexpr, REAL: tl.constexpr,
                      WIDTH: tl.constexpr):
    """Store a float32 gradient chunk of q̃ or k̃ laid out as `_load_chunk` loads it, as the gradient of the
    unrotated q or k: pair chunks are rotated back (the conjugate rotation) before the store."""
    if PAIRS:
        offs = tl.arange(0, WIDTH // 2)
        mask = mask_rows[:, None] & (offs < REAL)[None, :]
        g1, g2 = tl.split(tl.reshape(value, (rows.shape[0], WIDTH // 2, 2)))
        cs = rows[:, None] * stride_cs_tok + START + offs[None, :]
        cos = tl.load(COS + cs, mask=mask, other=1.0)
        sin = tl.load(SIN + cs, mask=mask, other=0.0)
        ptr = X + rows[:, None] * stride_x_tok + START + offs[None, :]
        tl.store(ptr, (g1 * cos + g2 * sin).to(X.dtype.element_ty), mask=mask)
        tl.store(ptr + ROT_HALF, (g2 * cos - g1 * sin).to(X.dtype.element_ty), mask=mask)
    else:
        _store_chunk(X, stride_x_tok, rows, mask_rows, value, PAIRS, START, REAL, WIDTH)


@triton.jit
def _zero_chunk(ROWS: tl.constexpr, PAIRS: tl.constexpr, START: tl.constexpr, REAL: tl.constexpr,
                WIDTH: tl.constexpr):
    """A float32 (ROWS, WIDTH) accumulator for one chunk (it takes the whole chunk, as `*CHUNKS[c]`)."""
    return tl.zeros([ROWS, WIDTH], dtype=tl.float32)


# Tiles split by a chunk plan travel as tuples, one (rows, WIDTH) tile per chunk of the plan, in its order. The
# helpers below loop over the plan with `tl.static_range` (unrolled at compile time) and hand each chunk's
# constexprs to the one-chunk helpers above as `*CHUNKS[c]`: in triton 3.6, indexing a constexpr tuple gives plain
# Python values, which a jit function accepts as separate constexpr arguments but not inside a tuple.
# Where a loop loads a block and multiplies it, one helper does both, chunk by chunk (load chunk c, then its
# products): that is the order of the slot-by-slot kernels these replaced (their TTIR is the same op for op), and
# Triton's scheduling follows it. Loading every chunk first, then multiplying, moved registers per thread by -54 to
# +10, added 1-2 KB of shared memory and made two spill-free backward tiles spill (bf16 d80 + RoPE, triton 3.8).


@triton.jit
def _load_chunks(X, stride_x_tok, rows, mask_rows, ROT_HALF: tl.constexpr, CHUNKS: tl.constexpr):
    """X's `rows` split by the plan CHUNKS: a tuple of (len(rows), WIDTH) tiles in X's dtype (`_load_chunk`)."""
    tiles = ()
    for c in tl.static_range(len(CHUNKS)):
        tiles = tiles + (_load_chunk(X, stride_x_tok, rows, mask_rows, ROT_HALF, *CHUNKS[c]),)
    return tiles


@triton.jit
def _zero_chunks(ROWS: tl.constexpr, CHUNKS: tl.constexpr):
    """float32 zeros for ROWS rows split by the plan CHUNKS: one (ROWS, WIDTH) accumulator per chunk."""
    acc = ()
    for c in tl.static_range(len(CHUNKS)):
        acc = acc + (_zero_chunk(ROWS, *CHUNKS[c]),)
    return acc


@triton.jit
def _load_dot_t(a, B, stride_b_tok, rows_b, mask_b, ROT_HALF: tl.constexpr, CHUNKS: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """(a·bᵀ, b): b = B's `rows_b` loaded by the plan CHUNKS (as `_load_chunks`), a the same plan's tiles of
    other rows, and a·bᵀ = Σ_c a[c]·b[c]ᵀ in float32, (rows of a, len(rows_b))."""
    b = (_load_chunk(B, stride_b_tok, rows_b, mask_b, ROT_HALF, *CHUNKS[0]),)
    s = tl.dot(a[0], tl.trans(b[0]), input_precision=DOT_PRECISION)
    for c in tl.static_range(1, len(CHUNKS)):
        b = b + (_load_chunk(B, stride_b_tok, rows_b, mask_b, ROT_HALF, *CHUNKS[c]),)
        s += tl.dot(a[c], tl.trans(b[c]), input_precision=DOT_PRECISION)
    return s, b


@triton.jit
def _load_dot_t_acc(a, B, stride_b_tok, rows_b, mask_b, p, acc, ROT_HALF: tl.constexpr, CHUNKS: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """(a·bᵀ, acc + p·b): `_load_dot_t`, and b also accumulated, p (rows of acc, len(rows_b)) float32 taken
    in B's dtype."""
    b0 = _load_chunk(B, stride_b_tok, rows_b, mask_b, ROT_HALF, *CHUNKS[0])
    out = (acc[0] + tl.dot(p.to(B.dtype.element_ty), b0, input_precision=DOT_PRECISION),)
    s = tl.dot(a[0], tl.trans(b0), input_precision=DOT_PRECISION)
    for c in tl.static_range(1, len(CHUNKS)):
        b_c = _load_chunk(B, stride_b_tok, rows_b, mask_b, ROT_HALF, *CHUNKS[c])
        out = out + (acc[c] + tl.dot(p.to(B.dtype.element_ty), b_c, input_precision=DOT_PRECISION),)
        s += tl.dot(a[c], tl.trans(b_c), input_precision=DOT_PRECISION)
    return s, out


@triton.jit
def _load_rescale_acc(acc, alpha, p, B, stride_b_tok, rows_b, mask_b, ROT_HALF: tl.constexpr,
                      CHUNKS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc·α + p·b, chunk by chunk: b = B's `rows_b` loaded by the plan CHUNKS, α (rows of acc,) scales each
    row of acc, p (rows of acc, len(rows_b)) is in B's dtype."""
    out = ()
    for c in tl.static_range(len(CHUNKS)):
        b_c = _load_chunk(B, stride_b_tok, rows_b, mask_b, ROT_HALF, *CHUNKS[c])
        out = out + (tl.dot(p, b_c, acc[c] * alpha[:, None], input_precision=DOT_PRECISION),)
    return out


@triton.jit
def _dot_acc(p, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + p·b, chunk by chunk: (acc[c] + p·b[c] for each chunk c), p (rows, n), b[c] (n, WIDTH)."""
    out = ()
    for c in tl.static_range(len(b)):
        out = out + (acc[c] + tl.dot(p, b[c], input_precision=DOT_PRECISION),)
    return out


@triton.jit
def _transpose_chunks(x):
    """The tuple of x's tiles, each transposed."""
    out = ()
    for c in tl.static_range(len(x)):
        out = out + (tl.trans(x[c]),)
    return out


@triton.jit
def _atomic_add_dot_t(ACC, stride_acc_chan, rows, mask_rows, b_t, p, DOT_PRECISION: tl.constexpr):
    """ACC[channels, rows] += (b_t[c]·p for each chunk c), b_t[c] (WIDTH, n), p (n, len(rows)), with atomic
    adds: ACC is float32 (channels, tokens), the chunks stacked along the channels in the plan's order and
    layout (a pair chunk interleaved as `_load_chunk` loads it), tokens contiguous."""
    channel = 0
    for c in tl.static_range(len(b_t)):
        part = tl.dot(b_t[c], p, input_precision=DOT_PRECISION)  # (WIDTH, len(rows))
        ptr = ACC + (channel + tl.arange(0, b_t[c].shape[0]))[:, None] * stride_acc_chan + rows[None, :]
        tl.atomic_add(ptr, part, mask=mask_rows[None, :], sem="relaxed")
        channel += b_t[c].shape[0]


@triton.jit
def _load_acc_chunks(ACC, stride_acc_chan, rows, mask_rows, CHUNKS: tl.constexpr):
    """`_atomic_add_dot_t`'s float32 accumulator at `rows`, as the plan's (len(rows), WIDTH) tiles."""
    tiles = ()
    channel = 0
    for c in tl.static_range(len(CHUNKS)):
        ptr = ACC + (channel + tl.arange(0, CHUNKS[c][3]))[:, None] * stride_acc_chan + rows[None, :]
        tiles = tiles + (tl.trans(tl.load(ptr, mask=mask_rows[None, :], other=0.0)),)
        channel += CHUNKS[c][3]
    return tiles


@triton.jit
def _store_chunks(X, stride_x_tok, rows, mask_rows, tiles, scale, CHUNKS: tl.constexpr):
    """Store float32 tiles split by the plain-channel plan CHUNKS, times `scale` (a scalar, or a (rows, 1)
    column that scales each row), into X's `rows`, in X's dtype."""
    for c in tl.static_range(len(CHUNKS)):
        _store_chunk(X, stride_x_tok, rows, mask_rows, tiles[c] * scale, *CHUNKS[c])


@triton.jit
def _store_grad_chunks(X, stride_x_tok, rows, mask_rows, tiles, scale, COS, SIN, stride_cs_tok,
                       ROT_HALF: tl.constexpr, CHUNKS: tl.constexpr):
    """Store float32 gradient tiles of q̃ or k̃ split by the plan CHUNKS, times `scale`, as the gradient of the
    unrotated q or k (`_store_grad_chunk`)."""
    for c in tl.static_range(len(CHUNKS)):
        _store_grad_chunk(X, stride_x_tok, rows, mask_rows, tiles[c] * scale, COS, SIN, stride_cs_tok, ROT_HALF,
                          *CHUNKS[c])


@triton.jit
def _cu_blocks_kernel(CU_SEQLENS, CU_BLOCKS, num_seqs, BLOCK_S: tl.constexpr):
    """The (sequence, block) work list of `_find_work_item`, built on the device (`_cu_blocks`, the C export).

    CU_BLOCKS is int32 (len(CU_BLOCK_SIZES) + 1, num_seqs + 1). Row ORDER_ROW holds the sequences longest
    first: sorted by octave of their length (bit length), descending, ties in packing order (the last entry is
    0, unused). Row i < ORDER_ROW holds 0, then the running sum of cdiv(seqlen, 16 << i) over that order.
    One program (grid (1,)), BLOCK_S sequences per step, three passes: count each octave, place each sequence
    (a counting sort), then scan the block counts in the new order.
    """
    order = CU_BLOCKS + ORDER_ROW * (num_seqs + 1)
    octaves = tl.arange(0, 32)  # bit lengths of int32 lengths (>= 0): 0..31
    # 1. Sequences per octave, then the first slot of each octave: all longer octaves come before it.
    counts = tl.zeros([32], dtype=tl.int32)
    for start in range(0, num_seqs, BLOCK_S):
        in_octave, _ = _octave_one_hot(CU_SEQLENS, start, num_seqs, octaves, BLOCK_S)
        counts += tl.sum(in_octave, 0)
    slot = tl.sum(tl.where(octaves[None, :] > octaves[:, None], counts[None, :], 0), 1)
    # 2. Each sequence's slot: its octave's next free slot plus its rank among this step's sequences of that octave.
    for start in range(0, num_seqs, BLOCK_S):
        in_octave, offs = _octave_one_hot(CU_SEQLENS, start, num_seqs, octaves, BLOCK_S)
        rank = tl.sum(tl.cumsum(in_octave, 0) * in_octave, 1) - 1
        tl.store(order + tl.sum(in_octave * slot[None, :], 1) + rank, offs, mask=offs < num_seqs)
        slot += tl.sum(in_octave, 0)
    tl.store(order + num_seqs, 0)
    tl.debug_barrier()  # the order's stores are visible to every thread of the program after this
    # 3. Block counts per block size in that order, scanned with a carry.
    sizes = 16 << tl.arange(0, ORDER_ROW)  # CU_BLOCK_SIZES
    rows = CU_BLOCKS + tl.arange(0, ORDER_ROW) * (num_seqs + 1)
    tl.store(rows, tl.zeros([ORDER_ROW], dtype=tl.int32))
    carry = tl.zeros([ORDER_ROW], dtype=tl.int32)
    for start in range(0, num_seqs, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        mask = offs < num_seqs
        seq = tl.load(order + offs, mask=mask, other=0)
        seqlen = tl.load(CU_SEQLENS + seq + 1, mask=mask, other=0) - tl.load(CU_SEQLENS + seq, mask=mask, other=0)
        blocks = (seqlen[:, None] + sizes[None, :] - 1) // sizes[None, :]  # (BLOCK_S, sizes), 0 for masked lanes
        tl.store(rows[None, :] + 1 + offs[:, None], tl.cumsum(blocks, 0) + carry[None, :], mask=mask[:, None])
        carry += tl.sum(blocks, 0)


@triton.jit
def _octave_one_hot(CU_SEQLENS, start, num_seqs, octaves, BLOCK_S: tl.constexpr):
    """(BLOCK_S, 32) int32: row j is the one-hot octave (bit length) of the length of sequence start + j (all
    zero past num_seqs), and those sequence indices."""
    offs = start + tl.arange(0, BLOCK_S)
    mask = offs < num_seqs
    seqlen = tl.load(CU_SEQLENS + offs + 1, mask=mask, other=0) - tl.load(CU_SEQLENS + offs, mask=mask, other=0)
    bit_length = tl.sum(((seqlen[:, None] >> octaves[None, :]) > 0).to(tl.int32), 1)
    bit_length = tl.where(mask, bit_length, -1)
    return (bit_length[:, None] == octaves[None, :]).to(tl.int32), offs


# ----------------------------------------------------------------------------------------------------
# Kernels: forward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_kernel(
    # pointers
    Q, K, V, O, LSE,
    # varlen metadata
    CU_SEQLENS, CU_BLOCKS, num_seqs, num_heads, total_tokens,
    # strides in units of ALIGN elements (last dims are contiguous)
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_o_tok, stride_o_head,
    # runtime scalars
    qk_scale,  # softmax_scale · log2(e)
    head_dim, max_seqlen_bucket,  # autotune keys only
    # constexprs: the channel-chunk plans of q/k and v/o (see the module docstring)
    ROT_HALF: tl.constexpr, QK_CHUNKS: tl.constexpr, V_CHUNKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32 rounding), ignored for fp16/bf16
    ALIGN: tl.constexpr,  # every stride is a multiple of ALIGN elements (`_dispatch.alignment`)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # tile sizes: constexpr so tiles live in registers
):
    valid, seq_start, seqlen, block, head = _find_work_item(CU_SEQLENS, CU_BLOCKS, num_seqs, num_heads,
                                                            BLOCK_M)
    if not valid:
        return
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head = _in_elements(ALIGN, stride_q_tok, stride_q_head,
                                                                      stride_k_tok, stride_k_head)
    stride_v_tok, stride_v_head, stride_o_tok, stride_o_head = _in_elements(ALIGN, stride_v_tok, stride_v_head,
                                                                      stride_o_tok, stride_o_head)
    # Fold the (int64) sequence start and head into the base pointers: tile offsets stay int32.
    Q += head * stride_q_head + seq_start * stride_q_tok
    K += head * stride_k_head + seq_start * stride_k_tok
    V += head * stride_v_head + seq_start * stride_v_tok
    O += head * stride_o_head + seq_start * stride_o_tok
    LSE += head * total_tokens + seq_start

    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seqlen

    # q chunks, kept in registers for the whole k loop (q and k arrive rotated when RoPE is on).
    q = _load_chunks(Q, stride_q_tok, offs_m, mask_m, ROT_HALF, QK_CHUNKS)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = _zero_chunks(BLOCK_M, V_CHUNKS)

    for start_n in range(0, seqlen, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seqlen
        s, _ = _load_dot_t(q, K, stride_k_tok, offs_n, mask_n, ROT_HALF, QK_CHUNKS, DOT_PRECISION)  # q·kᵀ
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        p = p.to(V.dtype.element_ty)

        acc = _load_rescale_acc(acc, alpha, p, V, stride_v_tok, offs_n, mask_n, ROT_HALF, V_CHUNKS,
                                DOT_PRECISION)  # acc·α + p·v

    inv_l = 1.0 / l_i
    _store_chunks(O, stride_o_tok, offs_m, mask_m, acc, inv_l[:, None], V_CHUNKS)  # o = acc / l
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=mask_m)


# ----------------------------------------------------------------------------------------------------
# Kernels: backward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    total_tokens,
    stride_o_tok, stride_o_head, stride_do_tok, stride_do_head,  # in units of ALIGN elements
    HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """δ[h, t] = Σ_d dO[t, h, d] · O[t, h, d] in float32; grid (cdiv(total_tokens, BLOCK_T), heads)."""
    stride_o_tok, stride_o_head, stride_do_tok, stride_do_head = _in_elements(ALIGN, stride_o_tok, stride_o_head,
                                                                        stride_do_tok, stride_do_head)
    head = tl.program_id(1).to(tl.int64)
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (tok < total_tokens)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + head * stride_o_head + tok[:, None] * stride_o_tok + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + head * stride_do_head + tok[:, None] * stride_do_tok + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * total_tokens + tok, delta, mask=tok < total_tokens)


@triton.jit
def _attn_bwd_dkdv_kernel(
    # pointers (DQ_ACC: float32 (heads, ACC_CHANNELS, total_tokens), read only with ACCUMULATE_DQ)
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, COS, SIN,
    # varlen metadata
    CU_SEQLENS, CU_BLOCKS, num_seqs, num_heads, total_tokens,
    # strides in units of ALIGN elements, the tables' (stride_cs_tok) in units of TABLE_ALIGN
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head, stride_dk_tok, stride_dk_head, stride_dv_tok, stride_dv_head, stride_cs_tok,
    # runtime scalars
    qk_scale, softmax_scale, head_dim, max_seqlen_bucket,
    # constexprs
    ROT_HALF: tl.constexpr, QK_CHUNKS: tl.constexpr, V_CHUNKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr, TABLE_ALIGN: tl.constexpr,
    ACCUMULATE_DQ: tl.constexpr, ACC_CHANNELS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program owns a k-block of one head: dK, dV accumulate in registers over the sequence's q-blocks.
    With ACCUMULATE_DQ (the non-deterministic backward) it also adds its share of dQ̃ᵀ = k̃ᵀ·dSᵀ (unscaled) into
    DQ_ACC with atomics, for `_attn_bwd_dq_store_kernel`."""
    valid, seq_start, seqlen, block, head = _find_work_item(CU_SEQLENS, CU_BLOCKS, num_seqs, num_heads,
                                                            BLOCK_N)
    if not valid:
        return
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head = _in_elements(ALIGN, stride_q_tok, stride_q_head,
                                                                      stride_k_tok, stride_k_head)
    stride_v_tok, stride_v_head, stride_do_tok, stride_do_head = _in_elements(ALIGN, stride_v_tok, stride_v_head,
                                                                        stride_do_tok, stride_do_head)
    stride_dk_tok, stride_dk_head, stride_dv_tok, stride_dv_head = _in_elements(ALIGN, stride_dk_tok, stride_dk_head,
                                                                                stride_dv_tok, stride_dv_head)
    stride_cs_tok = stride_cs_tok * TABLE_ALIGN
    Q += head * stride_q_head + seq_start * stride_q_tok
    K += head * stride_k_head + seq_start * stride_k_tok
    V += head * stride_v_head + seq_start * stride_v_tok
    DO += head * stride_do_head + seq_start * stride_do_tok
    DK += head * stride_dk_head + seq_start * stride_dk_tok
    DV += head * stride_dv_head + seq_start * stride_dv_tok
    LSE += head * total_tokens + seq_start
    DELTA += head * total_tokens + seq_start
    DQ_ACC += head * ACC_CHANNELS * total_tokens + seq_start
    COS += seq_start * stride_cs_tok
    SIN += seq_start * stride_cs_tok

    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < seqlen
    k = _load_chunks(K, stride_k_tok, offs_n, mask_n, ROT_HALF, QK_CHUNKS)
    v = _load_chunks(V, stride_v_tok, offs_n, mask_n, ROT_HALF, V_CHUNKS)
    dk = _zero_chunks(BLOCK_N, QK_CHUNKS)
    dv = _zero_chunks(BLOCK_N, V_CHUNKS)
    if ACCUMULATE_DQ:
        k_t = _transpose_chunks(k)  # k̃ᵀ chunks: the loop's dQ̃ᵀ products need no transposed dS

    for start_m in range(0, seqlen, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seqlen
        # Work transposed, (BLOCK_N, BLOCK_M): kᵀ-major tiles feed dK and dV without transposing p.
        s_t, q = _load_dot_t(k, Q, stride_q_tok, offs_m, mask_m, ROT_HALF, QK_CHUNKS, DOT_PRECISION)  # k·qᵀ
        lse = tl.load(LSE + offs_m, mask=mask_m, other=float("inf"))  # +inf: padded q rows get p = 0
        delta = tl.load(DELTA + offs_m, mask=mask_m, other=0.0)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)

        # dPᵀ = v·dOᵀ and dV += pᵀ·dO, one dO chunk at a time.
        dp_t, dv = _load_dot_t_acc(v, DO, stride_do_tok, offs_m, mask_m, p_t, dv, ROT_HALF, V_CHUNKS, DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(Q.dtype.element_ty)
        dk = _dot_acc(ds_t, q, dk, DOT_PRECISION)
        if ACCUMULATE_DQ:
            _atomic_add_dot_t(DQ_ACC, total_tokens, offs_m, mask_m, k_t, ds_t, DOT_PRECISION)

    _store_grad_chunks(DK, stride_dk_tok, offs_n, mask_n, dk, softmax_scale, COS, SIN, stride_cs_tok, ROT_HALF,
                       QK_CHUNKS)
    _store_chunks(DV, stride_dv_tok, offs_n, mask_n, dv, 1.0, V_CHUNKS)  # dV = Σ pᵀ·dO, unscaled


@triton.jit
def _attn_bwd_dq_kernel(
    # pointers
    Q, K, V, DO, LSE, DELTA, DQ, COS, SIN,
    # varlen metadata
    CU_SEQLENS, CU_BLOCKS, num_seqs, num_heads, total_tokens,
    # strides in units of ALIGN elements, the tables' (stride_cs_tok) in units of TABLE_ALIGN
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head, stride_dq_tok, stride_dq_head, stride_cs_tok,
    # runtime scalars
    qk_scale, softmax_scale, head_dim, max_seqlen_bucket,
    # constexprs
    ROT_HALF: tl.constexpr, QK_CHUNKS: tl.constexpr, V_CHUNKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr, TABLE_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program owns a q-block of one head: dQ accumulates in registers over the sequence's k-blocks."""
    valid, seq_start, seqlen, block, head = _find_work_item(CU_SEQLENS, CU_BLOCKS, num_seqs, num_heads,
                                                            BLOCK_M)
    if not valid:
        return
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head = _in_elements(ALIGN, stride_q_tok, stride_q_head,
                                                                      stride_k_tok, stride_k_head)
    stride_v_tok, stride_v_head, stride_do_tok, stride_do_head = _in_elements(ALIGN, stride_v_tok, stride_v_head,
                                                                        stride_do_tok, stride_do_head)
    stride_dq_tok, stride_dq_head = stride_dq_tok * ALIGN, stride_dq_head * ALIGN
    stride_cs_tok = stride_cs_tok * TABLE_ALIGN
    Q += head * stride_q_head + seq_start * stride_q_tok
    K += head * stride_k_head + seq_start * stride_k_tok
    V += head * stride_v_head + seq_start * stride_v_tok
    DO += head * stride_do_head + seq_start * stride_do_tok
    DQ += head * stride_dq_head + seq_start * stride_dq_tok
    LSE += head * total_tokens + seq_start
    DELTA += head * total_tokens + seq_start
    COS += seq_start * stride_cs_tok
    SIN += seq_start * stride_cs_tok

    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seqlen
    q = _load_chunks(Q, stride_q_tok, offs_m, mask_m, ROT_HALF, QK_CHUNKS)
    do = _load_chunks(DO, stride_do_tok, offs_m, mask_m, ROT_HALF, V_CHUNKS)
    dq = _zero_chunks(BLOCK_M, QK_CHUNKS)
    lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=mask_m, other=0.0)

    for start_n in range(0, seqlen, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seqlen
        s, k = _load_dot_t(q, K, stride_k_tok, offs_n, mask_n, ROT_HALF, QK_CHUNKS, DOT_PRECISION)  # q·kᵀ
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)

        dp, _ = _load_dot_t(do, V, stride_v_tok, offs_n, mask_n, ROT_HALF, V_CHUNKS, DOT_PRECISION)  # dO·vᵀ
        ds = (p * (dp - delta[:, None])).to(K.dtype.element_ty)
        dq = _dot_acc(ds, k, dq, DOT_PRECISION)

    _store_grad_chunks(DQ, stride_dq_tok, offs_m, mask_m, dq, softmax_scale, COS, SIN, stride_cs_tok, ROT_HALF,
                       QK_CHUNKS)


@triton.jit
def _attn_bwd_dq_store_kernel(
    DQ_ACC, DQ, COS, SIN,
    total_tokens,
    stride_dq_tok, stride_dq_head, stride_cs_tok,  # in units of ALIGN and TABLE_ALIGN elements
    softmax_scale,
    ROT_HALF: tl.constexpr, QK_CHUNKS: tl.constexpr, ACC_CHANNELS: tl.constexpr,
    ALIGN: tl.constexpr, TABLE_ALIGN: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """dQ of the non-deterministic backward: the float32 dQ̃ that `_attn_bwd_dkdv_kernel` accumulated, scaled,
    rotated back and stored in dQ's dtype; grid (cdiv(total_tokens, BLOCK_T), heads)."""
    stride_dq_tok, stride_dq_head = stride_dq_tok * ALIGN, stride_dq_head * ALIGN
    stride_cs_tok = stride_cs_tok * TABLE_ALIGN
    head = tl.program_id(1).to(tl.int64)
    first = tl.program_id(0).to(tl.int64) * BLOCK_T  # folded into the base pointers: row offsets stay int32
    rows = tl.arange(0, BLOCK_T)
    mask = rows < total_tokens - first
    dq = _load_acc_chunks(DQ_ACC + head * ACC_CHANNELS * total_tokens + first, total_tokens, rows, mask, QK_CHUNKS)
    _store_grad_chunks(DQ + head * stride_dq_head + first * stride_dq_tok, stride_dq_tok, rows, mask, dq,
                       softmax_scale, COS + first * stride_cs_tok, SIN + first * stride_cs_tok, stride_cs_tok,
                       ROT_HALF, QK_CHUNKS)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def _split(units: int, min_alloc: int, cap: int, max_chunks: int) -> list[tuple[int, int, int]]:
    """Split `units` into <= max_chunks (start, real, alloc) pieces, alloc a power of two in [min_alloc, cap].

    Greedy largest powers of two; the last slot (or a remainder under min_alloc) is padded up.
    """
    chunks, start = [], 0
    while start < units:
        rest = units - start
        if len(chunks) == max_chunks - 1 or rest < min_alloc:
            chunks.append((start, rest, max(min_alloc, triton.next_power_of_2(rest))))
            break
        take = min(cap, 1 << (rest.bit_length() - 1))
        chunks.append((start, take, take))
        start += take
    return chunks


def _chunk_plans(head_dim: int, rotary_dim: int) -> tuple[tuple[tuple[bool, int, int, int], ...], ...]:
    """(q/k chunks, v/o chunks): how the channels are tiled, each chunk a (PAIRS, START, REAL, WIDTH) tuple.

    Rotary pairs come first (chunks of >= 8 pairs = 16 channels, at most 64 pairs), then the plain
    channels past the rotary dim; v/o are plain channel ranges. At most NUM_QK_CHUNKS and NUM_V_CHUNKS chunks.
    """
    plain_qk = head_dim - rotary_dim
    candidates = []  # every way to share the chunks between rotary pairs and plain channels
    for rotary_chunks in range(1 if rotary_dim else 0, NUM_QK_CHUNKS + 1 - (1 if plain_qk else 0)):
        rotary = _split(rotary_dim // 2, 8, 64, rotary_chunks) if rotary_dim else []
        plain = _split(plain_qk, 16, 128, NUM_QK_CHUNKS - len(rotary)) if plain_qk else []
        qk = [(True, start, real, 2 * alloc) for start, real, alloc in rotary]
        qk += [(False, rotary_dim + start, real, alloc) for start, real, alloc in plain]
        candidates.append((sum(width for *_, width in qk), len(qk), qk))
    _, _, qk = min(candidates, key=lambda c: c[:2])  # least matmul work, then fewest chunks
    v = [(False, start, real, alloc) for start, real, alloc in _split(head_dim, 16, 128, NUM_V_CHUNKS)]
    return tuple(qk), tuple(v)


def _kernel_plan(head_dim: int, rotary_dim: int) -> dict:
    """The plan constexprs of the attention kernels: ROT_HALF, QK_CHUNKS and V_CHUNKS (`_chunk_plans`)."""
    qk, v = _chunk_plans(head_dim, rotary_dim)
    return {"ROT_HALF": max(rotary_dim // 2, 1), "QK_CHUNKS": qk, "V_CHUNKS": v}


def _chunk_plan(head_dim: int, rotary_dim: int) -> dict:
    """The same plan by slot, as the kernels took it before they took chunk tuples (and as the chunk-plan test
    reads it): ROT_HALF, QK{i}_ROT / _START / _REAL / _WIDTH for i < NUM_QK_CHUNKS and V{i}_START / _REAL / _WIDTH
    for i < NUM_V_CHUNKS; unused slots have REAL = 0."""
    qk, v = _chunk_plans(head_dim, rotary_dim)
    qk += ((False, 0, 0, 16),) * (NUM_QK_CHUNKS - len(qk))
    v += ((False, 0, 0, 16),) * (NUM_V_CHUNKS - len(v))
    plan = {"ROT_HALF": max(rotary_dim // 2, 1)}
    for i, (rot, start, real, width) in enumerate(qk):
        plan.update({f"QK{i}_ROT": rot, f"QK{i}_START": start, f"QK{i}_REAL": real, f"QK{i}_WIDTH": width})
    for i, (_, start, real, width) in enumerate(v):
        plan.update({f"V{i}_START": start, f"V{i}_REAL": real, f"V{i}_WIDTH": width})
    return plan


def matmul_channels(head_dim: int, rotary_dim: int) -> int:
    """Channels of q·kᵀ work per (query, key) pair that the plan spends for `head_dim` (padding included)."""
    qk, _ = _chunk_plans(head_dim, rotary_dim)
    return sum(width for *_, width in qk)


CU_BLOCKS_SCAN = 256  # sequences per scan step of `_cu_blocks_kernel`


def _cu_blocks(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int32 (len(CU_BLOCK_SIZES) + 1, num_seqs + 1): the work list of `_cu_blocks_kernel`, on device.

    One small kernel, no host sync: it runs on every attention call (forward and backward of every layer), and
    the C export (`finevit.kernels.export`) launches the same kernel. (The torch-ops version of the block counts
    it replaced needed a cached device tensor of the block sizes: building it per call was a host-to-device copy,
    24 host syncs per ViT-B training step on an H100, 17% of its time.)
    """
    num_seqs = cu_seqlens.shape[0] - 1
    table = torch.empty((len(CU_BLOCK_SIZES) + 1, num_seqs + 1), dtype=torch.int32, device=cu_seqlens.device)
    wrap_triton(_cu_blocks_kernel)[(1,)](cu_seqlens, table, num_seqs, BLOCK_S=CU_BLOCKS_SCAN)
    return table


def _work_grid(total_tokens: int, num_seqs: int, num_heads: int, block: int) -> tuple[int]:
    """Programs for the flat work list: an upper bound on the (sequence, block) items, times the heads."""
    return ((triton.cdiv(total_tokens, block) + num_seqs) * num_heads,)


# Autotune candidates (tile of the owned rows, tile of the loop, warps, stages). Pruned with the compile report
# (`python -m finevit.kernels.compile_check`, docs/compile_report.md): tiles that spilled registers at head
# dims 64-128 on H100 are out (forward 128x128, every backward tile with 128 loop rows), and so are backward
# tiles owning 32 rows (wgmma needs 64 rows per warpgroup: on H100 they ran on mma.sync). Then timed on an
# H100 (bench/NOTES.md, 2026-11-26): in the backward, 128x32 and 64x64 tiles with 4 warps and 3 stages beat
# every 8-warp tile (dK/dV 0.55 vs 0.73 ms, d64 with 1024-patch images), so they lead the lists. Tiles that
# still spill somewhere are listed, with the reason, in compile_check.ALLOWED. The last dK/dV tile, 64x16 with 4
# warps, is the A100 fallback: spill-free on sm_80 where every larger tile spills (mma.sync keeps operand
# fragments in registers), on sm_90 everywhere, and on sm_80 everywhere but d32 + RoPE and d80 under triton 3.6
# (8 B, where other tiles are clean).
_FWD_SHAPES = [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)]
_DKDV_SHAPES = [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 8, 2), (64, 16, 4, 2)]
_DQ_SHAPES = [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 8, 2)]
# The dK/dV kernel that also adds dQ (deterministic=False) holds a (WIDTH, BLOCK_M) product more, and the 4-warp
# tiles above spill 120-1680 B there on sm_90 (d64-d128). These are the tiles that do not, at d64-d88 on sm_90
# (8 warps: half the registers per thread); 128 owned rows first, which halve the atomics per dQ element against
# 64. The last, 64x16 with 8 warps, is spill-free on sm_80 at d64-d88 (24 B at d128; every tile spills there).
_DKDV_ATOMIC_SHAPES = [(128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2), (64, 16, 8, 2)]
# FINEVIT_ATTENTION_TUNING=wide adds candidates outside these lists (larger tiles that spill a little,
# other pipeline depths): a tuning sweep for GPU runs (bench/gpu_check.sh), read at import.
if os.environ.get("FINEVIT_ATTENTION_TUNING") == "wide":
    _FWD_SHAPES = _FWD_SHAPES + [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 64, 8, 2),
                                 (64, 128, 4, 3), (128, 64, 4, 3)]
    _DKDV_SHAPES = _DKDV_SHAPES + [(128, 32, 8, 3), (128, 32, 4, 4), (64, 64, 8, 2)]
    _DQ_SHAPES = _DQ_SHAPES + [(128, 32, 8, 3), (128, 32, 4, 4), (64, 64, 8, 2)]
    _DKDV_ATOMIC_SHAPES = _DKDV_ATOMIC_SHAPES + [(128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3)]
_KEYS = ["head_dim", "max_seqlen_bucket", "ROT_HALF", "QK_CHUNKS", "ALIGN"]  # rotary layout changes the best tile
_attn_fwd_tuned = autotune(configs(["BLOCK_M", "BLOCK_N"], _FWD_SHAPES), key=_KEYS)(_attn_fwd_kernel)
_attn_bwd_dkdv_tuned = autotune(configs(["BLOCK_N", "BLOCK_M"], _DKDV_SHAPES), key=_KEYS)(_attn_bwd_dkdv_kernel)
# restore_value: with ACCUMULATE_DQ the kernel adds into DQ_ACC, which the tuning runs must not do.
_attn_bwd_dkdv_atomic_tuned = autotune(configs(["BLOCK_N", "BLOCK_M"], _DKDV_ATOMIC_SHAPES), key=_KEYS,
                                       restore_value=["DQ_ACC"])(_attn_bwd_dkdv_kernel)
_attn_bwd_dq_tuned = autotune(configs(["BLOCK_M", "BLOCK_N"], _DQ_SHAPES), key=_KEYS)(_attn_bwd_dq_kernel)
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}  # the one tile the interpreter runs


def _seqlen_bucket(max_seqlen: int) -> int:
    """Autotune key: ragged batches share a tuning while their longest sequence is in the same octave."""
    return triton.next_power_of_2(max(max_seqlen, 16))


def _common(q, rotary_dim, softmax_scale):
    plan = _kernel_plan(q.shape[2], rotary_dim)
    plan["DOT_PRECISION"] = "ieee" if q.dtype == torch.float32 else "tf32"
    return plan, softmax_scale * LOG2E


@triton_op("finevit::varlen_attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    cos: torch.Tensor | None, sin: torch.Tensor | None, softmax_scale: float, deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launcher: returns o (total_tokens, heads, head_dim), lse float32 (heads, total_tokens) and,
    with cos/sin, the rotated q̃ and k̃ (contiguous, for the backward; empty without cos/sin). `deterministic`
    is the backward's (`attention_bwd`), kept for it by autograd."""
    total_tokens, num_heads, head_dim = q.shape
    num_seqs = cu_seqlens.shape[0] - 1
    if cos is not None:
        q_rot, k_rot = rope_fwd(q, cos, sin), rope_fwd(k, cos, sin)
        q, k = q_rot, k_rot
    else:
        q_rot, k_rot = q.new_empty(0), k.new_empty(0)  # two tensors: outputs may not alias each other
    plan, qk_scale = _common(q, 0, softmax_scale)  # q, k are rotated already: plain channel chunks
    o = _dispatch.empty(q.shape, q.dtype, q.device)
    lse = _dispatch.empty((num_heads, total_tokens), torch.float32, q.device)
    cu_blocks = _cu_blocks(cu_seqlens)

    def grid(meta):
        return _work_grid(total_tokens, num_seqs, num_heads, meta["BLOCK_M"])

    align, strides = _dispatch.strides_in_units(q, k, v, o)
    _dispatch.launch(
        _attn_fwd_tuned, _attn_fwd_kernel, grid,
        q, k, v, o, lse,
        cu_seqlens, cu_blocks, num_seqs, num_heads, total_tokens,
        *strides,
        qk_scale, head_dim, _seqlen_bucket(max_seqlen),
        **plan, ALIGN=align, interpreter_blocks=_INTERPRETER_BLOCKS,
    )
    return o, lse, q_rot, k_rot


@triton_op("finevit::varlen_attention_bwd", mutates_args=())
def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    cu_seqlens: torch.Tensor, max_seqlen: int, cos: torch.Tensor | None, sin: torch.Tensor | None,
    softmax_scale: float, deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher: δ preprocess, then the dK/dV and dQ kernels (deterministic), or the dK/dV kernel that
    also adds dQ̃ into a float32 buffer with atomics and a pass that stores it (not deterministic: the order of
    the additions varies). With cos/sin, q and k are the rotated q̃, k̃ of the forward and the returned dq, dk
    are w.r.t. the unrotated q, k. Returns dq, dk, dv."""
    total_tokens, num_heads, head_dim = q.shape
    num_seqs = cu_seqlens.shape[0] - 1
    rotary_dim = 2 * cos.shape[1] if cos is not None else 0
    plan, qk_scale = _common(q, rotary_dim, softmax_scale)
    if cos is None:
        cos = sin = q.new_empty(0, dtype=torch.float32)  # read by rotary chunks only
    elif cos.stride(0) != sin.stride(0):  # the kernels take one row stride for both tables
        cos, sin = cos.contiguous(), sin.contiguous()
    stride_cs = cos.stride(0) if cos.numel() else 0
    table_align = _dispatch.alignment(stride_cs, limit=4)  # float32 elements
    if do.stride(-1) != 1:  # e.g. the expanded, stride-0 gradient of out.sum()
        do = do.contiguous()
    dq = _dispatch.empty(q.shape, q.dtype, q.device)
    dk = _dispatch.empty(k.shape, k.dtype, k.device)
    dv = _dispatch.empty(v.shape, v.dtype, v.device)
    delta = _dispatch.empty((num_heads, total_tokens), torch.float32, q.device)
    cu_blocks = _cu_blocks(cu_seqlens)

    block_t = 32 if _dispatch.interpreting() else 64
    align, strides = _dispatch.strides_in_units(o, do)
    wrap_triton(_attn_bwd_preprocess_kernel)[(triton.cdiv(total_tokens, block_t), num_heads)](
        o, do, delta, total_tokens, *strides,
        HEAD_DIM=head_dim, ALIGN=align, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(head_dim),
    )
    shared = (cu_seqlens, cu_blocks, num_seqs, num_heads, total_tokens)
    # One ALIGN for both kernels (dq, dk, dv are dense: they never lower it).
    align, strides = _dispatch.strides_in_units(q, k, v, do, dk, dv, dq)
    dkdv_strides, dq_strides = strides[:12], strides[:8] + strides[12:]
    scalars = (qk_scale, softmax_scale, head_dim, _seqlen_bucket(max_seqlen))

    def grid_kv(meta):
        return _work_grid(total_tokens, num_seqs, num_heads, meta["BLOCK_N"])

    def grid_q(meta):
        return _work_grid(total_tokens, num_seqs, num_heads, meta["BLOCK_M"])

    acc_channels = matmul_channels(head_dim, rotary_dim)
    dq_acc = (q.new_empty(0, dtype=torch.float32) if deterministic
              else torch.zeros((num_heads, acc_channels, total_tokens), dtype=torch.float32, device=q.device))
    _dispatch.launch(
        _attn_bwd_dkdv_tuned if deterministic else _attn_bwd_dkdv_atomic_tuned, _attn_bwd_dkdv_kernel, grid_kv,
        q, k, v, do, lse, delta, dk, dv, dq_acc, cos, sin, *shared,
        *dkdv_strides, stride_cs // table_align, *scalars,
        **plan, ALIGN=align, TABLE_ALIGN=table_align, ACCUMULATE_DQ=not deterministic, ACC_CHANNELS=acc_channels,
        interpreter_blocks=_INTERPRETER_BLOCKS,
    )
    if deterministic:
        _dispatch.launch(
            _attn_bwd_dq_tuned, _attn_bwd_dq_kernel, grid_q,
            q, k, v, do, lse, delta, dq, cos, sin, *shared,
            *dq_strides, stride_cs // table_align, *scalars,
            **plan, ALIGN=align, TABLE_ALIGN=table_align, interpreter_blocks=_INTERPRETER_BLOCKS,
        )
    else:
        block_t = 32 if _dispatch.interpreting() else 64
        wrap_triton(_attn_bwd_dq_store_kernel)[(triton.cdiv(total_tokens, block_t), num_heads)](
            dq_acc, dq, cos, sin, total_tokens, dq_strides[-2], dq_strides[-1], stride_cs // table_align,
            softmax_scale, ROT_HALF=plan["ROT_HALF"], QK_CHUNKS=plan["QK_CHUNKS"], ACC_CHANNELS=acc_channels,
            ALIGN=align, TABLE_ALIGN=table_align, BLOCK_T=block_t,
        )
    return dq, dk, dv


@attention_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, cos, sin, softmax_scale, deterministic=True):
    rotated = (torch.empty_like(q), torch.empty_like(k)) if cos is not None else (q.new_empty(0), q.new_empty(0))
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32), *rotated


@attention_bwd.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, max_seqlen, cos, sin, softmax_scale, deterministic=True):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# ----------------------------------------------------------------------------------------------------
# Autograd and the public function
# ----------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, cos, sin, softmax_scale, deterministic = inputs
    o, lse, q_rot, k_rot = output
    if cos is not None:  # the backward reads the rotated q̃, k̃ the forward computed
        q, k = q_rot, k_rot
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, cos, sin)
    ctx.max_seqlen, ctx.softmax_scale, ctx.deterministic = max_seqlen, softmax_scale, deterministic


def _backward(ctx, grad_o, grad_lse, grad_q_rot, grad_k_rot):
    q, k, v, o, lse, cu_seqlens, cos, sin = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_o, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, cos, sin, ctx.softmax_scale,
                               ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


MIN_HEAD_DIM, MAX_HEAD_DIM, HEAD_DIM_MULTIPLE = 32, 256, 8
SUPPORTED_HEAD_DIMS = f"multiples of {HEAD_DIM_MULTIPLE} from {MIN_HEAD_DIM} to {MAX_HEAD_DIM}"


def supports_head_dim(head_dim: int) -> bool:
    """Whether `varlen_attention` runs this head dim (both paths): multiples of 8 from 32 to 256."""
    return MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % HEAD_DIM_MULTIPLE == 0


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, cos, sin, softmax_scale) -> None:
    op = "varlen_attention"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    for name, t in (("k", k), ("v", v)):
        check_tensor(op, name, t, ndim=3, dtypes=(q.dtype,), device=q.device, last_dim_contiguous=True)
        if t.shape != q.shape:
            fail(op, f"{name} must have q's shape {tuple(q.shape)} (total_tokens, num_heads, head_dim), "
                 f"got {tuple(t.shape)}")
    total_tokens, _, head_dim = q.shape
    if total_tokens < 1 or q.shape[1] < 1:
        fail(op, f"q must have at least one token and one head, got shape {tuple(q.shape)}")
    if not supports_head_dim(head_dim):
        fail(op, f"head_dim must be a multiple of {HEAD_DIM_MULTIPLE} in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], "
             f"got {head_dim}")
    check_cu_seqlens(op, cu_seqlens, total_tokens, max_seqlen, q.device)
    if (cos is None) != (sin is None):
        fail(op, "cos and sin must be given together (both or neither)")
    if cos is not None:
        check_cos_sin(op, cos, sin, total_tokens, head_dim, q.device)
    if softmax_scale is not None:
        check_positive_float(op, "softmax_scale", softmax_scale)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    deterministic: bool = True,
) -> torch.Tensor:
    """Non-causal attention within each sequence of a packed batch, none across sequences.

    Arguments:
        q, k, v: (total_tokens, num_heads, head_dim), one dtype of fp16 / bf16 / fp32 (fp64 on the
            reference path), last dim contiguous. head_dim: a multiple of 8 from 32 to 256.
        cu_seqlens: int32 (num_seqs + 1,): 0, then the cumulative sequence lengths, ending at total_tokens.
        max_seqlen: Python int, the longest sequence (an upper bound is accepted).
        cos, sin: optional float32 (total_tokens, rotary_dim // 2), even rotary_dim <= head_dim. When given,
            q and k are rotated inside the op (rotate-half on the first rotary_dim channels:
            x1' = x1·cos − x2·sin, x2' = x2·cos + x1·sin), the rest pass through; build them with
            `rope_2d_cos_sin` (images) or `rope_1d_cos_sin` (text).
        softmax_scale: defaults to head_dim ** -0.5.
        deterministic: True (the default): the backward gives bitwise the same gradients on every run, from two
            kernels that each recompute the attention matrix (no atomics). False: one kernel computes dK, dV
            and dQ, adding dQ into a float32 buffer with atomics (FlashAttention-2's backward): less work, but
            the order of the additions, so dQ's last bits, vary from run to run. Ignored (deterministic) while
            `torch.use_deterministic_algorithms(True)` is set.
    Returns:
        (total_tokens, num_heads, head_dim) in q's dtype, differentiable w.r.t. q, k, v.
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, cos, sin, softmax_scale)
    if not _dispatch.use_triton("varlen_attention", q.device):
        return reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, cos=cos, sin=sin,
                                          softmax_scale=softmax_scale)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    if not deterministic:
        channels = matmul_channels(q.shape[-1], 2 * cos.shape[1] if cos is not None else 0)
        if channels * q.shape[0] >= 2**31:
            fail("varlen_attention", f"deterministic=False addresses its float32 dQ buffer with int32 offsets "
                 f"(channel × token): at most {(2**31 - 1) // channels} tokens at head dim {q.shape[-1]}, got "
                 f"{q.shape[0]}; use deterministic=True")
    return attention_fwd(q, k, v, cu_seqlens, max_seqlen, cos, sin, float(softmax_scale), deterministic)[0]
