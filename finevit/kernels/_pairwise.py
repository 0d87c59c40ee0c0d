"""Shared pieces of the tiled contrastive losses (`siglip_loss.py`, `clip_loss.py`).

Both losses are sums over the pairs (i, j) of a function of the logit z_ij = s·a_i·b_j (+ bias), where a
are the local rows and b the other side's rows. The forward never holds more than a (BLOCK_A, BLOCK_B)
logit tile (`_dot_tile`). The gradients are two matrix products with the logit gradient G = ∂L/∂(a·bᵀ):
    d_a = G @ b,   d_b = Gᵀ @ a,
so `contrastive_gradients` computes G one chunk of rows at a time (a loss-specific Triton kernel that
recomputes the logits and writes G in the features' dtype, at most `CHUNK_BYTES` of it) and feeds each chunk
to a tensor-core GEMM (`_matmul_kernel`, fp32 accumulation). The chunk's rows of d_a are finished by one
GEMM; d_b is accumulated in float32 across chunks, read and written once per chunk (not once per tile,
which made the previous design's backward slower than a naive loss). Where that float32 d_b would not fit
the working-memory budget (B = 1M pairs), one process finishes d_b by a second pass over b's rows instead
(`two_pass`). Small GEMMs split K (`matmul_splits`). Deterministic: no atomics.
The cost model is in bench/NOTES.md (2026-12-06, the loss gradient as GEMM work).

Features may have any width D >= 1 (masked BLOCK_D chunks). The ring helpers move the other side's rows
around a process group so that no rank ever holds more than two shards, and gradients for those rows travel
back to their owner with them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import _dispatch
from ._autotune import autotune, configs
from ._dispatch import interpreting
from ._validation import FLOAT_DTYPES, check_tensor, fail

CHUNK_BYTES = 256 * 2**20  # the most logit-gradient memory one chunk may hold
MIN_CHUNK_ROWS = 1024  # fewer rows per chunk would make d_b's per-chunk float32 read-modify-write dominate
MAX_WORKING_BYTES = 2 * 2**30  # beyond this, one process computes d_b in a second pass (`two_pass`)
TWO_PASS_MIN_CHUNK_ROWS = 128  # with no float32 accumulator, a chunk need only be whole G tiles


def launch_options() -> dict:
    """Tile (owner rows, other rows, feature chunk) and warps of every logit kernel: the forward ones (one
    program per BLOCK_A rows, looping over the other side) and the logit-gradient ones (one program per tile
    of G, a 2D grid: a 1024-row chunk against 16k others is already 2048 programs).

    64 x 128 x 64 with 8 warps: the largest tile that compiles for sm_80 and sm_90 without register spills
    (ptxas, bf16/fp16/fp32); at 128 x 128 the SigLIP gradient's epilogue spills 384-720 B per thread on sm_90.
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
    """a_i · b_j for the (BLOCK_A, BLOCK_B) tile, float32, summed over D in BLOCK_D chunks. Row offsets in
    int64: 1M rows with a row stride above 2048 (a view of wider features) pass 2^31 elements."""
    a_rows = A + offs_a.to(tl.int64)[:, None] * stride_a
    b_rows = B + offs_b.to(tl.int64)[:, None] * stride_b
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for d in range(0, dim, BLOCK_D):
        offs_d = d + tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        a = tl.load(a_rows + offs_d[None, :], mask=mask_a[:, None] & mask_d[None, :], other=0.0)
        b = tl.load(b_rows + offs_d[None, :], mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _matmul_kernel(
    A, B, C,  # C (M, N) (+)= A (M, K) @ B (K, N); any strides for A and B, C's columns contiguous
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
    K_SPLIT, stride_cs,  # split-K: program (·, s) sums K range [s·K_SPLIT, (s+1)·K_SPLIT) into C + s·stride_cs
    ACCUMULATE: tl.constexpr,  # C is float32 and the product is added to it; otherwise C is overwritten
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M consecutive row tiles take turns over the column tiles, so the B
    # columns they share are read from L2 rather than HBM.
    pid, split = tl.program_id(0), tl.program_id(1)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
    pid_n = (pid % (GROUP_M * tiles_n)) // group_rows
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    k_start = split * K_SPLIT
    k_stop = min(K, k_start + K_SPLIT)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_start, k_stop, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_stop
        a = tl.load(A + offs_m[:, None] * stride_am + offs_k[None, :].to(tl.int64) * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(B + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    c_ptrs = C + split.to(tl.int64) * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0)
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), each without register spills or a shared-memory overflow on
# sm_80 and sm_90 (ptxas; 128 x 256 tiles spill, 4 warps on 128 x 128 spill); the autotuner keeps the
# fastest per (N, A's layout: G or its transpose).
_MATMUL_SHAPES = {
    False: [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 3)],
    True: [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 3)],  # fp32 operands: twice the bytes
}
# restore_value: with ACCUMULATE the kernel adds into C, which the tuning runs must not do.
_matmul_tuned = {fp32: autotune(configs(["BLOCK_M", "BLOCK_N", "BLOCK_K"], shapes), key=["N", "stride_ak"],
                                restore_value=["C"])(_matmul_kernel) for fp32, shapes in _MATMUL_SHAPES.items()}
_MATMUL_INTERPRETER_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}


SPLIT_K_MIN = 4096  # the fewest K elements one split-K program sums (a multiple of every BLOCK_K)


def matmul_splits(m: int, n: int, k: int, device: torch.device) -> int:
    """Split-K factor of an (m, n, k) product: 1 where its 128 x 128 output tiles already give every SM about
    four programs; otherwise enough K splits for that (the d_own GEMM of a chunk is 2048 x 768 at B = 65,536:
    96 tiles on 132 SMs), each summing at least `SPLIT_K_MIN` of K. The interpreter (CPU) never splits."""
    if device.type != "cuda":
        return 1
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(m, 128) * triton.cdiv(n, 128)
    return max(1, min(triton.cdiv(programs, tiles), k // SPLIT_K_MIN))


@triton_op("finevit::contrastive_matmul", mutates_args=("c",))
def matmul_into(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool, splits: int) -> None:
    """c (+)= a @ b with float32 accumulation: a (M, K), b (K, N) in one 16- or 32-bit dtype, any strides
    (a transposed view costs nothing); c (M, N) with contiguous columns, float32 when `accumulate`. With
    `splits` > 1, programs sum `splits` ranges of K into float32 partials that one reduction adds up."""
    (m, k), n = a.shape, b.shape[1]
    if m == 0 or n == 0:
        return
    k_split = triton.cdiv(triton.cdiv(k, splits), SPLIT_K_MIN) * SPLIT_K_MIN if splits > 1 else max(k, 1)
    splits = triton.cdiv(k, k_split) if k else 1
    out = c if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=c.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), splits)

    _dispatch.launch(
        _matmul_tuned[a.dtype == torch.float32], _matmul_kernel, grid,
        a, b, out, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(-2),
        k_split, out.stride(0) if splits > 1 else 0,
        ACCUMULATE=accumulate and splits == 1, GROUP_M=8, interpreter_blocks=_MATMUL_INTERPRETER_BLOCKS,
    )
    if splits > 1:
        total = out.sum(0)
        if accumulate:
            c += total
        else:
            c.copy_(total)


@matmul_into.register_fake
def _(a, b, c, accumulate, splits):
    return None


def matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool) -> None:
    """`matmul_into` with the split-K factor of `matmul_splits`."""
    matmul_into(a, b, c, accumulate, matmul_splits(a.shape[0], b.shape[1], a.shape[1], a.device))


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


def chunk_rows(rows: int, other_rows: int, itemsize: int, min_rows: int | None = None) -> int:
    """Rows of the local side per logit-gradient chunk: as many as `CHUNK_BYTES` of G holds, at least
    `min_rows` (one pass: `MIN_CHUNK_ROWS`, so d_b's float32 read-modify-write stays a small part of each
    chunk's GEMM), at most `rows`; a multiple of 128 (whole G tiles) unless it is all the rows."""
    fit = CHUNK_BYTES // max(1, other_rows * itemsize)
    return min(rows, max(MIN_CHUNK_ROWS if min_rows is None else min_rows, fit // 128 * 128))


def _one_pass_bytes(rows: int, other_rows: int, dim: int, itemsize: int) -> int:
    """One pass's working memory: a G chunk and the float32 d_b."""
    return chunk_rows(rows, other_rows, itemsize) * other_rows * itemsize + other_rows * dim * 4


def two_pass(rows: int, other_rows: int, dim: int, itemsize: int) -> bool:
    """Whether one process computes d_b in a second pass of its own (`contrastive_gradients`): when one pass's
    working memory would exceed `MAX_WORKING_BYTES` (B = 1,048,576, D = 768: 2.1 + 3.2 GB)."""
    return _one_pass_bytes(rows, other_rows, dim, itemsize) > MAX_WORKING_BYTES


def working_bytes(rows: int, other_rows: int, dim: int, itemsize: int) -> int:
    """Memory one process's `contrastive_gradients` allocates besides the d_a and d_b it returns (the
    split-K partials aside: at most 4 programs per SM × a 128 x 128 float32 tile)."""
    if two_pass(rows, other_rows, dim, itemsize):  # one G chunk at a time: the larger of the two passes'
        return max(chunk_rows(n, m, itemsize, TWO_PASS_MIN_CHUNK_ROWS) * m * itemsize
                   for n, m in ((rows, other_rows), (other_rows, rows)))
    return _one_pass_bytes(rows, other_rows, dim, itemsize)


def _finished_rows(own: torch.Tensor, other: torch.Tensor, logit_grad, swapped: bool) -> torch.Tensor:
    """G @ other for every row of `own` in own's dtype, one chunk of rows at a time, each chunk's rows
    finished by one (split-K) GEMM over all of `other`: no float32 accumulator."""
    rows, other_rows = own.shape[0], other.shape[0]
    chunk = chunk_rows(rows, other_rows, own.element_size(), TWO_PASS_MIN_CHUNK_ROWS)
    buffer = own.new_empty((chunk, other_rows))
    d_own = torch.empty_like(own)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        g = buffer[: stop - start]
        logit_grad(start, stop, other, 0, g, swapped)
        matmul(g, other, d_own[start:stop], False)
    return d_own


def contrastive_gradients(ring: Ring | None, own: torch.Tensor, other: torch.Tensor, logit_grad
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_own, d_other) = (G @ other, Gᵀ @ own) over every shard of `other` on the ring, G = ∂L/∂(own·otherᵀ).

    logit_grad(start, stop, shard, owner, g, swapped) writes G for own rows [start, stop) against `shard`
    (the rows of group rank `owner`) into g, a (stop − start, shard rows) tensor of own's dtype, already
    multiplied by the logit scale; with `swapped` (one process only) it writes Gᵀ instead: other's rows
    [start, stop) against all of own (both losses' G is symmetric in the roles of the two sides once the
    per-row statistics swap too), and adds nothing to the loss's sums.

    One pass: each chunk's rows of d_own are finished by one GEMM, d_other is accumulated in float32 across
    chunks. Where that accumulator and a chunk would not fit `MAX_WORKING_BYTES` (`two_pass`), one process
    recomputes G by other's rows in a second pass and finishes d_other chunk by chunk too: one more logits
    pass (8·B²·D computed instead of 6·B²·D), and a single G chunk of memory. Without a ring the gradients
    come back in own's dtype; with one, both are float32 (d_own sums every shard, d_other every rank's
    contribution).
    """
    rows = own.shape[0]
    single = ring is None
    if single and two_pass(rows, other.shape[0], own.shape[1], own.element_size()):
        return _finished_rows(own, other, logit_grad, False), _finished_rows(other, own, logit_grad, True)
    d_own = torch.empty_like(own) if single else torch.zeros(own.shape, dtype=torch.float32, device=own.device)
    buffers: dict[tuple[int, int], torch.Tensor] = {}

    def compute(shard, owner, d_shard):
        chunk = chunk_rows(rows, shard.shape[0], own.element_size())
        key = (chunk, shard.shape[0])
        if key not in buffers:
            buffers.clear()
            buffers[key] = own.new_empty(key)
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            g = buffers[key][: stop - start]
            logit_grad(start, stop, shard, owner, g, False)
            matmul(g, shard, d_own[start:stop], not single)
            matmul(g.T, own[start:stop], d_shard, True)

    d_other = ring_backward(ring, other, compute)
    return d_own, d_other
