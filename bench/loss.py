"""Benchmark of `finevit.kernels.siglip_loss` / `clip_loss` (tiled) against losses that materialize B×B logits.

    python bench/loss.py [--quick] [--out DIR] [--providers a,b,...] [--modes fwd,bwd,fwd+bwd] [--probe-batch N]
                         [--probe-step-limit-s S] [--cpu-smoke]

Without a CUDA device it prints "no CUDA device: nothing to benchmark" and exits 0.

Workloads (one GPU, the loss alone: no model, no communication)
    losses          siglip (pairwise sigmoid, learnable scale and bias) and clip (softmax, learnable scale)
    B (pairs)       4096, 16384, 65536, 262144 (--quick: 4096, 16384, 65536)
    D               768 and 1152 (--quick too: the TFLOP/s target covers both)
    features        img, txt: (B, D) bf16, rows L2-normalized (in fp32, then rounded), fixed seed
    logit_scale     exp(log 10) = 10, logit_bias −10 (SigLIP's initialization): 0-d fp32 leaf tensors with
                    requires_grad, passed already exponentiated, as the public functions take them
    modes           fwd (forward without autograd graph) and fwd+bwd (gradients w.r.t. img, txt, scale, bias)

Providers (each a forward closure returning the scalar loss of the same inputs)
    finevit     the public `finevit.kernels.siglip_loss` / `clip_loss`, dispatched as a user gets them
                (FINEVIT_KERNELS unset: the Triton kernel on CUDA). The path the dispatch takes,
                `finevit.kernels._dispatch.use_triton(op, device)` ("triton" or "reference"), is printed and
                recorded in the JSON; a warning is printed when that is the reference on CUDA.
    naive_bf16  the main baseline, `naive_bf16_siglip_loss` / `naive_bf16_clip_loss` below: the eager loss a
                bf16 training run gets, as open_clip's losses run under autocast. logits = logit_scale ·
                (img @ txtᵀ), a bf16 GEMM of the bf16 features (the 0-d fp32 scale multiplies the bf16 B×B
                product, which stays bf16), then the loss math in fp32 under autograd. SigLIP:
                −logsigmoid(labels · (logits.float() + bias)).sum() / B with labels = 2·eye − 1 (B×B, in the
                features' dtype, as open_clip builds them); CLIP: the mean of the two cross-entropies of
                logits.float() (rows: image->text, columns: text->image; one GEMM). Features of another dtype
                (the CPU smoke run's fp32) are cast to bf16 first.
    naive       `finevit.kernels.reference.siglip_loss` / `clip_loss` called directly: the fp32 eager loss of
                the tests' oracle. It casts the features to fp32 and materializes the B×B fp32 logits (CLIP:
                both directions) and their autograd intermediates. An extra reference: no target uses it.
    open_clip   `open_clip.loss.SigLipLoss()` / `ClipLoss()` (single process), when open_clip imports, called
                inside `torch.autocast(device.type, dtype=torch.bfloat16)` as a bf16 training run calls it (on
                the CPU smoke run too: CPU autocast, so its fp32 features meet bf16 GEMMs there as well).
Before timing, each provider's loss value is compared with finevit's (`rel_diff_vs_ours`; a warning above 1%).
The bf16 providers differ from the fp32 ones by the rounding of bf16 logits (about 1e-3 relative).

Measured, per (loss, D, B, provider, mode)
    ms              do_bench median and 20/80 % quantiles (bench/_harness.py; L2 flushed, grads reset between reps)
    pairs/s         B² / time: logit pairs scored per second
    TFLOP/s         issue 17's count, the same for every provider: forward 2·B²·D (the B×B logits product),
                    fwd+bwd 8·B²·D (the backward recomputes the logits, then two gradient products give d_img
                    and d_txt: 6·B²·D; bwd alone is charged those 6·B²·D). Every provider is charged the same
                    FLOPs whatever it really computes (the eager losses keep their logits and skip the
                    recomputation; the fp32 reference computes CLIP's text->image product a second time), so
                    TFLOP/s ratios are time ratios.
    extra peak      the most memory one step allocates above what was live before it (inputs, scale, bias and
                    the harness' output-gradient scalar excluded; their gradients, allocated by the step, are
                    included): torch.cuda.max_memory_allocated − memory_allocated, in GB = 10⁹ bytes. Printed
                    per case in the "time · pairs/s · extra peak memory" tables.
    ratio           finevit's speedup over each baseline (its ms / finevit's ms, > 1: finevit is faster)
Out of memory: a step that raises torch.cuda.OutOfMemoryError is recorded with status "oom". Peak memory
grows with B, D and the mode (fwd < bwd < fwd+bwd), so an OOM at (B, D, mode) marks every case with
B' ≥ B, D' ≥ D and a mode at least as heavy as "skipped" for that provider and loss, without running it.

1M-pair probe (finevit alone, B = 1,048,576, D = 768, bf16, fwd+bwd of the loss, each loss): one warm-up step
(it may include Triton autotuning for the new B), then one timed step, each timed by the wall clock (synchronized)
with its extra peak memory; status ok / oom / failed. The timed step is not run when the warm-up step took
longer than --probe-step-limit-s (default 150 s); the warm-up's numbers are then reported instead.
--probe-batch changes B (0: no probe).

Memory model (computed, not measured): for the issue's B values, the bytes of one B×B fp32 logits matrix
(B²·4; the reference keeps several alive) against the O(B·D) state of a tiled implementation (the d_img and
d_txt it must return, plus CLIP's two O(B) log-sum-exp vectors). Printed at the start of every run.

Targets of issue 17 (H100/H200, bf16 features, one run), printed as met / not met / n/a and written to the
JSON (`checks`, each with its `target` number):
    1. SigLIP: finevit fwd+bwd at B = 65,536, D = 768 in ≤ 45 ms (siglip-kernel: 48.8 ms on H100), and its
       extra peak memory ≤ 0.8 GB (two checks);
    2. fwd+bwd ≥ 450 TFLOP/s (8·B²·D) at every B ≥ 16,384, D ∈ {768, 1152}, per loss: the minimum over every
       measured finevit fwd+bwd case with B ≥ 16,384 (the case is named; a case that ran out of memory or failed
       is not met);
    3. fwd+bwd ≥ 2.5× faster than naive_bf16 at the largest B naive_bf16 fits, per loss: at each D of the
       run, the minimum over D reported;
    4. the 1M-pair probe's fwd+bwd with ≤ 2 GB extra peak memory beyond the d_img and d_txt it returns, per loss
       (its step time and total extra peak in the detail). The gradients alone are 2·B·D·2 bytes = 3.2 GB at
       B = 1,048,576, D = 768 in bf16, so "≤ 2 GB extra" can only mean the loss's working memory.

Files: bench/results/loss_<gpu>_<date>.{json,md,png}; regenerate the .md/.png from the JSON with
`python bench/_harness.py <file>.json`. The plot: TFLOP/s bars over B, one panel per loss × D, one row per mode.

`--cpu-smoke` runs a tiny fp32 version on the CPU (B 64 and 256, D 16 and 64, FINEVIT_KERNELS=reference for
the finevit provider since Triton kernels need a GPU or the interpreter, a wall-clock timer, a probe at
B = 1024, D = 64) through the same code paths, to check the script without a GPU. naive_bf16 still casts to
bf16 and open_clip still runs under (CPU) autocast, so their loss values show the bf16 rounding against the
fp32 finevit / naive ones. Its peak memory comes from the allocations torch.profiler records on the CPU
(profile_memory=True), a step's allocations and frees summed in time order; the targets are then evaluated
on the smoke sizes (the largest B and D of the run standing for the targets' B and D, B ≥ 16,384 becoming
every B of the run at least min(16,384, its largest)) and mean nothing.
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
from finevit.kernels import _pairwise, reference

OURS = "finevit"
LOSSES = ("siglip", "clip")
BATCHES = (4096, 16384, 65536, 262144)
QUICK_BATCHES = (4096, 16384, 65536)
DIMS = (768, 1152)
QUICK_DIMS = DIMS  # target 2 covers both widths
SMOKE_BATCHES = (64, 256)
SMOKE_DIMS = (16, 64)
INIT_SCALE = 10.0  # = exp(log 10): logit_scale as the loss receives it, the exp of the learned log-scale
INIT_BIAS = -10.0
MODES = ("fwd", "fwd+bwd")
MODE_WEIGHT = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}  # heavier modes need at least the memory of lighter ones
FLOP_PER_PAIR_DIM = {"fwd": 2, "bwd": 6, "fwd+bwd": 8}  # × B²·D (issue 17: the backward recomputes the logits)
GB = 1e9
DIFF_WARNING = 0.01

BASELINE = "naive_bf16"  # the baseline of target 3

# Issue 17's targets.
TARGET_BATCH = 65536  # 1: SigLIP fwd+bwd at B = 65,536, D = 768
TARGET_DIM = 768
TARGET_MS = 45.0
TARGET_MEMORY_GB = 0.8
TARGET_TFLOPS = 450.0  # 2: fwd+bwd TFLOP/s (8·B²·D) at every B ≥ 16,384, D ∈ {768, 1152}
TARGET_TFLOPS_MIN_BATCH = 16384
TARGET_TFLOPS_DIMS = (768, 1152)
TARGET_SPEEDUP = 2.5  # 3: over naive_bf16 at the largest B it fits
PROBE_BATCH = 2**20  # 4: 1M pairs at D = 768 with ≤ 2 GB extra memory beyond the gradients it returns
PROBE_DIM = 768
PROBE_MEMORY_GB = 2.0
SMOKE_PROBE = (1024, 64)  # (B, D) of the CPU smoke run's probe
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
    """Issue 17's count: fwd 2·B²·D, bwd 6·B²·D, fwd+bwd 8·B²·D (the same for every provider)."""
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


def _bf16_logits(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """logit_scale · (img @ txtᵀ): a bf16 GEMM of bf16 features; the 0-d fp32 scale keeps the product bf16."""
    img, txt = img.to(torch.bfloat16), txt.to(torch.bfloat16)  # no-ops on the bench's bf16 features
    return logit_scale * (img @ txt.T)  # (B, B) bf16


def naive_bf16_siglip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                           logit_bias: torch.Tensor) -> torch.Tensor:
    """−logsigmoid(labels · (logits + b)).sum() / B in fp32 on bf16 logits, labels = 2·eye − 1 (open_clip's)."""
    logits = _bf16_logits(img, txt, logit_scale)
    batch = logits.shape[0]
    labels = torch.eye(batch, device=logits.device, dtype=logits.dtype).mul_(2).sub_(1)  # ±1: exact in bf16
    return -F.logsigmoid(labels * (logits.float() + logit_bias)).sum() / batch


def naive_bf16_clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """½·[CE(logits, pairs) + CE(logitsᵀ, pairs)] in fp32 on one bf16 logits GEMM."""
    logits = _bf16_logits(img, txt, logit_scale).float()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def naive_bf16_loss(loss: str, x: Inputs) -> Forward:
    if loss == "siglip":
        return lambda: naive_bf16_siglip_loss(x.img, x.txt, x.logit_scale, x.logit_bias)
    return lambda: naive_bf16_clip_loss(x.img, x.txt, x.logit_scale)


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
    """open_clip's loss under bf16 autocast on the features' device type (CPU autocast in smoke runs)."""
    siglip_cls, clip_cls, _ = _open_clip_losses()
    fn = siglip_cls() if loss == "siglip" else clip_cls()
    args = (x.img, x.txt, x.logit_scale) + ((x.logit_bias,) if loss == "siglip" else ())

    def forward() -> torch.Tensor:
        with torch.autocast(x.img.device.type, dtype=torch.bfloat16):
            return fn(*args)
    return forward


@dataclass(frozen=True)
class Provider:
    build: Callable[[str, Inputs], Forward]
    description: str


PROVIDERS: dict[str, Provider] = {
    "finevit": Provider(finevit_loss, "finevit.kernels.siglip_loss / clip_loss, as dispatched (Triton on CUDA)"),
    "naive_bf16": Provider(naive_bf16_loss, "eager PyTorch: bf16 B×B logits GEMM, then the loss math in fp32 under "
                                            "autograd (the baseline of issue 17's targets)"),
    "naive": Provider(naive_loss, "finevit.kernels.reference siglip_loss / clip_loss: eager PyTorch, fp32 "
                                  "features and fp32 B×B logits (the tests' oracle)"),
    "open_clip": Provider(open_clip_loss, "open_clip.loss.SigLipLoss() / ClipLoss(), single process, under bf16 "
                                          "autocast: bf16 B×B logits"),
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
# The 1M-pair probe (finevit alone)
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


def probe_batch(loss: str, batch: int, dim: int, dtype: torch.dtype, device: torch.device, step_limit_s: float,
                seed: int) -> dict:
    """finevit's fwd+bwd at (batch, dim): one warm-up step, then one timed step; wall-clock seconds, extra peak."""
    row = {"loss": loss, "batch": batch, "dim": dim, "provider": OURS, "mode": "fwd+bwd", "status": "ok",
           "reason": None, "flop": loss_flops(batch, dim, "fwd+bwd")}
    failure, inputs, forward = None, None, None
    try:
        inputs = make_inputs(batch, dim, dtype, device, seed)
        forward = finevit_loss(loss, inputs)
        for seconds_key, peak_key in (("warmup_s", "warmup_peak_mem_gb"), ("seconds", "peak_mem_gb")):
            if seconds_key == "seconds" and row["warmup_s"] > step_limit_s:
                row["reason"] = (f"timed step not run: the warm-up step took {row['warmup_s']:.0f} s > "
                                 f"--probe-step-limit-s {step_limit_s:g} s; its numbers are reported")
                break
            seconds, peak_mib, row["loss_value"] = _one_step(forward, inputs, device)
            row[seconds_key], row[peak_key] = seconds, None if peak_mib is None else peak_mib * 2**20 / GB
    except Exception as error:  # noqa: BLE001
        failure = ("oom" if _is_oom(error) else "failed", harness.error_reason(error))
    inputs = forward = None
    harness.free_memory(device)
    if failure is not None:
        row.update(status=failure[0], reason=failure[1])
        print(f"  probe {loss} B={batch:,} D={dim}: {failure[0]}: {failure[1]}", flush=True)
        return row
    if "seconds" not in row:  # the timed step was skipped: the warm-up step stands for it
        row.update(seconds=row["warmup_s"], peak_mem_gb=row["warmup_peak_mem_gb"])
    row["tflops"] = row["flop"] / row["seconds"] / 1e12
    # What any loss must allocate for its result: d_img and d_txt, (B, D) each in the features' dtype.
    row["grad_gb"] = 2 * batch * dim * dtype.itemsize / GB
    if row["peak_mem_gb"] is not None:
        row["working_mem_gb"] = row["peak_mem_gb"] - row["grad_gb"]
    peak_text = "–" if row["peak_mem_gb"] is None else f"{row['peak_mem_gb']:.3f} GB"
    print(f"  probe {loss} B={batch:,} D={dim}: step {row['seconds']:.3f} s ({row['tflops']:.0f} TFLOP/s; warm-up "
          f"{row['warmup_s']:.2f} s), extra peak {peak_text} (the returned gradients: {row['grad_gb']:.3f} GB)"
          + (f"; {row['reason']}" if row["reason"] else ""),
          flush=True)
    return row


# ----------------------------------------------------------------------------------------------------
# Memory model (computed, not measured)
# ----------------------------------------------------------------------------------------------------


def memory_model(batches, dims, dtype: torch.dtype) -> list[dict]:
    """One B×B fp32 logits matrix (B²·4 bytes) against what finevit's tiled losses allocate (single process):
    the d_img and d_txt they return plus `_pairwise.working_bytes` (one chunk of the logit gradient G, and
    the float32 d_txt accumulator unless d_txt takes a second pass), and for CLIP two float32 log-sum-exps."""
    element = torch.empty((), dtype=dtype).element_size()
    rows = []
    for d in dims:
        for b in batches:
            returned, working = 2 * b * d * element, _pairwise.working_bytes(b, b, d, element)
            rows.append({"batch": b, "dim": d, "logits_fp32_gb": 4 * b * b / GB, "gradients_gb": returned / GB,
                         "two_pass": _pairwise.two_pass(b, b, d, element),
                         "tiled_siglip_gb": (returned + working) / GB,
                         "tiled_clip_gb": (returned + working + 2 * b * 4) / GB})
    return rows


def _memory_model_table(rows: list[dict], dtype: torch.dtype) -> dict:
    name = str(dtype).removeprefix("torch.")
    return {"title": "Memory model (computed, not measured)",
            "note": f"One B×B fp32 logits matrix (B²·4 bytes; the eager losses keep several alive, see "
                    f"`peak_in_fp32_bxb` in the JSON) against what finevit's tiled losses allocate in one process: "
                    f"the d_img and d_txt they return in {name}, one row chunk of the logit gradient G (in {name}; "
                    f"{_pairwise.CHUNK_BYTES / 2**20:.0f} MiB, or {_pairwise.MIN_CHUNK_ROWS} rows × B where that is "
                    f"more), d_txt's float32 accumulator (B·D·4) unless that and the chunk exceed "
                    f"{_pairwise.MAX_WORKING_BYTES / 2**30:.0f} GiB (then d_txt takes a second pass: 'two passes'), "
                    f"and CLIP's two float32 log-sum-exp vectors (2·B·4). GB = 10⁹ bytes.",
            "header": ["B", "D", "one B×B fp32 logits (GB)", "d_img + d_txt (GB)", "passes", "tiled SigLIP (GB)",
                       "tiled CLIP (GB)"],
            "rows": [[f"{r['batch']:,}", str(r["dim"]), harness._fmt(r["logits_fp32_gb"]),
                      harness._fmt(r["gradients_gb"]), "2" if r["two_pass"] else "1",
                      harness._fmt(r["tiled_siglip_gb"]), harness._fmt(r["tiled_clip_gb"])] for r in rows]}


# ----------------------------------------------------------------------------------------------------
# Tables and targets of issue 17
# ----------------------------------------------------------------------------------------------------


def _detail_cell(record: dict, provider: str) -> str:
    text = f"{record['ms']:.3g} ms · {record['pairs_per_s'] / 1e9:.3g} Gpair/s"
    if record.get("peak_mem_gb") is not None:
        text += f" · {record['peak_mem_gb']:.3g} GB ({record['peak_in_fp32_bxb']:.2g}× B²·4)"
    return text


def detail_tables(payload: dict) -> list[dict]:
    """Per mode: ms, pairs/s and extra peak memory of each provider on each case."""
    return harness.mode_tables(
        payload, _detail_cell, "{mode}: time · pairs/s · extra peak memory",
        "Median ms · B²/time in 10⁹ pairs/s · extra peak memory in GB (10⁹ bytes) above the inputs, and that peak "
        "in units of one B×B fp32 matrix (B²·4 bytes). OOM: ran out of memory; skip: not run (see above).")


def probe_table(probes: list[dict]) -> dict:
    rows = []
    for t in probes:
        status = t["status"] if t["status"] == "ok" and not t["reason"] else f"{t['status']}: {t['reason'][:80]}"
        rows.append([t["loss"], f"{t['batch']:,}", str(t["dim"]), status, harness._fmt(t.get("warmup_s")),
                     harness._fmt(t.get("seconds")), harness._fmt(t.get("tflops")), harness._fmt(t.get("peak_mem_gb")),
                     harness._fmt(t.get("working_mem_gb"))])
    return {"title": f"1M-pair probe ({OURS}, fwd+bwd of the loss alone)",
            "note": "One warm-up step, then one timed step, each by the wall clock; TFLOP/s counts 8·B²·D; extra "
                    "peak memory of the timed step in GB (10⁹ bytes), in all and beyond the d_img and d_txt it "
                    "returns.",
            "header": ["loss", "B", "D", "status", "warm-up s", "step s", "TFLOP/s", "extra peak GB",
                       "beyond gradients GB"], "rows": rows}


def _pick(values, target: int) -> int:
    """The target's B or D when this run has it, else the run's largest (a smoke run's stand-in)."""
    return target if target in values else max(values)


def _check(target: int, name: str, value, threshold: float, op: str, detail: str) -> dict:
    met = None if value is None else value <= threshold if op == "≤" else value >= threshold
    return {"target": target, "name": name, "value": value, "threshold": threshold, "op": op, "met": met,
            "detail": detail}


def _status_text(record: dict | None) -> str:
    if record is None:
        return "not run"
    return record["status"] if record["status"] == "ok" else f"{record['status']} ({record['reason']})"


def check_targets(results: list[dict], cases: list[dict], probes: list[dict]) -> list[dict]:
    """Issue 17's targets (per loss where the issue says so), on this run's cases and probe.

    A run without the targets' B or D (a smoke run) evaluates them at its largest B and D instead.
    """
    index = {(r["case"], r["mode"], r["provider"]): r for r in results}

    def ok(case: dict, provider: str) -> dict | None:
        record = index.get((case["case"], "fwd+bwd", provider))
        return record if record is not None and record["status"] == "ok" else None

    checks = []
    for loss in LOSSES:
        loss_cases = sorted((c for c in cases if c["loss"] == loss), key=lambda c: (c["dim"], c["batch"]))
        if not loss_cases:
            continue
        dims = sorted({c["dim"] for c in loss_cases})
        largest = max(c["batch"] for c in loss_cases)

        # 1. SigLIP at B = 65,536, D = 768: time and extra peak memory.
        if loss == "siglip":
            dim = _pick(dims, TARGET_DIM)
            batch = _pick([c["batch"] for c in loss_cases if c["dim"] == dim], TARGET_BATCH)
            case = next(c for c in loss_cases if c["dim"] == dim and c["batch"] == batch)
            ours, base = ok(case, OURS), index.get((case["case"], "fwd+bwd", BASELINE))
            base_text = f"{BASELINE}: " + (f"{base['ms']:.4g} ms, {harness._fmt(base.get('peak_mem_gb'))} GB"
                                           if base and base["status"] == "ok" else _status_text(base))
            ours_text = _status_text(index.get((case["case"], "fwd+bwd", OURS)))
            checks.append(_check(1, f"{loss}: {OURS} fwd+bwd time, B={batch:,}, D={dim} (ms)",
                                 ours["ms"] if ours else None, TARGET_MS, "≤",
                                 f"siglip-kernel: 48.8 ms on H100; {base_text}" if ours else f"{OURS}: {ours_text}"))
            memory = ours.get("peak_mem_gb") if ours else None
            checks.append(_check(1, f"{loss}: {OURS} fwd+bwd extra peak memory, B={batch:,}, D={dim} (GB)",
                                 memory, TARGET_MEMORY_GB, "≤",
                                 base_text if memory is not None else f"{OURS}: {ours_text}"))

        # 2. TFLOP/s at every B ≥ 16,384 (a smoke run: every B ≥ min(16,384, its largest)), D ∈ {768, 1152}.
        floor = min(TARGET_TFLOPS_MIN_BATCH, largest)
        covered = [c for c in loss_cases if c["batch"] >= floor]
        measured = [(ok(c, OURS)["throughput"], c["case"]) for c in covered if ok(c, OURS)]
        failed = [c for c in covered if not ok(c, OURS) and index.get((c["case"], "fwd+bwd", OURS))]
        absent = [d for d in TARGET_TFLOPS_DIMS if d not in dims] if largest >= TARGET_TFLOPS_MIN_BATCH else []
        name = f"{loss}: {OURS} fwd+bwd TFLOP/s (8·B²·D), min over B ≥ {floor:,}, D ∈ {{{', '.join(map(str, dims))}}}"
        check = _check(2, name, min(measured)[0] if measured else None, TARGET_TFLOPS, "≥",
                       "; ".join(([f"at {min(measured)[1]} (of {len(measured)} cases)"] if measured else [])
                                 + [f"{c['case']}: {_status_text(index[(c['case'], 'fwd+bwd', OURS)])}"
                                    for c in failed] + ([f"D={absent} not in this run"] if absent else [])))
        if failed:
            check["met"] = False  # a case the target covers ran out of memory, failed or was skipped
        checks.append(check)

        # 3. Speedup over naive_bf16 at the largest B it fits, at each D; the minimum over D.
        ratios, notes, ours_failed = [], [], False
        for dim in dims:
            panel = [c for c in loss_cases if c["dim"] == dim]
            fits = [c for c in panel if ok(c, BASELINE)]
            if not fits:
                notes.append(f"D={dim}: {BASELINE} fwd+bwd ran at no B")
                continue
            case = max(fits, key=lambda c: c["batch"])
            ours = ok(case, OURS)
            beyond = [index.get((c["case"], "fwd+bwd", BASELINE)) for c in panel if c["batch"] > case["batch"]]
            why = ("ran every B of this run" if not beyond else
                   f"at B={beyond[0]['batch']:,}: {beyond[0]['status']}" if beyond[0] else "not run beyond it")
            if ours is None:
                ours_record = index.get((case["case"], "fwd+bwd", OURS))
                ours_failed = ours_failed or ours_record is not None
                notes.append(f"D={dim}, B={case['batch']:,}: {OURS} {_status_text(ours_record)}")
                continue
            ratio = ok(case, BASELINE)["ms"] / ours["ms"]
            ratios.append(ratio)
            notes.append(f"D={dim}: {ratio:.3g}× at B={case['batch']:,} ({BASELINE} {why})")
        check = _check(3, f"{loss}: {OURS} fwd+bwd speedup over {BASELINE} at the largest B it fits, min over D",
                       min(ratios) if ratios else None, TARGET_SPEEDUP, "≥", "; ".join(notes))
        if ours_failed:
            check["met"] = False  # finevit failed where the baseline ran
        checks.append(check)

        # 4. The 1M-pair probe: extra peak memory beyond the returned gradients (time and the total in the detail).
        probe = next((t for t in probes if t["loss"] == loss), None)
        where = f"B={probe['batch']:,}, D={probe['dim']}" if probe else f"B={PROBE_BATCH:,}, D={PROBE_DIM}"
        memory = probe.get("working_mem_gb") if probe and probe["status"] == "ok" else None
        detail = ("probe not run" if probe is None else f"{probe['status']}: {probe['reason']}"
                  if probe["status"] != "ok" else f"step {probe['seconds']:.4g} s ({probe['tflops']:.4g} TFLOP/s), "
                  f"warm-up {probe['warmup_s']:.4g} s, extra peak {harness._fmt(probe.get('peak_mem_gb'))} GB of "
                  f"which {probe['grad_gb']:.3g} GB are the gradients"
                  + (f"; {probe['reason']}" if probe["reason"] else ""))
        check = _check(4, f"{loss}: {OURS} fwd+bwd extra peak memory beyond the returned gradients, {where} (GB)",
                       memory, PROBE_MEMORY_GB, "≤", detail)
        if probe is not None and probe["status"] == "oom":
            check["met"] = False  # it does not fit at all
        checks.append(check)
    return sorted(checks, key=lambda c: c["target"])  # stable: per target, siglip then clip


def _print_checks(checks: list[dict], smoke: bool) -> None:
    print("\nTargets (issue 17; H100/H200, bf16)" + (": CPU smoke run, evaluated on its tiny sizes, meaningless"
                                                      if smoke else ":"))
    def number(v):
        return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"

    for c in checks:
        status = {True: "met", False: "not met", None: "n/a"}[c["met"]]
        value = "-" if c["value"] is None else number(c["value"])
        print(f"  {c['target']}. {c['name']:<88} {value:>9}  ({c['op']} {number(c['threshold'])})  {status:<8} "
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
    parser.add_argument("--probe-batch", type=int, default=None,
                        help=f"B of the probe (default {PROBE_BATCH:,} at D={PROBE_DIM}; 0: no probe)")
    parser.add_argument("--probe-step-limit-s", type=float, default=150.0,
                        help="skip the probe's timed step when its warm-up step took longer than this")


def print_memory_model(model: list[dict]) -> None:
    print("\nMemory model (computed, not measured; GB = 1e9 bytes; bf16 features):")
    print(f"  {'B':>9} {'D':>5} {'one BxB fp32 logits':>20} {'d_img + d_txt':>14} {'passes':>6} {'tiled SigLIP':>13} "
          f"{'tiled CLIP':>11}")
    for r in model:
        print(f"  {r['batch']:>9,} {r['dim']:>5} {r['logits_fp32_gb']:>17.3f} GB {r['gradients_gb']:>11.3f} GB "
              f"{2 if r['two_pass'] else 1:>6} {r['tiled_siglip_gb']:>10.3f} GB {r['tiled_clip_gb']:>8.3f} GB")


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    run = harness.start(__doc__, PROVIDERS, argv, ops=("siglip_loss", "clip_loss"), libraries=library_versions,
                        quick_help="B up to 65,536 (the probe still runs)", seed_help="seed of the features",
                        modes_help="comma-separated subset of fwd,bwd,fwd+bwd (default fwd,fwd+bwd)",
                        options=add_options)
    args, device = run.args, run.device
    if run.smoke:
        batches, dims, dtype = SMOKE_BATCHES, SMOKE_DIMS, torch.float32
        probe_b, probe_d = SMOKE_PROBE
    else:
        batches, dims = (QUICK_BATCHES, QUICK_DIMS) if args.quick else (BATCHES, DIMS)
        dtype = torch.bfloat16
        probe_b, probe_d = PROBE_BATCH, PROBE_DIM
    if args.probe_batch is not None:
        probe_b = args.probe_batch
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
                "flops": "fwd 2·B²·D, bwd 6·B²·D, fwd+bwd 8·B²·D (issue 17's count: the backward recomputes "
                         "the logits; the same for all providers)",
                "peak_memory": "CUDA: max_memory_allocated − memory_allocated before the step" if device.type
                == "cuda" else "CPU: allocations − frees recorded by torch.profiler(profile_memory=True)",
                "probe": {"batch": probe_b, "dim": probe_d, "step_limit_s": args.probe_step_limit_s}})
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

    if probe_b > 0 and OURS in providers:
        print(f"\nProbe ({OURS}, fwd+bwd, B={probe_b:,}, D={probe_d}: one warm-up step, one timed step):")
        for loss in LOSSES:
            probes.append(probe_batch(loss, probe_b, probe_d, dtype, device, args.probe_step_limit_s, args.seed))
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
