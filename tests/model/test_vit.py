"""FineViT: shapes, gradients, packing, 2D RoPE position semantics, configs and presets, float patches.

The packed-batch contract (patches, positions, cu_seqlens, max_seqlen) is docs/design.md's; the MAP head
is SigLIP's (a learned probe attending over each image), position is Qwen2-VL's 2D RoPE on (row, col).
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import finevit.model
from finevit.model import VIT_PRESETS, FineViT, FineViTConfig

from .helpers import grid_positions, image_args, make_image_batch, split_image_batch

GRIDS = [(3, 5), (1, 1), (4, 4), (2, 7)]


def tiny_vit(dtype=torch.float32, **overrides) -> FineViT:
    model = FineViT(FineViTConfig.from_name("tiny", depth=2, **overrides))
    model.init_weights()
    return model.to(dtype)


# ----------------------------------------------------------------------------------------------------
# Forward and backward
# ----------------------------------------------------------------------------------------------------


def test_forward_returns_per_token_and_per_image_features():
    torch.manual_seed(0)
    model = tiny_vit()
    batch = make_image_batch(GRIDS, model.config.patch_features)
    tokens, pooled = model(*image_args(batch))
    num_tokens = sum(h * w for h, w in GRIDS)
    assert tokens.shape == (num_tokens, model.config.width)
    assert pooled.shape == (len(GRIDS), model.config.width)
    assert tokens.dtype == pooled.dtype == torch.float32
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()
    # forward = forward_head(forward_features(...))
    features = model.forward_features(*image_args(batch))
    torch.testing.assert_close(features, tokens, rtol=0, atol=0)
    torch.testing.assert_close(model.forward_head(features, batch["cu_seqlens"], batch["max_seqlen"]), pooled,
                               rtol=0, atol=0)


def test_backward_gives_finite_nonzero_gradients_to_every_parameter():
    torch.manual_seed(0)
    model = tiny_vit()
    batch = make_image_batch(GRIDS, model.config.patch_features)
    tokens, pooled = model(*image_args(batch))
    loss = (tokens * torch.randn_like(tokens)).sum() + (pooled * torch.randn_like(pooled)).sum()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.shape == param.shape, name
        assert torch.isfinite(param.grad).all(), name
        if name == "head.kv.bias":
            # The key half of the MAP head's kv bias shifts every score of a head by the same amount
            # (q·b_k, no rotary there), which the softmax ignores: its gradient is zero up to rounding.
            # The value half must learn.
            assert param.grad[model.config.width:].abs().sum() > 0, name
            continue
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_patches_and_positions_with_different_row_counts_are_rejected():
    torch.manual_seed(0)
    model = tiny_vit()
    batch = make_image_batch([(2, 3)], model.config.patch_features)
    with pytest.raises(ValueError, match="positions"):
        model(batch["patches"], batch["positions"][:-1], batch["cu_seqlens"], batch["max_seqlen"])


# ----------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------


def test_packed_images_give_the_same_features_as_each_image_alone():
    torch.manual_seed(0)
    model = tiny_vit(torch.float64)
    batch = make_image_batch(GRIDS, model.config.patch_features)
    with torch.no_grad():
        tokens, pooled = model(*image_args(batch))
        alone = [model(*image_args(single)) for single in split_image_batch(batch)]
    torch.testing.assert_close(tokens, torch.cat([t for t, _ in alone]), rtol=0, atol=1e-10)
    torch.testing.assert_close(pooled, torch.cat([p for _, p in alone]), rtol=0, atol=1e-10)


def test_an_upper_bound_on_max_seqlen_gives_the_same_features():
    torch.manual_seed(0)
    model = tiny_vit(torch.float64)
    batch = make_image_batch(GRIDS, model.config.patch_features)
    patches, positions, cu_seqlens, max_seqlen = image_args(batch)
    with torch.no_grad():
        tokens, pooled = model(patches, positions, cu_seqlens, max_seqlen)
        tokens_big, pooled_big = model(patches, positions, cu_seqlens, max_seqlen + 9)
    torch.testing.assert_close(tokens_big, tokens, rtol=0, atol=1e-10)
    torch.testing.assert_close(pooled_big, pooled, rtol=0, atol=1e-10)


def test_map_head_keeps_float64_precision_in_a_float64_model():
    """A float64 model is the oracle other paths are checked against: its MAP head must pool in float64.

    The reference ops' rule (finevit/kernels/reference.py): low precision computes in float32, float64
    stays float64. Here the head is recomputed by hand in float64 (SigLIP's MAP head:
    softmax(k·q/sqrt(d)) v per head, then proj, then a residual MLP on LN).
    """
    torch.manual_seed(2)
    model = tiny_vit(torch.float64)
    head, c = model.head, model.config
    batch = make_image_batch(GRIDS, c.patch_features)
    with torch.no_grad():
        tokens = model.forward_features(*image_args(batch))
        pooled = model.forward_head(tokens, batch["cu_seqlens"], batch["max_seqlen"])
        q = head.q(head.probe).view(c.num_heads, c.head_dim)  # (H, Dh)
        expected = []
        for x in torch.split(tokens, [h * w for h, w in GRIDS]):
            k, v = head.kv(x).view(-1, 2, c.num_heads, c.head_dim).unbind(1)  # (n, H, Dh) each
            weights = (torch.einsum("nhd,hd->nh", k, q) / math.sqrt(c.head_dim)).softmax(dim=0)
            y = head.proj(torch.einsum("nh,nhd->hd", weights, v).reshape(c.width))
            expected.append(y + head.mlp(head.norm(y)))
    torch.testing.assert_close(pooled, torch.stack(expected), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# Position: 2D RoPE on (row, col) is the only position signal
# ----------------------------------------------------------------------------------------------------


def test_permuting_patches_with_their_positions_permutes_tokens_and_keeps_pooled():
    torch.manual_seed(0)
    model = tiny_vit(torch.float64)
    batch = make_image_batch([(3, 5), (4, 4)], model.config.patch_features)
    patches, positions, cu_seqlens, max_seqlen = image_args(batch)
    # Shuffle the first image's 15 patches together with their positions; the second stays in place.
    perm = torch.cat([torch.randperm(15), torch.arange(15, 31)])
    assert not torch.equal(perm, torch.arange(31))
    with torch.no_grad():
        tokens, pooled = model(patches, positions, cu_seqlens, max_seqlen)
        tokens_p, pooled_p = model(patches[perm], positions[perm], cu_seqlens, max_seqlen)
    torch.testing.assert_close(tokens_p, tokens[perm], rtol=0, atol=1e-10)
    # The pooled tolerance leaves room for float32 rounding of the MAP head's scores (their float64
    # precision is pinned by test_map_head_keeps_float64_precision_in_a_float64_model); a position
    # change moves pooled by ~1e-5 at this init (see the transposition test below).
    torch.testing.assert_close(pooled_p, pooled, rtol=0, atol=1e-7)


def test_transposing_an_image_grid_positions_changes_its_features():
    torch.manual_seed(0)
    model = tiny_vit(torch.float64)
    batch = make_image_batch([(3, 5), (4, 4)], model.config.patch_features)
    patches, positions, cu_seqlens, max_seqlen = image_args(batch)
    transposed = positions.clone()
    transposed[:15] = positions[:15].flip(-1)  # (row, col) -> (col, row) in the first image only
    with torch.no_grad():
        tokens, pooled = model(patches, positions, cu_seqlens, max_seqlen)
        tokens_t, pooled_t = model(patches, transposed, cu_seqlens, max_seqlen)
    assert (tokens_t[:15] - tokens[:15]).abs().max() > 1e-3
    # At init (0.02-std weights) attention is near uniform, so pooling moves little: ~2e-5 here, far
    # above float64 rounding and the float32 score rounding (~1e-8).
    assert (pooled_t[0] - pooled[0]).abs().max() > 1e-6
    # The other image is untouched: images never see each other.
    torch.testing.assert_close(tokens_t[15:], tokens[15:], rtol=0, atol=1e-10)
    torch.testing.assert_close(pooled_t[1], pooled[1], rtol=0, atol=1e-10)


def test_shifting_every_position_of_an_image_keeps_its_features():
    """RoPE is relative: q·k depends on position differences only, so a constant (row, col) offset is
    invisible (up to the float32 rounding of the cos/sin tables)."""
    torch.manual_seed(0)
    model = tiny_vit(torch.float64)
    batch = make_image_batch([(3, 5)], model.config.patch_features)
    patches, positions, cu_seqlens, max_seqlen = image_args(batch)
    shifted = positions + torch.tensor([7, 3], dtype=torch.int32)
    with torch.no_grad():
        tokens, pooled = model(patches, positions, cu_seqlens, max_seqlen)
        tokens_s, pooled_s = model(patches, shifted, cu_seqlens, max_seqlen)
    torch.testing.assert_close(tokens_s, tokens, rtol=0, atol=1e-4)
    torch.testing.assert_close(pooled_s, pooled, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Float patches
# ----------------------------------------------------------------------------------------------------


def test_float_patches_match_uint8_patches_normalized_by_hand():
    torch.manual_seed(0)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
    model = tiny_vit(image_mean=mean, image_std=std)
    batch = make_image_batch(GRIDS, model.config.patch_features)
    patches, positions, cu_seqlens, max_seqlen = image_args(batch)
    n = patches.shape[0]
    # (C, P, P)-flattened patches: channel c owns features [c·P·P, (c+1)·P·P).
    x = patches.to(torch.float32).view(n, 3, -1) / 255.0
    x = ((x - torch.tensor(mean)[:, None]) / torch.tensor(std)[:, None]).reshape(n, -1)
    with torch.no_grad():
        tokens_u8, pooled_u8 = model(patches, positions, cu_seqlens, max_seqlen)
        tokens_f, pooled_f = model(x, positions, cu_seqlens, max_seqlen)
        # Normalizing with the default (0.5, 0.5) instead would give something else: mean/std are used.
        tokens_wrong, _ = model(((patches.to(torch.float32) / 255.0) - 0.5) / 0.5, positions, cu_seqlens, max_seqlen)
    torch.testing.assert_close(tokens_f, tokens_u8, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled_f, pooled_u8, rtol=1e-5, atol=1e-5)
    assert (tokens_wrong - tokens_u8).abs().max() > 1e-2


def test_float_patches_of_another_dtype_than_the_weights_are_rejected():
    torch.manual_seed(0)
    model = tiny_vit()
    batch = make_image_batch([(2, 2)], model.config.patch_features)
    patches, positions, cu_seqlens, max_seqlen = image_args(batch)
    with pytest.raises(TypeError, match="patches"):
        model(patches.to(torch.float64), positions, cu_seqlens, max_seqlen)


# ----------------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, patch_size, width, depth, num_heads, head_dim, mlp_dim",
    [
        ("tiny", 16, 128, 4, 4, 32, 512),
        ("cpu", 16, 192, 3, 6, 32, 768),  # the embedded default (train/config.py)
        ("b16", 16, 768, 12, 12, 64, 3072),
        ("l16", 16, 1024, 24, 16, 64, 4096),
        ("so400m14", 14, 1152, 27, 16, 72, 4304),  # SigLIP So400m/14
    ],
)
def test_presets_have_the_standard_shapes(name, patch_size, width, depth, num_heads, head_dim, mlp_dim):
    c = FineViTConfig.from_name(name)
    assert (c.patch_size, c.width, c.depth, c.num_heads, c.head_dim, c.mlp_dim) == (
        patch_size, width, depth, num_heads, head_dim, mlp_dim)
    assert c.patch_features == 3 * patch_size**2


def test_g14_preset_has_head_dim_80_and_about_0_9b_parameters():
    c = FineViTConfig.from_name("g14")
    assert c.patch_size == 14 and c.head_dim == 80
    with torch.device("meta"):
        model = FineViT(c)
    assert all(p.device.type == "meta" for p in model.parameters())
    num_params = sum(p.numel() for p in model.parameters())
    assert 0.8e9 < num_params < 1.0e9


def test_preset_list_is_the_documented_one():
    assert set(VIT_PRESETS) == {"tiny", "cpu", "b16", "l16", "so400m14", "g14"}


def test_from_name_applies_overrides_without_changing_the_preset():
    c = FineViTConfig.from_name("tiny", depth=2, mlp="swiglu")
    assert (c.depth, c.mlp, c.width) == (2, "swiglu", 128)
    assert VIT_PRESETS["tiny"].depth == 4 and VIT_PRESETS["tiny"].mlp == "gelu"


def test_from_name_validates_the_overridden_config():
    with pytest.raises(ValueError, match="num_heads"):
        FineViTConfig.from_name("tiny", num_heads=3)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(width=130, num_heads=4), "width"),  # not divisible by num_heads
        (dict(width=64, num_heads=4), "head_dim"),  # head_dim 16 < 32
        (dict(width=1040, num_heads=2), "head_dim"),  # head_dim 520 > 256
        (dict(width=144, num_heads=4), "head_dim"),  # head_dim 36 is not a multiple of 8
        (dict(mlp="relu"), "mlp"),
        (dict(image_mean=(0.5, 0.5)), "image_mean"),
        (dict(image_std=(0.5,) * 4), "image_std"),
        (dict(in_channels=1), "in_channels"),
    ],
)
def test_invalid_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        FineViTConfig(**overrides)


def test_unknown_preset_name_raises_listing_the_presets():
    with pytest.raises(ValueError, match="b16"):
        FineViTConfig.from_name("huge")


def test_swiglu_mlp_builds_a_gated_hidden_layer_and_runs():
    torch.manual_seed(0)
    model = tiny_vit(mlp="swiglu")
    c = model.config
    assert model.blocks[0].mlp.fc1.weight.shape == (2 * c.mlp_dim, c.width)
    assert model.blocks[0].mlp.fc2.weight.shape == (c.width, c.mlp_dim)
    block = model.blocks[0].mlp
    x = torch.randn(5, c.width)
    gate, value = block.fc1(x).chunk(2, dim=-1)
    torch.testing.assert_close(block(x), block.fc2(F.silu(gate) * value))
    batch = make_image_batch([(2, 3), (1, 4)], c.patch_features)
    tokens, pooled = model(*image_args(batch))
    assert torch.isfinite(tokens).all() and pooled.shape == (2, c.width)


# ----------------------------------------------------------------------------------------------------
# Layering: model code stays free of torch.distributed (docs/design.md's layout)
# ----------------------------------------------------------------------------------------------------


def _distributed_uses(source: str) -> list[str]:
    """Imports of torch.distributed and `torch.distributed` attribute accesses in Python source."""
    uses = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            uses += [a.name for a in node.names if a.name.startswith("torch.distributed")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith("torch.distributed"):
                uses.append(module)
            elif module == "torch":
                uses += [f"torch.{a.name}" for a in node.names if a.name == "distributed"]
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                uses.append("torch.distributed")
    return uses


def test_distributed_use_detector_sees_every_spelling():
    for source in ("import torch.distributed as dist", "from torch.distributed import all_reduce",
                   "from torch import distributed", "import torch\nx = torch.distributed.get_rank()"):
        assert _distributed_uses(source), source
    assert not _distributed_uses('"""never imports torch.distributed"""\nimport torch\n')


def test_model_source_never_uses_torch_distributed():
    files = sorted(Path(finevit.model.__file__).parent.glob("*.py"))
    assert {f.name for f in files} >= {"vit.py", "text.py", "clip.py", "pretrained.py"}
    for path in files:
        assert _distributed_uses(path.read_text()) == [], path.name


def test_image_positions_helper_is_raster_order():
    # Guards the other tests' batch builder: docs/design.md's patches are in raster order, (row, col).
    assert grid_positions(2, 3).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
