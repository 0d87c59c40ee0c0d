"""The webdataset loader: shard specs and splits, bad samples (exact skip counts), resuming, workers, modes."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch

from finevit.data.image import ImageConfig
from finevit.data.loader import LoaderConfig, PackedLoader
from finevit.data.shards import check_enough_shards, epoch_shard_order, expand_shards, split_shards
from finevit.data.text import TextTokenizer

from .helpers import annotation, encode, good_sample, smooth_rgb, write_dataset, write_shard
from .test_text import _word_tokenizer

IMAGE_CONFIG = ImageConfig(patch_size=16, merge_size=2, min_pixels=32 * 32, max_pixels=128 * 128)


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(_word_tokenizer(bos_token="<s>", eos_token="</s>"), context_length=16)


def make_loader(shards, tokenizer, **overrides) -> PackedLoader:
    options = dict(token_budget=256, max_images=8, pack_buffer=4, shuffle_buffer=0, num_workers=0, seed=0)
    options.update(overrides)
    rank, world = options.pop("rank", 0), options.pop("world_size", 1)
    return PackedLoader(LoaderConfig(shards, **options), IMAGE_CONFIG, tokenizer, rank=rank, world_size=world)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


# ----------------------------------------------------------------------------------------------------
# Shard lists
# ----------------------------------------------------------------------------------------------------


def test_expand_shards_handles_braces_sources_and_env(monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/data")
    assert expand_shards("a/{0..2}.tar::$DATA_ROOT/b-{08..10}.tar") == [
        "a/0.tar", "a/1.tar", "a/2.tar", "/data/b-08.tar", "/data/b-09.tar", "/data/b-10.tar"]
    assert expand_shards(["x.tar", "y/{a,b}.tar"]) == ["x.tar", "y/a.tar", "y/b.tar"]
    with pytest.raises(ValueError, match="names no shard"):
        expand_shards(" :: ")


def test_node_and_worker_splits_cover_every_shard_once():
    shards = [f"s{i:02d}" for i in range(11)]
    order = epoch_shard_order(shards, seed=3, epoch=1, shuffle=True)
    assert sorted(order) == shards and order != shards
    assert order == epoch_shard_order(shards, seed=3, epoch=1, shuffle=True)  # same on every rank
    assert order != epoch_shard_order(shards, seed=3, epoch=2, shuffle=True)
    parts = [split_shards(order, rank, 2, worker, 3) for rank in range(2) for worker in range(3)]
    assert sorted(s for p in parts for s in p) == shards and all(parts)


def test_too_few_shards_for_workers_times_ranks_is_a_clear_error(tmp_path, tokenizer):
    spec, _ = write_dataset(tmp_path, num_shards=3, per_shard=2)
    with pytest.raises(ValueError, match=r"3 shard\(s\) but 2 rank\(s\) × 2 DataLoader worker\(s\) = 4"):
        make_loader(spec, tokenizer, num_workers=2, rank=1, world_size=2)
    with pytest.raises(ValueError, match="resampled=True"):
        check_enough_shards(1, 1, 2)
    make_loader(spec, tokenizer, num_workers=2, rank=1, world_size=2, resampled=True)  # resampling needs no split


def test_token_budget_must_hold_the_largest_image(tmp_path, tokenizer):
    spec, _ = write_dataset(tmp_path, num_shards=1, per_shard=1)
    with pytest.raises(ValueError, match="cannot hold the largest"):
        make_loader(spec, tokenizer, token_budget=32)


# ----------------------------------------------------------------------------------------------------
# Bad samples
# ----------------------------------------------------------------------------------------------------


def bad_samples() -> dict[str, tuple[dict, str]]:
    """name -> (raw sample, the skip reason it must be counted under)."""
    jpeg = encode(smooth_rgb(64, 64), "JPEG")
    png = encode(smooth_rgb(64, 64))
    ok = annotation("fine caption", regions=[{"bbox": [0.1, 0.1, 0.5, 0.5], "caption": "red"}])
    return {
        "truncated": ({"jpg": jpeg[: len(jpeg) // 2], "json": ok}, "decode"),
        "zero_byte": ({"png": b"", "json": ok}, "decode"),
        "undecodable": ({"jpg": b"\xff\xd8 definitely not a jpeg" * 4, "json": ok}, "decode"),
        "missing_json": ({"png": png}, "missing_json"),
        "malformed_json": ({"png": png, "json": b'{"caption": "unterminated'}, "bad_json"),
        "json_not_object": ({"png": png, "json": b'["caption"]'}, "bad_json"),
        "empty_caption": ({"png": png, "json": annotation("   ")}, "empty_caption"),
        "no_caption": ({"png": png, "json": json.dumps({"short_caption": "x"}).encode()}, "empty_caption"),
        "degenerate_bbox": ({"png": png, "json": annotation("c", regions=[{"bbox": [0.5, 0.2, 0.5, 0.8],
                                                                           "caption": "r"}])}, "bad_bbox"),
        "out_of_range_bbox": ({"png": png, "json": annotation("c", regions=[{"bbox": [0.1, 0.1, 1.5, 0.8],
                                                                             "caption": "r"}])}, "bad_bbox"),
        "nan_bbox": ({"png": png, "json": b'{"caption": "c", "regions": [{"bbox": [0, 0, NaN, 1], '
                                          b'"caption": "r"}]}'}, "bad_bbox"),
        "region_without_caption": ({"png": png, "json": annotation("c", regions=[{"bbox": [0, 0, 1, 1]}])},
                                   "bad_region"),
        "one_pixel": ({"png": encode(np.zeros((1, 1, 3), np.uint8)), "json": ok}, "too_small"),
        "sliver_20000x50": ({"png": encode(np.zeros((50, 20000, 3), np.uint8)), "json": ok}, "bad_aspect"),
        "missing_image": ({"json": ok}, "missing_image"),
    }


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    """Two shards mixing good and bad samples, plus a truncated third shard (its first 2 samples readable)."""
    root = tmp_path_factory.mktemp("bad")
    bad = bad_samples()
    samples = []
    for i, (name, (raw, _)) in enumerate(bad.items()):
        samples.append(good_sample(f"good-{i:02d}"))
        samples.append({"__key__": f"bad-{name}", **raw})
    write_shard(root / "mixed-0.tar", samples[: len(samples) // 2])
    write_shard(root / "mixed-1.tar", samples[len(samples) // 2:])
    full = write_shard(root / "full.tar", [good_sample(f"cut-{i}", seed=i, size=(96, 96)) for i in range(6)])
    data = full.read_bytes()
    (root / "mixed-2.tar").write_bytes(data[: int(len(data) * 0.45)])
    good = [s["__key__"] for s in samples if s["__key__"].startswith("good")]
    return str(root / "mixed-{0..2}.tar"), good, Counter(reason for _, reason in bad.values())


def test_every_bad_sample_is_skipped_and_counted_exactly(bad_dataset, tokenizer, caplog):
    spec, good, expected = bad_dataset
    loader = make_loader(spec, tokenizer, warn_interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="finevit.data"):
        batches = list(loader)
    delivered = keys_of(batches)
    cut = [k for k in delivered if k.startswith("cut-")]
    assert sorted(k for k in delivered if k.startswith("good")) == sorted(good)
    assert not [k for k in delivered if k.startswith("bad")]
    assert cut and sorted(cut) == [f"cut-{i}" for i in range(len(cut))]  # the readable start of the cut shard
    stats = loader.stats()
    assert stats["skipped"] == {**expected, "bad_shard": 1}
    assert stats["kept"] == len(good) + len(cut)
    assert stats["read"] == len(good) + sum(expected.values()) + len(cut)
    # Rate-limited: one warning per reason within the interval, naming the sample and the running count.
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == len(expected) + 1
    (decode,) = [w for w in warnings if "(decode:" in w]
    assert any(f"bad-{name}" in decode for name in ("truncated", "zero_byte", "undecodable"))
    assert "1 skipped for this reason so far" in decode


def test_warnings_repeat_after_the_interval_with_the_running_count(bad_dataset, tokenizer, caplog):
    spec, _, expected = bad_dataset
    with caplog.at_level(logging.WARNING, logger="finevit.data"):
        list(make_loader(spec, tokenizer, warn_interval_s=0.0))
    decode = [r.getMessage() for r in caplog.records if "(decode:" in r.getMessage()]
    assert len(decode) == expected["decode"] and "3 skipped for this reason so far" in decode[-1]


# ----------------------------------------------------------------------------------------------------
# Passes, resuming, determinism
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("good"), num_shards=6, per_shard=7)


def test_one_pass_delivers_every_sample_once_then_the_next_epoch_reshuffles(dataset, tokenizer):
    spec, keys = dataset
    loader = make_loader(spec, tokenizer, shuffle_buffer=5, pack_buffer=3)
    first = keys_of(loader)
    second = keys_of(loader)
    assert sorted(first) == sorted(keys) == sorted(second) and first != second
    assert {w["epoch"] for w in loader.state_dict()["workers"].values()} == {2}
    for batch in make_loader(spec, tokenizer):
        assert batch["image"]["cu_seqlens"][-1] <= 256 and len(batch["keys"]) <= 8


def test_same_seed_same_batches_other_seed_other_order(dataset, tokenizer):
    spec, _ = dataset
    a = list(make_loader(spec, tokenizer, shuffle_buffer=6))
    b = list(make_loader(spec, tokenizer, shuffle_buffer=6))
    c = list(make_loader(spec, tokenizer, shuffle_buffer=6, seed=1))
    assert keys_of(a) == keys_of(b) != keys_of(c)
    assert all(torch.equal(x["image"]["patches"], y["image"]["patches"]) for x, y in zip(a, b))


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_resume_continues_exactly_without_buffers(dataset, tokenizer):
    spec, _ = dataset
    full = keys_of(make_loader(spec, tokenizer, pack_buffer=1))
    first = make_loader(spec, tokenizer, pack_buffer=1)
    head = keys_of(_take(first, 10))
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (a checkpoint)
    second = make_loader(spec, tokenizer, pack_buffer=1)
    second.load_state_dict(state)
    assert head + keys_of(second) == full


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_never_repeats_and_drops_at_most_the_buffered_samples(dataset, tokenizer, num_workers):
    spec, keys = dataset
    options = dict(shuffle_buffer=4, pack_buffer=3, num_workers=num_workers)
    first = make_loader(spec, tokenizer, **options)
    head = keys_of(_take(first, 4))
    second = make_loader(spec, tokenizer, **options)
    second.load_state_dict(first.state_dict())
    tail = keys_of(second)
    assert not set(head) & set(tail) and len(set(tail)) == len(tail)
    lost = set(keys) - set(head) - set(tail)
    assert len(lost) <= max(1, num_workers) * (4 + 3)
    assert second.stats()["batches"] > first.stats()["batches"] == 4  # the count continues across the restart


def test_loading_a_state_from_another_layout_is_refused(dataset, tokenizer):
    spec, _ = dataset
    loader = make_loader(spec, tokenizer)
    _take(loader, 1)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="num_workers: saved 1, now 2"):
        make_loader(spec, tokenizer, num_workers=2).load_state_dict(state)


def test_two_workers_read_disjoint_shards_and_counters_add_up(dataset, tokenizer):
    spec, keys = dataset
    loader = make_loader(spec, tokenizer, num_workers=2, shuffle_buffer=3)
    batches = list(loader)
    assert sorted(keys_of(batches)) == sorted(keys)
    assert loader.stats()["read"] == loader.stats()["kept"] == len(keys)
    assert set(loader.state_dict()["workers"]) == {"0", "1"}


def test_ranks_split_the_shards(dataset, tokenizer):
    spec, keys = dataset
    parts = [keys_of(make_loader(spec, tokenizer, rank=r, world_size=3)) for r in range(3)]
    assert sorted(k for p in parts for k in p) == sorted(keys)
    assert all(parts) and not set(parts[0]) & set(parts[1])


def test_resampled_and_repeat_modes_are_endless_and_seeded(dataset, tokenizer):
    spec, keys = dataset
    for mode in ({"resampled": True}, {"repeat": True}):
        a = keys_of(_take(make_loader(spec, tokenizer, **mode), 40))
        b = keys_of(_take(make_loader(spec, tokenizer, **mode), 40))
        assert a == b and len(a) > len(keys)  # more than an epoch, same for the same seed
    counts = Counter(keys_of(_take(make_loader(spec, tokenizer, resampled=True, seed=5), 60)))
    assert len({k.split("-")[0] for k in counts}) >= 4  # draws come from across the shard list
    other = keys_of(_take(make_loader(spec, tokenizer, resampled=True, seed=6), 40))
    assert other != keys_of(_take(make_loader(spec, tokenizer, resampled=True, seed=5), 40))


def test_resampled_resume_continues_the_same_stream(dataset, tokenizer):
    spec, _ = dataset
    stream = keys_of(_take(make_loader(spec, tokenizer, resampled=True, pack_buffer=1), 30))
    first = make_loader(spec, tokenizer, resampled=True, pack_buffer=1)
    head = keys_of(_take(first, 12))
    second = make_loader(spec, tokenizer, resampled=True, pack_buffer=1)
    second.load_state_dict(first.state_dict())
    assert head + keys_of(_take(second, 18)) == stream


def test_regions_and_short_captions_reach_the_batch(tmp_path, tokenizer):
    regions = [{"bbox": [0, 0, 0.5, 0.5], "caption": "star"}]
    samples = [good_sample(f"r{i}", seed=i, short_caption="red", regions=regions) for i in range(6)]
    spec = str(write_shard(tmp_path / "r.tar", samples))
    batches = list(make_loader(spec, tokenizer, with_regions=True, short_caption_prob=1.0))
    batch = batches[0]
    assert batch["regions"]["image_index"].tolist() == list(range(len(batch["keys"])))
    assert batch["text"]["input_ids"].tolist()[:3] == [1, 6, 2]  # "red": the short caption


def test_the_short_caption_draw_is_reproducible_and_new_each_epoch(tmp_path, tokenizer):
    samples = [good_sample(f"c{i:02d}", seed=i, short_caption="red") for i in range(16)]
    spec = str(write_shard(tmp_path / "c.tar", samples))

    def texts_by_key(loader):
        out = {}
        for batch in loader:
            ids, bounds = batch["text"]["input_ids"].tolist(), batch["text"]["cu_seqlens"].tolist()
            out.update({k: tuple(ids[a:b]) for k, a, b in zip(batch["keys"], bounds[:-1], bounds[1:])})
        return out

    loader = make_loader(spec, tokenizer, short_caption_prob=0.5)
    first, second = texts_by_key(loader), texts_by_key(loader)
    assert first == texts_by_key(make_loader(spec, tokenizer, short_caption_prob=0.5))  # reproducible
    shorts = [k for k, t in first.items() if t == (1, 6, 2)]  # "red"
    assert 0 < len(shorts) < 16 and first != second  # a mix, drawn anew in the next epoch
