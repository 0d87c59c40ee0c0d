"""pytest-benchmark micro-benchmarks of the packer and the collation (a few rounds each, so the suite stays
fast; run `pytest tests/data/test_packing_benchmark.py --benchmark-columns=median,ops` to read them)."""

from __future__ import annotations

import torch

from finevit.data.packing import collate_images, fill_rate, pack

from .test_packing import embedded_lengths


def test_benchmark_pack_5000_embedded_images(benchmark):
    lengths = embedded_lengths()
    groups = benchmark.pedantic(lambda: list(pack(lengths, 16384, 256, 256, length=lambda n: n)), rounds=5)
    benchmark.extra_info["fill"] = fill_rate(groups, 16384)
    benchmark.extra_info["images"] = len(lengths)
    assert fill_rate(groups, 16384) >= 0.97


def test_benchmark_collate_a_16k_token_batch(benchmark):
    grids = [(24, 32), (16, 16), (32, 20), (8, 12), (30, 30), (10, 40)] * 3
    images = [torch.randint(0, 256, (3, h * 16, w * 16), dtype=torch.uint8) for h, w in grids]
    batch = benchmark.pedantic(lambda: collate_images(images, 16), rounds=20)
    benchmark.extra_info["tokens"] = batch["patches"].shape[0]
    assert batch["cu_seqlens"][-1] == sum(h * w for h, w in grids)
