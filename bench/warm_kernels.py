"""Fill Triton's compile (and autotune) caches for the GPU tests: every kernel forward + backward once per dtype.

    python bench/warm_kernels.py [--device cuda|cpu] [--dtypes bf16,fp16,fp32]
    FINEVIT_BENCH_WARMUP=k/n python bench/warm_kernels.py      # shard k of n of the cases (bench/gpu_check.sh)

bench/gpu_check.sh starts a few of these processes in parallel, beside the benches' own warm-up shards, before
the GPU pytest run: a kernel's compiled binary depends on its constexprs (head dim, rotary layout, dtype, tile
config) and on which integer arguments are divisible by 16, so the cases below repeat the main shapes of
tests/kernels (attention: lengths 1, 2, 17, 40 with 2 heads at head dims 32-128, with and without RoPE, and the backward
with atomics in fp16/bf16; RoPE;
patch embedding on uint8 and float patches, P 14 and 16; both losses at B x D from 1 x 16 to 17 x 1152). On GPU
autotuning compiles every candidate config of a launch, so one call per case compiles all of them; the tests
then load them from the on-disk cache. Calls go through the public ops with FINEVIT_KERNELS=triton.

Cases run one after the other; a failing case prints its error and the run goes on (exit 1 at the end). With
--device cpu (Triton's interpreter, set up as bench/attention_repro.py does; fp32 and fp16 only) there is no
cache to fill: a handful of tiny cases check the script itself (bench/gpu_check.sh's CPU mode).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_repro import DTYPE_NAMES, select_triton_path  # noqa: E402  (imports neither torch nor triton)

ATTENTION_HEAD_DIMS = (32, 64, 72, 80, 88, 96, 128)  # tests/kernels/test_attention_kernel.py HEAD_DIMS
ATTENTION_LENGTHS = (1, 2, 17, 40)
ATOMIC_HEAD_DIMS = (32, 64, 72, 80, 88, 128)  # test_non_deterministic_backward_matches_reference, attention_repro.py
ROPE_SHAPES = ((17, 2, 72, 72), (129, 3, 80, 80), (17, 3, 88, 88), (129, 2, 128, 128), (17, 2, 88, 40))
PATCH_SHAPES = ((3, 14), (1, 14), (3, 16), (1, 16))  # (channels, patch)
LOSS_SHAPES = ((1, 16), (7, 64), (129, 96), (33, 768), (17, 1152))
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def cases(device: str, dtypes: list[str]) -> list[tuple]:
    """(op, dtype, shape) of every warm-up call; attention first, the most expensive compiles."""
    if device == "cpu":  # the script's self-check: one tiny call per op
        return [("attention", d, (64, True, True)) for d in dtypes] + [("attention", dtypes[0], (64, True, False))] + [
            ("rope", dtypes[0], (17, 2, 72, 72)), ("patch_embed", dtypes[0], (3, 16, True, True)),
            ("siglip", dtypes[0], (7, 64)), ("clip", dtypes[0], (7, 64))]
    # fp32 attention first: its "ieee" kernels take the longest to compile (bench/NOTES.md: 5-15 s per config), and
    # shards take every n-th case, so each shard gets its share of them
    ordered = sorted(dtypes, key=lambda d: d != "fp32")
    found = [("attention", d, (h, rope, True)) for d in ordered for h in ATTENTION_HEAD_DIMS for rope in (False, True)]
    # the backward that adds dQ with atomics (deterministic=False): the dtypes training uses, for the kernel tests,
    # attention_repro.py and the benches
    found += [("attention", d, (h, rope, False)) for d in ordered if d != "fp32" for h in ATOMIC_HEAD_DIMS
              for rope in (False, True)]
    found += [("rope", d, s) for d in dtypes for s in ROPE_SHAPES]
    found += [("patch_embed", d, (c, p, uint8, bias)) for d in dtypes for c, p in PATCH_SHAPES
              for uint8 in (True, False) for bias in (True, False)]
    found += [(loss, d, s) for d in dtypes for loss in ("siglip", "clip") for s in LOSS_SHAPES]
    return found


def run(op: str, dtype, shape: tuple, device) -> None:
    """One forward + backward of `op` through finevit.kernels."""
    import torch
    import torch.nn.functional as F

    import finevit.kernels as K

    if op == "attention":
        head_dim, rope, deterministic = shape
        total = sum(ATTENTION_LENGTHS)
        q, k, v = (torch.randn(total, 2, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        cos = sin = None
        if rope:
            cos, sin = K.rope_2d_cos_sin(torch.randint(0, 64, (total, 2), device=device), head_dim)
        cu = K.cu_seqlens_from_lengths(list(ATTENTION_LENGTHS)).to(device)
        out = K.varlen_attention(q, k, v, cu, max(ATTENTION_LENGTHS), cos=cos, sin=sin, deterministic=deterministic)
    elif op == "rope":
        tokens, heads, head_dim, rotary = shape
        q = torch.randn(tokens, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
        cos, sin = K.rope_2d_cos_sin(torch.randint(0, 64, (tokens, 2), device=device), head_dim, rotary_dim=rotary)
        out = K.apply_rope(q, cos, sin)
    elif op == "patch_embed":
        channels, patch, uint8, with_bias = shape
        features, width, rows = channels * patch * patch, 40, 35
        weight = (torch.randn(width, features, device=device) * features**-0.5).to(dtype).requires_grad_()
        bias = torch.randn(width, device=device).to(dtype).requires_grad_() if with_bias else None
        if uint8:
            patches = torch.randint(0, 256, (rows, features), dtype=torch.uint8, device=device)
            out = K.patch_embed(patches, weight, bias, mean=CLIP_MEAN[:channels], std=CLIP_STD[:channels])
        else:
            patches = torch.randn(rows, features, device=device).to(dtype).requires_grad_()
            out = K.patch_embed(patches, weight, bias)
    else:
        batch, dim = shape
        img = F.normalize(torch.randn(batch, dim, device=device), dim=-1).to(dtype).requires_grad_()
        txt = F.normalize(torch.randn(batch, dim, device=device), dim=-1).to(dtype).requires_grad_()
        scale = torch.tensor(10.0, device=device, requires_grad=True)
        if op == "siglip":
            out = K.siglip_loss(img, txt, scale, torch.tensor(-10.0, device=device, requires_grad=True))
        else:
            out = K.clip_loss(img, txt, scale)
    out.backward(torch.randn_like(out))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default cuda when available")
    parser.add_argument("--dtypes", default=None, help="default bf16,fp16,fp32 on cuda, fp32,fp16 on cpu")
    args = parser.parse_args(argv)

    import torch  # does not import triton

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    dtypes = [d.strip() for d in (args.dtypes or ("bf16,fp16,fp32" if device == "cuda" else "fp32,fp16")).split(",")]
    if set(dtypes) - set(DTYPE_NAMES) or (device == "cpu" and "bf16" in dtypes):
        parser.error(f"--dtypes: choose from {','.join(DTYPE_NAMES)} (bf16 not on cpu: the interpreter cannot "
                     f"multiply bf16), got {','.join(dtypes)}")

    select_triton_path(device)
    import _harness as harness

    todo = harness.warmup_cases(cases(device, dtypes))
    shard = harness.warmup_shard()
    print(f"warming {len(todo)} kernel calls on {device}" + (f" (shard {shard[0]}/{shard[1]})" if shard else ""),
          flush=True)
    failures = 0
    for op, dtype_name, shape in todo:
        start = time.perf_counter()
        try:
            run(op, getattr(torch, DTYPE_NAMES[dtype_name]), shape, torch.device(device))
        except Exception as error:  # noqa: BLE001 - warm the rest; the tests will report this one properly
            failures += 1
            print(f"{op} {dtype_name} {shape}: FAILED {harness.error_reason(error)}", flush=True)
            continue
        print(f"{op} {dtype_name} {shape}: {time.perf_counter() - start:.1f} s", flush=True)
    print(f"done: {len(todo) - failures} ok, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
