"""Fixtures of the kernel tests."""

import pytest


@pytest.fixture
def triton_path(monkeypatch):
    """The public ops take their Triton path (compiled on CUDA, interpreted on CPU), never the reference:
    a kernel test that silently compared the reference with itself would pass whatever the kernel does."""
    monkeypatch.setenv("FINEVIT_KERNELS", "triton")
