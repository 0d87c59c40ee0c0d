"""The trainer end to end on CPU: the embedded default's whole path (dataset generated when missing, 2 gloo
processes, evaluation, export, summary, metrics, curves) with a tiny model and a few steps."""

import json
import sys

import torch

from finevit.data.image import ImageConfig
from finevit.model import FineCLIP, FineViT
from tests.train.helpers import TINY, run_group, torchrun, train_records

TRAIN_KEYS = {"loss", "lr", "logit_scale", "logit_bias", "grad_norm", "images_per_s", "patch_tokens_per_s",
              "text_tokens_per_s", "mfu_pct", "data_wait_pct", "peak_mem_gib", "skipped"}


def test_embedded_default_generates_data_trains_evaluates_exports_and_summarizes(tmp_path):
    data_root, run_dir = tmp_path / "data" / "synth", tmp_path / "run"
    result = torchrun([*TINY, f"--data.root={data_root}", "--data.synth_train=48", "--data.synth_val=16",
                       f"--job.run_dir={run_dir}", "--training.steps=3", "--eval.limit=12", "--eval.interval=2"])
    out = result.stdout
    assert "generating the synthetic dataset" in out and (data_root / "meta.json").is_file()
    assert "FineViT stage 1" in out and "text→image, dense captions" in out and "hard negatives" in out

    records = train_records(run_dir)
    assert sorted(records) == [1, 2, 3]
    assert TRAIN_KEYS <= set(records[3])
    assert records[3]["images_per_s"] > 0 and records[3]["mfu_pct"] > 0
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert [e["step"] for e in evals] == [2, 3] and evals[-1]["num_images"] == 12  # periodic, then final
    assert (run_dir / "eval" / "step-2").is_dir()
    results = list((run_dir / "eval" / "step-3").glob("*.json"))
    assert {json.loads(p.read_text())["task"] for p in results} == {
        "zeroshot_retrieval", "hard_negatives", "zeroshot_classification"}
    assert (run_dir / "training_curves.png").stat().st_size > 1000
    assert json.loads((run_dir / "config.json").read_text())["training"]["steps"] == 3
    assert (run_dir / "summary.txt").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-3"]

    # The export: FineCLIP and its FineViT, each loadable alone, with the tokenizer and preprocessing.
    clip = FineCLIP.from_pretrained(run_dir / "export" / "fineclip")
    vit = FineViT.from_pretrained(run_dir / "export" / "vision")
    for name, value in vit.state_dict().items():
        assert torch.equal(value, clip.vision.state_dict()[name]), name
    image_config = ImageConfig.load(run_dir / "export" / "vision")
    assert image_config.max_pixels == 4096 and image_config.patch_size == vit.config.patch_size
    assert (run_dir / "export" / "fineclip" / "tokenizer" / "tokenizer.json").is_file()
    # ... and the evaluation CLI runs on it as exported.
    cli = run_group([sys.executable, "-m", "finevit.eval", "--checkpoint", str(run_dir / "export" / "fineclip"),
                     "--data", str(data_root), "--tasks", "retrieval", "--limit", "8", "--no-progress",
                     "--out", str(tmp_path / "cli")], timeout=120)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert list((tmp_path / "cli").glob("*zeroshot_retrieval.json"))
