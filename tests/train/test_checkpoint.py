"""Checkpoints: DCP save/load of the sharded model, optimizer and per-rank state; keep-latest-k; incomplete
saves never loaded; async saves isolated from later updates; and, end to end under torchrun, a run whose
ranks are SIGKILLed mid-save and mid-step resumes from the latest complete checkpoint and reproduces the
uninterrupted run's loss trajectory (deterministic mode), its step counter continuing. The uninterrupted
reference run is launched as two torchrun agents rendezvousing over 127.0.0.1 (the multi-node path)."""

import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from finevit.model import FineCLIP
from tests.train.helpers import (
    REPO,
    STAGE1,
    TINY,
    all_train_records,
    finish_group,
    free_port,
    start_group,
    torchrun,
    train_records,
)
from tests.train.test_fsdp_step import make_micro_batches, small_config


class RankState:
    """A per-rank Stateful like the trainer's: a shared value and one under this rank's own key."""

    def __init__(self, rank):
        self.rank, self.shared, self.mine = rank, 0, None

    def state_dict(self):
        return {"shared": self.shared, f"rank{self.rank}": self.mine}

    def load_state_dict(self, state):
        self.shared, self.mine = state["shared"], state[f"rank{self.rank}"]


def _worker(rank, world_size, port, folder):
    sys.path.insert(0, str(REPO))
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from train.checkpoint import CheckpointManager, ModelState, OptimizerState, complete_steps
    from train.parallelize import ContrastiveModel, materialize, parallelize
    from train.stage1 import forward_backward

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        config = small_config("siglip")
        mesh = init_device_mesh("cpu", (world_size,))
        with torch.device("meta"):
            model = parallelize(FineCLIP(config), mesh)
        materialize(model, lambda: ContrastiveModel(FineCLIP(config)), torch.device("cpu"), mesh, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batches = make_micro_batches(config)
        extra = RankState(rank)

        def train_step():
            opt.zero_grad()
            forward_backward(model, [batches[0][rank]], "siglip", dist.group.WORLD)
            opt.step()

        def snapshot():
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            moments = {k: v.full_tensor().clone() for k, v in opt.state[next(iter(model.parameters()))].items()
                       if hasattr(v, "full_tensor")}
            return {k: v.clone() for k, v in full.items()}, moments, extra.shared, extra.mine

        def assert_same(a, b):
            for x, y in zip(a[:2], b[:2]):
                assert x.keys() == y.keys()
                for k in x:
                    assert torch.equal(x[k], y[k]), k
            assert a[2:] == b[2:]

        states = {"model": ModelState(model), "optimizer": OptimizerState(model, opt), "train": extra}
        manager = CheckpointManager(folder, states, interval=2, keep_latest_k=2)
        saved = {}
        for step in range(1, 7):
            train_step()
            extra.shared, extra.mine = step, f"rank {rank} at step {step}"
            if manager.save(step):
                saved[step] = snapshot()
        assert complete_steps(manager.folder) == [4, 6]  # keep-latest-k removed step-2

        # A save that never completed (its process died before the rename) is ignored and removed.
        if rank == 0:
            junk = manager.folder / "step-8.partial"
            junk.mkdir()
            (junk / "__0_0.distcp").write_bytes(b"truncated")
        dist.barrier()
        train_step()
        extra.shared, extra.mine = -1, "changed"
        fresh = CheckpointManager(folder, states, interval=2, keep_latest_k=2)
        assert fresh.load() == 6
        assert not (manager.folder / "step-8.partial").exists()
        assert_same(snapshot(), saved[6])
        assert fresh.load(4) == 4
        assert_same(snapshot(), saved[4])

        # Async: the values at the call are saved, whatever the training does while the write runs.
        async_manager = CheckpointManager(folder, states, interval=2, keep_latest_k=3, async_mode="async")
        before = snapshot()
        assert async_manager.save(8)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        extra.shared = 99
        async_manager.close()
        assert complete_steps(manager.folder) == [4, 6, 8]
        assert async_manager.load() == 8
        assert_same(snapshot(), before)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_dcp_checkpoints_round_trip_keep_latest_k_skip_partial_saves_and_isolate_async_saves(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), tmp_path / "checkpoints"), nprocs=2, join=True)


RUN = [*TINY, "--training.steps=6", "--checkpoint.interval=2", "--checkpoint.keep_latest_k=2",
       "--job.deterministic", "--eval.at_end=false", "--checkpoint.export=false", "--metrics.plot=false"]


@pytest.fixture(scope="module")
def two_node_run(synth_root, tmp_path_factory):
    """The uninterrupted reference run, launched as two torchrun agents (--nnodes=2, one process each) that
    rendezvous over 127.0.0.1 with the c10d backend, as two machines would."""
    run_dir = tmp_path_factory.mktemp("two_nodes") / "run"
    port = free_port()
    launcher = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=finevit-test",
                "--nproc_per_node=1"]
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, str(STAGE1), *RUN,
               f"--data.root={synth_root}", f"--job.run_dir={run_dir}"]
    agents = [start_group(command) for _ in range(2)]
    results = [finish_group(agent, timeout=240) for agent in agents]
    for result in results:
        assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, "".join(result.stdout for result in results)


def test_two_torchrun_agents_rendezvous_over_localhost_as_two_nodes(two_node_run):
    run_dir, stdout = two_node_run
    assert "2 process(es) on cpu (gloo)" in stdout
    assert sorted(train_records(run_dir)) == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-4", "step-6"]


def test_a_run_killed_mid_save_and_mid_step_resumes_and_reproduces_the_uninterrupted_losses(
        synth_root, two_node_run, tmp_path):
    reference_dir, faulty_dir = two_node_run[0], tmp_path / "faulty"
    # Attempt 0: the last rank is SIGKILLed while saving step 4 (after its shard is written, before the save
    # completes). Attempt 1 resumes from step 2 and is SIGKILLed after step 5. Attempt 2 resumes from step 4.
    result = torchrun([*RUN, f"--data.root={synth_root}", f"--job.run_dir={faulty_dir}",
                       "--debug.fault=save:4,step:5"], launcher=["--standalone", "--max-restarts=2"])
    assert "SIGKILL in the middle of saving step 4" in result.stdout
    assert "resumed from step 2" in result.stdout and "resumed from step 4" in result.stdout

    logged = [r["step"] for r in all_train_records(faulty_dir)]
    assert logged == [1, 2, 3, 4, 3, 4, 5, 5, 6]  # the counter continues from each checkpoint, never from 1
    reference, resumed = train_records(reference_dir), train_records(faulty_dir)
    assert sorted(resumed) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    for step in reference:
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-6, abs=1e-7), step
        assert resumed[step]["lr"] == pytest.approx(reference[step]["lr"], rel=1e-9)
    checkpoints = sorted(p.name for p in (faulty_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-4", "step-6"]
