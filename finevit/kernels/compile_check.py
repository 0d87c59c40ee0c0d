"""Compile every Triton kernel of `finevit.kernels` for A100 (sm_80) and H100 (sm_90), without a GPU.

    python -m finevit.kernels.compile_check [--targets 80,90] [--quick | --all] [--report docs/compile_report.md]
                                            [--triton 3.6.0]

Triton's interpreter, which runs the kernel tests on CPU, accepts code that the real compiler rejects and
says nothing about registers or shared memory. This check compiles each kernel ahead of time as Triton
would on the card, and reads the cubins with the `cuobjdump` shipped inside the triton package:

1. Record. A *case* runs one op's Triton path forward and backward on small CPU tensors while `wrap_triton`
   (through which every launcher starts its kernels) is replaced by a recorder: no kernel runs, and each
   launch's kernel, arguments and constexprs are exactly what the launcher passes on a GPU. The launchers
   stay the one source of truth for signatures, chunk plans, flags and tile options.
2. Compile every recorded launch for every config its launcher can pick (each config of an autotuned
   kernel; the launcher's fixed options otherwise) and each target, with
   `triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", cap, 32),
   options={"num_warps", "num_stages"})`; signature and alignment attributes follow the JIT's
   specialization of the recorded arguments (`_specialize`).
3. Measure, from `cuobjdump -res-usage -sass` of the cubin: registers per thread; local memory per thread
   (ptxas's stack frame, i.e. spilled registers: the kernels have no local arrays); shared memory per block
   (Triton's allocation plus the static part); the matrix instructions of the SASS (HGMMA: wgmma, sm_90;
   HMMA: mma.sync).
4. Judge. A config fails when it does not compile, needs more shared memory than the card offers a block
   (`SHARED_MEMORY_LIMIT`), spills, or has a tensor-core matmul (a `tt.dot` that is not an fp32 "ieee" dot,
   which runs on FMA units by design) without HGMMA on sm_90 / HMMA on sm_80 — unless `ALLOWED` lists it
   with the reason.

`--quick` (CI, tests/kernels/test_compile_check.py) compiles every kernel with every config for both targets
at one representative case per op; `--all` adds every dtype, attention head-dim chunk plan, rotary layout
and launcher flag, and `--report` writes the markdown table (docs/compile_report.md). `--config` compiles a
candidate config instead of a kernel's list, to try it before adding it.

The Triton support matrix. Triton's compiler changes between releases: code that one release compiles, an
older one can reject (triton 3.6 rejected the attention backward that 3.8 compiled, 2026-12-04). `--triton
VERSION` runs the same check under that release: pip installs it once, without dependencies, into a cache
folder (`side_triton`), which goes first on PYTHONPATH for one child process. CI runs `--quick` under
`TRITON_MATRIX` (the oldest supported release, the newest) and under the triton installed with torch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest.mock
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import triton

try:  # the import path of GPUTarget moved between triton releases
    from triton.backends.compiler import GPUTarget
except ImportError:  # pragma: no cover
    from triton.compiler.compiler import GPUTarget

from ._autotune import first_error_line
from ._dispatch import interpreting
from .utils import cu_seqlens_from_lengths

TARGETS = (80, 90)
# Shared memory a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100 163 KB, H100 227 KB.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Modules whose launchers the cases drive: each starts its kernels through its own `wrap_triton` name
# (or `_dispatch.launch`'s).
KERNEL_MODULES = ("attention", "patch_embed", "rope", "siglip_loss", "clip_loss")
# Every module that defines kernels: the ops' own, and the GEMM the two losses share.
KERNEL_SOURCES = (*KERNEL_MODULES, "_pairwise")
# The triton releases CI compiles every kernel with, besides the one installed with torch: the oldest we support
# (the pin of torch 2.10 and 2.11; pyproject.toml says triton>=3.6) and the newest release (2026-12-05).
OLDEST_TRITON, NEWEST_TRITON = "3.6.0", "3.9.0"
TRITON_MATRIX = (OLDEST_TRITON, NEWEST_TRITON)


@dataclass(frozen=True)
class Allowance:
    """Problems kept on purpose, with the reason: where `kernel`, `config`, the case label and the triton version
    match (regular expressions, searched) on `targets`; with `fallback`, only where the launch also has a
    problem-free config, which its autotuner times against this one."""

    problems: tuple[str, ...]  # among "spill", "shared-memory", "mma" (a compile error is never allowed)
    kernel: str
    config: str
    reason: str
    case: str = ""
    targets: tuple[int, ...] = TARGETS
    fallback: bool = False
    triton: str = ""  # e.g. r"^3\.6\." for a problem of one release's compiler

    def covers(self, result: Result, kind: str, launch: LaunchResults) -> bool:
        return bool(kind in self.problems and result.target in self.targets and re.search(self.kernel, result.kernel)
                    and re.search(self.config, result.config) and re.search(self.case, launch.case)
                    and re.search(self.triton, triton.__version__)
                    and (launch.has_clean_config or not self.fallback))


_ATTENTION = r"^_attn_(fwd|bwd_dkdv|bwd_dq)_kernel$"
ALLOWED: tuple[Allowance, ...] = (
    Allowance(
        ("spill",), _ATTENTION,
        r"^(M128 N64 · 8w 3s|M64 N64 · 4w 3s|M128 N32 · 4w 3s|M64 N32 · 4w 2s"  # forward
        r"|N128 M64 · 8w 3s|N64 M64 · 8w 2s|N64 M32 · 8w 2s"  # dK/dV (owned k rows first)
        r"|N128 M32 · 4w 3s|N64 M64 · 4w 3s"  # dK/dV: the fastest on an H100 at d64 (bench/NOTES.md)
        r"|N128 M32 · 8w [23]s|N64 M16 · 8w 2s"  # dK/dV adding dQ (deterministic=False)
        r"|N64 M16 · 4w 2s"  # dK/dV, A100's tile: 8 B on sm_80 with triton 3.6 at d32 + RoPE and d80
        r"|M64 N64 · 8w 2s|M64 N32 · 8w 2s)$",  # dQ (and M128 N64 · 8w 3s above)
        fallback=True,
        reason="an attention tile that spills at some head dims (or only on A100) is kept for the head dims where it "
               "does not: wherever it spills, the same list has a spill-free tile (checked), and the autotuner, "
               "keyed by head dim, rotary layout and sequence-length bucket, keeps the spilling one only if it "
               "measures faster on the card (the 4-warp backward tiles did, by 25%, at d64 on an H100).",
    ),
    Allowance(
        ("shared-memory",), r"^_attn_bwd_(dkdv|dq)_kernel$", r"^(N128 M64|M128 N64) · 8w 3s$", case=r" d128 rope",
        targets=(80,),
        reason="the 128-row backward tiles need 168-209 KB of shared memory on A100 at d128 with RoPE (sm_90 fits "
               "them); there the A100 autotuner skips them (OutOfResources) for the 64-row tiles of the same "
               "list, which fit (checked).",
    ),
    Allowance(
        ("spill",), r"^_attn_bwd_dkdv_kernel$", "", case=r" d128 rope128 atomic-dq$", targets=(80,),
        reason="the dK/dV kernel that adds dQ (deterministic=False) at head dim 128 on A100: every tile spills (24 B "
               "at 64x16 with 8 warps, the least), as mma.sync keeps the extra product's operands in registers; the "
               "deterministic default has spill-free tiles there.",
    ),
    Allowance(
        ("spill", "shared-memory"), _ATTENTION, "", case=r" d256\b",
        reason="head dim 256 (two 128-wide chunks): no tile of the lists keeps q, k and the 256-wide fp32 "
               "accumulators in 255 registers with RoPE, and the larger tiles need more shared memory than the "
               "card (the autotuner skips those: OutOfResources); every launch keeps a tile that fits (checked). "
               "Vision towers use head dims 64-128 (timm ViTs 64-104, SigLIP 64/72, Qwen2-VL 80).",
    ),
    Allowance(
        ("spill", "shared-memory"), _ATTENTION, "", case=r"^fp32 ",
        reason='fp32 attention is the exact path (tests, debugging), not a training one: its "ieee" dots run on FMA '
               "units with fp32 operand fragments in registers, and the lists are tuned for fp16/bf16; every "
               "launch keeps a tile that fits in shared memory (checked).",
    ),
    Allowance(
        ("spill",), r"^_patch_embed_(fwd|dweight)_kernel$",
        r"^(M128 N128 K32 · 4w 5s|D256 K128 R64 · 8w 3s|D128 K64 R64 · 4w 4s|D64 K128 R64 · 4w 4s)$",
        targets=(80,), fallback=True,
        reason="A100 only (spill-free on sm_90, where the lists were tuned; the forward's 128x128x32 tile spills "
               "8 B with triton 3.6 at P 14 only); the A100 autotuner times it against a spill-free tile of the "
               "same list (checked).",
    ),
    Allowance(
        ("spill",), r"^_patch_embed_dweight_kernel$", r"^D256 K128 R64 · 8w 3s$", targets=(90,), triton=r"^3\.6\.",
        fallback=True,
        reason="triton 3.6 on sm_90 only: the 256-row weight-gradient tile spills (656 B per thread, bf16 P14; "
               "0 B with triton 3.7-3.9, where it was tuned); its autotuner times it against the spill-free tiles "
               "of the same list (checked).",
    ),
    Allowance(
        ("spill",), r"^_matmul_kernel$", "", targets=(80,), triton=r"^3\.6\.", fallback=True,
        reason="triton 3.6 on A100 only: 8-24 B per thread (0 B with triton 3.7-3.9, and on sm_90 with every "
               "release); the autotuner times it against the spill-free tile of the same list (checked).",
    ),
    Allowance(
        ("spill",), r"^_siglip_rows_loss_kernel$", r"^A64 B128 D64 · 8w 3s$", targets=(80,), triton=r"^3\.6\.",
        reason="triton 3.6 on A100 only: 8 B per thread (0 B with triton 3.7-3.9, and on sm_90 with every "
               "release). The loss tile is fixed (no autotuning) and chosen for bf16 on sm_90.",
    ),
)

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_POINTER_TYPES = {**_DTYPE_NAMES, torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}
_OPTION_NAMES = ("num_warps", "num_stages")
_DEFAULT_OPTIONS = {"num_warps": 4, "num_stages": 3}  # Triton's defaults for CUDA


# ----------------------------------------------------------------------------------------------------
# Cases: an op's Triton path, forward and backward, on CPU tensors whose values are never read
# ----------------------------------------------------------------------------------------------------


def _module(name: str):
    """A kernel module by name (the package's public functions shadow some module names, e.g. patch_embed)."""
    return importlib.import_module(f".{name}", __package__)


@dataclass(frozen=True)
class Case:
    op: str  # the kernel module whose launchers it runs
    label: str  # dtype, sizes and flags, e.g. "bf16 d80 rope80"
    run: Callable[[], None]


def attention_case(dtype: torch.dtype, head_dim: int, rotary_dim: int = 0, deterministic: bool = True) -> Case:
    """4 heads, a ragged batch of 1, 17, 129 and 256 tokens; rotary on the first `rotary_dim` channels;
    `deterministic=False`: the backward whose dK/dV kernel adds dQ with atomics."""

    def run():
        lengths = [1, 17, 129, 256]
        cu_seqlens = cu_seqlens_from_lengths(lengths)
        q, k, v = (torch.empty(sum(lengths), 4, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
        cos = sin = None
        if rotary_dim:
            cos, sin = (torch.empty(sum(lengths), rotary_dim // 2) for _ in range(2))
        out = _module("attention").varlen_attention(q, k, v, cu_seqlens, max(lengths), cos=cos, sin=sin,
                                                    deterministic=deterministic)
        out.backward(torch.ones_like(out))

    rope = f" rope{rotary_dim}" if rotary_dim else ""
    return Case("attention", f"{_DTYPE_NAMES[dtype]} d{head_dim}{rope}{'' if deterministic else ' atomic-dq'}", run)


def patch_embed_case(dtype: torch.dtype, patch: int, uint8: bool, tf32: bool = False) -> Case:
    """3 channels, P x P patches (K = 3·P·P), D = 768, 4000 patches, with bias. Float patches require grad
    (the dx = dy @ W launch); `tf32`: fp32 weights under torch's "high" matmul precision."""

    def run():
        features = 3 * patch * patch
        weight = torch.empty(768, features, dtype=dtype, requires_grad=True)
        bias = torch.empty(768, dtype=dtype, requires_grad=True)
        if uint8:
            patches, norm = torch.zeros(4000, features, dtype=torch.uint8), {"mean": [0.5] * 3, "std": [0.25] * 3}
        else:
            patches, norm = torch.empty(4000, features, dtype=dtype, requires_grad=True), {}
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        try:
            for strategy in _module("patch_embed").STRATEGIES if uint8 else ("fused",):  # two_pass: the normalize pass
                with unittest.mock.patch.dict(os.environ, {"FINEVIT_PATCH_EMBED": strategy}):
                    out = _module("patch_embed").patch_embed(patches, weight, bias, **norm)
                out.backward(torch.ones_like(out))
        finally:
            torch.set_float32_matmul_precision(precision)

    label = f"{_DTYPE_NAMES[dtype]}{' tf32' if tf32 else ''} P{patch} {'uint8' if uint8 else 'float'} patches"
    return Case("patch_embed", label, run)


def rope_case(dtype: torch.dtype, head_dim: int, rotary_dim: int) -> Case:
    """12 heads, 1000 tokens; forward and the conjugate (backward) rotation."""

    def run():
        x = torch.empty(1000, 12, head_dim, dtype=dtype, requires_grad=True)
        cos, sin = (torch.empty(1000, rotary_dim // 2) for _ in range(2))
        out = _module("rope").apply_rope(x, cos, sin)
        out.backward(torch.ones_like(out))

    return Case("rope", f"{_DTYPE_NAMES[dtype]} d{head_dim} rope{rotary_dim}", run)


def loss_case(op: str, dtype: torch.dtype, dim: int = 768) -> Case:
    """`op` "siglip_loss" or "clip_loss" on 1000 pairs of `dim` features, single process: forward and
    backward, plus the kernels only other paths launch (SigLIP's loss-only forward, CLIP's ring LSE)."""

    def run():
        module = _module(op)
        img, txt = (torch.empty(1000, dim, dtype=dtype, requires_grad=True) for _ in range(2))
        scale = torch.tensor(10.0, requires_grad=True)
        if op == "siglip_loss":
            bias = torch.tensor(-10.0, requires_grad=True)
            loss = module.siglip_loss(img, txt, scale, bias)
            with torch.no_grad():
                module.siglip_loss(img, txt, scale, bias)
        else:
            loss = module.clip_loss(img, txt, scale)
            with torch.no_grad():  # the ring's per-shard LSE (row direction only), as each ring step launches it
                module._ring_lse(None, img, txt, scale)
        loss.backward()

    return Case(op, f"{_DTYPE_NAMES[dtype]} D{dim}", run)


def quick_cases() -> list[Case]:
    """One representative case per op: bf16 (what training runs), attention at head dim 80 with RoPE (two
    rotary chunks, 64 + 16), patch embedding at P = 14 (K = 588) plus fp32 weights (their own tile lists)."""
    bf16 = torch.bfloat16
    return [
        attention_case(bf16, 80, 80),
        attention_case(bf16, 80, 80, deterministic=False),
        patch_embed_case(bf16, 14, uint8=True),
        patch_embed_case(torch.float32, 14, uint8=True),
        rope_case(bf16, 80, 80),
        loss_case("siglip_loss", bf16),
        loss_case("clip_loss", bf16),
    ]


ATTENTION_HEAD_DIMS = (32, 64, 72, 80, 88, 96, 128, 256)  # every distinct chunk plan from 32 to 256
# fp32 attention ("ieee" dots on FMA units, the exact path) compiles several times slower: fewer head dims,
# one and two chunks (d80: 64 + 16), rotary and plain.
ATTENTION_FP32_HEAD_DIMS = (32, 64, 80)
# The non-deterministic backward (dQ added with atomics by the dK/dV kernel): the vision towers' head dims, with
# RoPE (the dK/dV kernel's largest form).
ATOMIC_DQ_HEAD_DIMS = (64, 72, 80, 88, 128)


def all_cases() -> list[Case]:
    """Every dtype the launchers accept × every attention chunk plan (with and without RoPE, and a partial
    rotary dim) × both patch sizes and pixel types × the launchers' flags (reached through the backwards)."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    cases = [attention_case(dtype, d, r) for dtype in dtypes[:2] for d in ATTENTION_HEAD_DIMS for r in (0, d)]
    cases += [attention_case(dtype, 128, 64) for dtype in dtypes[:2]]
    cases += [attention_case(dtype, d, d, deterministic=False) for dtype in dtypes[:2] for d in ATOMIC_DQ_HEAD_DIMS]
    cases += [attention_case(torch.float32, d, r) for d in ATTENTION_FP32_HEAD_DIMS for r in (0, d)]
    cases += [patch_embed_case(dtype, patch, uint8)
              for dtype in dtypes for patch in (14, 16) for uint8 in (True, False)]
    cases += [patch_embed_case(torch.float32, 14, uint8, tf32=True) for uint8 in (True, False)]
    cases += [rope_case(dtype, d, r) for dtype in dtypes for d, r in ((64, 64), (72, 72), (80, 80), (128, 64))]
    cases += [loss_case(op, dtype, dim)
              for op in ("siglip_loss", "clip_loss") for dtype in dtypes for dim in (768, 1152)]
    return cases


# ----------------------------------------------------------------------------------------------------
# Recording launches
# ----------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    kernel: object  # a JITFunction, or an Autotuner over one
    args: tuple
    kwargs: dict
    grid: object = None  # the launcher's grid: a tuple, or a function of the config's constexprs


def record(case: Case) -> list[Launch]:
    """The kernel launches of `case`, in order, with nothing run."""
    if interpreting():
        raise RuntimeError("compile_check needs the compiled kernels: run it without TRITON_INTERPRET=1")
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.kernel, args, kwargs, grid))

    with contextlib.ExitStack() as stack:
        for module in map(_module, (*KERNEL_MODULES, "_dispatch")):
            if hasattr(module, "wrap_triton"):
                stack.enter_context(unittest.mock.patch.object(module, "wrap_triton", Recorder))
        # The public ops take their Triton path whatever the (CPU) device: launches are recorded, not run.
        stack.enter_context(unittest.mock.patch.object(_module("_dispatch"), "use_triton", lambda op, device: True))
        case.run()
    return launches


def _config_label(tiles: dict, options: dict) -> str:
    """e.g. "M128 N64 · 8w 3s" for BLOCK_M=128, BLOCK_N=64, 8 warps, 3 stages."""
    sizes = " ".join(f"{name.removeprefix('BLOCK_')}{value}" for name, value in tiles.items())
    options = {**_DEFAULT_OPTIONS, **options}
    return f"{sizes} · {options['num_warps']}w {options['num_stages']}s"


@dataclass(frozen=True)
class Variant:
    """One compile: a kernel specialized for one launch and config (and compiled per target)."""

    kernel: object  # JITFunction
    signature: dict
    constants: dict  # {(argument index,): value}
    attrs: dict  # {(argument index,): [["tt.divisibility", 16]]}
    options: dict
    config: str  # label
    flags: str  # the launch's boolean constexprs that are set, e.g. "CONJUGATE"
    expects_mma: bool  # has a matmul for tensor cores: not an fp32 "ieee" dot

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def key(self) -> str:
        return repr((self.name, self.signature, self.constants, self.attrs, self.options))


def _specialize(value) -> tuple[str, bool]:
    """(type, divisible by 16) of a runtime argument, as Triton's JIT specializes a launch: pointers aligned
    to 16 bytes and ints divisible by 16 get `tt.divisibility = 16`; an int equal to 1 becomes a constant."""
    if isinstance(value, torch.Tensor):
        return "*" + _POINTER_TYPES[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"no Triton type for a kernel argument of type {type(value).__name__}")


def variants(launch: Launch, overrides: dict[str, list] | None = None) -> list[Variant]:
    """The compiles a launch can lead to: one per autotune config (or `overrides[kernel name]`)."""
    autotuned = hasattr(launch.kernel, "configs")
    kernel = launch.kernel.fn if autotuned else launch.kernel  # an Autotuner wraps the JITFunction
    constexprs = {k: v for k, v in launch.kwargs.items() if k not in _OPTION_NAMES}
    options = {k: v for k, v in launch.kwargs.items() if k in _OPTION_NAMES}
    configs = (overrides or {}).get(kernel.__name__) or (launch.kernel.configs if autotuned else None)
    if configs is None:  # fixed options: the tiles are the launcher's BLOCK_* constexprs
        tiles = {k: v for k, v in constexprs.items() if k.startswith("BLOCK")}
        configs = [triton.Config(tiles, **options)]
    values = dict(zip(kernel.arg_names, launch.args))
    result = []
    for config in configs:
        config_constexprs = {**constexprs, **config.kwargs}
        config_options = {name: getattr(config, name) for name in _OPTION_NAMES if getattr(config, name) is not None}
        signature, constants, attrs = {}, {}, {}
        for index, param in enumerate(kernel.params):
            name = param.name
            if param.is_constexpr:
                signature[name], constants[(index,)] = "constexpr", config_constexprs[name]
                continue
            value = values[name] if name in values else launch.kwargs[name]
            signature[name], divisible = _specialize(value)
            if signature[name] == "constexpr":
                constants[(index,)] = value
            if divisible:
                attrs[(index,)] = [["tt.divisibility", 16]]
        result.append(Variant(
            kernel, signature, constants, attrs, config_options, _config_label(config.kwargs, config_options),
            flags=" ".join(k for k, v in constexprs.items() if v is True),
            expects_mma=config_constexprs.get("DOT_PRECISION") != "ieee",
        ))
    return result


# ----------------------------------------------------------------------------------------------------
# Compiling and reading the cubin
# ----------------------------------------------------------------------------------------------------


@functools.cache
def tool(name: str) -> str:
    """Path of a CUDA tool shipped with triton's NVIDIA backend (ptxas, cuobjdump)."""
    import triton.backends.nvidia

    return os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", name)


def tools_available() -> bool:
    """Whether this triton has the NVIDIA backend with the ptxas and cuobjdump this check needs."""
    try:
        return all(os.access(tool(name), os.X_OK) for name in ("ptxas", "cuobjdump"))
    except ImportError:
        return False


@dataclass
class Result:
    """One kernel × config × target compile and what the cubin says (reported under the first case needing it)."""

    op: str
    case: str
    kernel: str
    config: str
    target: int
    flags: str = ""
    regs: int | None = None
    local: int | None = None  # bytes per thread (spills)
    shared: int | None = None  # bytes per block
    mma: str = ""  # "HGMMA", "HMMA" or "" (none in the SASS)
    mma_count: int = 0
    has_dot: bool = True  # its TTIR has a tt.dot
    expects_mma: bool = True  # ... and that matmul should run on tensor cores
    seconds: float = 0.0
    error: str | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, message), allowed ones included
    allowed: dict[str, Allowance] = field(default_factory=dict)  # kind -> the rule that allows it

    @property
    def failed(self) -> bool:
        return any(kind not in self.allowed for kind, _ in self.problems)


def compile_kernel(variant: Variant, target: int):
    """The CompiledKernel of `variant` for sm_`target` (from Triton's cache when it has it)."""
    from triton.compiler import ASTSource

    with contextlib.redirect_stdout(io.StringIO()):  # a ptxas failure prints the whole PTX
        source = ASTSource(variant.kernel, variant.signature, variant.constants, variant.attrs)
        return triton.compile(source, target=GPUTarget("cuda", target, 32), options=variant.options)


def compile_variant(variant: Variant, target: int, op: str = "", case: str = "") -> Result:
    """Compile `variant` for sm_`target` and measure it (a compile error is recorded, not raised)."""
    result = Result(op, case, variant.name, variant.config, target, variant.flags, expects_mma=variant.expects_mma)
    start = time.perf_counter()
    try:
        compiled = compile_kernel(variant, target)
        usage, sass = _read_cubin(compiled.asm["cubin"])
    except Exception as error:  # noqa: BLE001 - any compiler failure is a finding, reported per config
        result.error = first_error_line(error)  # a CompilationError's message, not its "at 66:12:" source line
    else:
        result.regs, result.local = usage["REG"], usage["STACK"] + usage["LOCAL"]
        result.shared = compiled.metadata.shared + usage["SHARED"]
        counts = {kind: len(re.findall(rf"\b{kind}\.", sass)) for kind in ("HGMMA", "HMMA")}
        result.mma = next((kind for kind, count in counts.items() if count), "")
        result.mma_count = counts.get(result.mma, 0)
        result.has_dot = " tt.dot " in compiled.asm["ttir"]
        result.expects_mma = variant.expects_mma and result.has_dot
    result.seconds = time.perf_counter() - start
    result.problems = _problems(result)
    return result


def _read_cubin(cubin: bytes) -> tuple[dict[str, int], str]:
    """({REG, STACK, SHARED, LOCAL}: the function's resource usage, its SASS) from cuobjdump."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        dump = subprocess.run([tool("cuobjdump"), "-res-usage", "-sass", path],
                              check=True, capture_output=True, text=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", dump)
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, usage.groups()))), dump


def _problems(result: Result) -> list[tuple[str, str]]:
    if result.error is not None:
        return [("compile", f"does not compile: {result.error}")]
    problems = []
    limit = SHARED_MEMORY_LIMIT[result.target]
    if result.shared > limit:
        problems.append(("shared-memory", f"needs {result.shared / 1024:.1f} KB of shared memory per block, "
                                          f"sm_{result.target} offers {limit // 1024} KB"))
    if result.local:
        problems.append(("spill", f"spills: {result.local} B of local memory per thread"))
    wanted = "HGMMA" if result.target >= 90 else "HMMA"
    if result.expects_mma and result.mma != wanted:
        found = f"{result.mma} instead" if result.mma else "no matrix instructions"
        problems.append(("mma", f"tensor-core matmul without {wanted} in the SASS ({found})"))
    return problems


# ----------------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------------


@dataclass
class LaunchResults:
    """Every config of one recorded launch, for one target: the choices its autotuner has there."""

    case: str
    kernel: str
    target: int
    results: list[Result]

    @property
    def launchable(self) -> bool:
        """Some config compiles and fits in shared memory (the autotuner skips the others: OutOfResources)."""
        return any(not any(kind in ("compile", "shared-memory") for kind, _ in r.problems) for r in self.results)

    @property
    def has_clean_config(self) -> bool:
        return any(not r.problems for r in self.results)


def check(cases: list[Case], targets=TARGETS, overrides: dict[str, list] | None = None,
          kernels: set[str] | None = None, log: Callable[[str], None] | None = None) -> list[LaunchResults]:
    """Compile every (case, launch, config, target), each distinct compile once, and judge the problems
    against ALLOWED. `overrides`: {kernel name: [triton.Config]} replacing that kernel's configs;
    `kernels`: only these kernels (by name)."""
    compiled: dict[tuple[str, int], Result] = {}
    launches = []
    for case in cases:
        for launch in record(case):
            launch_variants = [v for v in variants(launch, overrides) if not kernels or v.name in kernels]
            for target in targets:
                results = []
                for variant in launch_variants:
                    if (variant.key, target) not in compiled:
                        compiled[variant.key, target] = compile_variant(variant, target, case.op, case.label)
                        if log:
                            log(_log_line(compiled[variant.key, target]))
                    results.append(compiled[variant.key, target])
                if results:
                    launches.append(LaunchResults(case.label, results[0].kernel, target, results))
    _judge(launches)
    return launches


def _judge(launches: list[LaunchResults]) -> None:
    """Set each result's `allowed` problems: those that every launch it appears in allows."""
    allowed: dict[int, dict[str, str]] = {}
    for launch in launches:
        for r in launch.results:
            here = {kind: rule for kind, _ in r.problems for rule in ALLOWED if rule.covers(r, kind, launch)}
            allowed[id(r)] = {k: v for k, v in here.items() if k in allowed.get(id(r), here)}
            r.allowed = allowed[id(r)]


def results_of(launches: list[LaunchResults]) -> list[Result]:
    """The distinct compiles, in order."""
    return list({id(r): r for launch in launches for r in launch.results}.values())


def failures(launches: list[LaunchResults]) -> list[str]:
    """One line per failing config, and per launch that no config can run."""
    lines = [f"{r.kernel} [{r.case}] {r.config} sm_{r.target}: "
             + "; ".join(m for kind, m in r.problems if kind not in r.allowed)
             for r in results_of(launches) if r.failed]
    lines += [f"{launch.kernel} [{launch.case}] sm_{launch.target}: no config compiles and fits in shared memory"
              for launch in launches if not launch.launchable]
    return lines


def _log_line(r: Result) -> str:
    what = f"{r.kernel} [{r.case}{' ' + r.flags if r.flags else ''}] {r.config} sm_{r.target}"
    if r.error:
        return f"{what}: {r.error}"
    return (f"{what}: {r.regs} regs, {r.local} B local, {r.shared / 1024:.1f} KB smem, "
            f"{r.mma or 'no MMA'}, {r.seconds:.1f} s" + "".join(f"; {m}" for _, m in r.problems))


def _tool_version(name: str) -> str:
    out = subprocess.run([tool(name), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return match.group(2) if match else out.strip().splitlines()[-1]


def report(launches: list[LaunchResults], command: str, seconds: float) -> str:
    """Markdown: summary, allowed problems, where sm_90 has no HGMMA, then kernel × config × target tables."""
    results = results_of(launches)
    failing = failures(launches)
    targets = sorted({r.target for r in results})
    limits = ", ".join(f"sm_{t} {SHARED_MEMORY_LIMIT[t] // 1024} KB" for t in targets)
    lines = [
        "# Compile report: every Triton kernel for A100 (sm_80) and H100 (sm_90)",
        "",
        f"Generated by `{command}` (`finevit/kernels/compile_check.py`; do not edit by hand) on "
        f"{datetime.date.today().isoformat()}, on a machine without a GPU: triton {triton.__version__}, "
        f"ptxas {_tool_version('ptxas')}; {len(results)} compiles, this run {seconds / 60:.0f} min (a compile "
        f"already in Triton's cache is only read back: a cold run takes several times longer).",
        "",
        "Each row is one kernel compiled as its launcher launches it (arguments, constexprs and autotune",
        "configs recorded from the launchers on CPU tensors) for the first case that needs that compile:",
        "regs = registers per thread, local = local memory per thread in bytes (ptxas's stack frame: spilled",
        "registers), smem = shared memory per block in KB (Triton's allocation + static), MMA = matrix",
        "instructions in the SASS and their count (HGMMA = wgmma, HMMA = mma.sync). Limits: shared memory",
        f"{limits}; no spills; tensor-core matmuls on HGMMA (sm_90) / HMMA (sm_80). **Bold**: a problem.",
        "",
        "## Summary",
        "",
        f"- {len(results)} compiles of {len({r.kernel for r in results})} kernels in {len({l.case for l in launches})} "
        f"cases; **{len(failing)} failures**" + (":" if failing else " (`python -m finevit.kernels.compile_check` "
                                                  "exits 0)."),
    ]
    lines += [f"  - {line}" for line in failing]
    for target in targets:
        rows = [r for r in results if r.target == target and r.error is None]
        if rows:
            most = max(rows, key=lambda r: r.regs)
            largest = max(rows, key=lambda r: r.shared)
            spilling = [r for r in rows if r.local]
            lines.append(f"- sm_{target}: {len(spilling)} of {len(rows)} compiles spill; at most "
                         f"{most.regs} registers, {largest.shared / 1024:.1f} KB of shared memory (`{largest.kernel}` "
                         f"{largest.config}, {largest.case}).")
    lines += ["", "## Allowed problems (`ALLOWED` in compile_check.py)", ""]
    for rule in ALLOWED:
        covered = {}
        for r in results:
            if any(allowance is rule for allowance in r.allowed.values()):
                covered.setdefault((r.kernel, r.config, r.target), []).append(r)
        lines.append(f"- **{', '.join(rule.problems)}**" + (" (covers nothing in this run)" if not covered else "")
                     + f": {rule.reason}")
        for (kernel, config, target), rows in covered.items():
            detail = []
            if "spill" in rule.problems and any(r.local for r in rows):
                detail.append(f"up to {max(r.local for r in rows)} B spilled")
            if "shared-memory" in rule.problems and any(r.shared > SHARED_MEMORY_LIMIT[target] for r in rows):
                detail.append(f"up to {max(r.shared for r in rows) / 1024:.1f} KB of shared memory")
            lines.append(f"  - `{kernel}` {config}, sm_{target}: {', '.join(detail)} in {len(rows)} rows "
                         f"({', '.join(r.case for r in rows)})")
    lines += ["", "## Where sm_90 has no HGMMA, and why", ""]
    no_hgmma = {}
    for r in results:
        if r.target == 90 and r.error is None and r.mma != "HGMMA":
            if not r.has_dot:
                why = "no matmul in the kernel"
            elif not r.expects_mma:
                why = 'fp32 "ieee" dots: exact fp32 on FMA units, by design'
            else:
                why = "; ".join(m for kind, m in r.problems if kind == "mma")
            no_hgmma.setdefault((r.kernel, why), []).append(r.case)
    for (kernel, why), cases in no_hgmma.items():
        lines.append(f"- `{kernel}`: {why} ({', '.join(dict.fromkeys(cases))})")
    for op in dict.fromkeys(r.op for r in results):
        lines += ["", f"## {op}", ""]
        header = "| kernel | case | flags | config |" + "".join(
            f" sm_{t} regs | local | smem KB | MMA |" for t in targets)
        lines += [header, "|" + " --- |" * (4 + 4 * len(targets))]
        rows = {}
        for r in results:
            if r.op == op:
                rows.setdefault((r.kernel, r.case, r.flags, r.config), {})[r.target] = r
        for (kernel, case, flags, config), by_target in rows.items():
            lines.append(f"| `{kernel}` | {case} | {flags} | {config} |"
                         + "".join(_cells(by_target.get(t)) for t in targets))
    return "\n".join(lines) + "\n"


def _cells(r: Result | None) -> str:
    if r is None:
        return " | | | |"
    if r.error:
        return " **does not compile** | | | |"

    def mark(kind, text):
        return f"**{text}**" if any(k == kind for k, _ in r.problems) else str(text)

    mma = f"{r.mma} ×{r.mma_count}" if r.mma else "—"
    return (f" {r.regs} | {mark('spill', r.local)} | {mark('shared-memory', f'{r.shared / 1024:.1f}')} "
            f"| {mark('mma', mma)} |")


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def side_triton(version: str) -> str:
    """A folder holding triton `version` alone (no dependencies): first on PYTHONPATH, it replaces the installed
    triton for that process. pip installs it the first time into $FINEVIT_TRITON_CACHE (default
    ~/.cache/finevit/triton) / VERSION; an interrupted install is never taken for a complete one."""
    root = os.environ.get("FINEVIT_TRITON_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "finevit", "triton")
    folder = os.path.join(root, version)
    if not os.path.isfile(os.path.join(folder, "triton", "__init__.py")):
        partial = f"{folder}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        print(f"compile_check: installing triton=={version} into {folder}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                        "--target", partial, f"triton=={version}"], check=True)
        try:
            os.rename(partial, folder)
        except OSError:  # another process installed it meanwhile
            shutil.rmtree(partial, ignore_errors=True)
    return folder


_CHILD = "FINEVIT_COMPILE_CHECK_TRITON"  # set in the child process that `--triton` starts


def _run_under_triton(version: str, argv: list[str]) -> int:
    """This check with `argv`, in a child process that imports triton `version` from `side_triton`."""
    if os.environ.get(_CHILD):
        print(f"compile_check: asked for triton {version}, but {triton.__file__} ({triton.__version__}) was imported "
              f"with {side_triton(version)} first on PYTHONPATH", file=sys.stderr)
        return 2
    env = {**os.environ, _CHILD: version}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [side_triton(version), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", __spec__.name, *argv], env=env).returncode


def _parse_config(text: str) -> tuple[str, triton.Config]:
    """"KERNEL:BLOCK_M=128,BLOCK_N=64,num_warps=8,num_stages=3" -> (kernel name, triton.Config)."""
    kernel, _, assignments = text.partition(":")
    values = {name: int(value) for name, value in (item.split("=") for item in assignments.split(","))}
    options = {name: values.pop(name) for name in _OPTION_NAMES if name in values}
    return kernel, triton.Config(values, **options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finevit.kernels.compile_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--quick", action="store_true", help="one case per op (the default; what CI runs)")
    scope.add_argument("--all", action="store_true", help="every dtype, chunk plan and flag (the report)")
    parser.add_argument("--ops", help=f"only these ops, comma-separated: {', '.join(KERNEL_MODULES)}")
    parser.add_argument("--kernels", help="only these kernels, comma-separated (e.g. _attn_fwd_kernel)")
    parser.add_argument("--config", action="append", default=[], metavar="KERNEL:NAME=VALUE,...",
                        help="compile KERNEL with this config instead of its list (repeatable), e.g. "
                             "_attn_fwd_kernel:BLOCK_M=128,BLOCK_N=128,num_warps=8,num_stages=3")
    parser.add_argument("--report", help="write the markdown report here")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--triton", metavar="VERSION",
                        help="run under this triton release instead of the installed one, e.g. "
                             f"{OLDEST_TRITON} (pip installs it once, without dependencies, into "
                             "~/.cache/finevit/triton/VERSION; FINEVIT_TRITON_CACHE moves that folder)")
    args = parser.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    if args.triton and args.triton != triton.__version__:
        return _run_under_triton(args.triton, given)

    if not tools_available():
        print("compile_check: triton's NVIDIA backend (ptxas, cuobjdump) is not available", file=sys.stderr)
        return 2
    targets = tuple(int(t) for t in args.targets.split(","))
    cases = all_cases() if args.all else quick_cases()
    if args.ops:
        cases = [c for c in cases if c.op in args.ops.split(",")]
    overrides = {}
    for text in args.config:
        kernel, config = _parse_config(text)
        overrides.setdefault(kernel, []).append(config)

    print(f"compile_check: triton {triton.__version__} from {os.path.dirname(triton.__file__)}, "
          f"targets {', '.join(f'sm_{t}' for t in targets)}", flush=True)
    start = time.perf_counter()
    kernels = set(args.kernels.split(",")) if args.kernels else None
    launches = check(cases, targets, overrides, kernels, log=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - start
    failing = failures(launches)
    print(f"compile_check: {len(results_of(launches))} compiles in {seconds:.0f} s, {len(failing)} failures",
          flush=True)
    if args.report:
        if args.json:  # where this run also wrote its JSON is not part of the report's recipe
            given = [a for i, a in enumerate(given) if a != "--json" and (i == 0 or given[i - 1] != "--json")]
        command = "python -m finevit.kernels.compile_check " + " ".join(given)
        os.makedirs(os.path.dirname(args.report) or ".", exist_ok=True)
        with open(args.report, "w") as f:
            f.write(report(launches, command.strip(), seconds))
    if args.json:
        with open(args.json, "w") as f:
            rows = [{**r.__dict__, "allowed": {kind: rule.reason for kind, rule in r.allowed.items()},
                     "failed": r.failed, "triton": triton.__version__} for r in results_of(launches)]
            json.dump(rows, f, indent=1)
    for line in failing:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
