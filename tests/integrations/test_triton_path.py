"""The patched towers on the Triton attention kernel itself (Triton's interpreter on CPU, compiled on a GPU).

The other tests run finevit's PyTorch reference; these check what only the kernel could get wrong with the
tensors the patches hand it: q/k/v strided views of the qkv projection, empty padding sequences in the
[valid | padding] cu_seqlens of a padded batch, Qwen's window cu_seqlens, and cos/sin as strided halves of
transformers' tables. float32, tiny shapes (the interpreter is slow); patch embedding left to its own tests.
"""

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("transformers")

from .helpers import KernelSpy, assert_patched_matches  # noqa: E402
from .test_qwen2_vl import qwen_inputs, tiny_qwen2_5_vl  # noqa: E402
from .test_qwen2_vl import run as run_qwen
from .test_timm_vit import tiny_vit  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 set before triton is imported")
    monkeypatch.setenv("FINEVIT_KERNELS", "triton")


def test_padded_vit_batch_on_the_triton_kernel(monkeypatch):
    valid = torch.ones(3, 17, dtype=torch.bool)
    valid[1, 9:] = False  # every row but this one has an empty padding sequence
    attend = valid[:, None, :, None] & valid[:, None, None, :]

    def run(m, inputs):
        x = inputs["x"]
        return {"valid tokens": m.forward_features(x, attn_mask=attend.to(x.device))[valid.to(x.device)]}

    spy = KernelSpy(monkeypatch)
    assert_patched_matches(tiny_vit(depth=1), lambda: {"x": torch.randn(3, 3, 32, 32)}, run, torch.float32,
                           patch_embed=False, device=DEVICE)
    assert spy.calls[0][0][3].tolist() == [0, 17, 17, 26, 34, 51, 51]


def test_qwen2_5_vl_tower_on_the_triton_kernel():
    assert_patched_matches(tiny_qwen2_5_vl(depth=2, fullatt_block_indexes=[1]), qwen_inputs, run_qwen,
                           torch.float32, patch_embed=False, device=DEVICE)
