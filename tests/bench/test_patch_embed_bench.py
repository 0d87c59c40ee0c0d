"""bench/patch_embed.py runs end to end without a GPU: `--cpu-smoke` goes through the same code paths as a real
run (providers, timing, GB/s and TFLOP/s, ratios, targets, JSON, markdown, plot), and a plain run exits 0 saying
there is nothing to benchmark. Both run as subprocesses with CUDA hidden, so they behave the same on GPU hosts.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "patch_embed.py"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("FINEVIT_KERNELS", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_patch_embed_bench_cpu_smoke_writes_json_markdown_and_plot(tmp_path):
    proc = run_bench("--cpu-smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    (json_path,) = tmp_path.glob("patch_embed_cpu_*.json")
    payload = json.loads(json_path.read_text())
    for key in ("gpu", "driver", "torch", "triton", "python", "commit", "date_utc"):
        assert key in payload["env"], key
    assert payload["ceilings"]["matmul"]["tflops"] > 0 and payload["ceilings"]["copy"]["gbps"] > 0
    assert {(c["patch"], c["dim"]) for c in payload["cases"]} == {(16, 16), (16, 32), (14, 16), (14, 32)}
    assert all(c["features"] == 3 * c["patch"] ** 2 and c["patches"] == 2 * 16 for c in payload["cases"])

    ok = [r for r in payload["results"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} == {"finevit", "torch", "conv2d", "bare_gemm"}
    assert {r["mode"] for r in ok} == {"fwd", "bwd", "fwd+bwd"}
    cases = {c["case"]: c for c in payload["cases"]}
    for r in ok:
        n, k, d = (cases[r["case"]][key] for key in ("patches", "features", "dim"))
        assert r["flop"] == {"fwd": 2, "bwd": 2, "fwd+bwd": 4}[r["mode"]] * n * k * d
        assert r["bytes"] > n * k and r["throughput"] > 0 and r["tflops"] > 0
        assert abs(r["throughput"] - r["bytes"] / (r["ms"] * 1e-3) / 1e9) < 1e-6 * r["throughput"]
    # Every baseline computes what ours computes (fp32 here), and carries the ratio against it.
    baselines = [r for r in ok if r["provider"] != "finevit"]
    assert all(r["rel_diff_vs_ours"] < 1e-4 and r["ours_ratio"] > 0 for r in baselines)
    skipped = [r for r in payload["results"] if r["status"] == "skipped"]
    assert skipped and all(r["provider"] == "torch_compiled" and r["reason"] for r in skipped)
    assert {c["name"] for c in payload["checks"]} >= {"fwd: speedup of finevit over the PyTorch path (torch)",
                                                      "fwd: finevit time / bare GEMM time"}
    assert all(c["met"] is not None for c in payload["checks"])

    markdown = json_path.with_suffix(".md").read_text()
    assert "| case |" in markdown and "## Targets" in markdown and "Bytes each provider" in markdown
    if importlib.util.find_spec("matplotlib") is not None:
        assert json_path.with_suffix(".png").stat().st_size > 0
    assert "Targets" in proc.stdout


def test_patch_embed_bench_without_cuda_exits_zero_with_a_message(tmp_path):
    proc = run_bench("--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device: nothing to benchmark" in proc.stdout
    assert not list(tmp_path.iterdir())
