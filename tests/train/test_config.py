"""The trainer's configuration: defaults = configs/stage1/cpu.toml, TOML and command-line precedence,
errors that name the key, the saved config read back, and the GPU configs' shapes."""

import json
import sys

import pytest

from finevit.model import FineCLIPConfig, FineViTConfig, TextConfig
from tests.train.helpers import REPO, STAGE1, run_group
from train import config as C

CONFIGS = REPO / "configs" / "stage1"


def test_the_embedded_default_is_configs_stage1_cpu_toml():
    assert C.parse_args(["--config", str(CONFIGS / "cpu.toml")]) == C.parse_args([])


def test_the_embedded_default_trains_the_cpu_preset_unchanged():
    cfg = C.parse_args([])
    assert cfg.model.preset == "cpu" and cfg.model.vision == {} and cfg.model.text == {}
    assert C.build_model_config(cfg) == FineCLIPConfig.from_name("cpu")
    # The numbers the embedded default's recipe was measured with (README's stage-1 table): pinned field by field.
    assert FineCLIPConfig.from_name("cpu") == FineCLIPConfig(
        vision=FineViTConfig(patch_size=16, width=192, depth=3, num_heads=6, mlp_dim=768,
                             image_mean=(0.85, 0.86, 0.85), image_std=(0.12, 0.12, 0.15)),
        text=TextConfig(vocab_size=512, width=192, depth=2, num_heads=6, mlp_dim=768, context_length=64),
        embed_dim=192)


def test_gpu_configs_build_the_named_presets_unchanged():
    for name, width, depth, patch in (("b16", 768, 12, 16), ("so400m14", 1152, 27, 14)):
        cfg = C.parse_args(["--config", str(CONFIGS / f"{name}.toml")])
        model = C.build_model_config(cfg)
        assert (model.vision.width, model.vision.depth, model.vision.patch_size) == (width, depth, patch)
        assert model.text.width == width and model.text.context_length == 512
        assert cfg.training.param_dtype == "bfloat16" and cfg.parallelism.backend == "nccl"


def test_every_preset_is_built_as_named_with_no_hidden_layer():
    for name in ("tiny", "cpu", "b16"):
        model = C.build_model_config(C.parse_args([f"--model.preset={name}"]))
        assert model.vision == FineViTConfig.from_name(name) and model.text == TextConfig.from_name(name)
        assert model.embed_dim == model.vision.width


def test_model_vision_and_text_replace_single_fields_of_the_preset():
    model = C.build_model_config(C.parse_args(["--model.preset=tiny", "--model.text.depth=1"]))
    assert model.text == TextConfig.from_name("tiny", depth=1) and model.vision == FineViTConfig.from_name("tiny")


def test_command_line_overrides_the_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[optimizer]\nlr = 0.02\nbetas = [0.8, 0.9]\n[training]\nsteps = 7\n'
                    '[model.vision]\ndepth = 1\n')
    cfg = C.parse_args(["--config", str(path), "--training.steps", "9", "--model.vision.width=96",
                        "--model.vision.num_heads=3", "--checkpoint.enable=false",
                        "--eval.tasks=retrieval,hard_negatives",
                        "--model.init_logit_bias=-5", "--job.deterministic"])
    assert cfg.optimizer.lr == 0.02 and cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.training.steps == 9 and cfg.checkpoint.enable is False and cfg.job.deterministic is True
    assert cfg.eval.tasks == ["retrieval", "hard_negatives"] and cfg.model.init_logit_bias == -5.0
    vision = C.build_model_config(cfg).vision
    assert (vision.depth, vision.width, vision.num_heads) == (1, 96, 3)


@pytest.mark.parametrize("argv, match", [
    (["--optimizer.lrr=1"], r"unknown config key 'optimizer.lrr'.*keys of \[optimizer\]: lr, betas"),
    (["--optimiser.lr=1"], r"unknown config section 'optimiser'"),
    (["--model.vision.widht=64"], r"unknown config key 'model.vision.widht'.*FineViTConfig"),
    (["--training.steps=ten"], r"training.steps: expected an integer, got 'ten'"),
    (["--training.steps=0"], r"training.steps must be >= 1"),
    (["--job.deterministic=maybe"], r"job.deterministic: expected a boolean"),
    (["--model.loss=triplet"], r"model.loss: must be one of siglip, clip"),
    (["--optimizer.betas=0.9"], r"optimizer.betas: expected 2 values"),
    (["--eval.tasks=retrieval,ocr"], r"eval.tasks: unknown task\(s\) \['ocr'\]"),
    (["--model.vision.num_heads=5"], r"model: .*not divisible by num_heads=5"),
    (["--model.loss=clip", "--model.init_logit_bias=-5"], r"model.init_logit_bias applies to model.loss = 'siglip'"),
    (["--debug.fault=crash:3"], r"debug.fault: each fault is 'step:N' or 'save:N'"),
    (["--training"], r"names a section, not a key"),
    (["stray"], r"unexpected argument 'stray'"),
])
def test_bad_values_are_errors_that_name_the_key(argv, match):
    with pytest.raises(C.ConfigError, match=match):
        C.parse_args(argv)


def test_unknown_keys_in_a_toml_file_name_the_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[data]\ntoken_budgett = 5\n")
    with pytest.raises(C.ConfigError, match=r"unknown config key 'data.token_budgett' \(.*bad.toml\)"):
        C.parse_args(["--config", str(path)])
    path.write_text("[dataa]\nx = 1\n")
    with pytest.raises(C.ConfigError, match=r"unknown config section 'dataa'"):
        C.parse_args(["--config", str(path)])


def test_the_saved_resolved_config_reads_back_equal(tmp_path):
    cfg = C.parse_args(["--model.vision.depth=2", "--optimizer.betas=0.8,0.99", "--model.init_logit_scale=2.5"])
    path = C.save(cfg, tmp_path / "run" / "config.json")
    assert json.loads(path.read_text())["model"]["vision"] == {"depth": 2}
    assert C.parse_args(["--config", str(path)]) == cfg


def test_help_documents_every_field():
    text = C.help_text()
    for section, cls in C._sections().items():
        docs = C.field_docs(cls)
        for name in C._hints(cls):
            assert f"--{section}.{name}=" in text
            assert docs.get(name), f"{section}.{name} has no doc comment"


def test_the_script_reports_a_config_error_and_exits_2():
    result = run_group([sys.executable, str(STAGE1), "--optimizer.lrr=1"], timeout=120)
    assert result.returncode == 2
    assert "unknown config key 'optimizer.lrr'" in result.stderr
