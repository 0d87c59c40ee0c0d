"""FINEVIT_KERNELS selects the path of every public op; a forced path that cannot run fails clearly."""

import pytest
import torch

import finevit.kernels as K
from finevit.kernels import _dispatch, reference

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def rope_inputs():
    x = torch.randn(4, 2, 32)
    cos, sin = K.rope_2d_cos_sin(torch.zeros(4, 2, dtype=torch.int64), 32)
    return x, cos, sin


def attention_inputs():
    q, k, v = (torch.randn(5, 2, 32) for _ in range(3))
    return q, k, v, K.cu_seqlens_from_lengths([2, 3]), 3


def loss_inputs():
    img, txt = (torch.nn.functional.normalize(torch.randn(6, 8), dim=-1) for _ in range(2))
    return img, txt, torch.tensor(10.0), torch.tensor(-10.0)


# (public op, its reference, inputs) for every op that has a Triton kernel.
OPS = {
    "varlen_attention": (K.varlen_attention, "varlen_attention", attention_inputs),
    "apply_rope": (K.apply_rope, "apply_rope", rope_inputs),
    "patch_embed": (K.patch_embed, "patch_embed", lambda: (torch.randn(3, 12), torch.randn(4, 12))),
    "siglip_loss": (K.siglip_loss, "siglip_loss", loss_inputs),
    "clip_loss": (K.clip_loss, "clip_loss", lambda: loss_inputs()[:3]),
}


@pytest.mark.parametrize(
    "mode, interpret, device, expected",
    [
        ("auto", False, CPU, False),
        ("auto", True, CPU, True),
        ("auto", False, CUDA, True),
        ("reference", True, CPU, False),
        ("reference", False, CUDA, False),
        ("triton", True, CPU, True),
        ("triton", False, CUDA, True),
    ],
)
def test_use_triton_follows_the_mode_and_the_device(monkeypatch, mode, interpret, device, expected):
    monkeypatch.setenv("FINEVIT_KERNELS", mode)
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _dispatch.use_triton("apply_rope", device) is expected


@pytest.mark.parametrize("op", OPS)
def test_reference_mode_runs_the_reference_of_every_op(monkeypatch, op):
    """The public op hands its (checked) inputs to `reference.<op>`, even where its kernel could run."""
    public, name, inputs = OPS[op]
    calls = []
    real = getattr(reference, name)
    monkeypatch.setattr(reference, name, lambda *a, **kw: calls.append(op) or real(*a, **kw))
    monkeypatch.setenv("FINEVIT_KERNELS", "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    public(*inputs())
    assert calls == [op]


@pytest.mark.parametrize("op", OPS)
def test_triton_mode_runs_the_kernel_of_every_op(monkeypatch, op):
    """Under the interpreter with FINEVIT_KERNELS=triton no op falls back to its reference."""
    public, name, inputs = OPS[op]
    monkeypatch.setattr(reference, name, lambda *a, **kw: pytest.fail(f"{op} ran its reference"))
    monkeypatch.setenv("FINEVIT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    public(*inputs())


def test_forced_triton_fails_clearly_on_a_device_that_cannot_run_it(monkeypatch):
    monkeypatch.setenv("FINEVIT_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="apply_rope got tensors on cpu"):
        K.apply_rope(*rope_inputs())


def test_an_unknown_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("FINEVIT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="FINEVIT_KERNELS must be one of auto, reference, triton, got 'cuda'"):
        K.apply_rope(*rope_inputs())


def test_every_public_op_with_a_kernel_is_covered_here():
    with_reference = {name for name in K.__all__
                      if getattr(getattr(reference, name, None), "__module__", None) == reference.__name__}
    assert set(OPS) == with_reference - {"rope_2d_cos_sin", "rope_1d_cos_sin"}  # tables: plain torch, no kernel


def test_alignment_is_the_largest_power_of_two_up_to_the_limit_dividing_every_value():
    assert _dispatch.alignment(588, 768, 588) == 4
    assert _dispatch.alignment(768, 1152) == 16
    assert _dispatch.alignment(72, 0) == 8
    assert _dispatch.alignment(675, 768) == 1
    assert _dispatch.alignment(72 * 12, 72, limit=8) == 8  # a bf16 (T, 12, 72) layout: 16-byte rows
    assert _dispatch.alignment(36, 36, limit=4) == 4  # float32 cos/sin rows of r/2 = 36
