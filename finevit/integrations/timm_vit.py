"""timm `VisionTransformer` and `NaFlexVit` on `finevit.kernels`.

Each block's `timm.layers.Attention` runs its qkv projection, q/k norms, output norm, gate and
projection as before; only the attention product goes through `varlen_attention`:
- no mask (plain ViT, class token and registers included): B sequences of N tokens, a free reshape;
- a padding mask (NaFlex's `patch_valid`, turned by timm into a symmetric (B, 1, N, N) or key-only
  (B, 1, 1, N) mask, or a mask passed to `forward_features`): each row's valid tokens form one sequence
  (`padded_attention`), so valid tokens attend exactly to the valid tokens of their image.
Outputs at padding positions are not defined (ours: attention among the padding; timm's: the mean of all
values under a symmetric mask, attention to the valid keys under a key-only one); pooling and every valid
token match the unpatched model.

The patch embedding (`PatchEmbed.proj`, a Conv2d with stride = kernel; NaFlex's Linear over
pre-flattened patches or its conv) goes through `patch_embed`.

Not patched, and left as they are: the attention-pool head (`global_pool='map'`, a cross-attention of a
few latent queries) and anything outside the blocks. Refused: blocks whose attention is not
`timm.layers.Attention` (parallel blocks, DiffAttention, EVA/RoPE attention: timm's default rotary
layout is interleaved, not the kernel's rotate-half), attention dropout, head dims the kernel lacks.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import (
    UnsupportedModelError,
    check_head_dim,
    check_no_attention_dropout,
    is_instance_of,
    key_padding_from_mask,
    mark_patched,
    padded_attention,
    patch_embedding,
    prepare,
    replace_forward,
)

TIMM_VIT_CLASSES = (("timm.models.vision_transformer", "VisionTransformer"), ("timm.models.naflexvit", "NaFlexVit"))


def attention_forward(
    self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    """`timm.layers.Attention.forward` with the attention product on `finevit.kernels.varlen_attention`."""
    if is_causal:
        raise NotImplementedError("finevit-patched timm Attention is non-causal; revert the patch for is_causal=True")
    batch, seqlen, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    q, k, v = self.qkv(x).reshape(batch, seqlen, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, H, D)
    q, k = self.q_norm(q), self.k_norm(k)  # over head_dim: the same as timm's (B, H, N, D) layout
    valid = None
    if attn_mask is not None:
        valid = key_padding_from_mask(attn_mask, batch, seqlen, f"{type(self).__name__} (finevit-patched)")
    x = padded_attention(q, k, v, valid, self.scale)  # (B, N, H, D)
    x = self.norm(x.reshape(batch, seqlen, self.num_heads * self.head_dim))
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def check_timm_vit(model: nn.Module, attention: bool = True) -> list[tuple[str, nn.Module]]:
    """(name, attention) of every block to patch; raises UnsupportedModelError when one cannot run exactly."""
    if not attention:
        return []
    from timm.layers import Attention

    found, refused = [], []
    for index, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        name = f"blocks.{index}.attn"
        if not isinstance(attn, Attention) or type(attn).forward is not Attention.forward:
            what = type(attn).__name__ if attn is not None else f"{type(block).__name__} (no .attn module)"
            refused.append(f"{name}: {what}")
            continue
        found.append((name, attn))
    if refused:
        raise UnsupportedModelError(
            f"{type(model).__name__}: finevit patches blocks whose attention is timm.layers.Attention; "
            f"these are not: {', '.join(refused)}"
        )
    for name, attn in found:
        check_head_dim(f"{type(model).__name__}.{name}", attn.head_dim)
        check_no_attention_dropout(f"{type(model).__name__}.{name}", attn.attn_drop.p)
    return found


def patch_timm_vit(model: nn.Module, *, attention: bool = True, patch_embed: bool = True) -> nn.Module:
    """Make a timm `VisionTransformer` or `NaFlexVit` run on `finevit.kernels`; returns `model`.

    attention: each block's attention product on `varlen_attention` (padding masks become varlen
    sequences). patch_embed: the patch projection on `patch_embed`. Idempotent; undo with
    `finevit.integrations.revert_finevit_kernels(model)`.
    """
    if not is_instance_of(model, TIMM_VIT_CLASSES):
        raise TypeError(f"patch_timm_vit expects a timm VisionTransformer or NaFlexVit, got {type(model).__name__}")
    modules = check_timm_vit(model, attention)  # before changing anything: a refused model is left as it was
    options = {"attention": attention, "patch_embed": patch_embed}
    if prepare(model, options):
        return model
    patched = []
    for _, attn in modules:
        replace_forward(attn, attention_forward)
    if modules:
        patched.append(f"{len(modules)} x timm Attention -> finevit.kernels.varlen_attention")
    if patch_embed:
        embed_name, embed = ("embeds.proj", model.embeds.proj) if hasattr(model, "embeds") else (
            "patch_embed.proj", getattr(model.patch_embed, "proj", None))
        if embed is not None and patch_embedding(embed):
            patched.append(f"{embed_name}: {type(embed).__name__} -> finevit.kernels.patch_embed")
    mark_patched(model, options, patched)
    return model
