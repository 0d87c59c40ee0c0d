"""Image preprocessing: smart_resize against transformers, decoding rules, resize, patch layout, boxes."""

from __future__ import annotations

import io
import itertools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from finevit.data import image as image_module
from finevit.data.image import (
    BadImageError,
    ImageConfig,
    boxes_to_grid,
    decode_image,
    grid_positions,
    load_resized,
    patchify,
    preprocess_image,
    smart_resize,
    target_size,
    unpatchify,
)

from .helpers import encode, random_rgb, smooth_rgb

transformers_smart_resize = pytest.importorskip(
    "transformers.models.qwen2_vl.image_processing_qwen2_vl").smart_resize


# ----------------------------------------------------------------------------------------------------
# smart_resize
# ----------------------------------------------------------------------------------------------------


def _size_cases():
    rng = random.Random(0)
    edge = [(1, 1), (1, 199), (199, 1), (13, 2000), (27, 28), (28, 28), (10, 10), (5000, 30), (4000, 3000),
            (224, 224), (1080, 1920), (96, 1024), (1024, 96), (33, 47)]
    settings = [(28, 56 * 56, 28 * 28 * 1280), (32, 64 * 64, 1024 * 1024), (16, 16 * 16, 256 * 256),
                (14, 14 * 14, 14 * 14 * 4)]
    cases = [(h, w, *s) for (h, w), s in itertools.product(edge, settings)]
    for _ in range(400):
        h, w = rng.randint(1, 6000), rng.randint(1, 6000)
        cases.append((h, w, *rng.choice(settings)))
    return cases


def test_smart_resize_matches_transformers_qwen2_vl():
    for h, w, factor, lo, hi in _size_cases():
        try:
            expected = transformers_smart_resize(h, w, factor, lo, hi)
        except ValueError:
            with pytest.raises(ValueError, match="aspect ratio"):
                smart_resize(h, w, factor, lo, hi)
            continue
        got = smart_resize(h, w, factor, lo, hi)
        assert got == expected, (h, w, factor, lo, hi)
        assert got[0] % factor == 0 and got[1] % factor == 0


def test_smart_resize_keeps_pixels_in_range_and_aspect():
    for h, w, factor, lo, hi in _size_cases():
        if max(h, w) / min(h, w) > 20:
            continue  # extreme aspect: the floor to one factor may break the range (as in transformers)
        out_h, out_w = smart_resize(h, w, factor, lo, hi)
        assert lo <= out_h * out_w
        assert out_h * out_w <= hi or min(out_h, out_w) == factor  # a side floored to 0 is raised to one factor
        if min(out_h, out_w) >= 4 * factor:  # each side off by at most one factor: the aspect is kept
            assert abs(np.log((out_h / out_w) / (h / w))) < 0.3, (h, w, out_h, out_w)


def test_target_size_rejects_degenerate_images():
    config = ImageConfig()
    with pytest.raises(BadImageError) as tiny:
        target_size(1, 1, config)
    assert tiny.value.reason == "too_small"
    with pytest.raises(BadImageError) as thin:
        target_size(50, 20000, config)
    assert thin.value.reason == "bad_aspect"
    assert target_size(96, 1024, config) == smart_resize(96, 1024, 32, 64 * 64, 1024 * 1024)


def test_image_config_validates_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match="min_pixels"):
        ImageConfig(min_pixels=10, max_pixels=5)
    with pytest.raises(ValueError, match="resample"):
        ImageConfig(resample="nearest")
    config = ImageConfig(patch_size=14, max_pixels=448 * 448)
    config.save(tmp_path)
    assert ImageConfig.load(tmp_path) == config
    assert config.factor == 28 and config.max_patches == 448 * 448 // 14**2


# ----------------------------------------------------------------------------------------------------
# Patch layout
# ----------------------------------------------------------------------------------------------------


def test_patchify_matches_conv2d_patch_embedding():
    """(C, P, P)-ordered rows in raster order: unfold's columns, and a Conv2d through the reshaped weight."""
    p, c, h, w = 8, 3, 24, 40
    image = torch.randint(0, 256, (c, h, w), dtype=torch.uint8)
    patches = patchify(image, p)
    assert patches.shape == (h // p * w // p, c * p * p) and patches.dtype == torch.uint8
    unfolded = F.unfold(image[None].double(), kernel_size=p, stride=p)[0].T  # (L, C·P·P), raster order
    torch.testing.assert_close(patches.double(), unfolded, rtol=0, atol=0)
    conv = torch.nn.Conv2d(c, 5, p, stride=p).double()
    expected = conv(image[None].double())[0].flatten(1).T  # (L, 5)
    got = patches.double() @ conv.weight.reshape(5, -1).T + conv.bias
    torch.testing.assert_close(got, expected)


def test_patchify_round_trips_and_positions_are_raster():
    image = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8)
    assert torch.equal(unpatchify(patchify(image, 16), (2, 3), 16), image)
    assert grid_positions((2, 3)).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert grid_positions((2, 3)).dtype == torch.int32
    with pytest.raises(ValueError, match="multiple"):
        patchify(torch.zeros(3, 30, 32, dtype=torch.uint8), 16)


def test_preprocess_image_grid_follows_smart_resize():
    config = ImageConfig(patch_size=16, merge_size=2, min_pixels=64 * 64, max_pixels=256 * 256)
    data = encode(smooth_rgb(300, 500))
    patches, grid = preprocess_image(data, config)
    h, w = smart_resize(300, 500, 32, 64 * 64, 256 * 256)
    assert grid == (h // 16, w // 16) and patches.shape == (grid[0] * grid[1], 3 * 16 * 16)


def test_square_side_squashes_every_image_to_one_square_and_native_keeps_the_aspect():
    data = encode(smooth_rgb(48, 96))
    square = ImageConfig(patch_size=16, merge_size=2, square_side=32)
    assert target_size(48, 96, square) == (32, 32) and square.max_patches == 4
    assert load_resized(data, square).shape == (3, 32, 32)
    patches, grid = preprocess_image(data, square)
    assert grid == (2, 2) and patches.shape == (4, 3 * 16 * 16)
    native = ImageConfig(patch_size=16, merge_size=2, min_pixels=32 * 32, max_pixels=64 * 64)
    _, grid = preprocess_image(data, native)
    assert grid[1] == 2 * grid[0]  # 48×96 keeps its 1:2 aspect
    with pytest.raises(BadImageError) as thin:  # the same images are rejected in both modes
        target_size(2, 96, square)
    assert thin.value.reason == "too_small"


@pytest.mark.parametrize("side", [20, -16, 16])  # 16: a multiple of patch_size but not of patch_size·merge_size
def test_square_side_must_be_a_multiple_of_the_factor(side):
    with pytest.raises(ValueError, match="square_side"):
        ImageConfig(patch_size=16, merge_size=2, square_side=side)


# ----------------------------------------------------------------------------------------------------
# Decoding rules
# ----------------------------------------------------------------------------------------------------


def _decoded(img: Image.Image, fmt: str = "PNG", **options) -> np.ndarray:
    return np.asarray(decode_image(encode(img, fmt, **options)))


def test_gray_and_bilevel_images_become_three_equal_channels():
    gray = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    out = _decoded(Image.fromarray(gray, "L"))
    assert out.shape == (8, 8, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))
    bilevel = Image.fromarray(gray > 127).convert("1")
    assert set(np.unique(_decoded(bilevel))) <= {0, 255}


def test_sixteen_bit_gray_is_scaled_by_257():
    values = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = _decoded(img)
    assert out[0, :, 0].tolist() == [0, 1, 255, 128]


def test_transparency_is_composited_over_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red 200, fully transparent on the left, opaque on the right, half in the middle row
    rgba[:, 2:, 3] = 255
    rgba[3, :2, 3] = 128
    out = _decoded(Image.fromarray(rgba, "RGBA"))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 3].tolist() == [200, 0, 0]
    assert abs(int(out[3, 0, 1]) - 127) <= 1  # half-transparent black over white: mid gray in G and B
    la = Image.fromarray(np.stack([np.full((4, 4), 10, np.uint8), rgba[..., 3]], -1), "LA")
    out = _decoded(la)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 3].tolist() == [10, 10, 10]
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    palette.putpixel((3, 3), 1)
    out = _decoded(palette, transparency=0)
    assert out[0, 0].tolist() == [255, 255, 255] and out[3, 3].tolist() == [0, 255, 0]


def test_cmyk_and_palette_without_transparency_use_pils_conversion():
    cmyk = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 4), dtype=np.uint8), "CMYK")
    assert np.array_equal(_decoded(cmyk, "TIFF"), np.asarray(cmyk.convert("RGB")))
    palette = Image.fromarray(random_rgb(16, 16)).convert("P")
    assert np.array_equal(_decoded(palette), np.asarray(palette.convert("RGB")))


def _with_orientation(array: np.ndarray, orientation: int, fmt: str) -> bytes:
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = orientation
    return encode(img, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pil(fmt, orientation):
    """Grid-sized images (no resize), so load_resized must equal PIL's exif_transpose exactly."""
    array = smooth_rgb(64, 96, seed=orientation)
    data = _with_orientation(array, orientation, fmt)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    config = ImageConfig(patch_size=16, merge_size=2, min_pixels=32 * 32)
    got = load_resized(data, config).permute(1, 2, 0).numpy()
    assert got.shape == expected.shape == ((96, 64, 3) if orientation >= 5 else (64, 96, 3))
    assert np.array_equal(got, expected)
    assert np.array_equal(np.asarray(decode_image(data)), expected)


# ----------------------------------------------------------------------------------------------------
# Resize, JPEG paths
# ----------------------------------------------------------------------------------------------------


def test_resize_is_antialiased_bicubic_like_pillow():
    array = random_rgb(200, 300, seed=3)  # noise: aliasing would show as a large difference
    config = ImageConfig(patch_size=16, merge_size=1, min_pixels=16 * 16, max_pixels=96 * 144)
    got = load_resized(encode(array), config).permute(1, 2, 0).numpy().astype(np.float64)
    h, w = got.shape[:2]
    pil = np.asarray(Image.fromarray(array).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64)
    naive = F.interpolate(torch.from_numpy(array).permute(2, 0, 1)[None].double(), size=(h, w), mode="bicubic",
                          antialias=False)[0].permute(1, 2, 0).clamp(0, 255).numpy()
    assert np.abs(got - pil).mean() < 0.5
    assert np.abs(naive - pil).mean() > 10 * np.abs(got - pil).mean()  # antialiasing matters on noise


def test_large_jpegs_use_dct_downscaling_within_a_level_of_a_full_decode():
    data = encode(smooth_rgb(1600, 2400, seed=4), "JPEG", quality=92)
    config = ImageConfig(patch_size=16, merge_size=2, max_pixels=512 * 512)
    drafted = load_resized(data, config).double()
    full = load_resized(data, ImageConfig(**{**config.__dict__, "draft": False})).double()
    assert drafted.shape == full.shape == (3, *smart_resize(1600, 2400, 32, 64 * 64, 512 * 512))
    assert (drafted - full).abs().mean() < 1.0


def test_simplejpeg_and_pillow_paths_agree(monkeypatch):
    pytest.importorskip("simplejpeg")
    config = ImageConfig(max_pixels=256 * 256)
    for data in (encode(smooth_rgb(700, 500, seed=5), "JPEG"), encode(Image.fromarray(smooth_rgb(90, 130)[..., 0]),
                                                                      "JPEG")):
        fast = load_resized(data, config)
        monkeypatch.setattr(image_module, "simplejpeg", None)
        slow = load_resized(data, config)
        monkeypatch.undo()
        assert torch.equal(fast, slow)


@pytest.mark.parametrize("case", ["zero", "garbage", "truncated_jpeg", "truncated_png", "header_only"])
def test_bad_image_bytes_raise_decode_errors(case, monkeypatch):
    jpeg = encode(smooth_rgb(200, 200), "JPEG")
    png = encode(random_rgb(200, 200))
    data = {"zero": b"", "garbage": b"not an image at all" * 10, "truncated_jpeg": jpeg[: len(jpeg) // 2],
            "truncated_png": png[: len(png) // 2], "header_only": jpeg[:300]}[case]
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(image_module, "simplejpeg", None)
        with pytest.raises(BadImageError) as err:
            preprocess_image(data, ImageConfig())
        assert err.value.reason == "decode"


# ----------------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------------


def test_boxes_map_onto_the_patch_grid():
    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.25, 0.5, 0.5, 0.75], [0.3, 0.3, 0.31, 0.31], [0.9, 0.9, 1.0, 1.0]])
    patch_boxes, cells = boxes_to_grid(boxes, (4, 8))  # 4 rows, 8 columns
    np.testing.assert_allclose(patch_boxes[1], [2.0, 2.0, 4.0, 3.0])
    assert cells.tolist() == [[0, 0, 4, 8],  # the whole grid
                              [2, 2, 3, 4],  # rows 2..3, cols 2..4 (half-open)
                              [1, 2, 2, 3],  # thinner than a patch: the one cell it lies in
                              [3, 7, 4, 8]]
    assert cells.dtype == np.int32 and patch_boxes.dtype == np.float32
