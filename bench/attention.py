"""Benchmark of `finevit.kernels.varlen_attention` (fused 2D RoPE) against the varlen attentions users run today.

    python bench/attention.py [--quick] [--out DIR] [--providers a,b,...] [--modes fwd,bwd,fwd+bwd] [--cpu-smoke]

Without a CUDA device it prints "no CUDA device: nothing to benchmark" and exits 0.

Workloads (bf16, each a packed batch of about 32k tokens, so every batch carries the same token budget)
    256, 576, 1024, 2304, 4096   uniform: 128×256, 56×576, 32×1024, 14×2304, 8×4096 patches (square grids)
    mixed                        images drawn with a fixed seed from a realistic resolution distribution:
                                 side √(h·w) log-uniform in 224..1024 px, aspect h/w log-uniform in 0.5..2,
                                 patch 16, drawn until the batch holds 32k tokens (196..4096 patches each)
    heads × head_dim             12×64 (ViT-B), 16×72 (SigLIP so400m), 16×80 (Qwen2-VL), 8×128
    positions                    each image's raster (row, col) grid; cos/sin from `rope_2d_cos_sin`
`--quick` (< 3 minutes on an H100): workloads 1024 and mixed at every head config plus 4096 at 8×128 (the
case of the 450 TFLOP/s target), modes fwd and fwd+bwd, every provider but flex (its compiles alone take
minutes; add it back with --providers).

Providers (one small builder each; every one returns a forward closure (T, H, D) -> (T, H, D) computing the
same thing: rotate q and k with 2D RoPE, then attention inside each image at scale head_dim ** -0.5)
    finevit         ours, RoPE in the op: varlen_attention(q, k, v, cu_seqlens, max_seqlen, cos=cos, sin=sin) (q, k
                    rotated once by the RoPE kernel; the backward rotates dQ, dK back in its stores)
    finevit_nondet  ours, RoPE in the op, deterministic=False: the backward's dK/dV kernel also adds dQ with atomics
                    (one pass over the keys instead of two; dQ's last bits vary from run to run)
    finevit+rope    ours, RoPE separate: apply_rope on q and k (finevit's standalone kernel), then varlen_attention
    torch_varlen    torch.nn.attention.varlen.varlen_attn (FA2 kernels inside PyTorch); its signature is
                    read at runtime (2.9 had a positional is_causal and no scale; later releases take scale
                    keyword-only) and recorded in the JSON
    flash_attn      flash_attn.flash_attn_varlen_func, when flash-attn is installed
    sdpa_flash      scaled_dot_product_attention on the zero-padded (images, H, max_len, D) batch under
    sdpa_cudnn      sdpa_kernel(<backend>). Uniform batches are a free reshape and need no mask. Mixed
    sdpa_efficient  batches are scattered into the padded batch with a key-padding mask (padded rows are
                    computed and thrown away, as a user of padded SDPA pays for them); the flash backend
                    takes no mask, so sdpa_flash is skipped on mixed batches (per-size grouping would be one
                    launch per distinct image size, ~every image in a realistic batch).
    flex            flex_attention on the (1, H, T, D) packed batch with a same-image BlockMask,
                    torch.compile'd once per shape (compile time excluded, recorded as first_call_s)
    torch_rope      helper, not a provider: the plain PyTorch rotation of q and k alone, i.e. the part of
                    each non-fused baseline's time that is RoPE (shown in ms, no FLOPs)
    sdpa_math       the math backend on the padded batch (CPU smoke runs; too big for the GPU workloads)
Every baseline that does not fuse RoPE rotates q and k first with the plain PyTorch rotation
(`finevit.kernels.reference.apply_rope`, the oracle of the tests), inside its timed region, because that
is the work the fused kernel saves. Per-batch metadata shared by all layers of a model (cu_seqlens, cos/sin
tables, token -> image index, BlockMask) is built once, outside the timing. Before timing, each provider's
forward output is compared with finevit's (`rel_diff_vs_ours`, max |Δ| / max |ours|; a warning above 5%).

FLOPs count real tokens only: forward 4·Σᵢ nᵢ²·H·D (the two matmuls), backward 2.5× that (P recomputed),
fwd+bwd 3.5×; padded providers are charged for the same FLOPs, never (max n)²·images. Modes and timing are
those of bench/_harness.py (do_bench median and 20/80 % quantiles, grads reset between reps).

Reading the output: one progress line per (case, provider, mode), then the throughput tables (TFLOP/s;
finevit's cell carries its share of the measured bf16 matmul ceiling, every other cell the ratio
finevit / that provider, > 1 meaning finevit is faster), then the targets of issue 18 with met / not met.
A target over several workloads is met only when it holds on each of them (the minimum ratio); the
geometric mean and, for FA2 baselines, the ratio without the baseline's PyTorch RoPE are shown beside it.
Files: bench/results/attention_<gpu>_<date>.{json,md,png}; regenerate the .md/.png from the JSON with
`python bench/_harness.py <file>.json`.

`--cpu-smoke` runs a tiny fp32 version on the CPU (a uniform and a mixed batch of 16..40 tokens, 2×32 heads,
FINEVIT_KERNELS=reference, a wall-clock timer) through the same code paths, to check the script without a GPU.
"""

from __future__ import annotations

import functools
import inspect
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product

import _harness as harness
import torch
import torch.nn.functional as F

import finevit.kernels as K
from finevit.kernels import attention, reference
from finevit.kernels.utils import packed_token_index

OURS = "finevit"
NONDETERMINISTIC = "finevit_nondet"
TOKEN_BUDGET = 32768
UNIFORM_PATCHES = (256, 576, 1024, 2304, 4096)
HEAD_CONFIGS = ((12, 64), (16, 72), (16, 80), (8, 128))
FA2_BASELINES = ("torch_varlen", "flash_attn")
DIFF_WARNING = 0.05


# ----------------------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    grids: tuple[tuple[int, int], ...]  # (rows, cols) of patches of each image

    @property
    def lengths(self) -> list[int]:
        return [rows * cols for rows, cols in self.grids]


def uniform_workload(patches: int, budget: int = TOKEN_BUDGET) -> Workload:
    side = math.isqrt(patches)
    assert side * side == patches, f"{patches} patches is not a square grid"
    return Workload(str(patches), ((side, side),) * (budget // patches))


def mixed_workload(budget: int = TOKEN_BUDGET, seed: int = 0, patch: int = 16,
                   min_px: float = 224, max_px: float = 1024, max_aspect: float = 2.0) -> Workload:
    """Images with log-uniform side √(h·w) in [min_px, max_px] and aspect h/w in [1/max_aspect, max_aspect]."""
    rng = random.Random(seed)
    grids: list[tuple[int, int]] = []
    while sum(r * c for r, c in grids) < budget:
        side = math.exp(rng.uniform(math.log(min_px), math.log(max_px)))
        aspect = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))
        rows = max(1, round(side * math.sqrt(aspect) / patch))
        cols = max(1, round(side / math.sqrt(aspect) / patch))
        grids.append((rows, cols))
    return Workload("mixed", tuple(grids))


def attention_flops(lengths: list[int], heads: int, head_dim: int, mode: str) -> float:
    """FLOPs from real tokens only: fwd 4·Σn²·H·D, bwd 2.5× fwd, fwd+bwd 3.5× fwd."""
    forward = 4 * sum(n * n for n in lengths) * heads * head_dim
    return forward * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


@dataclass
class Batch:
    """The tensors of one case plus the per-batch metadata every provider may use (built once, untimed)."""
    q: torch.Tensor  # (T, H, D), requires grad
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor  # int32 (images + 1,)
    max_seqlen: int
    lengths: list[int]
    cos: torch.Tensor  # float32 (T, D/2)
    sin: torch.Tensor
    seq_index: torch.Tensor  # int64 (T,): image of each token
    token_pos: torch.Tensor  # int64 (T,): its position inside the image
    uniform: bool
    scale: float


def make_batch(workload: Workload, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
               seed: int = 0) -> Batch:
    lengths, total = workload.lengths, sum(workload.lengths)
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(total, heads, head_dim, device=device, dtype=dtype, generator=gen).requires_grad_()
               for _ in range(3))
    # Raster (row, col) of every patch, image after image.
    positions = torch.cat([
        torch.stack([torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)], dim=1)
        for rows, cols in workload.grids
    ]).to(device)  # (T, 2)
    cos, sin = K.rope_2d_cos_sin(positions, head_dim)
    cu_seqlens = K.cu_seqlens_from_lengths(lengths).to(device)
    seq_index, token_pos = packed_token_index(cu_seqlens, total)
    return Batch(q, k, v, cu_seqlens, max(lengths), lengths, cos, sin, seq_index, token_pos,
                 uniform=len(set(lengths)) == 1, scale=head_dim**-0.5)


# ----------------------------------------------------------------------------------------------------
# Providers: builder(batch) -> forward closure returning (T, H, D); raise Unavailable to skip
# ----------------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """The provider cannot run this case here (missing package, unsupported input): recorded as skipped."""


Forward = Callable[[], torch.Tensor]


def torch_rope(b: Batch, x: torch.Tensor) -> torch.Tensor:
    """The plain PyTorch rotation (the tests' oracle), what non-fused baselines pay for RoPE."""
    return reference.apply_rope(x, b.cos, b.sin)


def finevit_fused(b: Batch) -> Forward:
    return lambda: K.varlen_attention(b.q, b.k, b.v, b.cu_seqlens, b.max_seqlen, cos=b.cos, sin=b.sin)


def finevit_nondeterministic(b: Batch) -> Forward:
    return lambda: K.varlen_attention(b.q, b.k, b.v, b.cu_seqlens, b.max_seqlen, cos=b.cos, sin=b.sin,
                                      deterministic=False)


def finevit_separate(b: Batch) -> Forward:
    def forward():
        q, k = K.apply_rope(b.q, b.cos, b.sin), K.apply_rope(b.k, b.cos, b.sin)
        return K.varlen_attention(q, k, b.v, b.cu_seqlens, b.max_seqlen)
    return forward


def _varlen_attn_kwargs(fn: Callable, scale: float) -> dict:
    """Keyword arguments for the installed varlen_attn: scale when it takes one, is_causal=False when it has it."""
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scale  # without it, varlen_attn uses head_dim ** -0.5: the same value
    if "is_causal" in params:
        kwargs["is_causal"] = False
    return kwargs


def torch_varlen(b: Batch) -> Forward:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as error:
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn") from error
    kwargs = _varlen_attn_kwargs(varlen_attn, b.scale)

    def forward():
        q, k = torch_rope(b, b.q), torch_rope(b, b.k)
        return varlen_attn(q, k, b.v, b.cu_seqlens, b.cu_seqlens, b.max_seqlen, b.max_seqlen, **kwargs)
    return forward


def flash_attn_varlen(b: Batch) -> Forward:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as error:
        raise Unavailable("flash-attn is not installed") from error

    def forward():
        q, k = torch_rope(b, b.q), torch_rope(b, b.k)
        return flash_attn_varlen_func(q, k, b.v, b.cu_seqlens, b.cu_seqlens, b.max_seqlen, b.max_seqlen,
                                      softmax_scale=b.scale)
    return forward


def sdpa_padded(backend: str) -> Callable[[Batch], Forward]:
    """SDPA under one backend on the padded (images, H, max_len, D) batch; a key-padding mask for mixed sizes."""

    def build(b: Batch) -> Forward:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        sdpa_backend = getattr(SDPBackend, backend)
        images, max_len = len(b.lengths), b.max_seqlen
        if b.uniform:
            mask = None
            def pad(x): return x.view(images, max_len, *x.shape[1:])  # (N, L, H, D), a free view
            def unpad(o): return o.reshape(-1, *o.shape[2:])  # (T, H, D)
        elif backend == "FLASH_ATTENTION":
            raise Unavailable("the flash backend takes no attn_mask, so it cannot run a padded mixed-size batch")
        else:
            lengths = torch.tensor(b.lengths, device=b.q.device)
            mask = (torch.arange(max_len, device=b.q.device) < lengths[:, None])[:, None, None, :]  # (N,1,1,L)
            def pad(x): return x.new_zeros(images, max_len, *x.shape[1:]).index_put((b.seq_index, b.token_pos), x)
            def unpad(o): return o[b.seq_index, b.token_pos]  # (T, H, D)

        def forward():
            q, k = torch_rope(b, b.q), torch_rope(b, b.k)
            q, k, v = (pad(x).transpose(1, 2) for x in (q, k, b.v))  # (N, H, L, D)
            with sdpa_kernel(sdpa_backend):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=b.scale)
            return unpad(out.transpose(1, 2))
        return forward
    return build


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention
    # Every case is a new shape, so a new compile: let Dynamo keep them all instead of falling back to eager.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    return torch.compile(flex_attention, dynamic=False)


def flex_document(b: Batch) -> Forward:
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as error:
        raise Unavailable(f"torch {torch.__version__} has no flex_attention") from error
    flex_attention = _compiled_flex()
    seq_index, total = b.seq_index, b.q.shape[0]

    def same_image(batch, head, q_idx, kv_idx):
        return seq_index[q_idx] == seq_index[kv_idx]
    block_mask = create_block_mask(same_image, None, None, total, total, device=b.q.device)

    def forward():
        q, k = torch_rope(b, b.q), torch_rope(b, b.k)
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, b.v))  # (1, H, T, D)
        out = flex_attention(q, k, v, block_mask=block_mask, scale=b.scale)
        return out.squeeze(0).transpose(0, 1)  # (T, H, D)
    return forward


def rope_only(b: Batch) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    return lambda: (torch_rope(b, b.q), torch_rope(b, b.k))


@dataclass(frozen=True)
class Provider:
    build: Callable[[Batch], Callable]
    description: str
    cuda_only: bool = True
    attention: bool = True  # False: a helper whose time is reported in ms, without FLOPs or ratios


PROVIDERS: dict[str, Provider] = {
    "finevit": Provider(finevit_fused, "finevit varlen_attention with RoPE in the op (cos/sin passed in)",
                        cuda_only=False),
    "finevit_nondet": Provider(finevit_nondeterministic, "finevit varlen_attention with RoPE in the op, "
                               "deterministic=False (dQ added with atomics)", cuda_only=False),
    "finevit+rope": Provider(finevit_separate, "finevit apply_rope on q and k, then varlen_attention", cuda_only=False),
    "torch_varlen": Provider(torch_varlen, "PyTorch RoPE + torch.nn.attention.varlen.varlen_attn"),
    "flash_attn": Provider(flash_attn_varlen, "PyTorch RoPE + flash_attn.flash_attn_varlen_func"),
    "sdpa_flash": Provider(sdpa_padded("FLASH_ATTENTION"), "PyTorch RoPE + SDPA flash backend, padded batch "
                           "(uniform batches only: no mask support)"),
    "sdpa_cudnn": Provider(sdpa_padded("CUDNN_ATTENTION"), "PyTorch RoPE + SDPA cuDNN backend, padded batch "
                           "(+ key-padding mask on mixed batches)"),
    "sdpa_efficient": Provider(sdpa_padded("EFFICIENT_ATTENTION"), "PyTorch RoPE + SDPA memory-efficient "
                               "backend, padded batch (+ key-padding mask on mixed batches)"),
    "flex": Provider(flex_document, "PyTorch RoPE + compiled flex_attention with a same-image BlockMask"),
    "torch_rope": Provider(rope_only, "helper: the plain PyTorch rotation of q and k alone (ms only)",
                           cuda_only=False, attention=False),
    "sdpa_math": Provider(sdpa_padded("MATH"), "PyTorch RoPE + SDPA math backend, padded batch (+ mask)",
                          cuda_only=False),
}
GPU_PROVIDERS = [name for name in PROVIDERS if name != "sdpa_math"]
QUICK_PROVIDERS = [name for name in GPU_PROVIDERS if name != "flex"]
SMOKE_PROVIDERS = ["finevit", "finevit_nondet", "finevit+rope", "sdpa_math", "torch_varlen", "flex", "torch_rope"]


# ----------------------------------------------------------------------------------------------------
# Running the cases
# ----------------------------------------------------------------------------------------------------


def run_provider(name: str, batch: Batch, case: dict, modes: list[str], device: torch.device,
                 ceiling: float, ours_out: torch.Tensor | None) -> tuple[list[dict], torch.Tensor | None]:
    """All modes of one provider on one case -> result records (and its forward output, to compare)."""
    provider = PROVIDERS[name]
    base = {"case": case["case"], "provider": name}
    try:
        if provider.cuda_only and device.type != "cuda":
            raise Unavailable("needs a CUDA device")
        forward = provider.build(batch)
        start = time.perf_counter()
        with torch.no_grad():
            out = forward()  # first call: compiles / autotunes, then the output check
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first_call_s = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - any failure to build or run is recorded, not fatal
        status = "skipped" if isinstance(error, Unavailable) else "failed"
        harness.free_memory(device)
        return [{**base, "mode": mode, "status": status, "reason": harness.error_reason(error)} for mode in modes], None
    base["first_call_s"] = first_call_s
    if provider.attention and ours_out is not None and name != OURS:
        diff = (out.float() - ours_out.float()).abs().max() / ours_out.float().abs().max().clamp_min(1e-30)
        base["rel_diff_vs_ours"] = float(diff)
        if diff > DIFF_WARNING:
            print(f"  WARNING: {name} differs from {OURS} by {float(diff):.1%} (max |Δ| / max |{OURS}|) "
                  f"on {case['case']}")
    records = []
    for mode in modes:
        try:
            timing = harness.measure(forward, mode, device, inputs=(batch.q, batch.k, batch.v))
        except Exception as error:  # noqa: BLE001
            harness.free_memory(device)
            records.append({**base, "mode": mode, "status": "failed", "reason": harness.error_reason(error)})
            continue
        record = {**base, "mode": mode, "status": "ok", "reason": None, **timing}
        if provider.attention:
            record["flop"] = attention_flops(batch.lengths, case["num_heads"], case["head_dim"], mode)
            record.update(harness.throughput(timing["ms"], record["flop"], ceiling))
        else:
            record.update(throughput=None, ceiling_share=None)
        records.append(record)
    return records, out if provider.attention else None


def describe_case(workload: Workload, heads: int, head_dim: int, dtype: torch.dtype) -> dict:
    lengths = workload.lengths
    return {"case": f"{workload.name} {heads}x{head_dim}", "workload": workload.name,
            "heads_dim": f"{heads}x{head_dim}", "num_heads": heads, "head_dim": head_dim,
            "images": len(lengths), "tokens": sum(lengths), "max_seqlen": max(lengths),
            "sum_n2": sum(n * n for n in lengths), "dtype": str(dtype).removeprefix("torch."), "lengths": lengths}


def _progress_line(record: dict) -> str:
    head = f"{record['case']:<16} {record['mode']:<8} {record['provider']:<15}"
    if record["status"] != "ok":
        return f"{head} {record['status']}: {record['reason']}"
    line = f"{head} {record['ms']:8.3f} ms ({record['ms_q20']:.3f}-{record['ms_q80']:.3f})"
    if record.get("throughput") is not None:
        line += f" {record['throughput']:7.1f} TFLOP/s"
        if record.get("ceiling_share") is not None:
            line += f" {100 * record['ceiling_share']:4.0f}% of matmul"
    if record.get("peak_mem_mib") is not None:
        line += f"  peak +{record['peak_mem_mib']:.0f} MiB"
    return line


# ----------------------------------------------------------------------------------------------------
# Targets of issue 18
# ----------------------------------------------------------------------------------------------------


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _ratio_check(name: str, threshold: float, pairs: list[tuple[dict, dict]], rope_ms: dict) -> dict:
    """pairs: (ours record, baseline record) per case. Met when min ratio >= threshold."""
    if not pairs:
        return {"name": name, "value": None, "threshold": threshold, "met": None, "detail": "not measured"}
    ratios = [(base["ms"] / ours["ms"], ours["case"]) for ours, base in pairs]
    worst, worst_case = min(ratios)
    detail = f"min over {len(ratios)} case(s), worst {worst_case}; geomean {_geomean([r for r, _ in ratios]):.2f}"
    without_rope = [(base["ms"] - rope_ms[(base["case"], base["mode"])]) / ours["ms"] for ours, base in pairs
                    if base["provider"] != "finevit+rope" and (base["case"], base["mode"]) in rope_ms]
    if without_rope:
        detail += f"; without the baseline's PyTorch RoPE: min {min(without_rope):.2f}"
    return {"name": name, "value": worst, "threshold": threshold, "met": worst >= threshold, "detail": detail}


def check_targets(results: list[dict], cases: list[dict], modes: list[str]) -> list[dict]:
    ok = {(r["case"], r["mode"], r["provider"]): r for r in results if r["status"] == "ok"}
    rope_ms = {(c, m): r["ms"] for (c, m, p), r in ok.items() if p == "torch_rope"}

    def pairs(mode: str, baseline: str, head_dim: int | None = None) -> list[tuple[dict, dict]]:
        return [(ok[(c["case"], mode, OURS)], ok[(c["case"], mode, baseline)]) for c in cases
                if (head_dim is None or c["head_dim"] == head_dim)
                and (c["case"], mode, OURS) in ok and (c["case"], mode, baseline) in ok]

    head_dims = sorted({c["head_dim"] for c in cases})
    checks = []
    for baseline in FA2_BASELINES:
        for d in head_dims:
            threshold = 1.35 if d in (72, 80) else 1.2
            checks.append(_ratio_check(f"fwd: {OURS} / {baseline}, d{d}", threshold,
                                       pairs("fwd", baseline, d), rope_ms))
    for baseline in FA2_BASELINES:
        for d in head_dims:
            checks.append(_ratio_check(f"fwd+bwd: {OURS} / {baseline}, d{d}", 1.1,
                                       pairs("fwd+bwd", baseline, d), rope_ms))
    for provider in (OURS, NONDETERMINISTIC):  # the backward's rate: the default, and with dQ added by atomics
        for d in (64, 128):
            rates = [(ok[(c["case"], "bwd", provider)]["throughput"], c["case"]) for c in cases
                     if c["head_dim"] == d and (c["case"], "bwd", provider) in ok]
            worst = min(rates) if rates else None
            checks.append({"name": f"bwd TFLOP/s of {provider}, d{d}", "threshold": 300.0,
                           "value": worst[0] if worst else None, "met": worst[0] >= 300 if worst else None,
                           "detail": f"min over {len(rates)} case(s), worst {worst[1]}" if worst else "not measured"})
    for mode in modes:
        checks.append(_ratio_check(f"{mode}: fused RoPE / separate ({OURS} / finevit+rope)", 1.15,
                                   pairs(mode, "finevit+rope"), rope_ms))
    target = next((ok.get((c["case"], "fwd", OURS)) for c in cases
                   if c["workload"] == "4096" and c["head_dim"] == 128), None)
    checks.append({"name": f"fwd TFLOP/s of {OURS}, 4096 patches, d128", "threshold": 450.0,
                   "value": target["throughput"] if target else None,
                   "met": target["throughput"] >= 450 if target else None,
                   "detail": f"{100 * target['ceiling_share']:.0f}% of the measured matmul ceiling"
                   if target and target.get("ceiling_share") else "not measured"})
    return checks


def _print_checks(checks: list[dict]) -> None:
    print("\nTargets (issue 18; H100/H200, bf16):")
    for c in checks:
        status = {True: "met", False: "NOT MET", None: "not measured"}[c["met"]]
        if c["value"] is None:
            print(f"  {c['name']:<56} {'-':>7}  (>= {c['threshold']:<4g})  not measured")
            continue
        print(f"  {c['name']:<56} {c['value']:7.2f}  (>= {c['threshold']:<4g})  {status:<8} {c['detail']}")


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def plan(args) -> tuple[list[tuple[Workload, int, int]], list[str], list[str], torch.dtype]:
    """(cases, providers, modes, dtype) for the chosen run."""
    if args.cpu_smoke:
        cases = [(Workload("uniform", ((4, 4),) * 3), 2, 32), (Workload("mixed", ((4, 4), (5, 6), (5, 8))), 2, 32)]
        return cases, SMOKE_PROVIDERS, list(harness.MODES), torch.float32
    mixed = mixed_workload(seed=args.seed)
    if args.quick:
        workloads = [uniform_workload(1024), mixed]
        cases = [(w, h, d) for w, (h, d) in product(workloads, HEAD_CONFIGS)] + [(uniform_workload(4096), 8, 128)]
        return cases, QUICK_PROVIDERS, ["fwd", "fwd+bwd"], torch.bfloat16
    workloads = [uniform_workload(n) for n in UNIFORM_PATCHES] + [mixed]
    cases = [(w, h, d) for w, (h, d) in product(workloads, HEAD_CONFIGS)]
    return cases, GPU_PROVIDERS, list(harness.MODES), torch.bfloat16


def library_versions() -> dict:
    """Which code the baselines run: varlen_attn's signature and flash-attn's version."""
    info = {}
    try:
        from torch.nn.attention.varlen import varlen_attn
        info["varlen_attn_signature"] = str(inspect.signature(varlen_attn))
    except ImportError:
        info["varlen_attn_signature"] = None
    try:
        import flash_attn
        info["flash_attn"] = flash_attn.__version__
    except ImportError:
        info["flash_attn"] = None
    return info


def main(argv: list[str] | None = None) -> None:
    run = harness.start(__doc__, PROVIDERS, argv, ops=("varlen_attention", "apply_rope"), libraries=library_versions,
                        quick_help="a < 3 minute subset (see the module docstring)",
                        seed_help="seed of the mixed workload and the inputs")
    cases, providers, modes, dtype = plan(run.args)
    cases = harness.warmup_cases(cases)
    providers, modes = run.providers(providers), run.modes(modes)
    mixed_grids = next(([list(g) for g in w.grids] for w, _, _ in cases if w.name == "mixed"), None)
    payload = run.payload("attention", providers=providers, modes=modes, layout={"panel": "heads_dim", "x": "workload"},
                          config={"dtype": str(dtype).removeprefix("torch."), "token_budget": TOKEN_BUDGET,
                                  "mixed_grids": mixed_grids})
    results = payload["results"]
    autotune = harness.AutotuneLog({"fwd": attention._attn_fwd_tuned, "bwd_dkdv": attention._attn_bwd_dkdv_tuned,
                                    "bwd_dq": attention._attn_bwd_dq_tuned})
    for workload, heads, head_dim in cases:
        case = describe_case(workload, heads, head_dim, dtype)
        payload["cases"].append(case)
        batch = make_batch(workload, heads, head_dim, dtype, run.device, seed=run.args.seed)
        results += harness.run_providers(
            providers, lambda name, ours_out: run_provider(name, batch, case, modes, run.device,  # noqa: B023 (run now)
                                                           run.ceilings["matmul"]["tflops"], ours_out),
            OURS, _progress_line, autotune, case["case"])
        batch = None  # frees it (the lambda's cell) before free_memory
        harness.free_memory(run.device)
        harness.add_ratios(results, OURS)
        payload["autotune"] = autotune.entries
        run.save(payload)

    if harness.warmup_shard() is not None:
        return
    payload["checks"] = check_targets(results, payload["cases"], modes)
    payload["tables"] = [autotune.table()]
    run.finish(payload, lambda: _print_checks(payload["checks"]))


if __name__ == "__main__":
    main()
