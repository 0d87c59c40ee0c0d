"""What every family patch shares: padded batches as varlen sequences, patch embeddings as one GEMM,
refusals, and the bookkeeping that makes a patch idempotent and undoable.

Calls go through the `finevit.kernels` module attributes at call time (`kernels.varlen_attention`),
so the dispatch (Triton on CUDA, the reference on CPU, `FINEVIT_KERNELS`) applies, and a test can
spy on them with `monkeypatch.setattr(finevit.kernels, "varlen_attention", ...)`.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable

import torch
from torch import nn

from finevit import kernels
from finevit.kernels._validation import should_check_values
from finevit.kernels.attention import SUPPORTED_HEAD_DIMS

# Additive-mask values at or below this are "masked": exp(-1e4) is 0 in every float dtype, so softmax
# gives those keys exactly zero weight, as a key that is left out does.
MASKED_BELOW = -1e4

# ----------------------------------------------------------------------------------------------------
# Families and refusals
# ----------------------------------------------------------------------------------------------------


def is_instance_of(obj: object, classes) -> bool:
    """isinstance against classes given as (module, qualname), without importing their modules.

    A model is an instance of a timm or transformers class only if that module was imported, so the
    family checks never import timm or transformers themselves.
    """
    return any((cls.__module__, cls.__qualname__) in classes for cls in type(obj).__mro__)


class UnsupportedModelError(ValueError):
    """A model of a known family whose configuration the kernels cannot run exactly (see the message)."""


def check_head_dim(where: str, head_dim: int) -> None:
    """Refuse head dims outside the attention kernel's limits rather than run something else."""
    if not kernels.supports_head_dim(head_dim):
        raise UnsupportedModelError(
            f"{where} has head_dim {head_dim}; finevit.kernels.varlen_attention supports "
            f"{SUPPORTED_HEAD_DIMS}, so this model cannot be patched"
        )


def check_no_attention_dropout(where: str, p: float) -> None:
    if p:
        raise UnsupportedModelError(
            f"{where} has attention dropout {p}; finevit.kernels.varlen_attention has no dropout, so this "
            f"model cannot be patched exactly (set the attention dropout to 0 first)"
        )


# ----------------------------------------------------------------------------------------------------
# Attention over padded batches
# ----------------------------------------------------------------------------------------------------


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under torch.autocast, the tensors in autocast's dtype, as autocast casts the SDPA, conv and linear
    calls the patches replace (finevit's ops are not in its lists); unchanged otherwise."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def key_padding_from_mask(mask: torch.Tensor, batch: int, seqlen: int, where: str) -> torch.Tensor:
    """The valid keys (batch, seqlen) bool of a key-padding attention mask; refuses any other mask.

    Accepted: a 2D (batch, seqlen) mask, or a 4D (batch | 1, 1, seqlen | 1, seqlen) one, boolean
    (True = attend) or additive (0 = attend, <= -1e4 or -inf = masked), symmetric (padded queries see
    nothing, timm NaFlex) or key-only (every query sees the valid keys, transformers). Key j is valid
    when query j may attend to it (the diagonal), which holds for both. On CPU (on CUDA only with
    FINEVIT_CHECK_VALUES=1, as it reads the mask on the host) the whole mask is checked: every valid
    query must see exactly the valid keys, else a ValueError; a mask with other structure (causal,
    per-head, a bias) cannot run as packed sequences.
    """
    if mask.dim() == 2:
        rows = mask[:, None, :]  # (B, 1, N)
    elif mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] in (1, seqlen):
        rows = mask[:, 0]  # (B or 1, Q, N)
    else:
        raise ValueError(f"{where}: attention masks must be key-padding masks of shape (B, N) or "
                         f"(B, 1, N | 1, N), got shape {tuple(mask.shape)}")
    if rows.shape[0] not in (1, batch) or rows.shape[-1] != seqlen:
        raise ValueError(f"{where}: attention mask of shape {tuple(mask.shape)} does not match a batch of "
                         f"{batch} sequences of {seqlen} tokens")
    attend = rows if rows.dtype == torch.bool else rows == 0  # (B, Q, N)
    valid = attend.diagonal(dim1=-2, dim2=-1) if attend.shape[1] == seqlen else attend[:, 0]  # (B, N)
    valid = valid.expand(batch, seqlen)
    if should_check_values(mask):
        valid_queries = valid if attend.shape[1] == seqlen else valid[:, :1]
        wrong = (attend != valid[:, None, :]) & valid_queries[:, :, None]
        if rows.dtype != torch.bool:
            wrong |= ~attend & (rows > MASKED_BELOW)
        if bool(wrong.any()):
            raise ValueError(
                f"{where}: the attention mask is not a key-padding mask (some valid query sees a set of keys "
                f"other than the valid ones, or an additive mask holds values other than 0 and <= {MASKED_BELOW:g}); "
                f"finevit's varlen attention cannot run it"
            )
    return valid


def padded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    softmax_scale: float | None,
) -> torch.Tensor:
    """Attention of a padded batch through `varlen_attention`: q, k, v (B, N, H, D) -> (B, N, H, D).

    Without `valid`, the batch is B sequences of N tokens, a free reshape to (B·N, H, D). With `valid`
    (B, N) bool, each row's valid tokens are moved first (a stable sort, so any padding pattern
    works) and every row becomes two sequences, [valid | padding]: valid tokens attend exactly to the
    valid tokens of their row, padding tokens only among themselves (their outputs are discarded by
    every model, so they only need to be finite). cu_seqlens (2B + 1,) and max_seqlen = N come from
    shapes and device ops alone: no host sync, no data-dependent shapes, and the attention cost is
    Σ(n_valid² + n_pad²) instead of the N² a masked dense attention pays.
    """
    q, k, v = autocast_inputs(q, k, v)  # e.g. q, k float32 out of a qk-norm, v bf16 out of the qkv linear
    batch, seqlen, heads, head_dim = q.shape
    starts = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=q.device)  # (B + 1,)
    if valid is None:
        flat = [x.reshape(batch * seqlen, heads, head_dim) for x in (q, k, v)]  # (B·N, H, D)
        out = kernels.varlen_attention(*flat, starts, seqlen, softmax_scale=softmax_scale)
        return out.view(batch, seqlen, heads, head_dim)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # (B, N): valid tokens first
    index = (order + starts[:-1, None]).flatten()  # (B·N,) packed slot -> padded token
    lengths = valid.sum(dim=1, dtype=torch.int32)  # (B,)
    cu_seqlens = torch.cat([torch.stack([starts[:-1], starts[:-1] + lengths], dim=1).flatten(), starts[-1:]])
    packed = [x.reshape(batch * seqlen, heads, head_dim).index_select(0, index) for x in (q, k, v)]
    out = kernels.varlen_attention(*packed, cu_seqlens, seqlen, softmax_scale=softmax_scale)  # (B·N, H, D)
    out = torch.zeros_like(out).index_copy(0, index, out)  # back to the padded order
    return out.view(batch, seqlen, heads, head_dim)


# ----------------------------------------------------------------------------------------------------
# Patch embeddings as one GEMM
# ----------------------------------------------------------------------------------------------------


def conv_is_patchify(conv: nn.Module) -> bool:
    """A Conv2d/Conv3d whose stride equals its kernel, unpadded, undilated, ungrouped: a GEMM on patches."""
    return (
        type(conv) in (nn.Conv2d, nn.Conv3d)
        and tuple(conv.stride) == tuple(conv.kernel_size)
        and (conv.padding == "valid" or all(p == 0 for p in conv.padding))
        and all(d == 1 for d in conv.dilation)
        and conv.groups == 1
    )


def conv_patch_embed_forward(self: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """Conv(stride = kernel) as `finevit.kernels.patch_embed`: (B, C, *S) -> (B, D, *S // kernel).

    Patches are flattened in (C, *kernel) order, the conv weight's own order, so `weight.reshape(D, -1)`
    is the GEMM's weight. The output is a (B, D, *grid) view of the (B·G, D) result, so the usual
    `flatten(2).transpose(1, 2)` after a patch conv is again a free view.
    """
    kernel = tuple(self.kernel_size)
    batch, channels, *spatial = x.shape
    grid = [size // k for size, k in zip(spatial, kernel)]
    x = x[(..., *(slice(0, g * k) for g, k in zip(grid, kernel)))]  # a 'valid' conv drops the remainder
    x = x.reshape(batch, channels, *(n for g, k in zip(grid, kernel) for n in (g, k)))  # (B, C, g0, k0, g1, k1, ..)
    dims = len(kernel)
    x = x.permute(0, *range(2, 2 + 2 * dims, 2), 1, *range(3, 3 + 2 * dims, 2))  # (B, g0, g1, .., C, k0, k1, ..)
    patches = x.reshape(batch * math.prod(grid), channels * math.prod(kernel))  # (B·G, C·K)
    weight = self.weight.reshape(self.out_channels, -1)  # (D, C·K), the conv's own (C, *kernel) order
    out = kernels.patch_embed(*autocast_inputs(patches, weight, self.bias))  # (B·G, D)
    return out.view(batch, *grid, self.out_channels).movedim(-1, 1)  # (B, D, *grid)


def linear_patch_embed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear over pre-flattened patches (..., K) as `finevit.kernels.patch_embed` -> (..., D)."""
    out = kernels.patch_embed(*autocast_inputs(x.reshape(-1, x.shape[-1]), self.weight, self.bias))  # (patches, D)
    return out.view(*x.shape[:-1], self.out_features)


# ----------------------------------------------------------------------------------------------------
# Bookkeeping: idempotent, undoable patches
# ----------------------------------------------------------------------------------------------------
# A patch is recorded as data on the modules themselves (no closures), so a deep copy of a patched model
# is a patched model whose own revert works: each replaced forward is an instance attribute beside the
# forward it shadowed, and the tower carries the options it was patched with.

PREVIOUS_FORWARD_ATTR = "_finevit_previous_forward"  # on a patched module: the instance forward it shadowed
STATE_ATTR = "_finevit_patch"  # on a patched tower: {"options": ..., "patched": [...], "restore": {...}}


def replace_forward(module: nn.Module, forward: Callable) -> None:
    """Bind `forward` as this module instance's forward (its class and other instances are untouched)."""
    if PREVIOUS_FORWARD_ATTR not in module.__dict__:
        # None: the class's forward was in use; else an instance-level forward someone else set.
        module.__dict__[PREVIOUS_FORWARD_ATTR] = module.__dict__.get("forward")
    module.forward = types.MethodType(forward, module)


def patch_embedding(module: nn.Module) -> bool:
    """Route a patchify Conv2d/Conv3d or a Linear patch projection through `kernels.patch_embed`.

    Returns False (and changes nothing) for any other module, e.g. a conv with overlapping windows.
    """
    if conv_is_patchify(module):
        replace_forward(module, conv_patch_embed_forward)
    elif type(module) is nn.Linear:
        replace_forward(module, linear_patch_embed_forward)
    else:
        return False
    return True


def patch_state(tower: nn.Module) -> dict | None:
    return tower.__dict__.get(STATE_ATTR)


def mark_patched(tower: nn.Module, options: dict, patched: list[str], restore: dict | None = None) -> None:
    """Record on the tower what was patched; `restore` holds what `revert_tower` must put back."""
    tower.__dict__[STATE_ATTR] = {"options": dict(options), "patched": list(patched), "restore": restore or {}}


def revert_tower(tower: nn.Module) -> bool:
    """Undo the finevit patch of one tower (every replaced forward below it, and its own state)."""
    state = tower.__dict__.pop(STATE_ATTR, None)
    if state is None:
        return False
    for module in tower.modules():
        if PREVIOUS_FORWARD_ATTR in module.__dict__:
            previous = module.__dict__.pop(PREVIOUS_FORWARD_ATTR)
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
    attn_implementation = state["restore"].get("attn_implementation")
    if attn_implementation is not None:
        tower.set_attn_implementation(attn_implementation)
    return True


def prepare(tower: nn.Module, options: dict) -> bool:
    """Before patching: True when `tower` is already patched with these options (nothing to do).

    A tower patched with other options is reverted first, so the new patch starts from the original.
    """
    state = patch_state(tower)
    if state is None:
        return False
    if state["options"] == options:
        return True
    revert_tower(tower)
    return False
