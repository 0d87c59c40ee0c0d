"""CLIP's softmax contrastive loss, tiled: no B×B tensor in the forward or the backward; exact; distributed.

Shapes as in `siglip_loss.py` (no bias: a constant shift cancels in a softmax).

    L = ½·[mean_i (lse_i(x → all t) − z_ii) + mean_j (lse_j(t → all x) − z_jj)],   z = s·x tᵀ

Both directions are the same computation with the roles of the two sides swapped: for each local row a_i,
the log-sum-exp of s·a_i·b_j over every row j of the other side in the global batch. The forward keeps an
online max and sum per row (exp2 domain, float32) and writes only the row's LSE, O(B); with a process
group the b shards travel around a ring and the per-shard LSEs are merged with logaddexp. The backward
recomputes each tile with the one-hot of the matching pair folded in, so P_ii − 1 cancels in float32:
    G_ij = grad / (2·B_local) · (exp(z_ij − lse_i) − y_ij)
    da_i = s Σ_j G_ij b_j (row owners, + ds = Σ G_ij a_i·b_j),   db_j = s Σ_i G_ij a_i (column owners)
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
from ._pairwise import Ring, _accumulate_grad, _dot_tile, check_contrastive, launch_options, ring_backward, ring_forward

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
def _row_lse_grad_kernel(
    OWN, OTHER, D_OWN, SCALE, LSE, COEF, DS,  # LSE float32 (log2 domain) per a row; D_OWN, DS float32 +=
    rows_own, rows_other, dim, stride_own, stride_other, stride_d_own,
    diag_offset,  # a row i matches b row j iff i + diag_offset == j
    OWN_IS_A: tl.constexpr,  # rows pass (own = a: da, ds) or columns pass (own = b: db)
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)  # rows this program owns
    mask_a = offs_a < rows_own
    scale = tl.load(SCALE).to(tl.float32)
    scale2 = scale * 1.4426950408889634  # the forward's exp2 domain: P_ii = 1 exactly when it should be
    coef = tl.load(COEF).to(tl.float32)  # grad_output / (2·B_local) of the rank whose loss this is
    if OWN_IS_A:
        lse = tl.load(LSE + offs_a, mask=mask_a, other=0.0)
    ds = tl.zeros([BLOCK_A], dtype=tl.float32)
    for start in range(0, rows_other, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)
        mask_b = offs_b < rows_other
        dot = _dot_tile(OWN, OTHER, offs_a, offs_b, mask_a, mask_b, dim, stride_own, stride_other,
                        BLOCK_A, BLOCK_B, BLOCK_D)
        if OWN_IS_A:
            positive = (offs_a[:, None] + diag_offset) == offs_b[None, :]
            p = tl.math.exp2(scale2 * dot - lse[:, None])
        else:  # the tile is transposed: its columns are the a rows
            positive = (offs_b[None, :] + diag_offset) == offs_a[:, None]
            p = tl.math.exp2(scale2 * dot - tl.load(LSE + offs_b, mask=mask_b, other=0.0)[None, :])
        g = tl.where(mask_a[:, None] & mask_b[None, :], coef * (p - tl.where(positive, 1.0, 0.0)), 0.0)
        if OWN_IS_A:
            ds += tl.sum(g * dot, 1)
        _accumulate_grad(D_OWN, OTHER, (g * scale).to(OTHER.dtype.element_ty), offs_a, offs_b, mask_a, mask_b,
                         dim, stride_d_own, stride_other, BLOCK_D)
    if OWN_IS_A:
        tl.store(DS + offs_a, tl.load(DS + offs_a, mask=mask_a) + ds, mask=mask_a)


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


@triton_op("finevit::row_lse_grad", mutates_args=("d_own", "ds"))
def row_lse_grad_shard(own: torch.Tensor, other: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor,
                       coef: torch.Tensor, diag_offset: int, own_is_a: bool, d_own: torch.Tensor,
                       ds: torch.Tensor) -> None:
    """d_own += s·G @ other (G = coef · (softmax_ij − y_ij)), and ds += its row sums when own_is_a."""
    options = launch_options()
    grid = (triton.cdiv(own.shape[0], options["BLOCK_A"]),)
    wrap_triton(_row_lse_grad_kernel)[grid](
        own, other, d_own, scale, lse, coef, ds, own.shape[0], other.shape[0], own.shape[1],
        own.stride(0), other.stride(0), d_own.stride(0), diag_offset, OWN_IS_A=own_is_a, **options,
    )


@row_lse_shard.register_fake
def _(a, b, scale, lse):
    return None


@row_lse_grad_shard.register_fake
def _(own, other, scale, lse, coef, diag_offset, own_is_a, d_own, ds):
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


def _ring_lse_grad(ring, a, b, scale, lse, coef, d_a, ds) -> torch.Tensor:
    """Adds one direction's gradient into d_a and ds; returns the gradient for the local rows of b."""
    my_offset = ring.offsets[ring.rank] if ring else 0

    def compute(shard, owner, d_shard):
        diag_offset = my_offset - (ring.offsets[owner] if ring else 0)
        row_lse_grad_shard(a, shard, scale, lse, coef, diag_offset, True, d_a, ds)
        row_lse_grad_shard(shard, a, scale, lse, coef, diag_offset, False, d_shard, ds)

    return ring_backward(ring, b, compute)


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
        coef = (grad.float() / (2 * img.shape[0])).reshape(())
        d_img = torch.zeros(img.shape, dtype=torch.float32, device=img.device)
        d_txt = torch.zeros(txt.shape, dtype=torch.float32, device=txt.device)
        ds = torch.zeros(img.shape[0], dtype=torch.float32, device=img.device)
        d_txt += _ring_lse_grad(ctx.ring, img, txt, scale, lse_img, coef, d_img, ds)
        d_img += _ring_lse_grad(ctx.ring, txt, img, scale, lse_txt, coef, d_txt, ds)
        scale_shape, scale_dtype = ctx.scale_meta
        return d_img.to(img.dtype), d_txt.to(txt.dtype), ds.sum().reshape(scale_shape).to(scale_dtype), None


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, *, group=None) -> torch.Tensor:
    """CLIP's softmax contrastive loss, equal to open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)`.

    The mean of the image->text and text->image cross-entropies over the local rows, logits
    logit_scale · img @ txtᵀ against every row of the global batch. Arguments as in `siglip_loss`.
    """
    check_contrastive("clip_loss", img, txt, logit_scale, None, group)
    if not _dispatch.use_triton("clip_loss", img.device):
        return reference.clip_loss(img, txt, logit_scale, group=group)
    return _ClipLoss.apply(img, txt, logit_scale, group)
