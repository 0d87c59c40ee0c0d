"""The losses with a process group (2 and 3 gloo processes on CPU), reference and Triton (interpreter) paths.

Checks, for SigLIP and CLIP: each rank's loss and its local feature gradients equal open_clip's
`SigLipLoss(rank, world_size)` / `ClipLoss(local_loss=True, gather_with_grad=True, ...)` on the same
shards; with unequal shards (token-budget batches), they equal a single-process computation over the
full batch; and the data-parallel average of logit_scale / logit_bias gradients equals the
single-process gradient of the mean per-rank loss (no W× error).
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import finevit.kernels as K


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch(sizes, dim=24):
    g = torch.Generator().manual_seed(1234)
    total = sum(sizes)
    img = F.normalize(torch.randn(total, dim, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(total, dim, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def per_rank_losses_single_process(loss, img, txt, scale, bias, sizes):
    """Each rank's loss (its rows against the whole batch), computed explicitly in one process."""
    z = scale * img @ txt.T + (bias if loss == "siglip" else 0)  # (B, B)
    losses, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        if loss == "siglip":
            labels = -torch.ones_like(z[rows])
            labels[:, rows] += 2 * torch.eye(n, dtype=z.dtype)
            losses.append(-F.logsigmoid(labels * z[rows]).sum() / n)
        else:
            targets = torch.arange(start, start + n)
            losses.append((F.cross_entropy(z[rows], targets) + F.cross_entropy(z.T[rows], targets)) / 2)
        start += n
    return losses


def _worker(rank, world_size, port, sizes, use_open_clip, kernels):
    os.environ["FINEVIT_KERNELS"] = kernels
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for loss in ("siglip", "clip"):
            check_rank(rank, world_size, loss, sizes, use_open_clip)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_rank(rank, world_size, loss, sizes, use_open_clip):
    img, txt = global_batch(sizes)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])

    def leaf(x):
        return x.clone().requires_grad_()

    scale0, bias0 = torch.tensor(11.0, dtype=torch.float64), torch.tensor(-7.0, dtype=torch.float64)
    low = torch.float32 if os.environ["FINEVIT_KERNELS"] == "triton" else torch.float64
    local = [leaf(x.to(low)) for x in (img[rows], txt[rows], scale0, bias0)]
    if loss == "siglip":
        ours = K.siglip_loss(*local, group=dist.group.WORLD)
    else:
        ours = K.clip_loss(*local[:3], group=dist.group.WORLD)
    ours.backward()
    grads = [t.grad.double() if t.grad is not None else torch.zeros_like(t, dtype=torch.float64) for t in local]
    # float64 on the reference path: rounding only; the Triton path runs in float32 (the interpreter).
    rtol, atol = (1e-9, 1e-12) if low == torch.float64 else (1e-5, 1e-5)

    if use_open_clip:  # equal shards: open_clip's own distributed losses on the same data
        from open_clip.loss import ClipLoss, SigLipLoss

        theirs_in = [leaf(img[rows]), leaf(txt[rows]), leaf(scale0), leaf(bias0)]
        if loss == "siglip":
            theirs = SigLipLoss(rank=rank, world_size=world_size)(*theirs_in)
        else:
            theirs = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)(*theirs_in[:3])
        theirs.backward()
        torch.testing.assert_close(ours.double(), theirs, rtol=rtol, atol=atol)
        for got, want in zip(grads[:3], theirs_in[:3]):
            torch.testing.assert_close(got, want.grad, rtol=rtol, atol=atol)

    # Single process over the full batch: the same per-rank loss; feature grads of the summed
    # per-rank losses; scalar grads of their mean after the data-parallel average.
    full = [leaf(img), leaf(txt), leaf(scale0), leaf(bias0)]
    losses = per_rank_losses_single_process(loss, *full, sizes)
    torch.testing.assert_close(ours.double(), losses[rank], rtol=rtol, atol=atol)
    feature_grads = torch.autograd.grad(sum(losses), full[:2], retain_graph=True)
    torch.testing.assert_close(grads[0], feature_grads[0][rows], rtol=rtol, atol=atol)
    torch.testing.assert_close(grads[1], feature_grads[1][rows], rtol=rtol, atol=atol)
    scalar_grads = torch.autograd.grad(sum(losses) / world_size, full[2:], allow_unused=True)
    for got, want in zip(grads[2:], scalar_grads):
        dist.all_reduce(got)  # what data parallelism does to parameter gradients: the average
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got / world_size, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "kernels, sizes, use_open_clip",
    [("reference", [5, 5], True), ("reference", [6, 3], False), ("triton", [5, 5], True), ("triton", [6, 1, 3], False)],
    ids=["reference-equal", "reference-unequal", "triton-equal", "triton-3-ranks-unequal"],
)
def test_distributed_loss_matches_open_clip_and_the_full_batch(kernels, sizes, use_open_clip, monkeypatch):
    # gloo on CPU tensors: the Triton path runs in the interpreter, on GPU machines too (the spawned workers
    # inherit the variable before they import triton); the compiled loss kernels have their own GPU tests.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    world_size = len(sizes)
    mp.spawn(_worker, args=(world_size, free_port(), sizes, use_open_clip, kernels), nprocs=world_size, join=True)
