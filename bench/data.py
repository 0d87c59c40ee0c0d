"""Benchmark of FineViT's native-resolution preprocessing against transformers' Qwen2-VL image processor (CPU).

    python bench/data.py [--quick] [--out DIR] [--cpu-smoke]

What one DataLoader worker does per image, timed end to end on encoded bytes, single-threaded (a worker runs
torch with one thread, so every provider gets `torch.set_num_threads(1)`), providers timed round-robin
(medians over rounds, so a noisy shared machine slows every provider alike):

    decode -> smart_resize -> antialiased resize -> patchify -> pack (a batch of images into one sequence)

Workloads (encoded in memory before timing)
    embedded      the embedded dataset's images (`finevit.data.synth.generate_sample`, seed 0): sides 96..1024 px,
                  9 JPEG (quality 90) for every PNG, as in the shards
    photo-1080p   1920×1080 JPEGs (quality 90) of photo-like content (multi-scale noise, edges, grain)
    photo-12mp    4000×3000 JPEGs, a phone camera's size
Every provider computes the same grids: patch 16, merge 2 (sides multiples of 32), pixels in [64², 1024²]
(Qwen2-VL's `smart_resize`); the bench checks that each baseline's `image_grid_thw` equals finevit's grids
for every image and refuses to report a ratio otherwise. Images are grouped into the batches finevit's
packer forms (token budget 16384); baselines process the same groups (one processor call per batch,
whose concatenated `pixel_values` is their packed batch).

Providers
    finevit   `finevit.data.image.load_resized` per image (libjpeg-turbo decode through simplejpeg, DCT
              downscaling of large JPEGs, torch's antialiased uint8 bicubic) + best-fit `pack` +
              `collate_images` (uint8 patches written straight into the batch, positions, cu_seqlens):
              exactly what the training loader's workers run
    hf_pil    transformers' Qwen2VLImageProcessorPil (the "slow" PIL/NumPy backend) on PIL-decoded RGB images;
              temporal_patch_size=1 so it does not duplicate frames (less work than its default of 2)
    hf_fast   transformers' Qwen2VLImageProcessor (the "fast" torchvision backend) on uint8 tensors decoded by
              torchvision.io.decode_image (its fastest input path), temporal_patch_size=1
Baselines also rescale and normalize to float32 (their output is model input; finevit normalizes uint8
patches inside the patch-embedding op, so it never materializes floats on the CPU).

Fidelity: for a few images per workload the bench compares finevit's resized pixels with hf_pil's (rescale
and normalization off, patches reassembled into an image): the mean absolute difference in 0..255 levels,
with and without finevit's JPEG draft mode (`mad_vs_hf_pil`, `mad_vs_hf_pil_no_draft`).

Reading the output: images/s per provider and workload, and finevit's speedup over each baseline; the
target of issue 5 is ≥ 3× over the best baseline on every workload. Against hf_fast the ratio is bounded by
the work both do alike: libjpeg-turbo's entropy decoding and torch's antialiased uint8 resize are the same
code in both pipelines (about 2/3 of finevit's time on the embedded images); finevit saves the rest (float
conversion, normalization, float patch copies) and, on large JPEGs, the full-size decode.
Files: bench/results/data_cpu_<date>.{json,md}.
`--cpu-smoke` runs tiny workloads through the same code paths (a few seconds) to check the script.
"""

from __future__ import annotations

import argparse
import functools
import io
import statistics
import sys
import time
from collections.abc import Callable

import _harness as harness
import numpy as np
import torch
from PIL import Image

from finevit.data.image import ImageConfig, grid_of, load_resized
from finevit.data.packing import collate_images, pack
from finevit.data.synth import SynthConfig, generate_sample

OURS = "finevit"
MODE = "decode→pack"
TOKEN_BUDGET = 16384
IMAGE_CONFIG = ImageConfig(patch_size=16, merge_size=2, min_pixels=64 * 64, max_pixels=1024 * 1024)
TARGET_RATIO = 3.0

# (name, kind, count, height, width); the quick and smoke plans use fewer / smaller images.
WORKLOADS = {
    "full": [("embedded", "synth", 400, None, None), ("photo-1080p", "photo", 24, 1080, 1920),
             ("photo-12mp", "photo", 8, 3000, 4000)],
    "quick": [("embedded", "synth", 150, None, None), ("photo-1080p", "photo", 10, 1080, 1920),
              ("photo-12mp", "photo", 4, 3000, 4000)],
    "smoke": [("embedded", "synth", 6, None, None), ("photo-vga", "photo", 2, 480, 640)],
}


# ----------------------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------------------


def photo_jpeg(height: int, width: int, seed: int) -> bytes:
    """A photo-sized JPEG (quality 90) whose content compresses like a photo: smooth multi-scale colour
    noise, a few hard edges and per-pixel grain (a flat synthetic image would decode unrealistically fast)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), dtype=np.float32)
    for scale, amplitude in ((64, 90.0), (16, 40.0), (4, 20.0)):
        small = rng.uniform(-amplitude, amplitude, (max(2, height // scale), max(2, width // scale), 3))
        layer = Image.fromarray(((small + 128).clip(0, 255)).astype(np.uint8)).resize((width, height),
                                                                                     Image.Resampling.BICUBIC)
        image += np.asarray(layer, dtype=np.float32) - 128
    image += 128 + rng.normal(0, 6, image.shape).astype(np.float32)
    img = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_workload(kind: str, count: int, height: int | None, width: int | None) -> list[bytes]:
    if kind == "synth":
        return [generate_sample("train", i, SynthConfig())[0] for i in range(count)]
    return [photo_jpeg(height, width, seed) for seed in range(count)]


# ----------------------------------------------------------------------------------------------------
# Providers: each maps groups of encoded images to (packed outputs, per-image grids in the groups' order)
# ----------------------------------------------------------------------------------------------------

Provider = Callable[[list[list[bytes]]], tuple[list, list[tuple[int, int]]]]


def finevit_provider(config: ImageConfig = IMAGE_CONFIG) -> Provider:
    def run(groups: list[list[bytes]]):
        images = [load_resized(b, config) for group in groups for b in group]
        batches = [collate_images(batch, config.patch_size)
                   for batch in pack(images, TOKEN_BUDGET, max_images=1024, length=num_patches)]
        return batches, [grid_of(image, config.patch_size) for image in images]
    return run


def num_patches(image) -> int:
    return image.shape[1] * image.shape[2] // IMAGE_CONFIG.patch_size**2


def _hf_kwargs(**extra) -> dict:
    return dict(patch_size=IMAGE_CONFIG.patch_size, merge_size=IMAGE_CONFIG.merge_size, temporal_patch_size=1,
                min_pixels=IMAGE_CONFIG.min_pixels, max_pixels=IMAGE_CONFIG.max_pixels, **extra)


def hf_pil_provider(**extra) -> Provider:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(**_hf_kwargs(**extra))

    def run(groups: list[list[bytes]]):
        outputs = [processor(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in group], return_tensors="pt")
                   for group in groups]
        return outputs, [tuple(t[1:]) for out in outputs for t in out["image_grid_thw"].tolist()]
    return run


def hf_fast_provider() -> Provider:
    from torchvision.io import ImageReadMode, decode_image
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    processor = Qwen2VLImageProcessor(**_hf_kwargs())

    def run(groups: list[list[bytes]]):
        outputs = []
        for group in groups:
            tensors = [decode_image(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
                       for b in group]
            outputs.append(processor(images=tensors, return_tensors="pt"))
        return outputs, [tuple(t[1:]) for out in outputs for t in out["image_grid_thw"].tolist()]
    return run


PROVIDERS: dict[str, tuple[Callable[[], Provider], str]] = {
    OURS: (finevit_provider, "finevit.data: simplejpeg/PIL decode (DCT downscale) + torch uint8 antialiased "
                             "bicubic + best-fit pack + patchify into the batch"),
    "hf_pil": (hf_pil_provider, "transformers Qwen2VLImageProcessorPil (slow, PIL/NumPy) on PIL-decoded images"),
    "hf_fast": (hf_fast_provider, "transformers Qwen2VLImageProcessor (fast, torchvision) on "
                                  "torchvision.io.decode_image tensors"),
}


# ----------------------------------------------------------------------------------------------------
# Fidelity
# ----------------------------------------------------------------------------------------------------


def hf_resized_image(processor, data: bytes) -> np.ndarray:
    """hf_pil's resized pixels (rescale/normalize off), reassembled from its merge-window patch order."""
    out = processor(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="np")
    _, gh, gw = out["image_grid_thw"][0]
    p, m = IMAGE_CONFIG.patch_size, IMAGE_CONFIG.merge_size
    patches = np.asarray(out["pixel_values"]).reshape(gh // m, gw // m, m, m, 3, p, p)
    image = patches.transpose(0, 2, 5, 1, 3, 6, 4)  # (gh/m, m, P, gw/m, m, P, C)
    return image.reshape(gh * p, gw * p, 3)


def fidelity(images: list[bytes], limit: int = 4) -> dict:
    """Mean absolute difference (0..255 levels) of finevit's resized pixels vs hf_pil's, with/without draft."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(**_hf_kwargs(do_rescale=False, do_normalize=False))
    no_draft = ImageConfig(**{**IMAGE_CONFIG.__dict__, "draft": False})
    diffs, diffs_no_draft = [], []
    for data in images[:limit]:
        reference = hf_resized_image(processor, data)
        for config, out in ((IMAGE_CONFIG, diffs), (no_draft, diffs_no_draft)):
            ours = load_resized(data, config).permute(1, 2, 0).numpy().astype(np.float64)  # (H, W, 3)
            out.append(np.abs(ours - reference).mean())
    return {"mad_vs_hf_pil": float(np.mean(diffs)), "mad_vs_hf_pil_no_draft": float(np.mean(diffs_no_draft))}


# ----------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------


def groups_of(images: list[bytes]) -> list[list[bytes]]:
    """The batches finevit's packer forms on these images (what every provider then processes)."""
    sized = [(i, num_patches(load_resized(b, IMAGE_CONFIG))) for i, b in enumerate(images)]
    return [[images[i] for i, _ in group]
            for group in pack(sized, TOKEN_BUDGET, max_images=1024, length=lambda item: item[1])]


def time_interleaved(runs: dict[str, Callable[[], object]], min_reps: int = 5, min_seconds: float = 2.0,
                     max_reps: int = 30) -> dict[str, dict]:
    """Median and 20/80 % quantiles (ms) of each callable, timed round-robin (one warm-up call each, then
    rounds of one call per provider), so a slow phase of a shared machine hits every provider alike."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    started = time.perf_counter()
    while min(len(t) for t in times.values()) < max_reps:
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
        if len(times[OURS]) >= min_reps and time.perf_counter() - started >= min_seconds:
            break
    out = {}
    for name, values in times.items():
        q20, _, _, q80 = statistics.quantiles(values, n=5, method="inclusive")
        out[name] = {"ms": statistics.median(values), "ms_q20": q20, "ms_q80": q80, "reps": len(values)}
    return out


def run_case(name: str, images: list[bytes], providers: list[str], min_seconds: float = 2.0
             ) -> tuple[dict, list[dict]]:
    groups = groups_of(images)
    patches = sum(num_patches(load_resized(b, IMAGE_CONFIG)) for b in images)
    case = {"case": name, "images": len(images), "batches": len(groups), "patches": patches,
            "mean_bytes": int(np.mean([len(b) for b in images])),
            "sizes": [list(Image.open(io.BytesIO(b)).size[::-1]) for b in images]}
    records, runs, ours_grids = [], {}, None
    for provider in providers:
        record = {"case": name, "mode": MODE, "provider": provider}
        try:
            run = PROVIDERS[provider][0]()
        except ImportError as exc:
            records.append({**record, "status": "skipped", "reason": f"not installed: {exc}"})
            continue
        _, grids = run(groups)
        if provider == OURS:
            ours_grids = grids
        elif grids != ours_grids:
            records.append({**record, "status": "failed", "reason": "grids differ from finevit's"})
            continue
        runs[provider] = functools.partial(run, groups)
    for provider, timing in time_interleaved(runs, min_reps=3 if min_seconds < 1 else 5,
                                             min_seconds=min_seconds).items():
        records.append({"case": name, "mode": MODE, "provider": provider, "status": "ok", "reason": None,
                        **timing, "peak_mem_mib": None, "grids_match": True,
                        **harness.throughput(timing["ms"], len(images), None, scale=1.0)})
        r = records[-1]
        print(f"  {name:<12} {provider:<8} {r['throughput']:9.1f} images/s  (median {r['ms']:.1f} ms for "
              f"{len(images)}, {r['reps']} reps)", flush=True)
    harness.add_ratios(records, OURS)
    return case, records


def checks(payload: dict) -> list[dict]:
    """Issue 5's target: finevit ≥ 3× the best baseline, on every workload."""
    out = []
    for case in payload["cases"]:
        rows = [r for r in payload["results"] if r["case"] == case["case"] and r["status"] == "ok"
                and r["provider"] != OURS and r.get("ours_ratio") is not None]
        best = min(rows, key=lambda r: r["ours_ratio"]) if rows else None
        out.append({"name": f"speedup over the best baseline, {case['case']}",
                    "value": best["ours_ratio"] if best else None, "threshold": TARGET_RATIO,
                    "met": (best["ours_ratio"] >= TARGET_RATIO) if best else None,
                    "detail": f"best baseline: {best['provider']}" if best else "no baseline ran"})
    return out


def markdown(payload: dict) -> str:
    env = payload["env"]
    providers = list(payload["providers"])
    index = {(r["case"], r["provider"]): r for r in payload["results"]}

    def cell(r: dict | None) -> str:
        if r is None or r["status"] != "ok":
            return "" if r is None else r["status"]
        ratio = f" · {r['ours_ratio']:.2f}×" if r.get("ours_ratio") is not None else ""
        return f"{r['throughput']:.1f}{ratio}"

    rows = [[c["case"], str(c["images"]), f"{c['patches'] / c['images']:.0f}"]
            + [cell(index.get((c["case"], p))) for p in providers] for c in payload["cases"]]
    fidelity_rows = [[c["case"], f"{c['mad_vs_hf_pil']:.2f}", f"{c['mad_vs_hf_pil_no_draft']:.2f}"]
                     for c in payload["cases"] if "mad_vs_hf_pil" in c]
    parts = [
        f"# data benchmark: {env['gpu']}",
        "_Generated from the JSON file of the same name by `bench/data.py`; do not edit by hand._",
        f"- date (UTC) {env['date_utc']} · commit `{env['commit'][:12]}{' (dirty)' if env.get('dirty') else ''}` · "
        f"torch {env['torch']} · python {env['python']} · {env['platform']}\n"
        + "\n".join(f"- {k}: `{v}`" for k, v in payload["config"].items()),
        "## Providers\n\n" + "\n".join(f"- `{k}`: {v}" for k, v in payload["providers"].items()),
        "## Targets\n\n" + harness.checks_table(payload),
        "## Throughput: images/s per worker (one thread)\n\n"
        + harness._table(["workload", "images", "patches/image"] + providers, rows)
        + f"\n\nCells: images/s; a baseline's cell also shows {OURS}'s speedup over it.",
        "## Fidelity: mean |finevit − hf_pil| of the resized pixels (0..255 levels)\n\n"
        + harness._table(["workload", "with JPEG draft", "without draft"], fidelity_rows),
    ]
    reasons = [f"- `{r['provider']}` on {r['case']}: {r['status']} ({r['reason']})"
               for r in payload["results"] if r["status"] != "ok"]
    if reasons:
        parts.append("## Skipped and failed\n\n" + "\n".join(reasons))
    return "\n\n".join(parts) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images per workload")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny workloads, to check the script (seconds)")
    parser.add_argument("--out", default=None, help="results directory (default bench/results/)")
    parser.add_argument("--providers", type=harness.name_list(list(PROVIDERS)), default=None,
                        help=f"comma-separated subset of {','.join(PROVIDERS)}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # one DataLoader worker's share of the CPU
    providers = harness.ours_first(args.providers or PROVIDERS, OURS)  # the baselines' grids are checked against it
    plan = "smoke" if args.cpu_smoke else "quick" if args.quick else "full"
    env = harness.environment(torch.device("cpu"))
    import PIL
    import transformers
    payload = {
        "bench": "data",
        "env": env,
        "config": {"plan": plan, "token_budget": TOKEN_BUDGET, "image_config": IMAGE_CONFIG.__dict__,
                   "torch_threads": 1, "pillow": PIL.__version__, "transformers": transformers.__version__,
                   "argv": sys.argv[1:] if argv is None else argv},
        "metric": {"unit": "images/s", "ceiling": None},
        "ours": OURS,
        "providers": {p: PROVIDERS[p][1] for p in providers},
        "modes": [MODE],
        "cases": [],
        "results": [],
        "checks": [],
    }
    print(f"{env['gpu']} · torch {env['torch']} · transformers {transformers.__version__} · "
          f"commit {env['commit'][:12]}")
    for name, kind, count, height, width in WORKLOADS[plan]:
        images = make_workload(kind, count, height, width)
        case, records = run_case(name, images, providers, min_seconds=0.2 if args.cpu_smoke else 2.0)
        if "hf_pil" in providers:
            case.update(fidelity(images))
        payload["cases"].append(case)
        payload["results"] += records
        payload["checks"] = checks(payload)
        path = harness.write_results(payload, args.out)  # after every case: a cut-short run keeps its numbers
    path.with_suffix(".md").write_text(markdown(payload))
    print("\n" + harness.checks_table(payload))
    print(f"\nwrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
