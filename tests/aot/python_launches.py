"""The launches the Python launchers make for the C launch check, as JSON (tests/aot/test_cmake_build.py).

    python tests/aot/python_launches.py MANIFEST '[[TARGET, OP, ARGS...], ...]'   (ARGS as launch_calls.cpp's)

Runs the launcher on CPU tensors with `compile_check.record` (nothing runs; needs TRITON_INTERPRET unset, which
is why this is a separate process) and prints, per case, a list with one dict per launch: the kernel, the table
entry the C runtime must pick (its cubin size, block, shared memory), the grid under that entry's tiles, and
every argument: ints and floats as passed, tensors as the address the C side uses for them (launch_calls.cpp's
fixed addresses),
"workspace" for the buffers the C runtime places in its workspace, "rotated:i" for the output of the i-th RoPE
launch. Autotune-key arguments (buckets) are left out: the C runtime passes 0.
"""

import json
import sys

import torch

from finevit.kernels import compile_check, export

QKV, OUT, CU, COS, SIN = 0x10000000, 0x20000000, 0x30000000, 0x40000000, 0x50000000
WEIGHT, BIAS, NORM = 0x70000000, 0x80000000, 0x90000000
DTYPES = {0: ("fp16", torch.float16), 1: ("bf16", torch.bfloat16)}
SKIP = ("max_seqlen_bucket", "rows_bucket")


def _record(op, run):
    return compile_check.record(compile_check.Case(op, op, run))


def _entry(manifest, kernel, target, dtype, dim, aligned, has_bias=False):
    (entry,) = [e for e in manifest["entries"] if (e["kernel"], e["target"], e["dtype"], e["dim"], e["aligned"],
                                                   e["has_bias"]) == (kernel, target, dtype, dim, aligned, has_bias)]
    return entry


def _describe(launch, entry, grid, address):
    kernel = launch.kernel.fn if hasattr(launch.kernel, "configs") else launch.kernel
    # Strides as the C runtime passes them: in its entry's units (export.ALIGNED_UNITS when aligned, else 1), where
    # the launcher passes them in the units its own layout allows.
    rescale = {"ALIGN": launch.kwargs.get("ALIGN", 1) / entry["align"]}
    if "TABLE_ALIGN" in launch.kwargs:
        entry_unit = export.ALIGNED_UNITS["TABLE_ALIGN"] if entry["aligned"] else 1
        rescale["TABLE_ALIGN"] = launch.kwargs["TABLE_ALIGN"] / entry_unit
    params = {}
    for name, value in zip(kernel.arg_names, launch.args):
        if name in SKIP:
            continue
        if name.startswith("stride_"):
            value = int(value * rescale["TABLE_ALIGN" if name in ("stride_cos_tok", "stride_sin_tok") else "ALIGN"])
        params[name] = address(name, value) if isinstance(value, torch.Tensor) else value
    grid = tuple(grid) + (1,) * (3 - len(grid))
    return {"name": kernel.__name__, "cubin_bytes": entry["bytes"], "block": 32 * entry["num_warps"],
            "shared": entry["shared"], "grid": grid, "params": params}


def _rope_grid(entry, tokens, heads):
    block_t, block_h = entry["tiles"][:2]
    return (-(-tokens // block_t), -(-heads // block_h))  # the exported tile, not the launcher's for these heads


def attention(manifest, target, dtype_code, tokens, heads, dim, num_seqs, rope, pad):
    dtype_name, dtype = DTYPES[dtype_code]
    lengths = [tokens // num_seqs] * (num_seqs - 1)
    lengths.append(tokens - sum(lengths))
    rows = torch.empty(tokens, 3 * heads * dim + pad, dtype=dtype)
    q, k, v = rows[:, :3 * heads * dim].view(tokens, 3, heads, dim).unbind(1)
    cu_seqlens = compile_check.cu_seqlens_from_lengths(lengths)
    tables = dict(zip(("cos", "sin"), (torch.empty(tokens, dim // 2) for _ in range(2)))) if rope else {}
    recorded = _record("attention", lambda: compile_check._module("attention").varlen_attention(
        q, k, v, cu_seqlens, max(lengths), **tables))
    rotated = {}

    def address(name, tensor):
        if tensor.data_ptr() in rotated:
            return rotated[tensor.data_ptr()]
        if tensor.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr():
            return QKV + tensor.data_ptr() - rows.data_ptr()
        return {"O": OUT, "CU_SEQLENS": CU, "COS": COS, "SIN": SIN}.get(name, "workspace")

    # The aligned variants need strides that are multiples of 8 elements (and 16-byte aligned addresses, as here).
    # With RoPE, q~ and k~ are dense in the workspace, so the attention's alignment is decided by v and out alone.
    unit = export.ALIGNED_UNITS["ALIGN"]
    aligned = rows.stride(0) % unit == 0 and dim % unit == 0
    blocks = _entry(manifest, "_cu_blocks_kernel", target, "", 0, False)
    work_list = recorded[2 if rope else 0]
    expected = [_describe(work_list, blocks, work_list.grid, address)]
    if rope:
        entry = _entry(manifest, "_rope_kernel", target, dtype_name, dim,
                       aligned and (dim // 2) % export.ALIGNED_UNITS["TABLE_ALIGN"] == 0)
        for i, launch in enumerate(recorded[:2]):
            expected.append(_describe(launch, entry, _rope_grid(entry, tokens, heads), address))
            expected[-1]["params"]["OUT"] = "workspace"
            rotated[launch.args[3].data_ptr()] = f"rotated:{i}"
    entry = _entry(manifest, "_attn_fwd_kernel", target, dtype_name, dim, aligned)
    launch = recorded[-1]
    expected.append(_describe(launch, entry, launch.grid({"BLOCK_M": entry["tiles"][0]}), address))
    return expected


def rope(manifest, target, dtype_code, tokens, heads, dim):
    dtype_name, dtype = DTYPES[dtype_code]
    x = torch.empty(tokens, heads, dim, dtype=dtype)
    cos, sin = (torch.empty(tokens, dim // 2) for _ in range(2))
    (launch,) = _record("rope", lambda: compile_check._module("rope").apply_rope(x, cos, sin))
    unit, table_unit = export.ALIGNED_UNITS["ALIGN"], export.ALIGNED_UNITS["TABLE_ALIGN"]
    entry = _entry(manifest, "_rope_kernel", target, dtype_name, dim, dim % unit == 0 and (dim // 2) % table_unit == 0)
    addresses = {"X": QKV, "OUT": OUT, "COS": COS, "SIN": SIN}
    return [_describe(launch, entry, _rope_grid(entry, tokens, heads), lambda name, t: addresses[name])]


def patch_embed(manifest, target, dtype_code, rows, channels, patch, width, has_bias):
    dtype_name, dtype = DTYPES[dtype_code]
    patches = torch.zeros(rows, channels * patch * patch, dtype=torch.uint8)
    weight = torch.empty(width, channels * patch * patch, dtype=dtype)
    bias = torch.empty(width, dtype=dtype) if has_bias else None
    (launch,) = _record("patch_embed", lambda: compile_check._module("patch_embed").patch_embed(
        patches, weight, bias, mean=[0.5] * channels, std=[0.5] * channels))
    entry = _entry(manifest, "_patch_embed_fwd_kernel", target, dtype_name, patch, True, bool(has_bias))
    addresses = {"X": QKV, "W": WEIGHT, "BIAS": BIAS if has_bias else WEIGHT, "NORM": NORM, "Y": OUT}
    grid = launch.grid(dict(zip(("BLOCK_M", "BLOCK_N"), entry["tiles"])))
    return [_describe(launch, entry, grid, lambda name, t: addresses[name])]


def main(argv):
    with open(argv[0]) as f:
        manifest = json.load(f)
    ops = {"attention": attention, "rope": rope, "patch_embed": patch_embed}
    print(json.dumps([ops[op](manifest, target, *numbers) for target, op, *numbers in json.loads(argv[1])]))


if __name__ == "__main__":
    main(sys.argv[1:])
