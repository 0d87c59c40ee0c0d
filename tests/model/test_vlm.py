"""Stage 2's model pieces: the position-based patch merger (odd grids, any packed order), placeholder insertion
and its count check, the loss against transformers' own, and cached greedy decoding against a plain loop."""

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from finevit.kernels.utils import cu_seqlens_from_lengths
from finevit.model import FineViT, FineViTConfig
from finevit.model.vlm import (
    PatchMerger,
    VisionLanguageModel,
    build_llm,
    forward_plan,
    insert_image_embeddings,
    merge_index,
    merged_token_counts,
    placeholder_index,
)

GRIDS = [(3, 5), (2, 2), (1, 1), (4, 3)]  # odd heights and widths, a single patch


def packed_positions(grids, shuffle: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    positions = []
    for h, w in grids:
        p = torch.cartesian_prod(torch.arange(h), torch.arange(w))
        positions.append(p[torch.randperm(len(p), generator=gen)] if shuffle else p)
    lengths = [h * w for h, w in grids]
    return torch.cat(positions).int(), cu_seqlens_from_lengths(lengths), torch.tensor(grids, dtype=torch.int32)


def reference_merge(features, positions, cu_seqlens, grids, m=2):
    """Float64 loop: for each image, each merged cell (r, c) concatenates patches (m·r + i, m·c + j) in (i, j)
    order, zeros where the grid has no such patch."""
    out = []
    for b, (h, w) in enumerate(grids):
        start, stop = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        by_pos = {tuple(positions[t].tolist()): features[t] for t in range(start, stop)}
        for r in range((h + m - 1) // m):
            for c in range((w + m - 1) // m):
                parts = [by_pos.get((m * r + i, m * c + j), torch.zeros(features.shape[1], dtype=features.dtype))
                         for i in range(m) for j in range(m)]
                out.append(torch.cat(parts))
    return torch.stack(out)


def test_merge_index_covers_every_patch_once_and_pads_odd_grids():
    positions, cu, grid = packed_positions(GRIDS)
    slots, tokens = merge_index(positions, cu, grid)
    assert tokens == sum(((h + 1) // 2) * ((w + 1) // 2) for h, w in GRIDS) == int(merged_token_counts(grid).sum())
    assert len(set(slots.tolist())) == positions.shape[0]  # no patch dropped or overwritten
    assert int(slots.max()) < tokens * 4


@pytest.mark.parametrize("shuffle", [False, True])
def test_merger_matches_the_float64_reference_in_any_packed_order(shuffle):
    torch.manual_seed(0)
    positions, cu, grid = packed_positions(GRIDS, shuffle=shuffle)
    features = torch.randn(positions.shape[0], 8, dtype=torch.float64)
    merger = PatchMerger(8, 12).double()
    merger.init_weights()
    out = merger(features, *merge_index(positions, cu, grid))
    normed = torch.nn.functional.layer_norm(features, (8,), merger.norm.weight, merger.norm.bias, merger.norm.eps)
    grouped = reference_merge(normed, positions, cu, GRIDS)
    expected = merger.fc2(torch.nn.functional.gelu(merger.fc1(grouped)))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_merge_index_rejects_a_grid_that_does_not_match_the_patch_count():
    positions, cu, grid = packed_positions([(2, 3)])
    with pytest.raises(ValueError, match="grid_hw"):
        merge_index(positions, cu, torch.tensor([[2, 2]]))


def test_placeholders_are_filled_in_reading_order_and_a_count_mismatch_is_an_error():
    embeds = torch.zeros(2, 5, 3)
    ids = torch.tensor([[1, 9, 9, 2, 0], [9, 3, 9, 9, 0]])
    image = torch.arange(15, dtype=torch.float32).view(5, 3) + 100
    out = insert_image_embeddings(embeds, image, placeholder_index(ids, 9, 5))
    rows = [(0, 1), (0, 2), (1, 0), (1, 2), (1, 3)]
    for k, (b, t) in enumerate(rows):
        assert torch.equal(out[b, t], image[k])
    assert torch.equal(out[ids != 9], torch.zeros(5, 3))
    with pytest.raises(ValueError, match="5 image placeholder tokens .* 4 image tokens"):
        placeholder_index(ids, 9, 4)


def tiny_vlm(vocab=64, image_token=60):
    torch.manual_seed(0)
    vision = FineViT(FineViTConfig.from_name("tiny", width=64, depth=1, num_heads=2, mlp_dim=64, patch_size=4))
    vision.init_weights()
    llm = build_llm(vocab, "qwen2", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "num_key_value_heads": 1}, eos_token_id=1,
                    pad_token_id=0)
    model = VisionLanguageModel(vision, llm, image_token_id=image_token)
    model.merger.init_weights()
    return model.eval()


def image_batch(grids, patch=4):
    positions, cu, grid = packed_positions(grids)
    patches = torch.randint(0, 256, (positions.shape[0], 3 * patch * patch), dtype=torch.uint8)
    return {"patches": patches, "positions": positions, "cu_seqlens": cu, "max_seqlen": max(h * w for h, w in grids),
            "grid_hw": grid}


def loss_batch():
    grids = [(3, 3), (2, 4)]  # 4 and 2 image tokens
    image = image_batch(grids)
    counts = merged_token_counts(image["grid_hw"]).tolist()
    rows = [[5] + [60] * counts[0] + [6, 7, 8, 9, 1], [5] + [60] * counts[1] + [10, 11, 1, 0, 0, 0, 0]]
    ids = torch.tensor(rows)
    mask = (torch.arange(ids.shape[1]) < torch.tensor([[10], [6]])).long()  # row 1 right-padded
    labels = torch.full_like(ids, -100)
    labels[0, 7:10] = ids[0, 7:10]  # the answer "8 9 <eos>"
    labels[1, 4:6] = ids[1, 4:6]  # "11 <eos>"
    return image, ids, mask, labels


def test_loss_matches_transformers_own_shifted_loss():
    model = tiny_vlm()
    image, ids, mask, labels = loss_batch()
    losses = model(image, ids, mask, labels)
    assert losses.shape == (5,)
    embeds = model.input_embeddings(model.image_embeddings(image), ids)
    expected = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-5, atol=1e-6)


def test_a_forward_plan_gives_the_same_losses_and_the_forward_then_computes_no_index(monkeypatch):
    """With a plan (stage 2 builds it from the loader's CPU tensors), the forward reads no value of its inputs:
    the functions that would (merge_index, placeholder_index, nonzero) are never called."""
    model = tiny_vlm()
    image, ids, mask, labels = loss_batch()
    plan = forward_plan(image, ids, mask, labels, image_token_id=60)
    assert plan.merged_tokens == 6 and plan.supervised.tolist() == [6, 7, 8, 10 + 3, 10 + 4] and plan.right_padded
    expected = model(image, ids, mask, labels)

    def fails(*args, **kwargs):
        raise AssertionError("the forward computed an index that the plan holds")

    for name in ("merge_index", "placeholder_index"):
        monkeypatch.setattr(f"finevit.model.vlm.{name}", fails)
    monkeypatch.setattr(torch, "nonzero", fails)
    torch.testing.assert_close(model(image, ids, mask, labels, plan=plan), expected, rtol=0, atol=0)


def test_a_left_padded_batch_keeps_its_mask_and_matches_transformers_own_loss():
    """Right padding is what lets the decoder go without a mask; left padding must keep it (the padding comes
    before the tokens there), and the losses then still match transformers' with the mask."""
    model = tiny_vlm()
    image, ids, mask, labels = loss_batch()
    shift = mask.shape[1] - mask.sum(1)  # pad row 1 on the left instead
    ids, mask, labels = (torch.stack([row.roll(int(n)) for row, n in zip(x, shift)]) for x in (ids, mask, labels))
    plan = forward_plan(image, ids, mask, labels, image_token_id=60)
    assert not plan.right_padded
    losses = model(image, ids, mask, labels, plan=plan)
    embeds = model.input_embeddings(model.image_embeddings(image), ids)
    expected = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    assert losses.shape == (5,)
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-5, atol=1e-6)
    # Without its mask the left-padded batch's losses change: the mask matters here.
    assert not torch.allclose(model(image, ids, None, labels, plan=plan).mean(), expected, rtol=1e-3)


class DeviceReads(TorchDispatchMode):
    """Records the ops that read a tensor's values back to the host (.item(), bool(), int(), nonzero): on a GPU
    each one waits for the device."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append("".join(traceback.format_stack(limit=6)[:-1]))
        return func(*args, **(kwargs or {}))


def test_the_forward_with_a_plan_reads_nothing_back_transformers_decoder_included():
    """On CPU, every op that would wait for a GPU is seen: none in the forward with a plan. Passing the right-padded
    batch's mask to transformers' decoder makes it read the mask twice (`_ignore_causal_mask_sdpa`), which the
    first assertion shows; the forward gives it no mask."""
    model = tiny_vlm()
    image, ids, mask, labels = loss_batch()
    plan = forward_plan(image, ids, mask, labels, image_token_id=60)
    embeds = model.input_embeddings(model.image_embeddings(image), ids)
    with DeviceReads() as probe:
        model.llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask)
    assert probe.reads, "transformers no longer reads the mask: this test needs another witness"
    with DeviceReads() as probe:
        model(image, ids, mask, labels, plan=plan)
    assert not probe.reads, "\n".join(probe.reads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_forward_with_a_plan_never_waits_for_the_device():
    model = tiny_vlm().cuda()
    image, ids, mask, labels = loss_batch()
    plan = forward_plan(image, ids, mask, labels, image_token_id=60).to("cuda")
    image = {k: v.cuda() if torch.is_tensor(v) else v for k, v in image.items()}
    ids, mask, labels = ids.cuda(), mask.cuda(), labels.cuda()
    model(image, ids, mask, labels, plan=plan)  # warm-up: lazy initialization may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(image, ids, mask, labels, plan=plan)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cached_left_padded_greedy_decoding_matches_a_plain_loop():
    model = tiny_vlm()
    image = image_batch([(4, 4), (2, 2)])
    embeds = model.image_embeddings(image)
    counts = merged_token_counts(image["grid_hw"]).tolist()
    prompts = [torch.tensor([5] + [60] * counts[0] + [6, 7]), torch.tensor([60] * counts[1] + [8])]
    answers = model.generate(embeds, prompts, max_new_tokens=6, eos_token_id=1, pad_token_id=0)
    chunks = torch.split(embeds, counts)
    for prompt, chunk, answer in zip(prompts, chunks, answers):
        ids = prompt[None]
        expected = []
        for _ in range(6):  # no cache, no padding: the whole sequence every step
            logits = model.llm(inputs_embeds=model.input_embeddings(chunk, ids)).logits
            token = int(logits[0, -1].argmax())
            if token == 1:
                break
            expected.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert answer == expected
