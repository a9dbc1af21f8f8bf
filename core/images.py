"""Small image helpers shared by training, generation and the comparison: PIL conversion and image grids.

The tiling itself is diffusers' `make_image_grid`; these helpers add what it leaves to the caller (a white border
between tiles, a row count from the image count, tensors in [0, 1] as input).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageOps

WHITE = (255, 255, 255)


def to_pil(image) -> Image.Image:
    """A PIL image from PIL, an (H, W, C) array in [0, 1] or 0..255, or a (C, H, W) tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("RGB")


def make_grid(images: Sequence, cols: int | None = None, pad: int = 2) -> Image.Image:
    """Tiles images (all the same size) into one picture, `cols` per row (default: a square), on white.

    Every tile has `pad` white pixels on each side, shared between neighbours; a short last row is left white."""
    tiles = [to_pil(im) for im in images]
    if not tiles:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    tiles += [Image.new("RGB", tiles[0].size, WHITE)] * (rows * cols - len(tiles))  # diffusers wants rows * cols
    # Each tile carries the border on its left and top; the grid gets the right and bottom edge once.
    tiles = [ImageOps.expand(tile, border=(pad, pad, 0, 0), fill=WHITE) for tile in tiles]
    return ImageOps.expand(make_image_grid(tiles, rows, cols), border=(0, 0, pad, pad), fill=WHITE)


def tensor_grid(x: torch.Tensor, cols: int = 8, pad: int = 1) -> Image.Image:
    """A batch (N, C, H, W) in [0, 1] (C = 1 or 3) as one RGB grid, `cols` wide (fewer when N is smaller)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"tensor_grid needs (N, 1 or 3, H, W), got {tuple(x.shape)}")
    pixels = x.detach().float().clamp(0, 1).cpu()
    return make_grid(list(pixels), cols=min(cols, len(pixels)), pad=pad)
