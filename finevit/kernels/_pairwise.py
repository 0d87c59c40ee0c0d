"""Shared pieces of the tiled contrastive losses (`siglip_loss.py`, `clip_loss.py`).

Both losses are sums over the pairs (i, j) of a function of the logit z_ij = s·a_i·b_j (+ bias), where a
are the rows a program owns and b the rows it loops over. The Triton helpers below compute one logit tile
and add one tile's gradient into an owner's float32 accumulator; the ring helpers move the other side's
rows around a process group so that no rank ever holds more than two shards, and gradients for those
rows travel back to their owner with them.

Features may have any width D >= 1: the dot products loop over D in BLOCK_D chunks (masked), and the
owner's gradient (BLOCK_A, D) is accumulated in a float32 buffer in global memory, chunk by chunk, by the
one program that owns those rows (no atomics: deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import interpreting
from ._validation import FLOAT_DTYPES, check_tensor, fail


def launch_options() -> dict:
    """Tiles (owner rows, looped rows, feature chunk) and warps, passed to every launch.

    64 x 128 x 64 with 8 warps is the largest tile of the four loss kernels that compiles for sm_90 without
    register spills (ptxas report, bf16); a wider looped tile amortizes the owner's gradient read-modify-write.
    """
    if interpreting():  # the interpreter runs a tile as numpy arrays: fewer, larger tiles are faster
        return {"BLOCK_A": 64, "BLOCK_B": 64, "BLOCK_D": 64}
    return {"BLOCK_A": 64, "BLOCK_B": 128, "BLOCK_D": 64, "num_warps": 8}


def check_contrastive(op: str, img, txt, logit_scale, logit_bias, group) -> None:
    """The inputs of `siglip_loss` (with logit_bias) and `clip_loss` (logit_bias None)."""
    check_tensor(op, "img", img, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor(op, "txt", txt, ndim=2, dtypes=(img.dtype,), device=img.device, last_dim_contiguous=True)
    if txt.shape != img.shape:
        fail(op, f"txt must have img's shape {tuple(img.shape)} (B, D), got {tuple(txt.shape)}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        fail(op, f"img must hold at least one pair of at least one feature, got shape {tuple(img.shape)}")
    scalars = [("logit_scale", logit_scale)] + ([("logit_bias", logit_bias)] if op == "siglip_loss" else [])
    for name, t in scalars:
        check_tensor(op, name, t, dtypes=FLOAT_DTYPES, device=img.device)
        if t.numel() != 1:
            fail(op, f"{name} must hold one value, got shape {tuple(t.shape)}")
    if group is not None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            fail(op, "group was given but torch.distributed is not initialized", RuntimeError)
        if not isinstance(group, dist.ProcessGroup):
            fail(op, f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}",
                 TypeError)


@triton.jit
def _dot_tile(A, B, offs_a, offs_b, mask_a, mask_b, dim, stride_a, stride_b,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """a_i · b_j for the (BLOCK_A, BLOCK_B) tile, float32, summed over D in BLOCK_D chunks."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for d in range(0, dim, BLOCK_D):
        offs_d = d + tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        a = tl.load(A + offs_a[:, None] * stride_a + offs_d[None, :], mask=mask_a[:, None] & mask_d[None, :], other=0.0)
        b = tl.load(B + offs_b[:, None] * stride_b + offs_d[None, :], mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _accumulate_grad(DA, B, g, offs_a, offs_b, mask_a, mask_b, dim, stride_da, stride_b,
                     BLOCK_D: tl.constexpr):
    """DA[a, :] += g @ B[b, :] (DA float32, owned by this program; g in B's dtype)."""
    for d in range(0, dim, BLOCK_D):
        offs_d = d + tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        b = tl.load(B + offs_b[:, None] * stride_b + offs_d[None, :], mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        ptr = DA + offs_a[:, None] * stride_da + offs_d[None, :]
        mask = mask_a[:, None] & mask_d[None, :]
        tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + tl.dot(g, b), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Ring over a process group
# ----------------------------------------------------------------------------------------------------


class Ring:
    """The ranks of `group` in a ring: at step k rank r holds the other side's shard of rank (r − k) mod W.

    Shards may have different row counts (token-budget batches): the counts are exchanged once, at
    construction. `exchange(tensor, rows)` starts sending `tensor` to the next rank and receiving `rows`
    rows of the previous rank's into a fresh buffer, and returns a `wait()` that yields it, so that the
    caller computes while the transfer runs (`batch_isend_irecv`: works on gloo and nccl).
    """

    def __init__(self, group, rows: int, device: torch.device):
        import torch.distributed as dist

        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.size)]
        dist.all_gather(counts, torch.tensor([rows], device=device), group=group)
        self.rows = [int(c) for c in counts]
        self.offsets = [sum(self.rows[:r]) for r in range(self.size)]
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def owner(self, step: int) -> int:
        """Group rank whose shard this rank holds at `step`."""
        return (self.rank - step) % self.size

    def exchange(self, tensor: torch.Tensor, rows: int):
        import torch.distributed as dist

        buffer = tensor.new_empty((rows, *tensor.shape[1:]))
        requests = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor.contiguous(), self.next, self.group),
            dist.P2POp(dist.irecv, buffer, self.prev, self.group),
        ])

        def wait() -> torch.Tensor:
            for request in requests:
                request.wait()
            return buffer

        return wait


def ring_forward(ring: Ring | None, other: torch.Tensor, compute) -> None:
    """compute(shard, owner) for every shard of the other side: the local one first, the next one in flight."""
    if ring is None:
        compute(other, 0)
        return
    shard = other
    for step in range(ring.size):
        incoming = ring.exchange(shard, ring.rows[ring.owner(step + 1)]) if step < ring.size - 1 else None
        compute(shard, ring.owner(step))
        if incoming is not None:
            shard = incoming()


def ring_backward(ring: Ring | None, other: torch.Tensor, compute) -> torch.Tensor:
    """Gradient w.r.t. the local `other` rows summed over every rank's contribution.

    compute(shard, owner, d_shard) adds this rank's contribution for `shard` into the float32 d_shard.
    The contributions for a shard travel with it around the ring (a rank adds its own, then passes the
    sum on) and arrive back at the owner after W hops; each hop overlaps the next step's compute.
    """
    if ring is None:
        d_other = torch.zeros(other.shape, dtype=torch.float32, device=other.device)
        compute(other, 0, d_other)
        return d_other
    shard, travelling = other, None
    for step in range(ring.size):
        incoming = ring.exchange(shard, ring.rows[ring.owner(step + 1)]) if step < ring.size - 1 else None
        d_shard = torch.zeros(shard.shape, dtype=torch.float32, device=shard.device)
        compute(shard, ring.owner(step), d_shard)
        if travelling is not None:
            d_shard += travelling()  # what the previous ranks added for this shard
        travelling = ring.exchange(d_shard, ring.rows[ring.owner(step + 1)])
        if incoming is not None:
            shard = incoming()
    return travelling()  # after W hops: our own shard, with every rank's contribution
