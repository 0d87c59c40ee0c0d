"""An FSDP2 training step on 2 gloo processes equals one process stepping on the whole batch.

The distributed side is the trainer's own code (train/parallelize.py's parallelize + materialize,
train/stage1.py's forward_backward and clip_grad_norm_); the single-process side is written out here from
the definition: the step minimizes the mean per-image loss over all images of all micro-batches,

    J = Σ_a n_a · L_a / Σ_a n_a,   L_a = the loss of micro-batch a over its whole global batch (one process),

with each micro-batch's global batch split unequally between the ranks (token-budget batches hold different
numbers of images). Checked: the logged loss, every gradient, the clipped gradient norm and the parameters
after one AdamW step; and that the sharded initialization equals a one-process init with the same seed.
"""

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from finevit import kernels as K
from finevit.model import FineCLIP, FineCLIPConfig, FineViTConfig, TextConfig
from tests.model.helpers import make_image_batch, make_text_batch
from tests.train.helpers import REPO, free_port, host_reads

# Per micro-batch: (grids, text lengths) of each rank's images, in rank order (unequal shards).
MICRO_BATCHES = [
    [([(2, 3), (1, 1), (3, 2)], [5, 9, 3]), ([(4, 1)], [7])],
    [([(2, 2), (3, 3)], [4, 6]), ([(1, 2), (2, 1), (3, 1), (1, 1)], [3, 8, 2, 5])],
]


def small_config(loss: str) -> FineCLIPConfig:
    return FineCLIPConfig(vision=FineViTConfig.from_name("tiny", width=64, depth=2, num_heads=2, mlp_dim=96),
                          text=TextConfig.from_name("tiny", width=64, depth=2, num_heads=2, mlp_dim=96,
                                                    vocab_size=50),
                          embed_dim=32, loss=loss)


def make_micro_batches(config: FineCLIPConfig) -> list[list[dict]]:
    """[micro-batch][rank] -> {"image", "text"}, the same on every process."""
    torch.manual_seed(1234)
    return [[{"image": make_image_batch(grids, config.vision.patch_features),
              "text": make_text_batch(lengths, config.text.vocab_size)} for grids, lengths in per_rank]
            for per_rank in MICRO_BATCHES]


def concat(parts: list[dict]) -> dict:
    """The global batch of one micro-batch: the ranks' parts concatenated in rank order."""
    grids = [g for p in parts for g in p["image"]["grid_hw"].tolist()]
    text_lengths = [n for p in parts for n in (p["text"]["cu_seqlens"][1:] - p["text"]["cu_seqlens"][:-1]).tolist()]
    return {"image": {"patches": torch.cat([p["image"]["patches"] for p in parts]),
                      "positions": torch.cat([p["image"]["positions"] for p in parts]),
                      "cu_seqlens": K.cu_seqlens_from_lengths([h * w for h, w in grids]),
                      "max_seqlen": max(h * w for h, w in grids)},
            "text": {"input_ids": torch.cat([p["text"]["input_ids"] for p in parts]),
                     "cu_seqlens": K.cu_seqlens_from_lengths(text_lengths), "max_seqlen": max(text_lengths)}}


def _worker(rank: int, world_size: int, port: int):
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for loss_kind in ("siglip", "clip"):
            check_step(rank, world_size, loss_kind)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_step(rank: int, world_size: int, loss_kind: str):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from train.parallelize import ContrastiveModel, materialize, parallelize
    from train.stage1 import clip_grad_norm_, forward_backward

    config = small_config(loss_kind)
    mesh = init_device_mesh("cpu", (world_size,))
    with torch.device("meta"):
        model = parallelize(FineCLIP(config), mesh)
    materialize(model, lambda: ContrastiveModel(FineCLIP(config)), torch.device("cpu"), mesh, seed=7)

    # The one-process model, initialized as materialize does it on rank 0 (same seed, same RNG use).
    torch.manual_seed(7)
    ref = ContrastiveModel(FineCLIP(config))
    ref.init_weights()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(full[name], value, rtol=0, atol=0,
                                   msg=lambda m, name=name: f"init differs: {name}: {m}")

    batches = make_micro_batches(config)
    max_norm = 0.05  # small enough that clipping is active

    # FSDP2: the trainer's step. (eps: Adam's first step is g / (|g| + eps), a sign function of rounding
    # noise for gradients near 0 with the default 1e-8; a larger eps keeps the comparison meaningful.)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-4, weight_decay=0.1, foreach=True)
    with host_reads(forward_backward.__code__) as reads:  # on a GPU, each would wait for the previous step
        out = forward_backward(model, [mb[rank] for mb in batches], loss_kind, dist.group.WORLD)
    assert reads == [], reads
    loss_sum = out["loss_sum"].clone()
    dist.all_reduce(loss_sum)
    fsdp_loss = float(loss_sum / out["total_images"])
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    fsdp_norm = clip_grad_norm_(model.parameters(), max_norm)
    opt.step()

    # One process: J over the concatenated global batches, in float32 (same precision) and float64 (truth).
    def one_process_step(dtype):
        m = copy.deepcopy(ref).to(dtype)
        m_opt = torch.optim.AdamW(m.parameters(), lr=1e-2, eps=1e-4, weight_decay=0.1, foreach=True)
        total = sum(sum(len(p["image"]["grid_hw"]) for p in mb) for mb in batches)
        objective = 0.0
        for mb in batches:
            whole = concat(mb)
            img, txt, scale, bias = m(whole["image"], whole["text"])
            loss = (K.siglip_loss(img, txt, scale, bias) if loss_kind == "siglip" else K.clip_loss(img, txt, scale))
            objective = objective + loss * img.shape[0] / total
        objective.backward()
        m_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        norm = torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm)
        m_opt.step()
        return objective.item(), m_grads, float(norm), m.state_dict()

    loss32, grads32, norm32, params32 = one_process_step(torch.float32)
    loss64, grads64, norm64, params64 = one_process_step(torch.float64)

    assert fsdp_loss == pytest.approx(loss64, rel=1e-5)
    assert float(fsdp_norm) == pytest.approx(norm64, rel=1e-5)
    assert norm64 > max_norm  # the clipping did something
    # Tolerance by comparison: the FSDP2 result may differ from float64 by at most a few times what the
    # one-process float32 step differs by (reduction order across ranks differs; nothing else may).
    stepped = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    for what, ours, same_precision, truth in (("gradient", grads, grads32, grads64),
                                               ("parameter", stepped, params32, params64)):
        for name, exact in truth.items():
            error = (ours[name].double() - exact).abs().max().item()
            baseline = (same_precision[name].double() - exact).abs().max().item()
            floor = 1e-6 * exact.abs().max().item() + 1e-12
            assert error <= 4 * baseline + floor, (f"{loss_kind}: {what} {name}: error {error:.3g}, "
                                                   f"float32 one-process {baseline:.3g}")


def test_fsdp2_step_on_unequal_shards_with_accumulation_equals_the_single_process_step():
    """Both losses, in one pair of processes (SigLIP, then CLIP)."""
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)


def test_concat_keeps_rank_order():
    config = small_config("siglip")
    mb = make_micro_batches(config)[0]
    glob = concat(mb)
    assert glob["image"]["cu_seqlens"].tolist() == [0, 6, 7, 13, 17]
    assert torch.equal(glob["text"]["input_ids"][:17], mb[0]["text"]["input_ids"])
    assert os.environ.get("FINEVIT_KERNELS") == "reference"
