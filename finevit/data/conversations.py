"""Stage 2's training sequences: region captioning, grounding and the dense caption, as LLM token sequences
with image placeholders and answer-only labels.

One sequence per image:

    <|vision_start|> <|image_pad|> × n <|vision_end|> \\n  prompt₁ \\n  answer₁ <eos>  prompt₂ \\n  answer₂ <eos> ...
    labels: -100 ........................................................ answer₁ <eos>  -100 ...... answer₂ <eos>

n = ceil(h/2)·ceil(w/2), the image's merged token count (`finevit.model.vlm.merged_token_counts`). The turns
are drawn from the tasks of a configurable mix (FineCap-style local captions from the sample's "regions"):

    region_caption   "Describe the region <|box_start|>(x0,y0),(x1,y1)<|box_end|>."  ->  "a small dotted red star"
    grounding        "Locate: a small dotted red star."  ->  "<|box_start|>(x0,y0),(x1,y1)<|box_end|>"
    global_caption   "Describe the image in detail."  ->  the dense caption

Boxes are Qwen2-VL's: integers in [0, 1000) of the normalized (x0, y0, x1, y1) (top-left, bottom-right), in
plain text. A region is used at most once per sequence; an image without regions gets the dense caption.
Loss is taken on answer tokens and their end token only (-100 on the image placeholders, the prompts and
the padding). A sequence longer than `max_length` loses its last turns (never the image tokens, which must
match the images); a single turn that does not fit has its answer cut.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100
TASKS = ("region_caption", "grounding", "global_caption")
SPECIAL_TOKENS = {"image": "<|image_pad|>", "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>",
                  "box_start": "<|box_start|>", "box_end": "<|box_end|>"}
PROMPTS = {"region_caption": "Describe the region {box}.", "grounding": "Locate: {caption}.",
           "global_caption": "Describe the image in detail."}
_BOX = re.compile(r"\((\d{1,3}),(\d{1,3})\),\((\d{1,3}),(\d{1,3})\)")


def prepare_tokenizer(tokenizer):
    """The tokenizer with the special tokens this format uses (added where missing; Qwen2-VL's tokenizers have
    them all) and a pad token (EOS when there is none). Returns a tokenizer that saving and reloading leaves
    unchanged: a tokenizer that gained tokens is written out and read back, because some tokenizers gain one
    more token (an unk token) on their first reload, which would change the vocabulary between the run that
    sized the LLM's embeddings and the run that loads it. Resize the LLM's embeddings to `len(result)`."""
    if tokenizer.eos_token_id is None:
        raise ValueError("prepare_tokenizer: the tokenizer has no eos_token; answers need an end token")
    missing = [t for t in SPECIAL_TOKENS.values()
               if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not missing:
        return tokenizer
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp)


def format_box(box: Sequence[float]) -> str:
    """Normalized (x0, y0, x1, y1) -> "(x0,y0),(x1,y1)" with integers in [0, 1000)."""
    q = [min(999, max(0, int(float(v) * 1000))) for v in box]
    return f"({q[0]},{q[1]}),({q[2]},{q[3]})"


def parse_box(text: str) -> list[float] | None:
    """The first "(x0,y0),(x1,y1)" in `text` as a normalized box, or None."""
    match = _BOX.search(text)
    if match is None:
        return None
    x0, y0, x1, y1 = (int(v) / 1000 for v in match.groups())
    return [x0, y0, x1, y1]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Turn:
    task: str
    prompt: str
    answer: str


def boxed(box: Sequence[float]) -> str:
    return f"{SPECIAL_TOKENS['box_start']}{format_box(box)}{SPECIAL_TOKENS['box_end']}"


def region_caption_turn(box: Sequence[float], caption: str) -> Turn:
    return Turn("region_caption", PROMPTS["region_caption"].format(box=boxed(box)), caption)


def grounding_turn(box: Sequence[float], caption: str) -> Turn:
    return Turn("grounding", PROMPTS["grounding"].format(caption=caption.rstrip(".")), boxed(box))


def global_caption_turn(caption: str) -> Turn:
    return Turn("global_caption", PROMPTS["global_caption"], caption)


def sample_turns(caption: str, boxes: np.ndarray, region_captions: Sequence[str], mix: dict[str, float],
                 turns: int, rng: np.random.Generator) -> list[Turn]:
    """Up to `turns` turns drawn from `mix` (task -> weight); each region used once, the global caption once."""
    weights = np.array([max(0.0, float(mix.get(t, 0.0))) for t in TASKS])
    if weights.sum() <= 0:
        raise ValueError(f"sample_turns: the task mix {mix} gives no task a positive weight (tasks: {TASKS})")
    free_regions = list(rng.permutation(len(region_captions)))
    out, caption_used = [], False
    for _ in range(turns):
        available = weights.copy()
        if not free_regions:
            available[:2] = 0
        if caption_used:
            available[2] = 0
        if available.sum() <= 0:
            break
        task = TASKS[int(rng.choice(len(TASKS), p=available / available.sum()))]
        if task == "global_caption":
            out.append(global_caption_turn(caption))
            caption_used = True
            continue
        r = int(free_regions.pop())
        make = region_caption_turn if task == "region_caption" else grounding_turn
        out.append(make(boxes[r], region_captions[r]))
    if not out:  # the mix asks only for region tasks and the image has no regions
        out.append(global_caption_turn(caption))
    return out


class SequenceBuilder:
    """Token ids and labels of the format above, for a tokenizer prepared with `prepare_tokenizer`."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in SPECIAL_TOKENS.items()}
        missing = [SPECIAL_TOKENS[n] for n, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"SequenceBuilder: the tokenizer lacks {missing}; call prepare_tokenizer first")
        self.image_token_id = ids["image"]
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self._newline = self._encode("\n")
        self._start, self._end = [ids["vision_start"]], [ids["vision_end"]]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def image_prefix(self, image_tokens: int) -> list[int]:
        return self._start + [self.image_token_id] * image_tokens + self._end + self._newline

    def prompt(self, image_tokens: int, prompt: str) -> list[int]:
        """A generation prompt: the image, one prompt, the newline the answer follows."""
        return self.image_prefix(image_tokens) + self._encode(prompt) + self._newline

    def build(self, image_tokens: int, turns: Sequence[Turn]) -> tuple[list[int], list[int], list[int]]:
        """(input ids, labels, task index per position or -1); at most max_length ids (module doc)."""
        ids = self.image_prefix(image_tokens)
        if len(ids) + 2 > self.max_length:
            raise ValueError(f"SequenceBuilder: an image of {image_tokens} tokens leaves no room for a turn in "
                             f"max_length={self.max_length}; raise tasks.max_length or lower data.max_pixels")
        labels = [IGNORE_INDEX] * len(ids)
        tasks = [-1] * len(ids)
        for n, turn in enumerate(turns):
            prompt = self._encode(turn.prompt) + self._newline
            answer = self._encode(turn.answer) + [self.eos_token_id]
            room = self.max_length - len(ids) - len(prompt)
            if room < len(answer):
                if n > 0 or room < 1:
                    break
                answer = answer[:room]  # the only turn: cut its answer
            task = TASKS.index(turn.task)
            ids += prompt + answer
            labels += [IGNORE_INDEX] * len(prompt) + answer
            tasks += [-1] * len(prompt) + [task] * len(answer)
        return ids, labels, tasks

    def collate(self, sequences: Sequence[tuple[list[int], list[int], list[int]]]) -> dict:
        """Right-padded batch: input_ids, attention_mask, labels (int64 (B, L)), label_task (int64 (B, L))."""
        width = max(len(s[0]) for s in sequences)
        batch = {"input_ids": torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros((len(sequences), width), dtype=torch.long),
                 "labels": torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long),
                 "label_task": torch.full((len(sequences), width), -1, dtype=torch.long)}
        for i, (ids, labels, tasks) in enumerate(sequences):
            batch["input_ids"][i, :len(ids)] = torch.tensor(ids)
            batch["attention_mask"][i, :len(ids)] = 1
            batch["labels"][i, :len(ids)] = torch.tensor(labels)
            batch["label_task"][i, :len(ids)] = torch.tensor(tasks)
        return batch


def build_batch(builder: SequenceBuilder, image_tokens: Sequence[int], captions: Sequence[str],
                regions: dict, mix: dict[str, float], turns: int, rng: np.random.Generator) -> dict:
    """The LLM batch of a packed image batch: one sequence per image (module doc).

    image_tokens: merged tokens per image; captions: the dense caption per image; regions: the loader's
    `batch["regions"]` (image_index, boxes, captions)."""
    index = regions["image_index"].tolist() if len(regions["image_index"]) else []
    boxes = regions["boxes"].numpy()
    texts = regions["captions"]
    sequences = []
    for i, (n, caption) in enumerate(zip(image_tokens, captions)):
        mine = [r for r, owner in enumerate(index) if owner == i]
        chosen = sample_turns(caption, boxes[mine], [texts[r] for r in mine], mix, turns, rng)
        sequences.append(builder.build(int(n), chosen))
    return builder.collate(sequences)
