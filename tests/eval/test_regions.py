"""Region evaluations: attribute parsing, the linear probe (learns what is linearly there, nothing otherwise),
box pooling over the right patch cells."""

import numpy as np
import torch

from finevit.data.image import ImageConfig, boxes_to_grid
from finevit.eval.encode import iter_image_batches
from finevit.eval.regions import linear_probe, parse_attributes, region_features, synth_attributes


def test_parse_attributes_of_the_synthetic_region_captions():
    attributes = synth_attributes()
    assert parse_attributes("a medium-sized checkered purple diamond", attributes) == {
        "size": "medium-sized", "pattern": "checkered", "color": "purple", "shape": "diamond"}
    assert parse_attributes("A small RED star.", attributes) == {"size": "small", "pattern": None, "color": "red",
                                                                 "shape": "star"}
    assert parse_attributes("nothing", attributes) == dict.fromkeys(attributes)


def test_linear_probe_separates_linear_classes_and_stays_at_chance_on_noise():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=gen) * 3
    y = torch.randint(0, 4, (800,), generator=gen)
    x = centers[y] + torch.randn(800, 16, generator=gen)
    assert linear_probe(x[:600], y[:600], x[600:], y[600:], 4) > 0.95
    noise = torch.randn(800, 16, generator=gen)
    assert linear_probe(noise[:600], y[:600], noise[600:], y[600:], 4) < 0.4  # chance 0.25


class CellIndexEncoder(torch.nn.Module):
    """Each patch's feature is (row, col): the pooled feature of a box is the mean cell position."""

    def forward_features(self, patches, positions, cu_seqlens, max_seqlen):
        return positions.float()


def test_region_features_on_the_synthetic_dataset(tmp_path):
    from finevit.data.synth import SynthConfig, generate

    root = tmp_path / "synth"
    generate(root, SynthConfig(train=8, val=8, shard_size=8, max_side=256), workers=1, progress=False)
    config = ImageConfig(patch_size=16, min_pixels=64 * 64, max_pixels=128 * 128, merge_size=2)
    features, captions = region_features(CellIndexEncoder(), str(root / "val" / "val-000000.tar"), config, 8,
                                         torch.device("cpu"))
    assert features.shape == (len(captions), 2) and len(captions) >= 8
    assert all(parse_attributes(c, synth_attributes())["shape"] for c in captions)
    # Each pooled (row, col) is the centre of the half-open cell range its box touches.
    expected = []
    for _, _, notes, batch in iter_image_batches(str(root / "val" / "val-000000.tar"), config, 16384, 8):
        for i, note in enumerate(notes):
            boxes = np.asarray([r["bbox"] for r in note["regions"]])
            _, cells = boxes_to_grid(boxes, tuple(batch["grid_hw"][i].tolist()))
            expected += [[(r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2] for r0, c0, r1, c1 in cells.tolist()]
    torch.testing.assert_close(features, torch.tensor(expected, dtype=torch.float32))
