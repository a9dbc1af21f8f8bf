"""Small image helpers shared by training, generation and the comparison (PIL + numpy; no torchvision)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image


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
    """Tiles images (all the same size) into one picture, `cols` per row, on white."""
    tiles = [to_pil(im) for im in images]
    if not tiles:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    w, h = tiles[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), (255, 255, 255))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid.paste(tile, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
