"""webdataset shard lists, shard assignment and tar reading with positions.

Shard specs follow webdataset / open_clip: brace expansion (`data/train-{000000..000099}.tar`), several
sources joined by `::`, environment variables expanded; any URL `webdataset.gopen` opens works (local
paths, `pipe:` commands, http(s)).

Shards are read with `tarfile` in streaming mode and grouped into samples by webdataset's key rule
(`base_plus_ext`: the key is the path up to the first dot of the file name). Unlike webdataset's own
iterators, `read_shard` reports each sample's index inside its shard, which is what makes the loader's
position resumable, and it turns a truncated or unreadable shard into a counted event instead of an
exception.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from braceexpand import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """'a/{0..3}.tar::b/x.tar' (or a list of such strings) -> ['a/0.tar', ..., 'a/3.tar', 'b/x.tar']."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in specs:
        for part in os.fspath(item).split("::"):
            part = os.path.expandvars(part.strip())
            if part:
                urls.extend(braceexpand(part))
    if not urls:
        raise ValueError(f"expand_shards: the shard spec {spec!r} names no shard")
    return urls


def split_shards(shards: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """webdataset's split_by_node then split_by_worker: shards[rank::world_size][worker::num_workers]."""
    return list(shards)[rank::world_size][worker::num_workers]


def check_enough_shards(num_shards: int, world_size: int, num_workers: int) -> None:
    """Each (rank, worker) pair needs a shard of its own; otherwise some would get none and a
    distributed run would hang waiting for their batches. Raise with the numbers instead."""
    needed = world_size * max(1, num_workers)
    if num_shards < needed:
        raise ValueError(
            f"the shard list has {num_shards} shard(s) but {world_size} rank(s) × {max(1, num_workers)} "
            f"DataLoader worker(s) = {needed} readers each need at least one: write the data into more "
            f"shards, lower num_workers, or use resampled=True (every reader samples all shards)")


def epoch_shard_order(shards: Sequence[str], seed: int, epoch: int, shuffle: bool) -> list[str]:
    """The global shard order of an epoch: the same permutation on every rank and worker (detshuffle)."""
    if not shuffle:
        return list(shards)
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return [shards[i] for i in order]


class _CountingReader:
    """A read-only stream wrapper that counts the bytes read through it."""

    def __init__(self, stream):
        self.stream, self.count = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        return data


def read_shard(url: str, on_error: Callable[[str, Exception], None], skip: int = 0) -> Iterator[tuple[int, dict]]:
    """Yield (index in shard, raw sample) for each sample of a tar shard, from index `skip` on.

    A raw sample is {"__key__", "__url__", ext: bytes, ...} with lower-cased extensions. Samples before `skip`
    are read past without being returned. A shard that cannot be opened, or that breaks mid-way, calls
    `on_error(url, exc)` once and ends; the sample being assembled when it broke is dropped. A shard cut at a
    header boundary (which `tarfile` takes for a normal end) is caught by the missing end-of-archive marker.
    """
    index, current = 0, None
    try:
        with gopen(url, "rb") as raw_stream:
            stream = _CountingReader(raw_stream)
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isreg():
                        continue
                    prefix, suffix = base_plus_ext(member.name)
                    if prefix is None:
                        continue
                    if current is not None and prefix != current["__key__"]:
                        if index >= skip:
                            yield index, current
                        index += 1
                        current = None
                    if current is None:
                        current = {"__key__": prefix, "__url__": url}
                    current[suffix.lower()] = tar.extractfile(member).read() if index >= skip else b""
                end = tar.offset
                while stream.read(1 << 16):  # the padding after the end-of-archive marker
                    pass
                if stream.count - end < 2 * tarfile.BLOCKSIZE:
                    raise tarfile.ReadError(f"truncated shard: no end-of-archive marker after byte {end}")
        if current is not None and index >= skip:
            yield index, current
    except Exception as exc:  # tarfile.ReadError, OSError, EOFError, ... from a bad shard
        on_error(url, exc)
