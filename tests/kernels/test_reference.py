"""The PyTorch reference ops against independent implementations and the peers' own code.

Oracles: per-sequence `scaled_dot_product_attention` and an explicit float64 softmax for attention;
transformers' Qwen2-VL vision rotary code (`Qwen2VLVisionRotaryEmbedding`, `get_vision_position_ids`,
`apply_rotary_pos_emb_vision`) and Llama's 1D rotary for RoPE; `Conv2d` for the patch embedding;
open_clip's `SigLipLoss` / `ClipLoss` for the losses.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import finevit.kernels as K

# ----------------------------------------------------------------------------------------------------
# varlen attention
# ----------------------------------------------------------------------------------------------------


def naive_attention(q, k, v, lengths, scale):
    """Explicit float64 softmax(q kᵀ · scale) v per sequence, one head at a time."""
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (x[start : start + n].double() for x in (q, k, v))  # (n, H, D)
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * scale
        out.append(torch.einsum("hij,jhd->ihd", scores.softmax(-1), vs))
        start += n
    return torch.cat(out)


def sdpa_per_sequence(q, k, v, lengths, scale=None):
    out, start = [], 0
    for n in lengths:
        if n:
            qs, ks, vs = (x[start : start + n].transpose(0, 1) for x in (q, k, v))  # (H, n, D)
            out.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(0, 1))
        start += n
    return torch.cat(out)


def random_qkv(lengths, heads, head_dim, dtype=torch.float64):
    total = sum(lengths)
    return [torch.randn(total, heads, head_dim, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize(
    "lengths", [[1], [17], [1, 2, 17, 129], [5, 0, 3, 0], [64, 1, 1, 33]],
    ids=lambda lengths: "-".join(map(str, lengths)),
)
@pytest.mark.parametrize("heads, head_dim", [(1, 32), (3, 72), (2, 80)])
def test_attention_matches_per_sequence_sdpa_on_ragged_batches(lengths, heads, head_dim):
    q, k, v = random_qkv(lengths, heads, head_dim)
    cu = K.cu_seqlens_from_lengths(lengths)
    out = K.varlen_attention(q, k, v, cu, max(lengths))
    expected = sdpa_per_sequence(q, k, v, lengths)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, naive_attention(q, k, v, lengths, head_dim**-0.5), rtol=0, atol=1e-12)

    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_attention_uses_custom_softmax_scale_and_accepts_an_upper_bound_max_seqlen():
    lengths = [7, 3]
    q, k, v = random_qkv(lengths, 2, 32)
    cu = K.cu_seqlens_from_lengths(lengths)
    out = K.varlen_attention(q, k, v, cu, 20, softmax_scale=0.3)
    torch.testing.assert_close(out, naive_attention(q, k, v, lengths, 0.3), rtol=0, atol=1e-12)
    assert not torch.allclose(out, K.varlen_attention(q, k, v, cu, 7))


def test_attention_does_not_mix_sequences():
    lengths = [4, 6]
    q, k, v = random_qkv(lengths, 2, 32)
    cu = K.cu_seqlens_from_lengths(lengths)
    out = K.varlen_attention(q, k, v, cu, 6)
    v2 = v.detach().clone()
    v2[4:] += 100.0  # change only the second sequence's values
    out2 = K.varlen_attention(q, k, v2, cu, 6)
    torch.testing.assert_close(out[:4], out2[:4], rtol=0, atol=0)
    assert (out[4:] - out2[4:]).abs().min() > 1.0


def test_attention_with_fused_rope_equals_rotating_q_and_k_first():
    lengths = [9, 1, 16]
    heads, head_dim = 2, 64
    q, k, v = random_qkv(lengths, heads, head_dim)
    cu = K.cu_seqlens_from_lengths(lengths)
    positions = torch.randint(0, 20, (sum(lengths), 2))
    cos, sin = K.rope_2d_cos_sin(positions, head_dim, rotary_dim=32)  # partial rotary dim
    out = K.varlen_attention(q, k, v, cu, 16, cos=cos, sin=sin)
    q_rot, k_rot = naive_rotate(q, cos, sin), naive_rotate(k, cos, sin)
    torch.testing.assert_close(out, sdpa_per_sequence(q_rot, k_rot, v, lengths), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_attention_in_low_precision_returns_input_dtype_close_to_float64(dtype):
    lengths = [1, 17, 40]
    q, k, v = random_qkv(lengths, 2, 32)
    cu = K.cu_seqlens_from_lengths(lengths)
    out = K.varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), cu, 40)
    assert out.dtype == dtype
    expected = naive_attention(q, k, v, lengths, 32**-0.5)
    tolerance = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
    assert (out.double() - expected).abs().max() < tolerance


# ----------------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------------


def naive_rotate(x, cos, sin, conjugate=False, compute=torch.float64):
    """Rotate-half rotation written pair by pair: channel i pairs with i + r/2."""
    half = cos.shape[-1]
    out = x.detach().to(compute).clone()
    s = -sin if conjugate else sin
    for i in range(half):
        a, b = x[..., i].to(compute), x[..., i + half].to(compute)
        c, sn = cos[:, None, i].to(compute), s[:, None, i].to(compute)
        out[..., i], out[..., i + half] = a * c - b * sn, b * c + a * sn
    return out.to(x.dtype)


@pytest.mark.parametrize("head_dim, rotary_dim", [(32, None), (72, None), (80, 40), (64, 16)])
def test_apply_rope_matches_pairwise_rotation_and_passes_the_rest_through(head_dim, rotary_dim):
    x = torch.randn(23, 3, head_dim, dtype=torch.float64)
    positions = torch.randint(0, 50, (23, 2))
    cos, sin = K.rope_2d_cos_sin(positions, head_dim, rotary_dim=rotary_dim)
    out = K.apply_rope(x, cos, sin)
    torch.testing.assert_close(out, naive_rotate(x, cos, sin), rtol=0, atol=1e-12)
    r = rotary_dim or head_dim
    assert torch.equal(out[..., r:], x[..., r:])


def test_apply_rope_backward_is_the_conjugate_rotation():
    x = torch.randn(11, 2, 48, dtype=torch.float64, requires_grad=True)
    cos, sin = K.rope_2d_cos_sin(torch.randint(0, 9, (11, 2)), 48)
    grad_out = torch.randn(11, 2, 48, dtype=torch.float64)
    (grad,) = torch.autograd.grad(K.apply_rope(x, cos, sin), x, grad_out)
    torch.testing.assert_close(grad, naive_rotate(grad_out, cos, sin, conjugate=True), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_apply_rope_computes_in_float32_and_returns_input_dtype(dtype):
    x = torch.randn(5, 2, 32).to(dtype)
    cos, sin = K.rope_2d_cos_sin(torch.randint(0, 100, (5, 2)), 32)
    out = K.apply_rope(x, cos, sin)
    assert out.dtype == dtype
    torch.testing.assert_close(out, naive_rotate(x, cos, sin, compute=torch.float32), rtol=0, atol=0)


def qwen2_vl_rotary(grid_thw, head_dim, theta=10000.0):
    """transformers' own Qwen2-VL vision RoPE: (position_ids (N, 2), cos (N, head_dim), sin (N, head_dim))."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding
    from transformers.vision_utils import get_vision_position_ids

    config = Qwen2VLVisionConfig(embed_dim=head_dim * 2, num_heads=2, depth=1, spatial_merge_size=2)
    config.rope_parameters = {"rope_type": "axial", "rope_theta": theta}
    rotary = Qwen2VLVisionRotaryEmbedding(config)
    position_ids = get_vision_position_ids(grid_thw, 2)
    cos, sin = rotary(torch.zeros(1), position_ids)
    return position_ids, cos, sin


@pytest.mark.parametrize("head_dim", [32, 72, 80, 128])
def test_rope_2d_matches_transformers_qwen2_vl_vision_rotary(head_dim):
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    grid_thw = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 8, 4]])
    position_ids, hf_cos, hf_sin = qwen2_vl_rotary(grid_thw, head_dim)
    cos, sin = K.rope_2d_cos_sin(position_ids.to(torch.int32), head_dim)
    half = head_dim // 2
    # Qwen2-VL duplicates the r/2 angles into both halves; ours keeps one copy, bit-identical.
    assert torch.equal(hf_cos[:, :half], hf_cos[:, half:])
    assert torch.equal(cos, hf_cos[:, :half]) and torch.equal(sin, hf_sin[:, :half])

    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(position_ids.shape[0], 3, head_dim).to(dtype)
        k = torch.randn_like(q)
        hf_q, hf_k = apply_rotary_pos_emb_vision(q, k, hf_cos, hf_sin)
        assert torch.equal(K.apply_rope(q, cos, sin), hf_q)
        assert torch.equal(K.apply_rope(k, cos, sin), hf_k)


def test_rope_2d_uses_rows_for_the_first_half_and_columns_for_the_second():
    positions = torch.tensor([[3, 0], [0, 5]])
    cos, sin = K.rope_2d_cos_sin(positions, 32)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(sin[0, :8].double(), torch.sin(3 * inv_freq), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[0, 8:].double(), torch.zeros(8, dtype=torch.float64))
    torch.testing.assert_close(sin[1, 8:].double(), torch.sin(5 * inv_freq), rtol=0, atol=1e-6)


def test_rope_1d_matches_transformers_llama_rotary():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, length = 64, 37
    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=64)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.arange(length)[None])  # (1, T, D)
    cos, sin = K.rope_1d_cos_sin(torch.arange(length), head_dim)
    torch.testing.assert_close(cos, hf_cos[0, :, : head_dim // 2], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin[0, :, : head_dim // 2], rtol=0, atol=1e-6)

    q = torch.randn(1, 3, length, head_dim)  # Llama layout (B, H, T, D)
    hf_q, _ = apply_rotary_pos_emb(q, q, hf_cos, hf_sin)
    ours = K.apply_rope(q[0].transpose(0, 1).contiguous(), cos, sin)  # (T, H, D)
    torch.testing.assert_close(ours, hf_q[0].transpose(0, 1), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# patch embedding
# ----------------------------------------------------------------------------------------------------


def patchify(images, patch):
    """(B, C, H, W) -> (B·H/P·W/P, C·P·P) in (C, P, P) order, patches in raster order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, c * patch * patch)


@pytest.mark.parametrize("channels, patch", [(3, 16), (3, 14), (1, 14), (1, 16)])
def test_patch_embed_on_uint8_equals_conv2d_on_normalized_images(channels, patch):
    width = 24
    images = torch.randint(0, 256, (2, channels, 3 * patch, 5 * patch), dtype=torch.uint8)
    mean = [0.48, 0.46, 0.41][:channels]
    std = [0.27, 0.26, 0.28][:channels]
    conv = torch.nn.Conv2d(channels, width, patch, stride=patch).double()
    mean_t = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
    normalized = (images.double() / 255 - mean_t) / std_t
    expected = conv(normalized).flatten(2).transpose(1, 2).reshape(-1, width)  # (B·h·w, D), raster order
    weight = conv.weight.reshape(width, -1)
    out = K.patch_embed(patchify(images, patch), weight, conv.bias, mean=mean, std=std)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_patch_embed_on_float_patches_is_linear_and_differentiable():
    patches = torch.randn(7, 3 * 14 * 14, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, 3 * 14 * 14, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(16, dtype=torch.float64, requires_grad=True)
    out = K.patch_embed(patches, weight, bias)
    torch.testing.assert_close(out, patches @ weight.T + bias, rtol=0, atol=1e-12)
    out.sum().backward()
    torch.testing.assert_close(weight.grad, patches.detach().sum(0).expand_as(weight), rtol=0, atol=1e-10)
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 7.0))
    torch.testing.assert_close(patches.grad, weight.detach().sum(0).expand_as(patches), rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_patch_embed_returns_weight_dtype(dtype):
    patches = torch.randint(0, 256, (5, 3 * 16 * 16), dtype=torch.uint8)
    weight = torch.randn(8, 3 * 16 * 16).to(dtype)
    out = K.patch_embed(patches, weight, None, mean=[0.5] * 3, std=[0.5] * 3)
    assert out.dtype == dtype and out.shape == (5, 8)


# ----------------------------------------------------------------------------------------------------
# contrastive losses vs open_clip
# ----------------------------------------------------------------------------------------------------


def unit_features(batch, dim, dtype=torch.float64):
    img = F.normalize(torch.randn(batch, dim, dtype=dtype), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(batch, dim, dtype=dtype), dim=-1).requires_grad_()
    return img, txt


@pytest.mark.parametrize("batch, dim", [(1, 16), (7, 64), (33, 96)])
@pytest.mark.parametrize("scale, bias", [(10.0, -10.0), (130.0, -16.0), (1.0, 0.0)])
def test_siglip_loss_matches_open_clip(batch, dim, scale, bias):
    from open_clip.loss import SigLipLoss

    img, txt = unit_features(batch, dim)
    logit_scale = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    logit_bias = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    ours = K.siglip_loss(img, txt, logit_scale, logit_bias)
    theirs = SigLipLoss()(img, txt, logit_scale, logit_bias)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    inputs = (img, txt, logit_scale, logit_bias)
    for got, want in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(theirs, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)  # float64: rounding only


@pytest.mark.parametrize("batch, dim", [(1, 16), (7, 64), (33, 96)])
@pytest.mark.parametrize("scale", [1 / 0.07, 100.0, 1.0])
def test_clip_loss_matches_open_clip(batch, dim, scale):
    from open_clip.loss import ClipLoss

    img, txt = unit_features(batch, dim)
    logit_scale = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    ours = K.clip_loss(img, txt, logit_scale)
    theirs = ClipLoss(local_loss=True, gather_with_grad=True)(img, txt, logit_scale)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    inputs = (img, txt, logit_scale)
    for got, want in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(theirs, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)  # float64: rounding only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_losses_stay_finite_and_accurate_at_extreme_scale_and_bias_in_low_precision(dtype):
    img, txt = unit_features(64, 32)
    txt_near = F.normalize(img.detach() + 0.05 * torch.randn_like(img), dim=-1)  # confident positives
    scale = torch.tensor(130.0, requires_grad=True)
    bias = torch.tensor(-16.0, requires_grad=True)
    for loss_fn, args in ((K.siglip_loss, (scale, bias)), (K.clip_loss, (scale,))):
        low = loss_fn(img.detach().to(dtype), txt_near.to(dtype), *args)
        high = loss_fn(img.detach().to(dtype).double(), txt_near.to(dtype).double(), *(a.double() for a in args))
        assert low.dtype == torch.float32 and torch.isfinite(low)
        torch.testing.assert_close(low.double(), high, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(low, args)
        assert all(torch.isfinite(g).all() for g in grads)


def test_siglip_loss_is_sum_over_pairs_divided_by_batch():
    img, txt = unit_features(5, 16)
    scale, bias = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    logits = (scale * img @ txt.T + bias).detach()
    labels = 2 * torch.eye(5, dtype=torch.float64) - 1
    expected = sum(math.log1p(math.exp(-float(labels[i, j] * logits[i, j]))) for i in range(5) for j in range(5))
    assert abs(K.siglip_loss(img, txt, scale, bias).item() - expected / 5) < 1e-12
