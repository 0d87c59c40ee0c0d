"""TextEncoder: a bidirectional transformer over packed texts with 1D RoPE, pooled per text.

Long dense captions are the point of FineViT, so the context is long (512 tokens by default) and
position comes from rotary embeddings (no learned table to outgrow). Texts are packed like images:
input_ids (T,) with cu_seqlens, attended by the same `varlen_attention` (non-causal) as the encoder.
The pooled vector is the last token of each text (its EOS, as SigLIP and CLIP) or the mean of its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from finevit import kernels
from finevit.kernels.attention import SUPPORTED_HEAD_DIMS

from .pretrained import Pretrained
from .vit import Block, check_mlp_kind, init_transformer_weights

POOL_KINDS = ("last", "mean")


@dataclass
class TextConfig:
    vocab_size: int = 32000  # tokenizer vocabulary size
    width: int = 768  # token width
    depth: int = 12  # number of transformer blocks
    num_heads: int = 12  # attention heads; head_dim = width / num_heads (a multiple of 8, 32..256)
    mlp_dim: int = 3072  # hidden width of each block's MLP
    mlp: str = "gelu"  # "gelu" or "swiglu"
    qkv_bias: bool = True  # bias on the q/k/v projection
    norm_eps: float = 1e-6  # LayerNorm epsilon
    rope_theta: float = 10000.0  # 1D RoPE base
    context_length: int = 512  # longest text, in tokens; longer ones are an error (truncate when tokenizing)
    pool: str = "last"  # "last": the final token of each text (EOS); "mean": the mean of its tokens

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"TextConfig: width={self.width} is not divisible by num_heads={self.num_heads}")
        if not kernels.supports_head_dim(self.head_dim):
            raise ValueError(f"TextConfig: head_dim = width / num_heads = {self.head_dim}; "
                             f"finevit.kernels.varlen_attention supports {SUPPORTED_HEAD_DIMS}")
        check_mlp_kind("TextConfig", self.mlp)
        if self.pool not in POOL_KINDS:
            raise ValueError(f"TextConfig: pool must be one of {POOL_KINDS}, got {self.pool!r}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> TextConfig:
        if name not in TEXT_PRESETS:
            raise ValueError(f"TextConfig: unknown preset {name!r}; presets: {', '.join(TEXT_PRESETS)}")
        return replace(TEXT_PRESETS[name], **overrides)


# Text towers paired with the vision presets of the same name (SigLIP pairs towers of equal shape). "cpu"
# (the embedded default, see VIT_PRESETS) is shallower than its vision tower, with the synthetic dataset's
# 512-token vocabulary and a 64-token context: the dense captions' first sentence and largest objects.
TEXT_PRESETS: dict[str, TextConfig] = {
    "tiny": TextConfig(vocab_size=4096, width=128, depth=4, num_heads=4, mlp_dim=512),
    "cpu": TextConfig(vocab_size=512, width=192, depth=2, num_heads=6, mlp_dim=768, context_length=64),
    "b16": TextConfig(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "l16": TextConfig(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "so400m14": TextConfig(width=1152, depth=27, num_heads=16, mlp_dim=4304),
    "g14": TextConfig(width=1280, depth=32, num_heads=16, mlp_dim=5120),
}


class TextEncoder(Pretrained, nn.Module):
    """Bidirectional text transformer over packed token sequences."""

    config_class = TextConfig

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        c = config
        self.token_embed = nn.Embedding(c.vocab_size, c.width)
        self.blocks = nn.ModuleList(
            Block(c.width, c.num_heads, c.mlp_dim, c.mlp, c.qkv_bias, c.norm_eps) for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)

    def init_weights(self) -> None:
        init_transformer_weights(self, self.config.depth)

    def forward_features(self, input_ids, cu_seqlens, max_seqlen: int) -> torch.Tensor:
        """input_ids int (T,), cu_seqlens int32 (num_texts + 1,), max_seqlen int -> token features (T, D)."""
        if max_seqlen > self.config.context_length:
            raise ValueError(f"TextEncoder: max_seqlen={max_seqlen} exceeds context_length="
                             f"{self.config.context_length}; truncate the texts when tokenizing")
        if input_ids.ndim != 1:
            raise ValueError(f"TextEncoder: input_ids must be packed as (total_tokens,), got shape "
                             f"{tuple(input_ids.shape)}")
        _, positions = kernels.packed_token_index(cu_seqlens, input_ids.shape[0])  # position in its text
        cos, sin = kernels.rope_1d_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        x = self.token_embed(input_ids)  # (T, D)
        for block in self.blocks:
            x = block(x, cu_seqlens, max_seqlen, cos, sin)
        return self.norm(x)

    def forward_head(self, tokens, cu_seqlens, max_seqlen: int) -> torch.Tensor:
        """Token features (T, D) -> one vector per text (num_texts, D)."""
        if self.config.pool == "last":
            ends = cu_seqlens[1:].to(torch.int64)
            nonempty = (ends > cu_seqlens[:-1]).to(tokens.dtype)[:, None]  # an empty text pools to zeros
            return tokens[(ends - 1).clamp_min(0)] * nonempty
        padded, valid = kernels.pad_packed(tokens, cu_seqlens, max_seqlen)  # (S, M, D), (S, M)
        counts = valid.sum(dim=1, keepdim=True).clamp_min(1).to(tokens.dtype)
        return padded.sum(dim=1) / counts

    def forward(self, input_ids, cu_seqlens, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (per-token features (T, D), per-text pooled features (num_texts, D))."""
        tokens = self.forward_features(input_ids, cu_seqlens, max_seqlen)
        return tokens, self.forward_head(tokens, cu_seqlens, max_seqlen)
