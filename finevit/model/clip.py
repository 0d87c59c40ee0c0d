"""FineCLIP: the FineViT image tower and the text tower, projected to a shared space for contrastive training.

`encode_image` / `encode_text` return L2-normalized embeddings. The logit scale is learned in log space
and the bias directly (SigLIP init: scale log 10, bias −10; CLIP init: scale log(1/0.07), no bias); the
loss itself is outside the model: `finevit.kernels.siglip_loss(img, txt, model.logit_scale.exp(),
model.logit_bias)` or `clip_loss(img, txt, model.logit_scale.exp())`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .pretrained import Pretrained
from .text import TEXT_PRESETS, TextConfig, TextEncoder
from .vit import VIT_PRESETS, FineViT, FineViTConfig

LOSS_KINDS = ("siglip", "clip")
INIT_LOGIT_SCALE = {"siglip": math.log(10.0), "clip": math.log(1 / 0.07)}
INIT_LOGIT_BIAS = -10.0


@dataclass
class FineCLIPConfig:
    vision: FineViTConfig = field(default_factory=FineViTConfig)  # image tower
    text: TextConfig = field(default_factory=TextConfig)  # text tower
    embed_dim: int = 768  # width of the shared image-text space
    loss: str = "siglip"  # "siglip" (sigmoid, learned bias) or "clip" (softmax, no bias)
    init_logit_scale: float | None = None  # log of the initial scale; None: log 10 (siglip), log(1/0.07) (clip)
    init_logit_bias: float | None = None  # initial bias (siglip only); None: -10

    def __post_init__(self):
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"FineCLIPConfig: loss must be one of {LOSS_KINDS}, got {self.loss!r}")
        if self.init_logit_bias is not None and self.loss != "siglip":
            raise ValueError("FineCLIPConfig: init_logit_bias applies to the siglip loss only")

    @classmethod
    def from_name(cls, name: str, **overrides) -> FineCLIPConfig:
        if name not in VIT_PRESETS:
            raise ValueError(f"FineCLIPConfig: unknown preset {name!r}; presets: {', '.join(VIT_PRESETS)}")
        # Copies of the tower presets: a caller mutating its config must not change the presets.
        preset = cls(vision=replace(VIT_PRESETS[name]), text=replace(TEXT_PRESETS[name]),
                     embed_dim=VIT_PRESETS[name].width)
        return replace(preset, **overrides)


class FineCLIP(Pretrained, nn.Module):
    """Two towers and their projections; `__init__` allocates, `init_weights()` initializes."""

    config_class = FineCLIPConfig

    def __init__(self, config: FineCLIPConfig):
        super().__init__()
        self.config = config
        self.vision = FineViT(config.vision)
        self.text = TextEncoder(config.text)
        self.image_proj = nn.Linear(config.vision.width, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(config.text.width, config.embed_dim, bias=False)
        # One-element vectors, not 0-d scalars: FSDP2's fully_shard cannot shard 0-d parameters.
        self.logit_scale = nn.Parameter(torch.empty(1))  # log of the multiplier
        self.logit_bias = nn.Parameter(torch.empty(1)) if config.loss == "siglip" else None

    def init_weights(self) -> None:
        c = self.config
        self.vision.init_weights()
        self.text.init_weights()
        for proj in (self.image_proj, self.text_proj):
            std = proj.in_features**-0.5
            nn.init.trunc_normal_(proj.weight, std=std, a=-2 * std, b=2 * std)
        with torch.no_grad():
            self.logit_scale.fill_(INIT_LOGIT_SCALE[c.loss] if c.init_logit_scale is None else c.init_logit_scale)
            if self.logit_bias is not None:
                self.logit_bias.fill_(INIT_LOGIT_BIAS if c.init_logit_bias is None else c.init_logit_bias)

    def encode_image(self, patches, positions, cu_seqlens, max_seqlen: int, normalize: bool = True):
        """Packed images (docs/design.md's vision batch) -> (num_images, embed_dim) embeddings."""
        _, pooled = self.vision(patches, positions, cu_seqlens, max_seqlen)
        features = self.image_proj(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, input_ids, cu_seqlens, max_seqlen: int, normalize: bool = True):
        """Packed token ids (T,) with cu_seqlens -> (num_texts, embed_dim) embeddings."""
        _, pooled = self.text(input_ids, cu_seqlens, max_seqlen)
        features = self.text_proj(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image_batch: dict, text_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """image_batch: patches, positions, cu_seqlens, max_seqlen; text_batch: input_ids, cu_seqlens,
        max_seqlen. Returns the normalized (image, text) embeddings of matching rows."""
        img = self.encode_image(image_batch["patches"], image_batch["positions"], image_batch["cu_seqlens"],
                                image_batch["max_seqlen"])
        txt = self.encode_text(text_batch["input_ids"], text_batch["cu_seqlens"], text_batch["max_seqlen"])
        return img, txt
