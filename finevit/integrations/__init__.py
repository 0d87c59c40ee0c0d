"""Drop-in patches that make other ViTs run on `finevit.kernels`, in the style of Liger-Kernel.

    from finevit.integrations import apply_finevit_kernels
    apply_finevit_kernels(model)      # finds the vision tower(s), patches them in place, returns model

Supported, with the per-family function `apply_finevit_kernels` picks (each can be called directly):
    timm VisionTransformer, NaFlexVit           patch_timm_vit         attention (padding masks -> varlen);
                                                                       patch embedding (Conv2d / Linear)
    transformers SiglipVisionModel,             patch_siglip_vision    attn_implementation "finevit" (NaFlex
      Siglip2VisionModel                                               mask -> varlen); Conv2d / Linear embedding
    transformers Qwen2-VL, Qwen2.5-VL towers    patch_qwen2_vl_vision  attention on the tower's cu_seqlens
                                                                       (windows kept), RoPE fused; Conv3d embedding

A full model (`SiglipModel`, `Qwen2VLForConditionalGeneration`, a timm ViT inside your own module...)
is patched through the supported towers it contains; anything else is refused with a TypeError, and a
supported family whose configuration the kernels cannot run exactly (head dim outside 32..256 or not a
multiple of 8, attention dropout, another attention type) with an `UnsupportedModelError` (a
ValueError), before anything is changed. Patches are per instance (the classes, and other models of
the same class, are untouched), idempotent, and undone by `revert_finevit_kernels(model)`.

The patched towers compute what the unpatched ones compute (same outputs and gradients, to rounding;
tests/integrations), except at padding positions of padded batches, whose outputs no model uses.
What runs underneath follows `finevit.kernels`' dispatch: Triton on CUDA, the PyTorch reference on CPU.
"""

from __future__ import annotations

from torch import nn

from ._common import UnsupportedModelError, is_instance_of, patch_state, revert_tower
from .qwen2_vl import QWEN2_VL_CLASSES, check_qwen2_vl_vision, patch_qwen2_vl_vision
from .siglip import SIGLIP_CLASSES, check_siglip_vision, patch_siglip_vision
from .timm_vit import TIMM_VIT_CLASSES, check_timm_vit, patch_timm_vit

__all__ = [
    "apply_finevit_kernels",
    "revert_finevit_kernels",
    "patched_summary",
    "patch_timm_vit",
    "patch_siglip_vision",
    "patch_qwen2_vl_vision",
    "UnsupportedModelError",
    "SUPPORTED",
]

# (classes as (module, name), check, patch). Classes are matched by name along the instance's MRO, so
# neither timm nor transformers is imported unless the model comes from it.
_FAMILIES = (
    (TIMM_VIT_CLASSES, check_timm_vit, patch_timm_vit),
    (SIGLIP_CLASSES, check_siglip_vision, patch_siglip_vision),
    (QWEN2_VL_CLASSES, check_qwen2_vl_vision, patch_qwen2_vl_vision),
)
SUPPORTED = tuple(f"{module}.{name}" for classes, _, _ in _FAMILIES for module, name in classes)


def _family(module: nn.Module):
    """(check, patch) of the family `module` belongs to, or None."""
    return next(((check, patch) for classes, check, patch in _FAMILIES if is_instance_of(module, classes)), None)


def _towers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost supported towers in `model` (itself included), as (name, module)."""
    found, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if _family(module) is not None:
            found.append((name, module))
            inside.append(name + "." if name else "")
    return found


def apply_finevit_kernels(model: nn.Module, *, attention: bool = True, patch_embed: bool = True) -> nn.Module:
    """Patch every supported vision tower in `model` to run on `finevit.kernels`; returns `model`.

    attention: attention (and, for Qwen2-VL, its RoPE) on `varlen_attention`. patch_embed: the patch
    projection on `patch_embed`. Raises TypeError when `model` holds no supported tower, and
    `UnsupportedModelError` (a ValueError) when a tower's configuration cannot run exactly; in both
    cases nothing is changed. Calling it again is a no-op (with other options, it re-patches).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_finevit_kernels expects a torch.nn.Module, got {type(model).__name__}")
    towers = _towers(model)
    if not towers:
        raise TypeError(
            f"apply_finevit_kernels does not know how to patch {type(model).__module__}.{type(model).__qualname__}: "
            f"it holds none of the supported vision towers ({', '.join(SUPPORTED)})"
        )
    for _, tower in towers:  # refuse before changing anything, so a refused model is left as it was
        check, _ = _family(tower)
        check(tower, attention)
    for _, tower in towers:
        _, patch = _family(tower)
        patch(tower, attention=attention, patch_embed=patch_embed)
    return model


def revert_finevit_kernels(model: nn.Module) -> nn.Module:
    """Undo `apply_finevit_kernels` (or a per-family patch) on every tower in `model`; returns `model`."""
    for _, module in list(model.named_modules()):
        revert_tower(module)
    return model


def patched_summary(model: nn.Module) -> dict[str, list[str]]:
    """What is patched in `model`: {tower name: [one line per patched part]} (empty when nothing is)."""
    return {name or type(module).__name__: state["patched"]
            for name, module in model.named_modules() if (state := patch_state(module)) is not None}
