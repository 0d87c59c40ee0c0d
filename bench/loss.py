"""Benchmark of `finevit.kernels.siglip_loss` / `clip_loss` (tiled) against losses that materialize B×B logits.

    python bench/loss.py [--quick] [--out DIR] [--providers a,b,...] [--modes fwd,bwd,fwd+bwd] [--probe-max N]
                         [--cpu-smoke]

Without a CUDA device it prints "no CUDA device: nothing to benchmark" and exits 0.

Workloads (one GPU, the loss alone: no model, no communication)
    losses          siglip (pairwise sigmoid, learnable scale and bias) and clip (softmax, learnable scale)
    B (pairs)       4096, 16384, 65536, 262144 (--quick: 4096, 16384, 65536, and D = 1152 only)
    D               768 and 1152
    features        img, txt: (B, D) bf16, rows L2-normalized (in fp32, then rounded), fixed seed
    logit_scale     exp(log 10) = 10, logit_bias −10 (SigLIP's initialization): 0-d fp32 leaf tensors with
                    requires_grad, passed already exponentiated, as the public functions take them
    modes           fwd (forward without autograd graph) and fwd+bwd (gradients w.r.t. img, txt, scale, bias)

Providers (each a forward closure returning the scalar loss of the same inputs)
    finevit     the public `finevit.kernels.siglip_loss` / `clip_loss`, dispatched as a user gets them
                (FINEVIT_KERNELS unset: the Triton kernel on CUDA). The path the dispatch takes,
                `finevit.kernels._dispatch.use_triton(op, device)` ("triton" or "reference"), is printed and
                recorded in the JSON; a warning is printed when that is the reference on CUDA.
    naive       `finevit.kernels.reference.siglip_loss` / `clip_loss` called directly: the eager PyTorch loss
                of the tests' oracle. It casts the features to fp32 and materializes the B×B logits (CLIP:
                both directions) and their autograd intermediates.
    open_clip   `open_clip.loss.SigLipLoss()` / `ClipLoss()` (single process), when open_clip imports.
                It computes the logits in the features' dtype (bf16 here), also B×B.
Before timing, each provider's loss value is compared with finevit's (`rel_diff_vs_ours`; a warning above 1%).

Measured, per (loss, D, B, provider, mode)
    ms              do_bench median and 20/80 % quantiles (bench/_harness.py; L2 flushed, grads reset between reps)
    pairs/s         B² / time: logit pairs scored per second
    TFLOP/s         useful work only, the same for every provider: forward 2·B²·D (the one B×B logits product),
                    backward 4·B²·D (the two products giving d_img and d_txt): fwd 2·B²·D, fwd+bwd 6·B²·D.
                    Tiles a fused kernel recomputes in its backward, and the reference's second B×B product for
                    CLIP's text->image direction, are not counted: every provider is charged the same FLOPs,
                    so TFLOP/s ratios are time ratios.
    extra peak      the most memory one step allocates above what was live before it (inputs, scale, bias and
                    the harness' output-gradient scalar excluded; their gradients, allocated by the step, are
                    included): torch.cuda.max_memory_allocated − memory_allocated, in GB = 10⁹ bytes.
    ratio           finevit's speedup over each baseline (its ms / finevit's ms, > 1: finevit is faster)
Out of memory: a step that raises torch.cuda.OutOfMemoryError is recorded with status "oom". Peak memory
grows with B, D and the mode (fwd < bwd < fwd+bwd), so an OOM at (B, D, mode) marks every case with
B' ≥ B, D' ≥ D and a mode at least as heavy as "skipped" for that provider and loss, without running it.

Largest batch that fits (finevit alone, D = 1152, bf16, fwd+bwd of the loss): B doubles from 65,536 until the
step runs out of memory or B passes --probe-max (default 2²¹, --quick 2²⁰ = the 1M target). One step per B,
timed by the wall clock rather than do_bench (it may include Triton autotuning for a new B), with its extra peak
memory. A doubling whose predicted time (4× the last step) passes --probe-step-limit-s (150 s) is not run.

Memory model (computed, not measured): for the issue's B values, the bytes of one B×B fp32 logits matrix
(B²·4; the reference keeps several alive) against the O(B·D) state of a tiled implementation (the d_img and
d_txt it must return, plus CLIP's two O(B) log-sum-exp vectors). Printed at the start of every run.

Targets of issue 4 (H100, bf16, one run), printed with met / not met and written to the JSON:
    extra peak memory of finevit's fwd+bwd at B = 65,536, D = 1152 ≤ 1 GB, per loss;
    finevit fwd+bwd ≥ 1.5× faster than naive at the largest B naive fits (D = 1152), per loss;
    largest batch finevit fits (fwd+bwd, D = 1152) ≥ 1,048,576 pairs, per loss.

Files: bench/results/loss_<gpu>_<date>.{json,md,png}; regenerate the .md/.png from the JSON with
`python bench/_harness.py <file>.json`. The plot: TFLOP/s bars over B, one panel per loss × D, one row per mode.

`--cpu-smoke` runs a tiny fp32 version on the CPU (B 64 and 256, D 16 and 64, FINEVIT_KERNELS=reference for
the finevit provider since Triton kernels need a GPU or the interpreter, a wall-clock timer, a probe from
B = 256 to 1024 at D = 64) through the same code paths, to check the script without a GPU. Its peak memory
comes from the allocations torch.profiler records on the CPU (profile_memory=True), a step's allocations
and frees summed in time order; the targets are then evaluated on the smoke sizes and mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import _harness as harness
import torch
import torch.nn.functional as F

import finevit.kernels as K
from finevit.kernels import reference

OURS = "finevit"
LOSSES = ("siglip", "clip")
BATCHES = (4096, 16384, 65536, 262144)
QUICK_BATCHES = (4096, 16384, 65536)
DIMS = (768, 1152)
QUICK_DIMS = (1152,)  # the targets' width; the D=768 cases add ~40 s on an H100
SMOKE_BATCHES = (64, 256)
SMOKE_DIMS = (16, 64)
INIT_SCALE = 10.0  # = exp(log 10): logit_scale as the loss receives it, the exp of the learned log-scale
INIT_BIAS = -10.0
MODES = ("fwd", "fwd+bwd")
MODE_WEIGHT = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}  # heavier modes need at least the memory of lighter ones
FLOP_PER_PAIR_DIM = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}  # × B²·D
GB = 1e9
DIFF_WARNING = 0.01

# Issue 4's targets.
TARGET_BATCH = 65536
TARGET_DIM = 1152
TARGET_MEMORY_GB = 1.0
TARGET_SPEEDUP = 1.5
TARGET_LARGEST = 2**20
PROBE_START = 65536
PROBE_MAX = 2**21
QUICK_PROBE_MAX = 2**20
SMOKE_PROBE = (256, 1024)
MODEL_BATCHES = (4096, 16384, 65536, 262144, 2**20)  # the B values, for the memory model


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    img: torch.Tensor  # (B, D), L2-normalized rows, requires grad
    txt: torch.Tensor
    logit_scale: torch.Tensor  # 0-d fp32, requires grad
    logit_bias: torch.Tensor

    @property
    def leaves(self) -> tuple[torch.Tensor, ...]:
        return (self.img, self.txt, self.logit_scale, self.logit_bias)


def make_inputs(batch: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)

    def features() -> torch.Tensor:
        x = torch.randn(batch, dim, device=device, dtype=torch.float32, generator=gen)
        return F.normalize(x, dim=-1).to(dtype).requires_grad_()

    def scalar(value: float) -> torch.Tensor:
        return torch.tensor(value, device=device, dtype=torch.float32, requires_grad=True)

    return Inputs(features(), features(), scalar(INIT_SCALE), scalar(INIT_BIAS))


def loss_flops(batch: int, dim: int, mode: str) -> float:
    """Useful FLOPs: fwd 2·B²·D, bwd 4·B²·D, fwd+bwd 6·B²·D (the same for every provider)."""
    return FLOP_PER_PAIR_DIM[mode] * batch * batch * dim


# ----------------------------------------------------------------------------------------------------
# Providers: builder(loss, inputs) -> forward closure returning the scalar loss; raise Unavailable to skip
# ----------------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """The provider cannot run here (missing package): recorded as skipped."""


Forward = Callable[[], torch.Tensor]


def finevit_loss(loss: str, x: Inputs) -> Forward:
    if loss == "siglip":
        return lambda: K.siglip_loss(x.img, x.txt, x.logit_scale, x.logit_bias)
    return lambda: K.clip_loss(x.img, x.txt, x.logit_scale)


def naive_loss(loss: str, x: Inputs) -> Forward:
    if loss == "siglip":
        return lambda: reference.siglip_loss(x.img, x.txt, x.logit_scale, x.logit_bias)
    return lambda: reference.clip_loss(x.img, x.txt, x.logit_scale)


@functools.cache
def _import_open_clip() -> tuple[type, type, str] | str:
    """(SigLipLoss, ClipLoss, version), or why open_clip does not import; tried once per run."""
    try:
        import open_clip
        from open_clip.loss import ClipLoss, SigLipLoss
    except Exception as error:  # noqa: BLE001 - ImportError, or a broken dependency of open_clip
        return f"open_clip does not import: {type(error).__name__}: {error}"
    return SigLipLoss, ClipLoss, getattr(open_clip, "__version__", "unknown")


def _open_clip_losses() -> tuple[type, type, str]:
    imported = _import_open_clip()
    if isinstance(imported, str):
        raise Unavailable(imported)
    return imported


def open_clip_loss(loss: str, x: Inputs) -> Forward:
    siglip_cls, clip_cls, _ = _open_clip_losses()
    if loss == "siglip":
        fn = siglip_cls()
        return lambda: fn(x.img, x.txt, x.logit_scale, x.logit_bias)
    fn = clip_cls()
    return lambda: fn(x.img, x.txt, x.logit_scale)


@dataclass(frozen=True)
class Provider:
    build: Callable[[str, Inputs], Forward]
    description: str


PROVIDERS: dict[str, Provider] = {
    "finevit": Provider(finevit_loss, "finevit.kernels.siglip_loss / clip_loss, as dispatched (Triton on CUDA)"),
    "naive": Provider(naive_loss, "finevit.kernels.reference siglip_loss / clip_loss: eager PyTorch, fp32 B×B "
                                  "logits (the tests' oracle)"),
    "open_clip": Provider(open_clip_loss, "open_clip.loss.SigLipLoss() / ClipLoss(), single process, B×B logits "
                                          "in the features' dtype"),
}


# ----------------------------------------------------------------------------------------------------
# Memory and out-of-memory bookkeeping
# ----------------------------------------------------------------------------------------------------


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


@dataclass(frozen=True)
class OomPoint:
    batch: int
    dim: int
    mode: str

    def implies(self, batch: int, dim: int, mode: str) -> bool:
        """Whether running out of memory here means (batch, dim, mode) runs out too."""
        return batch >= self.batch and dim >= self.dim and MODE_WEIGHT[mode] >= MODE_WEIGHT[self.mode]


def _known_oom(points: list[OomPoint], batch: int, dim: int, mode: str) -> OomPoint | None:
    return next((p for p in points if p.implies(batch, dim, mode)), None)


def _reset_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def cpu_peak_memory_mib(step: Callable[[], object], inputs) -> float | None:
    """Extra peak CPU memory of one step (MiB), from the allocations and frees torch.profiler records.

    The profiler's event tree carries one Allocation event per allocation (negative size for a free);
    summed in time order they give the memory live above the start, whose maximum is the extra peak.
    None when this torch's profiler does not expose them (the step runs all the same; its errors propagate).
    """
    from torch.profiler import ProfilerActivity, profile
    _reset_grads(inputs)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    _reset_grads(inputs)
    try:
        from torch._C._profiler import _EventType
        events, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while pending:
            event = pending.pop()
            pending.extend(event.children)
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                events.append((event.start_time_ns, event.extra_fields.alloc_size))
    except Exception as error:  # noqa: BLE001 - an internal API: no number rather than a failed run
        print(f"  (no CPU peak memory: {harness.error_reason(error)})")
        return None
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak / 2**20


def measure(forward: Forward, mode: str, device: torch.device, inputs: Inputs) -> dict:
    """harness.measure, with the CPU peak memory taken from the profiler on CPU runs."""
    if device.type == "cuda":
        return harness.measure(forward, mode, device, inputs.leaves)
    step = harness.make_step(forward, mode)
    return {**harness.time_fn(step, device, inputs.leaves), "peak_mem_mib": cpu_peak_memory_mib(step, inputs.leaves)}


# ----------------------------------------------------------------------------------------------------
# Running the cases
# ----------------------------------------------------------------------------------------------------


def run_provider(name: str, case: dict, inputs: Inputs, modes: list[str], device: torch.device, ceiling: float,
                 oom_points: list[OomPoint], ours_value: float | None) -> tuple[list[dict], float | None]:
    """All modes of one provider on one case -> result records (and its loss value, to compare).

    New out-of-memory points are appended to `oom_points` (this provider and loss's list).
    """
    batch, dim, loss = case["batch"], case["dim"], case["loss"]
    base = {"case": case["case"], "provider": name, "loss": loss, "batch": batch, "dim": dim}

    def known(mode: str, points: list[OomPoint] = oom_points) -> dict | None:
        point = _known_oom(points, batch, dim, mode)
        if point is None:
            return None
        return {**base, "mode": mode, "status": "skipped",
                "reason": f"not run: out of memory at B={point.batch}, D={point.dim}, {point.mode}"}

    if all(known(mode) for mode in modes):
        return [known(mode) for mode in modes], None
    failure = None
    try:
        forward = PROVIDERS[name].build(loss, inputs)
        start = time.perf_counter()
        with torch.no_grad():
            value = float(forward())  # first call: compiles / autotunes; the value is checked below
        first_call_s = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - any failure to build or run is recorded, not fatal
        status = "skipped" if isinstance(error, Unavailable) else "oom" if _is_oom(error) else "failed"
        failure = (status, harness.error_reason(error))
    if failure is not None:  # outside the except block, so the traceback's tensors are gone
        harness.free_memory(device)
        status, reason = failure
        if status != "oom":
            return [known(mode) or {**base, "mode": mode, "status": status, "reason": reason} for mode in modes], None
        # The forward alone ran out of memory: the lightest mode still to run records it, the heavier are implied.
        point = OomPoint(batch, dim, "fwd")
        first = next(mode for mode in modes if not known(mode))
        records = [known(mode) or known(mode, [point]) for mode in modes]
        records[modes.index(first)] = {**base, "mode": first, "status": "oom",
                                        "reason": f"out of memory in the forward (first call): {reason}"}
        oom_points.append(point)
        return records, None

    base.update(first_call_s=first_call_s, loss_value=value)
    if ours_value is not None and name != OURS:
        diff = abs(value - ours_value) / max(abs(ours_value), 1e-30)
        base["rel_diff_vs_ours"] = diff
        if diff > DIFF_WARNING:
            print(f"  WARNING: {name} loss {value:.6g} differs from {OURS}'s {ours_value:.6g} by {diff:.2%} "
                  f"on {case['case']}")
    records = []
    for mode in modes:
        record = known(mode)
        if record is not None:
            records.append(record)
            continue
        failure = None
        try:
            timing = measure(forward, mode, device, inputs)
        except Exception as error:  # noqa: BLE001
            failure = ("oom" if _is_oom(error) else "failed", harness.error_reason(error))
        if failure is not None:
            _reset_grads(inputs.leaves)
            harness.free_memory(device)
            if failure[0] == "oom":
                oom_points.append(OomPoint(batch, dim, mode))
            records.append({**base, "mode": mode, "status": failure[0], "reason": failure[1]})
            continue
        record = {**base, "mode": mode, "status": "ok", "reason": None, **timing,
                  "flop": loss_flops(batch, dim, mode), "pairs_per_s": batch * batch / (timing["ms"] * 1e-3)}
        record.update(harness.throughput(timing["ms"], record["flop"], ceiling))
        if timing["peak_mem_mib"] is not None:
            peak_bytes = timing["peak_mem_mib"] * 2**20
            record["peak_mem_gb"] = peak_bytes / GB
            record["peak_in_fp32_bxb"] = peak_bytes / (4 * batch * batch)  # B×B fp32 matrices' worth
        records.append(record)
    return records, value


def describe_case(loss: str, batch: int, dim: int, dtype: torch.dtype) -> dict:
    label = f"{batch // 1024}k" if batch >= 1024 and batch % 1024 == 0 else str(batch)
    return {"case": f"{loss} D{dim} B{label}", "loss": loss, "panel": f"{loss} D={dim}", "B": label,
            "batch": batch, "dim": dim, "dtype": str(dtype).removeprefix("torch."), "pairs": batch * batch,
            "logits_fp32_gb": 4 * batch * batch / GB}


def _progress_line(record: dict) -> str:
    head = f"{record['case']:<20} {record['mode']:<8} {record['provider']:<10}"
    if record["status"] != "ok":
        return f"{head} {record['status']}: {record['reason']}"
    line = (f"{head} {record['ms']:9.3f} ms ({record['ms_q20']:.3f}-{record['ms_q80']:.3f}) "
            f"{record['throughput']:7.2f} TFLOP/s {record['pairs_per_s'] / 1e9:8.2f} Gpair/s")
    if record.get("peak_mem_gb") is not None:
        line += f"  peak +{record['peak_mem_gb']:.3g} GB ({record['peak_in_fp32_bxb']:.2g}× B²·4)"
    return line


# ----------------------------------------------------------------------------------------------------
# Largest batch that fits (finevit alone)
# ----------------------------------------------------------------------------------------------------


def _one_step(forward: Forward, inputs: Inputs, device: torch.device) -> tuple[float, float | None, float]:
    """(seconds, extra peak MiB, loss value) of one forward + backward."""
    value: list[float] = []

    def step() -> None:
        loss = forward()
        loss.backward()
        value.append(float(loss.detach()))

    start = time.perf_counter()
    if device.type == "cuda":
        peak = harness.peak_memory_mib(step, device, inputs.leaves)  # synchronizes before and after
    else:
        peak = cpu_peak_memory_mib(step, inputs.leaves)
    return time.perf_counter() - start, peak, value[-1]


def probe_largest_batch(loss: str, dim: int, dtype: torch.dtype, device: torch.device, start: int, stop: int,
                        step_limit_s: float, seed: int) -> dict:
    """Double B from `start` while finevit's fwd+bwd fits, up to `stop`: the largest B that ran, and each try."""
    tries: list[dict] = []
    largest, batch, last_s = None, start, None
    stopped = f"reached --probe-max {stop}"
    while batch <= stop:
        if last_s is not None and 4 * last_s > step_limit_s:
            stopped = f"B={batch} not run: its step would take ~{4 * last_s:.0f} s > {step_limit_s:g} s"
            break
        failure, row, inputs = None, {"loss": loss, "batch": batch, "dim": dim}, None
        try:
            inputs = make_inputs(batch, dim, dtype, device, seed)
            seconds, peak_mib, value = _one_step(finevit_loss(loss, inputs), inputs, device)
        except Exception as error:  # noqa: BLE001
            failure = ("oom" if _is_oom(error) else "failed", harness.error_reason(error))
        inputs = None
        harness.free_memory(device)
        if failure is not None:
            row.update(status=failure[0], reason=failure[1])
            tries.append(row)
            print(f"  probe {loss} B={batch:>8} D={dim}: {failure[0]}: {failure[1]}", flush=True)
            stopped = f"B={batch} ran out of memory" if failure[0] == "oom" else f"B={batch} failed: {failure[1]}"
            break
        row.update(status="ok", seconds=seconds, loss_value=value,
                   peak_mem_gb=None if peak_mib is None else peak_mib * 2**20 / GB)
        tries.append(row)
        peak_text = "–" if peak_mib is None else f"{peak_mib * 2**20 / GB:.3f} GB"
        print(f"  probe {loss} B={batch:>8} D={dim}: ok in {seconds:.2f} s, peak +{peak_text}", flush=True)
        largest, last_s, batch = batch, seconds, 2 * batch
    return {"loss": loss, "dim": dim, "provider": OURS, "mode": "fwd+bwd", "largest_batch": largest,
            "stopped": stopped, "tries": tries}


# ----------------------------------------------------------------------------------------------------
# Memory model (computed, not measured)
# ----------------------------------------------------------------------------------------------------


def memory_model(batches, dims, dtype: torch.dtype) -> list[dict]:
    """One B×B fp32 logits matrix (B²·4 bytes) vs the O(B·D) state of a tiled loss (grads + CLIP's LSE)."""
    element = torch.empty((), dtype=dtype).element_size()
    return [{"batch": b, "dim": d, "logits_fp32_gb": 4 * b * b / GB,
             "tiled_siglip_gb": 2 * b * d * element / GB,  # d_img, d_txt
             "tiled_clip_gb": (2 * b * d * element + 2 * b * 4) / GB}  # + row and column log-sum-exp, fp32
            for d in dims for b in batches]


def _memory_model_table(rows: list[dict], dtype: torch.dtype) -> dict:
    name = str(dtype).removeprefix("torch.")
    return {"title": "Memory model (computed, not measured)",
            "note": f"One B×B fp32 logits matrix (B²·4 bytes; the eager losses keep several alive, see "
                    f"`peak_in_fp32_bxb` in the JSON) against the O(B·D) state a tiled loss must allocate: "
                    f"d_img and d_txt in {name} (2·B·D·{torch.empty((), dtype=dtype).element_size()} bytes), "
                    f"plus CLIP's two fp32 log-sum-exp vectors (2·B·4). GB = 10⁹ bytes.",
            "header": ["B", "D", "one B×B fp32 logits (GB)", "tiled SigLIP (GB)", "tiled CLIP (GB)"],
            "rows": [[f"{r['batch']:,}", str(r["dim"]), harness._fmt(r["logits_fp32_gb"]),
                      harness._fmt(r["tiled_siglip_gb"]), harness._fmt(r["tiled_clip_gb"])] for r in rows]}


# ----------------------------------------------------------------------------------------------------
# Tables and targets of issue 4
# ----------------------------------------------------------------------------------------------------


def _detail_cell(record: dict | None) -> str:
    if record is None:
        return ""
    if record["status"] != "ok":
        return {"oom": "OOM", "skipped": "skip"}.get(record["status"], "fail")
    text = f"{record['ms']:.3g} ms · {record['pairs_per_s'] / 1e9:.3g} Gpair/s"
    if record.get("peak_mem_gb") is not None:
        text += f" · {record['peak_mem_gb']:.3g} GB ({record['peak_in_fp32_bxb']:.2g}× B²·4)"
    return text


def detail_tables(payload: dict) -> list[dict]:
    """Per mode: ms, pairs/s and extra peak memory of each provider on each case."""
    index = {(r["case"], r["mode"], r["provider"]): r for r in payload["results"]}
    providers = [p for p in payload["providers"] if any(r["provider"] == p for r in payload["results"])]
    tables = []
    for mode in payload["modes"]:
        rows = [[c["case"]] + [_detail_cell(index.get((c["case"], mode, p))) for p in providers]
                for c in payload["cases"]]
        tables.append({"title": f"{mode}: time · pairs/s · extra peak memory",
                       "note": "Median ms · B²/time in 10⁹ pairs/s · extra peak memory in GB (10⁹ bytes) above "
                               "the inputs, and that peak in units of one B×B fp32 matrix (B²·4 bytes). "
                               "OOM: ran out of memory; skip: not run (see above).",
                       "header": ["case"] + providers, "rows": rows})
    return tables


def probe_table(probes: list[dict]) -> dict:
    rows = []
    for probe in probes:
        for t in probe["tries"]:
            status = t["status"] if t["status"] == "ok" else f"{t['status']}: {t['reason'][:80]}"
            rows.append([probe["loss"], f"{t['batch']:,}", str(t["dim"]), status,
                         f"{t['seconds']:.3g}" if t.get("seconds") is not None else "",
                         harness._fmt(t.get("peak_mem_gb")) if t["status"] == "ok" else ""])
    largest = "; ".join(f"{p['loss']}: {p['largest_batch'] or 0:,} ({p['stopped']})" for p in probes)
    return {"title": f"Largest batch that fits ({OURS}, fwd+bwd of the loss alone)",
            "note": f"One forward + backward per B, doubling until out of memory. Largest: {largest}.",
            "header": ["loss", "B", "D", "status", "wall s", "extra peak GB"], "rows": rows}


def check_targets(results: list[dict], cases: list[dict], probes: list[dict]) -> list[dict]:
    """Issue 4's targets, per loss, at B = 65,536 and D = 1152 (or the largest of this run, e.g. a smoke run)."""
    ok = {(r["case"], r["mode"], r["provider"]): r for r in results if r["status"] == "ok"}
    status = {(r["case"], r["mode"], r["provider"]): r for r in results}
    checks = []
    for loss in LOSSES:
        loss_cases = [c for c in cases if c["loss"] == loss]
        if not loss_cases:
            continue
        dims = sorted({c["dim"] for c in loss_cases})
        dim = TARGET_DIM if TARGET_DIM in dims else dims[-1]
        panel = sorted((c for c in loss_cases if c["dim"] == dim), key=lambda c: c["batch"])
        batches = [c["batch"] for c in panel]
        batch = TARGET_BATCH if TARGET_BATCH in batches else batches[-1]
        case = next(c for c in panel if c["batch"] == batch)

        ours = ok.get((case["case"], "fwd+bwd", OURS))
        naive = status.get((case["case"], "fwd+bwd", "naive"))
        naive_text = "not run" if naive is None else (
            f"{naive['peak_mem_gb']:.3g} GB" if naive["status"] == "ok" and naive.get("peak_mem_gb") is not None
            else "out of memory" if naive["status"] == "oom" else naive["reason"] or naive["status"])
        value = ours.get("peak_mem_gb") if ours else None
        checks.append({"name": f"{loss}: extra peak memory of {OURS} fwd+bwd, B={batch:,}, D={dim} (GB)",
                       "value": value, "threshold": TARGET_MEMORY_GB, "op": "≤",
                       "met": None if value is None else value <= TARGET_MEMORY_GB,
                       "detail": f"naive: {naive_text}" if value is not None else
                       f"{OURS}: {(status.get((case['case'], 'fwd+bwd', OURS)) or {}).get('status', 'not run')}"})

        both = [c for c in panel if (c["case"], "fwd+bwd", "naive") in ok and (c["case"], "fwd+bwd", OURS) in ok]
        naive_largest = max((c for c in panel if (c["case"], "fwd+bwd", "naive") in ok),
                            key=lambda c: c["batch"], default=None)
        if naive_largest is not None and naive_largest in both:
            ratio = ok[(naive_largest["case"], "fwd+bwd", "naive")]["ms"] / ok[(naive_largest["case"], "fwd+bwd",
                                                                                OURS)]["ms"]
            beyond = [status.get((c["case"], "fwd+bwd", "naive")) for c in panel if c["batch"] > naive_largest["batch"]]
            detail = f"B={naive_largest['batch']:,}; naive " + (
                "ran every B of this run" if not beyond else
                f"at B={beyond[0]['batch']:,}: {beyond[0]['reason']}" if beyond[0] else "not run beyond it")
            checks.append({"name": f"{loss}: fwd+bwd speedup over naive at the largest B it fits, D={dim}",
                           "value": ratio, "threshold": TARGET_SPEEDUP, "met": ratio >= TARGET_SPEEDUP,
                           "detail": detail})
        else:
            checks.append({"name": f"{loss}: fwd+bwd speedup over naive at the largest B it fits, D={dim}",
                           "value": None, "threshold": TARGET_SPEEDUP, "met": None,
                           "detail": "naive or finevit fwd+bwd did not run at any common B"})

        probe = next((p for p in probes if p["loss"] == loss), None)
        largest = probe["largest_batch"] if probe else None
        checks.append({"name": f"{loss}: largest batch {OURS} fits, fwd+bwd, D={probe['dim'] if probe else '–'}",
                       "value": largest, "threshold": TARGET_LARGEST,
                       "met": None if probe is None else (largest or 0) >= TARGET_LARGEST,
                       "detail": probe["stopped"] if probe else "probe not run"})
    return checks


def _print_checks(checks: list[dict], smoke: bool) -> None:
    print("\nTargets (issue 4; H100, bf16)" + (": CPU smoke run, evaluated on its tiny sizes, meaningless" if smoke
                                                else ":"))
    def number(v):
        return f"{v:,}" if isinstance(v, int) else f"{v:.3g}"

    for c in checks:
        status = {True: "met", False: "NOT MET", None: "not measured"}[c["met"]]
        value = "-" if c["value"] is None else number(c["value"])
        print(f"  {c['name']:<66} {value:>9}  ({c.get('op', '≥')} {number(c['threshold'])})  {status:<12} "
              f"{c['detail']}")


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def library_versions() -> dict:
    """Which code the open_clip provider runs: its version, or why it is unavailable."""
    try:
        return {"open_clip": _open_clip_losses()[2]}
    except Unavailable as error:
        return {"open_clip": f"unavailable ({error})"}


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--probe-max", type=int, default=None,
                        help=f"largest B the probe tries (default {PROBE_MAX}, --quick {QUICK_PROBE_MAX}; 0: no probe)")
    parser.add_argument("--probe-step-limit-s", type=float, default=150.0,
                        help="skip a probe doubling whose step would take longer than this (4× the last step)")


def print_memory_model(model: list[dict]) -> None:
    print("\nMemory model (computed, not measured; GB = 1e9 bytes; bf16 features):")
    print(f"  {'B':>9} {'D':>5} {'one BxB fp32 logits':>20} {'tiled SigLIP':>13} {'tiled CLIP':>11}")
    for r in model:
        print(f"  {r['batch']:>9,} {r['dim']:>5} {r['logits_fp32_gb']:>17.3f} GB {r['tiled_siglip_gb']:>10.3f} GB "
              f"{r['tiled_clip_gb']:>8.3f} GB")


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    run = harness.start(__doc__, PROVIDERS, argv, ops=("siglip_loss", "clip_loss"), libraries=library_versions,
                        quick_help="B up to 65,536 and the probe up to 2^20", seed_help="seed of the features",
                        modes_help="comma-separated subset of fwd,bwd,fwd+bwd (default fwd,fwd+bwd)",
                        options=add_options)
    args, device = run.args, run.device
    if run.smoke:
        batches, dims, dtype = SMOKE_BATCHES, SMOKE_DIMS, torch.float32
        probe_start, probe_max = SMOKE_PROBE
    else:
        batches, dims = (QUICK_BATCHES, QUICK_DIMS) if args.quick else (BATCHES, DIMS)
        dtype = torch.bfloat16
        probe_start, probe_max = PROBE_START, QUICK_PROBE_MAX if args.quick else PROBE_MAX
    if args.probe_max is not None:
        probe_max = args.probe_max
    providers = run.providers(PROVIDERS)
    modes = run.modes(MODES)
    modes.sort(key=MODE_WEIGHT.__getitem__)  # lighter first: an OOM there settles the heavier ones
    model = memory_model(MODEL_BATCHES, DIMS, torch.bfloat16)
    print_memory_model(model)

    payload = run.payload(
        "loss", providers=providers, modes=modes, layout={"panel": "panel", "x": "B"}, probe=[], memory_model=model,
        tables=[],
        config={"dtype": str(dtype).removeprefix("torch."), "batches": list(batches), "dims": list(dims),
                "logit_scale": INIT_SCALE, "logit_bias": INIT_BIAS,
                "float32_matmul_precision": torch.get_float32_matmul_precision(),  # the naive loss's fp32 GEMMs
                "flops": "fwd 2·B²·D, bwd 4·B²·D, fwd+bwd 6·B²·D (useful work, the same for all providers)",
                "peak_memory": "CUDA: max_memory_allocated − memory_allocated before the step" if device.type
                == "cuda" else "CPU: allocations − frees recorded by torch.profiler(profile_memory=True)",
                "probe": {"start": probe_start, "max": probe_max, "dim": dims[-1],
                          "step_limit_s": args.probe_step_limit_s}})
    results, probes = payload["results"], payload["probe"]
    oom_points: dict[tuple[str, str], list[OomPoint]] = {}
    for loss in LOSSES:
        for dim in dims:
            for batch in batches:
                case = describe_case(loss, batch, dim, dtype)
                payload["cases"].append(case)
                inputs = make_inputs(batch, dim, dtype, device, seed=args.seed)
                ours_value = None
                for name in providers:
                    records, value = run_provider(name, case, inputs, modes, device, run.ceilings["matmul"]["tflops"],
                                                  oom_points.setdefault((name, loss), []), ours_value)
                    if name == OURS:
                        ours_value = value
                    for record in records:
                        print(_progress_line(record), flush=True)
                    results += records
                del inputs
                harness.free_memory(device)
                harness.add_ratios(results, OURS)
                run.save(payload)

    if probe_max >= probe_start and OURS in providers:
        print(f"\nLargest batch that fits ({OURS}, fwd+bwd, D={dims[-1]}, B from {probe_start:,} to {probe_max:,}):")
        for loss in LOSSES:
            probes.append(probe_largest_batch(loss, dims[-1], dtype, device, probe_start, probe_max,
                                              args.probe_step_limit_s, args.seed))
            run.save(payload)

    payload["checks"] = check_targets(results, payload["cases"], probes)
    payload["tables"] = detail_tables(payload) + ([probe_table(probes)] if probes else []) + [
        _memory_model_table(model, torch.bfloat16)]

    def report() -> None:
        for table in payload["tables"][:len(modes)]:
            print(f"\n### {table['title']}\n\n" + harness._table(table["header"], table["rows"]))
        _print_checks(payload["checks"], run.smoke)
    run.finish(payload, report)
    print(f"elapsed {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
