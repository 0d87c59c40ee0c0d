"""The evaluation tasks end to end through webdataset shards, with an oracle model whose answers are known,
a constant model (chance), and the CLI on a FineCLIP checkpoint and an embedded dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from finevit.data.image import ImageConfig
from finevit.data.text import TextTokenizer
from finevit.eval import __main__ as cli
from finevit.eval.encode import embed_images
from finevit.eval.tasks import classification, hard_negatives, long_caption_retrieval, retrieval, write_result

from ..data.helpers import encode, write_shard

PALETTE = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "black": (10, 10, 10), "white": (250, 250, 250)}
NAMES = list(PALETTE)
# Very different sizes, so that the packer reorders the images and the evaluation must restore their order.
SIZES = [(512, 384), (64, 64), (256, 256), (96, 640), (128, 128), (384, 96)]
CONFIG = ImageConfig(patch_size=16, merge_size=2, min_pixels=32 * 32, max_pixels=512 * 512)


def _tokenizer() -> TextTokenizer:
    words = ["[UNK]", "<s>", "</s>", "a", "the", "image", "of", "shape", "picture"] + NAMES
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    return TextTokenizer(fast, context_length=32)


class ColorOracle(torch.nn.Module):
    """Image -> one-hot of its palette colour (mean pixel); text -> one-hot of the colour word it contains.

    It needs FineCLIP's packed interface to work, so a wrong image/text alignment anywhere in the evaluation
    (packing order, caption bookkeeping) shows as a recall below 1.
    """

    def __init__(self, tokenizer: TextTokenizer):
        super().__init__()
        vocab = tokenizer.tokenizer.get_vocab()
        self.color_ids = torch.tensor([vocab[n] for n in NAMES])
        self.palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32)

    def encode_image(self, patches, positions, cu_seqlens, max_seqlen):
        rgb = patches.reshape(patches.shape[0], 3, -1).float().mean(dim=2)  # (N, 3): (C, P, P) rows
        bounds = cu_seqlens.tolist()
        means = torch.stack([rgb[a:b].mean(dim=0) for a, b in zip(bounds[:-1], bounds[1:])])
        nearest = torch.cdist(means, self.palette).argmin(dim=1)
        return torch.nn.functional.one_hot(nearest, len(NAMES)).float()

    def encode_text(self, input_ids, cu_seqlens, max_seqlen):
        bounds = cu_seqlens.tolist()
        out = torch.zeros(len(bounds) - 1, len(NAMES))
        for row, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            hits = (input_ids[a:b, None] == self.color_ids[None]).any(dim=0)
            out[row] = hits.float()
        return out


class Constant(ColorOracle):
    def encode_image(self, patches, positions, cu_seqlens, max_seqlen):
        return torch.ones(cu_seqlens.shape[0] - 1, 4)

    def encode_text(self, input_ids, cu_seqlens, max_seqlen):
        return torch.ones(cu_seqlens.shape[0] - 1, 4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("colors")
    samples = []
    for i, (name, (h, w)) in enumerate(zip(NAMES, SIZES)):
        image = np.empty((h, w, 3), dtype=np.uint8)
        image[:] = PALETTE[name]
        others = [n for n in NAMES if n != name][:3]
        note = {"caption": f"a picture of a {name} shape", "short_caption": f"the {name}",
                "hard_negatives": [f"a picture of a {o} shape" for o in others],
                "hard_negative_types": ["color"] * 3, "labels": {"color": name}}
        samples.append({"__key__": f"img-{i}", "png": encode(image), "json": json.dumps(note).encode()})
    samples.append({"__key__": "broken", "png": b"", "json": b'{"caption": "x"}'})  # skipped, counted
    write_shard(root / "val-0.tar", samples[:3])
    write_shard(root / "val-1.tar", samples[3:])
    return str(root / "val-{0..1}.tar")


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


def test_images_come_back_in_shard_order_with_skips_counted(shards, tokenizer):
    images = embed_images(ColorOracle(tokenizer), shards, CONFIG, token_budget=1024, progress=False)
    assert images.keys == [f"img-{i}" for i in range(6)]
    assert images.features.argmax(dim=1).tolist() == list(range(6))
    assert images.skipped == {"decode": 1}


def test_an_oracle_model_scores_perfectly_on_every_task(shards, tokenizer):
    model = ColorOracle(tokenizer)
    images = embed_images(model, shards, CONFIG, token_budget=1024, progress=False)
    r = retrieval(model, tokenizer, images, "colors", token_budget=64)
    assert r.task == "zeroshot_retrieval" and r.extra["num_texts"] == 12  # short + dense caption per image
    assert r.metrics["image_retrieval_recall@1"] == r.metrics["text_retrieval_recall@1"] == 1.0
    long = long_caption_retrieval(model, tokenizer, images, "colors")
    assert long.dataset == "colors_long" and long.extra["num_texts"] == 6
    assert long.metrics["image_retrieval_recall@1"] == 1.0
    hn = hard_negatives(model, tokenizer, images, "colors")
    assert hn.metrics["accuracy"] == hn.metrics["pairwise_accuracy_color"] == 1.0
    assert hn.metrics["chance"] == pytest.approx(0.25)
    cls = classification(model, tokenizer, images, "colors", "color", NAMES, ["a {c} shape.", "a picture of a {c}."])
    assert cls.dataset == "colors_color" and cls.task == "zeroshot_classification"
    assert cls.metrics == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}


def test_a_constant_model_scores_chance_through_the_pipeline(shards, tokenizer):
    model = Constant(tokenizer)
    images = embed_images(model, shards, CONFIG, token_budget=1024, progress=False)
    r = retrieval(model, tokenizer, images, "colors", ks=(1, 5))
    assert r.metrics["image_retrieval_recall@1"] == pytest.approx(1 / 6)
    assert r.metrics["image_retrieval_recall@5"] == pytest.approx(5 / 6)
    assert hard_negatives(model, tokenizer, images, "colors").metrics["accuracy"] == pytest.approx(0.25)
    cls = classification(model, tokenizer, images, "colors", "color", NAMES, ["a {c}."])
    assert cls.metrics["acc1"] == pytest.approx(1 / 6) and cls.metrics["acc5"] == pytest.approx(5 / 6)


def test_results_are_clip_benchmark_json(shards, tokenizer, tmp_path):
    model = ColorOracle(tokenizer)
    images = embed_images(model, shards, CONFIG, token_budget=1024, progress=False)
    result = retrieval(model, tokenizer, images, "colors", ks=(1, 5, 10))
    path = write_result(result, tmp_path, "FineCLIP", "/ckpts/run 1/step-10")
    assert path.name == "colors_step-10_FineCLIP_en_zeroshot_retrieval.json"
    document = json.loads(path.read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(document)
    assert document["pretrained"] == "/ckpts/run 1/step-10" and document["language"] == "en"
    assert {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)} <= set(document["metrics"])


def test_cli_evaluates_a_checkpoint_on_the_embedded_dataset(tmp_path, capsys):
    from finevit.data.synth import SynthConfig, generate
    from finevit.model import FineCLIP, FineCLIPConfig

    data = tmp_path / "synth"
    generate(data, SynthConfig(train=8, val=10, shard_size=5), workers=1, progress=False)
    model = FineCLIP(FineCLIPConfig.from_name("tiny"))
    model.init_weights()
    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "results"
    assert cli.main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--out", str(out),
                     "--max-pixels", str(96 * 96), "--no-progress"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["finevit-synth_val_ckpt_FineCLIP_en_hard_negatives.json",
                     "finevit-synth_val_ckpt_FineCLIP_en_zeroshot_retrieval.json",
                     "finevit-synth_val_color_ckpt_FineCLIP_en_zeroshot_classification.json",
                     "finevit-synth_val_long_ckpt_FineCLIP_en_zeroshot_retrieval.json",
                     "finevit-synth_val_shape_ckpt_FineCLIP_en_zeroshot_classification.json"]
    retrieval_json = json.loads((out / files[1]).read_text())
    assert retrieval_json["num_images"] == 10 and retrieval_json["num_texts"] == 20
    assert 0.0 <= retrieval_json["metrics"]["image_retrieval_recall@1"] <= 1.0
    assert "zeroshot_classification" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown task"):
        cli.main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--tasks", "nope"])
