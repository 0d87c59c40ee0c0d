"""Stage 2: align FineViT with a causal LLM from `transformers` on local (region) captions, FSDP2.

    torchrun --nproc_per_node=2 train/stage2.py                                     # the embedded default
    torchrun --nproc_per_node=8 train/stage2.py --config configs/stage2/so400m14_qwen2_5_0_5b.toml \\
        --llm.path=/models/Qwen2.5-0.5B --encoder.init=path --encoder.path=runs/stage1/export/vision
    python train/stage2.py --help

Reads top to bottom: config -> process group -> the stage-1 encoder (with `encoder.init = "stage1"`, rank 0
first trains the stage-1 default with torchrun when its export is missing) -> tokenizer (special tokens
added) -> data (packed images with their regions; one LLM sequence per image, `finevit.data.conversations`)
-> model (FineViT -> PatchMerger -> LLM, `finevit.model.vlm`), the initial encoder's local-perception probe
and retrieval on rank 0 -> freeze -> parallelize (activation checkpointing -> compile -> fully_shard per
encoder block and LLM layer -> root) -> optimizer and schedule -> checkpoint manager (load the latest) ->
training loop (periodic evaluation, checkpoints) -> final evaluation, export, summary table, curves.

Freeze schedules (`freeze.mode`): "projector" trains the merger only; "llm" (the default, FineViT's focus)
trains the encoder and the merger with the LLM frozen: the backward still crosses the LLM to reach the image
tokens, but computes no LLM weight gradients; "none" trains everything. The encoder's MAP head (stage 1's
pooling) is not used here and stays frozen, so the export still pools exactly as stage 1 taught it.

Loss. Cross-entropy on answer tokens only. A step of A micro-batches on W ranks optimizes the mean over all
N supervised tokens of the step, J = Σ_{r,a} S_{r,a} / N (S: the summed token losses of rank r's
micro-batch a): rank r backpropagates W · S_{r,a} / N and FSDP's mean reduce-scatter leaves ∇J on every
shard. N comes from one all-reduce of the token counts per step. The loss of each task (region captioning,
grounding, dense caption) is logged separately.

Evaluation (rank 0, the others wait): region-captioning attribute accuracy and grounding accuracy
(IoU >= 0.5) by greedy decoding on val regions; the local-perception probe (linear probes on box-pooled
patch features predicting each region's attributes) of the encoder before and after stage 2; and the
stage-1 retrieval suite with the stage-1 text tower, before (the stage-1 FineCLIP) and after (its vision
tower replaced by the aligned encoder). Results are JSON under run_dir/eval and in the summary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `torchrun train/stage2.py` puts train/ first on sys.path, not the repo
    sys.path.insert(0, str(REPO))

from finevit.data import ImageConfig, LoaderConfig, PackedLoader, TextTokenizer  # noqa: E402
from finevit.data.conversations import TASKS, SequenceBuilder, build_batch, prepare_tokenizer  # noqa: E402
from finevit.data.text import save_tokenizer  # noqa: E402
from finevit.model import FineCLIP, FineViT, set_attention_deterministic  # noqa: E402
from finevit.model.pretrained import CONFIG_NAME  # noqa: E402
from finevit.model.vlm import (  # noqa: E402
    IGNORE_INDEX,
    VisionLanguageModel,
    build_llm,
    forward_plan,
    load_llm,
    merged_token_counts,
)
from train.checkpoint import ModelState, OptimizerState  # noqa: E402
from train.common import (  # noqa: E402
    DataStream,
    TrainerBase,
    build_optimizer,
    clip_grad_norm_,
    data_paths,
    ensure_dataset,
    lr_factor,
    run,
)
from train.metrics import (  # noqa: E402
    GPUMonitor,
    Meter,
    MetricsWriter,
    format_seconds,
    peak_flops,
    sequence_lengths,
    vlm_training_flops,
)
from train.parallelize import parallelize_vlm  # noqa: E402
from train.stage2_config import Stage2Config, encoder_config  # noqa: E402

STAGE1 = REPO / "train" / "stage1.py"


# ----------------------------------------------------------------------------------------------------
# The encoder to start from
# ----------------------------------------------------------------------------------------------------


def model_type(directory: Path) -> str | None:
    path = directory / CONFIG_NAME
    return json.loads(path.read_text()).get("model_type") if path.is_file() else None


def stage1_export(cfg: Stage2Config) -> Path:
    return Path(cfg.encoder.stage1_run) / "export"


def train_stage1_if_missing(cfg: Stage2Config, rank: int, local_world: int) -> None:
    """encoder.init = "stage1": rank 0 trains the stage-1 default (torchrun, this node's process count) into
    encoder.stage1_run when its export is missing; the other ranks wait at the barrier."""
    export = stage1_export(cfg)
    if rank == 0 and model_type(export / "vision") != "FineViT":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={local_world}",
                   str(STAGE1), f"--job.run_dir={cfg.encoder.stage1_run}", f"--data.root={cfg.data.root}",
                   *cfg.encoder.stage1_args]
        print(f"[stage2] no stage-1 export in {export}: training the stage-1 default first\n  {' '.join(command)}",
              flush=True)
        launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
        env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("TORCHELASTIC_")}
        subprocess.run(command, check=True, env=env)
    dist.barrier()
    if model_type(export / "vision") != "FineViT":
        raise FileNotFoundError(f"encoder.init=stage1: no FineViT export in {export / 'vision'}")


def load_encoder(cfg: Stage2Config, seed: int) -> tuple[FineViT, Path | None]:
    """(the encoder to align, the FineCLIP directory whose text tower the retrieval suite uses, if any)."""
    e = cfg.encoder
    if e.init == "scratch":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vision = FineViT(encoder_config(cfg))
            vision.init_weights()
        return vision, None
    source = stage1_export(cfg) / "vision" if e.init == "stage1" else Path(e.path)
    kind = model_type(source)
    if kind == "FineViT":
        clip_dir = source.parent / "fineclip" if e.init == "stage1" else None
        return FineViT.from_pretrained(source), clip_dir if clip_dir and model_type(clip_dir) == "FineCLIP" else None
    if kind == "FineCLIP":
        return FineCLIP.from_pretrained(source).vision, source
    raise FileNotFoundError(f"encoder: {source} holds no FineViT or FineCLIP save_pretrained directory "
                            f"(config.json model_type: {kind!r})")


# ----------------------------------------------------------------------------------------------------
# Forward and backward over a step's micro-batches
# ----------------------------------------------------------------------------------------------------


def supervised_tasks(sequences: dict) -> torch.Tensor:
    """The task index of every supervised position, in VisionLanguageModel.forward's order (ForwardPlan)."""
    return sequences["label_task"][:, 1:][sequences["labels"][:, 1:] != IGNORE_INDEX]


def forward_backward(model, batches: list[dict], group) -> dict:
    """Accumulate ∇J, J = the mean loss over every supervised token of the step, all ranks (module doc)."""
    world_size = dist.get_world_size(group)
    device = batches[0]["input_ids"].device
    # Supervised tokens of each micro-batch, summed over the ranks on the device: no value is read back to
    # the host, so the step's work is queued without waiting for the device.
    counts = torch.stack([(b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in batches]).double()
    dist.all_reduce(counts, group=group)
    total = counts.sum()
    task_loss = torch.zeros(len(TASKS), dtype=torch.float64, device=device)
    task_tokens = torch.zeros(len(TASKS), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        model.set_requires_gradient_sync(i == len(batches) - 1)  # one reduce-scatter per step
        losses = model(batch["image"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                       plan=batch["plan"])
        (losses.sum() * (world_size / total).float()).backward()
        tasks = batch["tasks"]
        task_loss.index_add_(0, tasks, losses.detach().double())
        task_tokens.index_add_(0, tasks, torch.ones_like(tasks, dtype=torch.float64))
    return {"task_loss": task_loss, "task_tokens": task_tokens, "total_tokens": total}


def set_trainable(model: VisionLanguageModel, mode: str) -> None:
    """The freeze schedule (module doc); the encoder's pooling head is never trained here."""
    model.requires_grad_(False)
    model.merger.requires_grad_(True)
    if mode in ("llm", "none"):
        model.vision.requires_grad_(True)
        model.vision.head.requires_grad_(False)
    if mode == "none":
        model.llm.requires_grad_(True)


# ----------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------


class Trainer(TrainerBase):
    name = "stage2"

    def __init__(self, cfg: Stage2Config):
        self.setup(cfg)

        # The encoder, the tokenizer, the data.
        if cfg.encoder.init == "stage1":
            train_stage1_if_missing(cfg, self.rank, self.local_world)
        meta = ensure_dataset(cfg, self.rank, self.name)
        self.train_shards, self.val_shards, dataset_tokenizer, self.classes = data_paths(cfg, meta)
        vision, self.clip_dir = load_encoder(cfg, cfg.job.seed)
        from transformers import AutoTokenizer

        if cfg.llm.path and not (Path(cfg.llm.path) / "config.json").is_file():
            raise FileNotFoundError(f"llm.path={cfg.llm.path!r} is not a transformers checkpoint directory (no "
                                    f"config.json); download one first, e.g. huggingface-cli download "
                                    f"Qwen/Qwen2.5-0.5B --local-dir {cfg.llm.path}")
        tokenizer_dir = cfg.llm.tokenizer or str(dataset_tokenizer)
        self.llm_dir = cfg.llm.path or (self.pretrain_llm(tokenizer_dir) if cfg.llm.pretrain_steps else "")
        # The tiny LLM's tokenizer is the dataset's (loading it from the LLM's directory would let its config.json
        # pick transformers' Qwen2 tokenizer class, which adds an unk token and so changes the vocabulary).
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.llm.path or tokenizer_dir)
        self.tokenizer = prepare_tokenizer(self.tokenizer)
        self.builder = SequenceBuilder(self.tokenizer, cfg.tasks.max_length)
        d = cfg.data
        self.image_config = ImageConfig.for_model(vision.config, min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                                                  merge_size=d.merge_size, square_side=d.square_side)
        if self.is_main:
            self.image_config.save(self.run_dir)
            save_tokenizer(self.tokenizer, self.run_dir / "tokenizer")
        loader_config = LoaderConfig(self.train_shards, token_budget=d.token_budget, max_images=d.max_images,
                                     pack_buffer=d.pack_buffer, shuffle_buffer=d.shuffle_buffer, resampled=True,
                                     seed=cfg.job.seed, num_workers=d.num_workers, with_regions=True,
                                     short_caption_prob=d.short_caption_prob)
        text = TextTokenizer(self.tokenizer, context_length=cfg.tasks.max_length, add_bos=False)
        loader = PackedLoader(loader_config, self.image_config, text, self.rank, self.world_size)
        resume = d.resume if d.resume != "auto" else ("replay" if cfg.job.deterministic else "position")
        self.data = DataStream(loader, resume)

        # The model, full on every rank (the same weights: loaded, or initialized with the same seed).
        model = self.build_model(vision)
        self.initial = self.evaluate_initial(model)
        set_trainable(model, cfg.freeze.mode)
        self.num_params = sum(p.numel() for p in model.parameters())
        self.num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.merger_params = sum(p.numel() for p in model.merger.parameters())
        self.llm_config = model.llm.config
        set_attention_deterministic(model, cfg.training.attention_deterministic)  # the encoder's (the LLM's are HF's)
        self.model = parallelize_vlm(model, self.mesh, activation_checkpoint=cfg.activation_checkpoint.mode,
                                     compile=cfg.compile.enable, param_dtype=cfg.training.param_dtype,
                                     reduce_dtype=cfg.training.reduce_dtype,
                                     reshard_after_forward=cfg.parallelism.reshard_after_forward)
        self.model.to(self.device)

        # Optimizer and schedule, checkpoints.
        encoder_scale = cfg.optimizer.encoder_lr_scale
        self.optimizer = build_optimizer(self.model, cfg,
                                         lambda name: encoder_scale if name.startswith("vision.") else 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.setup_checkpoints({"model": ModelState(self.model),
                                "optimizer": OptimizerState(self.model, self.optimizer)})

        # Metrics.
        self.peak_flops, self.peak_note = peak_flops(self.device)
        self.gpu = GPUMonitor(self.device)
        self.writer = MetricsWriter(self.run_dir, self.is_main, cfg.metrics.tensorboard)
        self.meter = Meter()
        self.llm_tokens = 0
        self.last_loss = float("nan")
        self.last_task_loss: dict[str, float] = {}
        if self.is_main:
            llm = cfg.llm.path or f"tiny {cfg.llm.architecture} from a config" + (
                f", text-pretrained in {self.llm_dir}" if self.llm_dir else ", random")
            print(f"[stage2] {self.world_size} process(es) on {self.device.type} ({dist.get_backend()}), "
                  f"{torch.get_num_threads()} thread(s) each | FineViT {vision.config.width}w×{vision.config.depth} "
                  f"+ merger + LLM ({llm}, {self.llm_config.hidden_size}w×{self.llm_config.num_hidden_layers}) "
                  f"{self.num_params / 1e6:.2f}M params, {self.num_trainable / 1e6:.2f}M trained "
                  f"(freeze.mode={cfg.freeze.mode}) | run dir {self.run_dir} | "
                  + (f"resumed from step {self.resumed_from}" if self.resumed_from else "from scratch")
                  + f" | peak: {self.peak_note}", flush=True)

    def pretrain_llm(self, tokenizer_dir: str) -> str:
        """llm.path = "": the tiny LLM, text-pretrained once by rank 0 into llm.pretrain_dir (train/llm_pretrain.py)."""
        cfg = self.cfg
        if self.is_main:
            from train.llm_pretrain import pretrain

            threads = self._eval_threads()
            try:
                pretrain(Path(cfg.llm.pretrain_dir), Path(tokenizer_dir), self.train_shards,
                         architecture=cfg.llm.architecture, overrides=cfg.llm.config, mix=cfg.tasks.mix(),
                         turns=cfg.tasks.turns, max_length=cfg.tasks.max_length, steps=cfg.llm.pretrain_steps,
                         seed=cfg.job.seed, device=str(self.device))
            finally:
                torch.set_num_threads(threads)
        dist.barrier()
        return cfg.llm.pretrain_dir

    def build_model(self, vision: FineViT) -> VisionLanguageModel:
        cfg = self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.job.seed + 1)
            if self.llm_dir:
                llm = load_llm(self.llm_dir, len(self.tokenizer))
            else:
                llm = build_llm(len(self.tokenizer), cfg.llm.architecture, cfg.llm.config,
                                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
            model = VisionLanguageModel(vision, llm, self.builder.image_token_id, cfg.data.merge_size,
                                        cfg.merger.hidden)
            model.merger.init_weights()
        return model

    # -- one step -----------------------------------------------------------------------------------

    def next_micro_batches(self) -> list[dict]:
        """The step's micro-batches of this rank with their LLM sequences, on the device; waiting and
        building count as data time. Turns are drawn with a generator seeded by (seed, rank, step, micro)."""
        started = time.perf_counter()
        batches = []
        for micro in range(self.cfg.training.grad_accum_steps):
            batch = self.data.next()
            rng = np.random.default_rng([self.cfg.job.seed, self.rank, self.step, micro])
            counts = merged_token_counts(batch["image"]["grid_hw"], self.cfg.data.merge_size).tolist()
            sequences = build_batch(self.builder, counts, batch["captions"], batch["regions"], self.cfg.tasks.mix(),
                                    self.cfg.tasks.turns, rng)
            # Everything the forward needs to know about values, from the host copies (ForwardPlan), so that
            # the step is queued without reading anything back from the device.
            plan = forward_plan(batch["image"], sequences["input_ids"], sequences["attention_mask"],
                                sequences["labels"], self.builder.image_token_id, self.cfg.data.merge_size)
            image = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in batch["image"].items()}
            # What the meter counts, from the host copies (never read back from the device).
            meter = {"image_lengths": sequence_lengths(batch["image"]["cu_seqlens"]),
                     "llm_lengths": sequences["attention_mask"].sum(1),
                     "supervised": int((sequences["labels"][:, 1:] != IGNORE_INDEX).sum())}
            batches.append({"image": image, "meter": meter, "plan": plan.to(self.device, non_blocking=True),
                            "tasks": supervised_tasks(sequences).to(self.device, non_blocking=True),
                            **{k: v.to(self.device, non_blocking=True) for k, v in sequences.items()}})
        self.meter.data_seconds += time.perf_counter() - started
        return batches

    def train_step(self) -> dict:
        batches = self.next_micro_batches()
        self.optimizer.zero_grad(set_to_none=True)
        out = forward_backward(self.model, batches, self.group)
        for batch in batches:
            image_lengths, llm_lengths = batch["meter"]["image_lengths"], batch["meter"]["llm_lengths"]
            supervised = batch["meter"]["supervised"]
            self.meter.images += len(image_lengths)
            self.meter.patches += int(image_lengths.sum())
            self.meter.text_tokens += int(llm_lengths.sum())
            self.meter.flops += vlm_training_flops(self.model.vision.config, self.llm_config, self.merger_params,
                                                   image_lengths, llm_lengths, supervised, self.cfg.freeze.mode)
        out["grad_norm"] = clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           self.cfg.training.max_norm)
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.meter.steps += 1
        return out

    # -- logging ------------------------------------------------------------------------------------

    def log(self, out: dict) -> None:
        sums = torch.cat([out["task_loss"], out["task_tokens"]])
        dist.all_reduce(sums, group=self.group)
        task_loss, task_tokens = sums[:len(TASKS)], sums[len(TASKS):]
        loss = float(task_loss.sum() / task_tokens.sum())
        self.last_loss = loss
        self.last_task_loss = {t: float(task_loss[i] / task_tokens[i]) for i, t in enumerate(TASKS) if task_tokens[i]}
        counts = self.meter.as_tensor(self.device)
        dist.all_reduce(counts, group=self.group)
        images, patches, llm_tokens, flops, data_seconds = counts.tolist()
        skipped = self.skipped_samples()
        elapsed = time.perf_counter() - self.meter.started
        record = {"kind": "train", "step": self.step, "loss": loss, "lr": out["lr"],
                  **{f"loss/{t}": v for t, v in self.last_task_loss.items()},
                  "grad_norm": float(out["grad_norm"]), "images_per_s": images / elapsed,
                  "patch_tokens_per_s": patches / elapsed, "llm_tokens_per_s": llm_tokens / elapsed,
                  **self.utilization(elapsed, flops, data_seconds), "skipped": skipped}
        self.publish(record, elapsed)

    # -- evaluation and export ----------------------------------------------------------------------

    def evaluate_initial(self, model: VisionLanguageModel) -> dict:
        """The encoder's probe and retrieval before stage 2 (rank 0; cached in run_dir/eval/initial.json, so a
        resumed run reports the numbers of the encoder it started from)."""
        path = self.run_dir / "eval" / "initial.json"
        result = {}
        if self.is_main and self.cfg.eval.at_end:
            if path.is_file():
                result = json.loads(path.read_text())
            else:
                started = time.perf_counter()
                threads = self._eval_threads()
                try:
                    result = {"probe": self.probe(model.vision.to(self.device))}
                    if self.cfg.eval.retrieval and self.clip_dir is not None:
                        result["retrieval"] = self.retrieval(FineCLIP.from_pretrained(self.clip_dir).to(self.device))
                finally:
                    torch.set_num_threads(threads)
                model.vision.cpu()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result, indent=2) + "\n")
                self.eval_seconds += time.perf_counter() - started
                print(f"[stage2] initial encoder: local-perception probe mean accuracy "
                      f"{100 * result['probe']['mean_accuracy']:.1f}% "
                      f"({format_seconds(time.perf_counter() - started)})",
                      flush=True)
        dist.barrier()
        return result

    def probe(self, vision: FineViT) -> dict:
        from finevit.eval.regions import local_perception_probe

        e = self.cfg.eval
        return local_perception_probe(vision, self.train_shards, self.val_shards, self.image_config, self.device,
                                      e.probe_train_images, e.probe_val_images)

    def retrieval(self, clip: FineCLIP) -> dict:
        """The stage-1 suite (retrieval, long captions, hard negatives, classification) on a FineCLIP."""
        from finevit.eval import tasks as T
        from finevit.eval.encode import embed_images

        clip = clip.eval()
        tokenizer_dir = self.clip_dir / "tokenizer"
        tokenizer = TextTokenizer.from_pretrained(tokenizer_dir, clip.config.text.context_length)
        image_config = ImageConfig.load(self.clip_dir) if (self.clip_dir / "preprocess.json").is_file() \
            else self.image_config
        e = self.cfg.eval
        budget = max(e.token_budget, image_config.max_patches)
        with torch.no_grad():
            images = embed_images(clip, self.val_shards, image_config, budget, self.device, None, e.limit or None,
                                  progress=False)
            results = T.run_suite(clip, tokenizer, images, "val", T.TASKS, self.classes,
                                  token_budget=e.token_budget, device=self.device)
        record = {"num_images": len(images.keys)}
        for result in results:
            for key, value in result.metrics.items():
                if "rank" not in key:
                    record[f"{result.dataset}/{result.task}/{key}"] = value
        return record

    def full_model(self) -> VisionLanguageModel | None:
        """An unsharded float32 copy on rank 0 (None elsewhere); a collective: every rank calls."""
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        # Built on the CPU, not on meta: the LLM's non-persistent buffers (rotary frequencies) are not in the
        # state dict and must come from its constructor.
        with torch.device("meta"):
            vision = FineViT(self.model.vision.config)
        llm = type(self.model.llm)(self.llm_config)
        model = VisionLanguageModel(vision, llm, self.builder.image_token_id, self.cfg.data.merge_size,
                                    self.cfg.merger.hidden)
        model.load_state_dict(state, strict=True, assign=True)
        if getattr(self.llm_config, "tie_word_embeddings", False):
            model.llm.tie_weights()
        return model.to(self.device).eval()

    @torch.no_grad()
    def _evaluate_on_rank0(self, model: VisionLanguageModel) -> dict:
        from finevit.eval.regions import region_tasks

        e = self.cfg.eval
        record = {"kind": "eval", "step": self.step}
        tasks = region_tasks(model, self.builder, self.val_shards, self.image_config, self.device,
                             limit=e.regions, max_new_tokens=e.max_new_tokens)
        record.update({f"regions/{k}": v for k, v in tasks.items()})
        probe = self.probe(model.vision)
        record.update({f"probe/{k}": v for k, v in probe.items()})
        if e.retrieval and self.clip_dir is not None:
            clip = FineCLIP.from_pretrained(self.clip_dir)
            clip.vision.load_state_dict(model.vision.state_dict())
            record.update({f"retrieval/{k}": v for k, v in self.retrieval(clip.to(self.device)).items()})
        out_dir = self.run_dir / "eval"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"step-{self.step}.json").write_text(json.dumps(record, indent=2) + "\n")
        self.writer.write(record)
        print(f"[stage2] eval at step {self.step}: region captioning (all 4 attributes) "
              f"{100 * tasks['caption/all_attributes_accuracy']:.1f}%, grounding@0.5 "
              f"{100 * tasks['grounding/accuracy_iou50']:.1f}%, probe mean accuracy "
              f"{100 * probe['mean_accuracy']:.1f}%", flush=True)
        return record

    def export(self) -> Path | None:
        """run_dir/export: vision/ (the aligned FineViT), fineclip/ (the stage-1 FineCLIP with it, when there is
        one), vlm/ (llm/: the LLM's save_pretrained, tokenizer/, merger.safetensors, vlm.json)."""
        model = self.full_model()
        path = None
        if self.is_main:
            path = self.run_dir / "export"
            model = model.cpu()
            model.vision.save_pretrained(path / "vision")
            self.image_config.save(path / "vision")
            if self.clip_dir is not None:
                clip = FineCLIP.from_pretrained(self.clip_dir)
                clip.vision.load_state_dict(model.vision.state_dict())
                clip.save_pretrained(path / "fineclip")
                for name in ("preprocess.json",):
                    if (self.clip_dir / name).is_file():
                        shutil.copy(self.clip_dir / name, path / "fineclip" / name)
                if (self.clip_dir / "tokenizer").is_dir():
                    shutil.copytree(self.clip_dir / "tokenizer", path / "fineclip" / "tokenizer", dirs_exist_ok=True)
            vlm = path / "vlm"
            model.llm.save_pretrained(vlm / "llm")
            self.tokenizer.save_pretrained(vlm / "tokenizer")
            state = {k: v.contiguous() for k, v in model.merger.state_dict().items()}
            save_file(state, str(vlm / "merger.safetensors"))
            (vlm / "vlm.json").write_text(json.dumps({"image_token_id": self.builder.image_token_id,
                                                      "merge_size": model.merge_size,
                                                      "merger_hidden": self.cfg.merger.hidden}, indent=2) + "\n")
        dist.barrier()
        return path

    def summary(self, final: dict, exported: Path | None) -> str:
        wall = time.perf_counter() - self.started
        tasks = ", ".join(f"{t} {v:.3f}" for t, v in self.last_task_loss.items())
        lines = [*self.summary_head("FineViT stage 2"),
                 f"processes    {self.world_size} × {self.device.type} ({dist.get_backend()}), "
                 f"{self.num_params / 1e6:.2f}M parameters, {self.num_trainable / 1e6:.2f}M trained "
                 f"(freeze.mode={self.cfg.freeze.mode})",
                 f"wall time    {format_seconds(wall)} (training {format_seconds(self.train_seconds)}, "
                 f"evaluation {format_seconds(self.eval_seconds)})",
                 f"final loss   {self.last_loss:.4f} ({tasks})"]
        if final:
            lines += ["", *evaluation_table(final, self.initial)]
        if exported:
            lines += ["", f"export       {exported}/vision (FineViT), "
                          + (f"{exported}/fineclip (FineCLIP with the aligned encoder), " if self.clip_dir else "")
                          + f"{exported}/vlm (LLM, tokenizer, merger)"]
        lines += [f"metrics      {self.writer.path}" + (f", {self.run_dir / 'training_curves.png'}"
                                                         if self.cfg.metrics.plot else ""), "=" * 78]
        return "\n".join(lines)


def evaluation_table(final: dict, initial: dict) -> list[str]:
    """The summary's evaluation rows: region tasks after stage 2; probe and retrieval before -> after."""
    pct = lambda v: f"{100 * v:5.1f}%"  # noqa: E731
    n = int(final.get("regions/regions", 0))
    rows = [f"region tasks on {n} val regions (greedy decoding)",
            "  region captioning, attribute accuracy: "
            + ", ".join(f"{a} {pct(final[f'regions/caption/{a}_accuracy']).strip()}"
                        for a in ("size", "pattern", "color", "shape") if f"regions/caption/{a}_accuracy" in final)
            + f"; all four {pct(final['regions/caption/all_attributes_accuracy']).strip()}",
            f"  grounding: accuracy at IoU >= 0.5 {pct(final['regions/grounding/accuracy_iou50']).strip()}, "
            f"mean IoU {final['regions/grounding/mean_iou']:.3f}"]
    before = initial.get("probe", {})
    title = "local-perception probe (linear, box-pooled patches)"
    rows += ["", f"{title:<52}{'before':>8}{'after':>8}{'majority':>10}"]
    for key in sorted(k for k in final if k.startswith("probe/") and k.endswith("/accuracy")):
        name = key[len("probe/"):-len("/accuracy")]
        b = before.get(f"{name}/accuracy")
        rows.append(f"  {name:<50}{pct(b) if b is not None else '':>8}{pct(final[key]):>8}"
                    f"{pct(final[f'probe/{name}/majority']):>10}")
    if "probe/mean_accuracy" in final:
        b = before.get("mean_accuracy")
        rows.append(f"  {'mean':<50}{pct(b) if b is not None else '':>8}{pct(final['probe/mean_accuracy']):>8}")
    after = {k[len("retrieval/"):]: v for k, v in final.items() if k.startswith("retrieval/")}
    if after:
        before = initial.get("retrieval", {})
        rows += ["", f"{'stage-1 suite with the stage-1 text tower':<52}{'before':>8}{'after':>8}"]
        for key in sorted(after):
            if key.endswith(("image_retrieval_recall@1", "text_retrieval_recall@1", "/accuracy", "/acc1",
                             "pairwise_accuracy")):
                b = before.get(key)
                rows.append(f"  {key:<50}{pct(b) if b is not None else '':>8}{pct(after[key]):>8}")
    return rows


def main(argv: list[str] | None = None) -> int:
    return run(Trainer, Stage2Config, argv)


if __name__ == "__main__":
    sys.exit(main())
