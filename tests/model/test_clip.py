"""FineCLIP: meta-device build + init_weights, normalized embeddings, forward, contrastive loss steps, config.

Initial logit scale / bias follow SigLIP (scale log 10, bias -10) and CLIP (scale log(1/0.07), no bias).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from finevit import kernels
from finevit.model import FineCLIP, FineCLIPConfig, FineViTConfig, TextConfig, set_attention_deterministic

from .helpers import image_args, make_image_batch, make_text_batch, text_args

GRIDS = [(3, 5), (1, 1), (4, 4), (2, 7)]
TEXT_LENGTHS = [6, 1, 13, 4]


def tiny_config(**overrides) -> FineCLIPConfig:
    # embed_dim differs from the towers' width so a projection of the wrong shape cannot pass.
    return FineCLIPConfig(vision=FineViTConfig.from_name("tiny", depth=2), text=TextConfig.from_name("tiny", depth=2),
                          embed_dim=64, **overrides)


def tiny_clip(**overrides) -> FineCLIP:
    model = FineCLIP(tiny_config(**overrides))
    model.init_weights()
    return model


def batches(model: FineCLIP) -> tuple[dict, dict]:
    return (make_image_batch(GRIDS, model.config.vision.patch_features),
            make_text_batch(TEXT_LENGTHS, model.config.text.vocab_size))


# ----------------------------------------------------------------------------------------------------
# Meta-device build and initialization
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_meta_build_then_init_weights_gives_a_working_model(loss):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = FineCLIP(tiny_config(loss=loss))
    assert all(p.device.type == "meta" for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()

    for name, param in model.named_parameters():
        assert param.device.type == "cpu", name
        assert torch.isfinite(param).all(), name
    layer_norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(layer_norms) == 2 * 2 + 1 + 1 + 2 * 2 + 1  # vision blocks, final norm, MAP head norm; text
    for norm in layer_norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    for name, param in model.named_parameters():
        if name.endswith("bias") and name != "logit_bias":
            assert torch.equal(param, torch.zeros_like(param)), name
        elif name.endswith("weight") and param.ndim == 2:
            assert param.std() > 0, f"{name} was left constant"
    assert model.vision.head.probe.std() > 0

    if loss == "siglip":
        assert model.logit_scale.item() == pytest.approx(math.log(10.0), abs=1e-6)
        assert model.logit_bias.item() == -10.0
    else:
        assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-6)
        assert model.logit_bias is None
        assert "logit_bias" not in model.state_dict()

    image_batch, text_batch = batches(model)
    img, txt = model(image_batch, text_batch)
    assert img.shape == (len(GRIDS), 64) and txt.shape == (len(TEXT_LENGTHS), 64)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()


def test_init_weights_is_deterministic_under_a_seed():
    states = []
    for seed in (0, 0, 1):
        with torch.device("meta"):
            model = FineCLIP(tiny_config())
        model.to_empty(device="cpu")
        torch.manual_seed(seed)
        model.init_weights()
        states.append(model.state_dict())
    same, other = states[1], states[2]
    assert same.keys() == states[0].keys()
    for name, tensor in states[0].items():
        assert torch.equal(tensor, same[name]), name
    assert not torch.equal(states[0]["vision.patch_embed.weight"], other["vision.patch_embed.weight"])


def test_init_weights_scales_the_residual_projections_down_with_depth():
    """GPT-2's scheme: attn.proj and mlp.fc2 get std 0.02 / sqrt(2·depth), other linears 0.02."""
    torch.manual_seed(0)
    model = FineCLIP(FineCLIPConfig.from_name("tiny"))  # depth 4 -> residual std 0.02 / sqrt(8)
    model.init_weights()
    block = model.vision.blocks[0]
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert block.attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.15)
    assert block.mlp.fc2.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.15)
    # Truncated at 2 std.
    assert block.attn.qkv.weight.abs().max() <= 0.04 + 1e-7


def test_init_logit_scale_and_bias_overrides_are_used():
    torch.manual_seed(0)
    model = tiny_clip(init_logit_scale=1.5, init_logit_bias=-3.0)
    assert model.logit_scale.item() == 1.5 and model.logit_bias.item() == -3.0
    model = tiny_clip(loss="clip", init_logit_scale=2.0)
    assert model.logit_scale.item() == 2.0


def test_logit_scale_and_bias_are_one_element_vectors_that_fsdp2_can_shard():
    # fully_shard rejects 0-d parameters ("doesn't support scalar parameters").
    model = tiny_clip()
    assert model.logit_scale.shape == (1,) and model.logit_bias.shape == (1,)


# ----------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------


def test_encode_image_and_text_return_unit_norm_embeddings():
    torch.manual_seed(0)
    model = tiny_clip()
    image_batch, text_batch = batches(model)
    img = model.encode_image(*image_args(image_batch))
    txt = model.encode_text(*text_args(text_batch))
    assert img.shape == (len(GRIDS), 64) and txt.shape == (len(TEXT_LENGTHS), 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(len(GRIDS)))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(len(TEXT_LENGTHS)))


def test_normalize_false_returns_the_unnormalized_projections():
    torch.manual_seed(0)
    model = tiny_clip()
    image_batch, text_batch = batches(model)
    img_raw = model.encode_image(*image_args(image_batch), normalize=False)
    txt_raw = model.encode_text(*text_args(text_batch), normalize=False)
    _, pooled_img = model.vision(*image_args(image_batch))
    _, pooled_txt = model.text(*text_args(text_batch))
    torch.testing.assert_close(img_raw, model.image_proj(pooled_img), rtol=0, atol=0)
    torch.testing.assert_close(txt_raw, model.text_proj(pooled_txt), rtol=0, atol=0)
    assert (img_raw.norm(dim=-1) - 1).abs().max() > 1e-3
    normalized = model.encode_image(*image_args(image_batch))
    torch.testing.assert_close(img_raw / img_raw.norm(dim=-1, keepdim=True), normalized)


def test_forward_matches_encode_image_and_encode_text():
    torch.manual_seed(0)
    model = tiny_clip()
    image_batch, text_batch = batches(model)
    img, txt = model(image_batch, text_batch)
    torch.testing.assert_close(img, model.encode_image(*image_args(image_batch)), rtol=0, atol=0)
    torch.testing.assert_close(txt, model.encode_text(*text_args(text_batch)), rtol=0, atol=0)


def test_set_attention_deterministic_reaches_every_attention_call_of_both_towers(monkeypatch):
    seen = []
    attention = kernels.varlen_attention
    monkeypatch.setattr(kernels, "varlen_attention", lambda *args, deterministic=True, **kwargs: (
        seen.append(deterministic), attention(*args, deterministic=deterministic, **kwargs))[1])
    torch.manual_seed(0)
    model = tiny_clip()
    image_batch, text_batch = batches(model)
    calls = 2 * model.config.vision.depth + 2 * model.config.text.depth  # forward of each tower's layers, twice
    model(image_batch, text_batch)
    set_attention_deterministic(model, False)
    model(image_batch, text_batch)
    assert seen == [True] * (calls // 2) + [False] * (calls // 2)


# ----------------------------------------------------------------------------------------------------
# Training step with the losses of finevit.kernels
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_kind", ["siglip", "clip"])
def test_loss_step_backpropagates_into_logit_parameters_and_both_towers(loss_kind):
    torch.manual_seed(0)
    model = tiny_clip(loss=loss_kind)
    image_batch, text_batch = batches(model)
    img, txt = model(image_batch, text_batch)
    if loss_kind == "siglip":
        loss = kernels.siglip_loss(img, txt, model.logit_scale.exp(), model.logit_bias)
    else:
        loss = kernels.clip_loss(img, txt, model.logit_scale.exp())
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    checked = ["logit_scale", "image_proj.weight", "text_proj.weight", "vision.patch_embed.weight",
               "vision.blocks.0.attn.qkv.weight", "vision.head.probe", "text.token_embed.weight",
               "text.blocks.0.attn.qkv.weight"]
    if loss_kind == "siglip":
        checked.append("logit_bias")
    params = dict(model.named_parameters())
    for name in checked:
        grad = params[name].grad
        assert grad is not None, name
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    for name, param in params.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name

    # One SGD step lowers the loss (the gradients point somewhere useful).
    with torch.no_grad():
        for param in model.parameters():
            param -= 1e-2 * param.grad
    img, txt = model(image_batch, text_batch)
    if loss_kind == "siglip":
        new_loss = kernels.siglip_loss(img, txt, model.logit_scale.exp(), model.logit_bias)
    else:
        new_loss = kernels.clip_loss(img, txt, model.logit_scale.exp())
    assert new_loss < loss


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


def test_unknown_loss_raises_naming_the_field():
    with pytest.raises(ValueError, match="loss"):
        tiny_config(loss="infonce")


def test_init_logit_bias_with_the_clip_loss_raises():
    with pytest.raises(ValueError, match="init_logit_bias"):
        tiny_config(loss="clip", init_logit_bias=-5.0)


def test_from_name_pairs_the_vision_and_text_presets():
    c = FineCLIPConfig.from_name("tiny")
    assert c.vision == FineViTConfig.from_name("tiny")
    assert c.text == TextConfig.from_name("tiny")
    assert c.embed_dim == 128 and c.loss == "siglip"
    assert FineCLIPConfig.from_name("so400m14", loss="clip").embed_dim == 1152
    with pytest.raises(ValueError, match="preset"):
        FineCLIPConfig.from_name("huge")


def test_from_name_returns_configs_that_do_not_share_the_presets():
    config = FineCLIPConfig.from_name("tiny")
    config.vision.depth += 1
    config.text.depth += 1
    fresh = FineCLIPConfig.from_name("tiny")
    assert fresh.vision.depth == config.vision.depth - 1 and fresh.text.depth == config.text.depth - 1
