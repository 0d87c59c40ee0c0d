"""Which path a public op runs: its Triton kernel or the PyTorch reference (`reference.py`).

Every public op ends with `if not use_triton(op, device): return reference.<op>(...)`.
`FINEVIT_KERNELS` selects the path, read at every call:
- unset or `auto`: the Triton kernel when the tensors are on CUDA (or on CPU with `TRITON_INTERPRET=1`,
  Triton's interpreter), else the reference;
- `reference`: always the reference;
- `triton`: always the Triton kernel; an error when the device cannot run it.
Set `TRITON_INTERPRET=1` before triton is imported (it is read at import) to interpret the kernels on CPU.
"""

from __future__ import annotations

import os

import torch
from torch.library import wrap_triton

MODES = ("auto", "reference", "triton")


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (tests and CI) rather than compiled."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_mode() -> str:
    mode = os.environ.get("FINEVIT_KERNELS", "auto") or "auto"
    if mode not in MODES:
        raise ValueError(f"FINEVIT_KERNELS must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def triton_can_run_on(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def use_triton(op: str, device: torch.device) -> bool:
    """Whether `op` runs its Triton kernel for tensors on `device`, following FINEVIT_KERNELS."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    if mode == "triton" and not triton_can_run_on(device):
        raise RuntimeError(f"FINEVIT_KERNELS=triton, but {op} got tensors on {device}: Triton kernels run "
                           f"on CUDA, or on CPU with TRITON_INTERPRET=1 set before triton is imported")
    return triton_can_run_on(device)


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here (tests replace it with a NaN-filled one to prove that every
    element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def alignment(*values: int, limit: int = 16) -> int:
    """The largest power of two <= `limit` dividing every value (0 is divisible by all).

    Kernels take their strides (and some sizes) divided by this as an `ALIGN` constexpr and multiply them back:
    Triton then knows that rows and heads start on ALIGN-element boundaries and loads ALIGN-wide vectors, which it
    cannot assume from a stride like 72 (it specializes integer arguments only on divisibility by 16). A limit of
    16 bytes' worth of elements is the widest vector."""
    align = limit
    while any(v % align for v in values):
        align //= 2
    return align


def strides_in_units(*tensors: torch.Tensor) -> tuple[int, list[int]]:
    """(ALIGN, the token and head strides (dims 0 and 1) of `tensors` in order, divided by it) for kernels over
    (tokens, heads, channels) tensors: ALIGN = `alignment` of those strides up to 16 bytes of the first tensor's
    elements (8 for every dense 16-bit layout whose channel count is a multiple of 8)."""
    strides = [s for t in tensors for s in (t.stride(0), t.stride(1))]
    align = alignment(*strides, limit=16 // tensors[0].element_size())
    return align, [s // align for s in strides]


def launch(tuned, plain, grid, *args, interpreter_blocks: dict, **constexprs) -> None:
    """Launch an autotuned kernel; under the interpreter, where every autotune candidate would run (slowly),
    its plain kernel with the one fixed tile `interpreter_blocks` instead."""
    if interpreting():
        wrap_triton(plain)[grid](*args, **constexprs, **interpreter_blocks)
    else:
        wrap_triton(tuned)[grid](*args, **constexprs)
