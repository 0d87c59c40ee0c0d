"""Stage 2 end to end on CPU with 2 gloo processes: a FineCLIP encoder loaded by path, the tiny LLM text-pretrained
first, a few steps with the LLM frozen, evaluation (region tasks, probe and retrieval before/after), export,
resume; and the freeze schedules."""

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from finevit.model import FineCLIP, FineCLIPConfig, FineViT
from tests.train.helpers import REPO, STAGE2, run_group, torchrun, train_records
from train import config as C
from train.stage2 import set_trainable
from train.stage2_config import Stage2Config, encoder_config

SMALL = [
    "--data.token_budget=256", "--data.max_pixels=16384", "--data.min_pixels=4096", "--data.max_images=8",
    "--data.num_workers=0", "--data.shuffle_buffer=16", "--data.pack_buffer=16", "--training.threads=1",
    "--llm.config.hidden_size=64", "--llm.config.intermediate_size=128", "--llm.config.num_hidden_layers=1",
    "--llm.config.num_attention_heads=2", "--llm.config.num_key_value_heads=1", "--llm.pretrain_steps=2",
    "--tasks.max_length=128", "--lr_scheduler.warmup_steps=2", "--metrics.log_freq=1",
    "--metrics.tensorboard=false", "--eval.regions=6", "--eval.max_new_tokens=4", "--eval.probe_train_images=16",
    "--eval.probe_val_images=8", "--eval.limit=8", "--checkpoint.interval=2",
]


@pytest.fixture(scope="module")
def stage1_clip(tmp_path_factory, synth_root):
    """A small FineCLIP saved like stage 1's export (weights, tokenizer), to start stage 2 from."""
    directory = tmp_path_factory.mktemp("stage1") / "fineclip"
    config = FineCLIPConfig.from_name("tiny")
    config.vision = config.vision.__class__(**{**config.vision.__dict__, "width": 64, "depth": 1, "num_heads": 2,
                                               "mlp_dim": 128})
    config.text = config.text.__class__(**{**config.text.__dict__, "width": 64, "depth": 1, "num_heads": 2,
                                           "mlp_dim": 128, "vocab_size": 512, "context_length": 48})
    config.embed_dim = 64
    torch.manual_seed(0)
    clip = FineCLIP(config)
    clip.init_weights()
    clip.save_pretrained(directory)
    shutil.copytree(synth_root / "tokenizer", directory / "tokenizer")
    return directory


def stage2(args, **kwargs):
    return torchrun(args, script=STAGE2, timeout=420, **kwargs)


def test_stage2_trains_with_the_llm_frozen_evaluates_exports_and_resumes(tmp_path, synth_root, stage1_clip):
    run_dir, llm_dir = tmp_path / "run", tmp_path / "llm"
    common = [*SMALL, f"--data.root={synth_root}", "--encoder.init=path", f"--encoder.path={stage1_clip}",
              f"--llm.pretrain_dir={llm_dir}", f"--job.run_dir={run_dir}"]
    result = stage2([*common, "--training.steps=3"])
    out = result.stdout
    assert "[llm_pretrain]" in out and (llm_dir / "pretrain.json").is_file()
    assert "FineViT stage 2" in out and "local-perception probe" in out and "grounding: accuracy" in out
    records = train_records(run_dir)
    assert sorted(records) == [1, 2, 3]
    first = records[1]
    assert {"loss", "grad_norm", "llm_tokens_per_s", "mfu_pct", "images_per_s"} <= set(first)
    assert {k for k in first if k.startswith("loss/")} <= {f"loss/{t}" for t in ("region_caption", "grounding",
                                                                                   "global_caption")}
    assert first["loss"] > 0 and first["mfu_pct"] > 0

    final = json.loads((run_dir / "eval" / "step-3.json").read_text())
    initial = json.loads((run_dir / "eval" / "initial.json").read_text())
    for key in ("regions/caption/all_attributes_accuracy", "regions/grounding/accuracy_iou50",
                "probe/mean_accuracy", "probe/color/accuracy",
                "retrieval/val/zeroshot_retrieval/image_retrieval_recall@1"):
        assert 0.0 <= final[key] <= 1.0, key
    assert final["regions/regions"] == 6
    assert 0.0 <= initial["probe"]["mean_accuracy"] <= 1.0 and "retrieval" in initial

    # The LLM was frozen: the exported LLM is the text-pretrained one; the encoder moved.
    exported_llm = load_file(str(run_dir / "export" / "vlm" / "llm" / "model.safetensors"))
    pretrained_llm = load_file(str(llm_dir / "model.safetensors"))
    assert exported_llm.keys() == pretrained_llm.keys()
    assert all(torch.equal(exported_llm[k], pretrained_llm[k]) for k in exported_llm)
    start = FineCLIP.from_pretrained(stage1_clip).vision
    aligned = FineViT.from_pretrained(run_dir / "export" / "vision")
    moved = [k for k, v in aligned.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert moved and not any(k.startswith("head.") for k in moved)  # the pooling head stays as stage 1 left it
    # The export is usable by stage-1 evaluation as is.
    cli = run_group([sys.executable, "-m", "finevit.eval", "--checkpoint", str(run_dir / "export" / "fineclip"),
                     "--data", str(synth_root), "--tasks", "retrieval", "--limit", "8", "--no-progress",
                     "--out", str(tmp_path / "cli")], timeout=120)
    assert cli.returncode == 0, cli.stderr[-3000:]

    # Resume: two more steps continue from the last checkpoint, the initial evaluation is not redone.
    result = stage2([*common, "--training.steps=5"])
    assert "resumed from step 3" in result.stdout and "initial encoder" not in result.stdout
    assert sorted(train_records(run_dir)) == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-4", "step-5"]


def test_freeze_schedules_select_the_trained_parameters():
    from finevit.model import FineViTConfig
    from finevit.model.vlm import VisionLanguageModel, build_llm

    vision = FineViT(FineViTConfig.from_name("tiny", width=64, depth=1, num_heads=2, mlp_dim=64))
    llm = build_llm(64, "qwen2", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "num_key_value_heads": 1})
    model = VisionLanguageModel(vision, llm, image_token_id=3)

    def trained(mode):
        set_trainable(model, mode)
        return {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}

    assert trained("projector") == {"merger"}
    assert trained("llm") == {"merger", "vision"}
    assert trained("none") == {"merger", "vision", "llm"}
    assert not any(p.requires_grad for p in model.vision.head.parameters())


def test_config_errors_name_the_key():
    with pytest.raises(C.ConfigError, match="freeze.mode"):
        C.parse_args(["--freeze.mode=all"], Stage2Config)
    with pytest.raises(C.ConfigError, match="encoder.path"):
        C.parse_args(["--encoder.init=path"], Stage2Config)
    with pytest.raises(C.ConfigError, match="tasks"):
        C.parse_args(["--tasks.region_caption=0", "--tasks.grounding=0", "--tasks.global_caption=0"], Stage2Config)
    with pytest.raises(C.ConfigError, match="encoder: .*num_heads=5"):
        C.parse_args(["--encoder.vision.num_heads=5"], Stage2Config)
    cfg = C.parse_args(["--llm.config.hidden_size=96", "--llm.config.rope_scaling=null"], Stage2Config)
    assert cfg.llm.config == {"hidden_size": 96, "rope_scaling": None}


def test_gpu_config_and_embedded_default():
    configs = REPO / "configs" / "stage2"
    assert C.parse_args(["--config", str(configs / "cpu.toml")], Stage2Config) == C.parse_args([], Stage2Config)
    default = C.parse_args([], Stage2Config)  # a scratch encoder is stage 1's default one
    assert encoder_config(default) == C.build_model_config(C.parse_args([])).vision
    cfg = C.parse_args(["--config", str(configs / "so400m14_qwen2_5_0_5b.toml")], Stage2Config)
    assert cfg.llm.path and cfg.freeze.mode == "llm" and cfg.training.param_dtype == "bfloat16"
    assert cfg.data.max_pixels // (14 * 14) <= cfg.data.token_budget  # the largest image fits a micro-batch
    assert cfg.data.max_pixels // (14 * 14) // 4 < cfg.tasks.max_length  # and its image tokens a sequence


def test_the_encoder_learning_rate_scale_gives_the_encoder_its_own_groups():
    from finevit.model import FineViTConfig
    from finevit.model.vlm import VisionLanguageModel, build_llm
    from train.common import build_optimizer

    vision = FineViT(FineViTConfig.from_name("tiny", width=64, depth=1, num_heads=2, mlp_dim=64))
    llm = build_llm(64, "qwen2", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "num_key_value_heads": 1})
    model = VisionLanguageModel(vision, llm, image_token_id=3)
    set_trainable(model, "none")
    cfg = C.parse_args(["--optimizer.encoder_lr_scale=0.1", "--optimizer.lr=0.002"], Stage2Config)
    optimizer = build_optimizer(model, cfg, lambda name: 0.1 if name.startswith("vision.") else 1.0)
    encoder = {id(p) for p in model.vision.parameters() if p.requires_grad}
    assert optimizer.param_groups[0]["lr"] == 0.002  # the schedule's rate is group 0's
    for group in optimizer.param_groups:
        mine = {id(p) in encoder for p in group["params"]}
        assert len(mine) == 1  # a group is all encoder or all not
        assert group["lr"] == pytest.approx(0.0002 if mine == {True} else 0.002)
        assert group["weight_decay"] == (0.1 if all(p.ndim >= 2 for p in group["params"]) else 0.0)
    with pytest.raises(C.ConfigError, match="encoder_lr_scale"):
        C.parse_args(["--optimizer.encoder_lr_scale=0"], Stage2Config)
