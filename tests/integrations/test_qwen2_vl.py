"""transformers Qwen2-VL / Qwen2.5-VL vision towers patched by finevit.integrations match the unpatched towers.

Tiny random-initialized towers (width 64, 2 heads of 32, patch 14, spatial merge 2; Qwen2.5-VL with
56 px windows, i.e. 4x4-patch windows, and one full-attention layer) on a packed batch of images of
different sizes plus a 2-frame video: the last hidden state, the merged output and every gradient
(input patches included), float32 and float64. The unpatched towers run SDPA (one call per image,
or per window). In float64 transformers still rotates q and k in float32
(`apply_rotary_pos_emb_vision` casts them), the patched tower in float64: hence a looser float64 bound.
"""

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Qwen2_5_VLVisionConfig, Qwen2VLVisionConfig  # noqa: E402
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl  # noqa: E402
from transformers.models.qwen2_vl import modeling_qwen2_vl  # noqa: E402

from finevit.integrations import UnsupportedModelError, apply_finevit_kernels, patched_summary  # noqa: E402

from .helpers import KernelSpy, assert_patched_matches  # noqa: E402

DTYPES = [torch.float32, torch.float64]
FP64_MAX_ERROR = 1e-6  # transformers' float32 rotation inside a float64 model
PATCH_FEATURES = 3 * 2 * 14 * 14  # (C, T, P, P)


def tiny_qwen2_vl(**kwargs):
    config = Qwen2VLVisionConfig(**{**dict(depth=2, embed_dim=64, hidden_size=48, num_heads=2, mlp_ratio=2,
                                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2), **kwargs})
    return modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel(config).eval()


def tiny_qwen2_5_vl(**kwargs):
    config = Qwen2_5_VLVisionConfig(**{**dict(depth=3, hidden_size=64, out_hidden_size=48, intermediate_size=96,
                                              num_heads=2, patch_size=14, spatial_merge_size=2, window_size=56,
                                              fullatt_block_indexes=[1]), **kwargs})
    return modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel(config).eval()


GRID_THW = [[1, 6, 10], [1, 4, 4], [2, 2, 6]]  # two images and a 2-frame video, in patches (t, h, w)


def qwen_inputs() -> dict:
    grid_thw = torch.tensor(GRID_THW)
    return {"hidden_states": torch.randn(int(grid_thw.prod(-1).sum()), PATCH_FEATURES), "grid_thw": grid_thw}


def run(m, inputs):
    out = m(**inputs)
    return {"last_hidden_state": out.last_hidden_state, "merged": out.pooler_output}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factory", [tiny_qwen2_vl, tiny_qwen2_5_vl], ids=["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vision_tower_matches_unpatched(factory, dtype):
    assert_patched_matches(factory(), qwen_inputs, run, dtype, fp64_max_error=FP64_MAX_ERROR)


def test_qwen2_5_vl_keeps_window_attention_and_fuses_rope(monkeypatch):
    model = apply_finevit_kernels(tiny_qwen2_5_vl())

    def no_separate_rope(*args, **kwargs):
        raise AssertionError("apply_rotary_pos_emb_vision ran: RoPE is not fused")

    monkeypatch.setattr(modeling_qwen2_5_vl, "apply_rotary_pos_emb_vision", no_separate_rope)
    spy = KernelSpy(monkeypatch)
    model(**qwen_inputs())

    assert len(spy.calls) == 3  # one per block
    per_image = [0, 60, 76, 88, 100]  # 6x10, 4x4, then the video's two 2x6 frames
    # Windows of at most 4x4 patches (56 px / 14), as transformers cuts them.
    _, window_cu = modeling_qwen2_5_vl.get_vision_window_index(
        torch.tensor(GRID_THW), spatial_merge_size=2, window_size=56, patch_size=14)
    windows = window_cu.tolist()
    for layer, ((q, _, _, cu_seqlens, max_seqlen), kwargs) in enumerate(spy.calls):
        full = layer == 1  # fullatt_block_indexes
        assert cu_seqlens.tolist() == (per_image if full else windows)
        assert isinstance(max_seqlen, int) and max_seqlen == (60 if full else 16)
        cos, sin = kwargs["cos"], kwargs["sin"]
        assert cos.dtype == sin.dtype == torch.float32
        assert cos.shape == sin.shape == (100, 16)  # (T, head_dim / 2): halves de-duplicated
        assert q.shape == (100, 2, 32) and kwargs["softmax_scale"] == 32**-0.5
    assert len(windows) > len(per_image)


def test_qwen2_vl_tower_passes_its_own_cu_seqlens_and_rope(monkeypatch):
    model = apply_finevit_kernels(tiny_qwen2_vl())
    monkeypatch.setattr(modeling_qwen2_vl, "apply_rotary_pos_emb_vision",
                        lambda *a, **k: pytest.fail("RoPE is not fused"))
    spy = KernelSpy(monkeypatch)
    model(**qwen_inputs())
    assert [call[0][3].tolist() for call in spy.calls] == [[0, 60, 76, 88, 100]] * 2
    assert [call[0][4] for call in spy.calls] == [60, 60]
    assert all(call[1]["cos"] is not None for call in spy.calls)


def test_qwen_conv3d_patch_embedding_calls_finevit_patch_embed(monkeypatch):
    spy = KernelSpy(monkeypatch, "patch_embed")
    apply_finevit_kernels(tiny_qwen2_vl())(**qwen_inputs())
    (patches, weight, bias), _ = spy.calls[0]
    assert patches.shape == (100, PATCH_FEATURES) and weight.shape == (64, PATCH_FEATURES) and bias is None


def test_full_qwen2_vl_model_patches_its_vision_tower():
    from transformers import Qwen2VLConfig, Qwen2VLModel

    config = Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=99,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=1, embed_dim=64, hidden_size=32, num_heads=2))
    model = apply_finevit_kernels(Qwen2VLModel(config))
    assert list(patched_summary(model)) == ["visual"]


def test_qwen_towers_with_head_dims_the_kernel_lacks_are_refused():
    refused = ((tiny_qwen2_vl(embed_dim=48), "head_dim 24"),
               (tiny_qwen2_5_vl(hidden_size=640, num_heads=2), "head_dim 320"))
    for model, match in refused:
        with pytest.raises(UnsupportedModelError, match=match):
            apply_finevit_kernels(model)
        assert patched_summary(model) == {} and not any("forward" in m.__dict__ for m in model.modules())
