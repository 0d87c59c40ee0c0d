"""Embedding an evaluation set's images and any list of texts with a two-tower model.

The model is anything with FineCLIP's packed interface:
    encode_image(patches uint8 (N, C·P·P), positions int32 (N, 2), cu_seqlens int32 (B + 1,), max_seqlen) -> (B, D)
    encode_text(input_ids int64 (T,), cu_seqlens int32 (S + 1,), max_seqlen) -> (S, D)
Features are L2-normalized here whatever the model returns, and gathered on the CPU in float32.

Images are read from webdataset shards in order (no shuffling, one pass), preprocessed like training data
(finevit.data), packed best-fit under `token_budget` and encoded batch by batch; only the annotations and
features are kept, never the pixels. Bad samples are skipped and counted as in training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from finevit.data.image import ImageConfig
from finevit.data.packing import collate_images, pack, pack_texts
from finevit.data.sample import BadSampleError, SkipReporter, decode_raw
from finevit.data.shards import expand_shards, read_shard
from finevit.data.text import TextTokenizer


@dataclass
class EvalImages:
    """An evaluation set after its images went through the model."""

    keys: list[str]  # sample keys, in shard order
    annotations: list[dict]  # the validated JSON of each sample
    features: torch.Tensor  # float32 (N, D), L2-normalized
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples by reason


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def iter_image_batches(shards: str | Sequence[str], image_config: ImageConfig, token_budget: int,
                       limit: int | None = None, skipped: dict[str, int] | None = None):
    """Read and preprocess the images of `shards` in shard order (at most `limit`; bad samples skipped and
    counted into `skipped`), packed under `token_budget` patches: yields (indices in reading order, keys,
    annotations, image batch); the packer reorders images, the indices put them back."""
    if image_config.max_patches > token_budget:
        raise ValueError(f"token_budget={token_budget} cannot hold the largest resized image "
                         f"({image_config.max_patches} patches); raise it or lower max_pixels")
    report = SkipReporter({} if skipped is None else skipped, who="finevit.eval")
    count = 0

    def items():
        nonlocal count
        for url in expand_shards(shards):
            for _, raw in read_shard(url, lambda u, exc: report("bad_shard", f"shard {u}", exc)):
                if limit is not None and count >= limit:
                    return
                try:
                    annotation, image, (gh, gw) = decode_raw(raw, image_config, token_budget)
                except BadSampleError as exc:
                    report(exc.reason, f"sample {raw['__key__']!r} of {url}", exc)
                    continue
                except Exception as exc:  # an input no rule foresaw
                    report("error", f"sample {raw['__key__']!r} of {url}", exc)
                    continue
                count += 1
                yield count - 1, raw["__key__"], annotation, image, gh * gw

    for group in pack(items(), token_budget, max_images=1024, buffer_size=64, length=lambda it: it[4]):
        batch = collate_images([it[3] for it in group], image_config.patch_size)
        yield [it[0] for it in group], [it[1] for it in group], [it[2] for it in group], batch


@torch.no_grad()
def embed_images(model, shards: str | Sequence[str], image_config: ImageConfig, token_budget: int = 16384,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None, limit: int | None = None,
                 progress: bool = True) -> EvalImages:
    """Read, preprocess and encode every image of `shards` (at most `limit`), in shard order."""
    device = torch.device(device)
    skipped: dict[str, int] = {}
    found: dict[int, tuple[str, dict, torch.Tensor]] = {}
    with tqdm(desc="images", unit="img", disable=not progress) as bar:
        for indices, keys, notes, batch in iter_image_batches(shards, image_config, token_budget, limit,
                                                                    skipped):
            with _autocast(device, dtype):
                out = model.encode_image(batch["patches"].to(device), batch["positions"].to(device),
                                         batch["cu_seqlens"].to(device), batch["max_seqlen"])
            out = F.normalize(out.float(), dim=-1).cpu()
            for row, index in enumerate(indices):
                found[index] = (keys[row], notes[row], out[row])
            bar.update(len(indices))
    if not found:
        raise ValueError(f"embed_images: no readable sample in {shards!r} (skipped: {skipped})")
    ordered = [found[i] for i in range(len(found))]
    return EvalImages([o[0] for o in ordered], [o[1] for o in ordered], torch.stack([o[2] for o in ordered]),
                      skipped)


@torch.no_grad()
def embed_texts(model, tokenizer: TextTokenizer, texts: Sequence[str], token_budget: int = 16384,
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                progress: bool = False) -> torch.Tensor:
    """Tokenize and encode `texts` in packed batches of at most `token_budget` tokens -> float32 (len, D)."""
    device = torch.device(device)
    ids = tokenizer(list(texts))
    out: list[torch.Tensor] = []
    start = 0
    with tqdm(total=len(ids), desc="texts", unit="text", disable=not progress) as bar:
        while start < len(ids):
            stop, used = start, 0
            while stop < len(ids) and (stop == start or used + len(ids[stop]) <= token_budget):
                used += len(ids[stop])
                stop += 1
            batch = pack_texts(ids[start:stop])
            with _autocast(device, dtype):
                features = model.encode_text(batch["input_ids"].to(device), batch["cu_seqlens"].to(device),
                                             batch["max_seqlen"])
            out.append(F.normalize(features.float(), dim=-1).cpu())
            bar.update(stop - start)
            start = stop
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


def captions_of(annotation: dict, keys: Sequence[str]) -> list[str]:
    """The non-empty captions of an annotation under `keys` (a key may hold a string or a list of strings)."""
    texts = []
    for key in keys:
        value = annotation.get(key)
        values = value if isinstance(value, list) else [value]
        texts.extend(v for v in values if isinstance(v, str) and v.strip())
    return texts


def flatten_texts(per_item: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """[[texts of item 0], [texts of item 1], ...] -> (all texts, int64 item index of each)."""
    texts = [t for item in per_item for t in item]
    owners = np.repeat(np.arange(len(per_item)), [len(item) for item in per_item])
    return texts, owners.astype(np.int64)
