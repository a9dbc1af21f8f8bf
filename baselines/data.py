"""The baselines' training data as one tensor: the user's images (through `core.imagefolder`) or the shapes world.

Every family trains on x: (N, C, H, W) in [0, 1] on the grid k / (2**n_bits - 1), so that discrete likelihoods
(bits/dim) are measured on the same data by every family.

Policy for folders and datasets (bad input is an error, never silently fixed):
- every image must have the same size; a square size other than `resolution` is resized (box filter), a
  non-square one is an error;
- every image must have the same kind of mode (grayscale or colour); `channels=None` takes the count from the
  data (1 for grayscale, 3 for colour), `channels=1|3` converts every image to that.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from difftune.core.errors import UserError
from difftune.core.imagefolder import Record, decode_all, read_records
from difftune.toyworld.shapes import BASE_COLOURS, SHAPES, render

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def quantise(pixels: np.ndarray, n_bits: int) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) on the grid k / (2**n_bits - 1)."""
    levels = 2**n_bits - 1
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
    return torch.round(x * levels) / levels


def to_array(image: Image.Image, channels: int, resolution: int) -> np.ndarray:
    """An RGB PIL image as uint8 (H, W, C) at `resolution`, with `channels` 1 (luminance) or 3."""
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BOX)
    if channels == 1:
        return np.asarray(image.convert("L"))[:, :, None]
    return np.asarray(image.convert("RGB"))


def _mode_of(record: Record) -> str:
    with Image.open(io.BytesIO(record.image_bytes())) as image:  # reads the header only
        return image.mode


def _shapes_tensor(resolution: int, channels: int, n_per_class: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    arrays, labels = [], []
    for colour in BASE_COLOURS:
        for shape in SHAPES:
            for _ in range(n_per_class):
                arrays.append(to_array(render(colour, shape, rng, size=resolution), channels, resolution))
                labels.append(f"{colour} {shape}")
    return np.stack(arrays), labels


def _check_same(images: list[Image.Image], records: list[Record], resolution: int) -> None:
    size = images[0].size
    for image, record in zip(images, records, strict=True):
        if image.size != size:
            raise UserError(
                f"{record.name} is {image.size[0]}x{image.size[1]} but {records[0].name} is {size[0]}x{size[1]}; "
                "the baselines need images of one size (resize the dataset first)"
            )
    if size[0] != size[1] and size != (resolution, resolution):
        raise UserError(
            f"images are {size[0]}x{size[1]}, not square; crop them to squares or to --resolution {resolution}"
        )


def _labels_of(records: list[Record], label_column: str) -> list[str]:
    missing = [r.name for r in records if label_column not in r.extra]
    if missing:
        raise UserError(f"--label_column {label_column!r} is missing for {missing[0]} (and {len(missing) - 1} more)")
    return [str(r.extra[label_column]) for r in records]


def load_tensor(
    shapes: bool = False,
    train_data_dir: str | None = None,
    dataset_name: str | None = None,
    resolution: int = 32,
    channels: int | None = None,
    n_bits: int = 8,
    label_column: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    n_per_class: int = 100,
    seed: int = 0,
) -> tuple[torch.Tensor, list[str] | None]:
    """The data as x (N, C, H, W) in [0, 1] on the n_bits grid, and one label per image (or None).

    `shapes=True` renders `n_per_class` images for each base colour and shape (labels ``"colour shape"``);
    otherwise exactly one of `train_data_dir` / `dataset_name` is read through `core.imagefolder`.
    """
    if resolution < 1:
        raise UserError(f"--resolution {resolution} must be a positive number of pixels (e.g. 32)")
    if not 1 <= n_bits <= 8:
        raise UserError(f"--n_bits {n_bits} must be between 1 and 8")
    if channels not in (None, 1, 3):
        raise UserError(f"--channels {channels} must be 1 or 3")
    if shapes:
        if n_per_class < 1:
            raise UserError(f"--n_per_class {n_per_class} must be at least 1")
        if train_data_dir is not None or dataset_name is not None:
            raise UserError("give one of --shapes, --train_data_dir or --dataset_name, not several")
        pixels, labels = _shapes_tensor(resolution, channels or 3, n_per_class, seed)
        return quantise(pixels, n_bits), labels

    records = read_records(
        train_data_dir=train_data_dir,
        dataset_name=dataset_name,
        image_column=image_column,
        caption_column=caption_column,
        require_captions=False,
    )
    images, records = decode_all(records)
    _check_same(images, records, resolution)
    if channels is None:
        gray = [_mode_of(r) in GRAY_MODES for r in records]
        if any(gray) and not all(gray):
            odd = records[gray.index(not gray[0])]
            raise UserError(
                f"{odd.name} is {'grayscale' if not gray[0] else 'colour'} but {records[0].name} is not; "
                "convert the dataset to one mode or pass --channels 1|3"
            )
        channels = 1 if gray[0] else 3
    pixels = np.stack([to_array(image, channels, resolution) for image in images])
    labels = _labels_of(records, label_column) if label_column is not None else None
    return quantise(pixels, n_bits), labels
