"""The training data loader: webdataset shards -> packed, tokenized batches, resumable, robust to bad samples.

    shards ─(epoch permutation, split_by_node, split_by_worker | resampled draw)─> tar reader (positions)
           ─> shuffle buffer (raw bytes) ─> parse + decode + smart_resize (bad samples skipped)
           ─> best-fit packer (token budget, image cap) ─> collate (patchify into a shared-memory batch)
           + tokenize ─> DataLoader (pinned memory)

Everything up to the collated batch runs inside the DataLoader workers (`batch_size=None`: each worker
yields whole packed batches), so the main process only pins and forwards them.

Modes
    resampled=False, repeat=False   one pass over the shards (an epoch); each (rank, worker) reads its own
                                    shards: the epoch's permutation (same on all ranks), [rank::world][worker::W].
                                    Iterating the loader again continues with the next epoch.
    resampled=False, repeat=True    endless epochs, each with a new permutation.
    resampled=True                  endless; every reader draws shards with replacement from the whole list
                                    (webdataset's ResampledShards), seeded by (seed, rank, worker).
In the split modes the shard list must hold at least world_size × num_workers shards, otherwise the loader
raises at construction (a reader without shards would stall a distributed step).

Resuming. Every batch carries its worker's reader position at the moment it was made: (epoch, index of
the shard in that worker's sequence, samples read from that shard) plus the worker's skip counters. The
loader keeps the position of the last batch *delivered* from each worker; `state_dict()` returns them and
`load_state_dict()` makes each worker skip straight to its position (re-reading, without decoding, the
part of its current shard it had read). Nothing delivered before the checkpoint is delivered again. The
samples that sat in a worker's shuffle and packing buffers at the checkpoint are dropped for that epoch
(at most shuffle_buffer + pack_buffer per worker; in resampled mode, a stream drawn with replacement, this
changes nothing). The worker layout (world_size, num_workers) and the seed must be the same when resuming.

Bad samples (see finevit/data/sample.py for the reasons) and unreadable shards are skipped, counted per
reason and worker, and reported with a rate-limited warning (the first of each reason, then at most one
per `warn_interval_s` with the running count); `loader.stats()` sums the counters over workers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .image import ImageConfig
from .packing import collate, pack
from .sample import BadSampleError, SkipReporter, make_sample
from .shards import check_enough_shards, epoch_shard_order, expand_shards, read_shard, split_shards
from .text import TextTokenizer

STATE_VERSION = 1


@dataclass
class LoaderConfig:
    shards: str | list[str]  # shard spec: braces, "::"-joined sources, or a list of specs
    token_budget: int = 8192  # patches per packed batch (the packed sequence length N)
    max_images: int = 256  # at most this many images (and texts) per batch
    pack_buffer: int = 256  # samples the best-fit packer chooses from
    shuffle_buffer: int = 1000  # raw samples shuffled per worker before decoding (<= 1: no shuffle)
    shuffle_shards: bool = True  # permute the shard list every epoch (split modes)
    resampled: bool = False  # endless sampling of shards with replacement
    repeat: bool = False  # split mode only: loop over epochs endlessly
    seed: int = 0  # seeds shard order, resampling, shuffling and caption choice
    num_workers: int = 2  # DataLoader worker processes (0: read in the main process)
    prefetch_factor: int = 2  # batches prefetched per worker
    pin_memory: bool | None = None  # None: pin when CUDA is available
    short_caption_prob: float = 0.0  # per sample and epoch: train on "short_caption" instead of "caption"
    with_regions: bool = False  # also collate region boxes and tokenized region captions
    warn_interval_s: float = 60.0  # at most one skip warning per reason and worker in this interval

    def __post_init__(self):
        for name in ("token_budget", "max_images", "pack_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoaderConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"LoaderConfig: num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.short_caption_prob <= 1.0:
            raise ValueError(f"LoaderConfig: short_caption_prob must be in [0, 1], got {self.short_caption_prob}")


def _worker_info() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def default_rank_world() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialized, else from RANK / WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass
class ReaderState:
    """One worker's position and counters (what a batch carries back to the main process)."""

    epoch: int = 0  # current epoch (always 0 in resampled mode)
    shard: int = 0  # index of the current shard in this worker's shard sequence of the epoch
    sample: int = 0  # raw samples read from that shard
    read: int = 0  # raw samples read in all (this worker, over restarts)
    kept: int = 0  # samples that became part of a batch or a buffer
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "sample": self.sample, "read": self.read,
                "kept": self.kept, "skipped": dict(self.skipped)}


class PackedShardDataset(IterableDataset):
    """The per-worker pipeline; iterate it through `PackedLoader`, which also tracks positions.

    Yields {"image", "text", "keys"[, "regions"], "worker": int, "state": ReaderState dict}, and one last
    {"worker", "state", "final": True} item without a batch when a finite pass ends (so the end-of-epoch
    position and counters reach the main process).
    """

    def __init__(self, config: LoaderConfig, image_config: ImageConfig, tokenizer: TextTokenizer,
                 rank: int, world_size: int, resume: dict[int, dict] | None = None):
        self.config, self.image_config, self.tokenizer = config, image_config, tokenizer
        self.rank, self.world_size = rank, world_size
        self.shards = expand_shards(config.shards)
        self.resume = resume or {}

    def _shard_sequence(self, state: ReaderState, worker: int, num_workers: int) -> Iterator[str]:
        """The shards this worker reads, from its position on; advances state.epoch / state.shard."""
        c = self.config
        if c.resampled:
            rng = np.random.default_rng([c.seed, self.rank, worker])
            draws = iter(lambda: int(rng.integers(len(self.shards))), None)
            for _ in range(state.shard):  # replay the draws made before the checkpoint
                next(draws)
            while True:
                yield self.shards[next(draws)]
                state.shard, state.sample = state.shard + 1, 0
        while True:
            order = epoch_shard_order(self.shards, c.seed, state.epoch, c.shuffle_shards)
            mine = split_shards(order, self.rank, self.world_size, worker, num_workers)
            while state.shard < len(mine):
                yield mine[state.shard]
                state.shard, state.sample = state.shard + 1, 0
            if not c.repeat:
                return
            state.epoch, state.shard, state.sample = state.epoch + 1, 0, 0

    def _raw_samples(self, state: ReaderState, worker: int, num_workers: int, report: SkipReporter):
        def shard_error(url: str, exc: Exception) -> None:
            report("bad_shard", f"shard {url}", exc)

        for url in self._shard_sequence(state, worker, num_workers):
            for index, raw in read_shard(url, shard_error, skip=state.sample):
                state.sample, state.read = index + 1, state.read + 1
                yield raw

    def _shuffled(self, raws, rng: np.random.Generator):
        size = self.config.shuffle_buffer
        if size <= 1:
            yield from raws
            return
        buffer = []
        for raw in raws:
            if len(buffer) < size:
                buffer.append(raw)
                continue
            i = int(rng.integers(size))
            yield buffer[i]
            buffer[i] = raw
        rng.shuffle(buffer)
        yield from buffer

    def _samples(self, raws, state: ReaderState, report: SkipReporter):
        c = self.config
        for raw in raws:
            try:
                sample = make_sample(raw, self.image_config, c.token_budget, c.with_regions,
                                     c.short_caption_prob, salt=f"{c.seed}/{state.epoch}/{state.shard}")
            except BadSampleError as exc:
                report(exc.reason, f"sample {raw['__key__']!r} of {raw['__url__']}", exc)
                continue
            except Exception as exc:  # an input no rule foresaw must not stop the loader either
                report("error", f"sample {raw['__key__']!r} of {raw['__url__']}", exc)
                continue
            state.kept += 1
            yield sample

    def __iter__(self):
        c = self.config
        worker, num_workers = _worker_info()
        if not c.resampled:
            check_enough_shards(len(self.shards), self.world_size, num_workers)
        saved = self.resume.get(worker)
        state = ReaderState(**saved) if saved else ReaderState()
        report = SkipReporter(state.skipped, c.warn_interval_s, who=f"finevit.data worker {worker}")
        rng = np.random.default_rng([c.seed, self.rank, worker, state.epoch, state.shard, state.sample])
        raws = self._shuffled(self._raw_samples(state, worker, num_workers, report), rng)
        groups = pack(self._samples(raws, state, report), c.token_budget, c.max_images, c.pack_buffer)
        for group in groups:
            batch = collate(group, self.tokenizer, self.image_config.patch_size, c.with_regions)
            batch["worker"], batch["state"] = worker, state.as_dict()
            yield batch
        # The pass is over: the next iteration of this worker starts the next epoch.
        state.epoch, state.shard, state.sample = state.epoch + 1, 0, 0
        yield {"worker": worker, "state": state.as_dict(), "final": True}


class PackedLoader:
    """Iterate packed batches from webdataset shards; `state_dict()` / `load_state_dict()` resume it.

        loader = PackedLoader(LoaderConfig("data/train/train-{000000..000031}.tar"), ImageConfig(), tokenizer)
        for batch in loader:
            img, txt = model(batch["image"], batch["text"])

    Each `iter(loader)` starts DataLoader workers that continue from the positions of the last delivered
    batches; a finite pass that ends moves every worker to the next epoch.
    """

    def __init__(self, config: LoaderConfig, image_config: ImageConfig, tokenizer: TextTokenizer,
                 rank: int | None = None, world_size: int | None = None):
        if rank is None or world_size is None:
            rank, world_size = default_rank_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"PackedLoader: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if image_config.max_patches > config.token_budget:
            raise ValueError(f"PackedLoader: token_budget={config.token_budget} cannot hold the largest resized "
                             f"image ({image_config.max_patches} patches at max_pixels={image_config.max_pixels}, "
                             f"patch_size={image_config.patch_size}); raise the budget or lower max_pixels")
        self.config, self.image_config, self.tokenizer = config, image_config, tokenizer
        self.rank, self.world_size = rank, world_size
        self.shards = expand_shards(config.shards)
        if not config.resampled:
            check_enough_shards(len(self.shards), world_size, config.num_workers)
        self.worker_states: dict[int, dict] = {}
        self.batches_delivered = 0

    def __iter__(self) -> Iterator[dict]:
        c = self.config
        dataset = PackedShardDataset(c, self.image_config, self.tokenizer, self.rank, self.world_size,
                                     resume=dict(self.worker_states))
        if c.num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked processes
        pin = torch.cuda.is_available() if c.pin_memory is None else c.pin_memory
        loader = DataLoader(dataset, batch_size=None, num_workers=c.num_workers, pin_memory=pin,
                            prefetch_factor=c.prefetch_factor if c.num_workers > 0 else None)
        for item in loader:
            self.worker_states[item.pop("worker")] = item.pop("state")
            if item.pop("final", False):
                continue
            self.batches_delivered += 1
            yield item

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue this rank's stream (plain ints and dicts)."""
        return {"version": STATE_VERSION, "seed": self.config.seed, "rank": self.rank,
                "world_size": self.world_size, "num_workers": max(1, self.config.num_workers),
                "resampled": self.config.resampled, "batches_delivered": self.batches_delivered,
                "workers": {str(w): s for w, s in self.worker_states.items()}}

    def load_state_dict(self, state: dict) -> None:
        expected = {"version": STATE_VERSION, "seed": self.config.seed, "rank": self.rank,
                    "world_size": self.world_size, "num_workers": max(1, self.config.num_workers),
                    "resampled": self.config.resampled}
        mismatched = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: saved {s!r}, now {n!r}" for k, (s, n) in mismatched.items())
            raise ValueError(f"PackedLoader.load_state_dict: the saved position belongs to another data "
                             f"layout ({detail})")
        self.worker_states = {int(w): dict(s) for w, s in state["workers"].items()}
        self.batches_delivered = int(state["batches_delivered"])

    def stats(self) -> dict:
        """Counters summed over workers, as of the last delivered batch of each worker."""
        skipped: dict[str, int] = {}
        for s in self.worker_states.values():
            for reason, n in s["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        return {"read": sum(s["read"] for s in self.worker_states.values()),
                "kept": sum(s["kept"] for s in self.worker_states.values()),
                "skipped": skipped, "batches": self.batches_delivered}
