"""Cost model of the attention kernels' work order: how long a ragged grid takes when the GPU schedules it.

    python bench/schedule.py [--sms 132] [--seeds 0,1,2] [--budgets 32768,16384] [--prologue 3]

Each program of the forward and backward kernels owns one (sequence, block, head) and loops over its
sequence's blocks: it costs `prologue + cdiv(seqlen, BLOCK_N)` loop steps. The GPU starts programs in grid
order whenever one of its `sms × programs per SM` slots frees: a greedy list schedule. The kernel's time is
the schedule's makespan; the ideal is the total work spread evenly over the slots. Orders compared:
    packing   sequences in packing order, grid (items, heads): items fastest (the kernels before 2026-12-06)
    longest   the order of `attention._cu_blocks_kernel`: octave of length descending, ties in packing order,
              one flat axis with heads fastest (the kernels now)
Workloads: the mixed batches of bench/attention.py (its resolution distribution, several seeds and token
budgets) and its uniform ones. The printed ratios are predictions.

--measure (CUDA only, ~1 min) checks them: `varlen_attention` with RoPE, forward and forward + backward, bf16, on the
mixed batches at 12×64 and 16×72, timed with the kernels' work list and with the same list in packing order (heads
still fastest, the same autotuned tiles): measured packing / longest next to the model's (its "packing" order,
items fastest, is not the ablation's, which keeps heads fastest; the model's heads-fastest packing row lies between).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import math
from unittest import mock

import _harness as harness
import torch
from attention import finevit_fused, make_batch, mixed_workload, uniform_workload

from finevit.kernels import attention

# (name, BLOCK_M, BLOCK_N, programs per SM): the H100 forward tiles (bench/NOTES.md) and their occupancy.
TILES = (("fwd 128x64 8w", 128, 64, 1), ("fwd 64x64 4w", 64, 64, 2))
HEADS = (12, 16)


def dispatch_order(lengths: list[int]) -> list[int]:
    """Sequence indices in the order `_cu_blocks_kernel` lays them out: longest octave (bit length) first."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i].bit_length())


def program_costs(lengths: list[int], heads: int, block_m: int, block_n: int, prologue: float,
                  order: str) -> list[float]:
    """The cost of each program of the grid, in the order the GPU starts them."""
    sequences = dispatch_order(lengths) if order == "longest" else range(len(lengths))
    items = [prologue + math.ceil(lengths[i] / block_n)
             for i in sequences for _ in range(math.ceil(lengths[i] / block_m))]
    if order == "longest":
        return [cost for cost in items for _ in range(heads)]  # heads fastest
    return [cost for _ in range(heads) for cost in items]  # items fastest, then the next head


def makespan(costs: list[float], slots: int) -> float:
    """When the last program ends if each starts, in order, on the first slot to free up."""
    free_at = [0.0] * slots
    end = 0.0
    for cost in costs:
        done = heapq.heappop(free_at) + cost
        heapq.heappush(free_at, done)
        end = max(end, done)
    return end


def over_ideal(lengths: list[int], heads: int, tile: tuple, sms: int, prologue: float, order: str) -> float:
    """Makespan over the ideal (total cost / slots) for one workload, tile and order."""
    _, block_m, block_n, per_sm = tile
    costs = program_costs(lengths, heads, block_m, block_n, prologue, order)
    slots = sms * per_sm
    return makespan(costs, slots) / (sum(costs) / slots)


def packing_order_table(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """`attention._cu_blocks`'s table with the sequences in packing order (torch ops on the device, no host sync)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    sizes = 16 << torch.arange(len(attention.CU_BLOCK_SIZES), device=cu_seqlens.device)
    blocks = (lengths[None, :] + sizes[:, None] - 1) // sizes[:, None]
    rows = torch.cat([torch.zeros_like(blocks[:, :1]), blocks.cumsum(1)], dim=1)
    order = torch.arange(len(lengths) + 1, device=cu_seqlens.device)
    order[-1] = 0
    return torch.cat([rows, order[None]]).int()


def measure(workloads: list[tuple[str, object]], sms: int, prologue: float) -> None:
    """Time the kernels' order against packing order on a GPU (module doc) and print it beside the model."""
    device = torch.device("cuda")
    print(f"\nmeasured on {torch.cuda.get_device_name(device)}: ms with the kernels' order (longest first) and "
          "with packing order, their ratio, and the model's packing / longest for the 128x64 tile")
    print(f"{'workload':22s} {'heads':>5s} {'dim':>4s} {'mode':8s} {'longest':>8s} {'packing':>8s} {'measured':>9s} "
          f"{'model':>6s}")
    for name, workload in workloads:
        for heads, head_dim in ((12, 64), (16, 72)):
            b = make_batch(workload, heads, head_dim, torch.bfloat16, device)
            forward = finevit_fused(b)
            model = over_ideal(workload.lengths, heads, TILES[0], sms, prologue, "packing") / over_ideal(
                workload.lengths, heads, TILES[0], sms, prologue, "longest")
            for mode in ("fwd", "fwd+bwd"):
                step = harness.make_step(forward, mode)
                times = {}
                for order in ("longest", "packing"):
                    patch = (mock.patch.object(attention, "_cu_blocks", packing_order_table) if order == "packing"
                             else contextlib.nullcontext())
                    with patch:
                        times[order] = harness.time_fn(step, device, (b.q, b.k, b.v))["ms"]
                print(f"{name:22s} {heads:5d} {head_dim:4d} {mode:8s} {times['longest']:8.3f} {times['packing']:8.3f} "
                      f"{times['packing'] / times['longest']:9.3f} {model:6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sms", type=int, default=132, help="streaming multiprocessors (H100 SXM: 132)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the mixed batches")
    parser.add_argument("--budgets", default="32768,16384", help="token budgets of the mixed batches")
    parser.add_argument("--prologue", type=float, default=3.0, help="per-program fixed cost, in loop steps")
    parser.add_argument("--measure", action="store_true", help="also time both orders on this CUDA device")
    args = parser.parse_args()

    workloads = [(f"mixed {budget // 1024}k seed {seed}", mixed_workload(budget=budget, seed=seed))
                 for budget in map(int, args.budgets.split(",")) for seed in map(int, args.seeds.split(","))]
    workloads += [(f"uniform {patches}", uniform_workload(patches)) for patches in (256, 1024, 4096)]
    print(f"makespan / ideal on {args.sms} SMs, prologue {args.prologue:g} loop steps; "
          "speedup = packing / longest")
    print(f"{'workload':22s} {'images':>6s} {'heads':>5s} {'tile':15s} {'packing':>8s} {'longest':>8s} {'speedup':>8s}")
    for name, workload in workloads:
        lengths = workload.lengths
        for heads in HEADS:
            for tile in TILES:
                packing, longest = (over_ideal(lengths, heads, tile, args.sms, args.prologue, order)
                                    for order in ("packing", "longest"))
                print(f"{name:22s} {len(lengths):6d} {heads:5d} {tile[0]:15s} {packing:8.3f} {longest:8.3f} "
                      f"{packing / longest:8.3f}")
    if args.measure:
        if not torch.cuda.is_available():
            raise SystemExit("--measure needs a CUDA device")
        measure([(name, w) for name, w in workloads if name.startswith("mixed")], args.sms, args.prologue)


if __name__ == "__main__":
    main()
