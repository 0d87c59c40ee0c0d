"""Stage-1 trainer configuration: dataclass sections, TOML files, `--section.key=value` overrides.

    torchrun --nproc_per_node=2 train/stage1.py                                  # the embedded default
    torchrun ... train/stage1.py --config configs/stage1/b16.toml --optimizer.lr=5e-4 --training.steps 2000
    python train/stage1.py --help                                                # every field, with its doc

Precedence: command line > TOML file > the defaults below (which are the embedded default, identical to
configs/stage1/cpu.toml). Every section is a dataclass whose fields carry a one-line comment; `--help`
prints those comments. Unknown sections, unknown keys and values of the wrong type are errors that name the
key. The model is a named preset (`FineCLIPConfig.from_name`; the default "cpu" is sized for 2 CPU cores);
`[model.vision]` / `[model.text]` (or `--model.vision.width=96`) change single fields of that preset's
`FineViTConfig` / `TextConfig`, checked against those dataclasses: one layer over the preset, nothing else.
The resolved configuration is written to `<run_dir>/config.json` (readable again with `--config`).

This module also holds the machinery both stages share (parsing, coercion, TOML, overrides, validation);
stage 2's configuration is `train/stage2_config.py`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from finevit.eval.tasks import TASKS as EVAL_TASKS
from finevit.model import FineViTConfig, TextConfig


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


@dataclass
class Job:
    run_dir: str = "runs/stage1"  # checkpoints, metrics, eval results and exports; an existing run resumes
    seed: int = 0  # seeds model init, data order and the torch RNG
    deterministic: bool = False  # deterministic algorithms and exact (replayed) data resume; slower
    print_config: bool = False  # print the resolved configuration on rank 0 at start


@dataclass
class Model:
    preset: str = "cpu"  # FineCLIPConfig.from_name preset: cpu (the CPU default), tiny (tests), b16, l16, so400m14, g14
    loss: str = "siglip"  # "siglip" (sigmoid, learned bias) or "clip" (softmax)
    embed_dim: int = 0  # width of the shared image-text space; 0: the preset's
    init_logit_scale: float | None = None  # log of the initial logit scale; None: log 10 (siglip), log(1/0.07) (clip)
    init_logit_bias: float | None = None  # initial logit bias (siglip); None: -10
    vision: dict = field(default_factory=dict)  # FineViTConfig fields that replace the preset's (none by default)
    text: dict = field(default_factory=dict)  # TextConfig fields that replace the preset's (none by default)


@dataclass
class Data:
    root: str = "data/synth"  # a finevit.data.synth dataset: meta.json, shards, tokenizer/, classes.json
    generate: bool = True  # generate the synthetic dataset into `root` when it is missing (cached after)
    synth_train: int = 5000  # train samples when generating
    synth_val: int = 500  # val samples when generating
    train_shards: str = ""  # webdataset shard spec to train on; "": the root dataset's train split
    val_shards: str = ""  # shard spec to evaluate on; "": the root dataset's val split
    tokenizer: str = ""  # transformers tokenizer directory; "": <root>/tokenizer
    token_budget: int = 1152  # image patches per micro-batch per rank (the number of images varies)
    max_images: int = 256  # at most this many images per micro-batch per rank
    min_pixels: int = 32 * 32  # smallest resized image (H·W pixels)
    max_pixels: int = 96 * 96  # largest resized image; native resolution below it, aspect ratio kept
    square_side: int = 0  # 0: native resolution (min/max_pixels); N: every image squashed to N×N (aspect not kept)
    merge_size: int = 1  # resized sides are multiples of patch_size·merge_size (2 for stage 2's merger)
    short_caption_prob: float = 0.0  # fraction of samples trained on the short caption instead of the dense one
    num_workers: int = 1  # DataLoader worker processes per rank (0: load in the training process)
    shuffle_buffer: int = 500  # raw samples shuffled per worker
    pack_buffer: int = 256  # samples the best-fit packer chooses from
    resume: str = "auto"  # "position" (loader state), "replay" (exact: re-read, drop), "auto": replay if deterministic


@dataclass
class Optimizer:
    lr: float = 1e-3  # peak learning rate (AdamW)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay of matrices; none on norms, biases, logit scale/bias, probe


@dataclass
class LRScheduler:
    warmup_steps: int = 50  # linear warmup from lr/warmup_steps to lr
    decay: str = "cosine"  # after warmup: "cosine", "linear" or "constant"
    min_lr_ratio: float = 0.0  # the decay ends at lr · min_lr_ratio


@dataclass
class Training:
    steps: int = 400  # optimizer steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step (each micro-batch its own contrastive batch)
    max_norm: float = 1.0  # gradient clipping by total norm; 0: no clipping
    param_dtype: str = "auto"  # FSDP compute dtype: "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16"
    reduce_dtype: str = "float32"  # dtype of the gradient reduce-scatter
    threads: int = 0  # torch threads per process on CPU; 0: CPU cores / local processes
    attention_deterministic: bool = True  # attention backward: no atomics (true), or dQ added with atomics (faster)


@dataclass
class Parallelism:
    backend: str = "auto"  # process group backend: "auto" (nccl on GPU, gloo on CPU), "nccl", "gloo"
    reshard_after_forward: bool = True  # FSDP: free gathered block params after forward (ZeRO-3); False: ZeRO-2


@dataclass
class ActivationCheckpoint:
    mode: str = "none"  # "none" or "full" (recompute every transformer block in the backward)


@dataclass
class Compile:
    enable: bool = False  # torch.compile each transformer block (fullgraph)


@dataclass
class Checkpoint:
    enable: bool = True  # save DCP checkpoints and resume from the latest complete one
    interval: int = 200  # save every this many steps (and at the last step)
    keep_latest_k: int = 2  # complete checkpoints kept; 0: keep all
    async_mode: str = "disabled"  # "disabled" or "async" (dcp.async_save on a side gloo group)
    export: bool = True  # at the end, save_pretrained the FineCLIP and its FineViT (safetensors) under run_dir/export


@dataclass
class Metrics:
    log_freq: int = 20  # log (metrics.jsonl, TensorBoard, progress line) every this many steps
    tensorboard: bool = True  # also write TensorBoard event files when tensorboard is installed
    plot: bool = True  # PNG of the training curves at the end (matplotlib)


@dataclass
class Eval:
    interval: int = 0  # evaluate every this many steps; 0: only at the end
    at_end: bool = True  # evaluate the final model
    tasks: list[str] = field(default_factory=lambda: ["retrieval", "long_caption_retrieval", "hard_negatives",
                                                      "classification"])  # finevit.eval tasks
    limit: int = 0  # evaluate the first N val images; 0: all
    token_budget: int = 16384  # patches (or text tokens) per evaluation batch


@dataclass
class Debug:
    fault: str = ""  # testing: one fault per restart attempt, "step:N" / "save:N" = SIGKILL at / mid-save of step N
    fault_rank: int = -1  # rank that injects the fault; -1: the last rank


@dataclass
class Config:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    eval: Eval = field(default_factory=Eval)
    debug: Debug = field(default_factory=Debug)

    # Dict-valued fields that override another dataclass's fields: (section, key) -> that dataclass.
    OVERRIDES: typing.ClassVar[dict] = {("model", "vision"): FineViTConfig, ("model", "text"): TextConfig}

    def check(self) -> None:
        validate(self)


CHOICES = {
    ("model", "loss"): ("siglip", "clip"),
    ("data", "resume"): ("auto", "position", "replay"),
    ("lr_scheduler", "decay"): ("cosine", "linear", "constant"),
    ("training", "param_dtype"): ("auto", "float32", "bfloat16"),
    ("training", "reduce_dtype"): ("float32", "bfloat16"),
    ("parallelism", "backend"): ("auto", "nccl", "gloo"),
    ("activation_checkpoint", "mode"): ("none", "full"),
    ("checkpoint", "async_mode"): ("disabled", "async"),
}


# ----------------------------------------------------------------------------------------------------
# Parsing values
# ----------------------------------------------------------------------------------------------------


def _sections(config_class: type | None = None) -> dict[str, type]:
    config_class = config_class or Config
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)}


def _hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(key: str, hint, value):
    """Convert `value` (from TOML, JSON or a command-line string) to the field type `hint`; raise ConfigError."""
    from_cli = isinstance(value, str)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_cli and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, arg, value)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: cannot parse {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_cli and value.lower() in ("true", "1", "yes", "on"):
            return True
        if from_cli and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_cli:
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin in (tuple, list):
        items = [v.strip() for v in value.split(",") if v.strip()] if from_cli else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(items)} ({value!r})")
            return tuple(coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, items)))
        item_hint = args[0] if args else str
        converted = [coerce(f"{key}[{i}]", item_hint, v) for i, v in enumerate(items)]
        return tuple(converted) if origin is tuple else converted
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a table, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(hint)}")


def _set_override(cfg, section: str, name: str, sub: str, value, source: str) -> None:
    target = type(cfg).OVERRIDES[(section, name)]
    if target is None:  # a free-form table (e.g. a transformers config's fields): TOML values, or JSON on the CLI
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # a plain string
        getattr(getattr(cfg, section), name)[sub] = value
        return
    hints = _hints(target)
    if sub not in hints:
        raise ConfigError(f"unknown config key '{section}.{name}.{sub}' ({source}); fields of "
                          f"{target.__name__}: {', '.join(hints)}")
    getattr(getattr(cfg, section), name)[sub] = coerce(f"{section}.{name}.{sub}", hints[sub], value)


def _set(cfg, dotted: str, value, source: str) -> None:
    parts = dotted.split(".")
    sections = _sections(type(cfg))
    if parts[0] not in sections:
        raise ConfigError(f"unknown config section '{parts[0]}' in '{dotted}' ({source}); sections: "
                          f"{', '.join(sections)}")
    if len(parts) < 2:
        raise ConfigError(f"'{dotted}' ({source}) names a section, not a key; use --{parts[0]}.KEY=VALUE")
    section, name = parts[0], parts[1]
    hints = _hints(sections[section])
    if name not in hints:
        raise ConfigError(f"unknown config key '{section}.{name}' ({source}); keys of [{section}]: "
                          f"{', '.join(hints)}")
    if (section, name) in type(cfg).OVERRIDES:
        if len(parts) == 3:
            _set_override(cfg, section, name, parts[2], value, source)
            return
        if len(parts) == 2 and isinstance(value, dict):
            for sub, v in value.items():
                _set_override(cfg, section, name, sub, v, source)
            return
        raise ConfigError(f"'{dotted}' ({source}): set one field at a time, e.g. --{section}.{name}.width=192")
    if len(parts) != 2:
        raise ConfigError(f"unknown config key '{dotted}' ({source}): [{section}].{name} has no sub-keys")
    converted = coerce(f"{section}.{name}", hints[name], value)
    choices = getattr(type(cfg), "CHOICES", CHOICES).get((section, name))
    if choices and converted not in choices:
        raise ConfigError(f"{section}.{name}: must be one of {', '.join(choices)}, got {converted!r}")
    setattr(getattr(cfg, section), name, converted)


def _apply_document(cfg, document: dict, source: str) -> None:
    sections = _sections(type(cfg))
    for section, table in document.items():
        if section not in sections:
            raise ConfigError(f"unknown config section '{section}' ({source}); sections: {', '.join(sections)}")
        if not isinstance(table, dict):
            raise ConfigError(f"'{section}' ({source}) must be a table of keys")
        for key, value in table.items():
            _set(cfg, f"{section}.{key}", value, source)


def load_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {path} not found")
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with path.open("rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from exc


def _split_cli(argv: list[str]) -> tuple[str | None, list[tuple[str, str]], bool]:
    """argv -> (config path, [(dotted key, value string)], help requested)."""
    config_path, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            return config_path, pairs, True
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.key=value")
        body = arg[2:]
        key, has_value, value = body.partition("=")
        if not has_value:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--"):
                value, i = nxt, i + 1
            else:
                value = "true"  # a bare flag: --checkpoint.enable
        key = key.replace("-", "_")
        if key == "config":
            config_path = value
        else:
            pairs.append((key, value))
        i += 1
    return config_path, pairs, False


def parse_args(argv: list[str] | None = None, config_class: type | None = None):
    """Defaults <- --config FILE <- --section.key=value; prints help and exits on --help.

    config_class: the configuration dataclass (default: stage 1's `Config`); its `check()` validates it."""
    config_class = config_class or Config
    argv = sys.argv[1:] if argv is None else argv
    config_path, pairs, want_help = _split_cli(argv)
    if want_help:
        print(help_text(config_class))
        raise SystemExit(0)
    cfg = config_class()
    if config_path:
        _apply_document(cfg, load_file(config_path), str(config_path))
    for key, value in pairs:
        _set(cfg, key, value, f"--{key}")
    cfg.check()
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks; each message names the key."""
    validate_common(cfg)
    if cfg.model.embed_dim < 0:
        raise ConfigError(f"model.embed_dim must be >= 0, got {cfg.model.embed_dim}")
    if cfg.model.init_logit_bias is not None and cfg.model.loss != "siglip":
        raise ConfigError("model.init_logit_bias applies to model.loss = 'siglip' only")
    unknown = sorted(set(cfg.eval.tasks) - set(EVAL_TASKS))
    if unknown:
        raise ConfigError(f"eval.tasks: unknown task(s) {unknown}; tasks: {', '.join(EVAL_TASKS)}")
    try:
        build_model_config(cfg)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from exc


def validate_common(cfg) -> None:
    """The checks of the sections both stages share (training, data, optimizer, schedule, checkpoints, ...)."""
    positive = {"training.steps": cfg.training.steps, "training.grad_accum_steps": cfg.training.grad_accum_steps,
                "data.token_budget": cfg.data.token_budget, "data.max_images": cfg.data.max_images,
                "data.pack_buffer": cfg.data.pack_buffer, "metrics.log_freq": cfg.metrics.log_freq,
                "checkpoint.interval": cfg.checkpoint.interval, "eval.token_budget": cfg.eval.token_budget}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    nonnegative = {"lr_scheduler.warmup_steps": cfg.lr_scheduler.warmup_steps, "data.num_workers": cfg.data.num_workers,
                   "checkpoint.keep_latest_k": cfg.checkpoint.keep_latest_k, "eval.interval": cfg.eval.interval,
                   "eval.limit": cfg.eval.limit, "training.threads": cfg.training.threads,
                   "optimizer.weight_decay": cfg.optimizer.weight_decay, "training.max_norm": cfg.training.max_norm}
    for key, value in nonnegative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if not cfg.optimizer.lr > 0:
        raise ConfigError(f"optimizer.lr must be > 0, got {cfg.optimizer.lr}")
    if not 0.0 <= cfg.data.short_caption_prob <= 1.0:
        raise ConfigError(f"data.short_caption_prob must be in [0, 1], got {cfg.data.short_caption_prob}")
    if not 0.0 <= cfg.lr_scheduler.min_lr_ratio <= 1.0:
        raise ConfigError(f"lr_scheduler.min_lr_ratio must be in [0, 1], got {cfg.lr_scheduler.min_lr_ratio}")
    for fault in filter(None, (f.strip() for f in cfg.debug.fault.split(","))):
        kind, _, step = fault.partition(":")
        if kind not in ("step", "save") or not step.isdigit():
            raise ConfigError(f"debug.fault: each fault is 'step:N' or 'save:N', got {fault!r}")


def build_model_config(cfg: Config):
    """The FineCLIPConfig of `cfg.model`: the named preset, its towers' fields replaced by model.vision / model.text."""
    from finevit.model import FineCLIPConfig

    base = FineCLIPConfig.from_name(cfg.model.preset)
    vision = dataclasses.replace(base.vision, **cfg.model.vision)
    text = dataclasses.replace(base.text, **cfg.model.text)
    embed_dim = cfg.model.embed_dim or vision.width
    return FineCLIPConfig(vision=vision, text=text, embed_dim=embed_dim, loss=cfg.model.loss,
                          init_logit_scale=cfg.model.init_logit_scale, init_logit_bias=cfg.model.init_logit_bias)


# ----------------------------------------------------------------------------------------------------
# Saving and documenting
# ----------------------------------------------------------------------------------------------------


def save(cfg, path: str | Path) -> Path:
    """Write the resolved configuration as JSON (loadable with --config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    tmp.replace(path)
    return path


def field_docs(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in the class source (and its dataclass bases'): its documentation."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        for node in ast.parse(source).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                line = lines[node.end_lineno - 1]
                if "#" in line:
                    docs[node.target.id] = line.split("#", 1)[1].strip()
    return docs


def help_text(config_class: type | None = None) -> str:
    config_class = config_class or Config
    defaults = config_class()
    doc = sys.modules[config_class.__module__].__doc__  # each stage's configuration module documents it
    out = [(doc or "").strip(), "", "Options (--section.key=value):"]
    for section, cls in _sections(config_class).items():
        out.append(f"\n  [{section}]")
        docs = field_docs(cls)
        for name in _hints(cls):
            value = getattr(getattr(defaults, section), name)
            out.append(f"    --{section}.{name}={json.dumps(value)}")
            if docs.get(name):
                out.append(f"        {docs[name]}")
    return "\n".join(out)

