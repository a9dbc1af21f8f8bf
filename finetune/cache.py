"""The latent and text-embedding cache: frozen encoders' outputs, computed once and kept on disk.

The VAE and a text encoder that is not trained are frozen, so their outputs are constants: they are encoded once
and kept as safetensors (`<cache_dir>/latents|text/<sha256>.safetensors`). The key of an entry is a fingerprint of
the encoder's weights, the resolution and crop, and the image bytes (or caption), so a changed input is
re-encoded and an unchanged one never is. The cache stores the VAE's posterior (mean and log-variance) and a
latent is sampled from it each step, exactly as without the cache. Random flips are cached as a second posterior.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from finetune.buckets import resize_to_bucket
from finetune.data import Record

logger = logging.getLogger(__name__)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return arr / 127.5 - 1.0


def fingerprint_module(module: torch.nn.Module) -> str:
    """sha256 of a module's config and weights: the cache is invalid when either changes."""
    digest = hashlib.sha256(str(getattr(module, "config", "")).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


class EncodeCache:
    """Safetensors files under `root`, one per key; writes are atomic (temporary file, then rename)."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.exists():
            self.misses += 1
            return None
        self.hits += 1
        return load_file(path)

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.path(key).with_suffix(".tmp")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
        tmp.replace(self.path(key))


def _key(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


@torch.no_grad()
def encode_images(
    records: list[Record],
    images: list[Image.Image],
    buckets: list[tuple[int, int]],
    vae,
    random_flip: bool,
    cache_dir: Path,
    batch_size: int = 16,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Posterior params (and flipped ones) of each image's centre crop in its bucket, from the cache or the VAE."""
    cache = EncodeCache(cache_dir / "latents")
    vae_fp = fingerprint_module(vae)
    keys = [_key(vae_fp, f"{b[0]}x{b[1]}", "center", r.image_bytes()) for r, b in zip(records, buckets, strict=True)]
    out: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * len(records)
    todo = []
    for i, key in enumerate(keys):
        hit = cache.get(key)
        if hit is not None and (not random_flip or "flipped" in hit):
            out[i] = (hit["params"], hit.get("flipped"))
        else:
            todo.append(i)
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i in todo:
        by_bucket.setdefault(buckets[i], []).append(i)
    chunks = [ids[k : k + batch_size] for ids in by_bucket.values() for k in range(0, len(ids), batch_size)]
    for chunk in chunks:
        pixels = torch.stack([to_tensor(resize_to_bucket(images[i], buckets[i], None)[0]) for i in chunk])
        pixels = pixels.to(device, dtype)  # (B, 3, H, W), one bucket
        params = vae.encode(pixels).latent_dist.parameters.float().cpu()  # (B, 2C, h, w)
        flipped = vae.encode(pixels.flip(-1)).latent_dist.parameters.float().cpu() if random_flip else None
        for j, i in enumerate(chunk):
            entry = {"params": params[j]}
            if flipped is not None:
                entry["flipped"] = flipped[j]
            cache.put(keys[i], entry)
            out[i] = (params[j], None if flipped is None else flipped[j])
    logger.info("latent cache: %d reused, %d encoded (%s)", len(records) - len(todo), len(todo), cache.root)
    return out  # type: ignore[return-value]


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
