"""FINEVIT_KERNELS selects the implementation; a forced path that cannot run fails clearly."""

import sys

import pytest
import torch

import finevit.kernels as K
from finevit.kernels import _dispatch, reference


@pytest.fixture
def fake_triton_kernel(monkeypatch):
    """Register a stand-in 'Triton' apply_rope so the selection logic can be observed."""
    calls = []

    def kernel(x, cos, sin):
        calls.append(x.device)
        return reference.apply_rope(x, cos, sin)

    monkeypatch.setitem(_dispatch.TRITON_IMPLEMENTATIONS, "apply_rope", f"{__name__}:_stand_in")
    monkeypatch.setattr(sys.modules[__name__], "_stand_in", kernel)
    return calls


def _stand_in(*args):  # replaced by the fixture
    raise AssertionError("the fixture did not install the stand-in kernel")


def rope_inputs():
    x = torch.randn(4, 2, 32)
    cos, sin = K.rope_2d_cos_sin(torch.zeros(4, 2, dtype=torch.int64), 32)
    return x, cos, sin


def test_auto_uses_the_reference_on_cpu_without_the_interpreter(monkeypatch, fake_triton_kernel):
    monkeypatch.delenv("FINEVIT_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _dispatch.implementation("apply_rope", torch.device("cpu")) is reference.apply_rope
    K.apply_rope(*rope_inputs())
    assert fake_triton_kernel == []


def test_auto_uses_the_triton_kernel_under_the_interpreter_and_on_cuda(monkeypatch, fake_triton_kernel):
    monkeypatch.delenv("FINEVIT_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    K.apply_rope(*rope_inputs())
    assert fake_triton_kernel == [torch.device("cpu")]
    monkeypatch.delenv("TRITON_INTERPRET")
    assert _dispatch.implementation("apply_rope", torch.device("cuda", 0)) is not reference.apply_rope


def test_reference_mode_wins_over_an_available_kernel(monkeypatch, fake_triton_kernel):
    monkeypatch.setenv("FINEVIT_KERNELS", "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    K.apply_rope(*rope_inputs())
    assert fake_triton_kernel == []


def test_forced_triton_fails_clearly_without_a_kernel_or_a_capable_device(monkeypatch, fake_triton_kernel):
    monkeypatch.setenv("FINEVIT_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="apply_rope got tensors on cpu"):
        K.apply_rope(*rope_inputs())
    monkeypatch.delitem(_dispatch.TRITON_IMPLEMENTATIONS, "apply_rope")
    with pytest.raises(RuntimeError, match="apply_rope has no Triton kernel yet"):
        K.apply_rope(*rope_inputs())


def test_an_unknown_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("FINEVIT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="FINEVIT_KERNELS must be one of auto, reference, triton, got 'cuda'"):
        K.apply_rope(*rope_inputs())


def test_every_triton_entry_names_a_public_op_with_a_reference():
    for op in _dispatch.TRITON_IMPLEMENTATIONS:
        assert op in K.__all__ and callable(getattr(reference, op))
