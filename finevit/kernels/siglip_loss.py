"""SigLIP's pairwise sigmoid loss, tiled: no B×B tensor in the forward or the backward; exact; distributed.

Shapes: img, txt (B, D) in fp16 / bf16 / fp32 (last dim contiguous, any D), row i of img matching row i of
txt; logit_scale (already exponentiated) and logit_bias: one-element tensors. With a process group each rank
passes its shard; the global batch is the concatenation in rank order.

Forward (per rank, over its rows i and every text j of the global batch):
    z_ij = s·x_i·t_j + b,  y_ij = +1 on matching pairs, −1 elsewhere,
    L = Σ_ij −log σ(y_ij z_ij) / B_local,  −log σ(u) = softplus(−u) = max(−u, 0) + log1p(e^−|u|)
Gradients (`_pairwise.contrastive_gradients`): a kernel recomputes each logit tile and writes
    G_ij = s·∂L/∂z_ij = −s·y_ij σ(−y_ij z_ij) / B_local     (a chunk of rows at a time, in the features' dtype)
with each tile's sums of the loss, of g_ij·x_i·t_j (∂L/∂s) and of g_ij (∂L/∂b); then two GEMMs give
    dx = G @ t,   dt = Gᵀ @ x.
Single process, with gradients wanted, bf16 or fp32 features: this runs in the forward (the loss comes from
the same tiles, so the logits are computed once) and the backward only multiplies by the incoming gradient.
Otherwise (fp16, whose G must wait for a loss scaler's gradient; or a ring) the forward writes per-row loss
sums only (O(B)) and the backward runs the gradient pass.
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
from ._pairwise import (
    Ring,
    _dot_tile,
    check_contrastive,
    contrastive_gradients,
    launch_options,
    ring_forward,
)


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
def _siglip_logit_grad_kernel(
    X, T, G, SCALE, BIAS, PARTIALS,  # G (rows_x, rows_t) = s·∂L/∂z; PARTIALS float32 (3, programs)
    COEF,  # float32 scalar: ∂L/∂(Σ_ij loss_ij), e.g. 1 / B_local
    rows_x, rows_t, dim, stride_x, stride_t, stride_g,
    diag_offset,  # image row i matches text row j of this shard iff i + diag_offset == j
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (BLOCK_A, BLOCK_B) tile of G, and the tile's sums of the loss, g·x·t (∂L/∂s) and g (∂L/∂b)."""
    pid_a, pid_b = tl.program_id(0), tl.program_id(1)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_a, mask_b = offs_a < rows_x, offs_b < rows_t
    scale = tl.load(SCALE).to(tl.float32)
    bias = tl.load(BIAS).to(tl.float32)
    coef = tl.load(COEF)
    dot = _dot_tile(X, T, offs_a, offs_b, mask_a, mask_b, dim, stride_x, stride_t, BLOCK_A, BLOCK_B, BLOCK_D)
    z = scale * dot + bias
    positive = (offs_a[:, None] + diag_offset) == offs_b[None, :]
    u = tl.where(positive, z, -z)  # y·z
    e = tl.exp(-tl.abs(u))
    valid = mask_a[:, None] & mask_b[None, :]
    loss = tl.where(valid, _softplus(-u), 0.0)  # −log σ(y·z)
    sig = tl.where(u > 0, e, 1.0) / (1.0 + e)  # σ(−y·z) without overflow
    g = tl.where(valid, tl.where(positive, -sig, sig) * coef, 0.0)
    tl.store(G + offs_a[:, None].to(tl.int64) * stride_g + offs_b[None, :], (g * scale).to(G.dtype.element_ty),
             mask=valid)
    program = pid_a * tl.num_programs(1) + pid_b
    programs = tl.num_programs(0) * tl.num_programs(1)
    tl.store(PARTIALS + program, tl.sum(tl.sum(loss, 1), 0))
    tl.store(PARTIALS + programs + program, tl.sum(tl.sum(g * dot, 1), 0))
    tl.store(PARTIALS + 2 * programs + program, tl.sum(tl.sum(g, 1), 0))


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


@triton_op("finevit::siglip_logit_grad", mutates_args=("g", "partials"))
def siglip_logit_grad(x: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, coef: torch.Tensor,
                      diag_offset: int, g: torch.Tensor, partials: torch.Tensor) -> None:
    """g (rows of x, rows of t) = s·coef·∂(Σ_ij −log σ(y_ij z_ij))/∂z_ij; partials (3, tiles): each tile's
    sums of the loss, of g·x_i·t_j and of g (unscaled by s). `siglip_partials` sizes partials."""
    options = launch_options()
    grid = (triton.cdiv(x.shape[0], options["BLOCK_A"]), triton.cdiv(t.shape[0], options["BLOCK_B"]))
    wrap_triton(_siglip_logit_grad_kernel)[grid](
        x, t, g, scale, bias, partials, coef, x.shape[0], t.shape[0], x.shape[1], x.stride(0), t.stride(0),
        g.stride(0), diag_offset, **options,
    )


def siglip_partials(rows_x: int, rows_t: int, device: torch.device) -> torch.Tensor:
    """The float32 (3, tiles) buffer `siglip_logit_grad` fills for an x chunk of rows_x against rows_t texts."""
    options = launch_options()
    tiles = triton.cdiv(rows_x, options["BLOCK_A"]) * triton.cdiv(rows_t, options["BLOCK_B"])
    return torch.empty((3, tiles), dtype=torch.float32, device=device)


@siglip_rows_loss.register_fake
def _(x, t, scale, bias, diag_offset, row_loss):
    return None


@siglip_logit_grad.register_fake
def _(x, t, scale, bias, coef, diag_offset, g, partials):
    return None


# ----------------------------------------------------------------------------------------------------
# Autograd (single process or ring) and the public function
# ----------------------------------------------------------------------------------------------------


class _SigLipLoss(torch.autograd.Function):
    """Without a process group (and for bf16/fp32 features) the gradients are computed in the forward, from
    the same logit tiles as the loss (one logits product instead of two; the backward only multiplies them
    by the incoming gradient).
    With a group they are computed in the backward, where each rank knows its own incoming gradient: the
    text gradients a rank computes travel to other ranks and must carry that rank's scale, not theirs."""

    @staticmethod
    def forward(ctx, img, txt, logit_scale, logit_bias, group, gradients_in_forward):
        scale = logit_scale.detach().reshape(()).float()
        bias = logit_bias.detach().reshape(()).float()
        ctx.scale_meta = (logit_scale.shape, logit_scale.dtype, logit_bias.shape, logit_bias.dtype)
        ctx.save_for_backward(img, txt, scale, bias)
        ctx.grads = None
        if gradients_in_forward:
            coef = torch.full((), 1.0 / img.shape[0], dtype=torch.float32, device=img.device)
            loss, ctx.grads = _siglip_loss_and_gradients(None, 0, img, txt, scale, bias, coef)
            ctx.ring, ctx.my_offset = None, 0
            return loss
        ring = Ring(group, img.shape[0], img.device) if group is not None else None
        my_offset = ring.offsets[ring.rank] if ring else 0
        row_loss = torch.zeros(img.shape[0], dtype=torch.float32, device=img.device)

        def compute(shard, owner):
            diag_offset = my_offset - (ring.offsets[owner] if ring else 0)
            siglip_rows_loss(img, shard, scale, bias, diag_offset, row_loss)

        ring_forward(ring, txt, compute)
        ctx.ring, ctx.my_offset = ring, my_offset
        return row_loss.sum() / img.shape[0]

    @staticmethod
    def backward(ctx, grad):
        if ctx.grads is not None:
            # The forward's gradients are handed over, not copied (at B = 1M pairs they are 3.2 GB): scaled in
            # place, and dropped from ctx, so that autograd can keep them as the inputs' .grad. A second
            # backward through the same graph (retain_graph) recomputes them below.
            grads, ctx.grads = ctx.grads, None
            for t in grads:
                t.mul_(grad)
        else:
            img, txt, scale, bias = ctx.saved_tensors
            coef = (grad.float() / img.shape[0]).reshape(())
            _, grads = _siglip_loss_and_gradients(ctx.ring, ctx.my_offset, img, txt, scale, bias, coef)
        d_img, d_txt, ds, db = grads
        scale_shape, scale_dtype, bias_shape, bias_dtype = ctx.scale_meta
        return (d_img, d_txt, ds.reshape(scale_shape).to(scale_dtype), db.reshape(bias_shape).to(bias_dtype), None,
                None)


def _siglip_loss_and_gradients(ring, my_offset, img, txt, scale, bias, coef):
    """(loss, (d_img, d_txt, ds, db)) of coef·Σ_ij −log σ(y_ij z_ij) over this rank's images and every text,
    through `contrastive_gradients`; the features' gradients in their dtype, ds and db float32 scalars."""
    sums = torch.zeros(3, dtype=torch.float32, device=img.device)  # loss, ∂/∂s, ∂/∂b (before coef)

    def logit_grad(start, stop, shard, owner, g, swapped):
        diag_offset = start + my_offset - (ring.offsets[owner] if ring else 0)
        partials = siglip_partials(stop - start, shard.shape[0], img.device)
        rows = txt if swapped else img  # G is symmetric in the roles: y_ij and z_ij are
        siglip_logit_grad(rows[start:stop], shard, scale, bias, coef, diag_offset, g, partials)
        if not swapped:
            sums.add_(partials.sum(1))

    d_img, d_txt = contrastive_gradients(ring, img, txt, logit_grad)
    return sums[0] * coef, (d_img.to(img.dtype), d_txt.to(txt.dtype), sums[1], sums[2])


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
    if not _dispatch.use_triton("siglip_loss", img.device) or img.dtype == torch.float64:  # fp64: a test dtype
        return reference.siglip_loss(img, txt, logit_scale, logit_bias, group=group)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (img, txt, logit_scale, logit_bias))
    # Not for fp16: the forward stores G before it knows the incoming gradient, so G = σ·s/B underflows fp16
    # (6.9e-9 at B = 65,536) where the backward's G, times a loss scaler's 65536, is representable.
    in_forward = needs_grad and group is None and img.dtype != torch.float16
    return _SigLipLoss.apply(img, txt, logit_scale, logit_bias, group, in_forward)
