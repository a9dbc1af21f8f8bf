"""From records to training batches: resize and crop, the latent/text-embedding cache, and per-sample randomness.

The VAE and a text encoder that is not trained are frozen, so their outputs are constants: they are encoded
once and kept on disk (safetensors, `<cache_dir>/latents|text/<sha256>.safetensors`). The key of an entry is a
fingerprint of the encoder's weights, the resolution and crop, and the image bytes (or caption), so a changed
input is re-encoded and an unchanged one never is. The cache stores the VAE's posterior (mean and log-variance)
and a latent is sampled from it each step, exactly as without the cache. Random flips are cached as a second
posterior; a random crop of a non-square image cannot be cached, so the cache is then off for images.

Every random choice of a sample (flip, crop, caption dropout and shuffle, and the noise and timestep drawn in the
loop) comes
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

from finetune.buckets import resize_to_bucket
from finetune.data import Record

logger = logging.getLogger(__name__)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


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


def shuffle_tags(caption: str, keep_tokens: int, rng: np.random.Generator) -> str:
    """kohya's --shuffle_caption: comma-separated tags shuffled, the first `keep_tokens` kept in place."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    return ", ".join(head + [tail[i] for i in rng.permutation(len(tail))])


@dataclass
class Example:
    caption: str
    size: tuple[int, int]  # original (w, h)
    bucket: tuple[int, int]  # trained (w, h)
    image: Image.Image | None = None  # kept when latents are not cached
    latents: torch.Tensor | None = None  # (2C, h, w) posterior mean and log-variance of the centre crop
    latents_flipped: torch.Tensor | None = None
    is_prior: bool = False  # a DreamBooth class image


@dataclass
class Augment:
    seed: int
    center_crop: bool
    random_flip: bool
    proportion_empty_prompts: float
    shuffle_caption: bool
    keep_tokens: int
    prior_loss_weight: float


class TrainDataset(torch.utils.data.Dataset):
    """Yields dicts of `latents` (posterior params) or `pixels`, text embeddings or token ids, SDXL `time_ids`,
    the sample's loss weight and its noise seed. Length is examples x repeats."""

    def __init__(self, examples: list[Example], repeats: int, aug: Augment, text_embeddings: dict | None, tokenize):
        self.examples = examples
        self.repeats = repeats
        self.aug = aug
        self.text_embeddings = text_embeddings
        self.tokenize = tokenize
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples) * self.repeats

    def buckets(self) -> list[tuple[int, int]]:
        return [ex.bucket for ex in self.examples] * self.repeats

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index % len(self.examples)]
        aug = self.aug
        rng = sample_rng(aug.seed, self.epoch, index)
        flip = aug.random_flip and rng.random() < 0.5
        caption = "" if rng.random() < aug.proportion_empty_prompts else ex.caption
        if caption and aug.shuffle_caption:
            caption = shuffle_tags(caption, aug.keep_tokens, rng)
        item = {
            "noise_seed": int(rng.integers(0, 2**62)),
            "index": index,
            "weight": aug.prior_loss_weight if ex.is_prior else 1.0,
        }
        bw, bh = ex.bucket
        if ex.latents is not None:
            item["latents"] = ex.latents_flipped if flip else ex.latents
            _, crop_top_left = resize_to_bucket(Image.new("1", ex.size), ex.bucket, None)
        else:
            crop = None if aug.center_crop else (float(rng.random()), float(rng.random()))
            image, crop_top_left = resize_to_bucket(ex.image, ex.bucket, crop)
            pixels = to_tensor(image)
            item["pixels"] = pixels.flip(-1) if flip else pixels
        # SDXL micro-conditioning: original size (h, w), crop top-left (top, left), target size (h, w).
        w, h = ex.size
        item["time_ids"] = torch.tensor([h, w, *crop_top_left, bh, bw], dtype=torch.float32)
        if self.text_embeddings is not None:
            item.update(self.text_embeddings[caption])
        else:
            item.update({k: v[0] for k, v in self.tokenize([caption]).items()})
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

    The dict holds `encoder_hidden_states` (L, D) and, for SDXL, `text_embeds` (pooled, D2)."""
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
