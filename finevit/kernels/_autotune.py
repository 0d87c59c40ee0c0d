"""Triton's autotuner, unable to abort an op that has a working candidate.

Triton's `Autotuner` times every config of a kernel the first time it meets a tuning key and keeps the
fastest. It skips a config that runs out of shared memory, but a config that fails to compile raises out
of the tuning loop and takes the op down with it, even when the other configs compile. (On 2026-12-04,
triton 3.6 rejected the attention backward with "PassManager::run failed". That is a `RuntimeError`, and
triton 3.6-3.9 only catch `OutOfResources`, `CompileTimeAssertionFailure` and `PTXASError`.)

Here each config is first compiled and loaded, without being launched. If that fails, the config is
dropped with one warning (`ConfigDropped`) that names the kernel, the config, the triton version and the
compiler's first error line, and the op runs with the fastest of the rest. If no config compiles,
`NoConfigCompiles` names the kernel, the argument shapes and the triton version. Only compiling and
loading are guarded: an error raised while a compiled kernel runs (a CUDA fault, say) propagates unchanged.

Under `torch.compile`, Inductor autotunes user kernels itself from `configs`, and this class is not used.
The kernels compile on every supported triton (`python -m finevit.kernels.compile_check --triton ...`),
so the guard is for the versions and cards that check does not cover.
"""

from __future__ import annotations

import warnings

import triton
from triton.runtime.autotuner import Autotuner as _TritonAutotuner
from triton.runtime.errors import OutOfResources


class ConfigDropped(UserWarning):
    """An autotune config was left out because it does not compile or does not fit on this GPU."""


class NoConfigCompiles(RuntimeError):
    """No autotune config of a kernel compiles for these arguments on this GPU with this triton."""


def first_error_line(error: BaseException) -> str:
    """'Type: first non-empty line of the compiler's message' (a CompilationError's own message starts
    with the source excerpt, so its error text or cause is used instead)."""
    text = getattr(error, "error_message", None) or (str(error.__cause__) if error.__cause__ else "") or str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else '(no message)'}"


def describe_config(config: triton.Config) -> str:
    """e.g. 'BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3'."""
    items = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return ", ".join(f"{name}={value}" for name, value in items.items())


class Autotuner(_TritonAutotuner):
    """`triton.runtime.autotuner.Autotuner` that drops configs which do not compile (see the module doc)."""

    def _bench(self, *args, config, **meta):
        error = self.compile_error(args, meta, config)
        if error is not None:
            warnings.warn(
                f"{self.fn.__name__}: autotune config ({describe_config(config)}) dropped, it does not compile "
                f"or load with triton {triton.__version__}: {first_error_line(error)}",
                ConfigDropped, stacklevel=2,
            )
            return [float("inf")] * 3  # the autotuner's score for a config that cannot run
        return super()._bench(*args, config=config, **meta)

    def compile_error(self, args: tuple, launch_kwargs: dict, config: triton.Config) -> Exception | None:
        """Compile `config`'s kernel for these arguments and load it on the device, without launching it:
        None when that works, else the error. (`launch_kwargs`: the launch's keywords, grid included.)"""
        try:
            kernel = self.fn.run(*args, **{**launch_kwargs, **config.all_kwargs(), "warmup": True})
            if hasattr(kernel, "result"):  # a compile started asynchronously
                kernel = kernel.result()
        except Exception as error:  # noqa: BLE001 - nothing runs on the device here: every error is the compiler's
            return error
        try:
            if kernel is not None:  # None under the interpreter, which compiles nothing
                kernel._init_handles()  # loads the cubin: OutOfResources when it needs more than the card has
        except OutOfResources as error:
            return error
        return None

    def run(self, *args, **kwargs):
        self.best_config = None  # set by the base class once a config is chosen, before it is launched
        try:
            return super().run(*args, **kwargs)
        except Exception as error:
            # Failed while launching the chosen config. If that config does not compile, it was chosen because
            # every config scored +inf (or it is the only one): none compiles.
            chosen = self.best_config
            compile_error = chosen and self.compile_error(args, kwargs, chosen)
            if not compile_error:
                raise
            shapes = ", ".join(f"{name}={tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
                               for name, value in zip(self.arg_names, args) if hasattr(value, "shape"))
            raise NoConfigCompiles(
                f"{self.fn.__name__}: none of its {len(self.configs)} autotune configs compiles with triton "
                f"{triton.__version__} for {shapes}; the chosen one ({describe_config(chosen)}) fails with "
                f"{first_error_line(compile_error)}"
            ) from error


def autotune(configs: list[triton.Config], key: list[str], restore_value: list[str] | None = None, **options):
    """Decorator like `triton.autotune(configs, key, ...)` that builds the `Autotuner` above. `restore_value`
    names the arguments a kernel adds into (read-modify-write): they are saved before and restored after each
    timed run of a candidate, or tuning would add the result into them once per run."""

    def decorator(fn):
        return Autotuner(fn, fn.arg_names, configs, key, reset_to_zero=None, restore_value=restore_value, **options)

    return decorator


def configs(names: list[str], shapes: list[tuple[int, ...]]) -> list[triton.Config]:
    """Candidates from (tile sizes named by `names`..., num_warps, num_stages) tuples."""
    return [triton.Config(dict(zip(names, tiles)), num_warps=w, num_stages=s) for *tiles, w, s in shapes]
