"""timm VisionTransformer and NaFlexVit patched by finevit.integrations match the unpatched models.

Tiny random-initialized models (embed 64, 2 heads of 32, depth 2): outputs and every gradient
(parameters and input pixels/patches) in float32 and float64. Padded batches compare the valid tokens
and the pooled output: at padding positions timm's outputs depend on its mask (a fully masked softmax
averages every value), ours are attention among the padding, and no model reads them.
"""

import copy

import pytest
import torch

pytest.importorskip("timm")
from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg  # noqa: E402
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer  # noqa: E402

from finevit.integrations import UnsupportedModelError, apply_finevit_kernels, patch_timm_vit  # noqa: E402

from .helpers import KernelSpy, assert_patched_matches  # noqa: E402

DTYPES = [torch.float32, torch.float64]


def tiny_vit(**kwargs) -> VisionTransformer:
    config = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)
    return VisionTransformer(**{**config, **kwargs})


def tiny_naflex(**kwargs) -> NaFlexVit:
    config = NaFlexVitCfg(patch_size=8, embed_dim=64, depth=2, num_heads=2, class_token=True, reg_tokens=2, **kwargs)
    return NaFlexVit(config, num_classes=5)


def naflex_inputs(grids=((3, 4), (2, 3), (1, 1)), max_patches=12) -> dict:
    """A NaFlex batch: patches (B, N, P·P·C) padded to N, (row, col) coordinates, validity (True = real)."""
    batch = len(grids)
    coord = torch.zeros(batch, max_patches, 2, dtype=torch.long)
    valid = torch.zeros(batch, max_patches, dtype=torch.bool)
    for i, (h, w) in enumerate(grids):
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coord[i, : h * w] = torch.stack([rows, cols], dim=-1).reshape(-1, 2)
        valid[i, : h * w] = True
    return {"patches": torch.randn(batch, max_patches, 8 * 8 * 3), "patch_coord": coord,
            "patch_valid": valid}


@pytest.mark.parametrize("dtype", DTYPES)
def test_vit_with_class_and_register_tokens_matches_unpatched(dtype):
    model = tiny_vit(reg_tokens=2)

    def run(m, inputs):
        features = m.forward_features(inputs["x"])  # (B, 1 + 2 + 16, D): class, registers, patches
        return {"features": features, "logits": m.forward_head(features)}

    patched = assert_patched_matches(model, lambda: {"x": torch.randn(3, 3, 32, 32)}, run, dtype)
    assert "forward" in patched.blocks[0].attn.__dict__ and "forward" in patched.patch_embed.proj.__dict__


def test_vit_with_attention_only_keeps_timms_patch_conv():
    model = tiny_vit(class_token=False, global_pool="avg", dynamic_img_size=True)

    def run(m, inputs):
        return {"logits": m(inputs["x"])}

    patched = assert_patched_matches(model, lambda: {"x": torch.randn(2, 3, 40, 24)}, run,
                                     torch.float32, patch_embed=False)
    assert "forward" not in patched.patch_embed.proj.__dict__


@pytest.mark.parametrize("mask_kind", ["symmetric", "key_only", "bool"])
def test_vit_padding_masks_match_on_valid_tokens(mask_kind):
    model = tiny_vit()  # 1 class token + 16 patches
    valid = torch.ones(3, 17, dtype=torch.bool)
    valid[1, 9:] = False
    valid[2, 3:] = False
    rows = valid[:, None, :, None] if mask_kind != "key_only" else torch.ones(3, 1, 1, 1, dtype=torch.bool)
    attend = rows & valid[:, None, None, :]  # (B, 1, N, N)

    def run(m, inputs):
        mask = attend
        if mask_kind != "bool":  # additive, in the model's dtype, as timm's create_attention_mask builds it
            dtype = inputs["x"].dtype
            mask = torch.zeros(attend.shape, dtype=dtype).masked_fill(~attend, torch.finfo(dtype).min)
        return {"valid tokens": m.forward_features(inputs["x"], attn_mask=mask)[valid]}

    assert_patched_matches(model, lambda: {"x": torch.randn(3, 3, 32, 32)}, run, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key_only_mask", [False, True])
def test_naflexvit_matches_on_valid_patches(dtype, key_only_mask):
    model = tiny_naflex(use_key_only_attn_mask=key_only_mask)

    def run(m, inputs):
        features = m.forward_features(**inputs)["patches"]  # (B, 3 + N, D)
        prefix = torch.ones(features.shape[0], 3, dtype=torch.bool)
        valid = torch.cat([prefix, inputs["patch_valid"]], dim=1)
        return {"valid tokens": features[valid], "logits": m.forward_head(features, patch_valid=inputs["patch_valid"])}

    assert_patched_matches(model, naflex_inputs, run, dtype)


def test_patched_timm_attention_calls_varlen_attention_with_per_image_sequences(monkeypatch):
    vit = apply_finevit_kernels(tiny_vit(reg_tokens=2))
    naflex = apply_finevit_kernels(tiny_naflex())
    spy = KernelSpy(monkeypatch)

    vit(torch.randn(3, 3, 32, 32))
    assert len(spy.calls) == 2  # one per block
    (q, k, v, cu_seqlens, max_seqlen), _ = spy.calls[0]
    assert q.shape == (3 * 19, 2, 32) and cu_seqlens.tolist() == [0, 19, 38, 57] and max_seqlen == 19

    naflex(naflex_inputs())  # 3 prefix tokens + 12, 6 and 1 real patches, padded to 12
    (_, _, _, cu_seqlens, max_seqlen), _ = spy.calls[2]
    assert cu_seqlens.tolist() == [0, 15, 15, 24, 30, 34, 45] and max_seqlen == 15  # [valid | padding] per row


def test_patch_embedding_calls_finevit_patch_embed(monkeypatch):
    spy = KernelSpy(monkeypatch, "patch_embed")
    apply_finevit_kernels(tiny_vit())(torch.randn(2, 3, 32, 32))
    apply_finevit_kernels(tiny_naflex())(naflex_inputs())
    (conv_patches, conv_weight, _), _ = spy.calls[0]
    (linear_patches, linear_weight, _), _ = spy.calls[1]
    assert conv_patches.shape == (2 * 16, 3 * 8 * 8) and conv_weight.shape == (64, 3 * 8 * 8)
    assert linear_patches.shape == (3 * 12, 8 * 8 * 3) and linear_weight.shape == (64, 8 * 8 * 3)


def test_a_mask_that_is_not_a_padding_mask_is_refused():
    model = apply_finevit_kernels(tiny_vit())
    causal = torch.ones(17, 17, dtype=torch.bool).tril()[None, None].expand(2, 1, 17, 17)
    with pytest.raises(ValueError, match="not a key-padding mask"):
        model.forward_features(torch.randn(2, 3, 32, 32), attn_mask=causal)
    bias = torch.randn(2, 1, 17, 17)  # an additive bias, not 0 / -inf
    with pytest.raises(ValueError, match="not a key-padding mask"):
        model.forward_features(torch.randn(2, 3, 32, 32), attn_mask=bias)
    per_head = torch.zeros(2, 2, 17, 17)
    with pytest.raises(ValueError, match="key-padding masks of shape"):
        model.forward_features(torch.randn(2, 3, 32, 32), attn_mask=per_head)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_fn=ParallelScalingBlock), "ParallelScalingBlock"),
    (dict(attn_layer="diff"), "DiffAttention"),
    (dict(attn_drop_rate=0.1), "attention dropout 0.1"),
])
def test_timm_models_the_kernels_cannot_run_exactly_are_refused_untouched(kwargs, match):
    model = tiny_vit(**kwargs)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedModelError, match=match):
        apply_finevit_kernels(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_patch_timm_vit_refuses_other_classes():
    with pytest.raises(TypeError, match="patch_timm_vit expects a timm VisionTransformer or NaFlexVit, got Linear"):
        patch_timm_vit(torch.nn.Linear(2, 2))


def test_patched_vit_under_autocast_matches_unpatched_to_bf16_rounding():
    # qk_norm: under autocast q and k leave their LayerNorm in float32 while v stays bf16; SDPA's autocast
    # casts all three, and so must the patch.
    model = tiny_vit(qk_norm=True)
    patched = apply_finevit_kernels(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, out = model.forward_features(x), patched.forward_features(x)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
