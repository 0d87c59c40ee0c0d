"""The fidelity experiment's smoke form (`python -m train.fidelity --smoke`): every arm trains a few steps with the
real trainers, is evaluated by the real suite, and the results land in results.json, summary.md and fidelity.png.
Its metrics are not checked for quality (4 steps learn nothing), only for being there and in range."""

import json
import sys

from tests.train.helpers import REPO, run_group
from train.fidelity import README_END, README_START, failure_excerpt, parse_args, readme_block, run_arm

ARMS = {"dense", "short", "square", "stage2", "dense_before_stage2"}


def test_smoke_experiment_writes_every_arm_and_comparison(tmp_path, synth_root):
    out = tmp_path / "fidelity"
    command = [sys.executable, "-m", "train.fidelity", "--out", str(out), "--smoke", "--comparisons", "a,b,c",
               "--data-root", str(synth_root)]
    done = run_group(command, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-12000:]

    result = json.loads((out / "results.json").read_text())
    assert set(result["summary"]) == ARMS
    assert result["seeds"] == [0] and len(result["runs"]) == 4  # dense, short, square, stage2 for seed 0
    for arm in ("dense", "short", "square"):
        metrics = result["summary"][arm]
        for kind in ("all", "color", "shape", "size", "pattern", "position", "relation"):
            value = metrics[f"hard_negatives/{kind}"]["mean"]
            assert 0.0 <= value <= 1.0, (arm, kind, value)
        assert {"classification/shape", "classification/color", "retrieval/image_r@1"} <= set(metrics)
    for arm in ("stage2", "dense_before_stage2"):
        probe = {k for k in result["summary"][arm] if k.startswith("probe/")}
        assert {"probe/mean_accuracy", "probe/color", "probe/shape"} <= probe, (arm, probe)
    assert any(k.startswith("regions/") for k in result["summary"]["stage2"])
    claims = {(row["comparison"], row["claim"]) for row in result["comparisons"]}
    assert {c for c, _ in claims} == {"a", "b", "c"}
    assert all(row["delta"] is not None for row in result["comparisons"])

    summary = (out / "summary.md").read_text()
    assert "| (a) |" in summary and "| (b) |" in summary and "| (c) |" in summary
    assert (out / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Run again: every arm is reused, nothing retrains, the training time is kept; --readme rewrites the block.
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{README_START}\nstale\n{README_END}\n\nAfter.\n")
    again = run_group(command + ["--readme", str(readme)], timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((out / "results.json").read_text())
    assert all(run["reused"] for run in rerun["runs"])
    assert rerun["train_seconds"] == result["train_seconds"] > 0
    text = readme.read_text()
    assert "stale" not in text and text.startswith("# Title") and text.endswith("After.\n")
    assert readme_block(rerun) in text


def test_readme_claims_table_is_generated_from_the_committed_results():
    result = json.loads((REPO / "results" / "fidelity" / "results.json").read_text())
    assert readme_block(result) in (REPO / "README.md").read_text(), \
        "README's fidelity block is stale: run `python -m train.fidelity --out results/fidelity --readme README.md`"


def test_a_failed_runs_excerpt_shows_the_ranks_cause_not_only_torchruns_report():
    steps = [f"step {i}/400 | loss 6.5" for i in range(100)]
    cause = ["terminate called after throwing an instance of 'gloo::EnforceNotMet'",
             "  what():  [enforce fail at pair.cc:446] op.preamble.length <= op.nbytes",
             "Fatal Python error: Aborted", "Current thread 0x00007f (most recent call first):",
             '  File "train/common.py", line 423 in close']
    report = ["Traceback (most recent call last):", *[f"  torchrun frame {i}" for i in range(25)],
              "exitcode  : -6 (pid: 2) (SIGABRT)"]
    excerpt = failure_excerpt("\n".join(steps + cause + steps[:5] + report))
    assert all(line in excerpt.splitlines() for line in cause + report)
    assert "step 50/400 | loss 6.5" not in excerpt
    # A log whose only failure lines are torchrun's report: just its end.
    assert failure_excerpt("\n".join(steps + report)).splitlines() == (steps + report)[-30:]


def test_an_arm_whose_rank_dies_restarts_once_and_resumes(tmp_path, synth_root):
    # The trainer's fault injection kills the last rank at step 3 of the first attempt only (debug.fault).
    args = parse_args(["--out", str(tmp_path), "--smoke", "--data-root", str(synth_root),
                       "--stage1-args=--debug.fault=step:3"])
    run = run_arm("dense", 0, args)
    log = (tmp_path / "runs" / "dense-s0.log").read_text()
    assert "injected fault, SIGKILL at step 3" in log and "resum" in log.lower(), log[-3000:]
    assert not run["reused"] and run["metrics"]
