"""bench/integrations.py runs end to end without a GPU: `--cpu-smoke` goes through the same code paths as a real
run (tiny towers of every family, providers patched and restored on one model, timing, ratios, targets, JSON,
markdown, plot), and a plain run exits 0 saying there is nothing to benchmark. Both run as subprocesses with
CUDA hidden, so they behave the same on GPU hosts.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "integrations.py"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("FINEVIT_KERNELS", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)


def test_integrations_bench_cpu_smoke_writes_json_markdown_and_plot(tmp_path):
    proc = run_bench("--cpu-smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    (json_path,) = tmp_path.glob("integrations_cpu_*.json")
    payload = json.loads(json_path.read_text())
    for key in ("gpu", "driver", "torch", "triton", "python", "commit", "date_utc"):
        assert key in payload["env"], key
    assert payload["config"]["finevit.varlen_attention"] == "finevit.kernels.reference.varlen_attention"
    assert {c["family"] for c in payload["cases"]} == {"qwen2_vl", "qwen2_5_vl", "siglip", "siglip2", "timm"}
    assert all(c["forward_flop"] > 0 for c in payload["cases"])

    ok = [r for r in payload["results"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} == {"finevit", "finevit_attn", "sdpa", "eager"}
    assert {r["mode"] for r in ok} == {"fwd", "bwd", "fwd+bwd"}
    assert all(r["ms"] > 0 and r["throughput"] > 0 for r in ok)
    # Every unpatched tower computes what the patched one computes, and carries the ratio against it.
    baselines = [r for r in ok if r["provider"] != "finevit"]
    assert all(r["rel_diff_vs_ours"] < 1e-4 and r["ours_ratio"] > 0 for r in baselines)
    skipped = [r for r in payload["results"] if r["status"] == "skipped"]
    assert {r["provider"] for r in skipped} == {"flash_attention_2"} and all(r["reason"] for r in skipped)
    assert len(payload["checks"]) == 5 and all(c["met"] is not None for c in payload["checks"])
    assert any("qwen2_vl" in c["name"] and c["threshold"] == 1.3 for c in payload["checks"])

    markdown = json_path.with_suffix(".md").read_text()
    assert "| case |" in markdown and "finevit" in markdown and "## Targets" in markdown
    if importlib.util.find_spec("matplotlib") is not None:
        assert json_path.with_suffix(".png").stat().st_size > 0
    assert "Targets" in proc.stdout


def test_integrations_bench_without_cuda_exits_zero_with_a_message(tmp_path):
    proc = run_bench("--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device: nothing to benchmark" in proc.stdout
    assert not list(tmp_path.iterdir())
