"""transformers `SiglipVisionModel` and `Siglip2VisionModel` on `finevit.kernels`.

Both call their attention through transformers' attention interface (`ALL_ATTENTION_FUNCTIONS`,
picked by `config._attn_implementation`), so the patch is Liger's kind of one-liner: register a
"finevit" attention function (q, k, v (B, H, N, D) -> varlen_attention) and a "finevit" mask function,
then `tower.set_attn_implementation("finevit")`. The projections, layer norms and MLPs are
transformers' own code.

The mask function matters for SigLIP2's NaFlex inputs: transformers builds no mask at all for an
implementation it has no mask function for, so padding would silently leak into attention. Ours
returns the key-padding mask as a (B, 1, q, kv) boolean *view* of `pixel_attention_mask` (an expand,
no B·N² tensor); the attention function turns it into varlen sequences of the valid patches
(`padded_attention`), and the attention-pooling head, which is not patched, reads the same mask as
from SDPA's mask function. Outputs at padding positions are not defined; every valid token and the
pooled output match the unpatched model.

Patch embeddings: SigLIP's Conv2d(stride = patch) and SigLIP2's Linear over pre-flattened patches
go through `patch_embed`. Not patched: the attention-pooling head (`nn.MultiheadAttention` with one
query), the text tower of a full `SiglipModel` / `Siglip2Model`.
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
)

SIGLIP_CLASSES = (
    ("transformers.models.siglip.modeling_siglip", "SiglipVisionModel"),
    ("transformers.models.siglip2.modeling_siglip2", "Siglip2VisionModel"),
)
ATTN_IMPLEMENTATION = "finevit"


def finevit_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q, k, v (B, H, N, D) -> ((B, N, H, D), no attention weights)."""
    where = f"{type(module).__name__} (attn_implementation={ATTN_IMPLEMENTATION!r})"
    if is_causal or getattr(module, "is_causal", False):
        raise NotImplementedError(f"{where}: finevit's varlen attention is non-causal")
    if dropout:
        raise NotImplementedError(f"{where}: attention dropout {dropout} is not supported")
    if key.shape != query.shape or value.shape != query.shape:
        raise NotImplementedError(f"{where}: self-attention with as many key/value heads as query heads only, "
                                  f"got q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)}")
    batch, _, seqlen, _ = query.shape
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, N, H, D), free views of the projections
    valid = None if attention_mask is None else key_padding_from_mask(attention_mask, batch, seqlen, where)
    return padded_attention(q, k, v, valid, scaling), None


def finevit_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers mask function: the 2D key-padding mask as a (B, 1, q, kv) bool view, or None."""
    from transformers.masking_utils import bidirectional_mask_function

    if mask_function is not None and mask_function is not bidirectional_mask_function:
        raise NotImplementedError(f"attn_implementation={ATTN_IMPLEMENTATION!r} supports bidirectional "
                                  f"key-padding masks only, got mask function {mask_function!r}")
    if attention_mask is None:
        return None
    keys = attention_mask[:, -kv_length:].to(torch.bool)  # (B, kv)
    return keys[:, None, None, :].expand(batch_size, 1, q_length, kv_length)


def register_attention() -> None:
    """Make "finevit" a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, finevit_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, finevit_mask)


def check_siglip_vision(model: nn.Module, attention: bool = True) -> None:
    """Raise UnsupportedModelError when the tower's attention cannot run exactly on the kernels."""
    if not attention:
        return
    config, name = model.config, type(model).__name__
    if config.hidden_size % config.num_attention_heads:
        raise UnsupportedModelError(f"{name}: hidden_size {config.hidden_size} is not a multiple of "
                                    f"num_attention_heads {config.num_attention_heads}")
    check_head_dim(f"{name} (hidden_size {config.hidden_size}, {config.num_attention_heads} heads)",
                   config.hidden_size // config.num_attention_heads)
    check_no_attention_dropout(name, getattr(config, "attention_dropout", 0.0))


def patch_siglip_vision(model: nn.Module, *, attention: bool = True, patch_embed: bool = True) -> nn.Module:
    """Make a transformers `SiglipVisionModel` or `Siglip2VisionModel` run on `finevit.kernels`; returns it.

    attention: the encoder's attention on `varlen_attention` (attn_implementation "finevit").
    patch_embed: the patch projection on `patch_embed`. Idempotent; undo with
    `finevit.integrations.revert_finevit_kernels(model)`, which restores the previous attn_implementation.
    """
    if not is_instance_of(model, SIGLIP_CLASSES):
        raise TypeError(f"patch_siglip_vision expects a transformers SiglipVisionModel or Siglip2VisionModel, "
                        f"got {type(model).__name__}")
    check_siglip_vision(model, attention)  # before changing anything: a refused model is left as it was
    options = {"attention": attention, "patch_embed": patch_embed}
    if prepare(model, options):
        return model
    config, name = model.config, type(model).__name__
    patched, restore = [], {}
    if attention:
        register_attention()
        restore["attn_implementation"] = config._attn_implementation
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        patched.append(f"{config.num_hidden_layers} x {name} attention -> attn_implementation "
                       f"{ATTN_IMPLEMENTATION!r} (finevit.kernels.varlen_attention)")
    if patch_embed:
        embed = getattr(model, "vision_model", model).embeddings.patch_embedding
        if patch_embedding(embed):
            patched.append(f"embeddings.patch_embedding: {type(embed).__name__} -> finevit.kernels.patch_embed")
    mark_patched(model, options, patched, restore)
    return model
