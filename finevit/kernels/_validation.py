"""Input checks shared by the public ops of `finevit.kernels`.

Each public op checks its inputs with these helpers (at the bottom of its file) before it picks a path,
so the reference and the Triton paths see the same validated inputs and every user gets the same
message. Messages name the op, the argument, what was expected and what was given. `TypeError` is
raised for a wrong type or dtype, `ValueError` for a wrong shape, layout or value.

Checks that need the *values* of a tensor (cu_seqlens monotone, ending at total_tokens) read it on
the host. They run for CPU tensors always; for CUDA tensors only with `FINEVIT_CHECK_VALUES=1`
(reading a device tensor synchronizes the stream, which a training step must not do per layer),
and never while `torch.compile` traces.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fail(op: str, message: str, error: type[Exception] = ValueError):
    raise error(f"{op}: {message}")


def should_check_values(t: torch.Tensor) -> bool:
    """Whether value checks that read `t` on the host are cheap and allowed here."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    return t.device.type == "cpu" or os.environ.get("FINEVIT_CHECK_VALUES") == "1"


def check_tensor(
    op: str,
    name: str,
    t,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    last_dim_contiguous: bool = False,
) -> None:
    """Type, rank, dtype, device and innermost-stride checks for one tensor argument."""
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if ndim is not None and t.ndim != ndim:
        fail(op, f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        expected = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        fail(op, f"{name} must have dtype in ({expected}), got {t.dtype}", TypeError)
    if device is not None and t.device != device:
        fail(op, f"{name} must be on {device} like the other inputs, got {t.device}")
    if last_dim_contiguous and t.ndim > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        fail(op, f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def check_int(op: str, name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        fail(op, f"{name} must be a Python int, got {type(value).__name__}", TypeError)
    if value < minimum:
        fail(op, f"{name} must be >= {minimum}, got {value}")


def check_positive_float(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(op, f"{name} must be a float, got {type(value).__name__}", TypeError)
    if not (math.isfinite(value) and value > 0):
        fail(op, f"{name} must be a finite positive number, got {value}")


def check_cu_seqlens(op: str, cu_seqlens, total_tokens: int, max_seqlen, device: torch.device) -> None:
    """cu_seqlens: int32 (num_seqs + 1,), 0 = cu[0] <= cu[1] <= ... <= cu[-1] = total_tokens."""
    check_tensor(op, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
    if cu_seqlens.numel() < 2:
        fail(op, f"cu_seqlens must hold num_seqs + 1 >= 2 offsets, got {cu_seqlens.numel()}")
    check_int(op, "max_seqlen", max_seqlen, minimum=1)
    if not should_check_values(cu_seqlens):
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        fail(op, f"cu_seqlens must start at 0, got {cu[0]}")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if min(lengths) < 0:
        i = min(range(len(lengths)), key=lengths.__getitem__)
        fail(op, f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}]={cu[i]} > cu_seqlens[{i + 1}]={cu[i + 1]}")
    if cu[-1] != total_tokens:
        fail(op, f"cu_seqlens must end at total_tokens={total_tokens}, got {cu[-1]}")
    if max(lengths) > max_seqlen:
        fail(op, f"max_seqlen={max_seqlen} is smaller than the longest sequence ({max(lengths)} tokens)")


def check_cos_sin(op: str, cos, sin, total_tokens: int, head_dim: int, device: torch.device) -> None:
    """cos, sin: float32 (total_tokens, rotary_dim // 2) with even rotary_dim <= head_dim."""
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(op, name, t, ndim=2, dtypes=(torch.float32,), device=device, last_dim_contiguous=True)
    if cos.shape != sin.shape:
        fail(op, f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.shape[0] != total_tokens:
        fail(op, f"cos must have one row per token ({total_tokens}), got shape {tuple(cos.shape)}")
    if not 1 <= cos.shape[1] <= head_dim // 2:
        fail(op, f"cos must have rotary_dim // 2 columns with 2 <= rotary_dim <= head_dim={head_dim}, "
              f"got {cos.shape[1]} columns")
