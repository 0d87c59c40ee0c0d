"""Tokenizer training, saving and reloading, the BOS/EOS/truncation rule, and text packing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from finevit.data.packing import pack_texts
from finevit.data.text import TextTokenizer, save_tokenizer, train_tokenizer

CORPUS = [f"A small {c} {s} is to the left of the large {c2} {s2}." for c in ("red", "green", "blue")
          for s in ("circle", "square", "star") for c2 in ("pink", "black") for s2 in ("cross", "hexagon")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(CORPUS * 3, vocab_size=400), directory)
    return directory


def test_trained_tokenizer_reloads_with_autotokenizer(trained):
    reloaded = AutoTokenizer.from_pretrained(str(trained))
    config = json.loads((trained / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)
    assert len(reloaded) <= 400
    ids = reloaded("The red circle.", add_special_tokens=False)["input_ids"]
    assert reloaded.decode(ids).strip() == "the red circle."  # lowercased, byte-level: round trip
    assert ids == reloaded("the RED circle.", add_special_tokens=False)["input_ids"]


def test_text_tokenizer_adds_one_bos_and_one_eos(trained):
    tok = TextTokenizer.from_pretrained(trained, context_length=64)
    (ids,) = tok(["a red star"])
    assert ids.dtype == np.int64
    assert ids[0] == 1 and ids[-1] == 2 and (ids == 1).sum() == 1 and (ids == 2).sum() == 1
    assert tok.vocab_size <= 400
    tok.check_vocab(4096)
    with pytest.raises(ValueError, match="vocab_size"):
        tok.check_vocab(100)


def test_truncation_keeps_eos_last(trained):
    tok = TextTokenizer.from_pretrained(trained, context_length=8)
    (long, short) = tok([" ".join(CORPUS), "red"])
    assert len(long) == 8 and long[0] == 1 and long[-1] == 2
    assert short[0] == 1 and short[-1] == 2 and len(short) < 8
    with pytest.raises(ValueError, match="no room"):
        TextTokenizer.from_pretrained(trained, context_length=2)


def _word_tokenizer(post_processor=None, **special) -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[CLS]": 3, "[SEP]": 4, "[UNK]": 5, "red": 6, "star": 7}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if post_processor is not None:
        tokenizer.post_processor = post_processor
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", **special)


def test_a_tokenizer_whose_post_processor_adds_specials_gets_them_once():
    template = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    tok = TextTokenizer(_word_tokenizer(template, bos_token="<s>", eos_token="</s>"), context_length=16)
    assert tok(["red star"])[0].tolist() == [1, 6, 7, 2]


def test_conventions_without_bos_or_with_cls_sep():
    gpt2_like = TextTokenizer(_word_tokenizer(eos_token="</s>"), context_length=16)
    assert gpt2_like(["red star"])[0].tolist() == [6, 7, 2]
    bert_like = TextTokenizer(_word_tokenizer(cls_token="[CLS]", sep_token="[SEP]"), context_length=16)
    assert bert_like(["red star"])[0].tolist() == [3, 6, 7, 4]
    no_bos = TextTokenizer(_word_tokenizer(bos_token="<s>", eos_token="</s>"), context_length=16, add_bos=False)
    assert no_bos(["red"])[0].tolist() == [6, 2]
    with pytest.raises(ValueError, match="eos_token"):
        TextTokenizer(_word_tokenizer(bos_token="<s>"), context_length=16)


def test_pack_texts_builds_the_packed_text_batch():
    batch = pack_texts([np.array([1, 5, 2]), np.array([1, 2]), np.array([1, 7, 7, 7, 2])])
    assert batch["input_ids"].tolist() == [1, 5, 2, 1, 2, 1, 7, 7, 7, 2]
    assert batch["input_ids"].dtype == torch.int64
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 10] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_seqlen"] == 5
