"""apply_finevit_kernels: finds towers, refuses what it does not know, is idempotent and undoable."""

import copy

import pytest
import torch

pytest.importorskip("timm")
import timm  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from finevit.integrations import (  # noqa: E402
    SUPPORTED,
    UnsupportedModelError,
    apply_finevit_kernels,
    patch_timm_vit,
    patched_summary,
    revert_finevit_kernels,
)

from .helpers import KernelSpy  # noqa: E402


def tiny_vit(**kwargs) -> VisionTransformer:
    return VisionTransformer(**{**dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                       num_classes=5), **kwargs})


def replaced_forwards(model: torch.nn.Module) -> dict:
    return {name: m.__dict__["forward"] for name, m in model.named_modules() if "forward" in m.__dict__}


@pytest.mark.parametrize("model", [
    torch.nn.Linear(4, 4),
    timm.models.resnet.ResNet(timm.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=5),
], ids=["Linear", "ResNet"])
def test_models_without_a_supported_tower_are_refused_with_the_supported_list(model):
    with pytest.raises(TypeError) as error:
        apply_finevit_kernels(model)
    message = str(error.value)
    assert type(model).__qualname__ in message and "does not know how to patch" in message
    assert all(name in message for name in SUPPORTED)
    assert replaced_forwards(model) == {}


def test_non_modules_are_refused():
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got function"):
        apply_finevit_kernels(lambda x: x)


@pytest.mark.parametrize("embed_dim, heads, head_dim", [(48, 2, 24), (72, 2, 36), (1024, 2, 512)])
def test_head_dims_outside_the_kernels_limits_are_refused(embed_dim, heads, head_dim):
    model = tiny_vit(embed_dim=embed_dim, num_heads=heads)
    with pytest.raises(UnsupportedModelError, match=rf"head_dim {head_dim}; .*multiples of 8 from 32 to 256"):
        apply_finevit_kernels(model)
    assert replaced_forwards(model) == {}
    assert isinstance(UnsupportedModelError("x"), ValueError)


def test_head_dims_the_kernel_has_are_accepted_odd_ones_included():
    for embed_dim, heads in ((120, 3), (240, 3)):  # head dims 40 and 80 (Qwen2-VL's)
        assert len(replaced_forwards(apply_finevit_kernels(tiny_vit(embed_dim=embed_dim, num_heads=heads)))) == 3


def test_applying_twice_changes_nothing_and_revert_restores_the_classes_forwards():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    apply_finevit_kernels(model)
    first = replaced_forwards(model)
    assert set(first) == {"blocks.0.attn", "blocks.1.attn", "patch_embed.proj"}
    apply_finevit_kernels(model)
    assert replaced_forwards(model) == first
    revert_finevit_kernels(model)
    assert replaced_forwards(model) == {} and patched_summary(model) == {}
    assert not any(k.startswith("_finevit") for m in model.modules() for k in m.__dict__)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_repatching_with_other_options_starts_from_the_original():
    model = apply_finevit_kernels(tiny_vit())
    apply_finevit_kernels(model, patch_embed=False)
    assert set(replaced_forwards(model)) == {"blocks.0.attn", "blocks.1.attn"}
    patch_timm_vit(model, attention=False)
    assert set(replaced_forwards(model)) == {"patch_embed.proj"}


def test_a_forward_someone_else_replaced_is_restored_by_revert():
    model = tiny_vit()
    theirs = model.blocks[0].attn.forward  # a bound method set on the instance, as other patchers do
    model.blocks[0].attn.forward = theirs
    apply_finevit_kernels(model)
    assert model.blocks[0].attn.forward is not theirs
    revert_finevit_kernels(model)
    assert model.blocks[0].attn.__dict__["forward"] is theirs


def test_a_deep_copy_of_a_patched_model_is_patched_and_reverts_on_its_own(monkeypatch):
    model = apply_finevit_kernels(tiny_vit())
    clone = copy.deepcopy(model)
    spy = KernelSpy(monkeypatch)
    clone(torch.randn(1, 3, 32, 32))
    assert len(spy.calls) == 2
    revert_finevit_kernels(clone)
    assert replaced_forwards(clone) == {} and len(replaced_forwards(model)) == 3
    clone(torch.randn(1, 3, 32, 32))
    assert len(spy.calls) == 2


def test_towers_inside_a_users_model_are_found_and_patched():
    class TwoTowers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image = tiny_vit()
            self.crops = torch.nn.ModuleList([tiny_vit(num_classes=0)])
            self.head = torch.nn.Linear(5, 1)

    model = apply_finevit_kernels(TwoTowers())
    assert list(patched_summary(model)) == ["image", "crops.0"]
    assert patched_summary(model)["image"] == ["2 x timm Attention -> finevit.kernels.varlen_attention",
                                               "patch_embed.proj: Conv2d -> finevit.kernels.patch_embed"]


def test_one_refused_tower_leaves_every_tower_untouched():
    model = torch.nn.ModuleList([tiny_vit(), tiny_vit(embed_dim=48)])
    with pytest.raises(UnsupportedModelError, match="head_dim 24"):
        apply_finevit_kernels(model)
    assert replaced_forwards(model) == {} and patched_summary(model) == {}
