"""Forward + backward of `finevit.kernels.varlen_attention` on its Triton kernels against float64, one line per case.

    python bench/attention_repro.py [--device cuda|cpu] [--dtypes bf16,fp16,fp32] [--head-dims 64,72,80,88,128]
                                    [--tokens 1000,777,1223] [--heads 4] [--backwards deterministic,atomic]
                                    [--json PATH] [--skew-scale F]

Cases: every head dim x (without, with 2D RoPE) x dtype x backward (`deterministic`, the default kernels, and
`atomic`, varlen_attention(deterministic=False): dQ added with atomics by the dK/dV kernel). Each case draws
float64 q, k, v and an output gradient, rounds them to the dtype, and runs the same rounded values three times:
our op (the public `finevit.kernels.varlen_attention` with FINEVIT_KERNELS=triton, so the Triton kernels run or the
script fails),
PyTorch's reference in the same dtype, and the reference in float64. Every run starts from fresh leaves. Errors:
max |x - x64| / max |x64| of out, dq, dk, dv. The rule is the kernel tests' (tests/kernels/comparisons.py): ours
<= 2x PyTorch's error for out and <= 3x for the gradients, plus 1e-6; a non-finite value anywhere fails. Outputs of
our kernels are allocated NaN-filled (as in the kernel tests), so an element a kernel never writes fails too.

Devices
    cuda (the default when available)  compiled kernels; dtypes default bf16; tokens 1000,777,1223, 4 heads.
                                       bench/gpu_check.sh runs it under compute-sanitizer's memcheck as well.
    cpu                                Triton's interpreter: TRITON_INTERPRET=1 is set before triton is imported
                                       (the script refuses if triton was imported without it); fp16 and fp32
                                       only, since the interpreter cannot multiply bf16; defaults fp32,fp16,
                                       tokens 33,17,64, 2 heads.

Output: a header, one line per case (head dim, rope, dtype, our errors, PyTorch's, ok / TOO LARGE), and with
--json the same rows as JSON (plus the device, versions and options). Exits 1 when any case is too large, 2 on a
usage error. `--skew-scale F` (a self-test) runs our kernel with softmax_scale = F / sqrt(head_dim) while the
references keep 1 / sqrt(head_dim): a genuinely different attention, which the check must report as TOO LARGE.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TENSORS = ("out", "dq", "dk", "dv")
FACTORS = {"out": 2.0, "dq": 3.0, "dk": 3.0, "dv": 3.0}  # the kernel tests' factors
FLOOR = 1e-6
BACKWARDS = {"deterministic": True, "atomic": False}  # --backwards name -> varlen_attention(deterministic=...)
DEFAULTS = {
    "cuda": {"dtypes": "bf16", "tokens": "1000,777,1223", "heads": 4},
    "cpu": {"dtypes": "fp32,fp16", "tokens": "33,17,64", "heads": 2},
}


def _ints(text: str, name: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"{name} must be comma-separated integers, got {text!r}")
    if not values:
        parser.error(f"{name} is empty")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="cuda (default when available) or cpu (Triton's interpreter)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated of bf16, fp16, fp32 (default bf16 on cuda, fp32,fp16 on cpu; "
                             "bf16 is refused on cpu)")
    parser.add_argument("--head-dims", default="64,72,80,88,128")
    parser.add_argument("--tokens", default=None,
                        help="comma-separated sequence lengths (default 1000,777,1223 on cuda, 33,17,64 on cpu)")
    parser.add_argument("--heads", type=int, default=None, help="default 4 on cuda, 2 on cpu")
    parser.add_argument("--backwards", default="deterministic,atomic",
                        help="comma-separated of deterministic (two kernels, the default) and atomic "
                             "(deterministic=False: dQ added with atomics)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--skew-scale", type=float, default=None, metavar="F",
                        help="self-test: our kernel runs with softmax_scale F/sqrt(head_dim), the references with "
                             "1/sqrt(head_dim), so every case must come out TOO LARGE")
    args = parser.parse_args(argv)

    import torch  # does not import triton

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use --device cpu for Triton's interpreter)")
    defaults = DEFAULTS[args.device]
    names = [d.strip() for d in (args.dtypes or defaults["dtypes"]).split(",") if d.strip()]
    unknown = [d for d in names if d not in DTYPE_NAMES]
    if unknown or not names:
        parser.error(f"--dtypes: unknown {unknown or names}; choose from {','.join(DTYPE_NAMES)}")
    if args.device == "cpu" and "bf16" in names:
        parser.error("--dtypes bf16 cannot run with --device cpu: Triton's interpreter cannot multiply bf16 in "
                     "tl.dot (wrong results); use fp16 or fp32 on cpu, bf16 on cuda")
    args.dtypes = names
    args.backwards = [b.strip() for b in args.backwards.split(",") if b.strip()]
    if not args.backwards or set(args.backwards) - set(BACKWARDS):
        parser.error(f"--backwards: choose from {','.join(BACKWARDS)}, got {args.backwards}")
    args.head_dims = _ints(args.head_dims, "--head-dims", parser)
    args.tokens = _ints(args.tokens or defaults["tokens"], "--tokens", parser)
    if min(args.tokens) < 1:
        parser.error("--tokens: every sequence needs at least 1 token")
    args.heads = args.heads or defaults["heads"]
    return args


def select_triton_path(device: str) -> None:
    """Make finevit.kernels run its Triton kernels on `device`: the interpreter on cpu, compiled on cuda.

    TRITON_INTERPRET is read when triton.jit decorates a kernel, i.e. when finevit.kernels is first imported,
    so it must be settled before that; FINEVIT_KERNELS=triton makes the dispatch fail instead of falling back
    to the PyTorch reference.
    """
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device == "cpu" and not interpret:
        if "triton" in sys.modules or "finevit.kernels" in sys.modules:
            sys.exit("attention_repro: --device cpu needs TRITON_INTERPRET=1 before triton is imported, and triton "
                     "was already imported without it; run the script in a fresh process (or set "
                     "TRITON_INTERPRET=1 in its environment)")
        os.environ["TRITON_INTERPRET"] = "1"
    if device == "cuda" and interpret:
        if "triton" in sys.modules or "finevit.kernels" in sys.modules:
            sys.exit("attention_repro: --device cuda must run compiled kernels, but triton was imported with "
                     "TRITON_INTERPRET=1; unset it")
        del os.environ["TRITON_INTERPRET"]
    os.environ["FINEVIT_KERNELS"] = "triton"


def rel_error(x, ref) -> float:
    """max |x - ref| / max |ref| (inf when x holds a NaN or an infinity)."""
    import torch

    if not torch.isfinite(x).all():
        return float("inf")
    scale = ref.abs().max().item() or 1.0
    return (x.double() - ref).abs().max().item() / scale


def run_case(lengths: list[int], heads: int, head_dim: int, rope: bool, dtype, device, skew: float | None,
             deterministic: bool = True) -> dict:
    """Errors of our op and of PyTorch's reference in `dtype`, each against float64 on the same rounded inputs."""
    import torch

    import finevit.kernels as K
    from finevit.kernels import reference

    total = sum(lengths)
    draws = [torch.randn(total, heads, head_dim, device=device, dtype=torch.float64) for _ in range(4)]
    q0, k0, v0, g0 = (x.to(dtype).double() for x in draws)  # the rounded values, held in float64
    cu = K.cu_seqlens_from_lengths(lengths).to(device)
    cos = sin = None
    if rope:
        cos, sin = K.rope_2d_cos_sin(torch.randint(0, 64, (total, 2), device=device), head_dim)
    max_seqlen = max(lengths)

    def outputs(fn, run_dtype, scale=None) -> list:
        # Fresh leaves for every run: `.to(..., copy=True)` is a new tensor even when the dtype already matches.
        q, k, v = (x.detach().to(run_dtype, copy=True).requires_grad_() for x in (q0, k0, v0))
        out = fn(q, k, v, cu, max_seqlen, cos=cos, sin=sin, softmax_scale=scale)
        out.backward(g0.to(run_dtype))
        grads = [q.grad, k.grad, v.grad]
        if any(g is None for g in grads):
            raise RuntimeError(f"{getattr(fn, '__module__', fn)}: a leaf got no gradient")
        return [t.detach().double() for t in [out, *grads]]

    ref = outputs(reference.varlen_attention, torch.float64)
    ours = outputs(lambda *a, **kw: K.varlen_attention(*a, **kw, deterministic=deterministic), dtype,
                   None if skew is None else skew * head_dim**-0.5)
    theirs = outputs(reference.varlen_attention, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "ours": {name: rel_error(x, r) for name, x, r in zip(TENSORS, ours, ref)},
        "torch": {name: rel_error(x, r) for name, x, r in zip(TENSORS, theirs, ref)},
    }


def poison_outputs() -> bool:
    """Allocate our kernels' outputs NaN-filled, as the kernel tests do; False if the hook is gone."""
    import torch

    from finevit.kernels import _dispatch

    if not callable(getattr(_dispatch, "empty", None)):
        return False
    _dispatch.empty = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    return True


def _finite(obj):
    """Non-finite errors become null, so the JSON file stays strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _fmt(value: float) -> str:
    return f"{value:.2e}" if value != float("inf") else "non-finite"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    select_triton_path(args.device)

    import _harness as harness  # bench/'s shared harness (environment record, dispatch targets)
    import torch
    import triton

    device = torch.device(args.device)
    dispatched = harness.dispatch_targets(("varlen_attention",), device)["finevit.varlen_attention"]
    if dispatched != "triton":
        sys.exit(f"attention_repro: varlen_attention dispatches to {dispatched}, not to the Triton kernels")
    poisoned = poison_outputs()
    torch.manual_seed(args.seed)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()}), interpreter"
    print(f"attention repro on {gpu} · torch {torch.__version__} · triton {triton.__version__} · "
          f"varlen_attention: {dispatched}")
    print(f"tokens {','.join(map(str, args.tokens))} · {args.heads} heads · outputs NaN-poisoned: {poisoned} · rule: "
          f"ours <= {FACTORS['out']:g}x PyTorch's error (out), {FACTORS['dq']:g}x (dq, dk, dv), + {FLOOR:g}"
          + (f" · SELF-TEST: our softmax_scale skewed x{args.skew_scale:g}" if args.skew_scale is not None else ""))
    print(f"{'case':<24} {'ours: out':>10} {'dq':>10} {'dk':>10} {'dv':>10}   {'torch: out':>10} {'dq':>10} "
          f"{'dk':>10} {'dv':>10}   status", flush=True)
    rows, failed = [], False
    for dtype_name in args.dtypes:
        dtype = getattr(torch, DTYPE_NAMES[dtype_name])
        for head_dim, rope, backward in ((d, r, b) for d in args.head_dims for r in (False, True)
                                         for b in args.backwards):
            row = {"head_dim": head_dim, "rope": rope, "dtype": dtype_name, "backward": backward}
            try:
                errors = run_case(args.tokens, args.heads, head_dim, rope, dtype, device, args.skew_scale,
                                  BACKWARDS[backward])
            except Exception as error:  # noqa: BLE001 - a crashing case is a failed case; go on
                lines = str(error).strip().splitlines()
                row.update(ok=False, status="ERROR", error=f"{type(error).__name__}: {lines[0] if lines else ''}")
            else:
                # each tensor's error over its allowed error; the case is ok when none is above 1
                share = {t: errors["ours"][t] / (FACTORS[t] * errors["torch"][t] + FLOOR) for t in TENSORS}
                ok = all(value <= 1.0 for value in share.values())
                row.update(errors, share_of_limit=share, ok=ok, status="ok" if ok else "TOO LARGE")
            failed |= not row["ok"]
            rows.append(row)
            label = f"d{head_dim} {'rope' if rope else 'plain'} {dtype_name} {backward[:3]}"
            if "ours" in row:
                print(f"{label:<24} " + " ".join(f"{_fmt(row['ours'][t]):>10}" for t in TENSORS) + "   "
                      + " ".join(f"{_fmt(row['torch'][t]):>10}" for t in TENSORS) + f"   {row['status']}",
                      flush=True)
            else:
                print(f"{label:<24} {row['status']}: {row['error']}", flush=True)
    print(f"{sum(r['ok'] for r in rows)} of {len(rows)} cases ok"
          + ("" if not failed else "; TOO LARGE or ERROR above"))
    if args.json:
        payload = {
            "bench": "attention_repro",
            "env": harness.environment(device),
            "config": {"tokens": args.tokens, "heads": args.heads, "seed": args.seed, "factors": FACTORS,
                       "floor": FLOOR, "error": "max |x - x64| / max |x64| on the same rounded inputs",
                       "implementation": dispatched, "poisoned_outputs": poisoned,
                       "skew_scale": args.skew_scale},
            "ok": not failed,
            "rows": _finite(rows),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
