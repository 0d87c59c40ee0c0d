"""Stage 2's sequences: answer-only labels, placeholder counts, the task mix, truncation, box text."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from finevit.data.conversations import (
    IGNORE_INDEX,
    SPECIAL_TOKENS,
    TASKS,
    SequenceBuilder,
    box_iou,
    build_batch,
    format_box,
    global_caption_turn,
    grounding_turn,
    parse_box,
    prepare_tokenizer,
    region_caption_turn,
    sample_turns,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from finevit.data.text import save_tokenizer, train_tokenizer

    texts = ["a small dotted red star", "a large striped blue circle", "Describe the region.", "Locate: it.",
             "The image shows two shapes on a white background."] * 20
    directory = save_tokenizer(train_tokenizer(texts, vocab_size=300), tmp_path_factory.mktemp("tok"))
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(str(directory)))
    assert all(tok.convert_tokens_to_ids(t) not in (None, tok.unk_token_id) for t in SPECIAL_TOKENS.values())
    size = len(tok)
    assert len(prepare_tokenizer(tok)) == size  # added once
    tok.save_pretrained(tmp_path_factory.mktemp("saved"))
    assert len(AutoTokenizer.from_pretrained(str(tmp_path_factory.getbasetemp() / "saved0"))) == size  # stable
    return tok


def test_labels_cover_exactly_the_answers_and_their_end_tokens(tokenizer):
    builder = SequenceBuilder(tokenizer, max_length=200)
    turns = [region_caption_turn([0.1, 0.2, 0.5, 0.6], "a small dotted red star"),
             grounding_turn([0.1, 0.2, 0.5, 0.6], "a small dotted red star"),
             global_caption_turn("The image shows two shapes on a white background.")]
    ids, labels, tasks = builder.build(6, turns)
    assert ids.count(builder.image_token_id) == 6
    assert all(labels[i] == IGNORE_INDEX for i, t in enumerate(ids) if t == builder.image_token_id)
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in supervised)
    # The supervised spans, decoded, are the three answers, each closed by EOS; the task ids follow them.
    spans, current = [], [supervised[0]]
    for i in supervised[1:]:
        if i == current[-1] + 1:
            current.append(i)
        else:
            spans.append(current)
            current = [i]
    spans.append(current)
    assert len(spans) == 3
    for span, turn in zip(spans, turns):
        assert ids[span[-1]] == tokenizer.eos_token_id
        decoded = tokenizer.decode([ids[i] for i in span[:-1]]).replace("|> ", "|>").strip()
        assert decoded == turn.answer.lower()  # this tokenizer lowercases
        assert {tasks[i] for i in span} == {TASKS.index(turn.task)}
    assert all(tasks[i] == -1 for i in range(len(ids)) if labels[i] == IGNORE_INDEX)


def test_batches_pad_with_ignored_labels_and_reserve_each_images_tokens(tokenizer):
    builder = SequenceBuilder(tokenizer, max_length=200)
    import torch

    regions = {"image_index": torch.tensor([0, 0, 2]), "boxes": torch.tensor([[0.1, 0.1, 0.3, 0.3]] * 3),
               "captions": ["a small dotted red star", "a large striped blue circle", "a small dotted red star"]}
    batch = build_batch(builder, [4, 1, 9], ["cap zero.", "cap one.", "cap two."], regions,
                        {"region_caption": 1, "grounding": 1, "global_caption": 1}, turns=3,
                        rng=np.random.default_rng(0))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert [int((row == builder.image_token_id).sum()) for row in ids] == [4, 1, 9]
    assert torch.all(labels[mask == 0] == IGNORE_INDEX) and torch.all(ids[mask == 0] == builder.pad_token_id)
    assert torch.all(batch["label_task"][labels == IGNORE_INDEX] == -1)
    # image 1 has no regions: its only turn is the dense caption
    assert set(batch["label_task"][1][labels[1] != IGNORE_INDEX].tolist()) == {TASKS.index("global_caption")}


def test_long_sequences_drop_later_turns_but_never_image_tokens(tokenizer):
    turns = [global_caption_turn("The image shows two shapes on a white background. " * 4),
             region_caption_turn([0, 0, 1, 1], "a small dotted red star")]
    builder = SequenceBuilder(tokenizer, max_length=40)
    ids, labels, _ = builder.build(10, turns)
    assert len(ids) == 40 and ids.count(builder.image_token_id) == 10
    assert ids[-1] != tokenizer.eos_token_id  # the only turn that fits was cut, not closed
    with pytest.raises(ValueError, match="max_length"):
        SequenceBuilder(tokenizer, max_length=20).build(30, turns)


def test_task_mix_and_region_use():
    rng = np.random.default_rng(0)
    boxes = np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], dtype=np.float32)
    counts = {t: 0 for t in TASKS}
    for _ in range(300):
        turns = sample_turns("dense.", boxes, ["r0", "r1"], {"region_caption": 3, "grounding": 1}, 4, rng)
        assert len(turns) == 2  # two regions, no global caption in this mix: two turns at most
        for turn in turns:
            counts[turn.task] += 1
    assert counts["global_caption"] == 0 and 2.0 < counts["region_caption"] / counts["grounding"] < 4.5
    only_regions = sample_turns("dense.", boxes[:0], [], {"grounding": 1}, 3, rng)
    assert [t.task for t in only_regions] == ["global_caption"]
    with pytest.raises(ValueError, match="positive weight"):
        sample_turns("dense.", boxes, ["r0", "r1"], {"grounding": 0}, 3, rng)


def test_box_text_round_trip_and_iou():
    assert format_box([0.1234, 0.5, 0.9999, 1.0]) == "(123,500),(999,999)"
    assert parse_box("<|box_start|>(123,500),(999,999)<|box_end|>") == [0.123, 0.5, 0.999, 0.999]
    assert parse_box("no box here") is None
    assert box_iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert box_iou([0, 0, 0.5, 1], [0.5, 0, 1, 1]) == 0.0
    assert box_iou([0, 0, 1, 1], [0, 0, 0.5, 1]) == pytest.approx(0.5)
