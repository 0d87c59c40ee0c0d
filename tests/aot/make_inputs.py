"""Inputs and expected outputs for the C library's GPU test (ctest `gpu_kernels`, kernels/tests/test_gpu.cpp).

    python tests/aot/make_inputs.py --out DIR --manifest build/aot/manifest.json [--device cpu --target 90]

For every kernel the export holds for this GPU's target (manifest.json), writes raw little-endian arrays and
one line per case in DIR/cases.txt ("op key=value ..."): the inputs, the float64 reference output
(`finevit.kernels.reference`), the output of `finevit.kernels` (the same Triton kernels, JIT-compiled and
autotuned) and the bound the C output's error against float64 must meet: 2x the error of `finevit.kernels`
(tests/kernels' rule), plus the output dtype's half ulp at the largest magnitude for a 0 error.
Exits 77 (ctest's skip code) without a CUDA device. `--device cpu --target T` writes the cases of target T
from CPU tensors (finevit.kernels' CPU path): how tests/aot/test_cmake_build.py checks the GPU test itself
(its parsing, and that it fails on outputs no kernel wrote) on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

SKIP = 77


def _save(out: str, name: str, tensor: torch.Tensor) -> str:
    tensor = tensor.detach().contiguous().cpu()
    path = os.path.join(out, f"{name}.bin")
    tensor.view(torch.uint8).numpy().tofile(path) if tensor.dtype == torch.bfloat16 else tensor.numpy().tofile(path)
    return os.path.basename(path)


def _bound(result: torch.Tensor, reference: torch.Tensor) -> float:
    error = (result.double() - reference).abs().max().item()
    half_ulp = torch.finfo(result.dtype).eps * reference.abs().max().item() / 2
    return 2 * error + half_ulp


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--manifest", required=True, help="the exporter's manifest.json")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--target", type=int, help="the export target whose kernels to cover (default: the GPU's)")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("make_inputs: no CUDA device, nothing to compare (skipped)")
        return SKIP
    if device == "cuda":
        os.environ.setdefault("FINEVIT_KERNELS", "triton")
    import finevit.kernels as K
    from finevit.kernels import reference

    target = args.target
    if target is None:
        major, minor = torch.cuda.get_device_capability()
        target = 80 if major == 8 else 90 if (major, minor) == (9, 0) else None
    with open(args.manifest) as f:
        entries = [e for e in json.load(f)["entries"] if e["target"] == target]
    os.makedirs(args.out, exist_ok=True)
    names = {"fp16": torch.float16, "bf16": torch.bfloat16}
    lines = []
    torch.manual_seed(0)

    attention = sorted({(e["dtype"], e["dim"]) for e in entries if e["kernel"] == "_attn_fwd_kernel"})
    for dtype_name, head_dim in attention:
        dtype, heads, lengths = names[dtype_name], 3, [1, 17, 129, 300]
        tokens = sum(lengths)
        qkv = torch.randn(tokens, 3, heads, head_dim, device=device).to(dtype)  # q, k, v: strided views
        q, k, v = qkv.unbind(1)
        cu = K.cu_seqlens_from_lengths(lengths).to(device)
        positions = torch.randint(0, 40, (tokens, 2), device=device)
        cos, sin = K.rope_2d_cos_sin(positions, head_dim)
        for rope in (False, True):
            tables = {"cos": cos, "sin": sin} if rope else {"cos": None, "sin": None}
            result = K.varlen_attention(q, k, v, cu, max(lengths), **tables)
            expected = reference.varlen_attention(q.double(), k.double(), v.double(), cu, max(lengths), **tables)
            case = f"attention_{dtype_name}_d{head_dim}{'_rope' if rope else ''}"
            files = {"qkv": _save(args.out, f"{case}_qkv", qkv), "cu": _save(args.out, f"{case}_cu", cu),
                     "ref": _save(args.out, f"{case}_ref", expected),
                     "finevit": _save(args.out, f"{case}_finevit", result)}
            if rope:
                files |= {"cos": _save(args.out, f"{case}_cos", cos), "sin": _save(args.out, f"{case}_sin", sin)}
            lines.append(f"attention name={case} dtype={dtype_name} head_dim={head_dim} heads={heads} tokens={tokens} "
                         f"seqs={len(lengths)} rope={int(rope)} bound={_bound(result, expected)!r} "
                         + " ".join(f"{k}={v}" for k, v in files.items()))

    rope_specs = sorted({(e["dtype"], e["dim"]) for e in entries if e["kernel"] == "_rope_kernel"})
    for dtype_name, head_dim in rope_specs:
        dtype, heads, tokens = names[dtype_name], 5, 333
        x = torch.randn(tokens, heads, head_dim, device=device).to(dtype)
        cos, sin = K.rope_2d_cos_sin(torch.randint(0, 40, (tokens, 2), device=device), head_dim)
        result = K.apply_rope(x, cos, sin)
        expected = reference.apply_rope(x.double(), cos.double(), sin.double())
        case = f"rope_{dtype_name}_d{head_dim}"
        files = {"x": _save(args.out, f"{case}_x", x), "cos": _save(args.out, f"{case}_cos", cos),
                 "sin": _save(args.out, f"{case}_sin", sin), "ref": _save(args.out, f"{case}_ref", expected),
                 "finevit": _save(args.out, f"{case}_finevit", result)}
        lines.append(f"rope name={case} dtype={dtype_name} head_dim={head_dim} heads={heads} tokens={tokens} "
                     f"bound={_bound(result, expected)!r} " + " ".join(f"{k}={v}" for k, v in files.items()))

    patch_specs = sorted({(e["dtype"], e["dim"], e["has_bias"]) for e in entries
                          if e["kernel"] == "_patch_embed_fwd_kernel"})
    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
    for dtype_name, patch, has_bias in patch_specs:
        dtype, rows, width, features = names[dtype_name], 1000, 256, 3 * patch * patch
        patches = torch.randint(0, 256, (rows, features), dtype=torch.uint8, device=device)
        weight = (torch.randn(width, features, device=device) * features ** -0.5).to(dtype)
        bias = torch.randn(width, device=device).to(dtype) if has_bias else None
        result = K.patch_embed(patches, weight, bias, mean=mean, std=std)
        bias64 = bias.double() if has_bias else None
        expected = reference.patch_embed(patches, weight.double(), bias64, mean=mean, std=std)
        case = f"patch_embed_{dtype_name}_p{patch}{'_bias' if has_bias else ''}"
        files = {"patches": _save(args.out, f"{case}_patches", patches),
                 "weight": _save(args.out, f"{case}_weight", weight),
                 "ref": _save(args.out, f"{case}_ref", expected), "finevit": _save(args.out, f"{case}_finevit", result)}
        if has_bias:
            files["bias"] = _save(args.out, f"{case}_bias", bias)
        lines.append(f"patch_embed name={case} dtype={dtype_name} patch={patch} rows={rows} width={width} "
                     f"mean={','.join(map(str, mean))} std={','.join(map(str, std))} "
                     f"bound={_bound(result, expected)!r} " + " ".join(f"{k}={v}" for k, v in files.items()))

    with open(os.path.join(args.out, "cases.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"make_inputs: {len(lines)} cases for sm_{target} in {args.out}")
    return 0 if lines else 1


if __name__ == "__main__":
    sys.exit(main())
