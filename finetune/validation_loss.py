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

from difftune.core.config import PASSIVE, REFUSED, option, require
from difftune.core.errors import UserError
from difftune.finetune.buckets import BucketBatchSampler
from difftune.finetune.data import DataConfig, Images, build_dataset, collate, read_images
from difftune.finetune.objective import Objective, batch_loss

SPLIT_SEED = 0x5917  # the held-out images depend on --seed and this, not on anything else


@dataclass
class SelectionConfig:
    """Held-out images for the validation loss, and what it selects: the best checkpoint, early stopping."""

    validation_split: float = option("Hold out this fraction of the images for the validation loss.", default=0.0,
                                     resume=REFUSED, card=False)  # fmt: skip
    validation_data_dir: str | None = option("A folder of held-out images (read like --train_data_dir).",
                                             default=None, resume=REFUSED, card=False)  # fmt: skip
    keep_best_by: str | None = option(
        "Keep the checkpoint of the lowest validation loss in <output_dir>/best/.", default=None,
        choices=("validation_loss",), resume=PASSIVE, card=False,
    )  # fmt: skip
    early_stopping_patience: int | None = option(
        "Stop after N validations without a better validation loss; the best checkpoint becomes the output.",
        default=None, resume=PASSIVE, card=True,
    )  # fmt: skip

    def validate(self) -> None:
        checks = [
            (0.0 <= self.validation_split < 1.0, f"--validation_split {self.validation_split} must be within [0, 1)"),
            (not (self.validation_split and self.validation_data_dir),
             "give --validation_split or --validation_data_dir, not both"),
            (self.keep_best_by is None or bool(self.validation_split or self.validation_data_dir),
             "--keep_best_by validation_loss needs held-out images: --validation_split 0.1 or --validation_data_dir"),
            (self.early_stopping_patience is None or self.early_stopping_patience >= 1,
             "--early_stopping_patience must be at least 1"),
            (self.early_stopping_patience is None or self.keep_best_by is not None,
             "--early_stopping_patience saves the best checkpoint as the output: add --keep_best_by validation_loss"),
        ]  # fmt: skip
        require(checks)


def take(data: Images, indices: list[int]) -> Images:
    """The images at `indices`, every list kept in step."""
    return Images(*([getattr(data, f.name)[i] for i in indices] for f in dataclasses.fields(Images)))


def split_validation(selection: SelectionConfig, data_cfg: DataConfig, seed: int, data: Images):
    """(training images, held-out images): `--validation_split` of `data` chosen by `--seed`, or the images of
    `--validation_data_dir`; None when neither is set."""
    if selection.validation_data_dir:
        return data, read_validation_dir(selection.validation_data_dir, data_cfg)
    if not selection.validation_split:
        return data, None
    n = len(data.images)
    n_val = round(n * selection.validation_split)
    if not 1 <= n_val < n:
        raise UserError(
            f"--validation_split {selection.validation_split} of {n} images holds out {n_val}: at least one image "
            "must be held out and one left to train on; change the fraction or use --validation_data_dir"
        )
    order = np.random.default_rng([seed, SPLIT_SEED]).permutation(n).tolist()
    return take(data, sorted(order[n_val:])), take(data, sorted(order[:n_val]))


def read_validation_dir(folder: str, data_cfg: DataConfig) -> Images:
    """`--validation_data_dir`: the training data config built for that folder, so it is read exactly like
    `--train_data_dir` (captions, buckets) and its errors name its own flag. Its batches may be partial, so a
    bucket smaller than the training batch is fine here."""
    held_out = dataclasses.replace(data_cfg, train_data_dir=folder, dataset_name=None)
    return read_images(held_out, flag="--validation_data_dir")


class ValidationLoss:
    """The held-out images as fixed batches, and `evaluate`, their mean loss under the live weights."""

    def __init__(self, dataset, batch_size: int):
        self.dataset = dataset
        # One fixed order of bucket-homogeneous batches; drawing it consumes no global random state.
        self.batches = BucketBatchSampler(dataset.buckets(), batch_size, seed=0).batches()

    @classmethod
    def build(cls, cfg, held_out: Images, family, trained: dict) -> ValidationLoss:
        data = dataclasses.replace(
            cfg.data, random_flip=False, center_crop=True, proportion_empty_prompts=0.0, shuffle_caption=False,
            repeats=1,
        )  # fmt: skip
        dataset, _ = build_dataset(dataclasses.replace(cfg, data=data), held_out, family, trained)
        return cls(dataset, cfg.training.train_batch_size)

    def __len__(self) -> int:
        return len(self.dataset)

    @torch.no_grad()
    def evaluate(self, run, objective: Objective) -> float:
        """The mean per-image loss (prior images weighted as in training). Every process scores every image (a
        sharded model needs all of them in each forward); the gathered mean makes every process decide alike."""
        from accelerate.utils import send_to_device

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
