"""From records to training batches: resize and crop, the latent/text-embedding cache, and per-sample randomness.

The VAE and a text encoder that is not trained are frozen, so their outputs are constants: they are encoded
once and kept on disk (safetensors, `<cache_dir>/latents|text/<sha256>.safetensors`). The key of an entry is a
fingerprint of the encoder's weights, the resolution and crop, and the image bytes (or caption), so a changed
input is re-encoded and an unchanged one never is. The cache stores the VAE's posterior (mean and log-variance)
and a latent is sampled from it each step, exactly as without the cache. Random flips are cached as a second
posterior; a random crop of a non-square image cannot be cached, so the cache is then off for images.

Every random choice of a sample (flip, caption dropout, and the noise and timestep drawn in the loop) comes
from a seed of (run seed, epoch, sample index): results do not depend on batch composition, process count or
where a run was resumed.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from finetune.data import Record

logger = logging.getLogger(__name__)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def resize_and_crop(image: Image.Image, resolution: int, crop_origin: tuple[int, int] | None) -> Image.Image:
    """Shorter side to `resolution`, then a square window at `crop_origin` (None: the centre)."""
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if crop_origin is None:
        crop_origin = ((new_w - resolution) // 2, (new_h - resolution) // 2)
    left, top = crop_origin
    return image.crop((left, top, left + resolution, top + resolution))


def crop_range(image: Image.Image, resolution: int) -> tuple[int, int]:
    """How far a crop window can move (x, y) after resizing; (0, 0) when the crop is fixed."""
    w, h = image.size
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)) - resolution, max(resolution, round(h * scale)) - resolution


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


@dataclass
class Example:
    latents: torch.Tensor | None  # (2C, h, w) posterior mean and log-variance, or None when pixels are kept
    latents_flipped: torch.Tensor | None
    image: Image.Image | None  # kept when latents are not cached
    caption: str


class TrainDataset(torch.utils.data.Dataset):
    """Yields dicts of `latents` (posterior params) or `pixels`, the caption or its embedding, and a seed."""

    def __init__(
        self,
        examples: list[Example],
        resolution: int,
        seed: int,
        center_crop: bool,
        random_flip: bool,
        proportion_empty_prompts: float,
        text_embeddings: dict[str, torch.Tensor] | None,
        tokenize,
    ):
        self.examples = examples
        self.resolution = resolution
        self.seed = seed
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.proportion_empty_prompts = proportion_empty_prompts
        self.text_embeddings = text_embeddings
        self.tokenize = tokenize
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        rng = sample_rng(self.seed, self.epoch, index)
        flip = self.random_flip and rng.random() < 0.5
        caption = "" if rng.random() < self.proportion_empty_prompts else example.caption
        item = {"noise_seed": int(rng.integers(0, 2**62)), "index": index}
        if example.latents is not None:
            item["latents"] = example.latents_flipped if flip else example.latents
        else:
            image = example.image
            crop = None
            if not self.center_crop:
                dx, dy = crop_range(image, self.resolution)
                crop = (int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1)))
            pixels = to_tensor(resize_and_crop(image, self.resolution, crop))
            item["pixels"] = pixels.flip(-1) if flip else pixels
        if self.text_embeddings is not None:
            item["encoder_hidden_states"] = self.text_embeddings[caption]
        else:
            item["input_ids"] = self.tokenize([caption])[0]
        return item


def collate(items: list[dict]) -> dict:
    return {key: torch.stack([torch.as_tensor(it[key]) for it in items]) for key in items[0]}


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
    vae,
    resolution: int,
    random_flip: bool,
    cache_dir: Path,
    batch_size: int = 16,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Posterior params (and flipped ones) of each centre-cropped image, from the cache or the VAE."""
    cache = EncodeCache(cache_dir / "latents")
    vae_fp = fingerprint_module(vae)
    keys = [_key(vae_fp, str(resolution), "center", r.image_bytes()) for r in records]
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
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        pixels = torch.stack([to_tensor(resize_and_crop(images[i], resolution, None)) for i in chunk])
        pixels = pixels.to(device, dtype)  # (B, 3, H, W)
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
def encode_captions(captions: list[str], text_encoder, tokenize, cache_dir: Path) -> dict[str, torch.Tensor]:
    """The frozen text encoder's hidden states (L, D) for each distinct caption, from the cache or the encoder."""
    cache = EncodeCache(cache_dir / "text")
    te_fp = fingerprint_module(text_encoder)
    device = next(text_encoder.parameters()).device
    out = {}
    for caption in sorted(set(captions)):
        key = _key(te_fp, caption)
        hit = cache.get(key)
        if hit is None:
            ids = tokenize([caption]).to(device)
            hidden = text_encoder(ids)[0][0].float().cpu()  # (L, D)
            cache.put(key, {"hidden": hidden})
            hit = {"hidden": hidden}
        out[caption] = hit["hidden"]
    return out
