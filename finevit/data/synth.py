"""The embedded fine-grained dataset: procedurally drawn scenes with dense, region and hard-negative captions.

    python -m finevit.data.synth --out data/synth [--seed 0] [--train 5000] [--val 500] [--workers N]

Each image is a canvas of random size (sides 96..1024 px, aspect up to 3:1) with 1–8 non-overlapping
objects. An object has a shape (8), a colour (10), a size class (small / medium-sized / large, relative to
the canvas' shorter side), a fill pattern (solid, striped, dotted, checkered, outlined) and a position (a
3×3 grid: "in the top left", ..., "in the center"). A small object in a large canvas is a few dozen pixels
wide, and its stripes or dots are a few pixels apart: downscaling the image to a fixed square destroys them.

Per image (one webdataset sample, `<key>.jpg` or `.png` + `<key>.json`, docs/design.md's format plus extras):
    caption          dense: the background, every object (largest first) with all its attributes and position,
                     and one spatial or size relation per object ("The red circle is to the left of the blue star.")
    short_caption    alt-text-like: the dominant (largest) object, sometimes a second one or the count
    regions          one per object: normalized tight bbox, caption "a small striped red circle", and
                     region "negatives" (the same phrase with one attribute changed)
    hard_negatives   the dense caption with exactly one change: an object's colour, shape, size, pattern
                     or position, or a relation flipped (left <-> right, above <-> below, larger <-> smaller);
                     "hard_negative_types" names each change
    labels           {"shape", "color"} of the dominant object (zero-shot classification targets)
    width, height    canvas size in pixels
Objects are referred to by "the {colour} {shape}", which is unique within an image, so every negative is
false for the image and every relation is unambiguous (boxes never overlap, so two objects are always
separated horizontally or vertically).

Output layout (DIR):
    train/train-000000.tar ...  sizes.json      shards of `--shard-size` samples and their counts
    val/val-000000.tar ...      sizes.json
    classes.json                 class names and prompt templates of the label keys
    tokenizer/                   a byte-level BPE trained on the train captions (AutoTokenizer-loadable)
    meta.json                    settings, counts and shard specs (written last: its presence means done)
Generation is seeded per sample (seed, split, index), so the output is byte-identical for a seed whatever
the number of worker processes; shards are written atomically and existing ones are kept, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw
from tqdm.auto import tqdm

from .text import save_tokenizer, train_tokenizer

SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "star", "cross")
COLORS = {  # name -> RGB, all distinct from the light backgrounds
    "red": (214, 39, 40), "orange": (245, 130, 20), "yellow": (235, 200, 20), "green": (44, 160, 44),
    "cyan": (23, 190, 207), "blue": (31, 90, 220), "purple": (130, 60, 180), "pink": (240, 110, 180),
    "brown": (140, 86, 45), "black": (25, 25, 25),
}
BACKGROUNDS = {"white": (246, 246, 244), "light gray": (205, 205, 205), "beige": (232, 220, 192),
               "pale blue": (205, 222, 240), "pale green": (212, 234, 206)}
SIZES = {"small": (0.06, 0.11), "medium-sized": (0.14, 0.21), "large": (0.26, 0.36)}  # extent / shorter side
PATTERNS = ("solid", "striped", "dotted", "checkered", "outlined")
PATTERN_NOUNS = {"solid": "a solid fill", "striped": "stripes", "dotted": "dots",
                 "checkered": "a checkerboard pattern", "outlined": "only an outline"}
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
POSITIONS = {("top", "left"): "in the top left", ("top", "center"): "at the top",
             ("top", "right"): "in the top right", ("middle", "left"): "on the left",
             ("middle", "center"): "in the center", ("middle", "right"): "on the right",
             ("bottom", "left"): "in the bottom left", ("bottom", "center"): "at the bottom",
             ("bottom", "right"): "in the bottom right"}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RELATION_FLIPS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above",
                  "larger than": "smaller than", "smaller than": "larger than"}
MIN_PATTERN_PX = 16  # objects narrower than this are always solid (a pattern could not be drawn)
CLASS_TEMPLATES = {
    "shape": ["a {c}.", "a picture of a {c}.", "the largest shape is a {c}.", "a large {c} among other shapes."],
    "color": ["a {c} shape.", "the largest shape is {c}.", "a picture of a {c} object.", "a big {c} shape."],
}
SPLIT_IDS = {"train": 0, "val": 1}
TOKENIZER_SAMPLES = 2000  # the tokenizer is trained on the first train samples (every word occurs there)


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0  # everything is derived from (seed, split, sample index)
    train: int = 5000  # samples in the train split
    val: int = 500  # samples in the val split
    shard_size: int = 250  # samples per tar shard
    min_side: int = 96  # canvas sides are in [min_side, max_side] px
    max_side: int = 1024
    max_aspect: float = 3.0  # canvas aspect ratio at most this
    max_objects: int = 8  # objects per image: 1..max_objects
    negatives: int = 6  # hard-negative captions per image
    region_negatives: int = 2  # negatives per region caption
    png_every: int = 10  # every n-th image is a PNG (the others JPEG, quality 90); 0: never
    vocab_size: int = 4096  # tokenizer vocabulary bound (FineCLIP's tiny text tower has 4096 ids)

    def count(self, split: str) -> int:
        return {"train": self.train, "val": self.val}[split]


# ----------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------


def sample_canvas_size(rng: np.random.Generator, config: SynthConfig) -> tuple[int, int]:
    """(height, width): geometric-mean side log-uniform in [min_side, max_side], aspect log-uniform within
    max_aspect, both sides clipped to [min_side, max_side]."""
    side = math.exp(rng.uniform(math.log(config.min_side), math.log(config.max_side)))
    aspect = math.exp(rng.uniform(-math.log(config.max_aspect), math.log(config.max_aspect)))  # h / w
    h = int(np.clip(round(side * math.sqrt(aspect)), config.min_side, config.max_side))
    w = int(np.clip(round(side / math.sqrt(aspect)), config.min_side, config.max_side))
    return h, w


def _size_class(extent: float) -> str:
    return "small" if extent < 0.125 else "medium-sized" if extent < 0.24 else "large"


def _place_objects(rng: np.random.Generator, height: int, width: int, count: int) -> list[dict]:
    """Up to `count` objects with unique (colour, shape), non-overlapping boxes and a unique largest one."""
    short = min(height, width)
    extents = [rng.uniform(*SIZES[list(SIZES)[rng.integers(3)]]) for _ in range(count)]
    extents.sort(reverse=True)
    for i in range(1, len(extents)):  # the dominant object is at least 1.25× wider than any other
        extents[i] = min(extents[i], extents[0] / 1.25)
    objects, used, boxes = [], set(), []
    for extent in extents:
        px = max(6, int(round(extent * short)))
        margin = max(2, px // 8)
        for _ in range(30):
            x0, y0 = int(rng.integers(0, width - px + 1)), int(rng.integers(0, height - px + 1))
            box = (x0, y0, x0 + px, y0 + px)
            if all(box[0] >= b[2] + margin or box[2] + margin <= b[0] or box[1] >= b[3] + margin
                   or box[3] + margin <= b[1] for b in boxes):
                break
        else:
            continue  # no room left for this object
        while True:
            color, shape = list(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
            if (color, shape) not in used:
                break
        pattern = PATTERNS[rng.integers(len(PATTERNS))] if px >= MIN_PATTERN_PX else "solid"
        used.add((color, shape))
        boxes.append(box)
        objects.append({"shape": shape, "color": color, "pattern": pattern, "size": _size_class(px / short),
                        "box": box})
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
        obj["position"] = POSITIONS[(ROWS[min(2, int(cy * 3))], COLS[min(2, int(cx * 3))])]
    return objects


def _relation(a: dict, b: dict) -> list[str]:
    """Relations that hold for "a <relation> b" (box a entirely left of / above box b, or 1.5× as wide)."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["box"], b["box"]
    out = []
    if ax1 <= bx0:
        out.append("left of")
    if bx1 <= ax0:
        out.append("right of")
    if ay1 <= by0:
        out.append("above")
    if by1 <= ay0:
        out.append("below")
    if ax1 - ax0 >= 1.5 * (bx1 - bx0):
        out.append("larger than")
    if bx1 - bx0 >= 1.5 * (ax1 - ax0):
        out.append("smaller than")
    return out


# ----------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------


def _shape_mask(shape: str, px: int, inset: float = 0.0) -> Image.Image:
    """An antialiased "L" mask (px × px) of `shape`, shrunk about its centre by `inset` (fraction of px)."""
    ss = 4 if px < 48 else 2 if px < 160 else 1  # supersampling of small shapes
    size = px * ss
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    c, r = size / 2, size / 2 * (1 - 2 * inset)

    def regular(n: int, rotation: float, radius: float = r) -> list[tuple[float, float]]:
        return [(c + radius * math.cos(rotation + 2 * math.pi * k / n),
                 c + radius * math.sin(rotation + 2 * math.pi * k / n)) for k in range(n)]

    if shape == "circle":
        draw.ellipse([c - r, c - r, c + r - 1, c + r - 1], fill=255)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle([c - s, c - s, c + s - 1, c + s - 1], fill=255)
    elif shape == "triangle":
        draw.polygon([(c, c - r), (c + r, c + r * 0.8), (c - r, c + r * 0.8)], fill=255)
    elif shape == "diamond":
        draw.polygon([(c, c - r), (c + r * 0.75, c), (c, c + r), (c - r * 0.75, c)], fill=255)
    elif shape == "pentagon":
        draw.polygon(regular(5, -math.pi / 2), fill=255)
    elif shape == "hexagon":
        draw.polygon(regular(6, 0.0), fill=255)
    elif shape == "star":
        outer, inner = regular(5, -math.pi / 2), regular(5, -math.pi / 2 + math.pi / 5, r * 0.42)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=255)
    elif shape == "cross":
        t = r * 0.36
        draw.rectangle([c - t, c - r, c + t - 1, c + r - 1], fill=255)
        draw.rectangle([c - r, c - t, c + r - 1, c + t - 1], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask.resize((px, px), Image.Resampling.BOX) if ss > 1 else mask


def _contrast(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The second tone of a pattern: white on dark colours, near-black on light ones."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (250, 250, 250) if luminance < 150 else (30, 30, 30)


def _pattern_layer(pattern: str, rgb: tuple[int, int, int], px: int) -> Image.Image:
    """An RGB px × px image of the object's colours before masking."""
    if pattern in ("solid", "outlined"):
        return Image.new("RGB", (px, px), rgb)
    period = max(4, px // 6)
    y, x = np.ogrid[0:px, 0:px]
    if pattern == "striped":
        second = ((x + y) % period) < period / 2
    elif pattern == "checkered":
        cell = max(1, period // 2)
        second = ((x // cell) + (y // cell)) % 2 == 1
    else:  # dotted
        cy, cx = (y % period) - period / 2, (x % period) - period / 2
        second = cy * cy + cx * cx <= (period * 0.28) ** 2
    layer = np.where(second[:, :, None], np.array(_contrast(rgb), np.uint8), np.array(rgb, np.uint8))
    return Image.fromarray(layer.astype(np.uint8), "RGB")


def draw_scene(height: int, width: int, background: str, objects: list[dict],
               rng: np.random.Generator) -> Image.Image:
    """An RGB H × W image: a softly shaded background with every object drawn (antialiased) in its box."""
    # Shading: a gray-level ramp along each axis (up to ±10 levels each), stored around 128 in one "L"
    # plane, then shifted to each channel's level by a lookup table.
    rows = np.linspace(-1, 1, height, dtype=np.float32) * np.float32(rng.uniform(-10, 10)) + np.float32(128.5)
    cols = np.linspace(-1, 1, width, dtype=np.float32) * np.float32(rng.uniform(-10, 10))
    shade = Image.fromarray(np.add.outer(rows, cols).astype(np.uint8), "L")  # (H, W), values 108..149
    levels = np.arange(256) - 128
    image = Image.merge("RGB", [shade.point(np.clip(levels + level, 0, 255).tolist())
                                for level in BACKGROUNDS[background]])
    for obj in objects:
        x0, y0, x1, _ = obj["box"]
        px = x1 - x0
        mask = _shape_mask(obj["shape"], px)
        if obj["pattern"] == "outlined":
            mask = ImageChops.subtract(mask, _shape_mask(obj["shape"], px, max(1.5, px * 0.12) / px))
        image.paste(_pattern_layer(obj["pattern"], COLORS[obj["color"]], px), (x0, y0), mask)
    return image


# ----------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------


def _name(obj: dict) -> str:
    return f"{obj['color']} {obj['shape']}"


def _phrase(obj: dict) -> str:
    """The region caption: "a small striped red circle"."""
    return f"a {obj['size']} {obj['pattern']} {obj['color']} {obj['shape']}"


def _object_sentence(obj: dict, template: int) -> str:
    pos, size, pattern, color, shape = obj["position"], obj["size"], obj["pattern"], obj["color"], obj["shape"]
    if template == 0:
        return f"{pos[0].upper()}{pos[1:]}, there is a {size} {pattern} {color} {shape}."
    if template == 1:
        return f"A {size} {pattern} {color} {shape} is {pos}."
    if template == 2:
        return f"{pos[0].upper()}{pos[1:]} sits a {size} {color} {shape} with {PATTERN_NOUNS[pattern]}."
    return f"There is a {size} {color} {shape} {pos}, drawn with {PATTERN_NOUNS[pattern]}."


def _relation_sentence(a: dict, relation: str, b: dict) -> str:
    verb = {"left of": "is to the left of", "right of": "is to the right of", "above": "is above",
            "below": "is below", "larger than": "is larger than", "smaller than": "is smaller than"}[relation]
    return f"The {_name(a)} {verb} the {_name(b)}."


def render_caption(background: str, objects: list[dict], relations: list[tuple[int, str, int]],
                   choices: dict) -> str:
    """The dense caption of a scene, from template choices drawn once (negatives reuse them)."""
    n = len(objects)
    count = f"{NUMBERS[n]} {'shape' if n == 1 else 'shapes'}"
    opening = (f"The image shows {count} on a {background} background." if choices["opening"] == 0 else
               f"A {background} background with {count}.")
    sentences = [opening]
    sentences += [_object_sentence(objects[i], choices["templates"][i]) for i in choices["order"]]
    sentences += [_relation_sentence(objects[a], rel, objects[b]) for a, rel, b in relations]
    return " ".join(sentences)


def _short_caption(background: str, objects: list[dict], rng: np.random.Generator) -> str:
    main = objects[0]  # the dominant object (placed first)
    kind = int(rng.integers(4)) if len(objects) > 1 else int(rng.integers(2))
    if kind == 0:
        return f"a {_name(main)}"
    if kind == 1:
        return f"a {_name(main)} on {background}"
    if kind == 2:
        return f"{_name(main)} and {NUMBERS[len(objects) - 1]} more {'shape' if len(objects) == 2 else 'shapes'}"
    return f"a {_name(main)} next to a {_name(objects[1])}"


def _perturb(objects: list[dict], relations: list[tuple[int, str, int]], kind: str,
             rng: np.random.Generator) -> tuple[list[dict], list[tuple[int, str, int]]] | None:
    """A copy of the scene with exactly one change of `kind`, or None when that change is impossible."""
    objects = [dict(o) for o in objects]
    if kind == "relation":
        if not relations:
            return None
        i = int(rng.integers(len(relations)))
        a, rel, b = relations[i]
        relations = relations[:i] + [(a, RELATION_FLIPS[rel], b)] + relations[i + 1:]
        return objects, relations
    target = objects[int(rng.integers(len(objects)))]
    names = {(o["color"], o["shape"]) for o in objects}
    field, values = {"color": ("color", list(COLORS)), "shape": ("shape", list(SHAPES)),
                     "size": ("size", list(SIZES)), "pattern": ("pattern", list(PATTERNS)),
                     "position": ("position", list(POSITIONS.values()))}[kind]
    options = [v for v in values if v != target[field]]
    if field in ("color", "shape"):  # keep "the <colour> <shape>" unique
        options = [v for v in options if ((v, target["shape"]) if field == "color" else (target["color"], v))
                   not in names]
    if not options:
        return None
    target[field] = options[int(rng.integers(len(options)))]
    return objects, relations


NEGATIVE_KINDS = ("color", "shape", "size", "pattern", "position", "relation")


def generate_sample(split: str, index: int, config: SynthConfig) -> tuple[bytes, str, dict]:
    """One sample: (encoded image bytes, extension "jpg" | "png", annotation dict)."""
    rng = np.random.default_rng([config.seed, SPLIT_IDS[split], index])
    height, width = sample_canvas_size(rng, config)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    objects = _place_objects(rng, height, width, int(rng.integers(1, config.max_objects + 1)))
    image = draw_scene(height, width, background, objects, rng)

    # Objects are described largest first (they were placed in that order), as a captioner describes the
    # main subject first; one relation per object after the first, to a random earlier object.
    order = list(range(len(objects)))
    relations = []
    for k in range(1, len(order)):
        a, b = order[k], order[int(rng.integers(k))]
        options = _relation(objects[a], objects[b])
        relations.append((a, options[int(rng.integers(len(options)))], b))
    choices = {"opening": int(rng.integers(2)), "order": order,
               "templates": [int(rng.integers(4)) for _ in objects]}
    caption = render_caption(background, objects, relations, choices)

    negatives, kinds = [], []
    for _ in range(config.negatives * 4):  # a few retries: some changes are impossible or repeat
        if len(negatives) == config.negatives:
            break
        kind = NEGATIVE_KINDS[int(rng.integers(len(NEGATIVE_KINDS)))]
        changed = _perturb(objects, relations, kind, rng)
        if changed is None:
            continue
        text = render_caption(background, *changed, choices)
        if text != caption and text not in negatives:
            negatives.append(text)
            kinds.append(kind)

    regions = []
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        region_negatives = []
        for _ in range(config.region_negatives * 4):
            if len(region_negatives) == config.region_negatives:
                break
            kind = NEGATIVE_KINDS[int(rng.integers(4))]  # colour, shape, size or pattern
            changed = _perturb([obj], [], kind, rng)
            if changed is not None and _phrase(changed[0][0]) not in region_negatives:
                region_negatives.append(_phrase(changed[0][0]))
        regions.append({"bbox": [round(x0 / width, 5), round(y0 / height, 5), round(x1 / width, 5),
                                 round(y1 / height, 5)],
                        "caption": _phrase(obj), "negatives": region_negatives})

    annotation = {
        "caption": caption,
        "short_caption": _short_caption(background, objects, rng),
        "regions": regions,
        "hard_negatives": negatives,
        "hard_negative_types": kinds,
        "labels": {"shape": objects[0]["shape"], "color": objects[0]["color"]},
        "width": width,
        "height": height,
    }
    buffer = io.BytesIO()
    png = config.png_every > 0 and index % config.png_every == config.png_every - 1
    if png:
        image.save(buffer, "PNG", compress_level=1)
    else:
        image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue(), "png" if png else "jpg", annotation


# ----------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def shard_spec(split: str, num_shards: int) -> str:
    """The brace spec of a split's shards, relative to the dataset directory."""
    return f"{split}/{split}-{{000000..{num_shards - 1:06d}}}.tar"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "finevit", "finevit"
    tar.addfile(info, io.BytesIO(data))


def write_shard(out: Path, split: str, shard: int, config: SynthConfig) -> int:
    """Generate and atomically write one shard (byte-identical for a seed); returns its sample count."""
    start = shard * config.shard_size
    stop = start + _shard_count(split, shard, config)
    path = out / split / shard_name(split, shard)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(start, stop):
                data, ext, annotation = generate_sample(split, index, config)
                key = f"{split}-{index:07d}"
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.json", json.dumps(annotation, separators=(",", ":")).encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return stop - start


def _write_shard_task(args: tuple[str, str, int, SynthConfig]) -> int:
    out, split, shard, config = args
    return write_shard(Path(out), split, shard, config)


def _num_shards(split: str, config: SynthConfig) -> int:
    return math.ceil(config.count(split) / config.shard_size)


def _shard_count(split: str, shard: int, config: SynthConfig) -> int:
    """Samples in shard `shard` of `split` (the last one may be short)."""
    return min(config.shard_size, config.count(split) - shard * config.shard_size)


def _iter_split_texts(out: Path, split: str, config: SynthConfig, limit: int) -> Iterator[str]:
    """The captions, short captions and region captions of a split's first `limit` samples (the tokenizer's
    corpus; the negatives only recombine the same words)."""
    seen = 0
    for shard in range(_num_shards(split, config)):
        with tarfile.open(out / split / shard_name(split, shard)) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    if seen == limit:
                        return
                    seen += 1
                    a = json.loads(tar.extractfile(member).read())
                    yield a["caption"]
                    yield a["short_caption"]
                    for region in a["regions"]:
                        yield region["caption"]


def generate(out: str | os.PathLike, config: SynthConfig = SynthConfig(), workers: int | None = None,
             progress: bool = True) -> dict:
    """Write the dataset into `out` (see the module docstring); returns the contents of meta.json.

    Shards already present are kept (resume). A directory made with other settings is refused.
    """
    out = Path(out)
    started = time.perf_counter()
    settings_path = out / "synth_config.json"
    settings = asdict(config)
    if settings_path.exists() and json.loads(settings_path.read_text()) != settings:
        raise ValueError(f"synth: {out} holds a dataset generated with other settings "
                         f"({settings_path}); choose another --out or delete it")
    for split in SPLIT_IDS:
        (out / split).mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps(settings, indent=2) + "\n")

    tasks = [(str(out), split, shard, config) for split in SPLIT_IDS for shard in range(_num_shards(split, config))
             if not (out / split / shard_name(split, shard)).exists()]
    todo = sum(_shard_count(split, shard, config) for _, split, shard, _ in tasks)
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    with tqdm(total=todo, unit="img", desc=f"synth -> {out}", disable=not progress) as bar:
        if workers == 1:
            for task in tasks:
                bar.update(_write_shard_task(task))
        else:
            with get_context("fork").Pool(workers) as pool:
                for n in pool.imap_unordered(_write_shard_task, tasks):
                    bar.update(n)

    for split in SPLIT_IDS:
        sizes = {shard_name(split, k): _shard_count(split, k, config) for k in range(_num_shards(split, config))}
        (out / split / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    classes = {"shape": {"classnames": list(SHAPES), "templates": CLASS_TEMPLATES["shape"]},
               "color": {"classnames": list(COLORS), "templates": CLASS_TEMPLATES["color"]}}
    (out / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")
    corpus = _iter_split_texts(out, "train", config, TOKENIZER_SAMPLES)
    tokenizer = train_tokenizer(corpus, vocab_size=config.vocab_size)
    save_tokenizer(tokenizer, out / "tokenizer")
    meta = {
        "name": "finevit-synth",
        "settings": settings,
        "splits": {split: {"num_samples": config.count(split), "num_shards": _num_shards(split, config),
                           "shards": shard_spec(split, _num_shards(split, config))} for split in SPLIT_IDS},
        "tokenizer": "tokenizer",
        "vocab_size": len(tokenizer),
        "classes": "classes.json",
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    defaults = SynthConfig()
    parser = argparse.ArgumentParser(prog="python -m finevit.data.synth", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (created; resumed when it exists)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--train", type=int, default=defaults.train, help="train samples")
    parser.add_argument("--val", type=int, default=defaults.val, help="validation samples")
    parser.add_argument("--shard-size", type=int, default=defaults.shard_size)
    parser.add_argument("--min-side", type=int, default=defaults.min_side)
    parser.add_argument("--max-side", type=int, default=defaults.max_side)
    parser.add_argument("--max-objects", type=int, default=defaults.max_objects)
    parser.add_argument("--negatives", type=int, default=defaults.negatives)
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = SynthConfig(seed=args.seed, train=args.train, val=args.val, shard_size=args.shard_size,
                         min_side=args.min_side, max_side=args.max_side, max_objects=args.max_objects,
                         negatives=args.negatives, vocab_size=args.vocab_size)
    meta = generate(args.out, config, args.workers, progress=not args.no_progress)
    print(f"wrote {args.out}: " + ", ".join(f"{s} {v['num_samples']} samples in {v['num_shards']} shards"
                                             for s, v in meta["splits"].items())
          + f", tokenizer with {meta['vocab_size']} ids, in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
