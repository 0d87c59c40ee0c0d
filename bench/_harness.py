"""Shared harness of the `bench/` scripts: `start`, environment record, timing, ceilings, results files.

A bench's main() begins with `start(...)` (options, device, environment, dispatch targets, ceilings: see
there), builds its cases, times each provider with `measure` and writes one JSON file (`BenchRun.save` after
every case, `BenchRun.finish` at the end); the markdown table and the PNG plot are derived from that file by
`render(json_path)`, so they can be regenerated without rerunning the bench:

    python bench/_harness.py bench/results/attention_h100-80gb-hbm3_2026-05-01_120000.json

JSON layout (what `render` reads):
    bench, env, ceilings, config      what ran where (GPU, driver, torch, triton, commit, date, options)
    metric {unit, ceiling}            unit of `throughput` ("TFLOP/s") and the `ceilings` key it is compared to
    ours, providers {name: text}      the provider the ratios are taken against, then every provider in order
    modes, cases [{case, ...shape}]   timed modes and the exact shapes of every case, in order
    layout {panel, x}                 optional: which case fields make the plot's panels and x axis
    results [{case, mode, provider, status ("ok" | "skipped" | "failed" | "oom"), reason, ms, ms_q20, ms_q80,
              throughput, ceiling_share, ours_ratio, peak_mem_mib, ...}]
    checks [{name, value, threshold, op, met, detail}]   optional: the targets of the bench's issue
                                      (op: "≥" when absent, or "≤" for a ceiling such as a memory budget)
    tables [{title, note, header, rows}]   optional: further tables the bench derived from its results,
                                      rendered as they are after the throughput and memory tables

Timing follows Triton's `do_bench` (L2 flushed before every rep, median and 20/80 % quantiles). Modes:
`fwd` (forward without autograd graph), `bwd` (one forward kept, its graph retained, backward timed),
`fwd+bwd` (both); gradients of the inputs are reset to None between reps so they never accumulate.
Peak memory is the most memory a single step allocates above what was live before it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
WARMUP_VARIABLE = "FINEVIT_BENCH_WARMUP"
QUANTILES = (0.5, 0.2, 0.8)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
NO_CUDA_MESSAGE = "no CUDA device: nothing to benchmark"
MODES_HELP = "comma-separated subset of fwd,bwd,fwd+bwd"

Outputs = torch.Tensor | Sequence[torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# Starting a bench: options, device, environment, dispatch targets, ceilings
# ----------------------------------------------------------------------------------------------------


def start(doc: str, providers: Mapping, argv: Sequence[str] | None, *, ops: Sequence[str], quick_help: str,
          seed_help: str, modes_help: str | None = MODES_HELP,
          options: Callable[[argparse.ArgumentParser], None] | None = None,
          libraries: Callable[[], dict] | None = None, ours: str = "finevit") -> BenchRun:
    """What every bench does first, in order:

    1. parse the common options (`bench_parser`) and the bench's own (`options(parser)` adds them);
    2. pick the device: CUDA, or the CPU for --cpu-smoke (FINEVIT_KERNELS=reference, one thread: tiny ops
       only get noise from threads); without either, print NO_CUDA_MESSAGE and exit 0 before any work;
    3. record the environment, the dispatch path of each finevit op in `ops` and the `libraries()` versions,
       print them, and warn when an op runs the PyTorch reference on CUDA (the numbers would not be the kernel's);
    4. measure and print the device's matmul and copy ceilings.
    `providers`: every provider of the bench by name, each with a `description`.
    """
    parser = bench_parser(doc, providers, quick_help=quick_help, seed_help=seed_help, modes_help=modes_help)
    if options is not None:
        options(parser)
    args = parser.parse_args(argv)
    device = require_cuda(cpu_smoke=args.cpu_smoke)
    if args.cpu_smoke:
        os.environ["FINEVIT_KERNELS"] = "reference"  # Triton kernels need a GPU (or the interpreter)
        torch.set_num_threads(1)
    env = environment(device)
    versions = {**dispatch_targets(ops, device), **(libraries() if libraries is not None else {})}
    print(f"{env['gpu']} · driver {env['driver']} · torch {env['torch']} · triton {env['triton']} · "
          f"commit {env['commit'][:12]}")
    print("  " + "\n  ".join(f"{key}: {value}" for key, value in versions.items()))
    on_reference = [op for op in ops if versions[f"finevit.{op}"] == "reference"]
    if device.type == "cuda" and on_reference:
        print(f"  WARNING: {ours} runs the PyTorch reference here for {', '.join(on_reference)} "
              f"(FINEVIT_KERNELS={os.environ.get('FINEVIT_KERNELS')})")
    ceilings = measure_ceilings(device, smoke=args.cpu_smoke)
    print(f"ceilings: matmul {ceilings['matmul']['tflops']:.4g} TFLOP/s, copy {ceilings['copy']['gbps']:.4g} GB/s\n")
    return BenchRun(args, list(sys.argv[1:] if argv is None else argv), device, env, versions, ceilings,
                    providers, ours)


@dataclass(frozen=True)
class BenchRun:
    """One bench run as `start` set it up. Build the results payload with `payload`, write it after every case
    with `save` and at the end with `finish`."""

    args: argparse.Namespace
    argv: list[str]
    device: torch.device
    env: dict  # `environment(device)`
    versions: dict  # "finevit.<op>": "triton" | "reference" for each op the bench runs, then library versions
    ceilings: dict  # `measure_ceilings(device)`
    known_providers: Mapping  # name -> provider (with a `description`)
    ours: str

    @property
    def smoke(self) -> bool:
        return self.args.cpu_smoke

    def providers(self, default: Sequence[str]) -> list[str]:
        """--providers, or `default`; ours first."""
        return ours_first(self.args.providers or default, self.ours)

    def modes(self, default: Sequence[str]) -> list[str]:
        """--modes, or `default`."""
        return list(self.args.modes or default)

    def config(self, **fields) -> dict:
        """The results' `config`: the run's options, this bench's `fields`, the kernel mode and `versions`."""
        return {"quick": self.args.quick, "cpu_smoke": self.smoke, "seed": self.args.seed, **fields,
                "argv": self.argv, "FINEVIT_KERNELS": os.environ.get("FINEVIT_KERNELS", "auto"), **self.versions}

    def payload(self, bench: str, *, providers: Sequence[str], modes: Sequence[str], layout: dict, config: dict,
                metric: dict | None = None, **extra) -> dict:
        """The results JSON (see the module docstring) before any case ran; `extra`: the bench's own fields."""
        return {
            "bench": bench,
            "env": self.env,
            "ceilings": self.ceilings,
            "config": self.config(**config),
            "metric": metric or {"unit": "TFLOP/s", "ceiling": "matmul"},
            "ours": self.ours,
            "providers": {name: self.known_providers[name].description for name in providers},
            "modes": list(modes),
            "layout": layout,
            "cases": [],
            "results": [],
            "checks": [],
            **extra,
        }

    def save(self, payload: dict) -> Path:
        """Write the results JSON as it stands: after every case, so a run cut short keeps its numbers."""
        return write_results(payload, self.args.out)

    def finish(self, payload: dict, report: Callable[[], None]) -> None:
        """Write the final JSON with its markdown and plot; print the throughput tables, then `report()` (the
        bench's own tables and targets), then the files written."""
        json_path = self.save(payload)
        md_path, png_path = render(json_path)
        print("\n" + throughput_tables(payload))
        report()
        print(f"\nwrote {json_path}\n      {md_path}" + (f"\n      {png_path}" if png_path else ""))


def bench_parser(doc: str, providers: Sequence[str], *, quick_help: str, seed_help: str,
                 modes_help: str | None = MODES_HELP) -> argparse.ArgumentParser:
    """The options every bench takes (no --modes when `modes_help` is None); `doc`: the script's docstring."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default=None, help="output directory (default bench/results/)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 run on the CPU to check the script")
    parser.add_argument("--providers", type=name_list(list(providers)), default=None,
                        help=f"comma-separated subset of {','.join(providers)}")
    if modes_help is not None:
        parser.add_argument("--modes", type=name_list(MODES), default=None, help=modes_help)
    else:
        parser.set_defaults(modes=None)
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    return parser


def dispatch_targets(ops: Sequence[str], device: torch.device) -> dict:
    """Which path finevit's dispatch takes for each op's tensors on `device`: "triton" or "reference"."""
    from finevit.kernels._dispatch import use_triton

    return {f"finevit.{op}": "triton" if use_triton(op, device) else "reference" for op in ops}


def name_list(known: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse `type`: comma-separated names, each one of `known` (else a usage error listing them)."""
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown or 'empty list'}; choose from {','.join(known)}")
        return names
    return parse


def ours_first(names: Sequence[str], ours: str) -> list[str]:
    """`names` with ours first: the other providers' outputs are checked against it."""
    return sorted(names, key=lambda name: name != ours)


def require_cuda(cpu_smoke: bool = False) -> torch.device:
    """The device to benchmark on: CUDA, or the CPU for a `--cpu-smoke` run; without either, exit 0."""
    if cpu_smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE)
        sys.exit(0)
    return torch.device("cuda")


# ----------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------


@functools.cache
def compiled(fn: Callable) -> Callable:
    """torch.compile(fn, dynamic=False) as a baseline: one compile per input shape (the recompile limit raised
    so that a bench's many shapes never fall back to eager), compiled once per function."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    return torch.compile(fn, dynamic=False)


def mode_tables(payload: dict, cell: Callable[[dict, str], str], title: str, note: str) -> list[dict]:
    """One table per mode of the run: a row per case, a column per provider that has results. A cell is
    `cell(record, provider)` for a record that ran, else its status (OOM, skip, fail) or empty when absent.
    `title` is formatted with the mode."""
    index, providers = _index(payload), _providers(payload)

    def text(record: dict | None, provider: str) -> str:
        if record is None:
            return ""
        if record["status"] != "ok":
            return {"oom": "OOM", "skipped": "skip"}.get(record["status"], "fail")
        return cell(record, provider)

    return [{"title": title.format(mode=mode), "note": note, "header": ["case"] + providers,
             "rows": [[c["case"]] + [text(index.get((c["case"], mode, p)), p) for p in providers]
                      for c in payload["cases"]]}
            for mode in payload["modes"]]


def error_reason(error: BaseException) -> str:
    """One line for a skipped or failed provider: the error type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def free_memory(device: torch.device) -> None:
    """Drop what a failed or finished provider left behind before the next one runs."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warmup_shard() -> tuple[int, int] | None:
    """(k, n) when this process only fills Triton's compile cache for shard k of n of the cases, else None.

    Set by `FINEVIT_BENCH_WARMUP=k/n` (bench/gpu_check.sh starts n such processes at once). Autotuning
    compiles every candidate config in turn, one process at a time; sharded warm-up processes compile them
    in parallel into the on-disk cache, so the timed run that follows only loads them. A warm-up process
    runs each step once, measures no ceilings and times nothing.
    """
    value = os.environ.get(WARMUP_VARIABLE)
    if not value:
        return None
    k, n = (int(x) for x in value.split("/"))
    if not 0 <= k < n:
        raise ValueError(f"{WARMUP_VARIABLE} must be k/n with 0 <= k < n, got {value!r}")
    return k, n


def warmup_cases(cases: Sequence) -> list:
    """The cases this process handles: all of them, or its warm-up shard's share."""
    shard = warmup_shard()
    return list(cases) if shard is None else [c for i, c in enumerate(cases) if i % shard[1] == shard[0]]


def _config_text(config) -> str:
    tiles = "x".join(str(v) for v in config.kwargs.values())
    return f"{tiles}/{config.num_warps}w/{config.num_stages}s"


class AutotuneLog:
    """What Triton's autotuners chose: per kernel and autotune key the best config and, when the key was
    tuned alone since the last `update`, every candidate's median time (the autotuner's own measurement).

    tuners: {kernel name: triton Autotuner}. Call `update(**context)` after each provider ran; `entries`
    is JSON-ready.
    """

    def __init__(self, tuners: dict):
        self.tuners = tuners
        self.seen: dict[str, set] = {name: set() for name in tuners}
        self.entries: list[dict] = []

    def update(self, **context) -> None:
        for name, tuner in self.tuners.items():
            cache = getattr(tuner, "cache", {})
            new = [key for key in cache if key not in self.seen[name]]
            self.seen[name].update(new)
            timings = getattr(tuner, "configs_timings", None) or {}
            for key in new:
                entry = {**context, "kernel": name, "key": [str(x) for x in key], "best": _config_text(cache[key])}
                if len(new) == 1 and timings:
                    entry["ms"] = {_config_text(c): (t[0] if isinstance(t, (list, tuple)) else t)
                                   for c, t in timings.items()}
                self.entries.append(entry)

    def table(self) -> dict:
        """A `tables` entry of the results JSON: one row per tuned key."""
        rows = []
        for e in self.entries:
            times = e.get("ms") or {}
            finite = [t for t in times.values() if isinstance(t, float) and math.isfinite(t)]
            key = [k for k in e["key"] if not k.startswith("torch.")]  # the named keys; dtypes add nothing here
            rows.append([e["kernel"], ", ".join(key), e["best"],
                         _fmt(min(finite)) if finite else "–", _fmt(max(finite)) if finite else "–",
                         " ".join(f"{c}:{_fmt(t)}" for c, t in sorted(times.items(), key=lambda ct: ct[1]))])
        return {"title": "Autotune choices", "note": "best config per autotune key, and every candidate's median "
                "ms as the autotuner measured it (fastest first)",
                "header": ["kernel", "key", "best", "best ms", "worst ms", "candidates"], "rows": rows}


def _driver_version() -> str | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library, no driver: record what we have
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def _git_commit() -> dict:
    """The commit measured: $GIT_COMMIT when set (a copied tree's .git can be stale), else git's HEAD."""
    if os.environ.get("GIT_COMMIT"):
        return {"commit": os.environ["GIT_COMMIT"], "dirty": None}
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"commit": os.environ.get("GIT_COMMIT", "unknown"), "dirty": None}
    return {"commit": commit, "dirty": dirty}


def environment(device: torch.device) -> dict:
    """What the numbers depend on: GPU, driver, library versions, commit and the UTC date."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": device.type,
        "gpu": None,
        "driver": None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **_git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, driver=_driver_version(), sm_count=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}")
    else:
        env["gpu"] = f"cpu ({platform.processor() or platform.machine()})"
    return env


# ----------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------


def _as_tuple(outputs: Outputs) -> tuple[torch.Tensor, ...]:
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)


def make_step(forward: Callable[[], Outputs], mode: str) -> Callable[[], None]:
    """The callable to time for `mode`, from a `forward()` that returns a tensor or a tuple of tensors.

    fwd: forward under no_grad. bwd: one forward is run now and kept; each call backpropagates random
    output gradients through its retained graph. fwd+bwd: forward, then backward of the same gradients.
    """
    if mode == "fwd":
        def step() -> None:
            with torch.no_grad():
                forward()
        return step
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "bwd":
        outputs = _as_tuple(forward())
        grads = [torch.randn_like(out) for out in outputs]
        return lambda: torch.autograd.backward(outputs, grads, retain_graph=True)
    grads = [torch.randn_like(out) for out in _as_tuple(forward())]  # this first graph is dropped at once
    return lambda: torch.autograd.backward(_as_tuple(forward()), grads)


def _reset_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_fn(fn: Callable[[], object], device: torch.device,
            grad_to_none: Sequence[torch.Tensor] = (), rep_ms: float = 100.0) -> dict:
    """Median and 20/80 % quantiles in ms: Triton's do_bench on CUDA, a plain wall-clock loop on CPU.

    rep_ms: do_bench's timed window (it runs about rep_ms / (one call's time) reps); raise it for calls
    that take tens of ms, such as a whole training step, so the quantiles rest on more than one rep.
    """
    if device.type == "cuda":
        from triton.testing import do_bench
        median, q20, q80 = do_bench(fn, rep=rep_ms, grad_to_none=list(grad_to_none) or None,
                                    quantiles=list(QUANTILES))
        return {"ms": median, "ms_q20": q20, "ms_q80": q80}
    # CPU (smoke runs): two warm-up calls, then at least 5 reps and at least 50 ms, at most 50 reps.
    times: list[float] = []
    for i in range(52):
        _reset_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
        if len(times) >= 5 and sum(times) >= 50:
            break
    q20, _, _, q80 = statistics.quantiles(times, n=5, method="inclusive")  # the 20/40/60/80 % cut points
    return {"ms": statistics.median(times), "ms_q20": q20, "ms_q80": q80}


def peak_memory_mib(fn: Callable[[], object], device: torch.device,
                    grad_to_none: Sequence[torch.Tensor] = ()) -> float | None:
    """The most memory one call of fn allocates above what was live before it (MiB); None on CPU."""
    if device.type != "cuda":
        return None
    _reset_grads(grad_to_none)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    _reset_grads(grad_to_none)
    return peak / 2**20


def measure(forward: Callable[[], Outputs], mode: str, device: torch.device,
            inputs: Sequence[torch.Tensor]) -> dict:
    """Time `forward` in `mode` and measure its peak memory; `inputs` are the leaves whose grads get reset."""
    step = make_step(forward, mode)
    if warmup_shard() is not None:  # compile and autotune only
        step()
        return {"ms": math.nan, "ms_q20": math.nan, "ms_q80": math.nan, "peak_mem_mib": None}
    return {**time_fn(step, device, inputs), "peak_mem_mib": peak_memory_mib(step, device, inputs)}


def throughput(ms: float, work: float, ceiling: float | None, scale: float = 1e12) -> dict:
    """`work` (FLOP or bytes) done in `ms` -> throughput in units of `scale` per second, and its ceiling share."""
    value = work / (ms * 1e-3) / scale
    return {"throughput": value, "ceiling_share": value / ceiling if ceiling else None}


def add_ratios(results: list[dict], ours: str) -> None:
    """Set `ours_ratio` = (ours' speed) / (this provider's speed) on each timed record of another provider."""
    ours_ms = {(r["case"], r["mode"]): r["ms"] for r in results if r["provider"] == ours and r["status"] == "ok"}
    for r in results:
        key = (r["case"], r["mode"])
        if r["provider"] != ours and r["status"] == "ok" and r.get("throughput") is not None and key in ours_ms:
            r["ours_ratio"] = r["ms"] / ours_ms[key]


# ----------------------------------------------------------------------------------------------------
# Measured ceilings
# ----------------------------------------------------------------------------------------------------


def matmul_ceiling(device: torch.device, dtype: torch.dtype = torch.bfloat16,
                   sizes: Sequence[int] = (4096, 8192, 16384)) -> dict:
    """The best TFLOP/s of square `dtype` matmuls (2·n³ FLOP each) over `sizes`: the card's real compute roof."""
    def tflops(n: int) -> float:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        return 2 * n**3 / (time_fn(lambda: a @ b, device)["ms"] * 1e-3) / 1e12

    value, n = max((tflops(n), n) for n in sizes)
    return {"tflops": value, "shape": [n, n, n], "dtype": str(dtype).removeprefix("torch.")}


def copy_ceiling(device: torch.device, nbytes: int = 2**30) -> dict:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device)["ms"]
    return {"gbps": 2 * nbytes / (ms * 1e-3) / 1e9, "bytes": nbytes}


def measure_ceilings(device: torch.device, smoke: bool = False) -> dict:
    """Matmul TFLOP/s and copy GB/s of this device (tiny fp32 sizes on a CPU smoke run; NaN when warming up)."""
    if warmup_shard() is not None:
        return {"matmul": {"tflops": math.nan}, "copy": {"gbps": math.nan}}
    if smoke:
        return {"matmul": matmul_ceiling(device, torch.float32, sizes=(256,)), "copy": copy_ceiling(device, 2**24)}
    return {"matmul": matmul_ceiling(device), "copy": copy_ceiling(device)}


def run_providers(providers, run, ours: str, progress, autotune: AutotuneLog | None = None,
                  case: str | None = None) -> list[dict]:
    """Every provider on one case: `run(name, ours_out) -> (records, out)`, where ours_out is the output of
    provider `ours` (run first) for the others' correctness check; prints `progress(record)` per record and
    tags the autotune log. Returns the records."""
    records_all, ours_out = [], None
    for name in providers:
        records, out = run(name, ours_out)
        if name == ours:
            ours_out = out
        if autotune is not None:
            autotune.update(case=case, provider=name)
        for record in records:
            print(progress(record), flush=True)
        records_all += records
    return records_all


# ----------------------------------------------------------------------------------------------------
# Results files
# ----------------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    text = re.sub(r"^nvidia\s+", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def _finite(obj: object) -> object:
    """NaN and infinities become None, so the file stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_results(payload: dict, out_dir: str | os.PathLike | None = None) -> Path:
    """Write `payload` as `<bench>_<gpu slug>_<UTC date>.json` under out_dir (default bench/results/).

    The name depends only on the payload's env, so a script may call this after every case: a run cut
    short keeps what it measured.
    """
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    env = payload["env"]
    gpu = _slug(env["gpu"]) if env["device"] == "cuda" else "cpu"
    date = env["date_utc"][:19].replace(":", "").replace("T", "_")
    path = out / f"{payload['bench']}_{gpu}_{date}.json"
    path.write_text(json.dumps(_finite(payload), indent=1, allow_nan=False) + "\n")
    return path


def load(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def _index(payload: dict) -> dict:
    return {(r["case"], r["mode"], r["provider"]): r for r in payload["results"]}


def _cell(record: dict | None, ours: str) -> str:
    if record is None:
        return ""
    if record["status"] != "ok":
        return {"skipped": "skip", "oom": "OOM"}.get(record["status"], "fail")
    if record.get("throughput") is None:
        return f"{record['ms']:.3g} ms"
    text = _fmt(record["throughput"])
    if record["provider"] == ours and record.get("ceiling_share") is not None:
        return f"**{text}** ({100 * record['ceiling_share']:.0f}%)"
    if record.get("ours_ratio") is not None:
        return f"{text} · {record['ours_ratio']:.2f}×"
    return text


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _providers(payload: dict) -> list[str]:
    seen = {r["provider"] for r in payload["results"]}
    return [p for p in payload["providers"] if p in seen]


def throughput_tables(payload: dict) -> str:
    """One markdown table per mode: throughput of each provider per case, with ratios against `ours`."""
    unit, ours, index = payload["metric"]["unit"], payload["ours"], _index(payload)
    providers = _providers(payload)
    sections = []
    for mode in payload["modes"]:
        rows = [[c["case"]] + [_cell(index.get((c["case"], mode, p)), ours) for p in providers]
                for c in payload["cases"]]
        if any(any(cell for cell in row[1:]) for row in rows):
            sections.append(f"### {mode}: {unit}\n\n" + _table(["case"] + providers, rows))
    legend = (f"Cells: {unit} (higher is better). **{ours}** shows its share of the measured "
              f"{payload['metric']['ceiling']} ceiling in parentheses; every other provider shows "
              f"{ours}'s speedup over it (`· 1.25×` = {ours} is 1.25× faster). `skip`/`fail`: see below; "
              f"a time in ms marks a helper measurement that does no attention FLOPs.")
    return "\n\n".join(sections + [legend])


def _memory_tables(payload: dict) -> str:
    index, providers = _index(payload), _providers(payload)
    sections = []
    for mode in payload["modes"]:
        rows = []
        for c in payload["cases"]:
            records = [index.get((c["case"], mode, p)) for p in providers]
            rows.append([c["case"]] + [_fmt(r.get("peak_mem_mib")) if r and r["status"] == "ok" else ""
                                       for r in records])
        if any(any(cell not in ("", "–") for cell in row[1:]) for row in rows):
            sections.append(f"### {mode}: peak memory above the inputs (MiB)\n\n" + _table(["case"] + providers, rows))
    return "\n\n".join(sections)


def _reasons(payload: dict) -> str:
    """Each distinct skip / failure reason once per provider, with the number of cases it hit."""
    counts: dict[tuple[str, str, str], int] = {}
    for r in payload["results"]:
        if r["status"] != "ok":
            key = (r["provider"], r["status"], r.get("reason") or "")
            counts[key] = counts.get(key, 0) + 1
    return "\n".join(f"- `{p}` {status} ×{n}: {reason}" for (p, status, reason), n in counts.items())


def checks_table(payload: dict) -> str:
    rows = [[c["name"], _fmt(c.get("value")), f"{c.get('op', '≥')} {_fmt(c['threshold'])}",
             {True: "met", False: "**not met**", None: "not measured"}[c.get("met")], c.get("detail", "")]
            for c in payload.get("checks", [])]
    return _table(["target", "value", "threshold", "status", "detail"], rows) if rows else ""


def _short(value: object, limit: int = 160) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown(payload: dict) -> str:
    env, ceilings = payload["env"], payload["ceilings"]
    commit = env["commit"][:12] + (" (dirty)" if env.get("dirty") else "")
    head = [
        f"# {payload['bench']} benchmark: {env['gpu']}",
        "",
        "_Generated from the JSON file of the same name by `bench/_harness.py`; do not edit by hand._",
        "",
        f"- date (UTC) {env['date_utc']} · commit `{commit}`",
        f"- driver {env.get('driver')} · torch {env['torch']} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}) · "
        f"triton {env.get('triton')} · python {env['python']}",
        f"- measured ceilings: matmul {_fmt(ceilings['matmul']['tflops'])} TFLOP/s "
        f"({ceilings['matmul'].get('dtype')} {ceilings['matmul'].get('shape')}), "
        f"device copy {_fmt(ceilings['copy']['gbps'])} GB/s (read + write)",
        *[f"- {key}: `{_short(value)}`" for key, value in payload.get("config", {}).items()],
        "",
        "## Providers",
        "",
        *[f"- `{name}`: {text}" for name, text in payload["providers"].items()],
    ]
    parts = ["\n".join(head)]
    if payload.get("checks"):
        parts.append("## Targets\n\n" + checks_table(payload))
    parts.append("## Throughput\n\n" + throughput_tables(payload))
    reasons = _reasons(payload)
    if reasons:
        parts.append("## Skipped and failed\n\n" + reasons)
    memory = _memory_tables(payload)
    if memory:
        parts.append("## Memory\n\n" + memory)
    for table in payload.get("tables", []):
        note = f"{table['note']}\n\n" if table.get("note") else ""
        parts.append(f"## {table['title']}\n\n{note}" + _table(table["header"], table["rows"]))
    parts.append("## Cases\n\n" + _table(
        ["case", "shape"],
        [[c["case"], ", ".join(f"{k}={v}" for k, v in c.items() if k not in ("case", "lengths"))]
         for c in payload["cases"]]) + "\n\n(Exact per-image lengths are in the JSON.)")
    return "\n\n".join(parts) + "\n"


def plot(payload: dict, path: Path) -> Path | None:
    """Grouped bars of throughput: one row of panels per mode, one panel per `layout.panel` value."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return None
    layout = payload.get("layout") or {}
    panel_key, x_key = layout.get("panel"), layout.get("x", "case")
    cases = payload["cases"]
    panels = list(dict.fromkeys(c[panel_key] for c in cases)) if panel_key else [None]
    index = _index(payload)
    providers = [p for p in _providers(payload)
                 if any(r["provider"] == p and r.get("throughput") is not None for r in payload["results"])]
    modes = [m for m in payload["modes"] if any(r["mode"] == m and r["status"] == "ok" for r in payload["results"])]
    if not modes or not providers:
        print("nothing was measured: skipping the plot")
        return None
    fig, axes = plt.subplots(len(modes), len(panels), figsize=(max(7.0, 4.5 * len(panels) + 1), 3.4 * len(modes)),
                             squeeze=False, sharey="row")
    ceiling = payload["ceilings"].get(payload["metric"]["ceiling"], {})
    ceiling_value = ceiling.get("tflops") or ceiling.get("gbps")
    width = 0.8 / len(providers)
    for row, mode in enumerate(modes):
        for col, panel in enumerate(panels):
            ax = axes[row][col]
            panel_cases = [c for c in cases if panel_key is None or c[panel_key] == panel]
            for i, provider in enumerate(providers):
                ys = [(index.get((c["case"], mode, provider)) or {}).get("throughput") for c in panel_cases]
                xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(panel_cases))]
                ax.bar(xs, [y if y is not None else 0 for y in ys], width, label=provider)
            if ceiling_value:
                ax.axhline(ceiling_value, color="black", linestyle="--", linewidth=0.8)
            ax.set_xticks(range(len(panel_cases)), [str(c[x_key]) for c in panel_cases], fontsize=8)
            ax.set_title(f"{mode}" + (f" · {panel}" if panel is not None else ""), fontsize=9)
            if col == 0:
                ax.set_ylabel(payload["metric"]["unit"])
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    env = payload["env"]
    fig.suptitle(f"{payload['bench']} · {env['gpu']} · torch {env['torch']} · {env['date_utc'][:10]}"
                 + (" · dashed: measured ceiling" if ceiling_value else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def render(json_path: str | os.PathLike) -> tuple[Path, Path | None]:
    """Write `<stem>.md` and `<stem>.png` beside a results JSON file; returns their paths (png None if skipped)."""
    json_path = Path(json_path)
    payload = load(json_path)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(payload))
    return md_path, plot(payload, json_path.with_suffix(".png"))


def write_environment(path: str | os.PathLike, cpu_smoke: bool = False) -> dict:
    """The environment and both measured ceilings of this machine's GPU, as JSON at `path` (gpu_check.sh);
    with cpu_smoke, of the CPU with the tiny smoke sizes (gpu_check.sh's CPU mode)."""
    device = torch.device("cpu" if cpu_smoke else "cuda")
    record = {"env": environment(device), "ceilings": measure_ceilings(device, smoke=cpu_smoke)}
    Path(path).write_text(json.dumps(_finite(record), indent=1) + "\n")
    return record


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "--environment" and sys.argv[3:] in ([], ["--cpu-smoke"]):
        found = write_environment(sys.argv[2], cpu_smoke=sys.argv[3:] == ["--cpu-smoke"])
        print(json.dumps(found, indent=1))
        sys.exit(0)
    if len(sys.argv) < 2:
        sys.exit("usage: python bench/_harness.py RESULTS.json [...]  (rewrites the .md and .png beside each)\n"
                 "       python bench/_harness.py --environment OUT.json [--cpu-smoke]  (GPU, versions and measured "
                 "ceilings; --cpu-smoke: the CPU's, tiny sizes)")
    for arg in sys.argv[1:]:
        for written in render(arg):
            if written is not None:
                print(written)
