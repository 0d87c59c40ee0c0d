"""Ranking metrics of the evaluation suite, exact under ties.

Every metric here ranks candidates by score. Equal scores (exact float ties) are broken uniformly at random,
*in expectation and exactly*: instead of drawing an order, each metric returns its expected value over all
tie-breaking orders. So a constant model scores chance (recall@k = k / C with one positive among C
candidates; hard-negative accuracy 1 / (k + 1)), and no model profits from the candidates' index order, as
it would with `topk` (CLIP_benchmark's retrieval takes the first indices among ties).

For one query with positives P among candidates, let s* be the best positive score, g the number of
candidates scoring above s* (all negatives), m the number scoring exactly s*, of which p are positives.
Under random tie-breaking the first positive lands among the first j = k − g slots of the tie group with
probability 1 − C(m − p, j) / C(m, j) (hypergeometric), so

    recall@k = 0 if j <= 0,   1 if j > m − p,   else 1 − C(m − p, j) / C(m, j)
    expected rank of the first positive = g + (m + 1) / (p + 1)        (1-based)

With no ties (m = p = 1) these are the usual recall@k (a positive in the top k, "the way it is done in
CLIP-like papers") and rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _log_comb_ratio(m: torch.Tensor, p: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """log(C(m − p, j) / C(m, j)) for 0 < j <= m − p (float64 tensors)."""
    lg = torch.lgamma
    return lg(m - p + 1) - lg(m - p - j + 1) - lg(m + 1) + lg(m - j + 1)


def _tie_stats(scores: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query: (g, m, p) as float64 (see the module docstring). scores (Q, C) float, positives (Q, C) bool."""
    scores = scores.to(torch.float64)
    best = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    above = (scores > best).sum(dim=1)
    tied = scores == best
    return above.double(), tied.sum(dim=1).double(), (tied & positives).sum(dim=1).double()


def recall_at_k(g: torch.Tensor, m: torch.Tensor, p: torch.Tensor, k: int) -> torch.Tensor:
    """Expected recall@k per query from its tie statistics (float64 (Q,))."""
    j = k - g
    out = torch.zeros_like(g)
    full = j > m - p
    partial = (j > 0) & ~full
    out[full] = 1.0
    out[partial] = 1.0 - torch.exp(_log_comb_ratio(m[partial], p[partial], j[partial]))
    return out


def ranking_metrics(scores: torch.Tensor, positives: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                    chunk: int = 1024) -> dict[str, torch.Tensor]:
    """Per-query expected recall@k for each k and expected rank of the first positive.

    scores (Q, C), positives (Q, C) bool with at least one positive per row. Returns {"recall@k": (Q,),
    "rank": (Q,)} float64, computed `chunk` query rows at a time (so Q × C never needs to exist at once
    beyond the caller's own matrix).
    """
    if scores.shape != positives.shape or scores.ndim != 2:
        raise ValueError(f"ranking_metrics: scores and positives must be (Q, C) of one shape, got "
                         f"{tuple(scores.shape)} and {tuple(positives.shape)}")
    if not bool(positives.any(dim=1).all()):
        raise ValueError("ranking_metrics: every query needs at least one positive")
    parts: dict[str, list[torch.Tensor]] = {f"recall@{k}": [] for k in ks} | {"rank": []}
    for start in range(0, scores.shape[0], chunk):
        g, m, p = _tie_stats(scores[start:start + chunk], positives[start:start + chunk])
        for k in ks:
            parts[f"recall@{k}"].append(recall_at_k(g, m, p, k))
        parts["rank"].append(g + (m + 1) / (p + 1))
    return {name: torch.cat(values) for name, values in parts.items()}


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Zero-shot retrieval with any number of texts per image, CLIP_benchmark metric names.

    image_features (N, D), text_features (T, D) (compared by dot product: pass normalized features),
    text_to_image int (T,): the image each text describes. Every image needs at least one text.
        image_retrieval_recall@k   text -> image queries (T queries over N images)
        text_retrieval_recall@k    image -> text queries (N queries over T texts; a hit is any of its texts)
    plus the mean and median expected rank of each direction (1-based, open_clip's mean/median rank).
    """
    num_images = image_features.shape[0]
    text_to_image = text_to_image.to(torch.int64)
    counts = torch.bincount(text_to_image, minlength=num_images)
    if counts.numel() != num_images or bool((counts == 0).any()):
        raise ValueError("retrieval_metrics: every image needs at least one text and every text an image")
    scores = text_features.float() @ image_features.float().T  # (T, N)
    positives = text_to_image[:, None] == torch.arange(num_images)[None, :]  # (T, N)
    t2i = ranking_metrics(scores, positives, ks)
    i2t = ranking_metrics(scores.T, positives.T, ks)
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = t2i[f"recall@{k}"].mean().item()
        metrics[f"text_retrieval_recall@{k}"] = i2t[f"recall@{k}"].mean().item()
    metrics |= {"image_retrieval_mean_rank": t2i["rank"].mean().item(),
                "image_retrieval_median_rank": t2i["rank"].median().item(),
                "text_retrieval_mean_rank": i2t["rank"].mean().item(),
                "text_retrieval_median_rank": i2t["rank"].median().item()}
    return metrics


def hard_negative_credit(positive: torch.Tensor, negatives: torch.Tensor, valid: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """Per item: 1 if the true caption outscores all its negatives, 1 / (1 + t) when it ties t of them and
    beats the rest (the expectation under random tie-breaking), else 0.

    positive (N,), negatives (N, K), valid (N, K) bool marks real negatives (items may have fewer than K).
    """
    valid = torch.ones_like(negatives, dtype=torch.bool) if valid is None else valid
    pos = positive.to(torch.float64)[:, None]
    neg = negatives.to(torch.float64)
    above = ((neg > pos) & valid).any(dim=1)
    ties = ((neg == pos) & valid).sum(dim=1).double()
    return torch.where(above, torch.zeros_like(ties), 1.0 / (1.0 + ties))


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
                           ) -> dict[str, float]:
    """acc1, acc5 and mean_per_class_recall (CLIP_benchmark names), all tie-aware.

    logits (N, C), labels int (N,). mean_per_class_recall averages the per-class mean top-1 credit over the
    classes present in `labels` (sklearn's balanced_accuracy_score without ties).
    """
    num_classes = logits.shape[1]
    labels = labels.to(torch.int64)
    positives = torch.nn.functional.one_hot(labels, num_classes).bool()
    ks = [k for k in ks if k <= num_classes] or [1]
    per_item = ranking_metrics(logits, positives, ks)
    metrics = {f"acc{k}": per_item[f"recall@{k}"].mean().item() for k in ks}
    top1 = per_item["recall@1"] if "recall@1" in per_item else ranking_metrics(logits, positives, (1,))["recall@1"]
    present = labels.unique()
    per_class = torch.stack([top1[labels == c].mean() for c in present])
    metrics["mean_per_class_recall"] = per_class.mean().item()
    return metrics
