"""The fidelity experiment's smoke form (`python -m train.fidelity --smoke`): every arm trains a few steps with the
real trainers, is evaluated by the real suite, and the results land in results.json, summary.md and fidelity.png.
Its metrics are not checked for quality (4 steps learn nothing), only for being there and in range."""

import json
import sys

from tests.train.helpers import run_group

ARMS = {"dense", "short", "square", "stage2", "dense_before_stage2"}


def test_smoke_experiment_writes_every_arm_and_comparison(tmp_path, synth_root):
    out = tmp_path / "fidelity"
    command = [sys.executable, "-m", "train.fidelity", "--out", str(out), "--smoke", "--comparisons", "a,b,c",
               "--data-root", str(synth_root)]
    done = run_group(command, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

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

    # Run again: every arm is reused, nothing retrains.
    again = run_group(command, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(run["reused"] for run in json.loads((out / "results.json").read_text())["runs"])
