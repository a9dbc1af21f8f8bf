"""The latent and text-embedding cache: frozen encoders' outputs, computed once and kept on disk.

The VAE and a text encoder that is not trained are frozen, so their outputs are constants: they are encoded once
and kept as safetensors (`<cache_dir>/latents|text/<sha256>.safetensors`). The key of an entry is a fingerprint of
the encoder's weights, the resolution and crop, and the image bytes (or caption), so a changed input is
re-encoded and an unchanged one never is. Each image is encoded alone, so an entry is the same bits whichever images
are encoded beside it (a run killed mid-cache and resumed ends exactly as an uninterrupted one); an unreadable entry
is encoded again; a write that fails (a full disk) is one line. The cache stores the VAE's posterior (mean and log-variance) and a
latent is sampled from it each step, exactly as without the cache. Random flips are cached as a second posterior.
Loss masks are cached with the latents, area-averaged down to the latent grid (and flipped); a mask is part of
its entry's key, so a changed mask is recomputed. An edit pair's control images are cached as training images are
(same keys: the VAE, the size, the image bytes), each example's beside its own.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from difftune.core.config import PASSIVE, SETTABLE, option
from difftune.core.errors import UserError
from difftune.core.files import atomic, reason, stale_temporaries
from difftune.core.imagefolder import Record
from difftune.finetune.buckets import resize_to_bucket, stretch_to

logger = logging.getLogger(__name__)


@dataclass
class CacheConfig:
    """Caching the frozen encoders' outputs (latents, text conditioning) on disk."""

    cache_latents: bool = option("Encode latents and text embeddings once, not every step.", default=True,
                                 resume=SETTABLE, card=False)  # fmt: skip
    cache_dir: str | None = option("Where the latent cache lives; default <output_dir>/.cache.", default=None,
                                   resume=PASSIVE, card=False)  # fmt: skip

    def validate(self) -> None:
        pass


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return arr / 127.5 - 1.0


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """(1, H, W) loss weights in [0, 1] from a grey mask (resampling can overshoot slightly: clamped)."""
    return (torch.from_numpy(np.asarray(mask, dtype=np.float32)) / 255.0).clamp(0.0, 1.0)[None]


def fingerprint_module(module: torch.nn.Module) -> str:
    """sha256 of a module's config and weights: the cache is invalid when either changes."""
    digest = hashlib.sha256(str(getattr(module, "config", "")).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


class EncodeCache:
    """Safetensors files under `root`, one per key; writes are atomic (temporary file, then rename), and the
    temporaries of a killed run are removed when the cache is opened again."""

    def __init__(self, root: Path):
        self.root = root
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"--cache_dir: cannot create {root} ({reason(err)}); choose another --cache_dir") from None
        for tmp in stale_temporaries(self.root):
            tmp.unlink(missing_ok=True)
        self.hits = self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.exists():
            self.misses += 1
            return None
        try:
            entry = load_file(path)
        except (SafetensorError, OSError) as err:  # damaged on disk: encoded again, replaced
            logger.warning("latent cache: %s is unreadable (%s); encoding it again", path, reason(err))
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        try:
            with atomic(self.path(key)) as tmp:
                save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
        except (OSError, SafetensorError) as err:  # a full disk, a quota: the temporary is removed
            raise UserError(
                f"could not write the cache entry {self.path(key)} ({reason(err)}); nothing half-written was kept: "
                "free space (or set --cache_dir elsewhere) and run again: entries already written are reused"
            ) from None


def _key(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def encode_posterior(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's posterior parameters (B, 2C, h, w), mean and log-variance, of `pixels` (B, 3, H, W).

    One image at a time (as diffusers' VAE slicing does): the encoder's activations grow with the batch, and for
    a batch of 16 at 1024 px they are tens of GB, more than training itself needs (`finetune.planner` shows it)."""
    return torch.cat([vae.encode(image).latent_dist.parameters for image in pixels.split(1)])


@torch.no_grad()
def encode_images(
    records: list[Record],
    images: list[Image.Image],
    buckets: list[tuple[int, int]],
    vae,
    random_flip: bool,
    cache_dir: Path,
    masks: list[Image.Image | None] | None = None,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stretch: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Each image's entry: posterior `params` (and `flipped`) of its centre crop in its bucket (or of the image
    stretched to it, `stretch`), from the cache or the VAE (`encode(pixels)`, the family's `posterior`; default the
    VAE's own); with `masks` (None items: no mask, weight 1), its `mask` (and `mask_flipped`) on the latent grid."""
    encode = encode or (lambda pixels: encode_posterior(vae, pixels))
    cache = EncodeCache(cache_dir / "latents")
    vae_fp = fingerprint_module(vae)
    masks = masks if masks is not None else [None] * len(records)
    masked = any(m is not None for m in masks)
    fit = "stretch" if stretch else "center"
    keys = [
        _key(vae_fp, f"{b[0]}x{b[1]}", fit, r.image_bytes(), *([] if m is None else ["mask", m.tobytes()]))
        for r, b, m in zip(records, buckets, masks, strict=True)
    ]
    out: list[dict[str, torch.Tensor] | None] = [None] * len(records)
    todo = []
    for i, key in enumerate(keys):
        hit = cache.get(key)
        if hit is not None and (not random_flip or "flipped" in hit):
            out[i] = hit
        else:
            todo.append(i)
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    # One image per VAE call: an entry then never depends on which other images shared its batch (kernels may round
    # a batch of 16 differently from a batch of 1), so an entry encoded again after a kill, or with other data
    # beside it, is bit-identical to the first encoding.
    for i in todo:
        fitted = stretch_to(images[i], buckets[i]) if stretch else resize_to_bucket(images[i], buckets[i], None)[0]
        pixels = to_tensor(fitted)[None].to(device, dtype)  # (1, 3, H, W)
        params = encode(pixels).float().cpu()  # (1, 2C, h, w)
        entry = {"params": params[0]}
        if random_flip:
            entry["flipped"] = encode(pixels.flip(-1)).float().cpu()[0]
        if masks[i] is not None:
            entry["mask"] = latent_mask(masks[i], buckets[i], tuple(params.shape[-2:]))
            entry["mask_flipped"] = entry["mask"].flip(-1)
        cache.put(keys[i], entry)
        out[i] = entry
    logger.info("latent cache: %d reused, %d encoded (%s)", len(records) - len(todo), len(todo), cache.root)
    if masked:  # images without a mask weigh 1 everywhere
        for entry in out:
            if "mask" not in entry:
                ones = torch.ones(1, *entry["params"].shape[-2:])
                entry["mask"], entry["mask_flipped"] = ones, ones
    return out  # type: ignore[return-value]


def encode_controls(
    records: list[Record],
    controls: list[list[Image.Image]],
    sizes: list[list[tuple[int, int]]],
    vae,
    random_flip: bool,
    cache_dir: Path,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stretch: bool = False,
) -> list[list[dict[str, torch.Tensor]]]:
    """Each example's control images' entries (`params`, and `flipped` with `random_flip`), encoded (`encode`, the
    family's posterior) and cached exactly as training images are (`encode_images`), at the sizes they train at
    (stretched to them: `stretch`)."""
    flat = [
        (Record(source, "", f"control {k + 1} of {record.name}"), image, size)
        for record, images, sizes_of in zip(records, controls, sizes, strict=True)
        for k, (source, image, size) in enumerate(zip(record.controls, images, sizes_of, strict=True))
    ]
    if not flat:
        return [[] for _ in records]
    columns = [list(column) for column in zip(*flat, strict=True)]
    entries = iter(encode_images(*columns, vae, random_flip, cache_dir, encode=encode, stretch=stretch))
    return [[next(entries) for _ in images] for images in controls]


def latent_mask(mask: Image.Image, bucket: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(1, h, w): the mask's centre crop in its bucket, area-averaged down to the latent grid (h, w)."""
    pixels = mask_tensor(resize_to_bucket(mask, bucket, None)[0])  # (1, H, W)
    return torch.nn.functional.adaptive_avg_pool2d(pixels, grid)


@torch.no_grad()
def encode_captions(captions: list[str], encode, fingerprint: str, tokenize, cache_dir: Path) -> dict[str, dict]:
    """Frozen text encoders' outputs for each distinct caption, from the cache or `encode(ids) -> dict`.

    The dict holds the family's conditioning tensors without the batch dimension."""
    cache = EncodeCache(cache_dir / "text")
    out = {}
    for caption in sorted(set(captions)):
        key = _key(fingerprint, caption)
        hit = cache.get(key)
        if hit is None:
            hit = {k: v[0].float().cpu() for k, v in encode(tokenize([caption])).items()}
            cache.put(key, hit)
        out[caption] = hit
    return out
