"""Evaluation suite for two-tower models with FineCLIP's packed `encode_image` / `encode_text`:
zero-shot and long-caption retrieval, hard-negative accuracy, zero-shot classification, written as
CLIP_benchmark-compatible JSON. CLI: `python -m finevit.eval --help`."""

from .encode import EvalImages, embed_images, embed_texts
from .metrics import classification_metrics, hard_negative_credit, ranking_metrics, retrieval_metrics
from .tasks import (
                    TASKS,
                    TaskResult,
                    classification,
                    hard_negatives,
                    long_caption_retrieval,
                    retrieval,
                    write_result,
                    zeroshot_classifier,
)

__all__ = ["EvalImages", "embed_images", "embed_texts", "classification_metrics", "hard_negative_credit",
           "ranking_metrics", "retrieval_metrics", "TASKS", "TaskResult", "classification", "hard_negatives",
           "long_caption_retrieval", "retrieval", "write_result", "zeroshot_classifier"]
