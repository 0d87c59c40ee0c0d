"""Which implementation a public op runs: a Triton kernel or the PyTorch reference.

`FINEVIT_KERNELS` selects the path, read at every call:
- unset or `auto`: the Triton kernel when the op has one and the tensors are on CUDA (or on CPU with
  `TRITON_INTERPRET=1`, Triton's interpreter), else the reference;
- `reference`: always the reference;
- `triton`: always the Triton kernel; an error when the op has none or the device cannot run it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from . import reference

# Op name -> "module:function" of its Triton implementation. Kernel modules add their entry here.
TRITON_IMPLEMENTATIONS: dict[str, str] = {
    "apply_rope": ".rope:apply_rope",
    "varlen_attention": ".attention:varlen_attention",
    "siglip_loss": ".siglip_loss:siglip_loss",
    "clip_loss": ".clip_loss:clip_loss",
    "patch_embed": ".patch_embed:patch_embed",
}

MODES = ("auto", "reference", "triton")


def kernel_mode() -> str:
    mode = os.environ.get("FINEVIT_KERNELS", "auto") or "auto"
    if mode not in MODES:
        raise ValueError(f"FINEVIT_KERNELS must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def triton_can_run_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _load(path: str) -> Callable:
    if path not in _LOADED:
        module, name = path.split(":")
        _LOADED[path] = getattr(importlib.import_module(module, package=__package__), name)
    return _LOADED[path]


# Kernel modules are imported with finevit.kernels, so that torch.compile never traces an import
# (Dynamo refuses importlib); set TRITON_INTERPRET=1 before importing finevit.kernels to interpret them.
_LOADED: dict[str, Callable] = {}
for _path in TRITON_IMPLEMENTATIONS.values():
    _load(_path)


def implementation(op: str, device: torch.device) -> Callable:
    """The function that runs `op` for tensors on `device`, following FINEVIT_KERNELS."""
    mode = kernel_mode()
    if mode == "reference":
        return getattr(reference, op)
    path = TRITON_IMPLEMENTATIONS.get(op)
    if mode == "triton":
        if path is None:
            raise RuntimeError(f"FINEVIT_KERNELS=triton, but {op} has no Triton kernel yet; "
                               f"unset FINEVIT_KERNELS to use the reference")
        if not triton_can_run_on(device):
            raise RuntimeError(f"FINEVIT_KERNELS=triton, but {op} got tensors on {device}: Triton kernels run "
                               f"on CUDA, or on CPU with TRITON_INTERPRET=1 set before triton is imported")
    if path is not None and triton_can_run_on(device):
        return _load(path)
    return getattr(reference, op)
