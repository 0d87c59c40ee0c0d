"""Stage-2 trainer configuration (`train/stage2.py`): its dataclass sections and their defaults; the parsing,
TOML files, `--section.key=value` overrides and shared sections are stage 1's (`train/config.py`).

    torchrun --nproc_per_node=2 train/stage2.py                                  # the embedded default
    torchrun ... train/stage2.py --config configs/stage2/so400m14_qwen2_5_0_5b.toml --llm.path=/models/Qwen2.5-0.5B
    python train/stage2.py --help                                                # every field, with its doc

Precedence: command line > TOML file > the defaults below (which are the embedded default, identical to
configs/stage2/cpu.toml). The sections stage 2 shares with stage 1 are stage 1's dataclasses; those whose
defaults differ subclass them. `[encoder.vision]` changes single fields of the `encoder.preset` FineViTConfig
(with `encoder.init = "scratch"`) and `[llm.config]` fields of the tiny LLM's transformers config.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from finevit.model import FineViTConfig
from train.config import (
    CHOICES,
    ActivationCheckpoint,
    Checkpoint,
    Compile,
    ConfigError,
    Data,
    Debug,
    Job,
    LRScheduler,
    Metrics,
    Optimizer,
    Parallelism,
    Training,
    validate_common,
)


@dataclass
class Stage2Job(Job):
    run_dir: str = "runs/stage2"  # checkpoints, metrics, eval results and exports; an existing run resumes


@dataclass
class Encoder:
    init: str = "stage1"  # "stage1": the stage-1 default's export (trained first if absent); "path"; "scratch"
    path: str = ""  # init = "path": a FineViT (or FineCLIP) save_pretrained directory
    stage1_run: str = "runs/stage1"  # init = "stage1": the stage-1 run directory whose export/ is used
    stage1_args: list[str] = field(default_factory=list)  # init = "stage1": extra stage-1 arguments if it must train
    preset: str = "cpu"  # init = "scratch": FineViTConfig preset (cpu: stage 1's default encoder)
    vision: dict = field(default_factory=dict)  # init = "scratch": FineViTConfig fields that replace the preset's


@dataclass
class LLM:
    path: str = ""  # a local transformers causal-LM checkpoint directory (with its tokenizer); "": the tiny one
    architecture: str = "qwen2"  # path = "": model_type of the tiny LLM built from a config (qwen2, llama, ...)
    config: dict = field(default_factory=dict)  # path = "": config fields over finevit.model.vlm.TINY_LLM
    tokenizer: str = ""  # path = "": tokenizer directory; "": the dataset's offline-trained tokenizer
    pretrain_steps: int = 100  # path = "": steps of text pretraining of the tiny LLM (train/llm_pretrain.py); 0: random
    pretrain_dir: str = "runs/llm_tiny"  # path = "": where the pretrained tiny LLM is kept (rebuilt if settings change)


@dataclass
class Merger:
    hidden: int = 0  # hidden width of the merger MLP; 0: 4 × the encoder width (Qwen2-VL's)


@dataclass
class Tasks:
    region_caption: float = 0.4  # weight of "Describe the region <box>." -> region caption
    grounding: float = 0.4  # weight of "Locate: <caption>." -> box
    global_caption: float = 0.2  # weight of "Describe the image in detail." -> dense caption
    turns: int = 4  # turns per image sequence (each region used once)
    max_length: int = 384  # LLM tokens per sequence (image tokens included); later turns are dropped

    def mix(self) -> dict[str, float]:
        return {"region_caption": self.region_caption, "grounding": self.grounding,
                "global_caption": self.global_caption}


@dataclass
class Freeze:
    mode: str = "llm"  # "projector": train the merger only; "llm": train encoder + merger (LLM frozen); "none"


@dataclass
class Stage2Data(Data):
    token_budget: int = 1024  # image patches per micro-batch per rank (the number of images varies)
    max_images: int = 16  # at most this many images (= LLM sequences) per micro-batch per rank
    max_pixels: int = 128 * 128  # largest resized image; native resolution below it, aspect ratio kept
    merge_size: int = 2  # resized sides are multiples of patch_size · 2: the merger's 2×2 groups are whole


@dataclass
class Stage2Optimizer(Optimizer):
    encoder_lr_scale: float = 1.0  # the encoder's learning rate as a multiple of lr (the merger and LLM get lr)


@dataclass
class Stage2LRScheduler(LRScheduler):
    warmup_steps: int = 30  # linear warmup from lr/warmup_steps to lr


@dataclass
class Stage2Training(Training):
    steps: int = 220  # optimizer steps


@dataclass
class Stage2Eval:
    interval: int = 0  # evaluate every this many steps; 0: only at the end
    at_end: bool = True  # evaluate the final model (and, at the start, the initial encoder's probe)
    regions: int = 100  # val regions decoded for region captioning and for grounding
    max_new_tokens: int = 24  # greedy decoding length limit
    probe_train_images: int = 600  # train images whose regions fit the local-perception probe
    probe_val_images: int = 300  # val images whose regions score it
    retrieval: bool = True  # the stage-1 retrieval suite on the aligned encoder with its stage-1 text tower
    limit: int = 0  # retrieval suite: the first N val images; 0: all
    token_budget: int = 16384  # patches (or text tokens) per evaluation batch


@dataclass
class Stage2Config:
    """Stage 2's configuration; parse it with `train.config.parse_args(argv, Stage2Config)`."""

    job: Stage2Job = field(default_factory=Stage2Job)
    encoder: Encoder = field(default_factory=Encoder)
    llm: LLM = field(default_factory=LLM)
    merger: Merger = field(default_factory=Merger)
    tasks: Tasks = field(default_factory=Tasks)
    freeze: Freeze = field(default_factory=Freeze)
    data: Stage2Data = field(default_factory=Stage2Data)
    optimizer: Stage2Optimizer = field(default_factory=Stage2Optimizer)
    lr_scheduler: Stage2LRScheduler = field(default_factory=Stage2LRScheduler)
    training: Stage2Training = field(default_factory=Stage2Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    eval: Stage2Eval = field(default_factory=Stage2Eval)
    debug: Debug = field(default_factory=Debug)

    OVERRIDES: typing.ClassVar[dict] = {("encoder", "vision"): FineViTConfig, ("llm", "config"): None}
    CHOICES: typing.ClassVar[dict] = {
        **CHOICES,
        ("encoder", "init"): ("stage1", "path", "scratch"),
        ("freeze", "mode"): ("projector", "llm", "none"),
    }

    def check(self) -> None:
        validate_common(self)
        if self.encoder.init == "path" and not self.encoder.path:
            raise ConfigError("encoder.path: required when encoder.init = 'path'")
        try:
            encoder_config(self)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"encoder: {exc}") from exc
        if self.tasks.turns < 1:
            raise ConfigError(f"tasks.turns must be >= 1, got {self.tasks.turns}")
        if self.tasks.max_length < 16:
            raise ConfigError(f"tasks.max_length must be >= 16, got {self.tasks.max_length}")
        weights = self.tasks.mix()
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ConfigError(f"tasks: weights must be >= 0 with a positive sum, got {weights}")
        if self.data.merge_size != 2:
            raise ConfigError(f"data.merge_size must be 2 (the merger's 2×2 groups), got {self.data.merge_size}")
        for key in ("regions", "max_new_tokens", "probe_train_images", "probe_val_images"):
            if getattr(self.eval, key) < 1:
                raise ConfigError(f"eval.{key} must be >= 1, got {getattr(self.eval, key)}")
        if not self.optimizer.encoder_lr_scale > 0:
            raise ConfigError(f"optimizer.encoder_lr_scale must be > 0, got {self.optimizer.encoder_lr_scale}")
        if self.llm.pretrain_steps < 0:
            raise ConfigError(f"llm.pretrain_steps must be >= 0, got {self.llm.pretrain_steps}")
        if self.merger.hidden < 0:
            raise ConfigError(f"merger.hidden must be >= 0, got {self.merger.hidden}")


def encoder_config(cfg: Stage2Config) -> FineViTConfig:
    """The encoder of `encoder.init = "scratch"`: the named preset, its fields replaced by encoder.vision."""
    return FineViTConfig.from_name(cfg.encoder.preset, **cfg.encoder.vision)
