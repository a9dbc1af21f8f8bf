"""The validation loss on held-out images, and the best-checkpoint selection and early stopping it drives.

The training loss is measured on images the weights are fitted to, at fresh noise every step: it cannot say
when an adapter starts to overfit. Here a held-out set (`--validation_split`, or `--validation_data_dir`) is
scored with the training objective at fixed noise and timesteps: every held-out image keeps one noise seed for
the whole run, and the objective draws its noise, timestep and latent sample from per-sample generators seeded
by it (`finetune.objective.draw_noise`, `Family.latents`), so two evaluations differ only by the weights. The
images are centre-cropped, never flipped, their captions never dropped or shuffled, and they go through the
same dataset and cache as training images (latents and text embeddings cached, masks applied), for every
objective (epsilon/v and rectified flow). With `--use_ema` the EMA weights are scored: they are what is saved.

`Selection` keeps the lowest value so far, its step, and the evaluations since; it is saved in every checkpoint
so that a resumed run keeps its best-so-far and its patience count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import send_to_device

from difftune.core.errors import UserError
from difftune.finetune.buckets import BucketBatchSampler
from difftune.finetune.dataset import Images, build_dataset, collate, read_images
from difftune.finetune.objective import Objective, batch_loss

SPLIT_SEED = 0x5917  # the held-out images depend on --seed and this, not on anything else


def take(data: Images, indices: list[int]) -> Images:
    """The images at `indices`, every list kept in step."""
    return Images(*([getattr(data, f.name)[i] for i in indices] for f in dataclasses.fields(Images)))


def split_validation(cfg, data: Images) -> tuple[Images, Images | None]:
    """(training images, held-out images): `--validation_split` of `data` chosen by `--seed`, or the images of
    `--validation_data_dir`; None when neither is set."""
    if cfg.validation_data_dir:
        return data, read_validation_dir(cfg)
    if not cfg.validation_split:
        return data, None
    n = len(data.images)
    n_val = round(n * cfg.validation_split)
    if not 1 <= n_val < n:
        raise UserError(
            f"--validation_split {cfg.validation_split} of {n} images holds out {n_val}: at least one image must be "
            "held out and one left to train on; change the fraction or use --validation_data_dir"
        )
    order = np.random.default_rng([cfg.seed, SPLIT_SEED]).permutation(n).tolist()
    return take(data, sorted(order[n_val:])), take(data, sorted(order[:n_val]))


def read_validation_dir(cfg) -> Images:
    """`--validation_data_dir`, read exactly like `--train_data_dir` (captions, buckets); errors name its flag.
    Its batches may be partial, so a bucket smaller than the training batch is fine here."""
    held_out = dataclasses.replace(cfg, train_data_dir=cfg.validation_data_dir, dataset_name=None, train_batch_size=1)
    try:
        return read_images(held_out)
    except UserError as err:
        raise UserError(str(err).replace("--train_data_dir", "--validation_data_dir")) from err


class ValidationLoss:
    """The held-out images as fixed batches, and `evaluate`, their mean loss under the live weights."""

    def __init__(self, dataset, batch_size: int):
        self.dataset = dataset
        # One fixed order of bucket-homogeneous batches; drawing it consumes no global random state.
        self.batches = BucketBatchSampler(dataset.buckets(), batch_size, seed=0).batches()

    @classmethod
    def build(cls, cfg, held_out: Images, family, trained: dict) -> ValidationLoss:
        fixed = dataclasses.replace(
            cfg, random_flip=False, center_crop=True, proportion_empty_prompts=0.0, shuffle_caption=False, repeats=1
        )
        dataset, _ = build_dataset(fixed, held_out, family, trained)
        return cls(dataset, cfg.train_batch_size)

    def __len__(self) -> int:
        return len(self.dataset)

    @torch.no_grad()
    def evaluate(self, run, objective: Objective) -> float:
        """The mean per-image loss (prior images weighted as in training). Every process scores every image (a
        sharded model needs all of them in each forward); the gathered mean makes every process decide alike."""
        modules = list(run.models.values())
        was_training = [m.training for m in modules]
        for module in modules:
            module.eval()
        if run.ema is not None:
            run.ema.store(run.params)
            run.ema.copy_to(run.params)
        total = 0.0
        for indices in self.batches:
            batch = send_to_device(collate([self.dataset[i] for i in indices]), run.accelerator.device)
            total += batch_loss(run.family, run.models, batch, objective, run.weight_dtype).item() * len(indices)
        if run.ema is not None:
            run.ema.restore(run.params)
        for module, training in zip(modules, was_training, strict=True):
            module.train(training)
        mean = torch.tensor(total / len(self.dataset), device=run.accelerator.device)
        return run.accelerator.gather(mean).mean().item()


@dataclass
class Selection:
    """The best validation loss so far, its step, and how many evaluations since have not beaten it."""

    best_step: int | None = None
    best_value: float | None = None
    evals_since_best: int = 0

    def update(self, step: int, value: float) -> bool:
        """Records an evaluation; True when it is a new best (strictly lower)."""
        if self.best_value is None or value < self.best_value:
            self.best_step, self.best_value, self.evals_since_best = step, value, 0
            return True
        self.evals_since_best += 1
        return False

    def patience_ran_out(self, patience: int | None) -> bool:
        return patience is not None and self.evals_since_best >= patience
