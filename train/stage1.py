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

import datetime
import json
import logging
import math
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `torchrun train/stage1.py` puts train/ first on sys.path, not the repo
    sys.path.insert(0, str(REPO))

import finevit.kernels as K  # noqa: E402
from finevit.data import ImageConfig, LoaderConfig, PackedLoader, TextTokenizer  # noqa: E402
from finevit.data.text import save_tokenizer  # noqa: E402
from finevit.model import FineCLIP  # noqa: E402
from train import config as C  # noqa: E402
from train.checkpoint import CheckpointManager, ModelState, OptimizerState, sigkill_self  # noqa: E402
from train.metrics import (GPUMonitor, Meter, MetricsWriter, format_progress, format_seconds,  # noqa: E402
                           peak_flops, peak_memory_gib, plot_curves, sequence_lengths, training_flops)
from train.parallelize import ContrastiveModel, materialize, parallelize  # noqa: E402

logger = logging.getLogger("finevit.train")


# ----------------------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------------------


def init_distributed(cfg: C.Config) -> tuple[torch.device, int, int, int]:
    """Process group from torchrun's environment (or a one-process group for `python train/stage1.py`).
    Returns (device, rank, world_size, local_world_size)."""
    if "RANK" not in os.environ:  # plain `python train/stage1.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    backend = cfg.parallelism.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        threads = cfg.training.threads or max(1, len(os.sched_getaffinity(0)) // local_world)
        torch.set_num_threads(threads)
    # Long enough for rank 0's evaluation and export while the others wait at a barrier.
    timeout = datetime.timedelta(minutes=60)
    # Under `torchrun --max-restarts`, a restarted group meets in the same store as the attempt that died
    # (torch 2.14's agent keeps it): without a per-attempt prefix, gloo reads the dead ranks' addresses and
    # fails with "connectFullMesh ... Connection refused". So every attempt gets its own key space.
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"finevit/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    return device, dist.get_rank(), dist.get_world_size(), local_world


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


def ensure_dataset(cfg: C.Config, rank: int) -> dict:
    """The root dataset's meta.json; rank 0 generates the synthetic dataset first when it is missing."""
    root = Path(cfg.data.root)
    meta_path = root / "meta.json"
    needs_root = not (cfg.data.train_shards and cfg.data.val_shards and cfg.data.tokenizer)
    if rank == 0 and needs_root and not meta_path.is_file():
        if not cfg.data.generate:
            raise FileNotFoundError(f"data.root={root} holds no dataset (no meta.json) and data.generate is false")
        from finevit.data.synth import SynthConfig, generate

        print(f"[stage1] generating the synthetic dataset into {root} "
              f"({cfg.data.synth_train} train + {cfg.data.synth_val} val samples, once) ...", flush=True)
        started = time.perf_counter()
        generate(root, SynthConfig(train=cfg.data.synth_train, val=cfg.data.synth_val), progress=False)
        print(f"[stage1] dataset ready in {time.perf_counter() - started:.0f} s", flush=True)
    dist.barrier()
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def data_paths(cfg: C.Config, meta: dict) -> tuple[str, str, Path, dict]:
    """(train shard spec, val shard spec, tokenizer dir, classes) from the config, else from the dataset."""
    root = Path(cfg.data.root)
    train = cfg.data.train_shards or str(root / meta["splits"]["train"]["shards"])
    val = cfg.data.val_shards or str(root / meta["splits"]["val"]["shards"])
    tokenizer = Path(cfg.data.tokenizer) if cfg.data.tokenizer else root / meta.get("tokenizer", "tokenizer")
    classes = {}
    if meta.get("classes") and (root / meta["classes"]).is_file():
        classes = json.loads((root / meta["classes"]).read_text())
    return train, val, tokenizer, classes


class DataStream:
    """The rank's endless stream of packed micro-batches, with its resume state.

    resume "position" restores PackedLoader.state_dict (fast; the samples that sat in the workers' shuffle
    and packing buffers at the checkpoint are skipped). "replay" restarts the stream from its beginning and
    drops the batches delivered before the checkpoint: exact, the same batches as an uninterrupted run,
    at the cost of re-reading them (the deterministic mode's choice).
    """

    def __init__(self, loader: PackedLoader, resume_mode: str):
        self.loader, self.resume_mode = loader, resume_mode
        self.iterator = None
        self.replay = 0

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved = state["loader"]
        if self.resume_mode == "replay":
            self.replay = int(saved["batches_delivered"])
        else:
            self.loader.load_state_dict(saved)

    def next(self) -> dict:
        if self.iterator is None:
            self.iterator = iter(self.loader)
            for _ in range(self.replay):
                next(self.iterator)
            self.replay = 0
        return next(self.iterator)


# ----------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, cfg: C.Config) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases, the MAP probe, logit scale and bias)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optimizer.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=cfg.optimizer.betas, eps=cfg.optimizer.eps,
                             foreach=True)


def lr_factor(step: int, cfg: C.Config) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then the decay."""
    s, warmup, total = cfg.lr_scheduler, cfg.lr_scheduler.warmup_steps, cfg.training.steps
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if s.decay == "cosine":
        decayed = 0.5 * (1 + math.cos(math.pi * progress))
    elif s.decay == "linear":
        decayed = 1.0 - progress
    else:
        decayed = 1.0
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * decayed


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Total gradient norm over FSDP2's sharded (DTensor) gradients, clipped to max_norm (torchtitan's).

    The norm of a DTensor gradient list is a DTensor reduced over the shards: full_tensor() makes it the
    global norm on every rank before the scaling."""
    from torch.distributed.tensor import DTensor

    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=True)
    return total


# ----------------------------------------------------------------------------------------------------
# Forward and backward over a step's micro-batches
# ----------------------------------------------------------------------------------------------------


def contrastive_loss(kind: str, img, txt, scale, bias, group) -> torch.Tensor:
    """This rank's mean loss over its rows, against the texts of every rank of `group`."""
    if kind == "siglip":
        return K.siglip_loss(img, txt, scale, bias, group=group)
    return K.clip_loss(img, txt, scale, group=group)


def forward_backward_step(model, batch: dict, kind: str, group, weight: float) -> torch.Tensor:
    """Forward, loss, backward of one micro-batch, the loss scaled by `weight` = n_r · W / N (module doc).
    Returns the micro-batch's loss summed over this rank's rows (detached)."""
    img, txt, scale, bias = model(batch["image"], batch["text"])
    loss = contrastive_loss(kind, img, txt, scale, bias, group)
    (loss * weight).backward()
    return loss.detach() * img.shape[0]


def forward_backward(model, batches: list[dict], kind: str, group) -> dict:
    """Accumulate the gradient of the step's mean per-image loss J over all ranks and micro-batches (module
    doc). Every rank calls it with the same number of micro-batches (each of any size)."""
    world_size = dist.get_world_size(group)
    counts = [b["image"]["cu_seqlens"].numel() - 1 for b in batches]
    device = batches[0]["image"]["patches"].device
    totals = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(totals, group=group)  # images of each micro-batch, over all ranks
    totals = totals.tolist()
    total_images = sum(totals)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        model.set_requires_gradient_sync(i == len(batches) - 1)  # one reduce-scatter per step
        weight = counts[i] * world_size / total_images
        loss_sum += forward_backward_step(model, batch, kind, group, weight).double()
    return {"loss_sum": loss_sum, "total_images": total_images, "images_per_micro_batch": [int(t) for t in totals]}


# ----------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------


class TrainState(Stateful):
    """Step and schedule (the same on every rank), plus this rank's data position and RNG under "rank{r}"."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self._template = None  # the blob handed to DCP as this rank's entry; still it after load = not found

    def state_dict(self) -> dict:
        t = self.trainer
        rank_state = {"data": t.data.state_dict(), "torch_rng": torch.get_rng_state(),
                      "cuda_rng": torch.cuda.get_rng_state(t.device) if t.device.type == "cuda" else None}
        self._template = pickle.dumps(rank_state)
        return {"step": t.step, "lr_scheduler": pickle.dumps(t.scheduler.state_dict()),
                f"rank{t.rank}": self._template}

    def load_state_dict(self, state: dict) -> None:
        t = self.trainer
        t.step = int(state["step"])
        t.scheduler.load_state_dict(pickle.loads(state["lr_scheduler"]))
        mine = state.get(f"rank{t.rank}")
        if mine is None or mine is self._template:
            logger.warning("rank %d: the checkpoint holds no data position for this rank (saved with another "
                           "world size?): its data stream starts fresh", t.rank)
            return
        rank_state = pickle.loads(mine)
        t.data.load_state_dict(rank_state["data"])
        torch.set_rng_state(rank_state["torch_rng"])
        if rank_state["cuda_rng"] is not None and t.device.type == "cuda":
            torch.cuda.set_rng_state(rank_state["cuda_rng"], t.device)


class Trainer:
    def __init__(self, cfg: C.Config):
        self.cfg = cfg
        self.started = time.perf_counter()

        # Process group and mesh.
        self.device, self.rank, self.world_size, self.local_world = init_distributed(cfg)
        self.mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("dp",))
        self.group = dist.group.WORLD
        set_determinism(cfg.job.seed, cfg.job.deterministic)
        self.run_dir = Path(cfg.job.run_dir)
        self.is_main = self.rank == 0
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._check_previous_config()
            C.save(cfg, self.run_dir / "config.json")
            if cfg.job.print_config:
                print(json.dumps(cfg.to_dict(), indent=2), flush=True)
        self.faults = self._faults()

        # Data.
        meta = ensure_dataset(cfg, self.rank)
        self.train_shards, self.val_shards, tokenizer_dir, self.classes = data_paths(cfg, meta)
        self.model_config = C.build_model_config(cfg)
        context = self.model_config.text.context_length
        self.tokenizer = TextTokenizer.from_pretrained(tokenizer_dir, context_length=context)
        self.tokenizer.check_vocab(self.model_config.text.vocab_size)
        d = cfg.data
        self.image_config = ImageConfig.for_model(self.model_config.vision, min_pixels=d.min_pixels,
                                                  max_pixels=d.max_pixels, merge_size=d.merge_size)
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
        self.step = 0
        self.checkpointer = CheckpointManager(
            self.run_dir / "checkpoints",
            {"model": ModelState(self.model), "optimizer": OptimizerState(self.model, self.optimizer),
             "train": TrainState(self)},
            enable=cfg.checkpoint.enable, interval=cfg.checkpoint.interval,
            keep_latest_k=cfg.checkpoint.keep_latest_k, async_mode=cfg.checkpoint.async_mode,
            fault=self._save_fault)
        self.resumed_from = self.checkpointer.load()

        # Metrics.
        self.peak_flops, self.peak_note = peak_flops(self.device)
        self.gpu = GPUMonitor(self.device)
        self.writer = MetricsWriter(self.run_dir, self.is_main, cfg.metrics.tensorboard)
        self.meter = Meter()
        self.last_loss = float("nan")
        self.evaluations: list[dict] = []
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        if self.is_main:
            print(f"[stage1] {self.world_size} process(es) on {self.device.type} ({dist.get_backend()}), "
                  f"{torch.get_num_threads()} thread(s) each | FineCLIP {cfg.model.preset}+overrides "
                  f"{self.num_params / 1e6:.2f}M params | run dir {self.run_dir} | "
                  + (f"resumed from step {self.resumed_from}" if self.resumed_from else "from scratch")
                  + f" | peak: {self.peak_note}", flush=True)

    # -- helpers ------------------------------------------------------------------------------------

    def _check_previous_config(self) -> None:
        previous = self.run_dir / "config.json"
        if not previous.is_file():
            return
        old, new = json.loads(previous.read_text()), json.loads(json.dumps(self.cfg.to_dict()))  # tuples -> lists
        changed = [f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k]]
        if changed:
            logger.warning("run_dir %s was started with another configuration (changed: %s); resuming anyway",
                           self.run_dir, ", ".join(changed))

    def _faults(self) -> dict[str, int]:
        """The fault of this restart attempt, for this rank (debug.fault; testing only)."""
        faults = [f.strip() for f in self.cfg.debug.fault.split(",") if f.strip()]
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        fault_rank = self.cfg.debug.fault_rank if self.cfg.debug.fault_rank >= 0 else self.world_size - 1
        if attempt >= len(faults) or self.rank != fault_rank:
            return {}
        kind, _, step = faults[attempt].partition(":")
        return {kind: int(step)}

    def _save_fault(self, step: int) -> None:
        if self.faults.get("save") == step:
            print(f"[stage1] rank {self.rank}: injected fault, SIGKILL in the middle of saving step {step}", flush=True)
            sigkill_self()

    @staticmethod
    def _scalar(param: torch.Tensor) -> float:
        """The value of a one-element (possibly sharded) parameter; a collective for a DTensor."""
        param = param.detach()
        return float(param.full_tensor() if hasattr(param, "full_tensor") else param)

    # -- one step -----------------------------------------------------------------------------------

    def next_micro_batches(self) -> list[dict]:
        """The step's micro-batches of this rank, moved to the device; the wait counts as data time."""
        started = time.perf_counter()
        batches = []
        for _ in range(self.cfg.training.grad_accum_steps):
            batch = self.data.next()
            batches.append({"image": {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                                      for k, v in batch["image"].items()},
                            "text": {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                                     for k, v in batch["text"].items()}})
        self.meter.data_seconds += time.perf_counter() - started
        return batches

    def train_step(self) -> dict:
        batches = self.next_micro_batches()
        self.optimizer.zero_grad(set_to_none=True)
        out = forward_backward(self.model, batches, self.model_config.loss, self.group)
        for batch, total in zip(batches, out["images_per_micro_batch"]):
            image_lengths = sequence_lengths(batch["image"]["cu_seqlens"])
            text_lengths = sequence_lengths(batch["text"]["cu_seqlens"])
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

    def should_log(self) -> bool:
        return self.step % self.cfg.metrics.log_freq == 0 or self.step == self.cfg.training.steps or self.step == 1

    def log(self, out: dict) -> None:
        loss = out["loss_sum"].clone()
        dist.all_reduce(loss, group=self.group)
        loss = float(loss) / out["total_images"]  # the mean per-image loss of the step (what J is)
        self.last_loss = loss
        counts = self.meter.as_tensor().to(self.device)
        dist.all_reduce(counts, group=self.group)
        images, patches, text_tokens, flops, data_seconds = counts.tolist()
        skipped_all = [None] * self.world_size
        dist.all_gather_object(skipped_all, self.data.loader.stats()["skipped"], group=self.group)
        skipped: dict[str, int] = {}
        for s in skipped_all:
            for reason, n in s.items():
                skipped[reason] = skipped.get(reason, 0) + n
        elapsed = time.perf_counter() - self.meter.started
        per_rank_elapsed = elapsed * self.world_size
        record = {
            "kind": "train", "step": self.step, "loss": loss, "lr": out["lr"],
            "logit_scale": math.exp(self._scalar(self.model.clip.logit_scale)),
            "grad_norm": float(out["grad_norm"]),
            "images_per_s": images / elapsed, "patch_tokens_per_s": patches / elapsed,
            "text_tokens_per_s": text_tokens / elapsed,
            "tflops_per_s_per_process": flops / per_rank_elapsed / 1e12,
            "mfu_pct": 100 * flops / per_rank_elapsed / self.peak_flops if self.peak_flops else None,
            "data_wait_pct": 100 * data_seconds / per_rank_elapsed,
            "peak_mem_gib": peak_memory_gib(self.device), "skipped": skipped,
            "elapsed_s": time.perf_counter() - self.started,
        }
        if self.model.clip.logit_bias is not None:
            record["logit_bias"] = self._scalar(self.model.clip.logit_bias)
        record.update(self.gpu.read())
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.is_main:
            self.writer.write(record)
            remaining = self.cfg.training.steps - self.step
            eta = elapsed / max(1, self.meter.steps) * remaining if self.meter.steps else None
            print(format_progress(record, self.cfg.training.steps, eta), flush=True)
        self.meter.reset()

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

    def evaluate(self) -> dict:
        """Run the eval suite on rank 0 (the others wait); JSON results under run_dir/eval/step-N."""
        started = time.perf_counter()
        model = self.full_model()
        summary = {}
        if self.is_main:
            summary = self._evaluate_on_rank0(model)
            del model
        dist.barrier()
        self.eval_seconds += time.perf_counter() - started
        return summary

    @torch.no_grad()
    def _evaluate_on_rank0(self, model: FineCLIP) -> dict:
        from finevit.eval import tasks as T
        from finevit.eval.encode import embed_images

        cfg = self.cfg.eval
        threads = torch.get_num_threads()
        if self.device.type == "cpu":  # the other ranks wait: use their cores too
            torch.set_num_threads(max(threads, len(os.sched_getaffinity(0))))
        dtype = torch.bfloat16 if self.device.type == "cuda" else None
        budget = max(cfg.token_budget, self.image_config.max_patches)
        try:
            images = embed_images(model, self.val_shards, self.image_config, budget, self.device, dtype,
                                  cfg.limit or None, progress=False)
            encode = {"token_budget": cfg.token_budget, "device": self.device, "dtype": dtype}
            dataset = "finevit-synth_val" if not self.cfg.data.val_shards else "val"
            results = []
            for task in cfg.tasks:
                if task == "retrieval":
                    results.append(T.retrieval(model, self.tokenizer, images, dataset, **encode))
                elif task == "long_caption_retrieval":
                    results.append(T.long_caption_retrieval(model, self.tokenizer, images, dataset, **encode))
                elif task == "hard_negatives":
                    if any(a.get("hard_negatives") for a in images.annotations):
                        results.append(T.hard_negatives(model, self.tokenizer, images, dataset, **encode))
                elif task == "classification":
                    for key, spec in self.classes.items():
                        results.append(T.classification(model, self.tokenizer, images, dataset, key,
                                                        spec["classnames"], spec["templates"], **encode))
        finally:
            torch.set_num_threads(threads)
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

    # -- the loop -----------------------------------------------------------------------------------

    def train(self) -> None:
        cfg = self.cfg
        total = cfg.training.steps
        train_started = time.perf_counter()
        self.meter.reset()
        while self.step < total:
            out = self.train_step()
            self.step += 1
            if self.should_log():
                self.log(out)
            if self.faults.get("step") == self.step:
                print(f"[stage1] rank {self.rank}: injected fault, SIGKILL at step {self.step}", flush=True)
                sigkill_self()
            if cfg.eval.interval and self.step % cfg.eval.interval == 0 and self.step != total:
                paused = time.perf_counter()
                self.evaluate()
                self.meter.started += time.perf_counter() - paused  # evaluation is not training time
            self.checkpointer.save(self.step, last_step=self.step == total)
            self.checkpointer.poll()
        self.checkpointer.close()
        self.train_seconds = time.perf_counter() - train_started

    def finish(self) -> None:
        cfg = self.cfg
        final = self.evaluate() if cfg.eval.at_end else {}
        exported = self.export() if cfg.checkpoint.export else None
        if self.is_main:
            if cfg.metrics.plot:
                plot_curves(self.writer.path, self.run_dir / "training_curves.png")
            summary = self.summary(final, exported)
            print(summary, flush=True)
            (self.run_dir / "summary.txt").write_text(summary + "\n")
            self.writer.close()

    def summary(self, final: dict, exported: Path | None) -> str:
        wall = time.perf_counter() - self.started
        lines = ["", "=" * 78, f"FineViT stage 1 — {self.run_dir}", "=" * 78,
                 f"steps        {self.step} (this run: {self.step - self.resumed_from}"
                 + (f", resumed from step {self.resumed_from})" if self.resumed_from else ")"),
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

    def close(self) -> None:
        dist.barrier()  # a gloo exit right after collectives can abort without it (DESIGN.md)
        dist.destroy_process_group()


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
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(levelname)s: %(message)s")
    try:
        cfg = C.parse_args(argv)
    except C.ConfigError as exc:
        print(f"stage1: configuration error: {exc}", file=sys.stderr)
        return 2
    trainer = Trainer(cfg)
    try:
        trainer.train()
        trainer.finish()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
