"""Small bf16 forward + backward of `finevit.kernels.varlen_attention` per head dim, checked against the
float64 reference, one line per case: the script bench/gpu_check.sh runs under compute-sanitizer (memcheck)
so that an illegal address is reported with its kernel, access and thread rather than as a sticky CUDA error.

    python bench/attention_repro.py [--head-dims 72,88] [--tokens 1000,777,1223] [--heads 4]

Exits 1 when a case's error is over 2x PyTorch's own bf16 error (the tests' rule), 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys

import torch

import finevit.kernels as K
from finevit.kernels import attention, reference


def run_case(lengths: list[int], heads: int, head_dim: int, rope: bool) -> tuple[float, float]:
    """(our max error, PyTorch bf16's max error) of out and dq/dk/dv against float64, relative to max |ref|."""
    total = sum(lengths)
    leaves = [torch.randn(total, heads, head_dim, device="cuda", dtype=torch.float64) for _ in range(3)]
    cu = K.cu_seqlens_from_lengths(lengths).cuda()
    cos = sin = None
    if rope:
        cos, sin = K.rope_2d_cos_sin(torch.randint(0, 64, (total, 2), device="cuda"), head_dim)
    grad = torch.randn(total, heads, head_dim, device="cuda", dtype=torch.float64)

    def outputs(fn, dtype):
        q, k, v = (x.to(dtype).requires_grad_() for x in leaves)
        out = fn(q, k, v, cu, max(lengths), cos=cos, sin=sin)
        out.backward(grad.to(dtype))
        return [out.detach().double(), q.grad.double(), k.grad.double(), v.grad.double()]

    ref = outputs(reference.varlen_attention, torch.float64)
    ours = outputs(attention.varlen_attention, torch.bfloat16)
    torch_bf16 = outputs(reference.varlen_attention, torch.bfloat16)
    torch.cuda.synchronize()

    def error(results):
        return max(((r - x).abs().max() / x.abs().max()).item() for r, x in zip(results, ref))

    return error(ours), error(torch_bf16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", default="64,72,80,88")
    parser.add_argument("--tokens", default="1000,777,1223", help="comma-separated sequence lengths")
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    torch.manual_seed(0)
    lengths = [int(n) for n in args.tokens.split(",")]
    failed = False
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        for rope in (False, True):
            ours, theirs = run_case(lengths, args.heads, head_dim, rope)
            ok = ours <= 2 * theirs + 1e-6
            failed |= not ok
            print(f"d{head_dim:<4} rope={rope!s:<5} max rel error {ours:.2e} (PyTorch bf16 {theirs:.2e}) "
                  f"{'ok' if ok else 'TOO LARGE'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
