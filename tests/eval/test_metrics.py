"""Ranking metrics against hand-computed cases: perfect and constant models, ties, several captions per image."""

from __future__ import annotations

import math

import pytest
import torch

from finevit.eval.metrics import classification_metrics, hard_negative_credit, ranking_metrics, retrieval_metrics


def test_a_perfect_model_scores_recall_one_and_rank_one():
    features = torch.eye(5)
    metrics = retrieval_metrics(features, features, torch.arange(5))
    for k in (1, 5, 10):
        assert metrics[f"image_retrieval_recall@{k}"] == metrics[f"text_retrieval_recall@{k}"] == 1.0
    assert metrics["image_retrieval_mean_rank"] == metrics["text_retrieval_median_rank"] == 1.0


def test_a_constant_model_scores_chance():
    """One caption per image among N = 10: recall@k = k / N, expected rank (N + 1) / 2. With two captions per
    image, image->text recall@k = 1 − C(T − 2, k) / C(T, k) over T = 20 texts, rank (T + 1) / 3."""
    n = 10
    images, texts = torch.ones(n, 4), torch.ones(n, 4)
    metrics = retrieval_metrics(images, texts, torch.arange(n))
    for k in (1, 5, 10):
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(min(k, n) / n)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(min(k, n) / n)
    assert metrics["image_retrieval_mean_rank"] == pytest.approx((n + 1) / 2)
    two = retrieval_metrics(images, torch.ones(2 * n, 4), torch.arange(n).repeat_interleave(2))
    t = 2 * n
    for k in (1, 5, 10):
        assert two[f"text_retrieval_recall@{k}"] == pytest.approx(1 - math.comb(t - 2, k) / math.comb(t, k))
    assert two["text_retrieval_mean_rank"] == pytest.approx((t + 1) / 3)


def test_hand_computed_scores_with_two_captions_per_image():
    # 3 images, texts 0,1 -> image 0, text 2 -> image 1, text 3 -> image 2. scores[t, i] = text_t · image_i.
    scores = torch.tensor([[0.9, 0.1, 0.0],    # t0: image 0 first              -> rank 1
                           [0.2, 0.8, 0.1],    # t1: image 0 second             -> rank 2
                           [0.3, 0.2, 0.1],    # t2: image 1 second             -> rank 2
                           [0.5, 0.6, 0.4]])   # t3: image 2 third              -> rank 3
    images = torch.eye(3)
    texts = scores  # text features · identity image features = the score rows
    m = retrieval_metrics(images, texts, torch.tensor([0, 0, 1, 2]), ks=(1, 2))
    assert m["image_retrieval_recall@1"] == pytest.approx(1 / 4)
    assert m["image_retrieval_recall@2"] == pytest.approx(3 / 4)
    assert m["image_retrieval_mean_rank"] == pytest.approx((1 + 2 + 2 + 3) / 4)
    # image -> text: image 0 ranks t0 (0.9) first: hit. Image 1 ranks t1 (0.8) > t3 (0.6) > t2 (0.2): its
    # text t2 is third. Image 2 ranks t3 (0.4) first: hit.
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert m["text_retrieval_mean_rank"] == pytest.approx((1 + 3 + 1) / 3)


def test_ties_are_broken_in_expectation():
    # The positive ties with one negative for first place: recall@1 = 1/2, rank 1.5; a tie of the positive
    # with two negatives behind one better negative: recall@2 = 1/3, recall@3 = 2/3, rank 2 + (3 + 1)/2 − 1.
    scores = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.9, 0.5, 0.5, 0.5]])
    positives = torch.tensor([[True, False, False, False], [False, True, False, False]])
    out = ranking_metrics(scores, positives, ks=(1, 2, 3))
    assert out["recall@1"].tolist() == pytest.approx([0.5, 0.0])
    assert out["recall@2"].tolist() == pytest.approx([1.0, 1 / 3])
    assert out["recall@3"].tolist() == pytest.approx([1.0, 2 / 3])
    assert out["rank"].tolist() == pytest.approx([1.5, 3.0])
    # Two positives in a tie group of four, first place: P(a positive in the first slot) = 1/2, in two = 5/6.
    two = ranking_metrics(torch.zeros(1, 4), torch.tensor([[True, True, False, False]]), ks=(1, 2))
    assert two["recall@1"].item() == pytest.approx(0.5) and two["recall@2"].item() == pytest.approx(5 / 6)
    assert two["rank"].item() == pytest.approx(5 / 3)


def test_chunked_computation_equals_one_pass_and_inputs_are_checked():
    torch.manual_seed(0)
    scores = torch.randn(50, 30).round(decimals=1)  # rounding creates ties
    positives = torch.zeros(50, 30, dtype=torch.bool)
    positives[torch.arange(50), torch.randint(0, 30, (50,))] = True
    whole, chunked = ranking_metrics(scores, positives, chunk=1024), ranking_metrics(scores, positives, chunk=7)
    for key in whole:
        torch.testing.assert_close(whole[key], chunked[key])
    with pytest.raises(ValueError, match="at least one positive"):
        ranking_metrics(scores, torch.zeros_like(positives))
    with pytest.raises(ValueError, match="every image needs"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]))


def test_hard_negative_credit():
    positive = torch.tensor([0.9, 0.5, 0.5, 0.2, 0.3])
    negatives = torch.tensor([[0.1, 0.2], [0.6, 0.1], [0.5, 0.1], [0.2, 0.2], [0.9, -1.0]])
    valid = torch.tensor([[True, True], [True, True], [True, True], [True, True], [False, True]])
    # beats both; loses to one; ties one; ties two; the better negative is padding (invalid)
    assert hard_negative_credit(positive, negatives, valid).tolist() == pytest.approx([1, 0, 0.5, 1 / 3, 1])
    constant = hard_negative_credit(torch.zeros(4), torch.zeros(4, 6))
    assert constant.tolist() == pytest.approx([1 / 7] * 4)  # chance for 6 negatives


def test_classification_metrics_hand_computed():
    logits = torch.tensor([[0.9, 0.1, 0.0],   # label 0: correct
                           [0.8, 0.1, 0.1],   # label 0: correct
                           [0.7, 0.2, 0.1],   # label 0: correct
                           [0.6, 0.3, 0.1],   # label 1: wrong (second)
                           [0.1, 0.1, 0.8]])  # label 2: correct
    labels = torch.tensor([0, 0, 0, 1, 2])
    m = classification_metrics(logits, labels, ks=(1, 2))
    assert m["acc1"] == pytest.approx(4 / 5) and m["acc2"] == pytest.approx(1.0)
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 1) / 3)
    constant = classification_metrics(torch.zeros(6, 4), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert constant["acc1"] == pytest.approx(0.25) and "acc5" not in constant  # 4 classes: no top-5
    assert constant["mean_per_class_recall"] == pytest.approx(0.25)
