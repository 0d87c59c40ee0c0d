"""bench/loss.py runs end to end without a GPU: `--cpu-smoke` goes through the same code paths as a real run
(providers, timing, peak memory, ratios, the largest-batch probe, targets, JSON, markdown, plot), and a plain
run exits 0 saying there is nothing to benchmark. Both run as subprocesses with CUDA hidden, so they behave
the same on GPU hosts. The out-of-memory bookkeeping (an OOM is recorded once, larger cases are not run) is
checked in-process with a provider that raises torch.cuda.OutOfMemoryError on cue.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "loss.py"
HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("FINEVIT_KERNELS", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_loss_bench_cpu_smoke_writes_json_markdown_and_plot(tmp_path):
    proc = run_bench("--cpu-smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    (json_path,) = tmp_path.glob("loss_cpu_*.json")
    payload = json.loads(json_path.read_text())
    for key in ("gpu", "driver", "torch", "triton", "python", "commit", "date_utc"):
        assert key in payload["env"], key
    assert payload["config"]["finevit.siglip_loss"] == "finevit.kernels.reference.siglip_loss"
    assert {c["loss"] for c in payload["cases"]} == {"siglip", "clip"}
    assert all(c["pairs"] == c["batch"] ** 2 for c in payload["cases"])

    ok = [r for r in payload["results"] if r["status"] == "ok"]
    expected = {"finevit", "naive"} | ({"open_clip"} if HAS_OPEN_CLIP else set())
    for loss in ("siglip", "clip"):
        for mode in ("fwd", "fwd+bwd"):
            assert {r["provider"] for r in ok if r["loss"] == loss and r["mode"] == mode} == expected, (loss, mode)
    if not HAS_OPEN_CLIP:
        assert all(r["status"] == "skipped" and r["reason"] for r in payload["results"] if r["provider"] == "open_clip")
    for r in ok:
        assert r["ms"] > 0 and r["throughput"] > 0
        assert r["flop"] == {"fwd": 2, "fwd+bwd": 6}[r["mode"]] * r["batch"] ** 2 * r["dim"]
        assert abs(r["pairs_per_s"] - r["batch"] ** 2 / (r["ms"] * 1e-3)) < 1e-6 * r["pairs_per_s"]
    # Every baseline computes finevit's loss (fp32 here) and carries the ratio against it.
    baselines = [r for r in ok if r["provider"] != "finevit"]
    assert all(r["rel_diff_vs_ours"] < 1e-4 and r["ours_ratio"] > 0 for r in baselines)
    # The eager loss materializes B×B logits: its measured training-step peak holds at least one B×B fp32 matrix.
    naive_steps = [r for r in ok if r["provider"] == "naive" and r["mode"] == "fwd+bwd" and r["batch"] == 256]
    if naive_steps[0].get("peak_mem_gb") is not None:  # None where this torch's profiler hides allocations
        assert all(r["peak_in_fp32_bxb"] >= 1 for r in naive_steps)

    assert {p["loss"]: p["largest_batch"] for p in payload["probe"]} == {"siglip": 1024, "clip": 1024}
    assert all(t["status"] == "ok" for p in payload["probe"] for t in p["tries"])
    assert {(m["batch"], m["dim"]) for m in payload["memory_model"]} >= {(65536, 1152), (2**20, 1152)}
    assert len(payload["checks"]) == 6 and all(c["met"] is not None for c in payload["checks"])
    assert {c["op"] for c in payload["checks"] if "memory" in c["name"]} == {"≤"}

    markdown = json_path.with_suffix(".md").read_text()
    for heading in ("## Targets", "## Throughput", "fwd+bwd: time · pairs/s · extra peak memory",
                    "## Largest batch that fits", "## Memory model (computed, not measured)"):
        assert heading in markdown, heading
    if importlib.util.find_spec("matplotlib") is not None:
        assert json_path.with_suffix(".png").stat().st_size > 0
    assert "Targets" in proc.stdout and "Memory model (computed, not measured" in proc.stdout


def test_loss_bench_without_cuda_exits_zero_with_a_message(tmp_path):
    proc = run_bench("--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device: nothing to benchmark" in proc.stdout
    assert not list(tmp_path.iterdir())


def _load_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script imports its sibling `_harness`
    spec = importlib.util.spec_from_file_location("finevit_bench_loss", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class _OomInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.sum()

    @staticmethod
    def backward(ctx, grad):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")


def test_loss_bench_records_an_oom_once_and_skips_the_cases_it_implies(monkeypatch):
    bench = _load_bench(monkeypatch)
    calls: list[tuple[int, int]] = []

    def build(loss, x):  # forward OOMs from B = 128, backward from B = 64
        batch, dim = x.img.shape

        def forward():
            calls.append((batch, dim))
            if batch >= 128:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return _OomInBackward.apply(x.img) if batch >= 64 else x.img.sum()
        return forward

    monkeypatch.setitem(bench.PROVIDERS, "fake", bench.Provider(build, "raises OOM on cue"))
    device, points, status = torch.device("cpu"), [], {}
    for dim in (16, 32):
        for batch in (32, 64, 128):
            case = bench.describe_case("siglip", batch, dim, torch.float32)
            inputs = bench.make_inputs(batch, dim, torch.float32, device)
            records, _ = bench.run_provider("fake", case, inputs, ["fwd", "fwd+bwd"], device, 1.0, points, None)
            status.update({(batch, dim, r["mode"]): r["status"] for r in records})

    assert status == {
        (32, 16, "fwd"): "ok", (32, 16, "fwd+bwd"): "ok",
        (64, 16, "fwd"): "ok", (64, 16, "fwd+bwd"): "oom",
        (128, 16, "fwd"): "oom", (128, 16, "fwd+bwd"): "skipped",  # implied by the forward's OOM
        (32, 32, "fwd"): "ok", (32, 32, "fwd+bwd"): "ok",
        (64, 32, "fwd"): "ok", (64, 32, "fwd+bwd"): "skipped",  # implied by (64, 16, fwd+bwd)
        (128, 32, "fwd"): "skipped", (128, 32, "fwd+bwd"): "skipped",
    }
    assert (128, 32) not in calls  # a case known to fail is never run
    assert [(p.batch, p.dim, p.mode) for p in points] == [(64, 16, "fwd+bwd"), (128, 16, "fwd")]
