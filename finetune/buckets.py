"""Aspect-ratio bucketing (NovelAI 2022; kohya's `--enable_bucket`): images train at their own shape.

Buckets are (width, height) pairs whose sides are multiples of `steps`, within [min_reso, max_reso], with an area
of at most resolution². Each image goes to the bucket nearest its aspect ratio, is resized to cover it and
cropped to it; the crop origin is what SDXL's micro-conditioning receives. Every batch holds one bucket.
Without bucketing there is a single bucket, resolution x resolution, and the same sampler.

An edit pair's control image follows its image (`Family.control_size`): into the same bucket when it has the
image's aspect ratio, otherwise at its own aspect ratio, so a batch groups pairs by bucket and control sizes.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
from PIL import Image


def make_buckets(resolution: int, min_reso: int, max_reso: int, steps: int) -> list[tuple[int, int]]:
    max_area = resolution * resolution
    buckets = set()
    for width in range(min_reso, max_reso + 1, steps):
        height = min(max_reso, (max_area // width) // steps * steps)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def assign_bucket(
    size: tuple[int, int], buckets: list[tuple[int, int]], resolution: int, steps: int, no_upscale: bool
) -> tuple[int, int]:
    """The bucket for an image of `size` (w, h)."""
    w, h = size
    if no_upscale and w * h < resolution * resolution:
        # Small images keep their size: the largest step-multiple window with their aspect ratio that fits.
        bw, bh = max(steps, w // steps * steps), max(steps, h // steps * steps)
        return bw, bh
    ratio = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def resize_to_bucket(
    image: Image.Image, bucket: tuple[int, int], crop: tuple[float, float] | None
) -> tuple[Image.Image, tuple[int, int]]:
    """Resizes to cover `bucket` and crops it. `crop` is the (x, y) position in [0, 1] of the window (None: centre).

    Returns the image and the crop's (top, left) in pixels of the resized image, as SDXL's time ids want it.
    """
    bw, bh = bucket
    w, h = image.size
    scale = max(bw / w, bh / h)
    new_w, new_h = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    fx, fy = crop if crop is not None else (0.5, 0.5)
    left, top = round((new_w - bw) * fx), round((new_h - bh) * fy)
    return image.crop((left, top, left + bw, top + bh)), (top, left)


def stretch_to(image: Image.Image, size: tuple[int, int], crop: tuple[float, float] | None = None) -> Image.Image:
    """`image` resized to `size` (w, h) without cropping, its aspect ratio given up by what rounding the sides took
    (how the Qwen-Image-Edit pipelines resize an input image, `VaeImageProcessor.resize`: Lanczos); `crop` unused,
    as in `resize_to_bucket`'s place."""
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def can_move(image_size: tuple[int, int], bucket: tuple[int, int]) -> bool:
    """Whether a crop window for this image in this bucket has room to move (so random crops differ)."""
    w, h = image_size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    return max(bw, round(w * scale)) > bw or max(bh, round(h * scale)) > bh


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices from one bucket each, shuffled by (seed, epoch); call `start_epoch` every epoch."""

    def __init__(self, buckets_of: list[tuple[int, int]], batch_size: int, seed: int):
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, bucket in enumerate(buckets_of):
            groups[bucket].append(index)
        self.groups = dict(sorted(groups.items()))

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, 0xB0C])
        out = []
        for indices in self.groups.values():
            order = rng.permutation(indices).tolist()
            out += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [out[i] for i in rng.permutation(len(out))]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return sum(math.ceil(len(g) / self.batch_size) for g in self.groups.values())
