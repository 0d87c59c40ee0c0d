"""The embedded dataset: layout, determinism, resuming, and captions that match the pixels."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from finevit.data import synth
from finevit.data.sample import parse_annotation
from finevit.data.synth import COLORS, NEGATIVE_KINDS, SynthConfig, generate, generate_sample

TINY = SynthConfig(train=24, val=6, shard_size=10)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, TINY, workers=2, progress=False)
    return out


def _members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_layout_sizes_meta_classes_and_tokenizer(tiny_dataset):
    out = tiny_dataset
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"] == {"num_samples": 24, "num_shards": 3, "shards": "train/train-{000000..000002}.tar"}
    assert json.loads((out / "train" / "sizes.json").read_text()) == {
        "train-000000.tar": 10, "train-000001.tar": 10, "train-000002.tar": 4}
    assert json.loads((out / "val" / "sizes.json").read_text()) == {"val-000000.tar": 6}
    members = _members(out / "train" / "train-000002.tar")
    assert sorted(members) == sorted(f"train-{i:07d}.{ext}" for i in range(20, 24)
                                     for ext in ("json", "png" if i % 10 == 9 else "jpg"))
    classes = json.loads((out / "classes.json").read_text())
    assert classes["shape"]["classnames"] == list(synth.SHAPES) and "{c}" in classes["color"]["templates"][0]
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert len(tokenizer) == meta["vocab_size"] <= 4096
    assert tokenizer.eos_token == "<eos>" and tokenizer.bos_token == "<bos>" and tokenizer.pad_token == "<pad>"


def test_generation_is_byte_identical_for_a_seed_and_resumes(tiny_dataset, tmp_path):
    generate(tmp_path, TINY, workers=1, progress=False)
    for split, name in (("train", "train-000001.tar"), ("val", "val-000000.tar")):
        assert (tmp_path / split / name).read_bytes() == (tiny_dataset / split / name).read_bytes()
    # Resume: a missing shard is regenerated identically, the others are left alone.
    kept = tmp_path / "train" / "train-000000.tar"
    stamp = kept.stat().st_mtime_ns
    (tmp_path / "train" / "train-000001.tar").unlink()
    (tmp_path / "meta.json").unlink()
    time.sleep(0.01)
    generate(tmp_path, TINY, workers=1, progress=False)
    assert kept.stat().st_mtime_ns == stamp
    assert (tmp_path / "train" / "train-000001.tar").read_bytes() == \
        (tiny_dataset / "train" / "train-000001.tar").read_bytes()
    assert not [p for p in os.listdir(tmp_path / "train") if p.startswith(".")]  # no temporary file left
    with pytest.raises(ValueError, match="other settings"):
        generate(tmp_path, SynthConfig(train=24, val=6, shard_size=10, seed=1), progress=False)


def test_cli_writes_a_dataset(tmp_path, capsys):
    assert synth.main(["--out", str(tmp_path), "--train", "4", "--val", "2", "--shard-size", "2", "--workers", "1",
                       "--no-progress"]) == 0
    assert "train 4 samples in 2 shards" in capsys.readouterr().out
    assert (tmp_path / "meta.json").exists()


@pytest.fixture(scope="module")
def samples():
    return [generate_sample("train", i, SynthConfig()) for i in range(120)]


def test_canvas_sizes_and_annotations_are_valid(samples):
    config = SynthConfig()
    sizes = []
    for data, ext, a in samples:
        image = Image.open(io.BytesIO(data))
        assert image.format == ("PNG" if ext == "png" else "JPEG")
        assert image.size == (a["width"], a["height"])
        assert config.min_side <= min(image.size) and max(image.size) <= config.max_side
        assert max(image.size) / min(image.size) <= config.max_aspect + 0.02
        sizes.append(a["width"] * a["height"])
        parsed = parse_annotation(json.dumps(a).encode())  # the loader's validation accepts it
        assert 1 <= len(parsed["regions"]) <= config.max_objects
    assert min(sizes) < 200 * 200 and max(sizes) > 600 * 600  # small and large canvases both occur


def test_captions_describe_every_object_and_objects_are_unique(samples):
    for _, _, a in samples:
        names = [" ".join(r["caption"].split()[-2:]) for r in a["regions"]]  # "<colour> <shape>"
        assert len(set(names)) == len(names)
        caption = a["caption"]
        for region in a["regions"]:
            _, size, _, color, shape = region["caption"].split()  # a <size> <pattern> <colour> <shape>
            assert f"{color} {shape}" in caption and size in caption
        count = len(a["regions"])
        assert f" {synth.NUMBERS[count]} shape" in caption
        assert caption.count(" is ") + caption.count(" sits ") + caption.count("there is ") >= count
        main = a["labels"]
        assert f"{main['color']} {main['shape']}" in a["short_caption"]
        assert f"{main['color']} {main['shape']}" in caption.split(". ")[1]  # the largest object comes first


def test_dominant_object_is_strictly_the_largest(samples):
    for _, _, a in samples:
        widths = [r["bbox"][2] - r["bbox"][0] for r in a["regions"]]
        heights = [r["bbox"][3] - r["bbox"][1] for r in a["regions"]]
        sides = [w * a["width"] for w in widths]
        assert abs(widths[0] * a["width"] - heights[0] * a["height"]) <= 1.01  # square boxes
        assert all(sides[0] >= 1.2 * s for s in sides[1:])
        assert a["regions"][0]["caption"].endswith(f"{a['labels']['color']} {a['labels']['shape']}")


def test_hard_negatives_change_exactly_one_thing(samples):
    config = SynthConfig()
    kinds = set()
    for _, _, a in samples:
        assert len(a["hard_negatives"]) == len(a["hard_negative_types"]) == config.negatives
        assert len(set(a["hard_negatives"])) == config.negatives and a["caption"] not in a["hard_negatives"]
        kinds.update(a["hard_negative_types"])
        for negative in a["hard_negatives"]:
            true_sentences, neg_sentences = a["caption"].split(". "), negative.split(". ")
            assert len(true_sentences) == len(neg_sentences)
        for region in a["regions"]:
            assert region["negatives"] and region["caption"] not in region["negatives"]
            for negative in region["negatives"]:
                changed = [x != y for x, y in zip(region["caption"].split(), negative.split())]
                assert sum(changed) == 1  # one attribute word
    assert kinds == set(NEGATIVE_KINDS)


def test_relation_negatives_flip_one_relation():
    config = SynthConfig()
    for i in range(60):
        _, _, a = generate_sample("val", i, config)
        for negative, kind in zip(a["hard_negatives"], a["hard_negative_types"]):
            if kind != "relation":
                continue
            diff = [(x, y) for x, y in zip(a["caption"].split(". "), negative.split(". ")) if x != y]
            assert len(diff) == 1
            true, neg = diff[0]
            assert any(f" {w1}" in true and f" {w2}" in neg for w1, w2 in
                       (("left", "right"), ("right", "left"), ("above", "below"), ("below", "above"),
                        ("larger", "smaller"), ("smaller", "larger")))


def test_solid_objects_have_their_colour_at_the_centre_of_their_box(samples):
    """The annotations match the pixels: boxes are where the objects are, colours what the captions say."""
    checked = 0
    for data, _, a in samples:
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int32)
        for region in a["regions"]:
            _, size, pattern, color, shape = region["caption"].split()
            x0, y0, x1, y1 = region["bbox"]
            side = (x1 - x0) * a["width"]
            if pattern != "solid" or side < 24:
                continue
            cx, cy = int((x0 + x1) / 2 * a["width"]), int((y0 + y1) / 2 * a["height"])
            patch = pixels[cy - 2:cy + 3, cx - 2:cx + 3].reshape(-1, 3).mean(0)
            assert np.abs(patch - np.array(COLORS[color])).max() < 40, (region, patch)
            checked += 1
    assert checked > 20


def test_default_split_size_is_cpu_sized():
    config = SynthConfig()
    assert 2000 <= config.train <= 10000 and 200 <= config.val <= 1000
    assert config.vocab_size <= 4096
