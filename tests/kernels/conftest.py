"""Fixtures of the kernel tests."""

import pytest
import torch


@pytest.fixture
def triton_path(monkeypatch):
    """The public ops take their Triton path (compiled on CUDA, interpreted on CPU), never the reference:
    a kernel test that silently compared the reference with itself would pass whatever the kernel does."""
    monkeypatch.setenv("FINEVIT_KERNELS", "triton")


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel forgets to write shows in the comparison."""
    from finevit.kernels import _dispatch

    def empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_dispatch, "empty", empty)


@pytest.fixture
def autotuned_launches(monkeypatch):
    """The names of the kernels launched through `_dispatch.launch` (the autotuned ones), in order."""
    from finevit.kernels import _dispatch

    launches, launch = [], _dispatch.launch

    def counting_launch(tuned, plain, *args, **kwargs):
        launches.append(plain.__name__)
        return launch(tuned, plain, *args, **kwargs)

    monkeypatch.setattr(_dispatch, "launch", counting_launch)
    return launches
