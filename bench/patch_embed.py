"""Benchmark of `finevit.kernels.patch_embed` (uint8 pixels -> embeddings, one GEMM) against the PyTorch paths.

    python bench/patch_embed.py [--quick] [--out DIR] [--providers a,b,...] [--modes fwd,bwd,fwd+bwd] [--cpu-smoke]

Without a CUDA device it prints "no CUDA device: nothing to benchmark" and exits 0.

Workloads (issue 8): 256 images × 1024 patches (a 32×32 grid each) = 262,144 patches, C = 3, patch P = 16
(512² px images, K = C·P·P = 768) and P = 14 (448² px, K = 588), width D = 768 and 1152; uint8 pixels drawn
with a fixed seed, CLIP's mean/std; weight (D, K) and bias (D,) bf16 leaves with requires_grad (the pixels
are not differentiable). Modes: fwd, bwd and fwd+bwd (`--quick`: fwd and fwd+bwd).

Providers (each a forward closure over the same pixels, weight and bias)
    finevit         `finevit.kernels.patch_embed(patches_u8, W, b, mean=, std=)` as dispatched (FINEVIT_KERNELS
                    unset: the Triton kernel on CUDA; the implementation is printed and recorded in the JSON)
    torch           the PyTorch path, `finevit.kernels.reference.patch_embed` (the tests' oracle): uint8 ->
                    float32 -> (x / 255 − mean) / std -> bf16 -> F.linear
    torch_compiled  the same function under torch.compile (Inductor fuses the normalization into one kernel
                    before cuBLAS); compiled once per shape, compile time excluded (recorded as first_call_s)
    conv2d          channels-first uint8 images (B, C, H, W) of the same patches: normalized the same way, then
                    F.conv2d(x, W.view(D, C, P, P), b, stride=P) and `.flatten(2).transpose(1, 2)`, the (B, hw, D)
                    view timm's PatchEmbed hands on (no copy)
    bare_gemm       lower bound: F.linear on patches normalized to bf16 beforehand (outside the timing)
Before timing, each provider's forward output is compared with finevit's (`rel_diff_vs_ours`, max |Δ| / max |ours|).

Measured, per (P, D, provider, mode): do_bench median and 20/80 % quantiles (bench/_harness.py: L2 flushed,
grads reset between reps), extra peak memory, and
    FLOPs           fwd 2·N·K·D, bwd 2·N·K·D (dW; db's N·D adds are not counted), fwd+bwd 4·N·K·D
    bytes           the minimum a fused op must move, the same for every provider (so GB/s ratios are time ratios):
                    fwd  N·K (uint8 pixels) + 2·D·K + 2·D (bf16 weight, bias) + 2·N·D (bf16 output)
                    bwd  2·N·D (dy) + N·K (pixels, re-read) + 2·D·K + 2·D (dW, db written)
                    fwd+bwd the sum
    GB/s            bytes / time, against the measured device-to-device copy bandwidth (read + write)
    TFLOP/s         against the measured bf16 matmul ceiling
    ratio           finevit's speedup over each provider (its ms / finevit's ms)
A computed table (not measured) gives the bytes each provider's forward actually moves, op by op.

Targets of issue 19 (H100/H200, bf16), the worst case of the run: forward time ≤ 1.1× the bare GEMM's; fwd+bwd
≥ 2× faster than the PyTorch path (torch) and faster than torch.compile of it (torch_compiled). Printed with
met / not met and written to the JSON. finevit runs as dispatched (the strategy it times and picks);
finevit_fused and finevit_two_pass pin each strategy.
Files: bench/results/patch_embed_<gpu>_<date>.{json,md,png}; regenerate the .md/.png from the JSON with
`python bench/_harness.py <file>.json`.

`--cpu-smoke` runs a tiny fp32 version on the CPU (2 images of 4×4 patches, D 16 and 32, FINEVIT_KERNELS=reference,
a wall-clock timer, no torch_compiled) through the same code paths, to check the script without a GPU.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product

import _harness as harness
import torch
import torch.nn.functional as F

import finevit.kernels as K
from finevit.kernels import reference

OURS = "finevit"
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
STD = (0.26862954, 0.26130258, 0.27577711)
CHANNELS = 3
IMAGES, GRID = 256, 32  # 256 images × 32×32 patches
PATCHES = (16, 14)
DIMS = (768, 1152)
SMOKE_IMAGES, SMOKE_GRID, SMOKE_DIMS = 2, 4, (16, 32)
FLOP_FACTOR = {"fwd": 2, "bwd": 2, "fwd+bwd": 4}  # × N·K·D
DIFF_WARNING = 0.02
TARGET_SPEEDUP = 2.0  # fwd+bwd, over the PyTorch path
TARGET_COMPILED_SPEEDUP = 1.0  # fwd+bwd, over torch.compile of the PyTorch path: faster
TARGET_GEMM_RATIO = 1.1  # forward, finevit time / bare GEMM time


# ----------------------------------------------------------------------------------------------------
# Workload
# ----------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    images: torch.Tensor  # uint8 (B, C, H, W)
    patches: torch.Tensor  # uint8 (N, K) in (C, P, P) order, images in raster order
    normalized: torch.Tensor  # (N, K) in the weight's dtype, for the bare GEMM
    weight: torch.Tensor  # (D, K), requires grad
    bias: torch.Tensor  # (D,), requires grad
    patch: int

    @property
    def leaves(self) -> tuple[torch.Tensor, ...]:
        return (self.weight, self.bias)


def make_inputs(images: int, grid: int, patch: int, dim: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    side = grid * patch
    pixels = torch.randint(0, 256, (images, CHANNELS, side, side), dtype=torch.uint8, device=device, generator=gen)
    patches = (pixels.view(images, CHANNELS, grid, patch, grid, patch)
               .permute(0, 2, 4, 1, 3, 5).reshape(-1, CHANNELS * patch * patch))  # (N, C·P·P)
    features = patches.shape[1]
    weight = (torch.randn(dim, features, device=device, generator=gen) * features**-0.5).to(dtype).requires_grad_()
    bias = (0.02 * torch.randn(dim, device=device, generator=gen)).to(dtype).requires_grad_()
    mean = torch.tensor(MEAN, device=device).repeat_interleave(patch * patch)  # (K,): channel of each column
    std = torch.tensor(STD, device=device).repeat_interleave(patch * patch)
    normalized = ((patches.float() / 255.0 - mean) / std).to(dtype)
    return Inputs(pixels, patches, normalized, weight, bias, patch)


def useful_flops(n: int, k: int, d: int, mode: str) -> float:
    return FLOP_FACTOR[mode] * n * k * d


def useful_bytes(n: int, k: int, d: int, mode: str, element: int = 2) -> float:
    """Minimum bytes of a fused op (uint8 pixels in, `element`-byte weights and activations)."""
    fwd = n * k + element * (d * k + d) + element * n * d
    bwd = element * n * d + n * k + element * (d * k + d)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def forward_traffic(n: int, k: int, d: int, element: int = 2) -> dict[str, tuple[float, str]]:
    """Bytes each provider's forward moves (computed from its ops, caches ignored) and how they add up."""
    weights = element * (d * k + d)
    out = element * n * d
    normalize = n * k * (1 + 4) + n * k * 8 * 3 + n * k * (4 + element)  # to fp32; /255, −mean, /std; cast
    e = element
    return {
        OURS: (n * k + weights + out, "reads the uint8 pixels once, writes the output"),
        "torch": (normalize + e * n * k + weights + out,
                  f"uint8->fp32 (1+4 B/px), /255, −mean, /std (8 B/px each), cast (4+{e}), GEMM reads {e} B/px"),
        "torch_compiled": (n * k * (1 + e) + e * n * k + weights + out,
                           f"one fused normalize kernel (1+{e} B/px), GEMM reads {e} B/px"),
        "conv2d": (normalize + e * n * k + weights + out, f"the same normalization, then the conv reads {e} B/px"),
        "bare_gemm": (e * n * k + weights + out, f"the GEMM reads pre-normalized patches ({e} B/px)"),
    }


# ----------------------------------------------------------------------------------------------------
# Providers: builder(inputs) -> forward closure returning (N, D) (conv2d: (B, hw, D)); raise Unavailable to skip
# ----------------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """The provider cannot run here: recorded as skipped."""


Forward = Callable[[], torch.Tensor]


def finevit(x: Inputs) -> Forward:
    return lambda: K.patch_embed(x.patches, x.weight, x.bias, mean=MEAN, std=STD)


def finevit_strategy(strategy: str) -> Callable[[Inputs], Forward]:
    """finevit with FINEVIT_PATCH_EMBED set to `strategy` for the call ("auto" picks one by timing both)."""
    def build(x: Inputs) -> Forward:
        def forward():
            before = os.environ.get("FINEVIT_PATCH_EMBED")
            os.environ["FINEVIT_PATCH_EMBED"] = strategy
            try:
                return K.patch_embed(x.patches, x.weight, x.bias, mean=MEAN, std=STD)
            finally:
                if before is None:
                    del os.environ["FINEVIT_PATCH_EMBED"]
                else:
                    os.environ["FINEVIT_PATCH_EMBED"] = before
        return forward
    return build


def torch_path(x: Inputs) -> Forward:
    return lambda: reference.patch_embed(x.patches, x.weight, x.bias, mean=MEAN, std=STD)


def torch_compiled(x: Inputs) -> Forward:
    if x.patches.device.type != "cuda":
        raise Unavailable("needs a CUDA device (Inductor on CPU compiles C++, too slow for a smoke run)")
    fn = harness.compiled(reference.patch_embed)
    return lambda: fn(x.patches, x.weight, x.bias, mean=MEAN, std=STD)


def conv2d(x: Inputs) -> Forward:
    device = x.images.device
    mean = torch.tensor(MEAN, device=device).view(1, -1, 1, 1)
    std = torch.tensor(STD, device=device).view(1, -1, 1, 1)
    dim = x.weight.shape[0]

    def forward():
        images = ((x.images.float() / 255.0 - mean) / std).to(x.weight.dtype)  # (B, C, H, W)
        out = F.conv2d(images, x.weight.view(dim, CHANNELS, x.patch, x.patch), x.bias, stride=x.patch)
        return out.flatten(2).transpose(1, 2)  # (B, hw, D), a view
    return forward


def bare_gemm(x: Inputs) -> Forward:
    return lambda: F.linear(x.normalized, x.weight, x.bias)


@dataclass(frozen=True)
class Provider:
    build: Callable[[Inputs], Forward]
    description: str


PROVIDERS: dict[str, Provider] = {
    OURS: Provider(finevit, "finevit.kernels.patch_embed on uint8 patches, as dispatched (Triton on CUDA; the "
                            "faster strategy of the two below, timed at the first call)"),
    "finevit_fused": Provider(finevit_strategy("fused"), "FINEVIT_PATCH_EMBED=fused: one GEMM kernel that "
                                                         "normalizes the uint8 tile it loads"),
    "finevit_two_pass": Provider(finevit_strategy("two_pass"), "FINEVIT_PATCH_EMBED=two_pass: a normalize pass "
                                                               "(uint8 -> bf16, K padded to 16 bytes), then cuBLAS"),
    "torch": Provider(torch_path, "the PyTorch path: uint8 -> float32 -> (x/255 − mean)/std -> bf16 -> F.linear "
                                  "(finevit.kernels.reference.patch_embed, the tests' oracle)"),
    "torch_compiled": Provider(torch_compiled, "the PyTorch path under torch.compile (fused normalization + cuBLAS)"),
    "conv2d": Provider(conv2d, "uint8 (B, C, H, W) images normalized as above, then F.conv2d(stride=P), "
                               "flatten(2).transpose(1, 2) view"),
    "bare_gemm": Provider(bare_gemm, "lower bound: F.linear on pre-normalized bf16 patches (normalization untimed)"),
}


# ----------------------------------------------------------------------------------------------------
# Running the cases
# ----------------------------------------------------------------------------------------------------


def run_provider(name: str, inputs: Inputs, case: dict, modes: list[str], device: torch.device,
                 ceilings: dict, ours_out: torch.Tensor | None) -> tuple[list[dict], torch.Tensor | None]:
    """All modes of one provider on one case -> result records (and its forward output, to compare)."""
    base = {"case": case["case"], "provider": name}
    failure = None
    try:
        forward = PROVIDERS[name].build(inputs)
        start = time.perf_counter()
        with torch.no_grad():
            out = forward().reshape(-1, case["dim"])  # first call: compiles / autotunes, then the output check
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first_call_s = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - any failure to build or run is recorded, not fatal
        failure = ("skipped" if isinstance(error, Unavailable) else "failed", harness.error_reason(error))
    if failure is not None:
        harness.free_memory(device)
        return [{**base, "mode": mode, "status": failure[0], "reason": failure[1]} for mode in modes], None
    base["first_call_s"] = first_call_s
    if ours_out is not None and name != OURS:
        diff = (out.float() - ours_out.float()).abs().max() / ours_out.float().abs().max().clamp_min(1e-30)
        base["rel_diff_vs_ours"] = float(diff)
        if diff > DIFF_WARNING:
            print(f"  WARNING: {name} differs from {OURS} by {float(diff):.1%} (max |Δ| / max |{OURS}|) "
                  f"on {case['case']}")
    n, k, d = case["patches"], case["features"], case["dim"]
    records = []
    for mode in modes:
        try:
            timing = harness.measure(forward, mode, device, inputs.leaves)
        except Exception as error:  # noqa: BLE001
            harness.free_memory(device)
            records.append({**base, "mode": mode, "status": "failed", "reason": harness.error_reason(error)})
            continue
        flop, nbytes = useful_flops(n, k, d, mode), useful_bytes(n, k, d, mode, case["element_size"])
        record = {**base, "mode": mode, "status": "ok", "reason": None, **timing, "flop": flop, "bytes": nbytes,
                  "tflops": flop / (timing["ms"] * 1e-3) / 1e12,
                  "tflops_share": flop / (timing["ms"] * 1e-3) / 1e12 / ceilings["matmul"]["tflops"]}
        record.update(harness.throughput(timing["ms"], nbytes, ceilings["copy"]["gbps"], scale=1e9))  # GB/s
        records.append(record)
    return records, out


def describe_case(images: int, grid: int, patch: int, dim: int, dtype: torch.dtype) -> dict:
    return {"case": f"P{patch} D{dim}", "panel": f"P={patch}", "x": f"D={dim}", "images": images,
            "grid": [grid, grid], "patch": patch, "channels": CHANNELS, "patches": images * grid * grid,
            "features": CHANNELS * patch * patch, "dim": dim, "dtype": str(dtype).removeprefix("torch."),
            "element_size": torch.empty((), dtype=dtype).element_size()}


def _progress_line(record: dict) -> str:
    head = f"{record['case']:<11} {record['mode']:<8} {record['provider']:<15}"
    if record["status"] != "ok":
        return f"{head} {record['status']}: {record['reason']}"
    line = (f"{head} {record['ms']:8.3f} ms ({record['ms_q20']:.3f}-{record['ms_q80']:.3f}) "
            f"{record['throughput']:8.1f} GB/s {record['tflops']:7.1f} TFLOP/s "
            f"({100 * record['tflops_share']:.0f}% of matmul)")
    if record.get("peak_mem_mib") is not None:
        line += f"  peak +{record['peak_mem_mib']:.0f} MiB"
    return line


# ----------------------------------------------------------------------------------------------------
# Tables and the targets of issue 8
# ----------------------------------------------------------------------------------------------------


def _detail_cell(r: dict, provider: str) -> str:
    cell = (f"{r['ms']:.3g} ms · {r['throughput']:.0f} GB/s · {r['tflops']:.0f} TFLOP/s "
            f"({100 * r['tflops_share']:.0f}%)")
    if r.get("ours_ratio") is not None:
        cell += f" · {r['ours_ratio']:.2f}×"
    return cell


def detail_tables(payload: dict) -> list[dict]:
    """Per mode: ms, GB/s, TFLOP/s (share of the matmul ceiling) and finevit's speedup over each provider."""
    return harness.mode_tables(
        payload, _detail_cell, f"{{mode}}: time · GB/s · TFLOP/s · speedup of {OURS}",
        "Median ms · useful bytes / time (see the config's `bytes`) · useful FLOPs / time (share of the measured "
        "matmul ceiling) · finevit's speedup over that provider.")


def traffic_table(cases: list[dict]) -> dict:
    rows = []
    for c in cases:
        traffic = forward_traffic(c["patches"], c["features"], c["dim"], c["element_size"])
        rows += [[c["case"], name, harness._fmt(nbytes / 1e9), f"{nbytes / traffic[OURS][0]:.2f}×", how]
                 for name, (nbytes, how) in traffic.items()]
    return {"title": "Bytes each provider's forward moves (computed, not measured)",
            "note": "Per op, reads plus writes, caches ignored; GB = 10⁹ bytes; ratio to finevit's.",
            "header": ["case", "provider", "GB", "vs finevit", "ops"], "rows": rows}


def _ratio_check(name: str, op: str, threshold: float, values: list[tuple[float, str]]) -> dict:
    if not values:
        return {"name": name, "value": None, "threshold": threshold, "op": op, "met": None, "detail": "not measured"}
    worst, case = (max if op == "≤" else min)(values)
    met = {"≥": worst >= threshold, ">": worst > threshold, "≤": worst <= threshold}[op]
    return {"name": name, "value": worst, "threshold": threshold, "op": op, "met": met,
            "detail": f"worst of {len(values)} case(s): {case}; all: "
                      + ", ".join(f"{c} {v:.2f}" for v, c in values)}


def check_targets(results: list[dict], cases: list[dict], modes: list[str]) -> list[dict]:
    ok = {(r["case"], r["mode"], r["provider"]): r for r in results if r["status"] == "ok"}

    def ratios(mode: str, provider: str, ours_over_theirs: bool) -> list[tuple[float, str]]:
        values = []
        for c in cases:
            ours, theirs = ok.get((c["case"], mode, OURS)), ok.get((c["case"], mode, provider))
            if ours and theirs:
                values.append(((ours["ms"] / theirs["ms"]) if ours_over_theirs else (theirs["ms"] / ours["ms"]),
                               c["case"]))
        return values

    checks = []
    if "fwd" in modes:
        checks.append(_ratio_check(f"fwd: {OURS} time / bare GEMM time", "≤", TARGET_GEMM_RATIO,
                                   ratios("fwd", "bare_gemm", True)))
    if "fwd+bwd" in modes:
        checks.append(_ratio_check(f"fwd+bwd: speedup of {OURS} over the PyTorch path (torch)", "≥", TARGET_SPEEDUP,
                                   ratios("fwd+bwd", "torch", False)))
        checks.append(_ratio_check(f"fwd+bwd: speedup of {OURS} over torch.compile of it (torch_compiled)", ">",
                                   TARGET_COMPILED_SPEEDUP, ratios("fwd+bwd", "torch_compiled", False)))
    return checks


def _print_checks(checks: list[dict], smoke: bool) -> None:
    print("\nTargets (issue 19; H100/H200, bf16)" + (": CPU smoke run, meaningless" if smoke else ":"))
    for c in checks:
        status = {True: "met", False: "NOT MET", None: "not measured"}[c["met"]]
        value = "-" if c["value"] is None else f"{c['value']:.2f}"
        print(f"  {c['name']:<56} {value:>6}  ({c['op']} {c['threshold']:g})  {status:<12} {c['detail']}")


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    run = harness.start(__doc__, PROVIDERS, argv, ops=("patch_embed",), quick_help="modes fwd and fwd+bwd only",
                        seed_help="seed of the pixels and weights")
    if run.smoke:
        images, grid, dims, dtype = SMOKE_IMAGES, SMOKE_GRID, SMOKE_DIMS, torch.float32
    else:
        images, grid, dims, dtype = IMAGES, GRID, DIMS, torch.bfloat16
    providers = run.providers(PROVIDERS)
    modes = run.modes(["fwd", "fwd+bwd"] if run.args.quick else harness.MODES)
    payload = run.payload(
        "patch_embed", providers=providers, modes=modes, layout={"panel": "panel", "x": "x"},
        metric={"unit": "GB/s", "ceiling": "copy"}, tables=[],
        config={"dtype": str(dtype).removeprefix("torch."), "images": images, "grid": [grid, grid],
                "patches": list(PATCHES), "dims": list(dims), "channels": CHANNELS, "mean": MEAN, "std": STD,
                "flops": "fwd 2·N·K·D, bwd 2·N·K·D (dW), fwd+bwd 4·N·K·D",
                "bytes": "minimum of a fused op, the same for every provider: fwd N·K (uint8) + 2·D·K + 2·D + "
                         "2·N·D; bwd 2·N·D (dy) + N·K + 2·D·K + 2·D (dW, db); fwd+bwd the sum"})
    results = payload["results"]
    kernels = importlib.import_module("finevit.kernels.patch_embed")  # `K.patch_embed` is the public function
    autotune = harness.AutotuneLog({"fwd": kernels._fwd_tuned[False], "fwd_fp32": kernels._fwd_tuned[True],
                                    "dweight": kernels._dweight_tuned[False],
                                    "dweight_fp32": kernels._dweight_tuned[True]})
    for patch, dim in harness.warmup_cases(list(product(PATCHES, dims))):
        case = describe_case(images, grid, patch, dim, dtype)
        payload["cases"].append(case)
        inputs = make_inputs(images, grid, patch, dim, dtype, run.device, seed=run.args.seed)
        results += harness.run_providers(
            providers, lambda name, ours_out: run_provider(name, inputs, case, modes, run.device,  # noqa: B023 (run now)
                                                           run.ceilings, ours_out),
            OURS, _progress_line, autotune, case["case"])
        inputs = None  # frees it (the lambda's cell) before free_memory
        harness.free_memory(run.device)
        harness.add_ratios(results, OURS)
        payload["autotune"] = autotune.entries
        run.save(payload)

    if harness.warmup_shard() is not None:
        return
    payload["checks"] = check_targets(results, payload["cases"], modes)
    payload["tables"] = detail_tables(payload) + [traffic_table(payload["cases"]), autotune.table()]

    def report() -> None:
        for table in payload["tables"]:
            print(f"\n### {table['title']}\n\n" + harness._table(table["header"], table["rows"]))
        _print_checks(payload["checks"], run.smoke)
    run.finish(payload, report)


if __name__ == "__main__":
    main()
