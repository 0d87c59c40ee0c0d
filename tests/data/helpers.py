"""Builders of small encoded images and webdataset shards for the data and eval tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **options) -> bytes:
    """A PIL image or uint8 array -> encoded bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour fields (compress well, survive JPEG): low-resolution noise upscaled."""
    small = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return np.asarray(small.resize((width, height), Image.Resampling.BICUBIC))


def annotation(caption: str = "a red circle", **extra) -> bytes:
    return json.dumps({"caption": caption, **extra}).encode()


def good_sample(key: str, seed: int = 0, size: tuple[int, int] = (64, 96), **extra) -> dict:
    """{"__key__", "png", "json"}: a small valid sample."""
    return {"__key__": key, "png": encode(smooth_rgb(*size, seed=seed)),
            "json": annotation(f"caption of {key}", **extra)}


def write_shard(path: str | Path, samples: list[dict]) -> Path:
    """Write samples ({"__key__": key, ext: bytes, ...}) as a webdataset tar shard."""
    path = Path(path)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_dataset(directory: str | Path, num_shards: int, per_shard: int, prefix: str = "shard",
                  size: tuple[int, int] = (64, 96)) -> tuple[str, list[str]]:
    """num_shards shards of per_shard good samples; returns (brace spec, all keys in order)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(num_shards):
        samples = [good_sample(f"{prefix}{s:02d}-{i:03d}", seed=s * 1000 + i, size=size) for i in range(per_shard)]
        keys += [x["__key__"] for x in samples]
        write_shard(directory / f"{prefix}-{s:02d}.tar", samples)
    return str(directory / f"{prefix}-{{00..{num_shards - 1:02d}}}.tar"), keys
