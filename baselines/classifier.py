"""The evaluation classifier: a small CNN trained on the real training images, whose penultimate features define
the "Fréchet classifier distance" and the k-NN metrics, and whose predictions count the modes a model covers.

Without Inception weights, MNIST-scale work measures sample quality in the features of a classifier trained on the
dataset itself (the "Fréchet LeNet distance" of stacked-MNIST studies; Lin et al. 2018, PacGAN). Its numbers are
comparable only within one comparison (same classifier, same data), never with published Inception FIDs. The
classifier reports its own held-out accuracy so that a reader can judge whether its modes can be trusted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difftune.baselines.train import Budget, fit, make_state


@dataclass
class ClassifierReport:
    accuracy: float  # on the held-out real images, which it never trained on
    n_train: int
    n_test: int
    n_classes: int
    steps: int
    trained: bool  # False: random features (no labels to train on)


class EvalClassifier(nn.Module):
    """Two conv blocks, global average pooling, a `feature_dim` penultimate layer and a linear head."""

    def __init__(self, channels: int, n_classes: int, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(2 * width, feature_dim)
        self.head = nn.Linear(feature_dim, max(n_classes, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [0, 1] -> penultimate features (B, feature_dim)."""
        h = self.body(x * 2 - 1)  # (B, 2w, H/4, W/4)
        return F.relu(self.fc(h.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cross-entropy of a batch (images (B, C, H, W), class indices (B,)), as `baselines.train.fit` calls it."""
        x, y = batch
        return {"loss": F.cross_entropy(self(x), y)}

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Features of every image, in eval mode, on the model's device; returned on the CPU."""
        self.eval()
        device = next(self.parameters()).device
        return torch.cat([self.features(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """The predicted class index of every image (N,)."""
        self.eval()
        device = next(self.parameters()).device
        return torch.cat(
            [self(x[i : i + batch_size].to(device)).argmax(dim=1).cpu() for i in range(0, len(x), batch_size)]
        )


@torch.no_grad()
def accuracy(model: EvalClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model.predict(x) == y).float().mean())


def train_classifier(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    n_classes: int,
    *,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    accelerator=None,
) -> tuple[EvalClassifier, ClassifierReport]:
    """Trains on (x_train, y_train) with cross-entropy for `steps` minibatches drawn with replacement, through the
    baselines' one loop (`fit`: AdamW without weight decay, i.e. Adam; a cosine-decayed learning rate; no gradient
    clipping); scores on the test split. This reproduces, bit for bit, the loop it had before `fit` existed."""
    torch.manual_seed(seed)
    model = EvalClassifier(x_train.shape[1], n_classes)
    state = make_state(model, lr, ema=False, lr_lambda=lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))

    stream = torch.Generator().manual_seed(seed)

    def draw(size: int, _per_step: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # One stream of batches drawn with replacement, as the classifier always drew them (it never resumes, so
        # it needs no per-step seed); per-step reseeding gave held-out accuracy 0.71-0.76 against 0.81-0.88.
        index = torch.randint(len(x_train), (size,), generator=stream)
        return x_train[index], y_train[index]

    fit(
        model, draw, batch_size=batch_size, lr=lr, budget=Budget(steps=steps), seed=seed, accelerator=accelerator,
        log_every=steps, state=state, max_grad_norm=None,
    )  # fmt: skip
    report = ClassifierReport(accuracy(model, x_test, y_test), len(x_train), len(x_test), n_classes, steps, True)
    return model.eval(), report


def random_feature_extractor(channels: int, seed: int = 0, device: str | torch.device = "cpu") -> EvalClassifier:
    """The same network, randomly initialised and untrained: the fallback feature space when there are no labels.

    Random convolutional features still separate colours, edges and textures, but far less sharply than trained ones.
    """
    torch.manual_seed(seed)
    return EvalClassifier(channels, 1).to(device).eval()
