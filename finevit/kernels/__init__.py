"""finevit.kernels: attention, rotary embedding, patch embedding and contrastive losses for ViTs.

Every function checks its inputs (one shared set of checks, clear messages), then runs the Triton kernel
when one exists for the tensors' device, else the pure-PyTorch reference (`finevit.kernels.reference`).
Set `FINEVIT_KERNELS=reference` or `FINEVIT_KERNELS=triton` to force a path. Semantics:
`shared/DESIGN.md`; each docstring below repeats the contract.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _validation as _check
from ._dispatch import implementation
from .reference import rope_1d_cos_sin as _rope_1d_reference
from .reference import rope_2d_cos_sin as _rope_2d_reference
from .utils import cu_seqlens_from_lengths, packed_token_index, pad_packed, unpad_packed

__all__ = [
    "varlen_attention",
    "apply_rope",
    "rope_2d_cos_sin",
    "rope_1d_cos_sin",
    "patch_embed",
    "siglip_loss",
    "clip_loss",
    "packed_token_index",
    "cu_seqlens_from_lengths",
    "pad_packed",
    "unpad_packed",
]


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
    Returns:
        (total_tokens, num_heads, head_dim) in q's dtype, differentiable w.r.t. q, k, v.
    """
    _check.check_varlen_attention(q, k, v, cu_seqlens, max_seqlen, cos, sin, softmax_scale)
    impl = implementation("varlen_attention", q.device)
    return impl(q, k, v, cu_seqlens, max_seqlen, cos=cos, sin=sin, softmax_scale=softmax_scale)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on x (total_tokens, num_heads, head_dim), the same rotation `varlen_attention` fuses.

    cos, sin: float32 (total_tokens, rotary_dim // 2). Computed in float32, returned in x's dtype;
    differentiable w.r.t. x (the backward is the conjugate rotation).
    """
    _check.check_apply_rope(x, cos, sin)
    return implementation("apply_rope", x.device)(x, cos, sin)


def rope_2d_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, rotary_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables for 2D RoPE from patch positions, equal to Qwen2-VL's vision rotary embedding.

    positions: int (total_tokens, 2) = (row, col) of each patch in its image. With r = rotary_dim or
    head_dim (a multiple of 4), inv_freq = theta ** (-arange(0, r/2, 2) / (r/2)) and the angles are
    [row·inv_freq | col·inv_freq]. Returns float32 cos, sin of shape (total_tokens, r/2).
    """
    _check.check_rope_cos_sin("rope_2d_cos_sin", positions, head_dim, theta, rotary_dim, axes=2)
    return _rope_2d_reference(positions, head_dim, theta, rotary_dim)


def rope_1d_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, rotary_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables for 1D (text) RoPE: positions int (total_tokens,), r = rotary_dim or head_dim (even),
    inv_freq = theta ** (-arange(0, r, 2) / r), angles positions·inv_freq -> float32 (total_tokens, r/2).
    """
    _check.check_rope_cos_sin("rope_1d_cos_sin", positions, head_dim, theta, rotary_dim, axes=1)
    return _rope_1d_reference(positions, head_dim, theta, rotary_dim)


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
    """
    _check.check_patch_embed(patches, weight, bias, mean, std)
    return implementation("patch_embed", weight.device)(patches, weight, bias, mean=mean, std=std)


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
    _check.check_contrastive("siglip_loss", img, txt, logit_scale, logit_bias, group)
    return implementation("siglip_loss", img.device)(img, txt, logit_scale, logit_bias, group=group)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, *, group=None) -> torch.Tensor:
    """CLIP's softmax contrastive loss, equal to open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)`.

    The mean of the image->text and text->image cross-entropies over the local rows, logits
    logit_scale · img @ txtᵀ against every row of the global batch. Arguments as in `siglip_loss`.
    """
    _check.check_contrastive("clip_loss", img, txt, logit_scale, None, group)
    return implementation("clip_loss", img.device)(img, txt, logit_scale, group=group)
