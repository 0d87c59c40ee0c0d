"""Pure-PyTorch reference of every public op of `finevit.kernels`.

These functions are the oracle the Triton kernels are tested against (run them in float64 for that)
and the path taken on devices without a kernel. They assume inputs already checked (the public
functions check them) and follow the semantics of docs/design.md exactly:

- `varlen_attention`: non-causal attention inside each packed sequence, none across sequences.
- `apply_rope` / `rope_2d_cos_sin`: the rotate-half 2D rotary embedding of Qwen2-VL's vision tower
  (transformers `apply_rotary_pos_emb_vision` and `Qwen2VLVisionRotaryEmbedding`), with the duplicated
  cos/sin halves removed. `rope_1d_cos_sin` is the usual 1D (NeoX / Llama) table in the same layout.
- `patch_embed`: `Conv2d(C, D, P, stride=P)` on `(x / 255 - mean) / std` images, as a GEMM on
  `(C, P, P)`-flattened patches.
- `siglip_loss` / `clip_loss`: open_clip's `SigLipLoss` and `ClipLoss(local_loss=True,
  gather_with_grad=True)`; with a process group each rank holds its shard of the global batch.

Low-precision inputs are computed in float32 (float64 stays float64) wherever the math accumulates:
rotations, normalization, logits and losses. Attention runs in the input dtype through
`scaled_dot_product_attention`, which accumulates in float32 itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .utils import pad_packed, unpad_packed


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# Rotary embedding
# ----------------------------------------------------------------------------------------------------


def rope_2d_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, rotary_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) positions (T, 2) -> float32 cos, sin (T, r/2) with angles [row·inv_freq | col·inv_freq]."""
    half = (rotary_dim or head_dim) // 2
    # Written as Qwen2-VL writes it (1 / theta ** (i / half)) so the float32 values are bit-identical.
    exponents = torch.arange(0, half, 2, dtype=torch.float32, device=positions.device) / half
    inv_freq = 1.0 / (theta**exponents)  # (r/4,)
    angles = positions.to(torch.float32)[:, :, None] * inv_freq  # (T, 2, r/4)
    angles = angles.flatten(1)  # (T, r/2): rows' angles, then columns'
    return angles.cos(), angles.sin()


def rope_1d_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, rotary_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions (T,) -> float32 cos, sin (T, r/2): the standard 1D rotate-half RoPE table."""
    r = rotary_dim or head_dim
    exponents = torch.arange(0, r, 2, dtype=torch.float32, device=positions.device) / r
    inv_freq = 1.0 / (theta**exponents)  # (r/2,)
    angles = positions.to(torch.float32)[:, None] * inv_freq  # (T, r/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first r = 2·cos.shape[-1] channels of x (T, H, D); the rest pass through.

    x1 = x[..., :r/2], x2 = x[..., r/2:r];  x1' = x1·cos − x2·sin;  x2' = x2·cos + x1·sin.
    """
    half = cos.shape[-1]
    compute = _compute_dtype(x.dtype)
    x1 = x[..., :half].to(compute)  # (T, H, r/2)
    x2 = x[..., half : 2 * half].to(compute)
    c = cos.to(compute)[:, None, :]  # (T, 1, r/2), broadcast over heads
    s = sin.to(compute)[:, None, :]
    rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
    return torch.cat([rotated, x[..., 2 * half :]], dim=-1)


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


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
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v inside each sequence of the packed batch; q, k, v: (T, H, D).

    The packed tokens are scattered into a zero-padded (num_seqs, max_seqlen) batch and attended with a
    key-padding mask, so no host sync is needed and gradients flow back through the scatter.
    """
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q_pad, key_valid = pad_packed(q, cu_seqlens, max_seqlen)  # (S, M, H, D), (S, M)
    k_pad, _ = pad_packed(k, cu_seqlens, max_seqlen)
    v_pad, _ = pad_packed(v, cu_seqlens, max_seqlen)
    # Key 0 stays visible so the padded query rows of an empty sequence get finite (discarded) outputs.
    key_valid[:, 0] = True
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), k_pad.transpose(1, 2), v_pad.transpose(1, 2),  # (S, H, M, D)
        attn_mask=key_valid[:, None, None, :], scale=softmax_scale,
    )
    return unpad_packed(out.transpose(1, 2), cu_seqlens, q.shape[0])  # (T, H, D)


# ----------------------------------------------------------------------------------------------------
# Patch embedding
# ----------------------------------------------------------------------------------------------------


def patch_embed(
    patches: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """(N, C·P·P) patches -> (N, D) = normalize(patches) @ weightᵀ + bias, in weight's dtype."""
    x = patches
    if patches.dtype == torch.uint8:
        compute = _compute_dtype(weight.dtype)
        num_patches, num_features = patches.shape
        channels = len(mean)
        mean_t = torch.tensor(mean, dtype=compute, device=patches.device)[:, None]  # (C, 1)
        std_t = torch.tensor(std, dtype=compute, device=patches.device)[:, None]
        x = patches.to(compute).view(num_patches, channels, num_features // channels)  # (N, C, P·P)
        x = ((x / 255.0 - mean_t) / std_t).view(num_patches, num_features).to(weight.dtype)
    return F.linear(x, weight, bias)


# ----------------------------------------------------------------------------------------------------
# Contrastive losses
# ----------------------------------------------------------------------------------------------------


def gather_rows(x: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's rows of x in rank order, with autograd; returns (all rows, my offset).

    Ranks may hold different numbers of rows (token-budget batches): rows are padded to the largest
    shard for the collective and trimmed after. The backward sums each rank's gradient contributions
    into the owner's rows (open_clip's `gather_with_grad`), so the usual data-parallel average of
    parameter gradients equals the gradient of the mean of the per-rank losses.
    """
    if group is None:
        return x, 0
    import torch.distributed as dist
    import torch.distributed._functional_collectives as collectives

    # The autograd all-gather was renamed in torch 2.12; keep working on 2.11.
    all_gather = getattr(collectives, "all_gather_single_autograd", None) or collectives.all_gather_tensor_autograd

    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[0]))
    shards = all_gather(padded, gather_dim=0, group=group).split(max(sizes))
    return torch.cat([shard[:n] for shard, n in zip(shards, sizes)]), sum(sizes[:rank])


def siglip_loss(
    img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, *, group=None
) -> torch.Tensor:
    """Sigmoid loss: Σ_ij −log σ(y_ij · z_ij) / B_local, z = s·x_i·t_j + b, y = +1 on matching pairs, −1 elsewhere.

    y·z is the logits negated except at the matching pairs (no labels matrix). `logsigmoid` is exact
    everywhere, unlike `F.softplus`, whose default threshold returns u itself for u > 20 (an error of
    up to e^-20 per pair, which the sum over B² pairs makes visible).
    """
    compute = _compute_dtype(img.dtype)
    x, t = img.to(compute), txt.to(compute)
    all_t, offset = gather_rows(t, group)
    scale, bias = logit_scale.to(compute).reshape(()), logit_bias.to(compute).reshape(())
    logits = scale * (x @ all_t.T) + bias  # (B_local, B_global)
    rows = torch.arange(x.shape[0], device=x.device)
    pairs = (rows, rows + offset)
    signed = (-logits).index_put(pairs, logits[pairs])  # y·z
    return -F.logsigmoid(signed).sum() / x.shape[0]


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, *, group=None) -> torch.Tensor:
    """Softmax contrastive loss: ½·[CE(s·x tᵀ, pairs) + CE(s·t xᵀ, pairs)] over the local rows."""
    compute = _compute_dtype(img.dtype)
    x, t = img.to(compute), txt.to(compute)
    all_t, offset = gather_rows(t, group)
    all_x, _ = gather_rows(x, group)
    scale = logit_scale.to(compute).reshape(())
    labels = torch.arange(x.shape[0], device=x.device) + offset
    logits_per_image = scale * (x @ all_t.T)  # (B_local, B_global)
    logits_per_text = scale * (t @ all_x.T)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
