"""The evaluation tasks, and their results as CLIP_benchmark-compatible JSON.

    retrieval                zero-shot image<->text retrieval over every global caption of each image
                             (docs/design.md's "caption" and "short_caption", plus a "captions" list when present:
                             several captions per image, as COCO's five)
    long_caption_retrieval   the same over the dense "caption" only (long-caption retrieval, as Urban-1k/DCI)
    hard_negatives           fine-grained accuracy: the true dense caption against its "hard_negatives"
                             (each with one attribute or relation changed); the image must score the true
                             caption above all k negatives. Per negative type ("hard_negative_types"), the
                             pairwise accuracy against negatives of that type.
    classification           zero-shot classification of a label key ("labels": {key: class name}) with
                             prompt templates: acc1, acc5, mean_per_class_recall
All metrics break score ties in expectation (finevit/eval/metrics.py), so a constant model scores chance.

A result is one JSON file per (dataset, task) in CLIP_benchmark's layout
    {"dataset", "model", "pretrained", "task", "metrics": {...}, "language"}
named `{dataset}_{pretrained}_{model}_{language}_{task}.json`. Retrieval uses CLIP_benchmark's task name
"zeroshot_retrieval" (the long-caption variant is the dataset "<name>_long"), classification
"zeroshot_classification" (dataset "<name>_<label key>"); "hard_negatives" is this suite's own task name.
Extra keys ("num_images", "num_texts", "skipped", ...) sit beside "metrics", which CLIP_benchmark's
`build` ignores.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finevit.data.text import TextTokenizer

from .encode import EvalImages, captions_of, embed_texts, flatten_texts
from .metrics import classification_metrics, hard_negative_credit, retrieval_metrics

RETRIEVAL_KEYS = ("short_caption", "caption", "captions")
LONG_CAPTION_KEYS = ("caption",)
TASKS = ("retrieval", "long_caption_retrieval", "hard_negatives", "classification")


@dataclass
class TaskResult:
    dataset: str  # CLIP_benchmark's "dataset"
    task: str  # CLIP_benchmark's "task"
    metrics: dict[str, float]
    extra: dict = field(default_factory=dict)  # counts beside the metrics

    def to_json(self, model: str, pretrained: str, language: str = "en") -> dict:
        return {"dataset": self.dataset, "model": model, "pretrained": pretrained, "task": self.task,
                "metrics": self.metrics, "language": language, **self.extra}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-") or "none"


def write_result(result: TaskResult, out_dir: str | os.PathLike, model: str, pretrained: str,
                 language: str = "en") -> Path:
    """Write `{dataset}_{pretrained}_{model}_{language}_{task}.json` (CLIP_benchmark's name) into out_dir.

    `pretrained` (e.g. a checkpoint path) is stored whole in the JSON; the file name uses its last component.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = Path(pretrained).name or pretrained
    name = "_".join(_slug(p) for p in (result.dataset, tag, model, language, result.task)) + ".json"
    path = out / name
    path.write_text(json.dumps(result.to_json(model, pretrained, language), indent=2) + "\n")
    return path


def retrieval(model, tokenizer: TextTokenizer, images: EvalImages, dataset: str,
              caption_keys: Sequence[str] = RETRIEVAL_KEYS, ks: Sequence[int] = (1, 5, 10), **encode) -> TaskResult:
    """Zero-shot retrieval over the captions under `caption_keys`; images without one are left out."""
    per_image = [captions_of(a, caption_keys) for a in images.annotations]
    kept = [i for i, texts in enumerate(per_image) if texts]
    if not kept:
        raise ValueError(f"retrieval: no image has a caption under {list(caption_keys)}")
    texts, owners = flatten_texts([per_image[i] for i in kept])
    text_features = embed_texts(model, tokenizer, texts, **encode)
    metrics = retrieval_metrics(images.features[kept], text_features, torch.from_numpy(owners), ks)
    return TaskResult(dataset, "zeroshot_retrieval", metrics,
                      {"num_images": len(kept), "num_texts": len(texts), "caption_keys": list(caption_keys),
                       "skipped": images.skipped})


def long_caption_retrieval(model, tokenizer: TextTokenizer, images: EvalImages, dataset: str,
                           ks: Sequence[int] = (1, 5, 10), **encode) -> TaskResult:
    return retrieval(model, tokenizer, images, f"{dataset}_long", LONG_CAPTION_KEYS, ks, **encode)


def hard_negatives(model, tokenizer: TextTokenizer, images: EvalImages, dataset: str, **encode) -> TaskResult:
    """The true dense caption against its hard negatives, per image (images without negatives left out)."""
    items = [(i, a) for i, a in enumerate(images.annotations) if captions_of(a, ("hard_negatives",))]
    if not items:
        raise ValueError("hard_negatives: no sample has \"hard_negatives\"")
    per_item = [[a["caption"]] + captions_of(a, ("hard_negatives",)) for _, a in items]
    texts, owners = flatten_texts(per_item)
    text_features = embed_texts(model, tokenizer, texts, **encode)
    owners_t = torch.from_numpy(owners)
    scores = (text_features * images.features[[i for i, _ in items]][owners_t]).sum(dim=1)  # (T,) image·text
    starts = torch.tensor([0] + [len(t) for t in per_item]).cumsum(0)[:-1]
    k_max = max(len(t) for t in per_item) - 1
    negatives = torch.full((len(items), k_max), float("-inf"), dtype=torch.float64)
    valid = torch.zeros(len(items), k_max, dtype=torch.bool)
    kinds: list[list[str]] = []
    for row, (start, t) in enumerate(zip(starts.tolist(), per_item)):
        k = len(t) - 1
        negatives[row, :k] = scores[start + 1:start + 1 + k].double()
        valid[row, :k] = True
        types = items[row][1].get("hard_negative_types")
        kinds.append(types if isinstance(types, list) and len(types) == k else ["unknown"] * k)
    positive = scores[starts].double()
    credit = hard_negative_credit(positive, negatives, valid)
    # Pairwise: the true caption against each negative alone (ties count half).
    pos = positive[:, None].expand_as(negatives)
    pairwise = (pos > negatives).double() + 0.5 * (pos == negatives).double()  # (N, K)
    metrics = {"accuracy": credit.mean().item(),
               "chance": (1.0 / (1.0 + valid.sum(dim=1).double())).mean().item(),
               "pairwise_accuracy": pairwise[valid].mean().item()}
    flat_kinds = [kind for row in kinds for kind in row]
    flat_pairwise = pairwise[valid]  # row-major, the order of flat_kinds
    for kind in sorted(set(flat_kinds)):
        mask = torch.tensor([k == kind for k in flat_kinds])
        metrics[f"pairwise_accuracy_{kind}"] = flat_pairwise[mask].mean().item()
    return TaskResult(dataset, "hard_negatives", metrics,
                      {"num_images": len(items), "num_negatives": int(valid.sum()), "skipped": images.skipped})


def zeroshot_classifier(model, tokenizer: TextTokenizer, classnames: Sequence[str], templates: Sequence[str],
                        **encode) -> torch.Tensor:
    """CLIP_benchmark's classifier: per class, the renormalized mean of its normalized prompt embeddings
    -> (num_classes, D)."""
    prompts = [t.format(c=c) for c in classnames for t in templates]
    features = embed_texts(model, tokenizer, prompts, **encode).view(len(classnames), len(templates), -1)
    return torch.nn.functional.normalize(features.mean(dim=1), dim=-1)


def classification(model, tokenizer: TextTokenizer, images: EvalImages, dataset: str, label_key: str,
                   classnames: Sequence[str], templates: Sequence[str], **encode) -> TaskResult:
    """Zero-shot classification of `annotation["labels"][label_key]` (a class name or an index)."""
    index = {name: i for i, name in enumerate(classnames)}
    rows, labels = [], []
    for i, a in enumerate(images.annotations):
        label = (a.get("labels") or {}).get(label_key)
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(classnames):
            rows.append(i)
            labels.append(label)
        elif isinstance(label, str) and label in index:
            rows.append(i)
            labels.append(index[label])
    if not rows:
        raise ValueError(f"classification: no sample has a known label under labels[{label_key!r}]")
    classifier = zeroshot_classifier(model, tokenizer, classnames, templates, **encode)
    logits = images.features[rows] @ classifier.T  # (N, C)
    metrics = classification_metrics(logits, torch.tensor(labels))
    return TaskResult(f"{dataset}_{label_key}", "zeroshot_classification", metrics,
                      {"num_images": len(rows), "num_classes": len(classnames),
                       "unlabeled": len(images.annotations) - len(rows), "skipped": images.skipped})


__all__ = ["TASKS", "TaskResult", "write_result", "retrieval", "long_caption_retrieval", "hard_negatives",
           "classification", "zeroshot_classifier"]


def run_suite(model, tokenizer: TextTokenizer, images: EvalImages, dataset: str, tasks: Sequence[str],
              classes: dict, ks: Sequence[int] = (1, 5, 10), **encode) -> list[TaskResult]:
    """The tasks of `tasks` (of TASKS) on encoded `images`: hard negatives only where the annotations have
    them, classification once per label key of `classes` ({key: {"classnames", "templates"}})."""
    results = []
    for task in tasks:
        if task == "retrieval":
            results.append(retrieval(model, tokenizer, images, dataset, ks=ks, **encode))
        elif task == "long_caption_retrieval":
            results.append(long_caption_retrieval(model, tokenizer, images, dataset, ks=ks, **encode))
        elif task == "hard_negatives":
            if any(a.get("hard_negatives") for a in images.annotations):
                results.append(hard_negatives(model, tokenizer, images, dataset, **encode))
        elif task == "classification":
            for key, spec in classes.items():
                results.append(classification(model, tokenizer, images, dataset, key, spec["classnames"],
                                              spec["templates"], **encode))
        else:
            raise ValueError(f"run_suite: unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return results
