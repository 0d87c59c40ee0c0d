"""transformers Qwen2-VL / Qwen2.5-VL vision towers on `finevit.kernels`, RoPE fused into attention.

Their attention applies `apply_rotary_pos_emb_vision` to q and k *before* the attention-interface call,
so an attention function alone could not fuse the rotation: each `VisionAttention` /
`Qwen2_5_VLVisionAttention` gets a new forward instead, which runs the qkv projection, then
`varlen_attention(q, k, v, cu_seqlens, max_seqlen, cos=cos[:, :D/2], sin=sin[:, :D/2])` on the tower's own
cu_seqlens, then the output projection. The tower's cos/sin are `[c_h, c_w, c_h, c_w]`: Qwen's
rotate-half with the duplicated halves, which the kernel takes de-duplicated. The tower is unchanged
otherwise, so Qwen2.5-VL keeps its window attention: its windowed layers receive `cu_window_seqlens`
(tokens already in window order), the `fullatt_block_indexes` layers the per-image `cu_seqlens`.

The tower's forward gets a thin wrapper that computes `max_seqlen` once per call from `grid_thw` (and
an upper bound of `max_window_seqlen`, the window's token count) and hands them over as the precomputed
kwargs transformers' `vision_utils` accept, so no layer reads cu_seqlens on the host. Unpatched with
SDPA, every layer splits q/k/v per image (or per window) on the host and runs one SDPA call each.

The Conv3d patch embedding (stride = kernel over the pre-flattened (C, T, P, P) patches) goes
through `patch_embed`: the input reshape is free and the conv becomes one GEMM. Not patched: the
patch merger (norm + MLP), the LLM.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from finevit import kernels
from finevit.kernels._validation import should_check_values

from ._common import (
    PREVIOUS_FORWARD_ATTR,
    UnsupportedModelError,
    autocast_inputs,
    check_head_dim,
    is_instance_of,
    mark_patched,
    patch_embedding,
    prepare,
    replace_forward,
)

QWEN2_VL_CLASSES = (
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VisionTransformerPretrainedModel"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"),
)
_ATTENTION_CLASSES = {"VisionAttention", "Qwen2_5_VLVisionAttention"}
_ROTARY_CLASSES = {"Qwen2VLVisionRotaryEmbedding", "Qwen2_5_VLVisionRotaryEmbedding"}


def vision_attention_forward(
    self,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """Qwen2(.5)-VL vision attention on `varlen_attention`: (T, dim) -> (T, dim), RoPE fused."""
    seq_length = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).unbind(1)  # (T, H, D), views
    cos = sin = None
    if position_embeddings is not None:
        cos, sin = position_embeddings  # (T, D) float32 = [c, c]: rotate-half with duplicated halves
        half = q.shape[-1] // 2
        if should_check_values(cos) and not (torch.equal(cos[:, :half], cos[:, half:])
                                             and torch.equal(sin[:, :half], sin[:, half:])):
            raise ValueError(f"{type(self).__name__} (finevit-patched): cos/sin halves differ, so this is not "
                             f"Qwen2-VL's rotate-half vision RoPE; revert the patch")
        cos, sin = cos[:, :half].float(), sin[:, :half].float()  # (T, D/2) views
    if max_seqlen is None:  # called outside a patched tower: one host read of cu_seqlens
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    q, k, v = autocast_inputs(q, k, v)
    out = kernels.varlen_attention(q, k, v, cu_seqlens.to(torch.int32), int(max_seqlen), cos=cos, sin=sin,
                                   softmax_scale=self.scaling)  # (T, H, D)
    return self.proj(out.reshape(seq_length, -1))


def _max_seqlens(tower: nn.Module, grid_thw: torch.Tensor, kwargs: dict) -> dict:
    """kwargs plus `max_seqlen` (and `max_window_seqlen` for Qwen2.5-VL) when the caller gave none."""
    kwargs = dict(kwargs)
    if kwargs.get("max_seqlen") is None:
        if kwargs.get("cu_seqlens") is not None:
            cu = kwargs["cu_seqlens"]
            kwargs["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
        else:  # one image or frame per sequence: h·w tokens
            kwargs["max_seqlen"] = int((grid_thw[:, 1] * grid_thw[:, 2]).max())
    if hasattr(tower, "fullatt_block_indexes") and kwargs.get("max_window_seqlen") is None:
        if kwargs.get("cu_window_seqlens") is not None:
            cu = kwargs["cu_window_seqlens"]
            kwargs["max_window_seqlen"] = int((cu[1:] - cu[:-1]).max())
        else:  # a window is at most (window_size / patch_size)² tokens of one frame; an upper bound is enough
            merge = tower.spatial_merge_size
            window_tokens = (tower.window_size // merge // tower.patch_size * merge) ** 2
            kwargs["max_window_seqlen"] = min(window_tokens, kwargs["max_seqlen"])
    return kwargs


def tower_forward(self, *args, **kwargs):
    """The tower's own forward, given max_seqlen / max_window_seqlen computed once per call."""
    grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
    previous = self.__dict__.get(PREVIOUS_FORWARD_ATTR) or functools.partial(type(self).forward, self)
    return previous(*args, **_max_seqlens(self, grid_thw, kwargs))


def check_qwen2_vl_vision(model: nn.Module, attention: bool = True) -> list[tuple[str, nn.Module]]:
    """(name, attention) of every block to patch; raises UnsupportedModelError when one cannot run exactly."""
    if not attention:
        return []
    name = type(model).__name__
    modules = [(f"blocks.{i}.attn", block.attn) for i, block in enumerate(model.blocks)]
    for where, attn in modules:
        if type(attn).__name__ not in _ATTENTION_CLASSES:
            raise UnsupportedModelError(f"{name}.{where} is a {type(attn).__name__}; finevit patches "
                                        f"{' / '.join(sorted(_ATTENTION_CLASSES))}")
        check_head_dim(f"{name}.{where}", attn.head_dim)
    if type(model.rotary_pos_emb).__name__ not in _ROTARY_CLASSES:
        raise UnsupportedModelError(f"{name}.rotary_pos_emb is a {type(model.rotary_pos_emb).__name__}; finevit "
                                    f"fuses Qwen2-VL's 2D rotate-half RoPE only")
    return modules


def patch_qwen2_vl_vision(model: nn.Module, *, attention: bool = True, patch_embed: bool = True) -> nn.Module:
    """Make a transformers Qwen2-VL or Qwen2.5-VL vision tower run on `finevit.kernels`; returns it.

    attention: every block's attention on `varlen_attention` with the tower's cu_seqlens (window
    cu_seqlens in Qwen2.5-VL's windowed layers) and RoPE fused. patch_embed: the Conv3d patch
    embedding on `patch_embed`. Idempotent; undo with `finevit.integrations.revert_finevit_kernels(model)`.
    """
    if not is_instance_of(model, QWEN2_VL_CLASSES):
        raise TypeError(f"patch_qwen2_vl_vision expects a transformers Qwen2VisionTransformerPretrainedModel or "
                        f"Qwen2_5_VisionTransformerPretrainedModel, got {type(model).__name__}")
    modules = check_qwen2_vl_vision(model, attention)  # before changing anything: a refused model is left as it was
    options = {"attention": attention, "patch_embed": patch_embed}
    if prepare(model, options):
        return model
    patched = []
    for _, attn in modules:
        replace_forward(attn, vision_attention_forward)
    if modules:
        replace_forward(model, tower_forward)
        patched.append(f"{len(modules)} x {type(modules[0][1]).__name__} -> finevit.kernels.varlen_attention "
                       f"(RoPE fused, the tower's cu_seqlens)")
    if patch_embed and patch_embedding(model.patch_embed.proj):
        patched.append(f"patch_embed.proj: {type(model.patch_embed.proj).__name__} -> finevit.kernels.patch_embed")
    mark_patched(model, options, patched)
    return model
