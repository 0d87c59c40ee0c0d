"""FineViT models: the native-resolution image encoder, the text tower and the two-tower FineCLIP."""

from .clip import FineCLIP, FineCLIPConfig
from .text import TextConfig, TextEncoder
from .vit import VIT_PRESETS, FineViT, FineViTConfig, set_attention_deterministic

__all__ = ["FineViT", "FineViTConfig", "VIT_PRESETS", "TextEncoder", "TextConfig", "FineCLIP", "FineCLIPConfig",
           "set_attention_deterministic"]
