"""SigLIP's pairwise sigmoid loss, tiled: no B×B tensor in the forward or the backward; exact; distributed.

Shapes: img, txt (B, D) in fp16 / bf16 / fp32 (last dim contiguous, any D), row i of img matching row i of
txt; logit_scale (already exponentiated) and logit_bias: one-element tensors. With a process group each rank
passes its shard; the global batch is the concatenation in rank order.

Forward (per rank, over its rows i and every text j of the global batch):
    z_ij = s·x_i·t_j + b,  y_ij = +1 on matching pairs, −1 elsewhere,
    L = Σ_ij −log σ(y_ij z_ij) / B_local,  −log σ(u) = softplus(−u) = max(−u, 0) + log1p(e^−|u|)
Only per-row sums (O(B)) are written. Backward, recomputing each logit tile:
    g_ij = ∂L/∂z_ij = −y_ij σ(−y_ij z_ij) · grad / B_local
    dx_i = s Σ_j g_ij t_j   (row-owner programs)       ds = Σ g_ij (x_i·t_j),  db = Σ g_ij   (same programs)
    dt_j = s Σ_i g_ij x_i   (column-owner programs)
Distributed: text shards travel around a ring (`_pairwise.ring_forward` / `ring_backward`), each step's tile
work overlapping the next transfer; text gradients travel with their shard back to the owner. The scale and
bias gradients are this rank's partial sums (∂L_rank/∂s): the usual data-parallel average of parameter
gradients then equals the gradient of the mean per-rank loss — no all-reduce inside the op (the W× error of
Inf-CL). Values and gradients equal open_clip's `SigLipLoss(rank, world_size)`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _dispatch, reference
from ._pairwise import Ring, _accumulate_grad, _dot_tile, check_contrastive, launch_options, ring_backward, ring_forward


@triton.jit
def _softplus(v):
    """log(1 + e^v), exact for every v: max(v, 0) + log1p(e^−|v|), log1p by its series where 1 + e rounds."""
    e = tl.exp(-tl.abs(v))
    return tl.maximum(v, 0.0) + tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))


@triton.jit
def _siglip_rows_loss_kernel(
    X, T, SCALE, BIAS, ROW_LOSS,  # pointers; ROW_LOSS float32 (rows_x,) += per-row loss over this shard
    rows_x, rows_t, dim, stride_x, stride_t,
    diag_offset,  # image row i matches text row j of this shard iff i + diag_offset == j
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < rows_x
    scale = tl.load(SCALE).to(tl.float32)
    bias = tl.load(BIAS).to(tl.float32)
    total = tl.zeros([BLOCK_A], dtype=tl.float32)
    for start in range(0, rows_t, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)
        mask_b = offs_b < rows_t
        dot = _dot_tile(X, T, offs_a, offs_b, mask_a, mask_b, dim, stride_x, stride_t, BLOCK_A, BLOCK_B, BLOCK_D)
        z = scale * dot + bias
        positive = (offs_a[:, None] + diag_offset) == offs_b[None, :]
        loss = _softplus(tl.where(positive, -z, z))  # −log σ(y·z) = softplus(−y·z)
        total += tl.sum(tl.where(mask_a[:, None] & mask_b[None, :], loss, 0.0), 1)
    tl.store(ROW_LOSS + offs_a, tl.load(ROW_LOSS + offs_a, mask=mask_a) + total, mask=mask_a)


@triton.jit
def _siglip_grad_kernel(
    OWN, OTHER, D_OWN, SCALE, BIAS, COEF, DS, DB,  # D_OWN float32 (rows_own, D) +=; DS, DB float32 (rows_own,) +=
    rows_own, rows_other, dim, stride_own, stride_other, stride_d_own,
    diag_offset,  # image row i matches text row j iff i + diag_offset == j
    OWN_IS_IMAGE: tl.constexpr,  # rows pass (dx, ds, db) or columns pass (dt): decides which index is i
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < rows_own
    scale = tl.load(SCALE).to(tl.float32)
    bias = tl.load(BIAS).to(tl.float32)
    coef = tl.load(COEF).to(tl.float32)  # grad_output / B_local of the rank whose loss this is
    ds = tl.zeros([BLOCK_A], dtype=tl.float32)
    db = tl.zeros([BLOCK_A], dtype=tl.float32)
    for start in range(0, rows_other, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)
        mask_b = offs_b < rows_other
        dot = _dot_tile(OWN, OTHER, offs_a, offs_b, mask_a, mask_b, dim, stride_own, stride_other,
                        BLOCK_A, BLOCK_B, BLOCK_D)
        z = scale * dot + bias
        if OWN_IS_IMAGE:
            positive = (offs_a[:, None] + diag_offset) == offs_b[None, :]
        else:
            positive = (offs_b[None, :] + diag_offset) == offs_a[:, None]
        u = tl.where(positive, z, -z)  # y·z
        e = tl.exp(-tl.abs(u))
        sig = tl.where(u > 0, e, 1.0) / (1.0 + e)  # σ(−u) without overflow
        g = tl.where(mask_a[:, None] & mask_b[None, :], tl.where(positive, -sig, sig) * coef, 0.0)
        if OWN_IS_IMAGE:
            ds += tl.sum(g * dot, 1)
            db += tl.sum(g, 1)
        _accumulate_grad(D_OWN, OTHER, (g * scale).to(OTHER.dtype.element_ty), offs_a, offs_b, mask_a, mask_b,
                         dim, stride_d_own, stride_other, BLOCK_D)
    if OWN_IS_IMAGE:
        tl.store(DS + offs_a, tl.load(DS + offs_a, mask=mask_a) + ds, mask=mask_a)
        tl.store(DB + offs_a, tl.load(DB + offs_a, mask=mask_a) + db, mask=mask_a)


# ----------------------------------------------------------------------------------------------------
# Launchers (one shard of the other side at a time; torch.library ops so torch.compile can trace them)
# ----------------------------------------------------------------------------------------------------


@triton_op("finevit::siglip_rows_loss", mutates_args=("row_loss",))
def siglip_rows_loss(x: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                     diag_offset: int, row_loss: torch.Tensor) -> None:
    """row_loss (rows of x,) += Σ_j −log σ(y_ij z_ij) over the rows j of this text shard."""
    options = launch_options()
    grid = (triton.cdiv(x.shape[0], options["BLOCK_A"]),)
    wrap_triton(_siglip_rows_loss_kernel)[grid](
        x, t, scale, bias, row_loss, x.shape[0], t.shape[0], x.shape[1], x.stride(0), t.stride(0), diag_offset,
        **options,
    )


@triton_op("finevit::siglip_grad", mutates_args=("d_own", "ds", "db"))
def siglip_grad(own: torch.Tensor, other: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                coef: torch.Tensor, diag_offset: int, own_is_image: bool, d_own: torch.Tensor,
                ds: torch.Tensor, db: torch.Tensor) -> None:
    """d_own += s·g @ other over this shard (and ds, db += the row sums when own_is_image)."""
    options = launch_options()
    grid = (triton.cdiv(own.shape[0], options["BLOCK_A"]),)
    wrap_triton(_siglip_grad_kernel)[grid](
        own, other, d_own, scale, bias, coef, ds, db, own.shape[0], other.shape[0], own.shape[1],
        own.stride(0), other.stride(0), d_own.stride(0), diag_offset, OWN_IS_IMAGE=own_is_image, **options,
    )


@siglip_rows_loss.register_fake
def _(x, t, scale, bias, diag_offset, row_loss):
    return None


@siglip_grad.register_fake
def _(own, other, scale, bias, coef, diag_offset, own_is_image, d_own, ds, db):
    return None


# ----------------------------------------------------------------------------------------------------
# Autograd (single process or ring) and the public function
# ----------------------------------------------------------------------------------------------------


class _SigLipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, logit_scale, logit_bias, group):
        scale = logit_scale.detach().reshape(()).float()
        bias = logit_bias.detach().reshape(()).float()
        ring = Ring(group, img.shape[0], img.device) if group is not None else None
        my_offset = ring.offsets[ring.rank] if ring else 0
        row_loss = torch.zeros(img.shape[0], dtype=torch.float32, device=img.device)

        def compute(shard, owner):
            diag_offset = my_offset - (ring.offsets[owner] if ring else 0)
            siglip_rows_loss(img, shard, scale, bias, diag_offset, row_loss)

        ring_forward(ring, txt, compute)
        ctx.save_for_backward(img, txt, scale, bias)
        ctx.ring, ctx.my_offset = ring, my_offset
        ctx.scale_meta = (logit_scale.shape, logit_scale.dtype, logit_bias.shape, logit_bias.dtype)
        return row_loss.sum() / img.shape[0]

    @staticmethod
    def backward(ctx, grad):
        img, txt, scale, bias = ctx.saved_tensors
        ring, my_offset = ctx.ring, ctx.my_offset
        coef = (grad.float() / img.shape[0]).reshape(())
        d_img = torch.zeros(img.shape, dtype=torch.float32, device=img.device)
        ds = torch.zeros(img.shape[0], dtype=torch.float32, device=img.device)
        db = torch.zeros_like(ds)

        def compute(shard, owner, d_shard):
            diag_offset = my_offset - (ring.offsets[owner] if ring else 0)
            siglip_grad(img, shard, scale, bias, coef, diag_offset, True, d_img, ds, db)
            siglip_grad(shard, img, scale, bias, coef, diag_offset, False, d_shard, ds, db)

        d_txt = ring_backward(ring, txt, compute)
        scale_shape, scale_dtype, bias_shape, bias_dtype = ctx.scale_meta
        return (d_img.to(img.dtype), d_txt.to(txt.dtype), ds.sum().reshape(scale_shape).to(scale_dtype),
                db.sum().reshape(bias_shape).to(bias_dtype), None)


def siglip_loss(
    img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, *, group=None
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss, equal to open_clip's `SigLipLoss` (value and gradients).

    img, txt: (B, D) L2-normalized features; row i of img matches row i of txt. logit_scale (already
    exponentiated) and logit_bias: one-element tensors that receive gradients. Logits are
    logit_scale · img @ txtᵀ + logit_bias; the loss is Σ_ij −log σ(±z_ij) / B (+ on matching pairs).
    With `group`, each rank passes its shard, the global batch is the concatenation in rank order and
    each rank's loss covers its own rows against every text. Returns a float32 (float64) scalar.
    """
    check_contrastive("siglip_loss", img, txt, logit_scale, logit_bias, group)
    if not _dispatch.use_triton("siglip_loss", img.device):
        return reference.siglip_loss(img, txt, logit_scale, logit_bias, group=group)
    return _SigLipLoss.apply(img, txt, logit_scale, logit_bias, group)
