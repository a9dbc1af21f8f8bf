"""The data stage: the user's images read and bucketed, then training examples and batches.

`read_images` runs before any model is loaded (a bad folder fails in seconds); `build_dataset` runs after, and
fills each example from the cache (`finetune.cache`) where the encoders are frozen. A batch holds `latents`
(posterior params) or `pixels`, `cond` (cached text conditioning) or `ids` (token ids), SDXL's `time_ids`, the
sample's loss weight and its noise seed, and `mask` (the loss mask) when any image has one.

A loss mask is cropped and flipped with its image: cached, it is stored with the latents on the latent grid
(area-averaged); uncached, it comes at pixel resolution and `finetune.objective.batch_loss` averages it down.
Images without a mask in a dataset that has some weigh 1 everywhere.

An edit pair's control images (`core.controls`) travel with their image: resized to the target's bucket when they
share its aspect ratio (cropped by the same window, flipped with it), otherwise to their own aspect ratio at the
bucket's area, as the edit pipelines size an input image (`Family.control_size`: Qwen-Image-Edit's at about a
megapixel); batches group pairs of equal sizes. A batch then holds `control_latents` (cached posteriors, keyed "0",
"1", ... by reference) or `control_pixels`; the family turns them into the tokens its transformer is given beside the
noisy ones. A text encoder that reads the control images too (Qwen-Image-Edit's) is given them with the caption,
and its cached conditioning is keyed by caption and control images (`text_key`).

Every random choice of a sample (flip, crop, caption dropout and shuffle, and the noise and timestep drawn by the
objective) comes from a seed of (run seed, epoch, sample index): results do not depend on batch composition,
process count or where a run was resumed. A random crop of a non-square image cannot be cached, so the latent
cache is then off for images (said in a warning).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from difftune.core.config import PASSIVE, REFUSED, REFUSED_RESTARTS_EPOCH, option, require
from difftune.core.controls import check_pairs, decode_controls
from difftune.core.errors import UserError
from difftune.core.imagefolder import Record, check_source, decode_all, decode_masks, read_records
from difftune.finetune.buckets import assign_bucket, can_move, make_buckets, resize_to_bucket, stretch_to
from difftune.finetune.cache import (
    encode_captions,
    encode_controls,
    encode_images,
    fingerprint_module,
    mask_tensor,
    to_tensor,
)
from difftune.finetune.planner import checks_this_machine

if TYPE_CHECKING:
    from difftune.finetune.dreambooth import DreamBoothConfig

logger = logging.getLogger(__name__)
# The edit families, which train on pairs (a control image, an instruction, the wanted result).
EDIT = ("flux-kontext", "qwen-image-edit", "qwen-image-edit-plus")


@dataclass
class DataConfig:
    """Where the images and captions come from, and how they are cropped, bucketed, augmented and captioned."""

    train_data_dir: str | None = option(
        "Imagefolder with metadata.jsonl, or images with .txt captions.", default=None, resume=PASSIVE, card=False
    )  # the data fingerprint decides whether the data changed
    dataset_name: str | None = option("A datasets name or local dataset path.", default=None, resume=PASSIVE,
                                      card=False)  # fmt: skip
    dataset_config_name: str | None = option("The dataset's configuration name.", default=None, resume=PASSIVE,
                                             card=False)  # fmt: skip
    image_column: str = option("Image column of the dataset.", default="image", resume=PASSIVE, card=False)
    caption_column: str = option("Caption column of the dataset or metadata.jsonl.", default="text", resume=PASSIVE,
                                 card=False)  # fmt: skip
    caption_extension: str = option("Caption sidecar extension.", default=".txt", resume=PASSIVE, card=False)
    control_data_dir: list[str] | None = option(
        "Edit pairs: folder(s) of control (input) images named as the training images (several: several references).",
        default=None, resume=PASSIVE, card=False, families=EDIT,
    )  # fmt: skip
    control_column: list[str] | None = option(
        "Edit pairs: the dataset's control image column(s).", default=None, resume=PASSIVE, card=False, families=EDIT
    )  # the data fingerprint covers the control images
    resolution: int = option("Training resolution in pixels (square).", default=512, resume=REFUSED_RESTARTS_EPOCH,
                             card=True)  # fmt: skip
    center_crop: bool = option("Crop the centre rather than a random window.", default=False, resume=REFUSED,
                               card=False)  # fmt: skip
    random_flip: bool = option("Flip images horizontally at random.", default=False, resume=REFUSED, card=False)
    proportion_empty_prompts: float = option("Fraction of captions replaced by '' (for CFG).", default=0.0,
                                             resume=REFUSED, card=False)  # fmt: skip
    shuffle_caption: bool = option("Shuffle comma-separated caption tags each time.", default=False, resume=REFUSED,
                                   card=False)  # fmt: skip
    keep_tokens: int = option("With --shuffle_caption: keep the first N tags in place.", default=0, resume=REFUSED,
                              card=False)  # fmt: skip
    repeats: int = option("Times each image appears per epoch.", default=1, resume=REFUSED_RESTARTS_EPOCH,
                          card=False)  # fmt: skip
    enable_bucket: bool = option("Aspect-ratio bucketing: batches of one bucket each.", default=False,
                                 resume=REFUSED_RESTARTS_EPOCH, card=False)  # fmt: skip
    min_bucket_reso: int = option("Smallest bucket side in pixels.", default=256, resume=REFUSED_RESTARTS_EPOCH,
                                  card=False)  # fmt: skip
    max_bucket_reso: int = option("Largest bucket side in pixels.", default=1024, resume=REFUSED_RESTARTS_EPOCH,
                                  card=False)  # fmt: skip
    bucket_reso_steps: int = option("Bucket sides are multiples of this.", default=64, resume=REFUSED_RESTARTS_EPOCH,
                                    card=False)  # fmt: skip
    bucket_no_upscale: bool = option("Never enlarge an image to fit a bucket.", default=False,
                                     resume=REFUSED_RESTARTS_EPOCH, card=False)  # fmt: skip
    dataloader_num_workers: int = option("Data loading worker processes.", default=0, resume=PASSIVE, card=False)

    def validate(self) -> None:
        if checks_this_machine() or (self.train_data_dir and self.dataset_name):  # a plan needs no data
            check_source(self.train_data_dir, self.dataset_name)
        checks = [
            (self.resolution > 0 and self.resolution % 8 == 0,
             f"--resolution {self.resolution} must be a positive multiple of 8"),
            (self.caption_extension.startswith(".") and len(self.caption_extension) > 1,
             f"--caption_extension {self.caption_extension!r} must be a file extension such as .txt"),
            (0.0 <= self.proportion_empty_prompts <= 1.0, "--proportion_empty_prompts must be within [0, 1]"),
            (self.repeats >= 1, "--repeats must be at least 1"),
            (self.keep_tokens >= 0, "--keep_tokens must not be negative"),
            (not self.keep_tokens or self.shuffle_caption, "--keep_tokens only applies with --shuffle_caption"),
            (self.dataloader_num_workers >= 0, "--dataloader_num_workers must not be negative"),
            (not self.control_data_dir or self.train_data_dir is not None,
             "--control_data_dir pairs images by file name: it goes with --train_data_dir (a dataset has --control_column)"),
            (not self.control_column or self.dataset_name is not None,
             "--control_column names a column of --dataset_name (a folder pairs by --control_data_dir or a "
             "control_file_name metadata column)"),
        ]  # fmt: skip
        if self.enable_bucket:
            checks += [
                (self.bucket_reso_steps >= 8 and self.bucket_reso_steps % 8 == 0,
                 f"--bucket_reso_steps {self.bucket_reso_steps} must be a positive multiple of 8"),
                (self.min_bucket_reso <= self.resolution <= self.max_bucket_reso,
                 f"--resolution {self.resolution} must lie within --min_bucket_reso {self.min_bucket_reso} and "
                 f"--max_bucket_reso {self.max_bucket_reso}"),
            ]  # fmt: skip
        require(checks)
        if self.enable_bucket and not make_buckets(
            self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps
        ):
            raise UserError(
                f"--min_bucket_reso {self.min_bucket_reso}, --max_bucket_reso {self.max_bucket_reso} and "
                f"--bucket_reso_steps {self.bucket_reso_steps} leave no bucket of --resolution {self.resolution}'s "
                "area; give a --bucket_reso_steps of at most the resolution (e.g. 8)"
            )


@dataclass
class Images:
    """Decoded training images with their captions and buckets, read before any model is loaded."""

    records: list[Record]
    images: list[Image.Image]
    captions: list[str]
    buckets: list[tuple[int, int]]
    is_prior: list[bool]
    masks: list[Image.Image | None]  # loss masks (grey, the image's size), None where an image has none
    controls: list[list[Image.Image]]  # each example's control images (edit pairs), [] for none

    def fingerprint(self) -> str:
        """sha256 over each example's pixels, size, caption, kind, loss mask and control images, in order: an added,
        removed, edited or reordered image, caption, mask or control image changes it (a resume compares it with the
        checkpoint's)."""
        digest = hashlib.sha256()
        for image, caption, prior, mask, controls in zip(
            self.images, self.captions, self.is_prior, self.masks, self.controls, strict=True
        ):
            digest.update(f"{image.size}|{caption}|{prior}|".encode())
            digest.update(hashlib.sha256(image.tobytes()).digest())
            if mask is not None:
                digest.update(b"mask|" + hashlib.sha256(mask.tobytes()).digest())
            for control in controls:
                digest.update(f"control|{control.size}|".encode() + hashlib.sha256(control.tobytes()).digest())
        return digest.hexdigest()

    def num_controls(self) -> int:
        return len(self.controls[0]) if self.controls else 0


def read_images(
    data: DataConfig,
    dreambooth: DreamBoothConfig | None = None,
    class_records: list[Record] | None = None,
    batch_size: int | None = None,
    flag: str = "--train_data_dir",
) -> Images:
    """The images of `data` (and DreamBooth class images), decoded, captioned and assigned to buckets. `batch_size`,
    when given, must fit in some bucket; `flag` names the folder in errors (a held-out folder is read the same way)."""
    instance_prompt = dreambooth.instance_prompt if dreambooth else None
    records = read_records(
        data.train_data_dir, data.dataset_name, data.image_column, data.caption_column, data.caption_extension,
        data.dataset_config_name, require_captions=instance_prompt is None, flag=flag,
        control_data_dir=data.control_data_dir, control_column=data.control_column,
    )  # fmt: skip
    images, records = decode_all(records)
    captions = [instance_prompt or r.caption for r in records]
    is_prior = [False] * len(records)
    if class_records:
        class_images, class_records = decode_all(class_records)
        records, images = records + class_records, images + class_images
        captions += [r.caption or dreambooth.class_prompt for r in class_records]
        is_prior += [True] * len(class_records)
    check_pairs(records)
    buckets = assign_buckets(data, images, batch_size)
    return Images(
        records, images, captions, buckets, is_prior, decode_masks(records, images), decode_controls(records)
    )


def check_pairs_fit(family_cls, data: Images, model: str) -> None:
    """Pairs for an edit model, single images for a text-to-image one: one line otherwise, before the model loads."""
    given, takes = data.num_controls(), family_cls.max_controls
    if given and not takes:
        raise UserError(
            f"the training data has control images (edit pairs) but {model} is a text-to-image model "
            f"({family_cls.pipeline_class_name}): train an edit model (FluxKontextPipeline, QwenImageEditPipeline), or "
            "drop the control images"
        )
    if takes and not given:
        raise UserError(
            f"{model} is an edit model ({family_cls.pipeline_class_name}): it trains on pairs; give each image its "
            "control (input) image: --control_data_dir DIR (the same file names), a control_file_name metadata column, "
            "or --control_column"
        )
    if given > takes:
        raise UserError(
            f"{family_cls.pipeline_class_name} takes {takes} control image(s) per example; the data has {given}"
        )


def assign_buckets(data: DataConfig, images: list[Image.Image], batch_size: int | None) -> list[tuple[int, int]]:
    if not data.enable_bucket:
        return [(data.resolution, data.resolution)] * len(images)
    table = make_buckets(data.resolution, data.min_bucket_reso, data.max_bucket_reso, data.bucket_reso_steps)
    buckets = [
        assign_bucket(im.size, table, data.resolution, data.bucket_reso_steps, data.bucket_no_upscale) for im in images
    ]
    counts = Counter(buckets)
    if batch_size is not None and batch_size > max(counts.values()):
        raise UserError(
            f"--train_batch_size {batch_size} is larger than every bucket (the largest, "
            f"{max(counts, key=counts.get)}, holds {max(counts.values())} images); lower the batch size"
        )
    logger.info("buckets (w, h): images = %s", dict(sorted(counts.items())))
    return buckets


def cache_dir(cfg) -> Path:
    """Where the latent and text caches live: --cache_dir, else <output_dir>/.cache."""
    return Path(cfg.cache.cache_dir or Path(cfg.training.output_dir) / ".cache")


def caches_text(cfg, family, trained) -> bool:
    """Whether `family`'s (a `Family` class or instance) text conditioning is cached: with --cache_latents,
    captions that never change (no tag shuffling) and none of its text encoders in `trained`. A text encoder that
    reads the control images too (`Family.text_reads_controls`) is cached per caption and control images."""
    frozen = not any(name in trained for name in family.text_encoder_names)
    return cfg.cache.cache_latents and not cfg.data.shuffle_caption and frozen


def text_fingerprint(family) -> str:
    """What a cached text conditioning depends on besides its input: the text encoders' weights and the family's tag."""
    return "".join(fingerprint_module(te) for te in family.text_encoders().values()) + family.text_cache_tag()


def text_key(caption: str, controls_digest: str, flip: bool) -> str:
    """The text cache's key of `caption` read with control images of `controls_digest` (flipped or not): the
    caption itself for a text encoder that reads no images (`controls_digest` "")."""
    return f"{caption}\x1f{controls_digest}{'|flipped' if flip else ''}" if controls_digest else caption


def controls_digest(images: list[Image.Image]) -> str:
    """sha256 over control images' sizes and pixels: what a text encoder that reads them sees besides the caption."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.size}|".encode() + hashlib.sha256(image.tobytes()).digest())
    return digest.hexdigest()


def cache_pair_text(
    family, captions: list[str], controls: list[list[Image.Image]], digests: list[str], data: DataConfig, root: Path
) -> dict[str, dict]:
    """The text conditioning of each caption (and of "" under caption dropout) read with its example's control
    images (`digests`: theirs, `controls_digest`), flipped too under --random_flip, for a text encoder that reads
    them (`Family.text_reads_controls`); keyed by `text_key`."""
    pairs = {}
    for caption, images, digest in zip(captions, controls, digests, strict=True):
        for flip in (False, True) if data.random_flip else (False,):
            seen = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images] if flip else images
            for text in {caption, *([""] if data.proportion_empty_prompts > 0 else [])}:
                pairs[text_key(text, digest, flip)] = (text, seen)

    def tokenize(keys: list[str]) -> dict:
        return family.tokenize([pairs[k][0] for k in keys], [pairs[k][1] for k in keys])

    return encode_captions(list(pairs), family.encode_text, text_fingerprint(family), tokenize, root)


def cache_text(family, captions: list[str], root: Path) -> dict[str, dict]:
    """The family's text conditioning of each caption and of the empty caption (caption dropout's), from the
    cache under `root` or the family's text encoders."""
    return encode_captions([*captions, ""], family.encode_text, text_fingerprint(family), family.tokenize, root)


def build_dataset(
    cfg, data: Images, family, trained: dict, more_captions: Sequence[str] = ()
) -> tuple[TrainDataset, bool]:
    """The dataset, with latents and text conditioning cached where their encoders are frozen; returns it and
    whether the latents are cached. `trained` names the modules being trained (their outputs are never cached);
    `more_captions` are cached with the text too (the held-out images', read from the cache later).

    The text is encoded first, and cached text encoders leave the accelerator before the VAE encodes the images
    (they would be moved off after caching anyway): T5-XXL's 9 GB beside the VAE's working set at 1024 px is more
    than a 12 GB card holds. The memory planner traces the same order (`finetune.plan_trace.trace_caching`)."""
    cache_root = cache_dir(cfg)
    # a text encoder that reads the control images keys its cache by them too
    digests = [controls_digest(c) if family.text_reads_controls else "" for c in data.controls]
    text = None
    if family.text_embeddings is not None:  # encoded ahead, the encoders since freed (`finetune.text_pass`)
        text = family.text_embeddings
    elif caches_text(cfg, family, trained):
        if family.text_reads_controls:  # held-out pairs: when `ValidationLoss` builds their dataset
            text = cache_pair_text(family, data.captions, data.controls, digests, cfg.data, cache_root)
        else:
            text = cache_text(family, [*data.captions, *more_captions], cache_root)
        for encoder in family.text_encoders().values():
            encoder.to("cpu")
    sizes = [
        [family.control_size(c.size, im.size, bucket) for c in controls]
        for im, bucket, controls in zip(data.images, data.buckets, data.controls, strict=True)
    ]
    movable = [
        can_move(im.size, b)
        or (not family.stretch_controls and any(can_move(c.size, s) for c, s in zip(cs, ss, strict=True)))
        for im, b, cs, ss in zip(data.images, data.buckets, data.controls, sizes, strict=True)
    ]
    cache_images = cfg.cache.cache_latents and (cfg.data.center_crop or not any(movable))
    if cfg.cache.cache_latents and not cache_images:
        logger.warning(
            "latent cache off: %d of %d images are not of their bucket's shape, so their random crops differ every "
            "epoch (use --center_crop to cache)", sum(movable), len(movable),
        )  # fmt: skip
    examples = [
        Example(caption, im.size, bucket, is_prior=prior, control_sizes=ss, controls_digest=digest)
        for im, caption, bucket, prior, ss, digest in zip(
            data.images, data.captions, data.buckets, data.is_prior, sizes, digests, strict=True
        )  # fmt: skip
    ]
    masked = any(m is not None for m in data.masks)
    if cache_images:
        masks = data.masks if masked else None
        entries = encode_images(
            data.records, data.images, data.buckets, family.vae, cfg.data.random_flip, cache_root, masks,
            encode=family.posterior,
        )  # fmt: skip
        for ex, entry in zip(examples, entries, strict=True):
            ex.latents, ex.latents_flipped = entry["params"], entry.get("flipped")
            ex.mask, ex.mask_flipped = entry.get("mask"), entry.get("mask_flipped")
        controls = encode_controls(
            data.records, data.controls, sizes, family.vae, cfg.data.random_flip, cache_root, family.posterior,
            stretch=family.stretch_controls,
        )  # fmt: skip
        for ex, entries, images in zip(examples, controls, data.controls, strict=True):
            ex.control_latents = [(e["params"], e.get("flipped")) for e in entries]
            if family.text_reads_controls and not caches_text(cfg, family, trained):  # read by the text encoder
                ex.controls = images
    else:
        for ex, im, mask, controls in zip(examples, data.images, data.masks, data.controls, strict=True):
            if mask is None and masked:  # an image without a mask among masked ones weighs 1 everywhere
                mask = Image.new("L", im.size, 255)
            ex.image, ex.mask_image, ex.controls = im, mask, controls
    aug = Augment(
        cfg.training.seed, cfg.data.center_crop, cfg.data.random_flip, cfg.data.proportion_empty_prompts, cfg.data.shuffle_caption,
        cfg.data.keep_tokens, cfg.dreambooth.prior_loss_weight,
    )  # fmt: skip
    dataset = TrainDataset(
        examples, cfg.data.repeats, aug, text, family.tokenize, family.text_reads_controls, family.stretch_controls
    )
    return dataset, cache_images


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


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
    mask_image: Image.Image | None = None  # the loss mask, kept when latents are not cached
    mask: torch.Tensor | None = None  # (1, h, w) the loss mask on the latent grid, cached with the latents
    mask_flipped: torch.Tensor | None = None
    control_sizes: list[tuple[int, int]] = field(default_factory=list)  # (w, h) each control image trains at
    controls: list[Image.Image] = field(default_factory=list)  # control images, kept when latents are not cached
    control_latents: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)  # (params, flipped)
    controls_digest: str = ""  # of the control images, in the text cache's keys when the text encoder reads them


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

    def __init__(
        self,
        examples: list[Example],
        repeats: int,
        aug: Augment,
        text_embeddings: dict | None,
        tokenize,
        text_reads_controls: bool = False,
        stretch_controls: bool = False,
    ):
        self.examples = examples
        self.repeats = repeats
        self.aug = aug
        self.text_embeddings = text_embeddings
        self.tokenize = tokenize
        self.text_reads_controls = text_reads_controls  # `tokenize` takes each caption's control images
        self.fit_control = (
            stretch_to if stretch_controls else lambda image, size, crop: resize_to_bucket(image, size, crop)[0]
        )
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples) * self.repeats

    def buckets(self) -> list[tuple]:
        """Each sample's batch group: its bucket, and its control images' sizes (a batch stacks equal shapes)."""
        return [(ex.bucket, *ex.control_sizes) for ex in self.examples] * self.repeats

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
            if ex.mask is not None:
                item["mask"] = ex.mask_flipped if flip else ex.mask
            if ex.control_latents:  # flipped with the image or not at all
                item["control_latents"] = {str(k): f if flip else p for k, (p, f) in enumerate(ex.control_latents)}
        else:
            crop = None if aug.center_crop else (float(rng.random()), float(rng.random()))
            image, crop_top_left = resize_to_bucket(ex.image, ex.bucket, crop)
            pixels = to_tensor(image)
            item["pixels"] = pixels.flip(-1) if flip else pixels
            if ex.mask_image is not None:  # the same window as the image's
                mask = mask_tensor(resize_to_bucket(ex.mask_image, ex.bucket, crop)[0])
                item["mask"] = mask.flip(-1) if flip else mask
            if ex.controls:  # the same window (where the control has the image's shape) and the same flip
                pixels = [to_tensor(self.fit_control(c, s, crop)) for c, s in zip(ex.controls, ex.control_sizes,
                                                                                    strict=True)]  # fmt: skip
                item["control_pixels"] = {str(k): x.flip(-1) if flip else x for k, x in enumerate(pixels)}
        # SDXL micro-conditioning: original size (h, w), crop top-left (top, left), target size (h, w).
        w, h = ex.size
        item["time_ids"] = torch.tensor([h, w, *crop_top_left, bh, bw], dtype=torch.float32)
        if self.text_embeddings is not None:
            item["cond"] = self.text_embeddings[text_key(caption, ex.controls_digest, flip)]
        elif self.text_reads_controls:  # with the control images as the pair trains (flipped with it)
            controls = [c.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else c for c in ex.controls]
            item["ids"] = {k: v[0] for k, v in self.tokenize([caption], [controls]).items()}
        else:
            item["ids"] = {k: v[0] for k, v in self.tokenize([caption]).items()}
        return item


def collate(items: list[dict]) -> dict:
    """Stacks each key (and each key of nested dicts such as `cond`) into a batch tensor. Tensors of different
    lengths (the text of LLM encoders, tokens or embeddings with their masks) are right-padded with zeros to the
    longest: the padded mask marks the padding."""
    return {
        key: collate([it[key] for it in items]) if isinstance(items[0][key], dict)
        else _stack([torch.as_tensor(it[key]) for it in items])
        for key in items[0]
    }  # fmt: skip


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    if len({t.shape for t in tensors}) > 1:
        return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)
    return torch.stack(tensors)
