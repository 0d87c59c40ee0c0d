"""NaViT-style packing of variable-size images into batches under a token budget, and their collation.

`pack` turns a stream of items (preprocessed samples) into groups whose patch counts sum to at most
`token_budget`, with at most `max_images` items each. NaViT's reference packer (lucidrains' `na_vit.py`)
fills one group sequentially and starts the next when an image does not fit; on native-resolution size
distributions that wastes a large part of each batch. Here a buffer of `buffer_size` items is kept and
each group is built *best-fit*:

    1. the oldest buffered item goes first (so nothing waits more than ~buffer_size groups),
    2. then, repeatedly, the largest buffered item that still fits the remaining budget,
    3. until nothing fits or `max_images` is reached; the group is emitted.

A group is emitted whenever the buffer is full, and the buffer is drained the same way at the end of the
stream (only those last groups can be markedly underfull; an endless stream never drains). The result is a
pure function of the input order, so packing is deterministic for a seed of the upstream shuffle.
Measured on the embedded dataset's size distribution (tests/data/test_packing.py): 99.8 % of a 4096-token
budget, 99.9 % of 8192 and 99.7 % of 16384 filled with real patches (99.9 % at every budget without the final
drain), against 79 / 89 / 94 % for sequential greedy packing.

`collate` turns one group into the packed batch of docs/design.md plus the tokenized texts:

    batch["image"] = {patches uint8 (N, C·P·P), positions int32 (N, 2) = (row, col), cu_seqlens int32 (B + 1,),
                      max_seqlen int, grid_hw int32 (B, 2)}
    batch["text"]  = {input_ids int64 (T,), cu_seqlens int32 (B + 1,), max_seqlen int}   (row i ↔ image i)
    batch["keys"]  = [B sample keys]
    batch["regions"] (with_regions) = {image_index int64 (R,), boxes float32 (R, 4) normalized (x0, y0, x1, y1),
                      patch_boxes float32 (R, 4) in patch units, cells int32 (R, 4) = (row0, col0, row1, col1)
                      half-open patch cells, text: packed region captions, captions: the R raw strings}
    batch["captions"] (with_regions) = [B raw captions]

so that `FineCLIP(batch["image"], batch["text"])` runs on it directly.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import get_worker_info

from finevit.kernels.utils import cu_seqlens_from_lengths

from .image import boxes_to_grid, grid_of, grid_positions, patch_view
from .text import TextTokenizer


@dataclass
class Sample:
    """One preprocessed image-text pair, ready to be packed."""

    key: str  # the sample's webdataset key
    image: torch.Tensor  # uint8 (3, H, W), resized (H = gh·P, W = gw·P); patchified by `collate_images`
    grid_hw: tuple[int, int]  # (gh, gw)
    text: str  # the caption trained on
    region_boxes: np.ndarray | None = None  # float32 (R, 4) normalized (x0, y0, x1, y1)
    region_texts: list[str] = field(default_factory=list)  # R region captions

    @property
    def num_patches(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]


def pack(items: Iterable, token_budget: int, max_images: int, buffer_size: int = 256,
         length: Callable[[object], int] = lambda s: s.num_patches) -> Iterator[list]:
    """Group a stream of items into lists whose `length` sums to <= token_budget (buffered best-fit, above).

    An item longer than the budget raises ValueError (filter or resize such items upstream).
    """
    if token_budget < 1 or max_images < 1 or buffer_size < 1:
        raise ValueError(f"pack: token_budget, max_images and buffer_size must be >= 1, got {token_budget}, "
                         f"{max_images}, {buffer_size}")
    by_length: list[tuple[int, int]] = []  # (length, arrival number), sorted
    arrivals: deque[int] = deque()  # arrival numbers in order; taken ones are skipped lazily
    buffered: dict[int, tuple[int, object]] = {}  # arrival number -> (length, item)

    def take(number: int) -> tuple[int, object]:
        n, item = buffered.pop(number)
        del by_length[bisect.bisect_left(by_length, (n, number))]
        return n, item

    def emit() -> list:
        while arrivals[0] not in buffered:
            arrivals.popleft()
        used, first = take(arrivals.popleft())
        group = [first]
        while len(group) < max_images and by_length:
            i = bisect.bisect_right(by_length, (token_budget - used, float("inf"))) - 1
            if i < 0:
                break
            n, item = take(by_length[i][1])
            used += n
            group.append(item)
        return group

    for number, item in enumerate(items):
        n = int(length(item))
        if n > token_budget:
            raise ValueError(f"pack: an item of {n} tokens exceeds token_budget={token_budget}")
        bisect.insort(by_length, (n, number))
        arrivals.append(number)
        buffered[number] = (n, item)
        if len(buffered) >= buffer_size:
            yield emit()
    while buffered:
        yield emit()


def fill_rate(groups: Sequence[Sequence[int]], token_budget: int) -> float:
    """Real tokens / (groups × budget), for groups given as lists of lengths."""
    if not groups:
        return 0.0
    return sum(sum(g) for g in groups) / (len(groups) * token_budget)


_positions = functools.lru_cache(maxsize=4096)(grid_positions)  # grids repeat; torch.cat copies them


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor; inside a DataLoader worker it is allocated in shared memory (as PyTorch's
    default_collate does), so handing the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    return elem.new(elem._typed_storage()._new_shared(math.prod(shape), device="cpu")).resize_(shape)


def collate_images(images: Sequence[torch.Tensor], patch_size: int) -> dict:
    """Resized uint8 images (3, H, W) -> docs/design.md's packed vision batch (see the module doc).

    Each image is patchified straight into its slice of the batch: one copy per pixel, no per-image patch
    tensors and no concatenation.
    """
    grids = [grid_of(image, patch_size) for image in images]
    lengths = [gh * gw for gh, gw in grids]
    channels = images[0].shape[0]
    patches = _batch_buffer((sum(lengths), channels * patch_size * patch_size), torch.uint8)
    offset = 0
    for image, (gh, gw) in zip(images, grids):
        patches[offset:offset + gh * gw].view(gh, gw, channels, patch_size, patch_size).copy_(
            patch_view(image, patch_size))
        offset += gh * gw
    return {
        "patches": patches,
        "positions": torch.cat([_positions(g) for g in grids]),
        "cu_seqlens": cu_seqlens_from_lengths(lengths),
        "max_seqlen": max(lengths),
        "grid_hw": torch.tensor(grids, dtype=torch.int32).reshape(-1, 2),
    }


def pack_texts(token_ids: Sequence[np.ndarray]) -> dict:
    """Token sequences -> the packed text batch FineCLIP.encode_text takes.

    Returns {"input_ids": int64 (T,), "cu_seqlens": int32 (num_texts + 1,), "max_seqlen": int}.
    """
    lengths = [len(ids) for ids in token_ids]
    flat = np.concatenate(token_ids) if token_ids else np.zeros(0, dtype=np.int64)
    return {"input_ids": torch.from_numpy(flat.astype(np.int64, copy=False)),
            "cu_seqlens": cu_seqlens_from_lengths(lengths),
            "max_seqlen": max(lengths, default=0)}


def collate(samples: Sequence[Sample], tokenizer: TextTokenizer, patch_size: int, with_regions: bool = False
            ) -> dict:
    """A packed group of samples -> {"image", "text", "keys"[, "regions"]} (see the module doc)."""
    batch = {
        "image": collate_images([s.image for s in samples], patch_size),
        "text": pack_texts(tokenizer([s.text for s in samples])),
        "keys": [s.key for s in samples],
    }
    if with_regions:
        batch["regions"] = collate_regions(samples, tokenizer)
        batch["captions"] = [s.text for s in samples]  # the raw captions (stage 2 builds LLM sequences from them)
    return batch


def collate_regions(samples: Sequence[Sample], tokenizer: TextTokenizer) -> dict:
    """The region boxes of a group, on each image's patch grid, with their tokenized captions (module doc)."""
    image_index, boxes, patch_boxes, cells, texts = [], [], [], [], []
    for i, s in enumerate(samples):
        if s.region_boxes is None or len(s.region_boxes) == 0:
            continue
        pb, c = boxes_to_grid(s.region_boxes, s.grid_hw)
        image_index.extend([i] * len(s.region_boxes))
        boxes.append(s.region_boxes)
        patch_boxes.append(pb)
        cells.append(c)
        texts.extend(s.region_texts)

    def cat(arrays: list[np.ndarray], dtype) -> torch.Tensor:  # (R, 4)
        return torch.from_numpy((np.concatenate(arrays) if arrays else np.zeros((0, 4))).astype(dtype))

    return {
        "image_index": torch.tensor(image_index, dtype=torch.int64),
        "boxes": cat(boxes, np.float32),
        "patch_boxes": cat(patch_boxes, np.float32),
        "cells": cat(cells, np.int32),
        "text": pack_texts(tokenizer(texts)),
        "captions": texts,
    }
