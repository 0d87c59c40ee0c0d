"""bench/gpu_check.sh in its CPU mode (FINEVIT_GPU_CHECK_CPU=1): every stage reports exactly one summary line, a
hanging stage is cut at its limit and the later stages still run and report, the global budget bounds a hang and
skips what no longer fits, and the output folder holds summary.txt and one tarball with everything else (the
benches' results included). Three runs of the script, side by side (two of them mostly sleep):

- main:     every stage but four of the benches (tested on their own in tests/bench); `bench_patch_embed` made
            to hang with a 5 s limit (the sanitizer and aot stages after it still run); default budget
- deadline: budget 20 s and `environment` made to hang: the deadline, not its 30 s limit, cuts it; the rest is
            skipped for lack of time
- no time:  budget 8 s: nothing fits (exit status 2)

Also, in-process: the pytest-log summary that names failing tests, from pytest-xdist's and plain `-v` output.
"""

import concurrent.futures
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"
STAGES = ["environment", "warmup", "pytest", "repro", "bench_train_step", "bench_attention", "bench_loss",
          "bench_patch_embed", "bench_rope", "bench_integrations", "sanitizer", "aot"]
MAIN_STAGES = "environment,warmup,pytest,repro,bench_train_step,bench_patch_embed,sanitizer,aot"
LINE = re.compile(r"^\[(?P<name>\w+)\] (?P<status>ok|failed \(exit \d+\)|cut at \d+ s|skipped: [^|]+?) \| "
                  r"(?P<wall>\d+) s \| (?P<key>.*)$")


def run_check(out: Path, tmp: Path, **settings: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FINEVIT_") and k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env.update(FINEVIT_GPU_CHECK_CPU="1", PYTHON=sys.executable, TMPDIR=str(tmp), **settings)
    tmp.mkdir(parents=True)
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    return {"proc": proc, "wall": time.monotonic() - start, "out": out, "tmp": tmp,
            "budget": int(settings.get("FINEVIT_GPU_CHECK_BUDGET", 240))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu_check")
    settings = {
        "main": dict(FINEVIT_GPU_CHECK_STAGES=MAIN_STAGES, FINEVIT_GPU_CHECK_HANG="bench_patch_embed",
                     FINEVIT_GPU_CHECK_LIMIT_BENCH_PATCH_EMBED="5"),
        "deadline": dict(FINEVIT_GPU_CHECK_BUDGET="20", FINEVIT_GPU_CHECK_HANG="environment"),
        "no_time": dict(FINEVIT_GPU_CHECK_BUDGET="8"),
    }
    with concurrent.futures.ThreadPoolExecutor(len(settings)) as pool:
        futures = {name: pool.submit(run_check, base / name / "out", base / name / "tmp", **values)
                   for name, values in settings.items()}
        return {name: future.result() for name, future in futures.items()}


def stage_lines(run: dict) -> dict[str, re.Match]:
    """Each stage's summary line; fails when a stage has none or more than one."""
    text = (run["out"] / "summary.txt").read_text()
    found: dict[str, list[re.Match]] = {}
    for line in text.splitlines():
        match = LINE.match(line)
        if match:
            found.setdefault(match["name"], []).append(match)
    assert sorted(found) == sorted(STAGES), text
    assert all(len(matches) == 1 for matches in found.values()), text
    return {name: matches[0] for name, matches in found.items()}


def assert_packed(run: dict) -> list[str]:
    """OUT holds summary.txt and gpu_check.tar.gz only (<= 8 files, <= 2 folders deep); the scratch folder is gone.
    Returns the tarball's member names."""
    out = run["out"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["gpu_check.tar.gz", "summary.txt"]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    assert not list(run["tmp"].glob("gpu_check.*")), "the scratch folder was left behind"
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        return tar.getnames()


def summary(run: dict) -> str:
    return (run["out"] / "summary.txt").read_text()


def test_summary_starts_with_gpu_driver_versions_commit_and_date(runs):
    for run in runs.values():
        head = summary(run).splitlines()[:6]
        assert [line.split(":")[0] for line in head] == ["GPU", "driver", "torch", "triton", "commit", "date"], head


def test_every_stage_reports_once_and_a_hanging_stage_is_cut_while_the_rest_still_run(runs):
    run = runs["main"]
    proc = run["proc"]
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a stage was cut
    lines = stage_lines(run)
    status = {name: m["status"] for name, m in lines.items()}
    assert status == {
        "environment": "ok", "warmup": "ok", "pytest": "ok", "repro": "ok",
        "sanitizer": "skipped: CPU mode (compute-sanitizer needs a GPU)", "aot": "ok",
        "bench_attention": "skipped: not selected", "bench_loss": "skipped: not selected",
        "bench_patch_embed": "cut at 5 s", "bench_rope": "skipped: not selected",
        "bench_integrations": "skipped: not selected", "bench_train_step": "ok",
    }, summary(run)
    assert 5 <= int(lines["bench_patch_embed"]["wall"]) <= 5 + 6  # SIGINT at the limit, SIGKILL 5 s later at most
    assert run["wall"] <= run["budget"]
    text = summary(run)
    # Key results: the ceilings, the warm-up tally, pytest's counts, the repro table, each bench's targets.
    assert "matmul" in lines["environment"]["key"] and "copy" in lines["environment"]["key"]
    assert re.search(r"2 processes: 2 finished, 0 stopped .* 0 failed", lines["warmup"]["key"])
    assert re.fullmatch(r"[1-9]\d* passed in [\d.]+s", lines["pytest"]["key"]), lines["pytest"]["key"]  # all passed
    assert lines["repro"]["key"].startswith("4 of 4 cases ok")
    for case in ("d72 plain fp16 det", "d72 rope fp16 det", "d72 plain fp16 ato", "d72 rope fp16 ato"):
        assert re.search(rf"^    {case} .* ok$", text, re.M), case
    for bench in ("train_step",):
        assert re.match(rf"{bench}_cpu_\S+\.json: \d+ results ok", lines[f"bench_{bench}"]["key"])
    assert re.search(r"^\[bench_train_step\].*\n    Targets \(issue 18.*\n(    .*\n)*    host syncs per step: tiny ",
                     text, re.M), text
    assert re.search(r"^result: FAILED · 0 failed, 1 cut, 0 skipped for lack of time \(bench_patch_embed\)", text, re.M)


def test_the_output_is_summary_txt_and_one_tarball_holding_logs_and_bench_results(runs):
    run = runs["main"]
    names = assert_packed(run)
    for member in ("environment.json", "environment.log", "warmup/status.txt", "warmup/kernels-0.log",
                   "warmup/patch_embed-0.log", "pytest.log", "pytest.xml", "repro.log", "attention_repro.json",
                   "aot.log", "bench_patch_embed.log", "bench_train_step.log"):
        assert f"gpu_check/{member}" in names, member
    suffixes = (".json", ".md") + ((".png",) if importlib.util.find_spec("matplotlib") else ())
    for bench in ("train_step",):
        for suffix in suffixes:
            assert any(re.fullmatch(rf"gpu_check/results/{bench}_cpu_[\d_-]+{re.escape(suffix)}", n) for n in names)
    assert "FINEVIT_GPU_CHECK_HANG" in tarfile.open(run["out"] / "gpu_check.tar.gz").extractfile(
        "gpu_check/bench_patch_embed.log").read().decode()
    assert re.search(r"^files: summary.txt, gpu_check.tar.gz \(\d+ files, of which [1-9]\d* bench results",
                     summary(run), re.M)


def test_the_budget_cuts_a_hanging_stage_and_skips_what_no_longer_fits(runs):
    run = runs["deadline"]
    assert run["proc"].returncode == 1, run["proc"].stdout + run["proc"].stderr
    assert run["wall"] <= run["budget"], run["wall"]
    lines = stage_lines(run)
    cut = re.fullmatch(r"cut at (\d+) s", lines["environment"]["status"])
    assert cut and int(cut[1]) <= 20 - 6 - 5 < 30, lines["environment"]["status"]  # the deadline's limit, not 30 s
    assert {name: m["status"] for name, m in lines.items() if name != "environment"} == {
        name: "skipped: CPU mode (compute-sanitizer needs a GPU)" if name == "sanitizer" else "skipped: no time left"
        for name in STAGES if name != "environment"}
    assert re.search(r"^result: FAILED · 0 failed, 1 cut, 10 skipped for lack of time", summary(run), re.M)
    assert "gpu_check/environment.log" in assert_packed(run)


def test_a_budget_too_small_for_any_stage_reports_every_stage_skipped_and_exits_2(runs):
    run = runs["no_time"]
    assert run["proc"].returncode == 2, run["proc"].stdout + run["proc"].stderr
    assert run["wall"] <= run["budget"]
    assert {m["status"] for m in stage_lines(run).values()} == {
        "skipped: no time left", "skipped: CPU mode (compute-sanitizer needs a GPU)"}
    assert re.search(r"^result: INCOMPLETE · 0 failed, 0 cut, 11 skipped for lack of time", summary(run), re.M)
    assert_packed(run)


# ----------------------------------------------------------------------------------------------------
# The pytest-log summary (bench/_gpu_check.py)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def helper(monkeypatch):
    spec = importlib.util.spec_from_file_location("finevit_gpu_check_helper", REPO / "bench" / "_gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pytest_summary_names_the_failures_of_an_xdist_run(helper, tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text(
        "[gw0] [ 25%] PASSED tests/kernels/test_a.py::test_ok[64]\n"
        "[gw1] [ 50%] FAILED tests/kernels/test_a.py::test_bad[72-rope-torch.bfloat16]\n"
        "[gw0] [ 75%] ERROR tests/integrations/test_b.py::test_setup\n"
        "[gw1] [100%] SKIPPED tests/kernels/test_a.py::test_gpu_only\n"
        "=========================== short test summary info ============================\n"
        "FAILED tests/kernels/test_a.py::test_bad[72-rope-torch.bfloat16] - RuntimeError: CUDA error: an illegal "
        "memory access was encountered\n"
        "ERROR tests/integrations/test_b.py::test_setup - Failed: Timeout >60.0s\n"
        "============= 1 failed, 1 passed, 1 skipped, 1 error in 95.12s (0:01:35) =============\n")
    key, *details = helper.pytest_summary(str(log))
    assert key == "1 failed, 1 passed, 1 skipped, 1 error in 95.12s (0:01:35) · failing: 2"
    assert details == [
        "ERROR tests/integrations/test_b.py::test_setup - Failed: Timeout >60.0s",
        "FAILED tests/kernels/test_a.py::test_bad[72-rope-torch.bfloat16] - RuntimeError: CUDA error: an illegal "
        "memory access was encountered",
    ]


def test_pytest_summary_of_a_run_killed_before_its_final_line(helper, tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text("tests/kernels/test_a.py::test_ok PASSED [ 10%]\n"
                   "tests/kernels/test_a.py::test_bad FAILED [ 20%]\n"
                   "tests/kernels/test_a.py::test_hangs \n")
    key, *details = helper.pytest_summary(str(log))
    assert key == ("no final pytest line (cut?); seen so far: 1 passed, 1 failed · failing: 1 · running when "
                   "stopped: tests/kernels/test_a.py::test_hangs")
    assert details == ["FAILED tests/kernels/test_a.py::test_bad"]
    assert helper.pytest_summary(str(tmp_path / "missing.log")) == [
        "no test results in the log; last line: (empty log)"]
