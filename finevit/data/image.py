"""Native-resolution image preprocessing: decode → smart_resize → antialiased resize → patchify → boxes.

    bytes ── header: upright size ── target_size (rejects degenerate images; smart_resize picks (H, W):
          multiples of patch_size·merge_size, pixels in [min_pixels, max_pixels], aspect kept; or, with
          square_side set, (square_side, square_side) as a fixed-resolution encoder sees it)
          ── decode (JPEG: DCT-domain downscale), mode rule, EXIF orientation ── antialiased resize
          ── uint8 (3, H, W) ── patchify ──> uint8 (gh·gw, 3·P·P), grid (gh, gw)

`load_resized` does everything up to the resized uint8 image; the loader, the evaluations and bench/data.py
then patchify it straight into the packed batch (`finevit.data.packing.collate_images`), and
`preprocess_image` does all of it for one image. The patch layout is the packed vision batch of
docs/design.md: each row is one P×P patch flattened in (C, P, P) order (so
`Conv2d(C, D, P, stride=P).weight.reshape(D, -1)` applies to it), rows in raster order, positions (row, col).
Everything stays uint8: normalization happens in the model's patch embedding.

Mode conversion rule (documented because every pipeline picks a different one):
    RGB                          kept
    L, 1                         gray, replicated to 3 channels (after the resize, so it costs 1/3)
    I;16*, I (16-bit gray)       v / 257 rounded (65535 -> 255), then as L
    F (float gray)               clipped to [0, 255], then as L
    RGBA, LA, La, RGBa, PA, P with transparency
                                 alpha-composited over white (transparent logos stay visible)
    P without transparency, CMYK, YCbCr, LAB, HSV
                                 PIL's conversion to RGB (no ICC colour management)
EXIF orientation (tags 2–8) is applied before the resize (the target size is computed on the upright size).
JPEGs are decoded by libjpeg-turbo through `simplejpeg` when it is installed (bit-identical to Pillow's
decode, about twice as fast), else by Pillow. A JPEG at least twice the target size each way is decoded with
libjpeg's DCT-domain downscaling (scale 1/2, 1/4 or 1/8, never below the target size; Pillow's `draft`
rule), so a 12 MP photo is never decoded at full size. The resize is torch's antialiased uint8 kernel (the
Pillow-SIMD algorithm: it equals Pillow's resize to ~0.02 levels on average and runs several times faster).
bench/data.py records the mean absolute pixel difference against transformers' Qwen2-VL processor.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:
    import simplejpeg
except ImportError:  # optional: Pillow decodes JPEGs too, about half as fast
    simplejpeg = None

PREPROCESS_CONFIG_NAME = "preprocess.json"

# EXIF orientation tag -> the PIL transpose that displays the image upright.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}
_ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}
RESAMPLE_MODES = ("bicubic", "bilinear")


class BadImageError(ValueError):
    """An image the pipeline refuses (undecodable, too small, too elongated).

    `reason` is the short counter name the loader reports skips under.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageConfig:
    patch_size: int = 16  # side of a square patch P, in pixels (the model's FineViTConfig.patch_size)
    merge_size: int = 2  # sides are multiples of patch_size·merge_size (2: stage 2's 2×2 patch merger fits)
    min_pixels: int = 64 * 64  # smallest resized H·W (small images are upscaled to reach it)
    max_pixels: int = 1024 * 1024  # largest resized H·W (large images are downscaled to fit)
    min_side: int = 8  # images with a side below this (before resizing) are rejected as degenerate
    max_aspect: float = 200.0  # images with max(H, W) / min(H, W) above this are rejected (Qwen2-VL's limit)
    resample: str = "bicubic"  # "bicubic" (Qwen2-VL) or "bilinear" (SigLIP 2); always antialiased
    draft: bool = True  # let libjpeg downscale large JPEGs in the DCT domain before the resize
    square_side: int = 0  # 0: native resolution (smart_resize, aspect kept); N: every image resized to N×N
    #                       (aspect not kept, min/max_pixels unused), as fixed-resolution encoders (CLIP, SigLIP) do

    def __post_init__(self):
        if self.patch_size < 1 or self.merge_size < 1:
            raise ValueError(f"ImageConfig: patch_size and merge_size must be >= 1, got {self.patch_size}, "
                             f"{self.merge_size}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"ImageConfig: need 0 < min_pixels <= max_pixels, got {self.min_pixels}, "
                             f"{self.max_pixels}")
        if self.max_pixels < self.factor**2:
            raise ValueError(f"ImageConfig: max_pixels={self.max_pixels} is below one factor² = {self.factor ** 2}")
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(f"ImageConfig: resample must be one of {RESAMPLE_MODES}, got {self.resample!r}")
        if self.max_aspect < 1 or self.min_side < 1:
            raise ValueError(f"ImageConfig: need max_aspect >= 1 and min_side >= 1, got {self.max_aspect}, "
                             f"{self.min_side}")
        if self.square_side < 0 or self.square_side % self.factor:
            raise ValueError(f"ImageConfig: square_side must be 0 (native resolution) or a positive multiple of "
                             f"patch_size·merge_size = {self.factor}, got {self.square_side}")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this."""
        return self.patch_size * self.merge_size

    @property
    def max_patches(self) -> int:
        """Patches of an image resized to max_pixels, what a token budget must hold. (smart_resize can exceed
        it only for extreme aspect ratios, where a side is raised to one factor; the loader skips those.)
        With square_side set, every image has exactly (square_side / patch_size)² patches."""
        if self.square_side:
            return (self.square_side // self.patch_size) ** 2
        return max(self.max_pixels, self.factor**2) // self.patch_size**2

    @classmethod
    def for_model(cls, vision_config, **overrides) -> ImageConfig:
        """The config matching a FineViTConfig's patch size (channels are always RGB here)."""
        if getattr(vision_config, "in_channels", 3) != 3:
            raise ValueError(f"ImageConfig: the pipeline produces RGB patches, the model has "
                             f"in_channels={vision_config.in_channels}")
        return cls(patch_size=vision_config.patch_size, **overrides)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `preprocess.json` into `directory` (beside a checkpoint, so evaluation resizes the same way)."""
        path = Path(directory) / PREPROCESS_CONFIG_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ImageConfig:
        values = json.loads((Path(directory) / PREPROCESS_CONFIG_NAME).read_text())
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"ImageConfig.load: unknown field(s) {sorted(unknown)} in {directory}")
        return cls(**values)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen2-VL's target size: (H, W) multiples of `factor`, H·W in [min_pixels, max_pixels], aspect kept.

    Same arithmetic as `transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize` (tested
    against it): round each side to the nearest multiple; if the area is too large, scale both sides by
    1/sqrt(area / max_pixels) and floor (never below one factor); if too small, scale up and ceil.
    Raises ValueError when the aspect ratio exceeds 200, as transformers does.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"smart_resize: height and width must be positive, got {height}, {width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got "
                         f"{max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def target_size(height: int, width: int, config: ImageConfig) -> tuple[int, int]:
    """Validate an (upright) image size against `config` and return its resized (H, W).

    Raises BadImageError("too_small" | "bad_aspect") for degenerate images, e.g. 1×1 or 20000×50 (in both
    modes, so native and square runs see the same images). With `config.square_side` set the size is
    (square_side, square_side), aspect not kept (min_pixels / max_pixels unused); else smart_resize's.
    """
    if min(height, width) < config.min_side:
        raise BadImageError("too_small", f"image is {height}x{width}, a side is below min_side={config.min_side}")
    aspect = max(height, width) / min(height, width)
    if aspect > config.max_aspect:
        raise BadImageError("bad_aspect", f"image is {height}x{width}, aspect ratio {aspect:.1f} exceeds "
                                          f"max_aspect={config.max_aspect}")
    if config.square_side:
        return config.square_side, config.square_side
    return smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)


def _to_rgb_or_l(img: Image.Image) -> Image.Image:
    """Apply the module's mode conversion rule; the result is "RGB" or "L" (gray, expanded later)."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), "L")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _open(data: bytes) -> Image.Image:
    if len(data) == 0:
        raise BadImageError("decode", "zero-byte image")
    try:
        return Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise BadImageError("decode", f"undecodable image bytes: {exc}") from exc


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a corrupt EXIF block only loses the orientation
        return 1


def _upright(img: Image.Image, orientation: int) -> Image.Image:
    """Mode rule then EXIF orientation: an upright "RGB" or "L" image (decodes the pixels)."""
    try:
        img = _to_rgb_or_l(img)
        img.load()
        return img.transpose(_ORIENTATION[orientation]) if orientation in _ORIENTATION else img
    except Exception as exc:  # truncated files surface here, when the pixels are read
        raise BadImageError("decode", f"image could not be decoded: {exc}") from exc


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> upright RGB PIL image at full resolution (the module's mode rule, EXIF applied)."""
    img = _open(data)
    img = _upright(img, _orientation(img))
    return img.convert("RGB") if img.mode != "RGB" else img


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) or (H, W, C) array -> (1, C, H, W) view (channels-last strides, no copy)."""
    if array.ndim == 2:
        array = array[:, :, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable": it is only read
        return torch.from_numpy(array).permute(2, 0, 1)[None]


def _orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to (..., H, W) pixels: the same transforms as `_ORIENTATION` (PIL's)."""
    if orientation == 2:
        return pixels.flip(-1)
    if orientation == 3:
        return pixels.flip(-2, -1)
    if orientation == 4:
        return pixels.flip(-2)
    if orientation == 5:
        return pixels.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(pixels, -1, dims=(-2, -1))
    if orientation == 7:
        return pixels.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(pixels, 1, dims=(-2, -1))
    return pixels


def _draft_scale(raw_w: int, raw_h: int, want_w: int, want_h: int) -> int:
    """The DCT downscale libjpeg can apply: the largest of 8, 4, 2, 1 that keeps both sides >= the wanted
    ones (Pillow's `draft` rule)."""
    ratio = min(raw_w // want_w, raw_h // want_h)
    return next((s for s in (8, 4, 2) if ratio >= s), 1)


def _decode_jpeg(data: bytes, img: Image.Image, scale: int) -> torch.Tensor | None:
    """libjpeg-turbo through simplejpeg, at 1/scale: (1, C, h, w), or None to fall back to Pillow (simplejpeg
    missing, a CMYK JPEG, or data it rejects; Pillow then decodes it or reports it bad)."""
    if simplejpeg is None or img.mode not in ("RGB", "L"):
        return None
    raw_w, raw_h = img.size
    try:
        array = simplejpeg.decode_jpeg(data, "GRAY" if img.mode == "L" else "RGB",
                                       min_height=-(-raw_h // scale), min_width=-(-raw_w // scale))
    except ValueError:
        return None
    return _as_tensor(array)


def load_resized(data: bytes, config: ImageConfig) -> torch.Tensor:
    """Encoded bytes -> upright uint8 (3, H, W) image, resized to `target_size` of its upright size.

    Reads the size from the header first, so a degenerate image is rejected before it is decoded. JPEGs are
    decoded by libjpeg-turbo through simplejpeg when it is installed (bit-identical to Pillow's decode, about
    twice as fast), else by Pillow; both apply the same DCT downscale. The resize is torch's antialiased uint8
    kernel (`F.interpolate(..., antialias=True)`: the Pillow-SIMD algorithm, equal to Pillow's resize to
    ~0.02 levels on average, several times faster). Raises BadImageError ("decode", "too_small", "bad_aspect").
    """
    img = _open(data)
    orientation = _orientation(img)
    raw_w, raw_h = img.size
    swap = orientation in _SWAPS_AXES
    out_h, out_w = target_size(*((raw_w, raw_h) if swap else (raw_h, raw_w)), config)
    want_w, want_h = (out_h, out_w) if swap else (out_w, out_h)  # the target before the orientation
    pixels = None
    if img.format == "JPEG":
        scale = _draft_scale(raw_w, raw_h, want_w, want_h) if config.draft else 1
        pixels = _decode_jpeg(data, img, scale)
        if pixels is None and scale > 1:
            img.draft(img.mode, (want_w, want_h))  # Pillow picks the same scale
    if pixels is None:
        pixels = _as_tensor(np.asarray(_upright(img, 1)))  # (1, C, h, w), C = 3 or 1
    pixels = _orient(pixels, orientation)
    if pixels.shape[-2:] != (out_h, out_w):
        pixels = F.interpolate(pixels, size=(out_h, out_w), mode=config.resample, antialias=True)
    return pixels[0].expand(3, out_h, out_w)


def patch_view(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """uint8 (C, H, W), H and W multiples of P -> a (gh, gw, C, P, P) view of its patches (no copy)."""
    channels, height, width = image.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"patchify: image {height}x{width} is not a multiple of patch_size={patch_size}")
    gh, gw = height // patch_size, width // patch_size
    return image.reshape(channels, gh, patch_size, gw, patch_size).permute(1, 3, 0, 2, 4)  # (gh, gw, C, P, P)


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """uint8 (C, H, W) with H, W multiples of P -> (gh·gw, C·P·P) rows in raster order, each in (C, P, P) order
    (the layout `Conv2d(C, D, P, stride=P).weight.reshape(D, -1)` applies to)."""
    view = patch_view(image, patch_size)
    return view.reshape(view.shape[0] * view.shape[1], -1)


def unpatchify(patches: torch.Tensor, grid_hw: tuple[int, int], patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: (gh·gw, C·P·P) -> (C, gh·P, gw·P)."""
    gh, gw = grid_hw
    image = patches.reshape(gh, gw, channels, patch_size, patch_size).permute(2, 0, 3, 1, 4)  # (C, gh, P, gw, P)
    return image.reshape(channels, gh * patch_size, gw * patch_size)


def grid_positions(grid_hw: tuple[int, int]) -> torch.Tensor:
    """int32 (gh·gw, 2) = (row, col) of each patch in raster order."""
    gh, gw = grid_hw
    rows = torch.arange(gh, dtype=torch.int32).repeat_interleave(gw)
    cols = torch.arange(gw, dtype=torch.int32).repeat(gh)
    return torch.stack([rows, cols], dim=1)


def boxes_to_grid(boxes: np.ndarray, grid_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Normalized (x0, y0, x1, y1) boxes (K, 4) -> their place on an image's patch grid.

    Returns
        patch_boxes float32 (K, 4): (x0, y0, x1, y1) in patch units (x·gw, y·gh), for RoIAlign-style pooling
        cells int32 (K, 4): (row0, col0, row1, col1), the half-open range of patch cells the box touches,
            at least one cell each way (a box thinner than a patch still owns the cell it lies in)
    Valid because the resize maps the whole image onto the whole grid: normalized coordinates are unchanged.
    """
    gh, gw = grid_hw
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale = np.array([gw, gh, gw, gh], dtype=np.float64)
    patch_boxes = boxes * scale
    col0 = np.clip(np.floor(patch_boxes[:, 0]), 0, gw - 1)
    row0 = np.clip(np.floor(patch_boxes[:, 1]), 0, gh - 1)
    col1 = np.clip(np.maximum(np.ceil(patch_boxes[:, 2]), col0 + 1), 1, gw)
    row1 = np.clip(np.maximum(np.ceil(patch_boxes[:, 3]), row0 + 1), 1, gh)
    cells = np.stack([row0, col0, row1, col1], axis=1).astype(np.int32)
    return patch_boxes.astype(np.float32), cells


def preprocess_image(data: bytes, config: ImageConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """Encoded bytes -> (uint8 patches (gh·gw, 3·P·P), grid (gh, gw)). Raises BadImageError on bad input.

    The loader does not call this: it keeps the resized image (`load_resized`) and patchifies it straight into
    the packed batch (`finevit.data.packing.collate_images`), which saves a copy.
    """
    image = load_resized(data, config)
    return patchify(image, config.patch_size), grid_of(image, config.patch_size)


def grid_of(image: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """The patch grid (gh, gw) of a (C, H, W) image."""
    return image.shape[-2] // patch_size, image.shape[-1] // patch_size
