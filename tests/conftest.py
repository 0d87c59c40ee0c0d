"""Test-wide setup.

Without CUDA, the Triton kernels are tested on CPU by Triton's interpreter: `TRITON_INTERPRET=1` must be
set before any kernel module is imported (triton.jit picks the interpreter at decoration time), so it is
set here, before collection. The rest of the suite (models, reference ops) runs the PyTorch reference
path (`FINEVIT_KERNELS=reference`); kernel tests select the Triton path explicitly.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FINEVIT_KERNELS", "reference")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; skip them cleanly on machines without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
