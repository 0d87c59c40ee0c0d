"""Every Triton kernel compiles for A100 (sm_80) and H100 (sm_90) with every autotune config: no GPU needed.

The interpreter that runs the other kernel tests on CPU accepts code the real compiler rejects and knows
nothing of registers or shared memory, so `finevit.kernels.compile_check` compiles each kernel ahead of time
for both targets with the ptxas/cuobjdump shipped inside triton (see its docstring). Its `--quick` scope (one
representative case per op, every kernel × every config × both targets) is what CI runs here; `--all`
(every dtype and head-dim chunk plan) generates docs/compile_report.md.

The check runs in a subprocess: tests/conftest.py sets TRITON_INTERPRET=1 before the kernel modules are
imported, which turns their kernels into interpreted functions that cannot be compiled.
"""

import json
import os
import subprocess
import sys

import pytest
from triton.runtime.autotuner import Autotuner

from finevit.kernels import compile_check

pytestmark = pytest.mark.skipif(not compile_check.tools_available(),
                                reason="needs triton's NVIDIA backend with ptxas and cuobjdump")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_check(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "finevit.kernels.compile_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile_check") / "quick.json"
    done = run_check("--quick", "--json", str(path), timeout=900)
    assert path.exists(), f"the check did not finish:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done, json.loads(path.read_text())


def test_every_kernel_and_autotune_config_compiles_for_sm80_and_sm90_within_limits(quick_results):
    """The autotune lists agree with the compiler: every config the launchers can pick compiles, fits in shared
    memory, does not spill and uses the tensor cores, or its problem is allowed with a reason (ALLOWED)."""
    done, results = quick_results
    failures = [f"{r['kernel']} [{r['case']}] {r['config']} sm_{r['target']}: {r['problems']}"
                for r in results if r["failed"]]
    assert not failures, "\n".join(failures)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {r["target"] for r in results} == {80, 90}


def _kernel_modules():
    return [compile_check._module(name) for name in compile_check.KERNEL_MODULES]


def test_the_quick_check_covers_every_kernel_and_every_autotune_config(quick_results):
    """A kernel or an autotune list that no case reaches would escape the check: the coverage is exact."""
    _, results = quick_results
    kernels = {name for module in _kernel_modules() for name in vars(module) if name.endswith("_kernel")}
    assert {r["kernel"] for r in results} == kernels

    compiled = {(r["kernel"], r["config"], r["target"]) for r in results}
    for module in _kernel_modules():
        for value in vars(module).values():
            for tuner in value.values() if isinstance(value, dict) else [value]:
                if not isinstance(tuner, Autotuner):
                    continue
                for config in tuner.configs:
                    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
                    label = compile_check._config_label(config.kwargs, options)
                    for target in (80, 90):
                        assert (tuner.fn.__name__, label, target) in compiled


def test_a_config_too_large_for_shared_memory_fails_the_check(tmp_path):
    # A 64 x 128 logit tile over 256-wide feature chunks, 5 stages: 4 buffers of (64 + 128) · 256 bf16 = 384 KB.
    broken = "_siglip_rows_loss_kernel:BLOCK_A=64,BLOCK_B=128,BLOCK_D=256,num_warps=8,num_stages=5"
    path = tmp_path / "broken.json"
    done = run_check("--ops", "siglip_loss", "--kernels", "_siglip_rows_loss_kernel", "--targets", "90",
                     "--config", broken, "--json", str(path), timeout=600)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    [result] = json.loads(path.read_text())
    assert result["config"] == "A64 B128 D256 · 8w 5s" and result["failed"]
    assert [kind for kind, _ in result["problems"]] == ["shared-memory"], result["problems"]
    assert "needs 481.0 KB of shared memory per block, sm_90 offers 227 KB" in done.stderr
    assert "no config compiles and fits in shared memory" in done.stderr


@pytest.mark.gpu
def test_registers_and_local_memory_read_from_the_cubin_match_the_driver():
    """On a GPU, the driver's view of each attention kernel (registers; local memory, which Triton reports as
    n_spills = bytes / 4) equals what the check reads from the cubin with cuobjdump."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    target = 10 * major + minor
    case = compile_check.attention_case(torch.bfloat16, 80, 80)  # spills in some configs: both paths seen
    for launch in compile_check.record(case):
        for variant in compile_check.variants(launch):
            result = compile_check.compile_variant(variant, target)
            compiled = compile_check.compile_kernel(variant, target)  # Triton's cache: the same cubin
            compiled._init_handles()  # loads the cubin on the device
            assert (compiled.n_regs, compiled.n_spills) == (result.regs, result.local // 4), result.config
