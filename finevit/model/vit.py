"""FineViT: a native-resolution vision transformer over packed variable-size images, in one file.

Images keep their aspect ratio; their patches are packed into one token sequence with `cu_seqlens`
(see docs/design.md's packed batch). Position comes only from 2D rotary embeddings of each patch's
(row, col), applied inside `varlen_attention`, so any grid size works without interpolating a table.

    patches uint8 (N, C·P·P) ── patch_embed (normalize + GEMM) ──> (N, D)
      └─ depth × pre-norm Block: x += Attn(LN(x)) with 2D RoPE, x += MLP(LN(x))
      └─ LN ──> per-token features (N, D) ── MAP head (probe attends over each image) ──> (num_images, D)

References: SigLIP / SigLIP 2 (MAP head, So400m shape), Qwen2-VL's vision tower (2D RoPE, packing).
Every op comes from `finevit.kernels`, so the model runs the Triton kernels on GPU and the PyTorch
reference elsewhere. This file never imports torch.distributed: parallelism lives in train/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from finevit import kernels
from finevit.kernels import pad_packed
from finevit.kernels.attention import SUPPORTED_HEAD_DIMS

from .pretrained import Pretrained

MLP_KINDS = ("gelu", "swiglu")

def check_mlp_kind(owner: str, mlp: str) -> None:
    if mlp not in MLP_KINDS:
        raise ValueError(f"{owner}: mlp must be one of {MLP_KINDS}, got {mlp!r}")


@dataclass
class FineViTConfig:
    patch_size: int = 16  # side of a square patch, in pixels
    in_channels: int = 3  # image channels C; a patch has C·P·P values in (C, P, P) order
    width: int = 768  # token width D
    depth: int = 12  # number of transformer blocks
    num_heads: int = 12  # attention heads; head_dim = width / num_heads (a multiple of 8, 32..256)
    mlp_dim: int = 3072  # hidden width of each block's MLP
    mlp: str = "gelu"  # "gelu" (ViT / SigLIP) or "swiglu" (SiLU-gated, as in Qwen2.5-VL)
    qkv_bias: bool = True  # bias on the q/k/v projection
    norm_eps: float = 1e-6  # LayerNorm epsilon
    rope_theta: float = 10000.0  # 2D RoPE base; half the rotary pairs encode rows, half columns
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # per-channel mean of (pixels / 255), as SigLIP
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)  # per-channel std of (pixels / 255)

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"FineViTConfig: width={self.width} is not divisible by num_heads={self.num_heads}")
        if not kernels.supports_head_dim(self.head_dim):
            raise ValueError(f"FineViTConfig: head_dim = width / num_heads = {self.head_dim}; "
                             f"finevit.kernels.varlen_attention supports {SUPPORTED_HEAD_DIMS}")
        check_mlp_kind("FineViTConfig", self.mlp)
        if not len(self.image_mean) == len(self.image_std) == self.in_channels:
            raise ValueError(f"FineViTConfig: image_mean and image_std need in_channels={self.in_channels} "
                             f"values, got {len(self.image_mean)} and {len(self.image_std)}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_features(self) -> int:
        return self.in_channels * self.patch_size**2

    @classmethod
    def from_name(cls, name: str, **overrides) -> FineViTConfig:
        if name not in VIT_PRESETS:
            raise ValueError(f"FineViTConfig: unknown preset {name!r}; presets: {', '.join(VIT_PRESETS)}")
        return replace(VIT_PRESETS[name], **overrides)


# Widths, depths and heads of the standard ViT family; so400m14 is SigLIP's shape (head dim 72) and
# g14 a ~0.9B encoder with Qwen2-VL's head dim 80. "tiny" is the test size; "cpu" is the embedded default
# (train/config.py, configs/stage1/cpu.toml) sized for 2 CPU cores: few, wide layers run closer to the
# matmul peak, and the input is normalized with the synthetic scenes' pixel mean and std (light
# backgrounds): with SigLIP's 0.5 / 0.5 every background patch embeds to nearly the same vector, all images
# start out identical (cosine 0.98) and training stalls on the collapsed plateau of the loss for hundreds
# of steps.
VIT_PRESETS: dict[str, FineViTConfig] = {
    "tiny": FineViTConfig(patch_size=16, width=128, depth=4, num_heads=4, mlp_dim=512),
    "cpu": FineViTConfig(patch_size=16, width=192, depth=3, num_heads=6, mlp_dim=768,
                         image_mean=(0.85, 0.86, 0.85), image_std=(0.12, 0.12, 0.15)),
    "b16": FineViTConfig(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072),
    "l16": FineViTConfig(patch_size=16, width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "so400m14": FineViTConfig(patch_size=14, width=1152, depth=27, num_heads=16, mlp_dim=4304),
    "g14": FineViTConfig(patch_size=14, width=1280, depth=40, num_heads=16, mlp_dim=6144),
}


# ----------------------------------------------------------------------------------------------------
# Layers (shared with the text tower)
# ----------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention inside each packed sequence, RoPE fused into the attention op."""

    def __init__(self, width: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)
        # The backward's kind (`varlen_attention(deterministic=...)`): a runtime switch, not part of the config.
        self.deterministic = True

    def forward(self, x, cu_seqlens, max_seqlen: int, cos, sin):
        num_tokens, width = x.shape
        qkv = self.qkv(x).view(num_tokens, 3, self.num_heads, self.head_dim)  # (N, 3, H, Dh)
        q, k, v = qkv.unbind(1)  # each (N, H, Dh), last dim contiguous
        out = kernels.varlen_attention(q, k, v, cu_seqlens, max_seqlen, cos=cos, sin=sin,
                                       deterministic=self.deterministic)  # (N, H, Dh)
        return self.proj(out.reshape(num_tokens, width))


def set_attention_deterministic(model: nn.Module, deterministic: bool) -> None:
    """The attention backward of every `Attention` layer in `model` (`varlen_attention(deterministic=...)`): True,
    the default, two kernels and bitwise-reproducible gradients; False, one pass over the keys that adds dQ with
    atomics (less work; dQ's last bits vary between runs)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.deterministic = deterministic


class MLP(nn.Module):
    """fc2(act(fc1(x))): GELU (tanh approximation, as SigLIP) or SwiGLU (fc1 yields gate and value)."""

    def __init__(self, width: int, hidden: int, kind: str):
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(width, 2 * hidden if kind == "swiglu" else hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        h = self.fc1(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)  # (N, hidden) each
            h = F.silu(gate) * value
        else:
            h = F.gelu(h, approximate="tanh")
        return self.fc2(h)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then + MLP(LN(x))."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, mlp: str, qkv_bias: bool, norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, mlp_dim, mlp)

    def forward(self, x, cu_seqlens, max_seqlen: int, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Linear patch embedding over (C, P, P)-flattened patches; uint8 pixels are normalized in the op."""

    def __init__(self, patch_features: int, width: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, patch_features))  # = Conv2d weight.reshape(D, -1)
        self.bias = nn.Parameter(torch.empty(width))
        self.mean, self.std = mean, std

    def forward(self, patches):
        if patches.dtype == torch.uint8:
            return kernels.patch_embed(patches, self.weight, self.bias, mean=self.mean, std=self.std)
        return kernels.patch_embed(patches, self.weight, self.bias)


class MAPHead(nn.Module):
    """Multihead attention pooling (SigLIP's MAP head): a learned probe attends over each sequence's tokens,
    then a residual MLP: y = attn(probe, x); y = y + MLP(LN(y)). One pooled vector per sequence."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, mlp: str, norm_eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.probe = nn.Parameter(torch.empty(width))
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, mlp_dim, mlp)

    def forward(self, x, cu_seqlens, max_seqlen: int):
        num_tokens, width = x.shape
        q = self.q(self.probe).view(self.num_heads, self.head_dim)  # (H, Dh)
        kv = self.kv(x).view(num_tokens, 2, self.num_heads, self.head_dim)  # (N, 2, H, Dh)
        kv, valid = pad_packed(kv, cu_seqlens, max_seqlen)  # (S, M, 2, H, Dh), (S, M)
        k, v = kv.unbind(2)  # (S, M, H, Dh) each
        compute = torch.float64 if k.dtype == torch.float64 else torch.float32  # softmax in >= float32
        scores = torch.einsum("smhd,hd->smh", k.to(compute), q.to(compute)) * self.head_dim**-0.5  # (S, M, H)
        # An empty sequence keeps its (zero) first slot visible: its pooled vector is finite, never NaN.
        valid[:, 0] = True
        weights = scores.masked_fill(~valid[:, :, None], float("-inf")).softmax(dim=1).to(v.dtype)
        pooled = torch.einsum("smh,smhd->shd", weights, v).reshape(-1, width)  # (S, D)
        y = self.proj(pooled)
        return y + self.mlp(self.norm(y))


def init_transformer_weights(model: nn.Module, depth: int) -> None:
    """Truncated-normal(0.02) linears and embeddings, zero biases, unit LayerNorms; the projections that
    write into the residual stream (attn.proj, mlp.fc2) scaled by 1/sqrt(2·depth), as in GPT-2."""
    residual_std = 0.02 / math.sqrt(2 * depth)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = residual_std if name.endswith(("attn.proj", "mlp.fc2")) else 0.02
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()
        elif isinstance(module, PatchEmbed):
            # LeCun-normal over the patch's C·P·P inputs (what a Conv2d patch embedding gets, by fan-in).
            std = module.weight.shape[1] ** -0.5
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, MAPHead):
            nn.init.normal_(module.probe, std=0.02)


# ----------------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------------


class FineViT(Pretrained, nn.Module):
    """Native-resolution ViT over a packed batch of images.

    `__init__` only allocates (build it under `torch.device("meta")` and shard before materializing);
    `init_weights()` initializes.
    """

    config_class = FineViTConfig

    def __init__(self, config: FineViTConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = PatchEmbed(c.patch_features, c.width, c.image_mean, c.image_std)
        self.blocks = nn.ModuleList(
            Block(c.width, c.num_heads, c.mlp_dim, c.mlp, c.qkv_bias, c.norm_eps) for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.head = MAPHead(c.width, c.num_heads, c.mlp_dim, c.mlp, c.norm_eps)

    def init_weights(self) -> None:
        init_transformer_weights(self, self.config.depth)

    def forward_features(self, patches, positions, cu_seqlens, max_seqlen: int) -> torch.Tensor:
        """patches (N, C·P·P) uint8 (or float), positions int (N, 2) = (row, col), cu_seqlens int32
        (num_images + 1,), max_seqlen int -> per-token features (N, D)."""
        if patches.shape[0] != positions.shape[0]:
            raise ValueError(f"FineViT: patches and positions must have one row per patch, got "
                             f"{patches.shape[0]} and {positions.shape[0]}")
        cos, sin = kernels.rope_2d_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        x = self.patch_embed(patches)  # (N, D)
        for block in self.blocks:
            x = block(x, cu_seqlens, max_seqlen, cos, sin)
        return self.norm(x)

    def forward_head(self, tokens, cu_seqlens, max_seqlen: int) -> torch.Tensor:
        """Per-token features (N, D) -> one pooled vector per image (num_images, D)."""
        return self.head(tokens, cu_seqlens, max_seqlen)

    def forward(self, patches, positions, cu_seqlens, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (per-token features (N, D), per-image pooled features (num_images, D))."""
        tokens = self.forward_features(patches, positions, cu_seqlens, max_seqlen)
        return tokens, self.forward_head(tokens, cu_seqlens, max_seqlen)
