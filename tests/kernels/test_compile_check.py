"""Every Triton kernel compiles for A100 (sm_80) and H100 (sm_90) with every autotune config, under every triton
release we support: no GPU needed.

The interpreter that runs the other kernel tests on CPU accepts code the real compiler rejects and knows
nothing of registers or shared memory, so `finevit.kernels.compile_check` compiles each kernel ahead of time
for both targets with the ptxas/cuobjdump shipped inside triton (see its docstring). Its `--quick` scope (one
representative case per op, every kernel × every config × both targets) is what CI runs here, once per triton
of the support matrix: the installed one and `compile_check.TRITON_MATRIX` (the oldest supported release and
the newest), each installed on the side by `--triton`. `--all` (every dtype and head-dim chunk plan)
generates docs/compile_report.md.

The checks run in subprocesses, side by side: tests/conftest.py sets TRITON_INTERPRET=1 before the kernel
modules are imported, which turns their kernels into interpreted functions that cannot be compiled.
"""

import json
import os
import re
import subprocess
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import pytest
import triton
from triton.runtime.autotuner import Autotuner

from finevit.kernels import compile_check

pytestmark = pytest.mark.skipif(not compile_check.tools_available(),
                                reason="needs triton's NVIDIA backend with ptxas and cuobjdump")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The support matrix: the installed triton, then the releases CI adds (the installed one is not compiled twice).
TRITONS = [triton.__version__] + [v for v in compile_check.TRITON_MATRIX if v != triton.__version__]


def start_check(*args: str, triton_version: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    if triton_version and triton_version != triton.__version__:
        args = (*args, "--triton", triton_version)
    return subprocess.Popen([sys.executable, "-m", "finevit.kernels.compile_check", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_check(*args: str, timeout: float, triton_version: str | None = None) -> subprocess.CompletedProcess:
    return finish(start_check(*args, triton_version=triton_version), timeout)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """{triton version: (the finished check, its JSON rows)} of `--quick`, every version of the matrix at once."""
    folder = tmp_path_factory.mktemp("compile_check")
    running = {v: start_check("--quick", "--json", str(folder / f"{v}.json"), triton_version=v) for v in TRITONS}
    results = {}
    for version, process in running.items():
        done = finish(process, timeout=900)
        path = folder / f"{version}.json"
        assert path.exists(), (f"the check under triton {version} did not finish:\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        results[version] = done, json.loads(path.read_text())
    return results


@pytest.mark.parametrize("version", TRITONS)
def test_every_kernel_and_autotune_config_compiles_for_sm80_and_sm90_within_limits(quick_results, version):
    """The autotune lists agree with the compiler of every supported triton: every config the launchers can pick
    compiles, fits in shared memory, does not spill and uses the tensor cores, or its problem is allowed with a
    reason (ALLOWED)."""
    done, results = quick_results[version]
    assert {r["triton"] for r in results} == {version}  # the side-installed triton was the one imported
    failures = [f"{r['kernel']} [{r['case']}] {r['config']} sm_{r['target']}: {r['problems']}"
                for r in results if r["failed"]]
    assert not failures, f"triton {version}:\n" + "\n".join(failures)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {r["target"] for r in results} == {80, 90}


def test_the_matrix_spans_what_pyproject_and_the_readme_promise():
    """The oldest triton CI compiles with is pyproject's floor, and the README states the tested range."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    [floor] = [re.fullmatch(r"triton>=([\d.]+)", d).group(1) for d in dependencies if d.startswith("triton")]
    oldest = compile_check.OLDEST_TRITON
    assert oldest.startswith(floor + ".") or oldest == floor, (floor, oldest)
    assert min(TRITONS, key=lambda v: tuple(map(int, v.split(".")[:3]))) == oldest
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert f"triton {oldest} to {compile_check.NEWEST_TRITON}" in readme


def _kernel_modules():
    return [compile_check._module(name) for name in compile_check.KERNEL_SOURCES]


def test_the_quick_check_covers_every_kernel_and_every_autotune_config(quick_results):
    """A kernel or an autotune list that no case reaches would escape the check: the coverage is exact."""
    _, results = quick_results[triton.__version__]
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


@pytest.mark.parametrize("version", TRITONS)
def test_a_config_that_does_not_compile_fails_the_check_under_every_triton(tmp_path, version):
    """A deliberately bad candidate (a 48-row tile: tl.arange needs a power of two) fails the check, under each
    triton of the matrix, as a kernel that stops compiling would."""
    bad = "_siglip_rows_loss_kernel:BLOCK_A=48,BLOCK_B=128,BLOCK_D=64,num_warps=8,num_stages=3"
    path = tmp_path / "bad.json"
    done = run_check("--ops", "siglip_loss", "--kernels", "_siglip_rows_loss_kernel", "--targets", "90",
                     "--config", bad, "--json", str(path), timeout=600, triton_version=version)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    [result] = json.loads(path.read_text())
    assert result["triton"] == version and result["config"] == "A48 B128 D64 · 8w 3s" and result["failed"]
    assert [kind for kind, _ in result["problems"]] == ["compile"], result["problems"]
    assert re.search(r"FAILED _siglip_rows_loss_kernel \[bf16 D768\] A48 B128 D64 · 8w 3s sm_90: does not compile",
                     done.stderr), done.stderr[-3000:]
    assert "no config compiles and fits in shared memory" in done.stderr


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


SASS_LOADS = """
import json, re, sys, torch
from finevit.kernels import compile_check as cc
loads = {}
for launch in cc.record(cc.attention_case(torch.bfloat16, int(sys.argv[1]))):
    variant = cc.variants(launch)[0]
    _, sass = cc._read_cubin(cc.compile_kernel(variant, 90).asm["cubin"])
    loads[variant.name] = {"cp.async": len(re.findall(r"\\bLDGSTS", sass)),
                           "2-byte": len(re.findall(r"\\bLDG\\.E\\.U16", sass))}
print(json.dumps(loads))
"""


@pytest.mark.parametrize("head_dim", [72, 88])
def test_head_dims_72_and_88_load_q_k_v_as_vectors_through_cp_async(head_dim):
    """At head dims 72 (SigLIP so400m) and 88 the attention kernels load 16-byte vectors into cp.async rings, as
    at 64 or 128: their strides reach Triton in 16-byte units (ALIGN) and the partial channel chunk keeps
    contiguous addresses. Before, every q/k/v element there was a synchronous 2-byte load (bench/NOTES.md)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", SASS_LOADS, str(head_dim)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    loads = json.loads(done.stdout)
    for kernel in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        assert loads[kernel]["cp.async"] > 0 and loads[kernel]["2-byte"] == 0, (kernel, loads[kernel])


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
