"""A config that does not compile is dropped by the autotuner; it does not abort the op (finevit/kernels/_autotune.py).

On CPU the kernels run in Triton's interpreter, which compiles nothing, so the failing candidate is injected at
the compile step: the kernel's `run` (which compiles before it launches; with warmup=True, what the autotuner
calls to compile and load a config without launching it) raises the error triton 3.6 raised on the attention
backward, for the configs chosen to fail. Everything
else is the real autotuner over a real kernel: the surviving config is timed and run, and its output checked.
On a GPU, `test_a_candidate_the_compiler_rejects_is_dropped_on_a_gpu` uses a config the compiler really rejects.
"""

import warnings

import pytest
import torch
import triton
import triton.language as tl

from finevit.kernels import _autotune, attention, compile_check

PASS_MANAGER_FAILURE = "PassManager::run failed"


@triton.jit
def _scale_kernel(X, Y, n, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=mask) * factor, mask=mask)


def _cpu_bench(kernel_call, quantiles):
    """Stands in for the GPU timer: runs the config once, scores it by its BLOCK (any finite time will do)."""
    kernel_call()
    return [1.0, 1.0, 1.0]


def _tuner(blocks, fail_compile=(), fail_launch=()):
    """An autotuner over `_scale_kernel` with one config per BLOCK; configs whose BLOCK is in `fail_compile`
    fail to compile (triton 3.6's error), those in `fail_launch` fail while running (a CUDA fault)."""
    configs = [triton.Config({"BLOCK": block}, num_warps=4, num_stages=2) for block in blocks]
    tuner = _autotune.autotune(configs, key=["n"], do_bench=_cpu_bench)(_scale_kernel)
    launches = []
    real_run = _scale_kernel.run

    def run(*args, grid, warmup, **kwargs):
        if kwargs["BLOCK"] in fail_compile:  # compiling comes first, launched or not
            raise RuntimeError(f"{PASS_MANAGER_FAILURE}\n(the MLIR diagnostic is printed to stderr)")
        if not warmup:
            launches.append(kwargs["BLOCK"])
            if kwargs["BLOCK"] in fail_launch:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_run(*args, grid=grid, warmup=warmup, **kwargs)

    tuner.fn = type("InjectedKernel", (), {"run": staticmethod(run), "__name__": "_scale_kernel",
                                            "arg_names": _scale_kernel.arg_names})()
    return tuner, launches


def _launch(tuner, n=100):
    x = torch.randn(n)
    y = torch.full_like(x, float("nan"))
    tuner[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n, 3.0)
    return x, y


def test_a_config_that_does_not_compile_is_dropped_with_one_warning_and_the_rest_run():
    tuner, launches = _tuner([32, 64], fail_compile={32})
    with pytest.warns(_autotune.ConfigDropped) as caught:
        x, y = _launch(tuner)
    torch.testing.assert_close(y, x * 3.0)  # every element written, by the surviving config
    assert tuner.best_config.kwargs == {"BLOCK": 64}
    assert 32 not in launches and launches[-1] == 64
    [warning] = caught
    message = str(warning.message)
    assert "_scale_kernel" in message and "BLOCK=32, num_warps=4, num_stages=2" in message
    assert f"triton {triton.__version__}" in message
    assert f"RuntimeError: {PASS_MANAGER_FAILURE}" in message and "MLIR" not in message  # the first line only


def test_when_no_config_compiles_the_error_names_the_kernel_the_shapes_and_the_triton_version():
    tuner, launches = _tuner([32, 64], fail_compile={32, 64})
    with warnings.catch_warnings(record=True) as caught, pytest.raises(_autotune.NoConfigCompiles) as raised:
        warnings.simplefilter("always")
        _launch(tuner, n=100)
    message = str(raised.value)
    assert "_scale_kernel" in message and "none of its 2 autotune configs compiles" in message
    assert "X=(100,) float32, Y=(100,) float32" in message and f"triton {triton.__version__}" in message
    assert PASS_MANAGER_FAILURE in message
    assert isinstance(raised.value.__cause__, RuntimeError)  # the compiler's own error, chained
    assert len([w for w in caught if w.category is _autotune.ConfigDropped]) == 2


def test_a_single_config_that_does_not_compile_raises_the_same_named_error():
    tuner, _ = _tuner([64], fail_compile={64})  # one config: Triton does not time it, it launches it
    with pytest.raises(_autotune.NoConfigCompiles, match="_scale_kernel: none of its 1 autotune configs"):
        _launch(tuner)


def test_an_error_while_a_compiled_kernel_runs_is_not_swallowed():
    """Only compiling and loading are guarded: a fault while running propagates unchanged, while tuning or after."""
    tuner, _ = _tuner([32, 64], fail_launch={32})
    with pytest.raises(RuntimeError, match="illegal memory access") as raised:
        _launch(tuner)  # raised while timing config 32
    assert type(raised.value) is RuntimeError

    tuner, _ = _tuner([64], fail_launch={64})
    with pytest.raises(RuntimeError, match="illegal memory access") as raised:
        _launch(tuner)  # raised by the chosen (only) config
    assert type(raised.value) is RuntimeError


def test_every_autotuned_kernel_of_the_package_uses_this_autotuner():
    tuners = [value for name in compile_check.KERNEL_SOURCES
              for value in vars(compile_check._module(name)).values()
              for value in (value.values() if isinstance(value, dict) else [value])
              if isinstance(value, triton.runtime.autotuner.Autotuner)]
    assert attention._attn_bwd_dkdv_tuned in tuners and len(tuners) >= 5
    assert all(isinstance(tuner, _autotune.Autotuner) for tuner in tuners), tuners


@triton.jit
def _arange_kernel(Y, BLOCK: tl.constexpr):
    tl.store(Y + tl.arange(0, BLOCK), tl.arange(0, BLOCK).to(tl.float32))


@pytest.mark.gpu
def test_a_candidate_the_compiler_rejects_is_dropped_on_a_gpu():
    """tl.arange needs a power of two: BLOCK=48 is a real compile error, which stock triton would re-raise."""
    configs = [triton.Config({"BLOCK": 48}), triton.Config({"BLOCK": 64})]
    tuner = _autotune.autotune(configs, key=[])(_arange_kernel)
    y = torch.full((64,), float("nan"), device="cuda")
    with pytest.warns(_autotune.ConfigDropped, match="BLOCK=48"):
        tuner[(1,)](y)
    torch.testing.assert_close(y, torch.arange(64, device="cuda", dtype=torch.float32))

    only_bad = _autotune.autotune([configs[0]], key=[])(_arange_kernel)
    with pytest.raises(_autotune.NoConfigCompiles, match="_arange_kernel.*Y=\\(64,\\) float32"):
        only_bad[(1,)](y)
