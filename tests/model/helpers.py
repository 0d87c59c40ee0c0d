"""Builders of small random packed batches (docs/design.md's packed vision and text batches) for model tests."""

from __future__ import annotations

import torch

from finevit.kernels import cu_seqlens_from_lengths


def grid_positions(h: int, w: int) -> torch.Tensor:
    """Raster-order (row, col) positions of an h x w patch grid: int32 (h·w, 2)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([rows, cols], dim=-1).reshape(-1, 2).to(torch.int32)


def make_image_batch(grids, patch_features: int) -> dict:
    """A random packed vision batch of images with the given (h, w) grids (global RNG; seed before calling).

    Returns patches uint8 (N, patch_features), positions int32 (N, 2), cu_seqlens int32, max_seqlen int,
    grid_hw int32 (num_images, 2).
    """
    lengths = [h * w for h, w in grids]
    positions = torch.cat([grid_positions(h, w) for h, w in grids])
    patches = torch.randint(0, 256, (sum(lengths), patch_features), dtype=torch.uint8)
    return {
        "patches": patches,
        "positions": positions,
        "cu_seqlens": cu_seqlens_from_lengths(lengths),
        "max_seqlen": max(lengths),
        "grid_hw": torch.tensor(grids, dtype=torch.int32),
    }


def make_text_batch(lengths, vocab_size: int) -> dict:
    """A random packed text batch: input_ids int64 (T,), cu_seqlens int32, max_seqlen int."""
    return {
        "input_ids": torch.randint(0, vocab_size, (sum(lengths),)),
        "cu_seqlens": cu_seqlens_from_lengths(lengths),
        "max_seqlen": max(lengths),
    }


def split_image_batch(batch: dict) -> list[dict]:
    """Each image of a packed vision batch as its own one-image batch."""
    cu = batch["cu_seqlens"].tolist()
    singles = []
    for start, end in zip(cu[:-1], cu[1:]):
        singles.append({
            "patches": batch["patches"][start:end],
            "positions": batch["positions"][start:end],
            "cu_seqlens": cu_seqlens_from_lengths([end - start]),
            "max_seqlen": end - start,
        })
    return singles


def split_text_batch(batch: dict) -> list[dict]:
    """Each text of a packed text batch as its own one-text batch."""
    cu = batch["cu_seqlens"].tolist()
    return [
        {"input_ids": batch["input_ids"][start:end], "cu_seqlens": cu_seqlens_from_lengths([end - start]),
         "max_seqlen": end - start}
        for start, end in zip(cu[:-1], cu[1:])
    ]


def image_args(batch: dict) -> tuple:
    return batch["patches"], batch["positions"], batch["cu_seqlens"], batch["max_seqlen"]


def text_args(batch: dict) -> tuple:
    return batch["input_ids"], batch["cu_seqlens"], batch["max_seqlen"]


# Budget of assert_close_to_rounding, in units of the dtype's eps times the output's largest magnitude. The
# float32 forward of the test models is within 5.5 such units of its float64 forward (measured over
# test_pretrained's cases), so two evaluations that are each that accurate differ by at most ~11 units;
# reordered BLAS sums (another alignment, another kernel) were seen to move outputs by at most 1 unit.
# A real error is orders above: rounding every weight to bfloat16 (a relative change <= 2^-9) moves the
# outputs by more than 10^4 units.
ROUNDING_ULPS = 16


def assert_close_to_rounding(actual: torch.Tensor, expected: torch.Tensor, ulps: float = ROUNDING_ULPS,
                             name: str = "output") -> None:
    """`actual` equals `expected` up to float rounding: |actual - expected| <= ulps · eps(dtype) · max|expected|.

    For the same computation done by different tensor objects (a reloaded or copied model, other parameter
    storage): their state compares bitwise (torch.equal), but their outputs need not. BLAS picks its
    vectorized path (and so its summation order) by where the operands lie in memory, e.g. the offsets of
    tensors loaded from a safetensors file, so outputs can differ in the last bits (3.7e-8 on a 0.3-sized
    float32 output was seen). The bound is relative to the output's magnitude, not elementwise: a sum's
    rounding error scales with its terms, so near-zero elements get the same absolute slack as large ones.
    Shapes and dtypes must match exactly; NaN or inf fail.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{name}: {actual.dtype}{tuple(actual.shape)} vs {expected.dtype}{tuple(expected.shape)}")
    assert torch.isfinite(expected).all(), f"{name}: the expected values are not all finite"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    atol = ulps * torch.finfo(expected.dtype).eps * scale
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol,
                               msg=lambda m: f"{name}: beyond {ulps} ulps of max|expected| = {scale:.3g}: {m}")
