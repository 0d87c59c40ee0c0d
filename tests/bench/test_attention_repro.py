"""bench/attention_repro.py on CPU: Triton's interpreter runs our attention kernels (forward + backward, with and
without RoPE) in fp16 and fp32 against float64, one ok row per case, the same rows in its JSON; a skewed softmax
scale in our kernel must make it fail; bf16 on CPU and an interpreter-less triton import are refused by name.

Subprocesses with CUDA hidden and neither FINEVIT_KERNELS nor TRITON_INTERPRET set (tests/conftest.py sets both in
this process), so the script has to select the interpreter and the Triton path itself.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "attention_repro.py"
SMALL = ("--device", "cpu", "--tokens", "33,17,64", "--heads", "2")


def run_repro(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for name in ("FINEVIT_KERNELS", "TRITON_INTERPRET"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, *prefix, *([] if prefix else [str(SCRIPT)]), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def case_lines(stdout: str) -> dict[str, str]:
    return {" ".join(line.split()[:4]): line for line in stdout.splitlines() if line.startswith("d")}


def test_cpu_run_checks_every_case_on_the_triton_kernels_and_writes_the_rows(tmp_path):
    json_path = tmp_path / "repro.json"
    proc = run_repro(*SMALL, "--dtypes", "fp16,fp32", "--head-dims", "64,72", "--json", str(json_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "varlen_attention: triton" in proc.stdout  # the Triton kernels, not the reference
    assert "outputs NaN-poisoned: True" in proc.stdout

    expected = {f"d{d} {rope} {dtype} {backward}" for d in (64, 72) for rope in ("plain", "rope")
                for dtype in ("fp16", "fp32") for backward in ("det", "ato")}  # deterministic, atomic
    lines = case_lines(proc.stdout)
    assert set(lines) == expected, proc.stdout
    assert all(line.endswith(" ok") for line in lines.values()), proc.stdout
    assert "16 of 16 cases ok" in proc.stdout

    payload = json.loads(json_path.read_text())
    assert payload["ok"] is True and payload["env"]["device"] == "cpu"
    assert payload["config"]["implementation"] == "triton"
    rows = payload["rows"]
    assert {f"d{r['head_dim']} {'rope' if r['rope'] else 'plain'} {r['dtype']} {r['backward'][:3]}"
            for r in rows} == expected
    for r in rows:
        assert r["ok"] is True and r["status"] == "ok"
        for tensor in ("out", "dq", "dk", "dv"):
            ours, theirs = r["ours"][tensor], r["torch"][tensor]
            assert 0 < ours < (1e-2 if r["dtype"] == "fp16" else 1e-5) and 0 < theirs
            factor = payload["config"]["factors"][tensor]
            assert ours <= factor * theirs + payload["config"]["floor"]
            assert r["share_of_limit"][tensor] <= 1


def test_a_skewed_softmax_scale_in_our_kernel_is_reported_too_large_and_fails(tmp_path):
    json_path = tmp_path / "repro.json"
    proc = run_repro(*SMALL, "--dtypes", "fp32", "--head-dims", "64", "--skew-scale", "1.02", "--backwards", "atomic",
                     "--json", str(json_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = case_lines(proc.stdout)
    assert set(lines) == {"d64 plain fp32 ato", "d64 rope fp32 ato"}
    assert all(line.endswith("TOO LARGE") for line in lines.values()), proc.stdout
    payload = json.loads(json_path.read_text())
    assert payload["ok"] is False and payload["config"]["skew_scale"] == 1.02
    assert all(not r["ok"] and r["ours"]["out"] > 100 * r["torch"]["out"] for r in payload["rows"])


def test_bf16_on_cpu_is_refused_naming_the_argument():
    proc = run_repro(*SMALL, "--dtypes", "fp32,bf16")
    assert proc.returncode == 2
    assert "--dtypes bf16" in proc.stderr and "interpreter" in proc.stderr


def test_cpu_is_refused_when_triton_was_imported_without_the_interpreter():
    code = ("import runpy, sys, triton; sys.argv = [sys.argv[0], '--device', 'cpu']; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    proc = run_repro(prefix=("-c", code))
    assert proc.returncode == 1
    assert "TRITON_INTERPRET=1" in proc.stderr and "already imported" in proc.stderr
