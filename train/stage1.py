"""Stage 1: image-text pretraining of FineCLIP (FineViT + text tower) at native resolution, FSDP2.

    torchrun --nproc_per_node=2 train/stage1.py                           # the embedded default (CPU: ~7 min)
    torchrun --nproc_per_node=8 train/stage1.py --config configs/stage1/b16.toml --data.train_shards=...
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train/stage1.py ...
    python train/stage1.py --help

Reads top to bottom: config -> process group and mesh -> data -> model on meta -> parallelize (activation
checkpointing -> per-block compile -> fully_shard per block -> root) -> to_empty + init -> optimizer and
schedule -> checkpoint manager (load the latest) -> training loop (periodic evaluation, checkpoints) ->
final evaluation, export (save_pretrained), summary table, curves.

Batches. Each rank packs its own micro-batches under `data.token_budget` patches, so the number of images
differs between ranks and steps. The contrastive loss runs over the global batch of a micro-batch (every
rank's images against every rank's texts, `group=`): the loss kernels return rank r's mean over its own
n_r rows, and their backward sends every rank's contribution to the owner of each feature. A step of A
micro-batches on W ranks optimizes the mean per-image loss over all N = Σ n_{r,a} images of the step:

    J = Σ_{r,a} n_{r,a} · L_{r,a} / N          (L_{r,a}: the kernel's loss of rank r, micro-batch a)

so rank r backpropagates n_{r,a} · W / N · L_{r,a} and FSDP's reduce-scatter, which averages over the W
ranks, leaves ∇J on every shard. N comes from one all-reduce of the image counts per step (all micro-batches
of a step are fetched first). tests/train/test_fsdp_step.py checks this against one process on the whole batch.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `torchrun train/stage1.py` puts train/ first on sys.path, not the repo
    sys.path.insert(0, str(REPO))

import finevit.kernels as K  # noqa: E402
from finevit.data import ImageConfig, LoaderConfig, PackedLoader, TextTokenizer  # noqa: E402
from finevit.data.text import save_tokenizer  # noqa: E402
from finevit.model import FineCLIP, set_attention_deterministic  # noqa: E402
from train import config as C  # noqa: E402
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
from train.metrics import GPUMonitor, Meter, MetricsWriter, format_seconds, peak_flops, sequence_lengths, training_flops  # noqa: E402
from train.parallelize import ContrastiveModel, materialize, parallelize  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Forward and backward over a step's micro-batches
# ----------------------------------------------------------------------------------------------------


def contrastive_loss(kind: str, img, txt, scale, bias, group) -> torch.Tensor:
    """This rank's mean loss over its rows, against the texts of every rank of `group`."""
    if kind == "siglip":
        return K.siglip_loss(img, txt, scale, bias, group=group)
    return K.clip_loss(img, txt, scale, group=group)


def forward_backward_step(model, batch: dict, kind: str, group, weight: torch.Tensor) -> torch.Tensor:
    """Forward, loss, backward of one micro-batch, the loss scaled by `weight` = n_r · W / N (module doc).
    Returns the micro-batch's loss summed over this rank's rows (detached)."""
    img, txt, scale, bias = model(batch["image"], batch["text"])
    loss = contrastive_loss(kind, img, txt, scale, bias, group)
    (loss * weight).backward()
    return loss.detach() * img.shape[0]


def forward_backward(model, batches: list[dict], kind: str, group) -> dict:
    """Accumulate the gradient of the step's mean per-image loss J over all ranks and micro-batches (module
    doc). Every rank calls it with the same number of micro-batches (each of any size).

    Nothing is read back to the host: the image counts of every rank are summed on the device and the loss
    weights stay device scalars, so the host queues the step's work without waiting for the previous step.
    Returns device scalars: this rank's loss sum, the step's images over all ranks, and per micro-batch."""
    world_size = dist.get_world_size(group)
    device = batches[0]["image"]["patches"].device
    counts = torch.tensor([b["image"]["cu_seqlens"].numel() - 1 for b in batches], dtype=torch.float64)
    counts = counts.to(device, non_blocking=True)
    totals = counts.clone()
    dist.all_reduce(totals, group=group)  # images of each micro-batch, over all ranks
    total_images = totals.sum()
    weights = (counts * world_size / total_images).float()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        model.set_requires_gradient_sync(i == len(batches) - 1)  # one reduce-scatter per step
        loss_sum += forward_backward_step(model, batch, kind, group, weights[i]).double()
    return {"loss_sum": loss_sum, "total_images": total_images, "images_per_micro_batch": totals}


# ----------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------


class Trainer(TrainerBase):
    name = "stage1"

    def __init__(self, cfg: C.Config):
        self.setup(cfg)

        # Data.
        meta = ensure_dataset(cfg, self.rank, self.name)
        self.train_shards, self.val_shards, tokenizer_dir, self.classes = data_paths(cfg, meta)
        self.model_config = C.build_model_config(cfg)
        context = self.model_config.text.context_length
        self.tokenizer = TextTokenizer.from_pretrained(tokenizer_dir, context_length=context)
        self.tokenizer.check_vocab(self.model_config.text.vocab_size)
        d = cfg.data
        self.image_config = ImageConfig.for_model(self.model_config.vision, min_pixels=d.min_pixels,
                                                  max_pixels=d.max_pixels, merge_size=d.merge_size,
                                                  square_side=d.square_side)
        if self.is_main:  # beside the checkpoints, so any checkpoint is usable with the same preprocessing
            self.image_config.save(self.run_dir)
            save_tokenizer(self.tokenizer.tokenizer, self.run_dir / "tokenizer")
        loader_config = LoaderConfig(self.train_shards, token_budget=d.token_budget, max_images=d.max_images,
                                     pack_buffer=d.pack_buffer, shuffle_buffer=d.shuffle_buffer, resampled=True,
                                     seed=cfg.job.seed, num_workers=d.num_workers,
                                     short_caption_prob=d.short_caption_prob)
        loader = PackedLoader(loader_config, self.image_config, self.tokenizer, self.rank, self.world_size)
        resume = d.resume if d.resume != "auto" else ("replay" if cfg.job.deterministic else "position")
        self.data = DataStream(loader, resume)

        # Model: build on meta, parallelize, materialize.
        with torch.device("meta"):
            clip = FineCLIP(self.model_config)
        set_attention_deterministic(clip, cfg.training.attention_deterministic)
        self.model = parallelize(clip, self.mesh, activation_checkpoint=cfg.activation_checkpoint.mode,
                                 compile=cfg.compile.enable, param_dtype=cfg.training.param_dtype,
                                 reduce_dtype=cfg.training.reduce_dtype,
                                 reshard_after_forward=cfg.parallelism.reshard_after_forward)
        materialize(self.model, lambda: ContrastiveModel(FineCLIP(self.model_config)), self.device, self.mesh,
                    cfg.job.seed)
        self.num_params = sum(p.numel() for p in self.model.parameters())

        # Optimizer and schedule.
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))

        # Checkpoints: load the latest complete one.
        self.setup_checkpoints({"model": ModelState(self.model),
                                "optimizer": OptimizerState(self.model, self.optimizer)})

        # Metrics.
        self.peak_flops, self.peak_note = peak_flops(self.device)
        self.gpu = GPUMonitor(self.device)
        self.writer = MetricsWriter(self.run_dir, self.is_main, cfg.metrics.tensorboard)
        self.meter = Meter()
        self.last_loss = float("nan")
        self.evaluations: list[dict] = []
        if self.is_main:
            model_name = cfg.model.preset + ("+overrides" if cfg.model.vision or cfg.model.text else "")
            print(f"[stage1] {self.world_size} process(es) on {self.device.type} ({dist.get_backend()}), "
                  f"{torch.get_num_threads()} thread(s) each | FineCLIP {model_name} "
                  f"{self.num_params / 1e6:.2f}M params | run dir {self.run_dir} | "
                  + (f"resumed from step {self.resumed_from}" if self.resumed_from else "from scratch")
                  + f" | peak: {self.peak_note}", flush=True)

    # -- one step -----------------------------------------------------------------------------------

    def next_micro_batches(self) -> list[dict]:
        """The step's micro-batches of this rank, moved to the device, with their sequence lengths read from
        the host copy (for the meter: never from the device); the wait counts as data time."""
        started = time.perf_counter()
        batches = []
        for _ in range(self.cfg.training.grad_accum_steps):
            batch = self.data.next()
            batches.append({"image": {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                                      for k, v in batch["image"].items()},
                            "text": {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                                     for k, v in batch["text"].items()},
                            "lengths": (sequence_lengths(batch["image"]["cu_seqlens"]),
                                        sequence_lengths(batch["text"]["cu_seqlens"]))})
        self.meter.data_seconds += time.perf_counter() - started
        return batches

    def train_step(self) -> dict:
        batches = self.next_micro_batches()
        self.optimizer.zero_grad(set_to_none=True)
        out = forward_backward(self.model, batches, self.model_config.loss, self.group)
        for batch, total in zip(batches, out["images_per_micro_batch"]):
            image_lengths, text_lengths = batch["lengths"]
            self.meter.images += len(image_lengths)
            self.meter.patches += int(image_lengths.sum())
            self.meter.text_tokens += int(text_lengths.sum())
            self.meter.flops += training_flops(self.model_config, image_lengths, text_lengths, total)
        out["grad_norm"] = clip_grad_norm_(self.model.parameters(), self.cfg.training.max_norm)
        out["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate of this step (before the schedule advances)
        self.optimizer.step()
        self.scheduler.step()
        self.meter.steps += 1
        return out

    # -- logging ------------------------------------------------------------------------------------

    def log(self, out: dict) -> None:
        loss = out["loss_sum"].clone()
        dist.all_reduce(loss, group=self.group)
        loss = float(loss / out["total_images"])  # the mean per-image loss of the step (what J is)
        self.last_loss = loss
        counts = self.meter.as_tensor(self.device)
        dist.all_reduce(counts, group=self.group)
        images, patches, text_tokens, flops, data_seconds = counts.tolist()
        skipped = self.skipped_samples()
        elapsed = time.perf_counter() - self.meter.started
        record = {
            "kind": "train", "step": self.step, "loss": loss, "lr": out["lr"],
            "logit_scale": math.exp(self._scalar(self.model.clip.logit_scale)),
            "grad_norm": float(out["grad_norm"]),
            "images_per_s": images / elapsed, "patch_tokens_per_s": patches / elapsed,
            "text_tokens_per_s": text_tokens / elapsed,
            **self.utilization(elapsed, flops, data_seconds), "skipped": skipped,
        }
        if self.model.clip.logit_bias is not None:
            record["logit_bias"] = self._scalar(self.model.clip.logit_bias)
        self.publish(record, elapsed)

    # -- evaluation and export ----------------------------------------------------------------------

    def full_model(self) -> FineCLIP | None:
        """An unsharded float32 copy of the model on rank 0 (None elsewhere); a collective: every rank calls."""
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        with torch.device("meta"):
            model = FineCLIP(self.model_config)
        prefix = "clip."
        model.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True, assign=True)
        return model.to(self.device).eval()

    @torch.no_grad()
    def _evaluate_on_rank0(self, model: FineCLIP) -> dict:
        from finevit.eval import tasks as T
        from finevit.eval.encode import embed_images

        cfg = self.cfg.eval
        dtype = torch.bfloat16 if self.device.type == "cuda" else None
        budget = max(cfg.token_budget, self.image_config.max_patches)
        images = embed_images(model, self.val_shards, self.image_config, budget, self.device, dtype,
                              cfg.limit or None, progress=False)
        encode = {"token_budget": cfg.token_budget, "device": self.device, "dtype": dtype}
        dataset = "finevit-synth_val" if not self.cfg.data.val_shards else "val"
        results = T.run_suite(model, self.tokenizer, images, dataset, cfg.tasks, self.classes, **encode)
        out_dir = self.run_dir / "eval" / f"step-{self.step}"
        record = {"kind": "eval", "step": self.step, "num_images": len(images.keys)}
        for result in results:
            T.write_result(result, out_dir, "FineCLIP", str((self.run_dir / f"step-{self.step}").resolve()))
            prefix = f"{result.dataset}/{result.task}"
            for key, value in result.metrics.items():
                if "rank" not in key:
                    record[f"{prefix}/{key}"] = value
        self.writer.write(record)
        self.evaluations.append(record)
        shown = {k.split("/", 1)[1]: v for k, v in record.items()
                 if k.endswith(("image_retrieval_recall@1", "/accuracy", "/acc1"))}
        print(f"[stage1] eval at step {self.step} on {record['num_images']} images: "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shown.items()), flush=True)
        return record

    def export(self) -> Path | None:
        """save_pretrained of the FineCLIP and of its FineViT, each with the tokenizer and preprocess.json."""
        model = self.full_model()
        path = None
        if self.is_main:
            path = self.run_dir / "export"
            clip_dir, vision_dir = path / "fineclip", path / "vision"
            model.cpu().save_pretrained(clip_dir)
            model.vision.save_pretrained(vision_dir)
            for directory in (clip_dir, vision_dir):
                self.image_config.save(directory)
                tok_dir = directory / "tokenizer"
                if tok_dir.exists():
                    shutil.rmtree(tok_dir)
                shutil.copytree(self.run_dir / "tokenizer", tok_dir)
        dist.barrier()
        return path

    def summary(self, final: dict, exported: Path | None) -> str:
        wall = time.perf_counter() - self.started
        lines = [*self.summary_head("FineViT stage 1"),
                 f"processes    {self.world_size} × {self.device.type} ({dist.get_backend()}), "
                 f"{self.num_params / 1e6:.2f}M parameters",
                 f"wall time    {format_seconds(wall)} (training {format_seconds(self.train_seconds)}, "
                 f"evaluation {format_seconds(self.eval_seconds)})",
                 f"final loss   {self.last_loss:.4f}"]
        if final:
            lines += ["", *evaluation_table(final, self.classes)]
        if exported:
            lines += ["", f"export       {exported}/fineclip (FineCLIP), {exported}/vision (FineViT): safetensors, "
                          "tokenizer, preprocess.json"]
        lines += [f"metrics      {self.writer.path}" + (f", {self.run_dir / 'training_curves.png'}"
                                                         if self.cfg.metrics.plot else ""), "=" * 78]
        return "\n".join(lines)


def evaluation_table(record: dict, classes: dict) -> list[str]:
    """The summary's evaluation rows from an eval record ("<dataset>/<task>/<metric>" keys), with chance levels."""
    n = record["num_images"]
    rows = [f"{'evaluation on ' + str(n) + ' val images':<44}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'chance R@1':>11}"]

    def retrieval_rows(prefix: str, label: str) -> None:
        for direction, key, name in (("text→image", "image", label), ("image→text", "text", label)):
            values = [record.get(f"{prefix}/{key}_retrieval_recall@{k}") for k in (1, 5, 10)]
            if values[0] is None:
                continue
            chance = f"{100 / n:.1f}%" if key == "image" else ""
            rows.append(f"  {direction + ', ' + name:<42}" + "".join(f"{100 * v:>7.1f}%" for v in values)
                        + f"{chance:>11}")

    for key in record:
        if key.endswith("/zeroshot_retrieval/image_retrieval_recall@1"):
            prefix = key.rsplit("/", 1)[0]
            label = "dense captions" if prefix.split("/")[0].endswith("_long") else "all captions"
            retrieval_rows(prefix, label)
    hard = {k.rsplit("/", 1)[1]: v for k, v in record.items() if "/hard_negatives/" in k}
    if hard:
        kinds = ", ".join(f"{k[len('pairwise_accuracy_'):]} {100 * v:.0f}%" for k, v in hard.items()
                          if k.startswith("pairwise_accuracy_"))
        rows.append(f"  hard negatives: accuracy {100 * hard['accuracy']:.1f}% (chance {100 * hard['chance']:.1f}%), "
                    f"pairwise {100 * hard['pairwise_accuracy']:.1f}% (chance 50%)")
        rows.append(f"    pairwise by change: {kinds}")
    for label, spec in classes.items():
        acc = {k.rsplit("/", 1)[1]: v for k, v in record.items() if k.split("/")[0].endswith(f"_{label}")
               and "/zeroshot_classification/" in k}
        if acc:
            c = len(spec["classnames"])
            rows.append(f"  zero-shot classification of {label} ({c} classes): top-1 {100 * acc['acc1']:.1f}% "
                        f"(chance {100 / c:.1f}%), top-5 {100 * acc['acc5']:.1f}%")
    return rows


def main(argv: list[str] | None = None) -> int:
    return run(Trainer, C.Config, argv)


if __name__ == "__main__":
    sys.exit(main())
