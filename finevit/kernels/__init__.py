"""finevit.kernels: attention, rotary embedding, patch embedding and contrastive losses for ViTs.

One op per file, each read top to bottom: Triton kernels, launchers, autograd, then the public function,
which checks its inputs and runs the Triton kernel when the tensors' device can run it, else the
pure-PyTorch reference (`finevit.kernels.reference`). `FINEVIT_KERNELS=reference` or `=triton` forces a
path (`_dispatch.py`). The contract of every op (shapes, dtypes, semantics) is in docs/design.md and in
its docstring.
"""

from .attention import supports_head_dim, varlen_attention
from .clip_loss import clip_loss
from .patch_embed import patch_embed
from .rope import apply_rope, rope_1d_cos_sin, rope_2d_cos_sin
from .siglip_loss import siglip_loss
from .utils import cu_seqlens_from_lengths, packed_token_index, pad_packed, unpad_packed

__all__ = [
    "varlen_attention",
    "supports_head_dim",
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
