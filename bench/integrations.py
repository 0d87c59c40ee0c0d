"""Benchmark of `finevit.integrations`: whole vision towers patched by `apply_finevit_kernels` against themselves
unpatched.

    python bench/integrations.py [--quick] [--out DIR] [--providers a,b,...] [--modes fwd,bwd,fwd+bwd] [--cpu-smoke]

Without a CUDA device it prints "no CUDA device: nothing to benchmark" and exits 0.

Towers (random-initialized from their published configs, bf16, no downloads)
    qwen2_vl 4img     Qwen2-VL vision tower (depth 32, width 1280, 16 heads of 80, patch 14, merge 2) on 4 images of
                      448x448, 672x896, 1008x1008 and 812x560 px (Qwen's smart_resize sizes): 11 600 patches packed
    qwen2_vl 8x448    the same tower on 8 images of 448x448 px (8 x 1024 patches)
    qwen2_5_vl 4img   Qwen2.5-VL vision tower (depth 32, width 1280, 16 heads, SwiGLU 3420, 112 px windows, full
                      attention in layers 7/15/23/31) on the 4 images above
    siglip so400m b32 SigLIP so400m/14 vision tower (27 layers, width 1152, 16 heads of 72) at 384 px, batch 32
    siglip2 so400m naflex b32  SigLIP2 so400m/16 NaFlex tower, batch 32 of random aspect ratios, up to 1024
                      patches each, padded to 1024 with pixel_attention_mask (as Siglip2ImageProcessor pads them)
    vit_b16 b64       timm vit_base_patch16_224 (224 px), batch 64
`--quick` (meant to take a few minutes; not yet timed on a GPU): qwen2_vl 4img, siglip so400m b32 and vit_b16 b64,
fwd+bwd only.

Providers (the same model instance, patched or reconfigured before each and restored after)
    finevit           apply_finevit_kernels(model): attention (RoPE fused for Qwen) and patch embedding on finevit
    finevit_attn      apply_finevit_kernels(model, patch_embed=False): attention only, to split the gains
    sdpa              unpatched with SDPA: transformers attn_implementation "sdpa" (Qwen: one SDPA call per image
                      or window, after a host split of cu_seqlens, as transformers does), timm's fused attention
    flash_attention_2 unpatched with transformers' FA2 path (flash-attn installed; SigLIP2 has none)
    eager             unpatched, plain matmul-softmax attention (CPU smoke runs)

Timing: bench/_harness.py (do_bench median and 20/80 % quantiles; fwd under no_grad, fwd+bwd = forward then the
backward of a fixed random gradient of the tower's output into every parameter; parameter gradients reset
between reps). The output timed is the tower's final one (Qwen: the merged tokens; SigLIP: the pooled
embedding; timm: the final features), so the backward runs through every layer. Before timing, each provider's
output is compared with finevit's (`rel_diff_vs_ours`, max |Δ| / max |ours| over real tokens; a warning above 5%).

Throughput is model TFLOP/s: the dense matmuls and attention over real tokens only (padding is charged to whoever
computes it), backward counted as 2x forward; finevit's cell shows its share of the measured bf16 matmul ceiling,
every other provider's the speedup of finevit over it. The target of issue 8: patched Qwen2-VL tower fwd+bwd at
least 1.3x the unpatched tower with SDPA on an H100; the other towers are checked for "not slower" (>= 1.0).
Files: bench/results/integrations_<gpu>_<date>.{json,md,png}.

`--cpu-smoke` runs tiny fp32 towers of every family (width 64, 2 heads, 2 layers) on the CPU with
FINEVIT_KERNELS=reference and a wall-clock timer, through the same code paths, to check the script without a GPU.
"""

from __future__ import annotations

import importlib.util
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import _harness as harness
import torch

from finevit.integrations import apply_finevit_kernels, revert_finevit_kernels

OURS = "finevit"
DIFF_WARNING = 0.05
QWEN_TARGET = 1.3
SMOKE = "smoke"


# ----------------------------------------------------------------------------------------------------
# Towers: build the model, its inputs, the output to time, and the forward FLOPs
# ----------------------------------------------------------------------------------------------------


@dataclass
class Tower:
    name: str
    family: str  # "qwen2_vl", "qwen2_5_vl", "siglip", "siglip2", "timm"
    build: Callable[[], torch.nn.Module]  # on the default device (set by the caller)
    inputs: Callable[[torch.device, torch.dtype], dict]
    describe: dict = field(default_factory=dict)  # the exact shapes, recorded in the JSON


def qwen_grid(sizes_px: list[tuple[int, int]], patch: int = 14) -> list[list[int]]:
    """(t, h, w) patch grids of still images (Qwen duplicates an image into its 2 temporal patches: t = 1)."""
    return [[1, h // patch, w // patch] for h, w in sizes_px]


def qwen_tower(version: str, grids: list[list[int]], smoke: bool) -> Tower:
    from transformers import Qwen2_5_VLVisionConfig, Qwen2VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    if version == "qwen2_vl":
        size = dict(depth=2, embed_dim=64, hidden_size=48, num_heads=2) if smoke else \
            dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16)  # Qwen2-VL-7B's vision_config
        config = Qwen2VLVisionConfig(**size, mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        cls, width, mlp = Qwen2VisionTransformerPretrainedModel, config.embed_dim, 4 * config.embed_dim
    else:
        size = dict(depth=2, hidden_size=64, out_hidden_size=48, intermediate_size=96, num_heads=2,
                    window_size=56, fullatt_block_indexes=[1]) if smoke else \
            dict(depth=32, hidden_size=1280, out_hidden_size=3584, intermediate_size=3420, num_heads=16,
                 window_size=112, fullatt_block_indexes=[7, 15, 23, 31])  # Qwen2.5-VL-7B's vision_config
        config = Qwen2_5_VLVisionConfig(**size, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        cls, width, mlp = Qwen2_5_VisionTransformerPretrainedModel, config.hidden_size, config.intermediate_size
    features = 3 * 2 * 14 * 14

    def inputs(device, dtype):
        grid_thw = torch.tensor(grids, device=device)
        tokens = int(grid_thw.prod(-1).sum())
        return {"hidden_states": torch.randn(tokens, features, device=device, dtype=dtype), "grid_thw": grid_thw}

    tokens = sum(t * h * w for t, h, w in grids)
    return Tower(f"{version} {len(grids)}img", version, lambda: cls(config), inputs,
                 {"grid_thw": grids, "tokens": tokens, "depth": config.depth, "width": width, "mlp": mlp,
                  "heads": config.num_heads, "patch_features": features,
                  "window_size": getattr(config, "window_size", None),
                  "fullatt_block_indexes": getattr(config, "fullatt_block_indexes", None),
                  "merged_out": getattr(config, "out_hidden_size", None) or config.hidden_size})


def siglip_tower(batch: int, smoke: bool) -> Tower:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8) if smoke else \
        dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
             patch_size=14)  # google/siglip-so400m-patch14-384
    config = SiglipVisionConfig(**size)
    side = config.image_size

    def inputs(device, dtype):
        return {"pixel_values": torch.randn(batch, 3, side, side, device=device, dtype=dtype)}

    grid = side // config.patch_size
    name = f"siglip {'tiny' if smoke else 'so400m'} b{batch}"
    return Tower(name, "siglip", lambda: SiglipVisionModel(config), inputs,
                 {"batch": batch, "image_size": side, "patch": config.patch_size, "tokens_per_image": grid * grid,
                  "depth": config.num_hidden_layers, "width": config.hidden_size, "mlp": config.intermediate_size,
                  "heads": config.num_attention_heads})


def naflex_shapes(batch: int, max_patches: int, seed: int) -> list[tuple[int, int]]:
    """Per-image (h, w) patch grids: aspect log-uniform in [1/2, 2], at most max_patches, at least a quarter of it."""
    rng = random.Random(seed)
    shapes = []
    for _ in range(batch):
        aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
        budget = rng.uniform(max_patches / 4, max_patches)
        h = max(1, min(int(math.sqrt(budget * aspect)), max_patches))
        shapes.append((h, max(1, min(int(budget / h), max_patches // h))))
    return shapes


def siglip2_tower(batch: int, max_patches: int, smoke: bool, seed: int) -> Tower:
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=8) \
        if smoke else dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           patch_size=16)  # google/siglip2-so400m-patch16-naflex
    config = Siglip2VisionConfig(**size, num_patches=256)
    shapes = naflex_shapes(batch, max_patches, seed)
    features = 3 * config.patch_size**2

    def inputs(device, dtype):
        mask = torch.zeros(batch, max_patches, dtype=torch.long, device=device)
        for i, (h, w) in enumerate(shapes):
            mask[i, : h * w] = 1
        return {"pixel_values": torch.randn(batch, max_patches, features, device=device, dtype=dtype),
                "pixel_attention_mask": mask, "spatial_shapes": torch.tensor(shapes, device=device)}

    name = f"siglip2 {'tiny' if smoke else 'so400m'} naflex b{batch}"
    return Tower(name, "siglip2", lambda: Siglip2VisionModel(config), inputs,
                 {"batch": batch, "max_patches": max_patches, "spatial_shapes": shapes,
                  "real_patches": sum(h * w for h, w in shapes), "depth": config.num_hidden_layers,
                  "width": config.hidden_size, "mlp": config.intermediate_size, "heads": config.num_attention_heads,
                  "patch_features": features})


def timm_tower(batch: int, smoke: bool) -> Tower:
    from timm.models.vision_transformer import VisionTransformer

    size = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2) if smoke else \
        dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)  # vit_base_patch16_224
    side = size["img_size"]

    def inputs(device, dtype):
        return {"x": torch.randn(batch, 3, side, side, device=device, dtype=dtype)}

    tokens = (side // size["patch_size"]) ** 2 + 1
    return Tower(f"{'vit_tiny' if smoke else 'vit_b16'} b{batch}", "timm",
                 lambda: VisionTransformer(**size, num_classes=0), inputs,
                 {"batch": batch, "image_size": side, "patch": size["patch_size"], "tokens_per_image": tokens,
                  "depth": size["depth"], "width": size["embed_dim"], "mlp": 4 * size["embed_dim"],
                  "heads": size["num_heads"]})


def run_tower(tower: Tower, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The tower's final output: what the timed backward starts from."""
    if tower.family == "timm":
        return model.forward_features(inputs["x"])
    out = model(**inputs)
    return out.pooler_output


def forward_flops(tower: Tower) -> float:
    """Dense matmuls + attention of one forward over real tokens (2 FLOPs per multiply-add)."""
    d = tower.describe
    width, depth, mlp = d["width"], d["depth"], d["mlp"]
    swiglu = tower.family == "qwen2_5_vl"
    per_token_layer = 2 * (4 * width * width + (3 if swiglu else 2) * width * mlp)  # qkv + proj + MLP
    if tower.family in ("qwen2_vl", "qwen2_5_vl"):
        tokens = d["tokens"]
        frames = [h * w for t, h, w in d["grid_thw"] for _ in range(t)]
        full = 4 * width * sum(n * n for n in frames)
        if tower.family == "qwen2_5_vl":
            windows = _qwen_window_lengths(d)
            attention = sum(full if i in d["fullatt_block_indexes"] else 4 * width * sum(n * n for n in windows)
                            for i in range(depth))
        else:
            attention = depth * full
        merged = tokens // 4
        merger = 2 * merged * (4 * width * 4 * width + 4 * width * d["merged_out"])
        return tokens * depth * per_token_layer + attention + 2 * tokens * d["patch_features"] * width + merger
    if tower.family == "siglip2":
        lengths = [h * w for h, w in d["spatial_shapes"]]
        patch = 2 * sum(lengths) * d["patch_features"] * width
    else:
        lengths = [d["tokens_per_image"]] * d["batch"]
        patch = 2 * sum(lengths) * 3 * d["patch"] ** 2 * width
    return sum(lengths) * depth * per_token_layer + depth * 4 * width * sum(n * n for n in lengths) + patch


def _qwen_window_lengths(d: dict) -> list[int]:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

    _, cu = get_vision_window_index(torch.tensor(d["grid_thw"]), spatial_merge_size=2, window_size=d["window_size"],
                                    patch_size=14)
    return (cu[1:] - cu[:-1]).tolist()


# ----------------------------------------------------------------------------------------------------
# Providers: set the model up (patch or attention implementation), and undo it
# ----------------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """The provider cannot run this tower here (missing package, unsupported): recorded as skipped."""


def _set_unpatched(model: torch.nn.Module, tower: Tower, implementation: str) -> None:
    revert_finevit_kernels(model)
    if tower.family == "timm":
        if implementation not in ("sdpa", "eager"):
            raise Unavailable(f"timm has no {implementation} attention")
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = implementation == "sdpa"
        return
    if implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise Unavailable("flash-attn is not installed")  # and never let transformers fetch a hub kernel instead
    try:
        model.set_attn_implementation(implementation)
    except (ImportError, ValueError) as error:
        raise Unavailable(f"{type(model).__name__} cannot use {implementation}: {str(error).splitlines()[0][:200]}") \
            from error


@dataclass(frozen=True)
class Provider:
    setup: Callable[[torch.nn.Module, Tower], None]
    description: str
    cuda_only: bool = False


PROVIDERS: dict[str, Provider] = {
    "finevit": Provider(lambda m, t: (_set_unpatched(m, t, "sdpa"), apply_finevit_kernels(m)),
                        "apply_finevit_kernels(model): attention (+ fused RoPE) and patch embedding on "
                        "finevit.kernels"),
    "finevit_attn": Provider(lambda m, t: (_set_unpatched(m, t, "sdpa"), apply_finevit_kernels(m, patch_embed=False)),
                             "apply_finevit_kernels(model, patch_embed=False): attention only"),
    "sdpa": Provider(lambda m, t: _set_unpatched(m, t, "sdpa"),
                     "unpatched, SDPA (transformers attn_implementation='sdpa', timm fused_attn)"),
    "flash_attention_2": Provider(lambda m, t: _set_unpatched(m, t, "flash_attention_2"),
                                  "unpatched, transformers attn_implementation='flash_attention_2' (flash-attn)",
                                  cuda_only=True),
    "eager": Provider(lambda m, t: _set_unpatched(m, t, "eager"), "unpatched, eager matmul-softmax attention"),
}
GPU_PROVIDERS = ["finevit", "finevit_attn", "sdpa", "flash_attention_2"]
QUICK_PROVIDERS = ["finevit", "sdpa", "flash_attention_2"]
SMOKE_PROVIDERS = ["finevit", "finevit_attn", "sdpa", "eager", "flash_attention_2"]


# ----------------------------------------------------------------------------------------------------
# Running the cases
# ----------------------------------------------------------------------------------------------------


def run_provider(name: str, tower: Tower, model: torch.nn.Module, inputs: dict, modes: list[str],
                 device: torch.device, flop: float, ceiling: float, ours_out: torch.Tensor | None):
    """All modes of one provider on one tower -> result records (and its output, to compare)."""
    provider = PROVIDERS[name]
    base = {"case": tower.name, "provider": name}
    params = [p for p in model.parameters() if p.requires_grad]
    forward = lambda: run_tower(tower, model, inputs)  # noqa: E731
    try:
        if provider.cuda_only and device.type != "cuda":
            raise Unavailable("needs a CUDA device")
        provider.setup(model, tower)
        start = time.perf_counter()
        with torch.no_grad():
            out = forward()  # first call: autotunes the Triton kernels, then the output check
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        base["first_call_s"] = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - a failure to set up or run is recorded, not fatal
        harness.free_memory(device)
        status = "skipped" if isinstance(error, Unavailable) else "failed"
        return [{**base, "mode": mode, "status": status, "reason": harness.error_reason(error)} for mode in modes], None
    if ours_out is not None and name != OURS:
        diff = (out.float() - ours_out.float()).abs().max() / ours_out.float().abs().max().clamp_min(1e-30)
        base["rel_diff_vs_ours"] = float(diff)
        if diff > DIFF_WARNING:
            print(f"  WARNING: {name} differs from {OURS} by {float(diff):.1%} on {tower.name}")
    records = []
    for mode in modes:
        try:
            timing = harness.measure(forward, mode, device, inputs=params)
        except Exception as error:  # noqa: BLE001
            harness.free_memory(device)
            records.append({**base, "mode": mode, "status": "failed", "reason": harness.error_reason(error)})
            continue
        work = flop * (1.0 if mode == "fwd" else 2.0 if mode == "bwd" else 3.0)
        records.append({**base, "mode": mode, "status": "ok", "reason": None, **timing, "flop": work,
                        **harness.throughput(timing["ms"], work, ceiling)})
    return records, out


def _progress_line(record: dict) -> str:
    head = f"{record['case']:<22} {record['mode']:<8} {record['provider']:<18}"
    if record["status"] != "ok":
        return f"{head} {record['status']}: {record['reason']}"
    line = (f"{head} {record['ms']:9.3f} ms ({record['ms_q20']:.3f}-{record['ms_q80']:.3f}) "
            f"{record['throughput']:7.2f} TFLOP/s")
    if record.get("peak_mem_mib") is not None:
        line += f"  peak +{record['peak_mem_mib']:.0f} MiB"
    return line


# ----------------------------------------------------------------------------------------------------
# Targets of issue 8
# ----------------------------------------------------------------------------------------------------


def check_targets(results: list[dict], towers: list[Tower]) -> list[dict]:
    ok = {(r["case"], r["mode"], r["provider"]): r for r in results if r["status"] == "ok"}
    checks = []
    for tower in towers:
        target = QWEN_TARGET if tower.family == "qwen2_vl" else 1.0
        ours, base = ok.get((tower.name, "fwd+bwd", OURS)), ok.get((tower.name, "fwd+bwd", "sdpa"))
        name = f"fwd+bwd: {OURS} / sdpa, {tower.name}"
        if ours is None or base is None:
            checks.append({"name": name, "value": None, "threshold": target, "met": None, "detail": "not measured"})
            continue
        ratio = base["ms"] / ours["ms"]
        detail = "issue 8's target (H100)" if tower.family == "qwen2_vl" else "not slower than unpatched"
        fa2 = ok.get((tower.name, "fwd+bwd", "flash_attention_2"))
        if fa2 is not None:
            detail += f"; vs flash_attention_2: {fa2['ms'] / ours['ms']:.2f}x"
        checks.append({"name": name, "value": ratio, "threshold": target, "met": ratio >= target, "detail": detail})
    return checks


def _print_checks(checks: list[dict]) -> None:
    print("\nTargets (issue 8; H100, bf16):")
    for c in checks:
        if c["value"] is None:
            print(f"  {c['name']:<48} {'-':>7}  (>= {c['threshold']:<4g})  not measured")
            continue
        status = "met" if c["met"] else "NOT MET"
        print(f"  {c['name']:<48} {c['value']:7.2f}  (>= {c['threshold']:<4g})  {status:<8} {c['detail']}")


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------

QWEN_SIZES_PX = [(448, 448), (672, 896), (1008, 1008), (812, 560)]  # multiples of 28, as smart_resize makes them


def plan(args) -> tuple[list[Tower], list[str], list[str], torch.dtype]:
    """(towers, providers, modes, dtype) for the chosen run."""
    if args.cpu_smoke:
        grids = [[1, 4, 6], [1, 8, 8], [2, 2, 4]]
        towers = [qwen_tower("qwen2_vl", grids, smoke=True), qwen_tower("qwen2_5_vl", grids, smoke=True),
                  siglip_tower(3, smoke=True), siglip2_tower(3, 16, smoke=True, seed=args.seed),
                  timm_tower(3, smoke=True)]
        return towers, SMOKE_PROVIDERS, list(harness.MODES), torch.float32
    qwen4 = qwen_grid(QWEN_SIZES_PX)
    qwen2_4 = qwen_tower("qwen2_vl", qwen4, smoke=False)
    siglip, vit = siglip_tower(32, smoke=False), timm_tower(64, smoke=False)
    if args.quick:
        return [qwen2_4, siglip, vit], QUICK_PROVIDERS, ["fwd+bwd"], torch.bfloat16
    qwen2_8 = qwen_tower("qwen2_vl", qwen_grid([(448, 448)] * 8), smoke=False)
    qwen2_8.name = "qwen2_vl 8x448"
    towers = [qwen2_4, qwen2_8, qwen_tower("qwen2_5_vl", qwen4, smoke=False), siglip,
              siglip2_tower(32, 1024, smoke=False, seed=args.seed), vit]
    return towers, GPU_PROVIDERS, ["fwd", "fwd+bwd"], torch.bfloat16


def library_versions() -> dict:
    """The versions of the libraries whose towers are benchmarked."""
    import timm
    import transformers

    return {"transformers": transformers.__version__, "timm": timm.__version__}


def main(argv: list[str] | None = None) -> None:
    run = harness.start(__doc__, PROVIDERS, argv, ops=("varlen_attention", "patch_embed"), libraries=library_versions,
                        quick_help="a few-minute subset (see the module docstring)",
                        seed_help="seed of the NaFlex shapes, the weights and the inputs")
    device = run.device
    towers, providers, modes, dtype = plan(run.args)
    towers = harness.warmup_cases(towers)
    providers, modes = run.providers(providers), run.modes(modes)
    payload = run.payload("integrations", providers=providers, modes=modes, layout={"panel": "family", "x": "case"},
                          config={"dtype": str(dtype).removeprefix("torch.")})
    results = payload["results"]
    for tower in towers:
        flop = forward_flops(tower)
        payload["cases"].append({"case": tower.name, "family": tower.family, "dtype": str(dtype).removeprefix("torch."),
                                 "forward_flop": flop, **tower.describe})
        torch.manual_seed(run.args.seed)
        with torch.device(device):
            model = tower.build().to(dtype).train()
        inputs = tower.inputs(device, dtype)
        results += harness.run_providers(
            providers, lambda name, ours_out: run_provider(name, tower, model, inputs, modes, device, flop,  # noqa: B023
                                                           run.ceilings["matmul"]["tflops"], ours_out),
            OURS, _progress_line)
        revert_finevit_kernels(model)
        model = inputs = None  # frees them (the lambda's cells) before free_memory
        harness.free_memory(device)
        harness.add_ratios(results, OURS)
        run.save(payload)

    if harness.warmup_shard() is not None:
        return
    payload["checks"] = check_targets(results, towers)
    run.finish(payload, lambda: _print_checks(payload["checks"]))


if __name__ == "__main__":
    main()
