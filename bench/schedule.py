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
budgets) and its uniform ones. The printed ratios are predictions, for bench/attention.py to check on a GPU.
"""

from __future__ import annotations

import argparse
import heapq
import math

from attention import mixed_workload, uniform_workload

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sms", type=int, default=132, help="streaming multiprocessors (H100 SXM: 132)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the mixed batches")
    parser.add_argument("--budgets", default="32768,16384", help="token budgets of the mixed batches")
    parser.add_argument("--prologue", type=float, default=3.0, help="per-program fixed cost, in loop steps")
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


if __name__ == "__main__":
    main()
