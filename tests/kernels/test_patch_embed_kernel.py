"""Triton patch embedding (uint8 normalization fused into the GEMM) against Conv2d in float64.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): fp16 and fp32 only, since
the interpreter cannot multiply bf16. With CUDA the same tests run compiled, bf16 included. The oracle is a
float64 `Conv2d(C, D, P, stride=P)` on the images normalized as `(x / 255 − mean) / std` (docs/design.md: the
patch embedding equals that conv with `weight = conv.weight.reshape(D, -1)`); the bar is PyTorch's own path
in the same dtype (`reference.patch_embed`: uint8 -> float32 -> normalize -> cast -> F.linear): the
kernel's error against float64 is at most 2x (gradients 3x) PyTorch's. Outputs and the weight gradient's
partial sums are allocated NaN-poisoned, so an element the kernels forget to write fails the test.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

import finevit.kernels as K
from finevit.kernels import reference

from .comparisons import assert_error_within

pe = importlib.import_module("finevit.kernels.patch_embed")  # `K.patch_embed` is the public function

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("triton_path", "poisoned_outputs", "fused_strategy")  # conftest.py, below
# The interpreter multiplies bf16 bit patterns as integers: bf16 runs compiled, on a GPU only.
DTYPES = [torch.float16, torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture
def fused_strategy(monkeypatch):
    """uint8 patches take the fused kernel unless a test names the two-pass strategy (on a GPU, "auto" would
    time both and take the faster one)."""
    monkeypatch.setenv("FINEVIT_PATCH_EMBED", "fused")


def images_to_patches(images, patch):
    """(B, C, H, W) -> (B·H/P·W/P, C·P·P) in (C, P, P) order, patches in raster order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, c * patch * patch)


def patches_to_images(patches, shape, patch):
    """The inverse of images_to_patches for images of `shape`."""
    b, c, h, w = shape
    x = patches.reshape(b, h // patch, w // patch, c, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(shape)


def conv2d_float64(images, weight, bias, patch, mean=None, std=None):
    """The oracle: Conv2d(C, D, P, stride=P) in float64 on (normalized) images -> (num_patches, D)."""
    x = images.double()
    if mean is not None:
        mean_t = torch.tensor(mean, dtype=torch.float64, device=x.device).view(-1, 1, 1)  # (C, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float64, device=x.device).view(-1, 1, 1)
        x = (x / 255 - mean_t) / std_t
    out = F.conv2d(x, weight.view(weight.shape[0], -1, patch, patch), bias, stride=patch)  # (B, D, h, w)
    return out.flatten(2).transpose(1, 2).reshape(-1, weight.shape[0])


def check_against_conv2d(channels, patch, width, grid, dtype, *, uint8=True, with_bias=True, num_images=1):
    """Forward and every gradient vs the float64 conv, with PyTorch's same-dtype path as the bar."""
    rows, cols = grid
    shape = (num_images, channels, rows * patch, cols * patch)
    mean, std = (CLIP_MEAN[:channels], CLIP_STD[:channels]) if uint8 else (None, None)
    if uint8:
        images = torch.randint(0, 256, shape, dtype=torch.uint8, device=DEVICE)
    else:
        images = torch.randn(shape, dtype=torch.float64, device=DEVICE).to(dtype)
    features = channels * patch * patch
    leaves = {"weight": (torch.randn(width, features, dtype=torch.float64) * features**-0.5).to(dtype).to(DEVICE)}
    if with_bias:
        leaves["bias"] = torch.randn(width, dtype=torch.float64).to(dtype).to(DEVICE)
    patches = images_to_patches(images, patch)
    if not uint8:
        leaves["patches"] = patches
    ours = {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
    torch_lowp = {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
    masters = {name: t.detach().double().requires_grad_() for name, t in leaves.items()}

    out = pe.patch_embed(ours.get("patches", patches), ours["weight"], ours.get("bias"), mean=mean, std=std)
    lowp = reference.patch_embed(torch_lowp.get("patches", patches), torch_lowp["weight"], torch_lowp.get("bias"),
                                 mean=mean, std=std)
    if uint8:
        ref64 = conv2d_float64(images, masters["weight"], masters.get("bias"), patch, mean, std)
    else:  # the float64 images are rebuilt from the patch leaf so that its gradient flows
        ref64 = conv2d_float64(patches_to_images(masters["patches"], shape, patch), masters["weight"],
                               masters.get("bias"), patch)
    assert out.dtype == dtype and out.shape == (patches.shape[0], width)
    assert_error_within(out, ref64, lowp, 2, "out")

    grad = torch.randn(out.shape, dtype=torch.float64, device=DEVICE).to(dtype)
    out.backward(grad)
    lowp.backward(grad)
    ref64.backward(grad.double())
    for name in leaves:
        assert_error_within(ours[name].grad, masters[name].grad, torch_lowp[name].grad, 3, f"d_{name}")


@pytest.mark.parametrize("strategy", pe.STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("channels, patch", [(3, 14), (1, 14), (3, 16), (1, 16)])
def test_uint8_patch_embed_matches_conv2d_on_normalized_images(channels, patch, with_bias, dtype, strategy,
                                                                monkeypatch):
    # 5 x 7 = 35 patches (odd, two row tiles in the interpreter); K = 588, 196, 768, 256; D = 40 (two column tiles).
    monkeypatch.setenv("FINEVIT_PATCH_EMBED", strategy)
    check_against_conv2d(channels, patch, 40, (5, 7), dtype, with_bias=with_bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels, patch", [(3, 14), (1, 16)])
def test_float_patch_embed_matches_conv2d_with_gradients_for_the_patches(channels, patch, dtype):
    check_against_conv2d(channels, patch, 24, (3, 5), dtype, uint8=False)


def test_patch_embed_on_several_images_and_a_wide_embedding():
    # 3 images of 3 x 5 patches = 45 rows, several splits of the weight-gradient reduction; D = 72 (8 · odd).
    check_against_conv2d(3, 14, 72, (3, 5), torch.float32, num_images=3)


def test_patch_embed_with_a_single_patch():
    check_against_conv2d(3, 16, 8, (1, 1), torch.float16)


@pytest.mark.parametrize("strategy", pe.STRATEGIES)
def test_patch_embed_reads_patches_with_a_padded_row_stride(strategy, monkeypatch):
    """A (N, K) view of a wider buffer: the row stride (K + 4) is honoured."""
    monkeypatch.setenv("FINEVIT_PATCH_EMBED", strategy)
    mean, std = CLIP_MEAN, CLIP_STD
    buffer = torch.randint(0, 256, (19, 588 + 4), dtype=torch.uint8, device=DEVICE)
    patches = buffer[:, :588]
    weight = torch.randn(16, 588, device=DEVICE, requires_grad=True)
    out = pe.patch_embed(patches, weight, None, mean=mean, std=std)
    out.backward(torch.ones_like(out))
    weight64 = weight.detach().double().requires_grad_()
    expected = reference.patch_embed(patches.contiguous(), weight64, None, mean=mean, std=std)
    expected.backward(torch.ones_like(expected))
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=0, atol=1e-3)


def test_patch_embed_backward_takes_an_expanded_stride0_gradient():
    patches = torch.randint(0, 256, (21, 196), dtype=torch.uint8, device=DEVICE)
    weight = torch.randn(24, 196, device=DEVICE, requires_grad=True)
    bias = torch.randn(24, device=DEVICE, requires_grad=True)
    pe.patch_embed(patches, weight, bias, mean=[0.5], std=[0.25]).sum().backward()  # grad: expanded ones
    weight64, bias64 = (t.detach().double().requires_grad_() for t in (weight, bias))
    reference.patch_embed(patches, weight64, bias64, mean=[0.5], std=[0.25]).sum().backward()
    torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=0, atol=1e-4)
    torch.testing.assert_close(bias.grad.double(), bias64.grad, rtol=0, atol=1e-5)


def test_patch_embed_is_deterministic():
    patches = torch.randint(0, 256, (45, 588), dtype=torch.uint8, device=DEVICE)
    weight = torch.randn(40, 588, dtype=torch.float16, device=DEVICE, requires_grad=True)
    bias = torch.randn(40, dtype=torch.float16, device=DEVICE, requires_grad=True)
    grad = torch.randn(45, 40, dtype=torch.float16, device=DEVICE)
    results = []
    for _ in range(2):
        weight.grad = bias.grad = None
        out = pe.patch_embed(patches, weight, bias, mean=CLIP_MEAN, std=CLIP_STD)
        out.backward(grad)
        results.append((out.detach().clone(), weight.grad.clone(), bias.grad.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", pe.STRATEGIES)
def test_patch_embed_on_zero_patches(strategy, monkeypatch):
    monkeypatch.setenv("FINEVIT_PATCH_EMBED", strategy)
    weight = torch.randn(8, 48, device=DEVICE, requires_grad=True)
    out = pe.patch_embed(torch.zeros(0, 48, dtype=torch.uint8, device=DEVICE), weight, None, mean=[0.5] * 3,
                         std=[0.5] * 3)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_only_the_requested_gradients_are_computed(monkeypatch):
    calls = []
    dweight = pe.patch_embed_dweight
    monkeypatch.setattr(pe, "patch_embed_dweight", lambda *a: calls.append(a[-1]) or dweight(*a))
    patches = torch.randint(0, 256, (9, 48), dtype=torch.uint8, device=DEVICE)
    weight = torch.randn(8, 48, device=DEVICE)
    bias = torch.randn(8, device=DEVICE, requires_grad=True)
    pe.patch_embed(patches, weight, bias, mean=[0.5] * 3, std=[0.5] * 3).sum().backward()
    assert weight.grad is None and calls == [True]
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 9.0))
    calls.clear()
    with torch.no_grad():
        pe.patch_embed(patches, weight, bias, mean=[0.5] * 3, std=[0.5] * 3)
    assert calls == []


def test_public_function_runs_the_triton_kernel_when_asked(autotuned_launches):
    launches = autotuned_launches
    patches = torch.randint(0, 256, (11, 3 * 16 * 16), dtype=torch.uint8, device=DEVICE)
    weight = torch.randn(16, 3 * 16 * 16, device=DEVICE, requires_grad=True)
    out = K.patch_embed(patches, weight, None, mean=CLIP_MEAN, std=CLIP_STD)
    out.sum().backward()
    assert launches == ["_patch_embed_fwd_kernel", "_patch_embed_dweight_kernel"]
    expected = reference.patch_embed(patches, weight.detach().double(), None, mean=CLIP_MEAN, std=CLIP_STD)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="uint8 patches need mean and std"):
        K.patch_embed(patches, weight)  # validated before any kernel


def test_patch_embed_ops_have_fake_implementations_for_torch_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        patches = torch.empty(37, 588, dtype=torch.uint8)
        weight = torch.empty(40, 588, dtype=torch.bfloat16)
        bias = torch.empty(40, dtype=torch.bfloat16)
        norm = torch.empty(3, 2, dtype=torch.float32)
        y = torch.ops.finevit.patch_embed_fwd(patches, weight, bias, norm, 196)
        dw, db = torch.ops.finevit.patch_embed_dweight(y, patches, norm, 196, True)
        _, no_db = torch.ops.finevit.patch_embed_dweight(y, patches, norm, 196, False)
        dx = torch.ops.finevit.patch_embed_fwd(y, weight.t(), None, None, 1)
        normalized = torch.ops.finevit.normalize_patches(patches, norm, 196, 592, torch.bfloat16)
    assert normalized.shape == (37, 592) and normalized.dtype == torch.bfloat16
    assert y.shape == (37, 40) and y.dtype == torch.bfloat16
    assert dw.shape == (40, 588) and db.shape == (40,) and no_db.shape == (0,) and dw.dtype == torch.bfloat16
    assert dx.shape == (37, 588)


def test_float64_weights_run_the_reference():
    patches = torch.randint(0, 256, (5, 48), dtype=torch.uint8, device=DEVICE)
    weight = torch.randn(8, 48, dtype=torch.float64, device=DEVICE)
    out = pe.patch_embed(patches, weight, None, mean=[0.5] * 3, std=[0.25] * 3)
    assert torch.equal(out, reference.patch_embed(patches, weight, None, mean=[0.5] * 3, std=[0.25] * 3))


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", pe.STRATEGIES)
def test_patch_embed_compiles_with_fullgraph_and_matches_eager(strategy, monkeypatch):
    monkeypatch.setenv("FINEVIT_KERNELS", "triton")
    monkeypatch.setenv("FINEVIT_PATCH_EMBED", strategy)
    patches = torch.randint(0, 256, (301, 588), dtype=torch.uint8, device=DEVICE)
    weight = (torch.randn(72, 588, device=DEVICE) * 0.04).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(72, device=DEVICE).to(torch.bfloat16).requires_grad_()
    compiled = torch.compile(lambda p, w, b: K.patch_embed(p, w, b, mean=CLIP_MEAN, std=CLIP_STD), fullgraph=True)
    out = compiled(patches, weight, bias)
    out.float().square().sum().backward()
    grads = [weight.grad.clone(), bias.grad.clone()]
    weight.grad = bias.grad = None
    eager = pe.patch_embed(patches, weight, bias, mean=CLIP_MEAN, std=CLIP_STD)
    eager.float().square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    for got, want in zip(grads, (weight.grad, bias.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", [*pe.STRATEGIES, "auto"])
def test_patch_embed_on_a_large_batch_matches_the_reference(strategy, monkeypatch):
    """Compiled kernels at a realistic size (several splits, autotuned tiles), bf16; "auto" times both."""
    monkeypatch.setenv("FINEVIT_PATCH_EMBED", strategy)
    check_against_conv2d(3, 16, 768, (16, 16), torch.bfloat16, num_images=16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("channels, patch", [(3, 14), (1, 16)])
def test_normalize_patches_rounds_as_the_fused_kernel_and_zeroes_the_padding(channels, patch, dtype):
    """The two-pass strategy's first pass: x̂ = fp32(a)·α + β rounded once, the formula the fused kernel
    applies in registers, bit for bit; the columns added to reach 16-byte rows (588 -> 592) are zeros."""
    features = channels * patch * patch
    patches = torch.randint(0, 256, (37, features), dtype=torch.uint8, device=DEVICE)
    mean, std = CLIP_MEAN[:channels], CLIP_STD[:channels]
    norm = pe._scale_shift(mean, std, patches.device)
    padded = pe._gemm_features(features)
    out = pe.normalize_patches(patches, norm, patch * patch, padded, dtype)
    alpha, beta = norm.repeat_interleave(patch * patch, dim=0).unbind(1)
    expected = (patches.float() * alpha + beta).to(dtype)
    assert out.shape == (37, padded) and padded % 8 == 0 and padded - features < 8
    assert torch.equal(out[:, :features], expected)
    assert torch.equal(out[:, features:], torch.zeros(37, padded - features, dtype=dtype, device=DEVICE))


def test_the_strategy_is_named_or_timed_once_per_shape_and_remembered(monkeypatch):
    patches = torch.randint(0, 256, (40, 48), dtype=torch.uint8, device=DEVICE)
    weight = torch.randn(8, 48, device=DEVICE, requires_grad=True)
    norm = pe._scale_shift([0.5] * 3, [0.5] * 3, patches.device)
    monkeypatch.setenv("FINEVIT_PATCH_EMBED", "two_pass")
    assert pe._strategy(patches, weight, None, norm, 16) == "two_pass"
    monkeypatch.setenv("FINEVIT_PATCH_EMBED", "fastest")
    with pytest.raises(ValueError, match="FINEVIT_PATCH_EMBED must be one of auto, fused, two_pass"):
        pe._strategy(patches, weight, None, norm, 16)
    monkeypatch.setenv("FINEVIT_PATCH_EMBED", "auto")
    assert pe._strategy(patches, weight, None, norm, 16) == "fused"  # nothing to time on (the interpreter)
    timed = []
    monkeypatch.setattr(pe, "_can_time", lambda weight: True)
    monkeypatch.setattr(pe, "_fastest_strategy", {})
    monkeypatch.setattr(pe, "_time_strategies", lambda *args: timed.append(args[-1]) or "two_pass")
    for rows in (40, 41, 3000):  # 40 and 41 share a row-count octave; 3000 does not
        assert pe._strategy(patches[:1].expand(rows, -1), weight, None, norm, 16) == "two_pass"
    with torch.no_grad():  # no gradient to time: a key of its own
        pe._strategy(patches, weight, None, norm, 16)
    assert timed == [True, True, False]
