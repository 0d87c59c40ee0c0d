"""CLIP's softmax contrastive loss, tiled: no B×B tensor in the forward or the backward; exact; distributed.

Shapes as in `siglip_loss.py` (no bias: a constant shift cancels in a softmax).

    L = ½·[mean_i (lse_i(x → all t) − z_ii) + mean_j (lse_j(t → all x) − z_jj)],   z = s·x tᵀ

Both directions are the same computation with the roles of the two sides swapped: for each local row a_i,
the log-sum-exp of s·a_i·b_j over every row j of the other side in the global batch. The forward keeps an
online max and sum per row (exp2 domain, float32) and writes only O(B) statistics. In one process both
directions come from one pass over the logits (`_lse_kernel` with COLUMNS): a program covers a group of a
rows × a group of b rows, keeps its rows' max and sum in registers and accumulates its columns' in a small
buffer of its own, and the per-group partials are merged (`merge_partials`). With a process group the b
shards travel around a ring, one row-direction pass per direction, and the per-shard LSEs are merged with
logaddexp. The gradient
(`_pairwise.contrastive_gradients`) recomputes each logit tile and writes, a chunk of rows at a time,
    G_ij = s·grad / (2·B_local) · (exp(z_ij − lse_i) − y_ij)       (the one-hot folded in: P_ii − 1 in float32)
with each tile's sum of G_ij·a_i·b_j / s (∂L/∂s); then two GEMMs give da = G @ b and db = Gᵀ @ a. Single
process, both directions share the logits: G_ij = s·grad / (2B) · (P_ij^(img→txt) + P_ij^(txt→img) − 2·y_ij),
one pass. With a process group each direction is its own pass over the pairs of this rank's loss,
and b's gradients travel back to their owner with the shard. Values and gradients equal open_clip's
`ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size)`; the scale gradient is this rank's
partial sum, so the data-parallel average gives the full-batch gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _dispatch, reference
from ._pairwise import (
    Ring,
    _dot_tile,
    check_contrastive,
    contrastive_gradients,
    launch_options,
    ring_forward,
)

LN2 = 0.6931471805599453


@triton.jit
def _lse_kernel(
    A, B, SCALE,
    # float32 (column groups, rows_a, 2): online (max, sum) of 2^(log2(e)·s·a_i·b_j) per a row over a group of b
    ROW_PARTS,
    # float32 (row groups, rows_b, 2): the same per b row over a group of a rows (COLUMNS only); it must hold
    # (−inf, 0) at launch: each program reads and updates its own block of it
    COL_PARTS,
    rows_a, rows_b, dim, stride_a, stride_b,
    rows_per_group, cols_per_group,  # multiples of BLOCK_A and BLOCK_B
    COLUMNS: tl.constexpr,  # also the column direction, from the same logit tiles
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (r, c) covers a rows of group r against b rows of group c: per a row, the online max and sum
    over its tiles kept in registers; per b row (COLUMNS), the same accumulated in COL_PARTS[r] tile by tile."""
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    scale2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634  # work in the exp2 domain
    row_stop = tl.minimum(rows_a, (pid_r + 1) * rows_per_group)
    col_start = pid_c * cols_per_group
    col_stop = tl.minimum(rows_b, col_start + cols_per_group)
    for row_start in range(pid_r * rows_per_group, row_stop, BLOCK_A):
        offs_a = row_start + tl.arange(0, BLOCK_A)
        mask_a = offs_a < row_stop
        m = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_A], dtype=tl.float32)
        for start in range(col_start, col_stop, BLOCK_B):
            offs_b = start + tl.arange(0, BLOCK_B)
            mask_b = offs_b < col_stop
            z2 = scale2 * _dot_tile(A, B, offs_a, offs_b, mask_a, mask_b, dim, stride_a, stride_b,
                                    BLOCK_A, BLOCK_B, BLOCK_D)
            # Each direction masks the other side's missing rows; its own missing rows hold finite garbage that
            # is never stored (masking both would make them −inf − −inf = NaN).
            z2_rows = tl.where(mask_b[None, :], z2, float("-inf"))
            m_new = tl.maximum(m, tl.max(z2_rows, 1))
            l = l * tl.math.exp2(m - m_new) + tl.sum(tl.math.exp2(z2_rows - m_new[:, None]), 1)
            m = m_new
            if COLUMNS:
                z2_cols = tl.where(mask_a[:, None], z2, float("-inf"))
                col = COL_PARTS + (pid_r * rows_b + offs_b.to(tl.int64)) * 2
                col_m = tl.load(col, mask=mask_b, other=0.0)
                col_l = tl.load(col + 1, mask=mask_b, other=0.0)
                col_m_new = tl.maximum(col_m, tl.max(z2_cols, 0))
                col_l = col_l * tl.math.exp2(col_m - col_m_new) + tl.sum(tl.math.exp2(z2_cols - col_m_new[None, :]), 0)
                tl.store(col, col_m_new, mask=mask_b)
                tl.store(col + 1, col_l, mask=mask_b)
        row = ROW_PARTS + (pid_c * rows_a + offs_a.to(tl.int64)) * 2
        tl.store(row, m, mask=mask_a)
        tl.store(row + 1, l, mask=mask_a)
        if COLUMNS:
            tl.debug_barrier()  # the next row tile reads the column sums that other warps just wrote


@triton.jit
def _clip_logit_grad_kernel(
    A, B, G, SCALE, LSE_A, LSE_B, COEF, PARTIALS,  # LSE_* float32, log2 domain; PARTIALS float32 (tiles,)
    rows_a, rows_b, dim, stride_a, stride_b, stride_g,
    diag_offset,  # a row i matches b row j iff i + diag_offset == j
    BOTH_DIRECTIONS: tl.constexpr,  # add b's softmax over the a rows (LSE_B), as well as a's over the b rows
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (BLOCK_A, BLOCK_B) tile of G = s·coef·(softmax − onehot), and the tile's sum of g·a·b (∂L/∂s)."""
    pid_a, pid_b = tl.program_id(0), tl.program_id(1)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_a, mask_b = offs_a < rows_a, offs_b < rows_b
    scale = tl.load(SCALE).to(tl.float32)
    scale2 = scale * 1.4426950408889634  # the forward's exp2 domain: P_ii = 1 exactly when it should be
    coef = tl.load(COEF)  # grad_output / (2·B_local)
    dot = _dot_tile(A, B, offs_a, offs_b, mask_a, mask_b, dim, stride_a, stride_b, BLOCK_A, BLOCK_B, BLOCK_D)
    onehot = tl.where((offs_a[:, None] + diag_offset) == offs_b[None, :], 1.0, 0.0)
    p = tl.math.exp2(scale2 * dot - tl.load(LSE_A + offs_a, mask=mask_a, other=0.0)[:, None]) - onehot
    if BOTH_DIRECTIONS:
        p += tl.math.exp2(scale2 * dot - tl.load(LSE_B + offs_b, mask=mask_b, other=0.0)[None, :]) - onehot
    g = tl.where(mask_a[:, None] & mask_b[None, :], coef * p, 0.0)
    tl.store(G + offs_a[:, None].to(tl.int64) * stride_g + offs_b[None, :], (g * scale).to(G.dtype.element_ty),
             mask=mask_a[:, None] & mask_b[None, :])
    tl.store(PARTIALS + pid_a * tl.num_programs(1) + pid_b, tl.sum(tl.sum(g * dot, 1), 0))


# ----------------------------------------------------------------------------------------------------
# Launchers (one shard of `b` at a time)
# ----------------------------------------------------------------------------------------------------


LSE_GROUPS = 16  # row and column groups of the one-process LSE pass: 16 × 16 programs at large B


@triton_op("finevit::lse_partials", mutates_args=("row_parts", "col_parts"))
def lse_partials(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, rows_per_group: int, cols_per_group: int,
                 columns: bool, row_parts: torch.Tensor, col_parts: torch.Tensor) -> None:
    """Online (max, sum) partials of log2 Σ exp(s·a_i·b_j): row_parts (column groups, rows of a, 2) per a row
    over each group of b rows, and with `columns` col_parts (row groups, rows of b, 2) per b row over each
    group of a rows (`merge_partials` turns either into log-sum-exps). col_parts must hold (−inf, 0)."""
    options = launch_options()
    grid = (triton.cdiv(a.shape[0], rows_per_group), triton.cdiv(b.shape[0], cols_per_group))
    wrap_triton(_lse_kernel)[grid](a, b, scale, row_parts, col_parts, a.shape[0], b.shape[0], a.shape[1],
                                   a.stride(0), b.stride(0), rows_per_group, cols_per_group, COLUMNS=columns,
                                   **options)


def merge_partials(parts: torch.Tensor) -> torch.Tensor:
    """(groups, rows, 2) online (max, sum) partials → (rows,) log2-sum-exp2."""
    m, l = parts.unbind(-1)
    top = m.amax(0)
    return top + torch.log2((l * torch.exp2(m - top)).sum(0))


def _both_lse(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One process: (lse over b of each a row, lse over a of each b row), log2 domain, from one pass over the
    logits (the column direction accumulated beside the row one) instead of one pass per direction."""
    options = launch_options()
    tile = max(options["BLOCK_A"], options["BLOCK_B"])
    per_group = triton.cdiv(triton.cdiv(a.shape[0], LSE_GROUPS), tile) * tile
    groups = triton.cdiv(a.shape[0], per_group)
    row_parts = torch.empty((groups, a.shape[0], 2), dtype=torch.float32, device=a.device)
    col_parts = torch.empty((groups, b.shape[0], 2), dtype=torch.float32, device=a.device)
    col_parts[..., 0], col_parts[..., 1] = float("-inf"), 0.0
    lse_partials(a, b, scale, per_group, per_group, True, row_parts, col_parts)
    return merge_partials(row_parts), merge_partials(col_parts)


@triton_op("finevit::clip_logit_grad", mutates_args=("g", "partials"))
def clip_logit_grad(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, lse_a: torch.Tensor,
                    lse_b: torch.Tensor, coef: torch.Tensor, diag_offset: int, both_directions: bool,
                    g: torch.Tensor, partials: torch.Tensor) -> None:
    """g (rows of a, rows of b) = s·coef·(softmax_j(z_ij) − y_ij [+ softmax_i(z_ij) − y_ij]); partials
    (tiles,): each tile's sum of g·a_i·b_j (unscaled by s). `clip_partials` sizes partials."""
    options = launch_options()
    grid = (triton.cdiv(a.shape[0], options["BLOCK_A"]), triton.cdiv(b.shape[0], options["BLOCK_B"]))
    wrap_triton(_clip_logit_grad_kernel)[grid](
        a, b, g, scale, lse_a, lse_b, coef, partials, a.shape[0], b.shape[0], a.shape[1], a.stride(0), b.stride(0),
        g.stride(0), diag_offset, BOTH_DIRECTIONS=both_directions, **options,
    )


def clip_partials(rows_a: int, rows_b: int, device: torch.device) -> torch.Tensor:
    options = launch_options()
    tiles = triton.cdiv(rows_a, options["BLOCK_A"]) * triton.cdiv(rows_b, options["BLOCK_B"])
    return torch.empty(tiles, dtype=torch.float32, device=device)


@lse_partials.register_fake
def _(a, b, scale, rows_per_group, cols_per_group, columns, row_parts, col_parts):
    return None


@clip_logit_grad.register_fake
def _(a, b, scale, lse_a, lse_b, coef, diag_offset, both_directions, g, partials):
    return None


# ----------------------------------------------------------------------------------------------------
# Autograd (single process or ring) and the public function
# ----------------------------------------------------------------------------------------------------


def _ring_lse(ring: Ring | None, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(rows of a,) log-sum-exp of s·a_i·b_j over every row j of b in the global batch, in the log2 domain."""
    lse = torch.full((a.shape[0],), float("-inf"), dtype=torch.float32, device=a.device)
    shard_parts = torch.empty((1, a.shape[0], 2), dtype=torch.float32, device=a.device)
    rows_per_program = launch_options()["BLOCK_A"]

    unused = shard_parts.new_empty(0)  # no column direction on the ring

    def compute(shard, owner):  # one program per BLOCK_A rows of a, over the whole shard
        if shard.shape[0]:
            lse_partials(a, shard, scale, rows_per_program, shard.shape[0], False, shard_parts, unused)
            torch.logaddexp2(lse, merge_partials(shard_parts), out=lse)

    ring_forward(ring, b, compute)
    return lse


def _clip_gradients(ring, a, b, scale, lse_a, lse_b, coef, both_directions):
    """(d_a, d_b, ds) of the a→b cross-entropy of this rank's rows (and of b→a, `both_directions`, single
    process only: there every pair is this rank's) through `contrastive_gradients`."""
    my_offset = ring.offsets[ring.rank] if ring else 0
    ds = torch.zeros((), dtype=torch.float32, device=a.device)

    def logit_grad(start, stop, shard, owner, g, swapped):
        diag_offset = start + my_offset - (ring.offsets[owner] if ring else 0)
        partials = clip_partials(stop - start, shard.shape[0], a.device)
        # Swapped (one process, both directions): G is symmetric once the two log-sum-exps swap roles.
        rows, lse_rows, lse_cols = (b, lse_b, lse_a) if swapped else (a, lse_a, lse_b)
        clip_logit_grad(rows[start:stop], shard, scale, lse_rows[start:stop], lse_cols, coef, diag_offset,
                        both_directions, g, partials)
        if not swapped:
            ds.add_(partials.sum())

    d_a, d_b = contrastive_gradients(ring, a, b, logit_grad)
    return d_a, d_b, ds


class _ClipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, logit_scale, group):
        scale = logit_scale.detach().reshape(()).float()
        ring = Ring(group, img.shape[0], img.device) if group is not None else None
        if ring is None:  # both directions from one pass over the logits
            lse_img, lse_txt = _both_lse(img, txt, scale)
        else:
            lse_img = _ring_lse(ring, img, txt, scale)  # each local image against every text
            lse_txt = _ring_lse(ring, txt, img, scale)  # each local text against every image
        diagonal = scale * (img.float() * txt.float()).sum(-1)  # z_ii, O(B·D)
        ctx.save_for_backward(img, txt, scale, lse_img, lse_txt)
        ctx.ring, ctx.scale_meta = ring, (logit_scale.shape, logit_scale.dtype)
        return 0.5 * LN2 * (lse_img.mean() + lse_txt.mean()) - diagonal.mean()

    @staticmethod
    def backward(ctx, grad):
        img, txt, scale, lse_img, lse_txt = ctx.saved_tensors
        ring = ctx.ring
        coef = (grad.float() / (2 * img.shape[0])).reshape(())
        if ring is None:  # one pass: every pair's logit serves both directions
            d_img, d_txt, ds = _clip_gradients(None, img, txt, scale, lse_img, lse_txt, coef, True)
        else:  # image→text over (local images, every text), text→image over (local texts, every image)
            d_img, d_txt, ds = _clip_gradients(ring, img, txt, scale, lse_img, lse_txt, coef, False)
            d_txt_2, d_img_2, ds_2 = _clip_gradients(ring, txt, img, scale, lse_txt, lse_img, coef, False)
            d_img, d_txt, ds = d_img + d_img_2, d_txt + d_txt_2, ds + ds_2
        scale_shape, scale_dtype = ctx.scale_meta
        return d_img.to(img.dtype), d_txt.to(txt.dtype), ds.reshape(scale_shape).to(scale_dtype), None


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, *, group=None) -> torch.Tensor:
    """CLIP's softmax contrastive loss, equal to open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)`.

    The mean of the image->text and text->image cross-entropies over the local rows, logits
    logit_scale · img @ txtᵀ against every row of the global batch. Arguments as in `siglip_loss`.
    """
    check_contrastive("clip_loss", img, txt, logit_scale, None, group)
    if not _dispatch.use_triton("clip_loss", img.device) or img.dtype == torch.float64:  # fp64: a test dtype
        return reference.clip_loss(img, txt, logit_scale, group=group)
    return _ClipLoss.apply(img, txt, logit_scale, group)
