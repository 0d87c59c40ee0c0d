"""Small helpers for packed (varlen) batches, shared by the reference ops and the models."""

from __future__ import annotations

import torch


def packed_token_index(cu_seqlens: torch.Tensor, total_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token of a packed batch: (index of its sequence, its position inside that sequence).

    cu_seqlens: int (num_seqs + 1,) offsets. Returns two int64 tensors of shape (total_tokens,), computed
    on cu_seqlens' device without a host sync. Empty sequences own no tokens.
    """
    offsets = cu_seqlens.to(torch.int64)
    tokens = torch.arange(total_tokens, device=cu_seqlens.device)
    # Token t belongs to the sequence whose end offset is the first one strictly greater than t.
    seq_index = torch.searchsorted(offsets[1:], tokens, right=True)
    return seq_index, tokens - offsets[seq_index]


def pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows x (T, ...) -> zero-padded (num_seqs, max_seqlen, ...) and its validity mask (num_seqs, max_seqlen).

    Differentiable w.r.t. x (the scatter's backward gathers the rows back); no host sync.
    """
    num_seqs = cu_seqlens.shape[0] - 1
    seq_index, token_pos = packed_token_index(cu_seqlens, x.shape[0])
    padded = x.new_zeros(num_seqs, max_seqlen, *x.shape[1:]).index_put((seq_index, token_pos), x)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    valid = torch.arange(max_seqlen, device=x.device) < lengths[:, None]
    return padded, valid


def unpad_packed(padded: torch.Tensor, cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Inverse of `pad_packed`: (num_seqs, max_seqlen, ...) -> the packed rows (total_tokens, ...)."""
    return padded[packed_token_index(cu_seqlens, total_tokens)]


def cu_seqlens_from_lengths(lengths) -> torch.Tensor:
    """Sequence lengths (list or 1-D tensor) -> int32 cu_seqlens (num_seqs + 1,) starting at 0."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
