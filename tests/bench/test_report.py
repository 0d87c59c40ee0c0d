"""bench/report.py: the README's performance section is what the committed GPU results give, and a GPU
results file's targets end up in it (CPU smoke results never do)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def test_readme_performance_section_is_generated_from_the_committed_results():
    assert report.main(["--check"]) == 0, "run python bench/report.py and commit README.md"


def smoke_results(tmp_path: Path) -> Path:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("FINEVIT_KERNELS", None)
    command = [sys.executable, str(REPO / "bench" / "patch_embed.py"), "--cpu-smoke", "--out", str(tmp_path)]
    proc = subprocess.run(command,
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("patch_embed_cpu_*.json")
    return path


def test_section_lists_gpu_results_and_their_targets_and_ignores_cpu_runs(tmp_path):
    results = tmp_path / "results"
    path = smoke_results(results)
    assert report.newest_gpu_results(results) == {}  # a CPU smoke run is no GPU evidence

    payload = json.loads(path.read_text())
    payload["env"].update(device="cuda", gpu="NVIDIA Test GPU")
    gpu_path = results / "patch_embed_test-gpu.json"
    gpu_path.write_text(json.dumps(payload))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nstale\n{report.END}\nrest\n")
    assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1

    text = report.section(results, root=tmp_path)
    assert "NVIDIA Test GPU" in text and payload["env"]["commit"][:10] in text
    for check in payload["checks"]:
        assert check["name"] in text
    assert report.main(["--results", str(results), "--readme", str(readme)]) == 0
    updated = readme.read_text()
    assert updated.startswith("intro\n") and updated.endswith(f"{report.END}\nrest\n") and "stale" not in updated
    assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
