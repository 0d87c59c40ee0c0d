"""FineViT: Triton kernels, a native-resolution ViT and a minimal FSDP2 trainer for fine-grained encoders."""

__version__ = "0.1.0"
