"""Shared pieces of the trainer tests: a small synthetic dataset, tiny model overrides, torchrun launchers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
STAGE1 = REPO / "train" / "stage1.py"
STAGE2 = REPO / "train" / "stage2.py"

# A model and data small enough that a 2-process step takes well under a second on a CPU core.
TINY = [
    "--model.vision.width=64", "--model.vision.depth=1", "--model.vision.num_heads=2", "--model.vision.mlp_dim=128",
    "--model.text.width=64", "--model.text.depth=1", "--model.text.num_heads=2", "--model.text.mlp_dim=128",
    "--model.text.context_length=48",
    "--data.token_budget=128", "--data.max_pixels=4096", "--data.min_pixels=1024", "--data.num_workers=0",
    "--data.shuffle_buffer=16", "--data.pack_buffer=16", "--training.threads=1",
    "--lr_scheduler.warmup_steps=2", "--metrics.log_freq=1", "--metrics.tensorboard=false",
]


@contextlib.contextmanager
def host_reads(code):
    """Records every read of a tensor's value into host memory (item, tolist, float, int, bool, cpu, numpy) that
    the function whose `__code__` is `code` makes itself: on a GPU each one waits for the device."""
    reads: list[str] = []
    names = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def recording(name):
        def method(self, *args, **kwargs):
            if sys._getframe(1).f_code is code:
                reads.append(f"{name} at line {sys._getframe(1).f_lineno}")
            return originals[name](self, *args, **kwargs)
        return method

    for name in names:
        setattr(torch.Tensor, name, recording(name))
    try:
        yield reads
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("TRITON_INTERPRET", None)  # the trainer runs the reference ops on CPU
    env["FINEVIT_KERNELS"] = "reference"
    return env


def torchrun(args: list[str], nproc: int = 2, launcher: list[str] | None = None, timeout: float = 240,
             check: bool = True, script: Path = STAGE1) -> subprocess.CompletedProcess:
    """`torchrun [launcher args] --nproc_per_node=N train/stage1.py ARGS` (or `script`) in a subprocess, output
    captured."""
    launcher = launcher if launcher is not None else ["--standalone"]
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}",
               str(script), *args]
    result = run_group(command, timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def start_group(command: list[str]) -> subprocess.Popen:
    """Start `command` in its own process group (so a timeout can end torchrun's workers too)."""
    return subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish_group(process: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for a process started by start_group; on timeout kill its whole group, then raise."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{stdout[-4000:]}\n{stderr[-8000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_group(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    return finish_group(start_group(command), timeout)


def train_records(run_dir: Path) -> dict[int, dict]:
    """The last "train" record of each step in metrics.jsonl (a resumed run logs steps again)."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            records[record["step"]] = record
    return records


def all_train_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
