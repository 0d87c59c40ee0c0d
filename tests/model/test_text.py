"""TextEncoder: packed texts with 1D RoPE, "last" (EOS, as SigLIP / CLIP) and "mean" pooling, TextConfig checks."""

from __future__ import annotations

import pytest
import torch

from finevit.model import TextConfig, TextEncoder
from finevit.model.text import TEXT_PRESETS
from finevit.model.vit import VIT_PRESETS

from .helpers import assert_close_to_rounding, make_text_batch, split_text_batch, text_args

LENGTHS = [5, 1, 17, 9]


def tiny_text(dtype=torch.float32, **overrides) -> TextEncoder:
    model = TextEncoder(TextConfig.from_name("tiny", depth=2, **overrides))
    model.init_weights()
    return model.to(dtype)


def test_forward_returns_per_token_and_per_text_features():
    torch.manual_seed(0)
    model = tiny_text()
    batch = make_text_batch(LENGTHS, model.config.vocab_size)
    tokens, pooled = model(*text_args(batch))
    assert tokens.shape == (sum(LENGTHS), model.config.width)
    assert pooled.shape == (len(LENGTHS), model.config.width)
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_backward_gives_finite_nonzero_gradients_to_every_parameter(pool):
    torch.manual_seed(0)
    model = tiny_text(pool=pool)
    batch = make_text_batch(LENGTHS, model.config.vocab_size)
    tokens, pooled = model(*text_args(batch))
    loss = (tokens * torch.randn_like(tokens)).sum() + (pooled * torch.randn_like(pooled)).sum()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    # Only the embedding rows of the ids in the batch are used.
    used = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    used[batch["input_ids"]] = True
    row_has_grad = model.token_embed.weight.grad.abs().sum(dim=1) > 0
    assert torch.equal(row_has_grad, used)


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_packed_texts_give_the_same_features_as_each_text_alone(pool):
    torch.manual_seed(0)
    model = tiny_text(torch.float64, pool=pool)
    batch = make_text_batch(LENGTHS, model.config.vocab_size)
    with torch.no_grad():
        tokens, pooled = model(*text_args(batch))
        alone = [model(*text_args(single)) for single in split_text_batch(batch)]
    torch.testing.assert_close(tokens, torch.cat([t for t, _ in alone]), rtol=0, atol=1e-10)
    torch.testing.assert_close(pooled, torch.cat([p for _, p in alone]), rtol=0, atol=1e-10)


def test_last_pool_is_the_final_token_of_each_text_and_mean_pool_its_mean():
    torch.manual_seed(0)
    last = tiny_text(torch.float64, pool="last")
    mean = tiny_text(torch.float64, pool="mean")
    mean.load_state_dict(last.state_dict())
    batch = make_text_batch(LENGTHS, last.config.vocab_size)
    with torch.no_grad():
        tokens, pooled_last = last(*text_args(batch))
        tokens_m, pooled_mean = mean(*text_args(batch))
    # Pooling does not touch the tokens. Two models computed them (same weights, other tensors): equal up to
    # rounding, as BLAS's summation order may depend on where the weights lie in memory.
    assert_close_to_rounding(tokens_m, tokens, name="tokens")
    per_text = torch.split(tokens, LENGTHS)
    torch.testing.assert_close(pooled_last, torch.stack([t[-1] for t in per_text]), rtol=0, atol=0)
    torch.testing.assert_close(pooled_mean, torch.stack([t.mean(dim=0) for t in per_text]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_an_empty_text_pools_to_zeros_and_leaves_its_neighbours_unchanged(pool):
    torch.manual_seed(0)
    model = tiny_text(torch.float64, pool=pool)
    batch = make_text_batch([4, 0, 3], model.config.vocab_size)
    with torch.no_grad():
        _, pooled = model(*text_args(batch))
        _, pooled_without = model(batch["input_ids"], torch.tensor([0, 4, 7], dtype=torch.int32), 4)
    assert torch.equal(pooled[1], torch.zeros_like(pooled[1]))
    torch.testing.assert_close(pooled[[0, 2]], pooled_without, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_shuffling_a_texts_tokens_changes_its_pooled_features(pool):
    """Order is seen through 1D RoPE only: without it, a bidirectional encoder with mean pooling would be
    blind to word order."""
    torch.manual_seed(0)
    model = tiny_text(torch.float64, pool=pool)
    batch = make_text_batch([12, 7], model.config.vocab_size)
    input_ids, cu_seqlens, max_seqlen = text_args(batch)
    shuffled = input_ids.clone()
    # Reverse the first text except its last (EOS) token, so "last" pooling reads the same token id.
    shuffled[:11] = input_ids[:11].flip(0)
    assert not torch.equal(shuffled, input_ids)
    with torch.no_grad():
        _, pooled = model(input_ids, cu_seqlens, max_seqlen)
        _, pooled_s = model(shuffled, cu_seqlens, max_seqlen)
    assert (pooled_s[0] - pooled[0]).abs().max() > 1e-4
    torch.testing.assert_close(pooled_s[1], pooled[1], rtol=0, atol=1e-10)  # the other text is untouched


def test_max_seqlen_above_context_length_raises():
    torch.manual_seed(0)
    model = tiny_text(context_length=16)
    batch = make_text_batch([16, 3], model.config.vocab_size)
    model(*text_args(batch))  # exactly context_length is fine
    batch = make_text_batch([17, 3], model.config.vocab_size)
    with pytest.raises(ValueError, match="context_length"):
        model(*text_args(batch))


def test_unpacked_input_ids_are_rejected():
    torch.manual_seed(0)
    model = tiny_text()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 5))
    cu_seqlens = torch.tensor([0, 5, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="input_ids"):
        model(input_ids, cu_seqlens, 5)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(pool="cls"), "pool"),
        (dict(width=130, num_heads=4), "width"),
        (dict(width=64, num_heads=4), "head_dim"),
        (dict(mlp="relu"), "mlp"),
    ],
)
def test_invalid_text_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        TextConfig(**overrides)


def test_unknown_text_preset_raises():
    with pytest.raises(ValueError, match="preset"):
        TextConfig.from_name("huge")


def test_text_presets_pair_with_the_vision_presets():
    assert set(TEXT_PRESETS) == set(VIT_PRESETS)
    tiny = TextConfig.from_name("tiny")
    assert (tiny.width, tiny.depth, tiny.num_heads, tiny.head_dim) == (128, 4, 4, 32)
    cpu = TextConfig.from_name("cpu")  # the embedded default (train/config.py)
    assert (cpu.vocab_size, cpu.width, cpu.depth, cpu.num_heads, cpu.context_length) == (512, 192, 2, 6, 64)
    for name in ("b16", "l16", "so400m14"):  # SigLIP pairs towers of equal shape
        text, vision = TEXT_PRESETS[name], VIT_PRESETS[name]
        assert (text.width, text.num_heads, text.head_dim) == (vision.width, vision.num_heads, vision.head_dim)
