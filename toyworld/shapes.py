"""The "shapes" world: a deterministic generator of captioned images and an analytic scorer for them.

Each image is 64x64 RGB on white with exactly one filled shape (circle, axis-aligned square or upright
triangle) in one of five fixed colours, captioned ``a {colour} {shape}``. Purple never appears in the base
training set: it is the new concept the LoRA demo teaches.

Edit pairs (`write_edit_dataset`) show one shape twice, at the same place and size in two colours: the control
(input) image and the result of the instruction ``make it {colour}``.

The scorer measures an image without any learned model: the shape's pixels are those far from white, their
median colour is matched to the palette, and the shape is classified from two scale-free features of the
largest blob: its fill ratio inside the bounding box (square 1, circle pi/4, triangle 1/2) and the share of
its area in the top half of the box (triangle 1/4, the others 1/2).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 50, 170),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BASE_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
HELD_OUT_COLOUR = "purple"
BACKGROUND = (255, 255, 255)
SIZE = 64
MIN_BOX, MAX_BOX = 20, 44  # bounding-box side in pixels at SIZE

# Prototype features per shape: (fill ratio in the bounding box, fraction of area in the top half of the box).
_SHAPE_PROTOTYPES = {"square": (1.0, 0.5), "circle": (math.pi / 4, 0.5), "triangle": (0.5, 0.25)}
_SUPERSAMPLE = 4  # draw at 4x and downsample, so edges are anti-aliased like real images


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def parse_caption(text: str) -> tuple[str | None, str | None]:
    """The colour and shape words a caption names (None where it names none)."""
    words = text.lower().replace(",", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return colour, shape


def render(colour: str, shape: str, rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """One image: a filled `shape` in `colour`, its box 20-44 px (scaled to `size`), fully inside the canvas."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; choose from {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    box = int(rng.integers(MIN_BOX, MAX_BOX + 1))
    x0 = int(rng.integers(0, SIZE - box + 1))
    y0 = int(rng.integers(0, SIZE - box + 1))
    s = _SUPERSAMPLE * size / SIZE
    canvas = Image.new("RGB", (round(SIZE * s), round(SIZE * s)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = x0 * s, y0 * s, (x0 + box) * s - 1, (y0 + box) * s - 1
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return canvas.resize((size, size), Image.Resampling.BOX)


@dataclass(frozen=True)
class ShapeItem:
    file_name: str
    text: str
    colour: str
    shape: str


def write_dataset(
    out_dir: str | Path,
    colours: Sequence[str] = BASE_COLOURS,
    shapes: Sequence[str] = SHAPES,
    per_class: int = 100,
    seed: int = 0,
    size: int = SIZE,
) -> list[ShapeItem]:
    """Writes an imagefolder (PNG files + `metadata.jsonl` with `file_name` and `text`) and returns its items.

    The metadata also carries `colour`, `shape` and `label` columns, which the family comparison uses as modes.
    The same arguments always write the same bytes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for colour in colours:
        for shape in shapes:
            for i in range(per_class):
                name = f"{colour}_{shape}_{i:04d}.png"
                render(colour, shape, rng, size).save(out / name)
                items.append(ShapeItem(name, caption(colour, shape), colour, shape))
    with open(out / "metadata.jsonl", "w") as f:
        for item in items:
            row = {"file_name": item.file_name, "text": item.text, "colour": item.colour, "shape": item.shape}
            row["label"] = f"{item.colour} {item.shape}"
            f.write(json.dumps(row) + "\n")
    return items


def instruction(colour: str) -> str:
    """The edit instruction that recolours the shape."""
    return f"make it {colour}"


@dataclass(frozen=True)
class EditItem:
    file_name: str  # the result
    control_file_name: str  # the input
    text: str
    input_colour: str
    colour: str
    shape: str


def write_edit_dataset(
    out_dir: str | Path,
    input_colours: Sequence[str] = BASE_COLOURS,
    colours: Sequence[str] = BASE_COLOURS,
    shapes: Sequence[str] = SHAPES,
    per_class: int = 10,
    seed: int = 0,
    colour_pairs: Sequence[tuple[str, str]] | None = None,
) -> list[EditItem]:
    """Writes an imagefolder of edit pairs and returns its items: for every (input colour, wanted colour) of
    `colour_pairs` (default: every input colour with every wanted colour; a pair listed twice is drawn twice as
    often) and shape, `per_class` shapes drawn once and rendered in both colours, the result as `file_name` and the
    input as `control/<name>` (the `control_file_name` column), captioned ``make it {colour}``. Deterministic."""
    out = Path(out_dir)
    (out / "control").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pairs = colour_pairs if colour_pairs is not None else [(a, b) for a in input_colours for b in colours]
    items = []
    for source, colour in pairs:
        for shape in shapes:
            for _ in range(per_class):
                name = f"{len(items):05d}_{source}_to_{colour}_{shape}.png"
                state = rng.bit_generator.state  # the same draw of size and place for both images
                render(source, shape, rng).save(out / "control" / name)
                rng.bit_generator.state = state
                render(colour, shape, rng).save(out / name)
                items.append(EditItem(name, f"control/{name}", instruction(colour), source, colour, shape))
    with open(out / "metadata.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(asdict(item)) + "\n")
    return items


@dataclass(frozen=True)
class Score:
    colour: str | None  # None: no shape found
    shape: str | None
    fill: float = 0.0
    top_fraction: float = 0.0


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image, dtype=np.float32)
    if arr.max() <= 1.0:  # a float image in [0, 1]
        arr = arr * 255.0
    return arr


def score_image(image: Image.Image | np.ndarray, min_pixels: int = 12) -> Score:
    """The colour and shape this image shows, measured analytically. Accepts PIL or an (H, W, 3) array."""
    rgb = _as_array(image)  # (H, W, 3) in 0..255
    h, w, _ = rgb.shape
    distance = np.linalg.norm(255.0 - rgb, axis=-1)  # (H, W): how far from the white background
    mask = distance > 80.0
    labels, n = ndimage.label(mask)
    if n == 0:
        return Score(None, None)
    sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
    blob = labels == (int(np.argmax(sizes)) + 1)
    area = int(blob.sum())
    if area < min_pixels * (h * w) / (SIZE * SIZE):
        return Score(None, None)

    median = np.median(rgb[blob], axis=0)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    colour = list(COLOURS)[int(np.argmin(np.linalg.norm(palette - median, axis=1)))]

    ys, xs = np.nonzero(blob)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    box_h, box_w = bottom - top + 1, right - left + 1
    fill = area / float(box_h * box_w)
    middle = top + box_h / 2.0
    top_fraction = float((ys + 0.5 < middle).sum()) / area
    # Nearest prototype; the top-half feature is doubled so it weighs like fill (its range is half as wide).
    shape = min(
        _SHAPE_PROTOTYPES,
        key=lambda s: (fill - _SHAPE_PROTOTYPES[s][0]) ** 2 + (2 * (top_fraction - _SHAPE_PROTOTYPES[s][1])) ** 2,
    )
    return Score(colour, shape, fill, top_fraction)


@dataclass(frozen=True)
class Accuracy:
    colour: float
    shape: float
    n: int

    def __str__(self) -> str:
        return f"colour accuracy {self.colour:.2f}, shape accuracy {self.shape:.2f} over {self.n} images"


def accuracy(images: Iterable[Image.Image | np.ndarray], prompts: Iterable[str]) -> Accuracy:
    """Colour and shape accuracy of images against the prompts they were generated from.

    A prompt that names no colour (or no shape) does not count towards that accuracy.
    """
    colour_hits = colour_total = shape_hits = shape_total = n = 0
    for image, prompt in zip(images, prompts, strict=True):
        want_colour, want_shape = parse_caption(prompt)
        got = score_image(image)
        n += 1
        if want_colour is not None:
            colour_total += 1
            colour_hits += got.colour == want_colour
        if want_shape is not None:
            shape_total += 1
            shape_hits += got.shape == want_shape
    return Accuracy(colour_hits / max(colour_total, 1), shape_hits / max(shape_total, 1), n)


def prompts(colours: Sequence[str] = BASE_COLOURS, shapes: Sequence[str] = SHAPES) -> list[str]:
    """The evaluation prompts `a {colour} {shape}` for every pair."""
    return [caption(c, s) for c in colours for s in shapes]
