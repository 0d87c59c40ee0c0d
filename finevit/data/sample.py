"""From a raw webdataset sample (bytes per extension) to a validated, preprocessed `Sample`.

The sample format is docs/design.md's: `<key>.jpg|jpeg|png|webp` plus `<key>.json`
    {"caption": str, "short_caption": str (optional), "regions": [{"bbox": [x0, y0, x1, y1], "caption": str}]}
with bboxes normalized to [0, 1], (x0, y0) top-left. Other JSON fields are kept (the embedded dataset adds
"hard_negatives", "labels", "width", "height") and evaluation reads them.

Every rejected sample raises `BadSampleError` whose `reason` names the counter it is reported under:
    missing_json   no .json member                    bad_json       not UTF-8 JSON, not an object, or a
    missing_image  no image member                                   field of the wrong type
    empty_caption  "caption" missing or blank         bad_bbox       a bbox that is not 4 finite numbers,
    bad_region     a region that is not an object                    lies outside [0, 1] by more than
                   with a non-empty "caption"                        BBOX_TOLERANCE, or has zero area
    decode         zero-byte, truncated or undecodable image bytes
    too_small      a side below ImageConfig.min_side (e.g. 1×1)
    bad_aspect     aspect ratio above ImageConfig.max_aspect (e.g. 20000×50)
    too_many_patches   more patches than the token budget after resizing
    error          anything else an unforeseen input raises (the loader counts it instead of stopping)
The JSON is checked before the image is decoded, so a bad annotation costs no decode.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time

import numpy as np
import torch

from .image import BadImageError, ImageConfig, grid_of, load_resized
from .packing import Sample

logger = logging.getLogger("finevit.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
BBOX_TOLERANCE = 1e-3  # coordinates within this of [0, 1] are clamped (rounding in exporters), beyond it rejected


class BadSampleError(ValueError):
    """A sample the loader skips; `reason` is its counter name (see the module docstring)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _check_bbox(bbox) -> list[float]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise BadSampleError("bad_bbox", f"bbox must be a list of 4 numbers, got {bbox!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        raise BadSampleError("bad_bbox", f"bbox must hold 4 finite numbers, got {bbox!r}")
    if min(bbox) < -BBOX_TOLERANCE or max(bbox) > 1 + BBOX_TOLERANCE:
        raise BadSampleError("bad_bbox", f"bbox {bbox!r} lies outside [0, 1]")
    x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in bbox)
    if x1 <= x0 or y1 <= y0:
        raise BadSampleError("bad_bbox", f"bbox {bbox!r} has zero or negative area")
    return [x0, y0, x1, y1]


def parse_annotation(data: bytes | None) -> dict:
    """Validate a sample's JSON; returns it with regions' bboxes clamped to [0, 1] (other fields unchanged)."""
    if data is None:
        raise BadSampleError("missing_json", "sample has no .json member")
    try:
        annotation = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadSampleError("bad_json", f"malformed JSON: {exc}") from exc
    if not isinstance(annotation, dict):
        raise BadSampleError("bad_json", f"JSON must be an object, got {type(annotation).__name__}")
    caption = annotation.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise BadSampleError("bad_json", f"caption must be a string, got {type(caption).__name__}")
    if not caption or not caption.strip():
        raise BadSampleError("empty_caption", "caption is missing or empty")
    short = annotation.get("short_caption")
    if short is not None and not isinstance(short, str):
        raise BadSampleError("bad_json", f"short_caption must be a string, got {type(short).__name__}")
    regions = annotation.get("regions", [])
    if not isinstance(regions, list):
        raise BadSampleError("bad_json", f"regions must be a list, got {type(regions).__name__}")
    checked = []
    for region in regions:
        if not isinstance(region, dict) or not isinstance(region.get("caption"), str) or not region["caption"].strip():
            raise BadSampleError("bad_region", f"a region must be an object with a non-empty caption, got {region!r}")
        checked.append({**region, "bbox": _check_bbox(region.get("bbox"))})
    annotation["regions"] = checked
    return annotation


def image_bytes(raw: dict) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in raw:
            return raw[ext]
    raise BadSampleError("missing_image", f"sample has no image member ({', '.join(IMAGE_EXTENSIONS)})")


def choose_caption(annotation: dict, key: str, short_caption_prob: float, salt: str = "") -> str:
    """The caption to train on: the dense "caption", or with probability `short_caption_prob` the
    "short_caption" when there is one. The draw is a function of (salt, key) only: the loader salts it with
    its seed and reader position, so it is reproducible, independent of the worker layout, and new each epoch."""
    short = annotation.get("short_caption")
    if short_caption_prob > 0 and short and short.strip():
        if random.Random(f"{salt}/{key}").random() < short_caption_prob:
            return short
    return annotation["caption"]


def decode_raw(raw: dict, config: ImageConfig, token_budget: int) -> tuple[dict, torch.Tensor, tuple[int, int]]:
    """Raw webdataset sample {"__key__", "jpg"|..., "json"} -> (annotation, resized uint8 image (3, H, W), grid).

    Raises BadSampleError (the JSON is checked first, so a bad annotation costs no decode).
    """
    annotation = parse_annotation(raw.get("json"))
    data = image_bytes(raw)
    try:
        image = load_resized(data, config)
    except BadImageError as exc:
        raise BadSampleError(exc.reason, str(exc)) from exc
    grid = grid_of(image, config.patch_size)
    if grid[0] * grid[1] > token_budget:
        raise BadSampleError("too_many_patches", f"{grid[0] * grid[1]} patches exceed token_budget={token_budget}")
    return annotation, image, grid


def make_sample(raw: dict, config: ImageConfig, token_budget: int, with_regions: bool = False,
                short_caption_prob: float = 0.0, salt: str = "") -> Sample:
    """Raw webdataset sample -> the training Sample (caption chosen, regions kept when asked)."""
    key = raw["__key__"]
    annotation, image, grid = decode_raw(raw, config, token_budget)
    sample = Sample(key=key, image=image, grid_hw=grid,
                    text=choose_caption(annotation, key, short_caption_prob, salt))
    if with_regions and annotation["regions"]:
        sample.region_boxes = np.asarray([r["bbox"] for r in annotation["regions"]], dtype=np.float32)
        sample.region_texts = [r["caption"] for r in annotation["regions"]]
    return sample


class SkipReporter:
    """Counts skipped samples by reason into `counts` and logs them rate-limited: the first skip of each
    reason, then at most one warning per reason every `interval_s` seconds, with the running count."""

    def __init__(self, counts: dict[str, int], interval_s: float = 60.0, who: str = "finevit.data"):
        self.counts, self.interval_s, self.who = counts, interval_s, who
        self.last_warned: dict[str, float] = {}

    def __call__(self, reason: str, where: str, error: Exception) -> None:
        count = self.counts.get(reason, 0) + 1
        self.counts[reason] = count
        now = time.monotonic()
        last = self.last_warned.get(reason)
        if last is None or now - last >= self.interval_s:
            self.last_warned[reason] = now
            logger.warning("%s: skipped %s (%s: %s); %d skipped for this reason so far (one warning per "
                           "reason every %gs)", self.who, where, reason, error, count, self.interval_s)
