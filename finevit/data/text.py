"""Tokenization of captions (torch-free, so the dataset generator stays light; packing is in packing.py).

Any `transformers` tokenizer directory works (`TextTokenizer.from_pretrained(dir, context_length)`); the
embedded dataset ships its own small byte-level BPE, trained on its captions by `train_tokenizer` and saved
as a `PreTrainedTokenizerFast` that `transformers.AutoTokenizer.from_pretrained(dir)` reloads.

Special tokens are added by `TextTokenizer`, never by the tokenizer's own post-processor, so every tokenizer
gives the same layout whatever its conventions (GPT-2 adds nothing, Llama only BOS, BERT CLS/SEP):

    ids = [BOS] + body[: context_length - 2] + [EOS]        (no BOS when the tokenizer has none)

BOS is the tokenizer's `bos_token` (else `cls_token`), EOS its `eos_token` (else `sep_token`). EOS is always
the last token, also after truncation, because the text tower pools each text's last token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2 in a tokenizer made by `train_tokenizer`


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2,
                    model_max_length: int = 512):
    """Train a byte-level BPE (lowercased, NFKC) on `texts`; returns a `PreTrainedTokenizerFast`.

    Byte-level means no unknown token: any string round-trips. The vocabulary holds the 256 byte symbols,
    the three special tokens and at most `vocab_size` entries in all (fewer when the texts have fewer merges).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   model_max_length=model_max_length)


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> Path:
    """`save_pretrained`, with `tokenizer_class` set to "PreTrainedTokenizerFast" so that transformers 4.x
    (which has no "TokenizersBackend") loads the directory as well as 5.x does."""
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return directory


class TextTokenizer:
    """A transformers tokenizer plus the BOS/EOS/truncation rule of this module.

    `tokenizer(texts)` -> one int64 array of ids per text, each at most `context_length` long, EOS last.
    """

    def __init__(self, tokenizer, context_length: int, add_bos: bool = True):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.bos_id = _special_id(tokenizer, "bos_token", "cls_token") if add_bos else None
        self.eos_id = _special_id(tokenizer, "eos_token", "sep_token")
        if self.eos_id is None:
            raise ValueError("TextTokenizer: the tokenizer has neither an eos_token nor a sep_token; the text "
                             "tower pools each text's last token, which must be an end-of-text marker")
        self.num_special = 1 + (self.bos_id is not None)
        if context_length < self.num_special + 1:
            raise ValueError(f"TextTokenizer: context_length={context_length} leaves no room for text "
                             f"after {self.num_special} special token(s)")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, context_length: int, add_bos: bool = True) -> TextTokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)), context_length, add_bos)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (base vocabulary plus added tokens)."""
        return len(self.tokenizer)

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise if the tokenizer can emit ids that the text tower's embedding table does not have."""
        if self.vocab_size > model_vocab_size:
            raise ValueError(f"TextTokenizer: the tokenizer has {self.vocab_size} ids but the text tower's "
                             f"vocab_size is {model_vocab_size}")

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        bodies = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        keep = self.context_length - self.num_special
        prefix = [] if self.bos_id is None else [self.bos_id]
        return [np.asarray(prefix + body[:keep] + [self.eos_id], dtype=np.int64) for body in bodies]


def _special_id(tokenizer, *names: str) -> int | None:
    for name in names:
        token_id = getattr(tokenizer, f"{name}_id", None)
        if token_id is not None:
            return int(token_id)
    return None
