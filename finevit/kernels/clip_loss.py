"""CLIP's softmax contrastive loss, tiled: no B×B tensor in the forward or the backward; exact; distributed.

Shapes as in `siglip_loss.py` (no bias: a constant shift cancels in a softmax).

    L = ½·[mean_i (lse_i(x → all t) − z_ii) + mean_j (lse_j(t → all x) − z_jj)],   z = s·x tᵀ

Both directions are the same computation with the roles of the two sides swapped: for each local row a_i,
the log-sum-exp of s·a_i·b_j over every row j of the other side in the global batch. The forward keeps an
online max and sum per row (exp2 domain, float32) and writes only the row's LSE, O(B); with a process
group the b shards travel around a ring and the per-shard LSEs are merged with logaddexp. The gradient
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
def _row_lse_kernel(
    A, B, SCALE, LSE,  # LSE float32 (rows_a,): log2 Σ_j 2^(log2(e)·s·a_i·b_j) over this shard of b
    rows_a, rows_b, dim, stride_a, stride_b,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < rows_a
    scale2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634  # work in the exp2 domain
    m = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_A], dtype=tl.float32)
    for start in range(0, rows_b, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)
        mask_b = offs_b < rows_b
        z2 = scale2 * _dot_tile(A, B, offs_a, offs_b, mask_a, mask_b, dim, stride_a, stride_b,
                                BLOCK_A, BLOCK_B, BLOCK_D)
        z2 = tl.where(mask_b[None, :], z2, float("-inf"))
        m_new = tl.maximum(m, tl.max(z2, 1))
        l = l * tl.math.exp2(m - m_new) + tl.sum(tl.math.exp2(z2 - m_new[:, None]), 1)
        m = m_new
    tl.store(LSE + offs_a, m + tl.math.log2(l), mask=mask_a)  # log2 domain: the backward's exp2 matches it


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


@triton_op("finevit::row_lse", mutates_args=("lse",))
def row_lse_shard(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor) -> None:
    """lse (rows of a,) = log2 Σ_j exp(s·a_i·b_j) over the rows j of this shard of b."""
    options = launch_options()
    grid = (triton.cdiv(a.shape[0], options["BLOCK_A"]),)
    wrap_triton(_row_lse_kernel)[grid](a, b, scale, lse, a.shape[0], b.shape[0], a.shape[1], a.stride(0), b.stride(0),
                                       **options)


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


@row_lse_shard.register_fake
def _(a, b, scale, lse):
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
    shard_lse = torch.empty_like(lse)

    def compute(shard, owner):
        row_lse_shard(a, shard, scale, shard_lse)
        torch.logaddexp2(lse, shard_lse, out=lse)

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
