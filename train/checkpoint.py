"""Distributed checkpoints (torch.distributed.checkpoint) with atomic completion, keep-latest-k and resume.

Layout under `folder` (torchtitan's):
    step-200/            a COMPLETE checkpoint: DCP shards + .metadata (model, optimizer, train state)
    step-400.partial/    a save in progress, or one killed mid-way: never loaded, removed on the next start

A save writes `step-N.partial` with `dcp.save` (or `dcp.async_save` on a side gloo group), then every rank
passes a barrier and rank 0 renames the directory to `step-N` (an atomic rename on a POSIX file system).
A process killed before that rename leaves only a `.partial` directory, so the newest `step-N` is always
complete and loadable. Only complete checkpoints are counted for keep-latest-k.

What is saved (the `states` mapping, all `Stateful`):
    model       get_model_state_dict / set_model_state_dict: sharded DTensors, resharded on load
    optimizer   get_optimizer_state_dict / set_optimizer_state_dict
    train       the trainer's state: step, LR scheduler, and per rank (under the key "rank{r}", so DCP keeps
                every rank's copy): data-loader position, RNG states
A resume with another world size loads the model and optimizer (DCP reshards) and warns that the per-rank
data and RNG state of the new ranks start fresh.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

logger = logging.getLogger("finevit.train")

STEP_DIR = re.compile(r"^step-(\d+)$")
PARTIAL_SUFFIX = ".partial"


class ModelState(Stateful):
    """The (sharded) model for DCP."""

    def __init__(self, model):
        self.model = model

    def state_dict(self):
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict):
        set_model_state_dict(self.model, state_dict)


class OptimizerState(Stateful):
    """The optimizer state, keyed by parameter names (so it reshards with the model)."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self):
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict):
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


def complete_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in `folder`, ascending."""
    if not folder.is_dir():
        return []
    steps = []
    for entry in folder.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / ".metadata").is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


class CheckpointManager:
    """Save every `interval` steps, keep the newest `keep_latest_k`, load the newest complete one.

    fault: testing hook, a callable(step) run on every rank right after its part of a synchronous save is
    written and before the completion barrier (the trainer uses it to SIGKILL a rank mid-save).
    """

    def __init__(self, folder: str | os.PathLike, states: dict[str, Stateful], *, enable: bool = True,
                 interval: int = 500, keep_latest_k: int = 2, async_mode: str = "disabled",
                 fault: Callable[[int], None] | None = None):
        if async_mode not in ("disabled", "async"):
            raise ValueError(f"CheckpointManager: async_mode must be 'disabled' or 'async', got {async_mode!r}")
        self.folder = Path(folder)
        self.states = states
        self.enable, self.interval, self.keep_latest_k = enable, interval, keep_latest_k
        self.async_mode = async_mode
        self.fault = fault
        self.rank = dist.get_rank()
        self.pending: tuple[int, Future] | None = None
        # Async saves run their collectives on a group of their own, beside the training collectives.
        self.async_group = dist.new_group(backend="gloo") if enable and async_mode == "async" else None
        self.last_saved_step = -1
        self.save_seconds = 0.0  # time the training loop was blocked by the last save

    # -- paths --------------------------------------------------------------------------------------

    def step_dir(self, step: int) -> Path:
        return self.folder / f"step-{step}"

    def partial_dir(self, step: int) -> Path:
        return self.folder / f"step-{step}{PARTIAL_SUFFIX}"

    # -- load ---------------------------------------------------------------------------------------

    def load(self, step: int = -1) -> int:
        """Load checkpoint `step` (-1: the newest complete one) into the states; returns its step, or 0 when
        there is none. Stale `.partial` directories are removed first (rank 0)."""
        if not self.enable:
            return 0
        if self.rank == 0 and self.folder.is_dir():
            for entry in self.folder.iterdir():
                if entry.name.endswith(PARTIAL_SUFFIX):
                    logger.warning("removing the incomplete checkpoint %s (a save that did not finish)", entry)
                    shutil.rmtree(entry, ignore_errors=True)
        dist.barrier()
        steps = complete_steps(self.folder)
        if step == -1:
            if not steps:
                return 0
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"no complete checkpoint step-{step} in {self.folder} (have {steps})")
        started = time.perf_counter()
        # allow_partial_load: per-rank entries of ranks that did not exist when it was saved are left as they are.
        dcp.load(self.states, checkpoint_id=str(self.step_dir(step)),
                 planner=DefaultLoadPlanner(allow_partial_load=True))
        logger.info("loaded checkpoint %s in %.1f s", self.step_dir(step), time.perf_counter() - started)
        self.last_saved_step = step
        return step

    # -- save ---------------------------------------------------------------------------------------

    def should_save(self, step: int, last_step: bool) -> bool:
        return self.enable and step != self.last_saved_step and (step % self.interval == 0 or last_step)

    def save(self, step: int, last_step: bool = False) -> bool:
        """Save when `step` is due (every `interval`, and the last step); returns whether it saved."""
        if not self.should_save(step, last_step):
            return False
        started = time.perf_counter()
        self.wait()  # one save in flight at a time
        partial = self.partial_dir(step)
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        dist.barrier()
        if self.async_mode == "async" and not last_step:
            future = dcp.async_save(self.states, checkpoint_id=str(partial), process_group=self.async_group)
            self.pending = (step, future)
        else:
            dcp.save(self.states, checkpoint_id=str(partial))
            if self.fault is not None:
                self.fault(step)
            self._complete(step)
        self.last_saved_step = step
        self.save_seconds = time.perf_counter() - started
        return True

    def poll(self) -> None:
        """Complete a finished async save (cheap; the trainer calls it every step).

        No collective is needed: rank 0's future resolves only after DCP's coordinator (rank 0) has gathered
        every rank's write results and written `.metadata`, so when it is done the checkpoint is whole.
        """
        if self.pending is not None and self.pending[1].done():
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight async save is written; rank 0 then marks it complete."""
        if self.pending is None:
            return
        step, future = self.pending
        self.pending = None
        future.result()
        if self.rank == 0:
            self._promote(step)

    def _complete(self, step: int) -> None:
        dist.barrier()  # every rank's part (and rank 0's .metadata) is written
        if self.rank == 0:
            self._promote(step)
        dist.barrier()

    def _promote(self, step: int) -> None:
        """step-N.partial -> step-N (atomic), then drop the checkpoints beyond keep_latest_k. Rank 0 only."""
        final = self.step_dir(step)
        if final.exists():  # the same step saved again (a resumed run)
            shutil.rmtree(final)
        os.replace(self.partial_dir(step), final)
        self._purge()

    def _purge(self) -> None:
        if self.keep_latest_k <= 0:
            return
        for old in complete_steps(self.folder)[:-self.keep_latest_k]:
            shutil.rmtree(self.step_dir(old), ignore_errors=True)

    def close(self) -> None:
        """Finish the in-flight save; collective: when it returns on any rank, rank 0 has promoted that save
        (without the barrier another rank could look for `step-N` before rank 0 renamed it)."""
        self.wait()
        dist.barrier()


def sigkill_self() -> None:
    """Die the way a preempted or crashed process does: no cleanup, no exit handlers."""
    os.kill(os.getpid(), signal.SIGKILL)
