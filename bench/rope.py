"""Benchmark of `finevit.kernels.apply_rope` (standalone rotate-half RoPE, one Triton kernel) against the PyTorch paths.

    python bench/rope.py [--quick] [--out DIR] [--providers a,b,...] [--modes fwd,bwd,fwd+bwd] [--cpu-smoke]

Without a CUDA device it prints "no CUDA device: nothing to benchmark" and exits 0.

Workloads (issue 19, item 3): T = 65,536 tokens (64 images of 32×32 patches), x bf16 with fixed-seed values;
cos/sin float32 (T, r/2) from `finevit.kernels.rope_2d_cos_sin` on the raster positions (row, col) of each
image, r = D (every channel rotated). Two layouts:
    packed      FineViT's: x a contiguous (T, H, D) leaf, cos/sin contiguous; (H, D) = 16×64 (the issue's case),
                12×64, 16×72, 16×80, 16×128
    qwen2_vl    what finevit/integrations/qwen2_vl.py hands the op: x = qkv.reshape(T, 3, H, D).unbind(1)[0], a
                strided view of a (T, 3·H·D) projection (token stride 3·H·D; detached, so the leaf is the view
                and its gradient is x's alone), H = 16, D = 80; cos/sin = the tower's (T, D) float32 [c, c]
                tables sliced to [:, :D/2] (views with row stride D)
Modes: fwd (no autograd graph) and bwd (gradient w.r.t. x only, through autograd: for finevit the conjugate
rotation, the same kernel with sin -> −sin); fwd+bwd on request (--modes). `--quick`: packed 16×64 and 16×80,
qwen2_vl 16×80.

Providers (each a forward closure over the same x, cos and sin)
    finevit         `finevit.kernels.apply_rope(x, cos, sin)` as dispatched (FINEVIT_KERNELS unset: the Triton kernel
                    on CUDA; the implementation is printed and recorded in the JSON)
    torch_eager     `finevit.kernels.reference.apply_rope` (the tests' oracle): fp32 halves, two products each,
                    torch.cat, cast back, torch.cat with the pass-through channels
    torch_compiled  the same function under torch.compile(dynamic=False) (Inductor fuses it into one kernel);
                    compiled once per case and mode, compile time excluded (recorded as first_call_s); CUDA only
    qwen2_vl_hf     qwen2_vl layout only, when transformers imports: its
                    `modeling_qwen2_vl.apply_rotary_pos_emb_vision(q, k, cos, sin)` on x with the un-sliced (T, D)
                    duplicated tables; k is an empty (T, 0, D) tensor and only q's output is returned, so the timed
                    work is one tensor's rotation, as for every other provider
    copy            the bandwidth reference: `torch.empty(x.shape).copy_(x)` (a contiguous copy of the same x); its
                    backward copies the incoming gradient the same way
Before timing, each RoPE provider's forward output is compared with finevit's (`rel_diff_vs_ours`, max |Δ| / max
|ours|); the copy is not (it rotates nothing).

Measured, per (case, provider, mode): do_bench median and 20/80 % quantiles (bench/_harness.py: L2 flushed, grads
reset between reps), extra peak memory, and
    bytes           RoPE providers: the minimum the op must move, the same for every one of them (so their GB/s
                    ratios are time ratios): read x + write the output, T·H·D·e each (e = x's element size), plus
                    cos and sin, 2·T·(r/2)·4; the backward reads dy, writes dx and reads cos/sin: the same count;
                    fwd+bwd twice it. qwen2_vl_hf reads full-width (T, D) tables but is charged the same.
                    copy: what it moves, read x + write out = 2·T·H·D·e (twice for fwd+bwd).
    GB/s            bytes / time, and its share of the measured device-to-device copy ceiling (read + write of
                    1 GiB, `ceilings` in the JSON)
    vs copy         this provider's GB/s / the copy provider's GB/s on the same case and mode
    ratio           finevit's speedup over each provider (its ms / finevit's ms)

Targets of issue 19 (H100, bf16), per mode (fwd, bwd): finevit's GB/s ≥ 80 % of the measured copy ceiling, the
minimum over the run's cases (the worst case is named). Printed with met / not met and written to the JSON;
finevit's speedup over torch_compiled is informational (the per-case table), not a target.
Files: bench/results/rope_<gpu>_<date>.{json,md,png}; regenerate the .md/.png from the JSON with
`python bench/_harness.py <file>.json`.

`--cpu-smoke` runs a tiny fp32 version on the CPU (T = 256, packed 2×16 and 2×20, qwen2_vl 2×20,
FINEVIT_KERNELS=reference, a wall-clock timer, no torch_compiled) through the same code paths, to check the script
without a GPU.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import _harness as harness
import torch

import finevit.kernels as K
from finevit.kernels import reference

OURS = "finevit"
COPY = "copy"
TOKENS, GRID = 65536, 32  # 64 images × 32×32 patches
PACKED = ((16, 64), (12, 64), (16, 72), (16, 80), (16, 128))  # (H, D)
QWEN2_VL = (16, 80)
QUICK = (("packed", 16, 64), ("packed", 16, 80), ("qwen2_vl", *QWEN2_VL))
SMOKE_TOKENS, SMOKE_GRID = 256, 16
SMOKE_CASES = (("packed", 2, 16), ("packed", 2, 20), ("qwen2_vl", 2, 20))
TABLE_BYTES = 4  # cos / sin are float32
DIFF_WARNING = 0.02
TARGET_COPY_SHARE = 0.8  # of the measured copy ceiling
TARGET_MODES = ("fwd", "bwd")
MODE_FACTOR = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}


# ----------------------------------------------------------------------------------------------------
# Workload
# ----------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    x: torch.Tensor  # (T, H, D) leaf with requires_grad: contiguous (packed) or a strided view of qkv (qwen2_vl)
    cos: torch.Tensor  # float32 (T, r/2): contiguous (packed) or a view with row stride D (qwen2_vl)
    sin: torch.Tensor
    cos_full: torch.Tensor | None  # qwen2_vl: the tower's (T, D) [c, c] tables, for qwen2_vl_hf
    sin_full: torch.Tensor | None
    layout: str

    @property
    def leaves(self) -> tuple[torch.Tensor, ...]:
        return (self.x,)


def raster_positions(tokens: int, grid: int, device: torch.device) -> torch.Tensor:
    """(row, col) of each token: images of grid×grid patches in raster order, one after the other."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    one = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (grid², 2)
    return one.repeat(-(-tokens // (grid * grid)), 1)[:tokens].to(device)


def make_inputs(layout: str, tokens: int, grid: int, heads: int, head_dim: int, dtype: torch.dtype,
                device: torch.device, seed: int = 0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    cos, sin = K.rope_2d_cos_sin(raster_positions(tokens, grid, device), head_dim)  # (T, D/2) float32
    if layout == "packed":
        x = torch.randn(tokens, heads, head_dim, device=device, generator=gen).to(dtype).requires_grad_()
        return Inputs(x, cos, sin, None, None, layout)
    qkv = torch.randn(tokens, 3 * heads * head_dim, device=device, generator=gen).to(dtype)
    x = qkv.reshape(tokens, 3, heads, head_dim).unbind(1)[0].detach().requires_grad_()  # token stride 3·H·D
    cos_full, sin_full = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)  # (T, D): [c, c]
    half = head_dim // 2
    return Inputs(x, cos_full[:, :half], sin_full[:, :half], cos_full, sin_full, layout)


def useful_bytes(case: dict, mode: str) -> float:
    """The RoPE op's minimum traffic: read x + write out (T·H·D·e each) + cos and sin (2·T·(r/2)·4)."""
    t, h, d, r, e = (case[k] for k in ("tokens", "heads", "head_dim", "rotary_dim", "element_size"))
    return MODE_FACTOR[mode] * (2 * t * h * d * e + 2 * t * (r // 2) * TABLE_BYTES)


def copy_bytes(case: dict, mode: str) -> float:
    """What the copy moves: read x + write out."""
    t, h, d, e = (case[k] for k in ("tokens", "heads", "head_dim", "element_size"))
    return MODE_FACTOR[mode] * 2 * t * h * d * e


# ----------------------------------------------------------------------------------------------------
# Providers: builder(inputs) -> forward closure returning (T, H, D); raise Unavailable to skip
# ----------------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """The provider cannot run here: recorded as skipped."""


Forward = Callable[[], torch.Tensor]


def finevit(x: Inputs) -> Forward:
    return lambda: K.apply_rope(x.x, x.cos, x.sin)


def torch_eager(x: Inputs) -> Forward:
    return lambda: reference.apply_rope(x.x, x.cos, x.sin)


def torch_compiled(x: Inputs) -> Forward:
    if x.x.device.type != "cuda":
        raise Unavailable("needs a CUDA device (Inductor on CPU compiles C++, too slow for a smoke run)")
    fn = harness.compiled(reference.apply_rope)
    return lambda: fn(x.x, x.cos, x.sin)


def _hf_rope() -> Callable:
    try:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    except ImportError as error:
        raise Unavailable(f"transformers' Qwen2-VL does not import: {harness.error_reason(error)}") from error
    return apply_rotary_pos_emb_vision


def qwen2_vl_hf(x: Inputs) -> Forward:
    rope = _hf_rope()
    tokens, _, head_dim = x.x.shape
    k = x.x.new_empty((tokens, 0, head_dim))  # no heads: the k half of the call does no work
    return lambda: rope(x.x, k, x.cos_full, x.sin_full)[0]


class _Copy(torch.autograd.Function):
    """A contiguous copy of x; its backward copies the incoming gradient the same way (read dy, write dx)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device).copy_(grad)


def copy(x: Inputs) -> Forward:
    return lambda: _Copy.apply(x.x)


@dataclass(frozen=True)
class Provider:
    build: Callable[[Inputs], Forward]
    description: str
    layouts: tuple[str, ...] = ("packed", "qwen2_vl")  # the layouts it runs on (no record on the others)
    rope: bool = True  # False: the copy, whose bytes are its own and whose output is not compared


PROVIDERS: dict[str, Provider] = {
    OURS: Provider(finevit, "finevit.kernels.apply_rope, as dispatched (Triton on CUDA; backward: the conjugate "
                            "rotation, the same kernel)"),
    "torch_eager": Provider(torch_eager, "the PyTorch path: finevit.kernels.reference.apply_rope (the tests' oracle), "
                                         "fp32 math, torch.cat of the rotated halves"),
    "torch_compiled": Provider(torch_compiled, "the PyTorch path under torch.compile(dynamic=False), compile time "
                                               "excluded (CUDA only)"),
    "qwen2_vl_hf": Provider(qwen2_vl_hf, "transformers' Qwen2-VL apply_rotary_pos_emb_vision on q with the (T, D) "
                                         "duplicated cos/sin, k empty (qwen2_vl layout only)", layouts=("qwen2_vl",)),
    COPY: Provider(copy, "bandwidth reference: torch.empty(x.shape).copy_(x), a contiguous copy of x (backward: the "
                         "same copy of dy); bytes: read + write of x", rope=False),
}


# ----------------------------------------------------------------------------------------------------
# Running the cases
# ----------------------------------------------------------------------------------------------------


def run_provider(name: str, inputs: Inputs, case: dict, modes: list[str], device: torch.device,
                 ceilings: dict, ours_out: torch.Tensor | None) -> tuple[list[dict], torch.Tensor | None]:
    """All modes of one provider on one case -> result records (and its forward output, to compare)."""
    provider = PROVIDERS[name]
    if case["layout"] not in provider.layouts:
        return [], None
    base = {"case": case["case"], "provider": name}
    failure = None
    try:
        forward = provider.build(inputs)
        start = time.perf_counter()
        with torch.no_grad():
            out = forward()  # first call: compiles, then the output check
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first_call_s = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - any failure to build or run is recorded, not fatal
        failure = ("skipped" if isinstance(error, Unavailable) else "failed", harness.error_reason(error))
    if failure is not None:
        harness.free_memory(device)
        return [{**base, "mode": mode, "status": failure[0], "reason": failure[1]} for mode in modes], None
    base["first_call_s"] = first_call_s
    if provider.rope and ours_out is not None and name != OURS:
        diff = (out.float() - ours_out.float()).abs().max() / ours_out.float().abs().max().clamp_min(1e-30)
        base["rel_diff_vs_ours"] = float(diff)
        if diff > DIFF_WARNING:
            print(f"  WARNING: {name} differs from {OURS} by {float(diff):.1%} (max |Δ| / max |{OURS}|) "
                  f"on {case['case']}")
    records = []
    for mode in modes:
        try:
            timing = harness.measure(forward, mode, device, inputs.leaves)
        except Exception as error:  # noqa: BLE001
            harness.free_memory(device)
            records.append({**base, "mode": mode, "status": "failed", "reason": harness.error_reason(error)})
            continue
        nbytes = useful_bytes(case, mode) if provider.rope else copy_bytes(case, mode)
        record = {**base, "mode": mode, "status": "ok", "reason": None, **timing, "bytes": nbytes}
        record.update(harness.throughput(timing["ms"], nbytes, ceilings["copy"]["gbps"], scale=1e9))  # GB/s
        records.append(record)
    return records, out


def _measured(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0  # NaN in a warm-up process


def add_copy_ratios(results: list[dict]) -> None:
    """Set `vs_copy` = (this record's GB/s) / (the copy provider's GB/s on the same case and mode)."""
    copy_gbps = {(r["case"], r["mode"]): r["throughput"] for r in results
                 if r["provider"] == COPY and r["status"] == "ok" and _measured(r.get("throughput"))}
    for r in results:
        key = (r["case"], r["mode"])
        if r["status"] == "ok" and _measured(r.get("throughput")) and key in copy_gbps:
            r["vs_copy"] = r["throughput"] / copy_gbps[key]


def describe_case(layout: str, tokens: int, heads: int, head_dim: int, dtype: torch.dtype) -> dict:
    return {"case": f"{layout} {heads}x{head_dim}", "layout": layout, "heads_dim": f"{heads}x{head_dim}",
            "tokens": tokens, "heads": heads, "head_dim": head_dim, "rotary_dim": head_dim,
            "dtype": str(dtype).removeprefix("torch."), "element_size": torch.empty((), dtype=dtype).element_size()}


def _progress_line(record: dict) -> str:
    head = f"{record['case']:<17} {record['mode']:<8} {record['provider']:<15}"
    if record["status"] != "ok":
        return f"{head} {record['status']}: {record['reason']}"
    line = (f"{head} {record['ms']:8.4f} ms ({record['ms_q20']:.4f}-{record['ms_q80']:.4f}) "
            f"{record['throughput']:8.1f} GB/s")
    if record.get("ceiling_share") is not None:
        line += f" ({100 * record['ceiling_share']:.0f}% of the copy ceiling)"
    if record.get("peak_mem_mib") is not None:
        line += f"  peak +{record['peak_mem_mib']:.0f} MiB"
    return line


# ----------------------------------------------------------------------------------------------------
# Tables and the targets of issue 19
# ----------------------------------------------------------------------------------------------------


def _detail_cell(r: dict, provider: str) -> str:
    cell = f"{r['ms']:.3g} ms · {harness._fmt(r['throughput'])} GB/s"
    if r.get("ceiling_share") is not None:
        cell += f" ({100 * r['ceiling_share']:.0f}%)"
    if r.get("vs_copy") is not None and provider != COPY:
        cell += f" · {100 * r['vs_copy']:.0f}% of copy"
    if r.get("ours_ratio") is not None:
        cell += f" · {r['ours_ratio']:.2f}×"
    return cell


def detail_tables(payload: dict) -> list[dict]:
    """Per mode: ms · GB/s (share of the copy ceiling) · share of the copy provider's GB/s · finevit's speedup."""
    return harness.mode_tables(
        payload, _detail_cell, f"{{mode}}: time · GB/s · share of the copy · speedup of {OURS}",
        "Median ms · bytes / time (see the config's `bytes`; share of the measured copy ceiling) · GB/s as a "
        "share of the copy provider's on the same case · finevit's speedup over that provider.")


def ours_table(payload: dict) -> dict:
    """finevit per (case, mode): GB/s, share of the ceiling and of the copy, speedup over each baseline."""
    index = harness._index(payload)
    baselines = [p for p in payload["providers"] if p not in (OURS, COPY)]
    rows = []
    for mode in payload["modes"]:
        for c in payload["cases"]:
            ours = index.get((c["case"], mode, OURS))
            if ours is None or ours["status"] != "ok":
                continue
            row = [c["case"], mode, harness._fmt(ours["throughput"]),
                   "–" if ours.get("ceiling_share") is None else f"{100 * ours['ceiling_share']:.0f}%",
                   "–" if ours.get("vs_copy") is None else f"{100 * ours['vs_copy']:.0f}%"]
            for p in baselines:
                r = index.get((c["case"], mode, p))
                row.append(f"{r['ours_ratio']:.2f}×" if r and r.get("ours_ratio") is not None else "–")
            rows.append(row)
    return {"title": f"{OURS} per case",
            "note": "finevit's GB/s, its share of the measured copy ceiling (the target: ≥ 80 %) and of the copy "
                    "provider's GB/s on the same tensor, and its speedup over each baseline (informational).",
            "header": ["case", "mode", "GB/s", "of ceiling", "of copy"] + [f"× {p}" for p in baselines],
            "rows": rows}


def check_targets(results: list[dict], cases: list[dict], modes: list[str], ceiling_gbps: float | None) -> list[dict]:
    ok = {(r["case"], r["mode"], r["provider"]): r for r in results if r["status"] == "ok"}
    checks = []
    for mode in [m for m in TARGET_MODES if m in modes]:
        name = f"{mode}: {OURS} GB/s / measured copy ceiling"
        shares = [(ok[(c["case"], mode, OURS)]["ceiling_share"], c["case"]) for c in cases
                  if (c["case"], mode, OURS) in ok and ok[(c["case"], mode, OURS)].get("ceiling_share") is not None]
        if not shares:
            checks.append({"name": name, "value": None, "threshold": TARGET_COPY_SHARE, "op": "≥", "met": None,
                           "detail": "not measured"})
            continue
        worst, case = min(shares)
        checks.append({"name": name, "value": worst, "threshold": TARGET_COPY_SHARE, "op": "≥",
                       "met": worst >= TARGET_COPY_SHARE,
                       "detail": f"worst of {len(shares)} case(s): {case}; ceiling {harness._fmt(ceiling_gbps)} GB/s; "
                                 "all: " + ", ".join(f"{c} {v:.2f}" for v, c in shares)})
    return checks


def _print_checks(checks: list[dict], smoke: bool) -> None:
    print("\nTargets (issue 19; H100, bf16)" + (": CPU smoke run, meaningless" if smoke else ":"))
    for c in checks:
        status = {True: "met", False: "NOT MET", None: "not measured"}[c["met"]]
        value = "-" if c["value"] is None else f"{c['value']:.2f}"
        print(f"  {c['name']:<44} {value:>6}  ({c['op']} {c['threshold']:g})  {status:<12} {c['detail']}")


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def library_versions() -> dict:
    """transformers' version and the signature of the Qwen2-VL rotation qwen2_vl_hf times."""
    try:
        import transformers

        rope = _hf_rope()
    except (ImportError, Unavailable):
        return {"transformers": None}
    return {"transformers": transformers.__version__,
            "apply_rotary_pos_emb_vision": str(inspect.signature(rope))}


def plan(args) -> tuple[list[tuple[str, int, int]], int, int, torch.dtype]:
    """(layout, H, D) of every case, tokens, grid side and dtype."""
    if args.cpu_smoke:
        return list(SMOKE_CASES), SMOKE_TOKENS, SMOKE_GRID, torch.float32
    if args.quick:
        return list(QUICK), TOKENS, GRID, torch.bfloat16
    return [("packed", h, d) for h, d in PACKED] + [("qwen2_vl", *QWEN2_VL)], TOKENS, GRID, torch.bfloat16


def main(argv: list[str] | None = None) -> None:
    run = harness.start(__doc__, PROVIDERS, argv, ops=("apply_rope",), libraries=library_versions,
                        quick_help="3 cases: packed 16x64 and 16x80, qwen2_vl 16x80",
                        seed_help="seed of the x values")
    cases, tokens, grid, dtype = plan(run.args)
    providers = run.providers(PROVIDERS)
    modes = run.modes(TARGET_MODES)
    payload = run.payload(
        "rope", providers=providers, modes=modes, layout={"panel": "layout", "x": "heads_dim"},
        metric={"unit": "GB/s", "ceiling": "copy"}, tables=[],
        config={"dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "grid": [grid, grid],
                "bytes": "RoPE providers: read x + write out (T·H·D·e each) + cos and sin (2·T·(r/2)·4), the same "
                         "for every one, fwd and bwd (dy in, dx out); copy: 2·T·H·D·e; fwd+bwd twice"})
    results = payload["results"]
    for layout, heads, head_dim in harness.warmup_cases(cases):
        case = describe_case(layout, tokens, heads, head_dim, dtype)
        payload["cases"].append(case)
        inputs = make_inputs(layout, tokens, grid, heads, head_dim, dtype, run.device, seed=run.args.seed)
        case.update(x_strides=list(inputs.x.stride()), cos_row_stride=inputs.cos.stride(0))  # the layout timed
        results += harness.run_providers(
            providers, lambda name, ours_out: run_provider(name, inputs, case, modes, run.device,  # noqa: B023 (run now)
                                                           run.ceilings, ours_out),
            OURS, _progress_line)
        inputs = None  # frees it (the lambda's cell) before free_memory
        harness.free_memory(run.device)
        harness.add_ratios(results, OURS)
        add_copy_ratios(results)
        shares = [f"{r['mode']} {100 * r['vs_copy']:.0f}%" for r in results
                  if r["case"] == case["case"] and r["provider"] == OURS and r.get("vs_copy") is not None]
        if shares:
            print(f"  {OURS} / {COPY} GB/s on {case['case']}: {', '.join(shares)}", flush=True)
        run.save(payload)

    if harness.warmup_shard() is not None:
        return
    payload["checks"] = check_targets(results, payload["cases"], modes, run.ceilings["copy"]["gbps"])
    payload["tables"] = [ours_table(payload)] + detail_tables(payload)

    def report() -> None:
        for table in payload["tables"]:
            print(f"\n### {table['title']}\n\n" + harness._table(table["header"], table["rows"]))
        _print_checks(payload["checks"], run.smoke)
    run.finish(payload, report)


if __name__ == "__main__":
    main()
