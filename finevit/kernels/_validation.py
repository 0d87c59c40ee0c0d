"""Input checks shared by every public op of `finevit.kernels`.

Each public function calls one `check_<op>` before dispatching, so the reference and the Triton paths
see the same validated inputs and every user gets the same message. Messages name the op, the
argument, what was expected and what was given. `TypeError` is raised for a wrong type or dtype,
`ValueError` for a wrong shape, layout or value.

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
MIN_HEAD_DIM, MAX_HEAD_DIM, HEAD_DIM_MULTIPLE = 32, 256, 8


def _fail(op: str, message: str, error: type[Exception] = ValueError):
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
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if ndim is not None and t.ndim != ndim:
        _fail(op, f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        expected = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        _fail(op, f"{name} must have dtype in ({expected}), got {t.dtype}", TypeError)
    if device is not None and t.device != device:
        _fail(op, f"{name} must be on {device} like the other inputs, got {t.device}")
    if last_dim_contiguous and t.ndim > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        _fail(op, f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def check_int(op: str, name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(op, f"{name} must be a Python int, got {type(value).__name__}", TypeError)
    if value < minimum:
        _fail(op, f"{name} must be >= {minimum}, got {value}")


def check_positive_float(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(op, f"{name} must be a float, got {type(value).__name__}", TypeError)
    if not (math.isfinite(value) and value > 0):
        _fail(op, f"{name} must be a finite positive number, got {value}")


def check_cu_seqlens(op: str, cu_seqlens, total_tokens: int, max_seqlen, device: torch.device) -> None:
    """cu_seqlens: int32 (num_seqs + 1,), 0 = cu[0] <= cu[1] <= ... <= cu[-1] = total_tokens."""
    check_tensor(op, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
    if cu_seqlens.numel() < 2:
        _fail(op, f"cu_seqlens must hold num_seqs + 1 >= 2 offsets, got {cu_seqlens.numel()}")
    check_int(op, "max_seqlen", max_seqlen, minimum=1)
    if not should_check_values(cu_seqlens):
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        _fail(op, f"cu_seqlens must start at 0, got {cu[0]}")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if min(lengths) < 0:
        i = min(range(len(lengths)), key=lengths.__getitem__)
        _fail(op, f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}]={cu[i]} > cu_seqlens[{i + 1}]={cu[i + 1]}")
    if cu[-1] != total_tokens:
        _fail(op, f"cu_seqlens must end at total_tokens={total_tokens}, got {cu[-1]}")
    if max(lengths) > max_seqlen:
        _fail(op, f"max_seqlen={max_seqlen} is smaller than the longest sequence ({max(lengths)} tokens)")


def check_cos_sin(op: str, cos, sin, total_tokens: int, head_dim: int, device: torch.device) -> None:
    """cos, sin: float32 (total_tokens, rotary_dim // 2) with even rotary_dim <= head_dim."""
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(op, name, t, ndim=2, dtypes=(torch.float32,), device=device, last_dim_contiguous=True)
    if cos.shape != sin.shape:
        _fail(op, f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.shape[0] != total_tokens:
        _fail(op, f"cos must have one row per token ({total_tokens}), got shape {tuple(cos.shape)}")
    if not 1 <= cos.shape[1] <= head_dim // 2:
        _fail(op, f"cos must have rotary_dim // 2 columns with 2 <= rotary_dim <= head_dim={head_dim}, "
              f"got {cos.shape[1]} columns")


def check_head_dim(op: str, head_dim: int) -> None:
    if not (MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % HEAD_DIM_MULTIPLE == 0):
        _fail(op, f"head_dim must be a multiple of {HEAD_DIM_MULTIPLE} in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], "
              f"got {head_dim}")


def check_varlen_attention(q, k, v, cu_seqlens, max_seqlen, cos, sin, softmax_scale) -> None:
    op = "varlen_attention"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    for name, t in (("k", k), ("v", v)):
        check_tensor(op, name, t, ndim=3, dtypes=(q.dtype,), device=q.device, last_dim_contiguous=True)
        if t.shape != q.shape:
            _fail(op, f"{name} must have q's shape {tuple(q.shape)} (total_tokens, num_heads, head_dim), "
                  f"got {tuple(t.shape)}")
    total_tokens, _, head_dim = q.shape
    if total_tokens < 1 or q.shape[1] < 1:
        _fail(op, f"q must have at least one token and one head, got shape {tuple(q.shape)}")
    check_head_dim(op, head_dim)
    check_cu_seqlens(op, cu_seqlens, total_tokens, max_seqlen, q.device)
    if (cos is None) != (sin is None):
        _fail(op, "cos and sin must be given together (both or neither)")
    if cos is not None:
        check_cos_sin(op, cos, sin, total_tokens, head_dim, q.device)
    if softmax_scale is not None:
        check_positive_float(op, "softmax_scale", softmax_scale)


def check_apply_rope(x, cos, sin) -> None:
    op = "apply_rope"
    check_tensor(op, "x", x, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_cos_sin(op, cos, sin, x.shape[0], x.shape[2], x.device)


def check_rope_cos_sin(op: str, positions, head_dim, theta, rotary_dim, *, axes: int) -> int:
    """Checks a cos/sin builder's inputs; returns the rotary dim. `axes`: 1 (text) or 2 (row, col)."""
    shape = "(total_tokens, 2)" if axes == 2 else "(total_tokens,)"
    int_dtypes = (torch.int32, torch.int64)
    check_tensor(op, "positions", positions, ndim=2 if axes == 2 else 1, dtypes=int_dtypes)
    if axes == 2 and positions.shape[1] != 2:
        _fail(op, f"positions must have shape {shape} holding (row, col), got {tuple(positions.shape)}")
    check_int(op, "head_dim", head_dim, minimum=1)
    check_positive_float(op, "theta", theta)
    r = head_dim if rotary_dim is None else rotary_dim
    check_int(op, "rotary_dim", r, minimum=1)
    # Each axis needs whole rotate-half pairs: 2 channels per frequency, `axes` angle groups.
    multiple = 2 * axes
    if r % multiple or r > head_dim:
        _fail(op, f"rotary_dim must be a multiple of {multiple} and <= head_dim={head_dim}, got {r}")
    return r


def check_patch_embed(patches, weight, bias, mean, std) -> None:
    op = "patch_embed"
    check_tensor(op, "weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "patches", patches, ndim=2, dtypes=(torch.uint8, weight.dtype), device=weight.device,
                 last_dim_contiguous=True)
    num_features = weight.shape[1]
    if patches.shape[1] != num_features:
        _fail(op, f"patches must have shape (num_patches, C·P·P={num_features}) to match weight "
              f"{tuple(weight.shape)}, got {tuple(patches.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, dtypes=(weight.dtype,), device=weight.device)
        if bias.shape[0] != weight.shape[0]:
            _fail(op, f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}")
    if patches.dtype != torch.uint8:
        if mean is not None or std is not None:
            _fail(op, "mean and std normalize uint8 patches; float patches are used as is, pass neither")
        return
    if mean is None or std is None:
        _fail(op, "uint8 patches need mean and std (one float per channel)")
    for name, values in (("mean", mean), ("std", std)):
        if isinstance(values, (str, torch.Tensor)) or not isinstance(values, Sequence):
            _fail(op, f"{name} must be a sequence of floats (one per channel), got {type(values).__name__}",
                  TypeError)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                _fail(op, f"{name} must hold finite floats, got {list(values)}", TypeError)
    if len(mean) != len(std) or len(mean) == 0:
        _fail(op, f"mean and std must have one value per channel (same length >= 1), "
              f"got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        _fail(op, f"std must be positive, got {list(std)}")
    if num_features % len(mean):
        _fail(op, f"patches have {num_features} features, not a multiple of C={len(mean)} channels "
              f"(the length of mean/std)")


def check_contrastive(op: str, img, txt, logit_scale, logit_bias, group) -> None:
    check_tensor(op, "img", img, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor(op, "txt", txt, ndim=2, dtypes=(img.dtype,), device=img.device, last_dim_contiguous=True)
    if txt.shape != img.shape:
        _fail(op, f"txt must have img's shape {tuple(img.shape)} (B, D), got {tuple(txt.shape)}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        _fail(op, f"img must hold at least one pair of at least one feature, got shape {tuple(img.shape)}")
    scalars = [("logit_scale", logit_scale)] + ([("logit_bias", logit_bias)] if op == "siglip_loss" else [])
    for name, t in scalars:
        check_tensor(op, name, t, dtypes=FLOAT_DTYPES, device=img.device)
        if t.numel() != 1:
            _fail(op, f"{name} must hold one value, got shape {tuple(t.shape)}")
    if group is not None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            _fail(op, "group was given but torch.distributed is not initialized", RuntimeError)
        if not isinstance(group, dist.ProcessGroup):
            _fail(op, f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}",
                  TypeError)
