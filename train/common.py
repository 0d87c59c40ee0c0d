"""What both trainers share: process group, determinism, the dataset, the data stream and its resume state,
AdamW and its schedule, gradient clipping over FSDP2 shards, and the trainer skeleton (run directory, fault
injection for tests, checkpoint manager, the step loop, a clean exit).

`train/stage1.py` and `train/stage2.py` subclass `TrainerBase`; each defines its model, `train_step()`,
`log()`, `evaluate()` and `finish()`.
"""

from __future__ import annotations

import dataclasses
import datetime
import faulthandler
import json
import logging
import math
import os
import pickle
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `torchrun train/stageN.py` puts train/ first on sys.path, not the repo
    sys.path.insert(0, str(REPO))

from finevit.data import PackedLoader  # noqa: E402
from train import config as C  # noqa: E402
from train.checkpoint import CheckpointManager, sigkill_self  # noqa: E402
from train.metrics import format_progress, peak_memory_gib, plot_curves  # noqa: E402

logger = logging.getLogger("finevit.train")


# ----------------------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------------------


def init_distributed(cfg) -> tuple[torch.device, int, int, int]:
    """Process group from torchrun's environment (or a one-process group for `python train/stageN.py`).
    Returns (device, rank, world_size, local_world_size)."""
    if "RANK" not in os.environ:  # plain `python train/stageN.py`: a group of one
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


def ensure_dataset(cfg, rank: int, who: str = "train") -> dict:
    """The root dataset's meta.json; rank 0 generates the synthetic dataset first when it is missing."""
    root = Path(cfg.data.root)
    meta_path = root / "meta.json"
    needs_root = not (cfg.data.train_shards and cfg.data.val_shards and cfg.data.tokenizer)
    if rank == 0 and needs_root and not meta_path.is_file():
        if not cfg.data.generate:
            raise FileNotFoundError(f"data.root={root} holds no dataset (no meta.json) and data.generate is false")
        from finevit.data.synth import SynthConfig, generate

        print(f"[{who}] generating the synthetic dataset into {root} "
              f"({cfg.data.synth_train} train + {cfg.data.synth_val} val samples, once) ...", flush=True)
        started = time.perf_counter()
        generate(root, SynthConfig(train=cfg.data.synth_train, val=cfg.data.synth_val), progress=False)
        print(f"[{who}] dataset ready in {time.perf_counter() - started:.0f} s", flush=True)
    dist.barrier()
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def data_paths(cfg, meta: dict) -> tuple[str, str, Path, dict]:
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


def build_optimizer(model: torch.nn.Module, cfg, lr_scale=None) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases, the MAP probe, logit scale and bias).

    lr_scale: optional function of a parameter's name giving its multiple of optimizer.lr (default 1). The
    groups at the base rate come first, so param_groups[0]["lr"] is the schedule's rate."""
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = float(lr_scale(name)) if lr_scale else 1.0
            groups.setdefault((scale, p.ndim >= 2), []).append(p)
    order = sorted(groups, key=lambda k: (k[0] != 1.0, not k[1], k[0]))
    param_groups = [{"params": groups[k], "weight_decay": cfg.optimizer.weight_decay if k[1] else 0.0,
                     "lr": cfg.optimizer.lr * k[0]} for k in order]
    return torch.optim.AdamW(param_groups, lr=cfg.optimizer.lr, betas=cfg.optimizer.betas, eps=cfg.optimizer.eps,
                             foreach=True)


def lr_factor(step: int, cfg) -> float:
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



class TrainState(Stateful):
    """Step and schedule (the same on every rank), plus this rank's data position and RNG under "rank{r}"."""

    def __init__(self, trainer: TrainerBase):
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




class TrainerBase:
    """The skeleton both stages share. A subclass's __init__ calls `setup(cfg)` first, builds its data
    (`self.data`: a DataStream), model, optimizer and scheduler, then `setup_checkpoints(model_states)`; it
    defines `train_step() -> dict`, `log(out)`, `evaluate()` and `finish()`."""

    name = "train"  # the prefix of progress lines

    def setup(self, cfg) -> None:
        """Process group, mesh, determinism, the run directory (config.json; a changed config is reported)."""
        self.cfg = cfg
        self.started = time.perf_counter()
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
                print(json.dumps(dataclasses.asdict(cfg), indent=2), flush=True)
        self.faults = self._faults()
        self.step = 0
        self.train_seconds = 0.0
        self.eval_seconds = 0.0

    def setup_checkpoints(self, states: dict) -> None:
        """The checkpoint manager over `states` + this trainer's TrainState; loads the latest complete one."""
        cfg = self.cfg.checkpoint
        self.checkpointer = CheckpointManager(
            self.run_dir / "checkpoints", {**states, "train": TrainState(self)},
            enable=cfg.enable, interval=cfg.interval, keep_latest_k=cfg.keep_latest_k, async_mode=cfg.async_mode,
            fault=self._save_fault)
        self.resumed_from = self.checkpointer.load()

    # -- helpers ------------------------------------------------------------------------------------

    def _check_previous_config(self) -> None:
        previous = self.run_dir / "config.json"
        if not previous.is_file():
            return
        old = json.loads(previous.read_text())
        new = json.loads(json.dumps(dataclasses.asdict(self.cfg)))  # tuples -> lists
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
            print(f"[{self.name}] rank {self.rank}: injected fault, SIGKILL in the middle of saving step {step}",
                  flush=True)
            sigkill_self()

    @staticmethod
    def _scalar(param: torch.Tensor) -> float:
        """The value of a one-element (possibly sharded) parameter; a collective for a DTensor."""
        param = param.detach()
        return float(param.full_tensor() if hasattr(param, "full_tensor") else param)

    def skipped_samples(self) -> dict[str, int]:
        """The data pipeline's skipped-sample counters summed over ranks (a collective)."""
        per_rank = [None] * self.world_size
        dist.all_gather_object(per_rank, self.data.loader.stats()["skipped"], group=self.group)
        skipped: dict[str, int] = {}
        for counts in per_rank:
            for reason, n in counts.items():
                skipped[reason] = skipped.get(reason, 0) + n
        return skipped

    def utilization(self, elapsed: float, flops: float, data_seconds: float) -> dict:
        """Model TFLOP/s per process, MFU, data-wait share (over all ranks' time), peak memory, wall time."""
        per_rank_elapsed = elapsed * self.world_size
        return {"tflops_per_s_per_process": flops / per_rank_elapsed / 1e12,
                "mfu_pct": 100 * flops / per_rank_elapsed / self.peak_flops if self.peak_flops else None,
                "data_wait_pct": 100 * data_seconds / per_rank_elapsed,
                "peak_mem_gib": peak_memory_gib(self.device), "elapsed_s": time.perf_counter() - self.started}

    def publish(self, record: dict, elapsed: float) -> None:
        """Add GPU telemetry, write the train record (rank 0: metrics.jsonl and a progress line), reset the
        meter and the peak-memory counter."""
        record.update(self.gpu.read())
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.is_main:
            self.writer.write(record)
            remaining = self.cfg.training.steps - self.step
            eta = elapsed / max(1, self.meter.steps) * remaining if self.meter.steps else None
            print(format_progress(record, self.cfg.training.steps, eta), flush=True)
        self.meter.reset()

    def summary_head(self, title: str) -> list[str]:
        """The summary table's title and step lines."""
        return ["", "=" * 78, f"{title} — {self.run_dir}", "=" * 78,
                f"steps        {self.step} (this run: {self.step - self.resumed_from}"
                + (f", resumed from step {self.resumed_from})" if self.resumed_from else ")")]

    def should_log(self) -> bool:
        return self.step % self.cfg.metrics.log_freq == 0 or self.step == self.cfg.training.steps or self.step == 1

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
                print(f"[{self.name}] rank {self.rank}: injected fault, SIGKILL at step {self.step}", flush=True)
                sigkill_self()
            if cfg.eval.interval and self.step % cfg.eval.interval == 0 and self.step != total:
                paused = time.perf_counter()
                self.evaluate()
                self.meter.started += time.perf_counter() - paused  # evaluation is not training time
            self.checkpointer.save(self.step, last_step=self.step == total)
            self.checkpointer.poll()
        self.checkpointer.close()
        self.train_seconds = time.perf_counter() - train_started

    def _eval_threads(self) -> int:
        """On CPU, rank 0 evaluates while the other ranks wait: let it use their cores. Returns the thread
        count to restore."""
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(max(threads, len(os.sched_getaffinity(0))))
        return threads

    def evaluate(self) -> dict:
        """Run `_evaluate_on_rank0` on an unsharded copy of the model (`full_model()`, a collective) on rank 0
        while the others wait; returns its record (empty on the other ranks)."""
        started = time.perf_counter()
        model = self.full_model()
        record = {}
        if self.is_main:
            threads = self._eval_threads()
            try:
                record = self._evaluate_on_rank0(model)
            finally:
                torch.set_num_threads(threads)
            del model
        dist.barrier()
        self.eval_seconds += time.perf_counter() - started
        return record

    def finish(self) -> None:
        """Final evaluation, export, curves and the summary table (printed and in run_dir/summary.txt)."""
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

    def close(self) -> None:
        dist.barrier()  # a gloo exit right after collectives can abort without it
        dist.destroy_process_group()


def run(trainer_class: type, config_class: type, argv: list[str] | None = None) -> int:
    """A trainer script's main: parse the configuration (exit status 2 on an error, which names the key),
    train, finish, and leave the process group cleanly whatever happened."""
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(levelname)s: %(message)s")
    # A rank killed by a fatal signal (SIGABRT from a C++ abort in gloo, SIGSEGV) prints every thread's Python
    # stack first: torchrun reports only the signal.
    faulthandler.enable(all_threads=True)
    try:
        cfg = C.parse_args(argv, config_class)
    except C.ConfigError as exc:
        print(f"{trainer_class.name}: configuration error: {exc}", file=sys.stderr)
        return 2
    trainer = trainer_class(cfg)
    try:
        trainer.train()
        trainer.finish()
    finally:
        trainer.close()
    return 0
