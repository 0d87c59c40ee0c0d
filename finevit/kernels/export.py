"""Ahead-of-time export of the forward kernels to C: cubins for sm_80 / sm_90 and the table that picks them.

    python -m finevit.kernels.export --out build/aot [--targets 80,90] [--head-dims 64,72,80,96,128]
                                     [--dtypes fp16,bf16] [--patch-sizes 14,16] [--quick]

The C library `libfinevit_kernels` (top-level `kernels/`, built by the top-level CMakeLists.txt, which runs
this command) launches these cubins through the CUDA driver API, without Python. What is exported:

- `_attn_fwd_kernel` (varlen attention forward, `attention.py`): per head dim, dtype and target, with the
  launcher's channel-chunk plan for q, k already rotated (the C function "attention with RoPE" rotates q, k
  with the RoPE kernel into its workspace first, exactly as `attention_fwd` does);
- `_rope_kernel` (`rope.py`): the forward rotation with rotary_dim = head_dim;
- `_patch_embed_fwd_kernel` (`patch_embed.py`): uint8 patches normalized in the kernel, P = 14 and 16
  (any channel count), with and without bias;
- `_cu_blocks_kernel` (`attention.py`): the attention's (sequence, block) work list, built on the device.

How: each kernel's launch is recorded from its Python launcher on CPU tensors with `compile_check.record`
(nothing runs), so the constexprs (chunk plans, flags, ALIGN, tiles) are exactly what the launcher passes on
a GPU. The launch is then compiled with Triton's compiler for `GPUTarget("cuda", 80|90, 32)` -- the same
`triton.compile(ASTSource(...))` call `triton.tools.compile` makes -- and the cubin is embedded in C.
We do not use the `triton.tools.compile` command line and its C template, nor `triton.tools.link`: its
signature strings cannot express string or boolean constexprs (`DOT_PRECISION="tf32"`, `CONJUGATE=False`), its
template calls `exit()` on any CUDA error, loads the module once for device 0 whatever the context, and calls
`cu*` functions that a library loading the driver at run time does not have; and `link.py` dispatches only on
the divisibility of arguments, while we dispatch on kernel, head dim, dtype and compute capability. So the
generated C here is data only (cubins and a table); the launch logic is hand-written in
`kernels/src/finevit_kernels.c`.

Specializations (AOT has no autotuner and no JIT specialization):
- One config per (kernel, head dim or patch size, dtype, target): the first config of the kernel's autotune
  list (ordered by measured speed, see the launchers) that compiles without spilling, fits in the card's
  shared memory and uses the tensor cores (`compile_check.compile_variant` judges it); the rope and work-list
  kernels have one fixed tile. The RoPE tile is the launcher's for 16 heads (any head count works: heads are
  masked).
- Attention and RoPE come in two variants: "aligned" (every data pointer 16-byte aligned, strides passed in
  units of 16 bytes: ALIGN = 8 fp16/bf16 elements, and TABLE_ALIGN = 4 for RoPE's float32 cos/sin rows; what the
  JIT launchers pass for every dense layout of a head dim that is a multiple of 8, 72 included) and "generic"
  (ALIGN = TABLE_ALIGN = 1, no pointer alignment assumed: views with odd offsets or strides); the C dispatcher
  picks by the actual pointers and strides and divides the strides by the entry's ALIGN. Patch embedding
  requires 16-byte aligned pointers and gets its alignment from its own ALIGN constexpr (P = 14: 4, P = 16: 16,
  the values the launcher computes for 3 channels and widths that are multiples of 16); the C function returns
  FINEVIT_ERROR_UNSUPPORTED when sizes do not allow it.
- Integer arguments are int32 and never specialized to constants (the JIT turns a 1 into a constexpr).

Output (`--out`): `finevit_aot_sm<cap>.c` per target (the cubins as string literals), `finevit_aot_table.c`
(the table, `kernels/src/aot_table.h` declares its type) and `manifest.json` (every entry, its config,
registers, spills, shared memory, and the triton version).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import torch
import triton

from . import compile_check
from .compile_check import Variant, _module

TARGETS = (80, 90)
HEAD_DIMS = (64, 72, 80, 96, 128)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PATCH_SIZES = (14, 16)
QUICK = {"head_dims": (64,), "dtypes": ("fp16",), "patch_sizes": (16,)}

# finevit_dtype and the kernel ids of kernels/include/finevit_kernels.h and kernels/src/aot_table.h.
C_DTYPES = {"fp16": 0, "bf16": 1}
KERNEL_IDS = {"_cu_blocks_kernel": 0, "_rope_kernel": 1, "_attn_fwd_kernel": 2, "_patch_embed_fwd_kernel": 3}

# The runtime parameters of each exported kernel in order, with their type ("*" pointer, "i32", "fp32"): the
# C runtime passes exactly these. The export fails when a kernel's signature no longer matches.
_STRIDES_ATTN = ("stride_q_tok", "stride_q_head", "stride_k_tok", "stride_k_head", "stride_v_tok",
                 "stride_v_head", "stride_o_tok", "stride_o_head")
_STRIDES_ROPE = ("stride_x_tok", "stride_x_head", "stride_out_tok", "stride_out_head", "stride_cos_tok",
                 "stride_sin_tok")
PARAMS = {
    "_cu_blocks_kernel": (("CU_SEQLENS", "*"), ("CU_BLOCKS", "*"), ("num_seqs", "i32")),
    "_rope_kernel": (("X", "*"), ("COS", "*"), ("SIN", "*"), ("OUT", "*"), ("num_tokens", "i32"),
                     ("num_heads", "i32"), *((name, "i32") for name in _STRIDES_ROPE)),
    "_attn_fwd_kernel": (("Q", "*"), ("K", "*"), ("V", "*"), ("O", "*"), ("LSE", "*"), ("CU_SEQLENS", "*"),
                         ("CU_BLOCKS", "*"), ("num_seqs", "i32"), ("num_heads", "i32"), ("total_tokens", "i32"),
                         *((name, "i32") for name in _STRIDES_ATTN), ("qk_scale", "fp32"), ("head_dim", "i32"),
                         ("max_seqlen_bucket", "i32")),
    "_patch_embed_fwd_kernel": (("X", "*"), ("W", "*"), ("BIAS", "*"), ("NORM", "*"), ("Y", "*"), ("rows", "i32"),
                                ("out_features", "i32"), ("in_features", "i32"), ("stride_x_row", "i32"),
                                ("stride_w", "i32"), ("stride_y_row", "i32"), ("rows_bucket", "i32")),
}
# The stride units of the "aligned" variants, 16 bytes (kernels/src/finevit_kernels.c assumes them): ALIGN in
# fp16/bf16 elements, TABLE_ALIGN in float32 elements. Generic variants take both as 1.
ALIGNED_UNITS = {"ALIGN": 8, "TABLE_ALIGN": 4}
# Tile constexprs the C runtime needs for the grid, per kernel (at most 3, in this order).
GRID_TILES = {"_cu_blocks_kernel": ("BLOCK_S",), "_rope_kernel": ("BLOCK_T", "BLOCK_H"),
              "_attn_fwd_kernel": ("BLOCK_M",), "_patch_embed_fwd_kernel": ("BLOCK_M", "BLOCK_N")}


@dataclass
class Entry:
    """One exported cubin and what the C runtime needs to launch it."""

    kernel: str  # Triton kernel name
    target: int  # 80 or 90
    dtype: str  # "fp16", "bf16", or "" (dtype independent)
    dim: int  # head dim (attention, rope), patch size (patch_embed), 0
    aligned: bool  # pointers 16-byte aligned (and, for attention and RoPE, strides in ALIGNED_UNITS)
    has_bias: bool  # patch_embed: HAS_BIAS
    align: int  # the kernel's ALIGN: the unit of the strides (and of patch_embed's feature counts) it takes
    tiles: tuple[int, ...]  # GRID_TILES values
    num_warps: int
    shared: int  # dynamic shared memory in bytes
    num_scratch: int  # trailing pointer parameters Triton adds (global / profile scratch), passed as NULL
    config: str
    regs: int
    spill: int  # local memory per thread in bytes
    cubin: bytes

    @property
    def symbol(self) -> str:
        tag = f"{self.kernel.strip('_')}_{self.dtype or 'any'}_d{self.dim}"
        tag += "_aligned" if self.aligned else "_generic"
        tag += "_bias" if self.has_bias else ""
        return f"finevit_aot_cubin_{tag}_sm{self.target}"


# ----------------------------------------------------------------------------------------------------
# Recording the launchers' forward launches
# ----------------------------------------------------------------------------------------------------


def _record_attention(head_dim: int, dtype: torch.dtype) -> tuple[compile_check.Launch, ...]:
    """(the RoPE launch on q, the work-list launch, the attention forward launch) of `varlen_attention` with
    full-width RoPE."""
    lengths = [1, 17, 129, 256]
    cu_seqlens = compile_check.cu_seqlens_from_lengths(lengths)
    q, k, v = (torch.empty(sum(lengths), 4, head_dim, dtype=dtype) for _ in range(3))
    cos, sin = (torch.empty(sum(lengths), head_dim // 2) for _ in range(2))

    def run():
        _module("attention").varlen_attention(q, k, v, cu_seqlens, max(lengths), cos=cos, sin=sin)

    launches = compile_check.record(compile_check.Case("attention", f"d{head_dim}", run))
    names = [_jit(launch.kernel).__name__ for launch in launches]
    assert names == ["_rope_kernel", "_rope_kernel", "_cu_blocks_kernel", "_attn_fwd_kernel"], names
    return launches[0], launches[2], launches[3]


def _record_patch_embed(patch: int, dtype: torch.dtype, has_bias: bool) -> compile_check.Launch:
    """The forward launch of `patch_embed` on uint8 patches of 3 channels, width 768."""
    features = 3 * patch * patch
    patches = torch.zeros(4000, features, dtype=torch.uint8)
    weight = torch.empty(768, features, dtype=dtype)
    bias = torch.empty(768, dtype=dtype) if has_bias else None

    def run():
        _module("patch_embed").patch_embed(patches, weight, bias, mean=[0.5] * 3, std=[0.5] * 3)

    (launch,) = compile_check.record(compile_check.Case("patch_embed", f"P{patch}", run))
    return launch


def _jit(kernel):
    return kernel.fn if hasattr(kernel, "configs") else kernel  # an Autotuner wraps the JITFunction


# ----------------------------------------------------------------------------------------------------
# Specializing and compiling
# ----------------------------------------------------------------------------------------------------


def _variant(kernel, values: dict, constexprs: dict, config: triton.Config | None, aligned: bool) -> Variant:
    """The AOT specialization of `kernel`: int32 ints never turned into constants; with `aligned`, every
    pointer carries Triton's divisibility-by-16 hint, else every *ALIGN constexpr is 1."""
    name = kernel.__name__
    expected = PARAMS[name]
    runtime = [(p.name, p) for p in kernel.params if not p.is_constexpr]
    if [n for n, _ in runtime] != [n for n, _ in expected]:
        raise RuntimeError(f"{name}'s runtime parameters changed: expected {[n for n, _ in expected]}, got "
                           f"{[n for n, _ in runtime]}; update export.PARAMS and kernels/src/finevit_kernels.c")
    kinds = dict(expected)
    tiles = dict(config.kwargs) if config else {}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages} if config else {
        k: constexprs[k] for k in ("num_warps", "num_stages") if k in constexprs}
    all_constexprs = {**{k: v for k, v in constexprs.items() if k not in ("num_warps", "num_stages")}, **tiles}
    if not aligned:
        all_constexprs.update({k: 1 for k in all_constexprs if k.endswith("ALIGN")})
    signature, constants, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        if param.is_constexpr:
            signature[param.name], constants[(index,)] = "constexpr", all_constexprs[param.name]
            continue
        kind = kinds[param.name]
        if kind == "*":
            signature[param.name] = "*" + compile_check._POINTER_TYPES[values[param.name].dtype]
        else:
            signature[param.name] = kind
        if aligned and kind == "*":
            attrs[(index,)] = [["tt.divisibility", 16]]
    label = compile_check._config_label(tiles or {k: v for k, v in all_constexprs.items() if k.startswith("BLOCK")},
                                        options)
    return Variant(kernel, signature, constants, attrs, options, label, flags="",
                   expects_mma=all_constexprs.get("DOT_PRECISION", "ieee") != "ieee")


def _entry(variants: list[Variant], target: int, dtype: str, dim: int, aligned: bool, has_bias: bool = False,
           log=print) -> Entry:
    """Compile the candidates in order and export the first without problems (else the first that compiles
    and fits in shared memory, with its problem logged)."""
    chosen = None
    for variant in variants:
        result = compile_check.compile_variant(variant, target)
        if result.error is None and not result.problems:
            chosen = variant, result
            break
        log(f"  skipped {variant.name} {variant.config} sm_{target}: "
            + "; ".join(m for _, m in result.problems))
        if chosen is None and not any(kind in ("compile", "shared-memory") for kind, _ in result.problems):
            chosen = variant, result
    if chosen is None:
        raise RuntimeError(f"no config of {variants[0].name} compiles and fits for sm_{target} ({dtype} d{dim})")
    variant, result = chosen
    compiled = compile_check.compile_kernel(variant, target)  # from Triton's cache
    metadata = compiled.metadata
    for field in ("global_scratch_size", "profile_scratch_size", "tmem_size"):
        if getattr(metadata, field, 0):
            raise RuntimeError(f"{variant.name} needs {field}={getattr(metadata, field)}: "
                               f"not supported by the C runtime")
    if getattr(metadata, "num_ctas", 1) != 1 or getattr(metadata, "launch_cooperative_grid", False) \
            or getattr(metadata, "launch_pdl", False):
        raise RuntimeError(f"{variant.name}: clusters, cooperative and PDL launches are not supported")
    entry_params = re.search(r"\.entry\s+" + re.escape(metadata.name) + r"\s*\(([^)]*)\)", compiled.asm["ptx"])
    num_params = entry_params.group(1).count(".param")
    num_scratch = num_params - len(PARAMS[variant.name])
    if num_scratch < 0:
        raise RuntimeError(f"{variant.name}: the PTX entry has {num_params} parameters, fewer than its signature")
    tiles = tuple(variant.constants[(index,)] for index, p in enumerate(variant.kernel.params)
                  if p.name in GRID_TILES[variant.name])
    log(f"  {variant.name} {dtype or 'any'} d{dim} {'aligned' if aligned else 'generic'}"
        f"{' bias' if has_bias else ''} sm_{target}: {variant.config}, {result.regs} regs, {result.local} B spilled, "
        f"{metadata.shared / 1024:.1f} KB smem, {result.mma or 'no MMA'}")
    align = next((variant.constants[(i,)] for i, p in enumerate(variant.kernel.params) if p.name == "ALIGN"), 1)
    return Entry(variant.name, target, dtype, dim, aligned, has_bias, align, tiles, metadata.num_warps,
                 metadata.shared, num_scratch, variant.config, result.regs, result.local, compiled.asm["cubin"])


def export_entries(targets=TARGETS, head_dims=HEAD_DIMS, dtypes=tuple(DTYPES), patch_sizes=PATCH_SIZES,
                   log=print) -> list[Entry]:
    """Every exported specialization, compiled (see the module docstring)."""
    entries = []
    _, blocks_launch, _ = _record_attention(head_dims[0], DTYPES[dtypes[0]])  # the same for every head dim, dtype
    blocks = _jit(blocks_launch.kernel)
    blocks_values = dict(zip(blocks.arg_names, blocks_launch.args))
    for target in targets:
        variant = _variant(blocks, blocks_values, blocks_launch.kwargs, None, aligned=False)
        entries.append(_entry([variant], target, "", 0, aligned=False, log=log))
    for dtype in dtypes:
        for head_dim in head_dims:
            rope_launch, _, attn_launch = _record_attention(head_dim, DTYPES[dtype])
            rope = _jit(rope_launch.kernel)
            rope_values = dict(zip(rope.arg_names, rope_launch.args))
            rope_constexprs = {**rope_launch.kwargs, **_module("rope")._block_sizes(16, head_dim, head_dim // 2)}
            attn = _jit(attn_launch.kernel)
            attn_values = dict(zip(attn.arg_names, attn_launch.args))
            for name, kwargs in (("rope", rope_launch.kwargs), ("attention", attn_launch.kwargs)):
                units = {k: kwargs[k] for k in ALIGNED_UNITS if k in kwargs}
                if units != {k: ALIGNED_UNITS[k] for k in units}:
                    raise RuntimeError(f"the {name} launcher passed {units} for a dense {dtype} d{head_dim} layout; "
                                       f"the C runtime's aligned variants assume {ALIGNED_UNITS}")
            for target in targets:
                for aligned in (True, False):
                    variant = _variant(rope, rope_values, rope_constexprs, None, aligned)
                    entries.append(_entry([variant], target, dtype, head_dim, aligned, log=log))
                    candidates = [_variant(attn, attn_values, attn_launch.kwargs, config, aligned)
                                  for config in attn_launch.kernel.configs]
                    entries.append(_entry(candidates, target, dtype, head_dim, aligned, log=log))
        for patch in patch_sizes:
            for has_bias in (False, True):
                launch = _record_patch_embed(patch, DTYPES[dtype], has_bias)
                kernel = _jit(launch.kernel)
                values = dict(zip(kernel.arg_names, launch.args))
                for target in targets:
                    candidates = [_variant(kernel, values, launch.kwargs, config, aligned=True)
                                  for config in launch.kernel.configs]
                    entries.append(_entry(candidates, target, dtype, patch, True, has_bias, log=log))
    return entries


# ----------------------------------------------------------------------------------------------------
# Writing the C sources
# ----------------------------------------------------------------------------------------------------

_HEADER = "/* Generated by `python -m finevit.kernels.export` (triton {version}): do not edit. */\n"


def _string_literal(data: bytes, width: int = 32) -> str:
    """`data` as concatenated C string literals of \\xHH escapes (each escape ends at the next backslash or
    quote, so no escape swallows a following character); compiles much faster than a brace list."""
    lines = []
    for start in range(0, len(data), width):
        lines.append('    "' + "".join(f"\\x{b:02x}" for b in data[start:start + width]) + '"')
    return "\n".join(lines) if lines else '    ""'


def write_sources(entries: list[Entry], out: str, targets) -> list[str]:
    """Write finevit_aot_sm<cap>.c per target, finevit_aot_table.c and manifest.json into `out`."""
    os.makedirs(out, exist_ok=True)
    header = _HEADER.format(version=triton.__version__)
    written = []
    for target in targets:
        parts = [header, f"/* Cubins for sm_{target}: see manifest.json for each one's config. */\n"]
        for e in entries:
            if e.target == target:
                parts.append(f"/* {e.kernel} {e.dtype or 'any'} d{e.dim} {e.config}, {len(e.cubin)} bytes */\n"
                             f"const unsigned char {e.symbol}[{len(e.cubin) + 1}] =\n{_string_literal(e.cubin)};\n")
        written.append(_write(os.path.join(out, f"finevit_aot_sm{target}.c"), "\n".join(parts)))
    rows = []
    for e in entries:
        dtype = C_DTYPES[e.dtype] if e.dtype else -1
        tiles = ", ".join(str(t) for t in (list(e.tiles) + [0, 0, 0])[:3])
        rows.append(f"    {{{KERNEL_IDS[e.kernel]}, {e.target}, {dtype}, {e.dim}, {int(e.aligned)}, {int(e.has_bias)}, "
                    f"{e.align}, {{{tiles}}}, {e.num_warps}, {e.shared}, {len(PARAMS[e.kernel])}, {e.num_scratch}, "
                    f'"{e.kernel}", {e.symbol}, {len(e.cubin)}, "{e.config.replace("·", "/")}"}},')
    table = [header, '#include "aot_table.h"\n']
    table += [f"extern const unsigned char {e.symbol}[];" for e in entries]
    table += ["", f'const char finevit_aot_triton_version[] = "{triton.__version__}";',
              f"const int finevit_aot_num_entries = {len(entries)};",
              "const finevit_aot_entry finevit_aot_entries[] = {", *rows, "};", ""]
    written.append(_write(os.path.join(out, "finevit_aot_table.c"), "\n".join(table)))
    manifest = {
        "triton": triton.__version__, "torch": torch.__version__, "targets": list(targets),
        "entries": [{k: v for k, v in e.__dict__.items() if k != "cubin"} | {"symbol": e.symbol, "bytes": len(e.cubin)}
                    for e in entries],
    }
    written.append(_write(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=1) + "\n"))
    return written


def _write(path: str, text: str) -> str:
    """Write `text` atomically (always: the build compares the outputs' times with the exporter's inputs)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.replace(";", ",").split(",") if t.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finevit.kernels.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the generated C sources and manifest.json")
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma- or ;-separated (80,90)")
    parser.add_argument("--head-dims", help=f"attention and RoPE head dims (default {','.join(map(str, HEAD_DIMS))})")
    parser.add_argument("--dtypes", help="fp16, bf16 or both (default fp16,bf16)")
    parser.add_argument("--patch-sizes", help="patch embedding patch sizes, 14 and/or 16 (default 14,16)")
    parser.add_argument("--quick", action="store_true",
                        help="a small scope for tests: head dim 64, fp16, patch size 16 (other options override)")
    args = parser.parse_args(argv)

    if compile_check.interpreting():
        print("export: compiling needs the real Triton compiler: run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if not compile_check.tools_available():
        print("export: triton's NVIDIA backend (ptxas, cuobjdump) is not available", file=sys.stderr)
        return 2
    scope = dict(QUICK) if args.quick else {"head_dims": HEAD_DIMS, "dtypes": tuple(DTYPES), "patch_sizes": PATCH_SIZES}
    if args.head_dims:
        scope["head_dims"] = _ints(args.head_dims)
    if args.dtypes:
        scope["dtypes"] = tuple(d.strip() for d in args.dtypes.replace(";", ",").split(",") if d.strip())
    if args.patch_sizes:
        scope["patch_sizes"] = _ints(args.patch_sizes)
    targets = _ints(args.targets)
    problems = [f"--targets: {t} is not one of {TARGETS}" for t in targets if t not in TARGETS]
    problems += [f"--dtypes: {d!r} is not one of {tuple(DTYPES)}" for d in scope["dtypes"] if d not in DTYPES]
    problems += [f"--head-dims: {d} is not a multiple of 8 from 32 to 256" for d in scope["head_dims"]
                 if not (d % 8 == 0 and 32 <= d <= 256)]
    problems += [f"--patch-sizes: {p} is not one of {PATCH_SIZES}"
                 for p in scope["patch_sizes"] if p not in PATCH_SIZES]
    if problems:
        parser.error("; ".join(problems))

    start = time.perf_counter()
    entries = export_entries(targets, scope["head_dims"], scope["dtypes"], scope["patch_sizes"],
                             log=lambda line: print(line, flush=True))
    written = write_sources(entries, args.out, targets)
    size = sum(len(e.cubin) for e in entries)
    print(f"export: {len(entries)} cubins ({size / 1e6:.1f} MB) for sm_{', sm_'.join(map(str, targets))} in "
          f"{time.perf_counter() - start:.0f} s -> {', '.join(os.path.basename(p) for p in written)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
