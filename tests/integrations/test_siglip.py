"""transformers SigLIP / SigLIP2 vision towers patched by finevit.integrations match the unpatched towers (SDPA).

Tiny random-initialized towers (hidden 64, 2 heads of 32, 2 layers, patch 8): outputs (last hidden state,
attention-pooled output) and every gradient, in float32 and float64. SigLIP2 runs NaFlex batches padded
to 16 patches with `pixel_attention_mask`; its padding positions are left out of the comparison.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from finevit.integrations import (  # noqa: E402
    UnsupportedModelError,
    apply_finevit_kernels,
    patch_siglip_vision,
    patched_summary,
    revert_finevit_kernels,
)

from .helpers import KernelSpy, assert_patched_matches  # noqa: E402

DTYPES = [torch.float32, torch.float64]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=8)


def tiny_siglip(**kwargs) -> SiglipVisionModel:
    return SiglipVisionModel(SiglipVisionConfig(**{**TINY, "image_size": 32, **kwargs})).eval()


def tiny_siglip2(**kwargs) -> Siglip2VisionModel:
    return Siglip2VisionModel(Siglip2VisionConfig(**{**TINY, "num_patches": 16, **kwargs})).eval()


def siglip2_inputs(shapes=((4, 4), (2, 5), (3, 1)), max_patches=16) -> dict:
    """A NaFlex batch as Siglip2ImageProcessor makes it: patches padded to max_patches, mask 1 = real."""
    mask = torch.zeros(len(shapes), max_patches, dtype=torch.long)
    for i, (h, w) in enumerate(shapes):
        mask[i, : h * w] = 1
    return {"pixel_values": torch.randn(len(shapes), max_patches, 3 * 8 * 8), "pixel_attention_mask": mask,
            "spatial_shapes": torch.tensor(shapes)}


def run_siglip2(m, inputs):
    out = m(**inputs)
    valid = inputs["pixel_attention_mask"].bool()
    return {"valid tokens": out.last_hidden_state[valid], "pooled": out.pooler_output}


@pytest.mark.parametrize("dtype", DTYPES)
def test_siglip_vision_model_matches_unpatched(dtype):
    def run(m, inputs):
        out = m(inputs["pixel_values"])
        return {"last_hidden_state": out.last_hidden_state, "pooled": out.pooler_output}

    patched = assert_patched_matches(tiny_siglip(), lambda: {"pixel_values": torch.randn(3, 3, 32, 32)}, run, dtype)
    assert patched.config._attn_implementation == "finevit"


def test_siglip_with_a_patch_grid_that_does_not_tile_the_image():
    # 36 px with patch 8: the conv drops the last 4 pixel rows and columns; so must the GEMM.
    def run(m, inputs):
        return {"last_hidden_state": m(inputs["pixel_values"], interpolate_pos_encoding=True).last_hidden_state}

    assert_patched_matches(tiny_siglip(), lambda: {"pixel_values": torch.randn(2, 3, 36, 44)}, run, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_siglip2_naflex_batches_match_on_valid_patches(dtype):
    assert_patched_matches(tiny_siglip2(), siglip2_inputs, run_siglip2, dtype)


def test_siglip2_without_padding_matches_unpatched():
    inputs = lambda: siglip2_inputs(shapes=((4, 4), (2, 8)))  # noqa: E731 - every patch real
    assert_patched_matches(tiny_siglip2(), inputs, run_siglip2, torch.float32)


def test_patched_siglip2_attends_within_each_images_real_patches(monkeypatch):
    model = apply_finevit_kernels(tiny_siglip2())
    spy = KernelSpy(monkeypatch)
    model(**siglip2_inputs())
    assert len(spy.calls) == 2
    (q, _, _, cu_seqlens, max_seqlen), kwargs = spy.calls[0]
    assert q.shape == (3 * 16, 2, 32) and max_seqlen == 16 and kwargs["softmax_scale"] == 32**-0.5
    assert cu_seqlens.tolist() == [0, 16, 16, 26, 32, 35, 48]  # [real | padding] per image


def test_siglip_patch_embeddings_call_finevit_patch_embed(monkeypatch):
    spy = KernelSpy(monkeypatch, "patch_embed")
    apply_finevit_kernels(tiny_siglip())(torch.randn(2, 3, 32, 32))
    apply_finevit_kernels(tiny_siglip2())(**siglip2_inputs())
    assert [call[0][0].shape for call in spy.calls] == [(2 * 16, 3 * 8 * 8), (3 * 16, 3 * 8 * 8)]


def test_full_siglip_model_patches_the_vision_tower_only():
    config = SiglipConfig(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=99),
                          vision_config={**TINY, "image_size": 32})
    model = apply_finevit_kernels(SiglipModel(config))
    assert list(patched_summary(model)) == ["vision_model"]
    assert model.vision_model.config._attn_implementation == "finevit"
    assert model.text_model.config._attn_implementation == "sdpa"
    revert_finevit_kernels(model)
    assert model.vision_model.config._attn_implementation == "sdpa" and patched_summary(model) == {}


def test_revert_restores_the_previous_attention_implementation():
    model = tiny_siglip2()
    model.set_attn_implementation("eager")
    patch_siglip_vision(model)
    patch_siglip_vision(model)  # idempotent: the first patch's "previous" is kept
    revert_finevit_kernels(model)
    assert model.config._attn_implementation == "eager"
    assert "forward" not in model.embeddings.patch_embedding.__dict__


@pytest.mark.parametrize("factory, kwargs, match", [
    (tiny_siglip, dict(hidden_size=48), "head_dim 24"),
    (tiny_siglip2, dict(hidden_size=72), "head_dim 36"),
    (tiny_siglip, dict(attention_dropout=0.1), "attention dropout 0.1"),
])
def test_siglip_towers_the_kernels_cannot_run_exactly_are_refused(factory, kwargs, match):
    model = factory(**kwargs)
    with pytest.raises(UnsupportedModelError, match=match):
        apply_finevit_kernels(model)
    assert model.config._attn_implementation == "sdpa" and patched_summary(model) == {}
