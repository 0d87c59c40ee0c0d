"""bench/data.py runs end to end on the CPU: `--cpu-smoke` goes through the same code paths as a real run
(workloads, every provider, grid checks, interleaved timing, ratios, targets, JSON and markdown)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_data_bench_cpu_smoke_writes_json_and_markdown(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "data.py"), "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (json_path,) = tmp_path.glob("data_cpu_*.json")
    payload = json.loads(json_path.read_text())
    for key in ("gpu", "torch", "python", "commit", "date_utc"):
        assert key in payload["env"], key
    assert [c["case"] for c in payload["cases"]] == ["embedded", "photo-vga"]
    ok = [r for r in payload["results"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} == {"finevit", "hf_pil", "hf_fast"}  # the same grids, or no record
    assert all(r["throughput"] > 0 and r["grids_match"] for r in ok)
    assert all(r["ours_ratio"] > 0 for r in ok if r["provider"] != "finevit")
    assert all(c["mad_vs_hf_pil"] < 2.0 for c in payload["cases"])  # the same pixels, give or take a level
    assert len(payload["checks"]) == 2 and all(c["met"] is not None for c in payload["checks"])
    markdown = json_path.with_suffix(".md").read_text()
    assert "## Targets" in markdown and "| embedded |" in markdown
