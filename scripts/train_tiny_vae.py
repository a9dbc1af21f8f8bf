"""Trains the tiny AutoencoderKL of the embedded base on the shapes world (step 1 of reproducing `tiny_shapes`).

    python scripts/train_tiny_vae.py --output_dir runs/tiny_shapes_vae --steps 1000 --batch_size 16

The VAE compresses 64x64x3 images to 16x16x4 latents. Its loss is SD's: L1 reconstruction plus a tiny KL
(1e-6) so latents stay near unit scale. It trains through the baselines' one loop (`baselines.train.fit`) on
shapes rendered fresh for every step. The learning rate warms up, then decays on a cosine (a constant 1e-3 was
seen to go unstable late and shift the palette: red turned olive). At the end it checks every palette colour's
reconstruction and sets `scaling_factor` to 1 / std of the latents, as SD's VAE config does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # run as a program: keep out the imports it does not use (core/startup.py)
    from difftune.core.startup import quiet_start

    quiet_start()

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from difftune.baselines.train import Budget, fit, make_state
from difftune.core.config import option, parse
from difftune.core.errors import UserError, run_main
from difftune.toyworld import shapes
from difftune.toyworld.tiny_parts import SIZES, tiny_vae

KL_WEIGHT = 1e-6  # SD's: enough to keep latents near unit scale, too little to blur


@dataclass
class TinyVAEConfig:
    output_dir: str = option("where the diffusers AutoencoderKL folder (config.json + weights) is written")
    steps: int = option("optimizer steps", 1500)
    batch_size: int = option("images per step", 32)
    learning_rate: float = option("peak learning rate, after the warm-up; it decays on a cosine to 0", 1e-3)
    seed: int = option("seeds the weights, the rendered shapes and the posterior noise", 0)
    size: str = option("tiny component size", "base", choices=sorted(SIZES))

    def validate(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")


class VAEObjective(nn.Module):
    """The AutoencoderKL with SD's VAE loss, in the shape `fit` trains: `loss(x)` on x (B, 3, 64, 64) in [-1, 1]."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        l1, kl = F.l1_loss(recon, x), posterior.kl().mean()
        return {"loss": l1 + KL_WEIGHT * kl, "l1": l1, "kl": kl}


def shape_batch(rng: np.random.Generator, n: int, colours=tuple(shapes.COLOURS)) -> torch.Tensor:
    images = [
        np.asarray(shapes.render(rng.choice(colours), rng.choice(shapes.SHAPES), rng), dtype=np.float32)
        for _ in range(n)
    ]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, 3, 64, 64)
    return x / 127.5 - 1.0


def fresh_shapes(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A new batch of rendered shapes for every step, seeded by fit's per-step generator."""
    rng = np.random.default_rng(int(torch.randint(2**62, (), generator=generator)))
    return shape_batch(rng, batch_size)


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over min(100, steps / 10) steps, then a cosine decay to 0 at `steps`."""
    warmup = min(100, max(1, steps // 10))
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))


def palette_error(vae, rng: np.random.Generator) -> dict[str, float]:
    """Mean absolute RGB error (0..255) of each colour's reconstructed shape pixels."""
    errors = {}
    with torch.no_grad():
        for colour, rgb in shapes.COLOURS.items():
            x = shape_batch(rng, 16, (colour,))
            recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            mask = (x - 1.0).abs().sum(1) > 1.0  # (B, H, W): shape pixels, far from white
            got = ((recon.permute(0, 2, 3, 1)[mask] + 1) * 127.5).mean(0)
            errors[colour] = float((got - torch.tensor(rgb, dtype=torch.float32)).abs().mean())
    return errors


def main(argv: Sequence[str] | None = None) -> AutoencoderKL:
    cfg = parse(TinyVAEConfig, argv, __doc__, prog="scripts/train_tiny_vae.py")
    torch.manual_seed(cfg.seed)
    model = VAEObjective(tiny_vae(SIZES[cfg.size]))
    state = make_state(model, cfg.learning_rate, lr_lambda=warmup_cosine(cfg.steps))
    start = time.time()

    def on_log(step: int, terms: dict[str, float]) -> None:
        print(f"step {step} loss {terms['loss']:.4f} ({time.time() - start:.0f}s)", flush=True)

    fit(
        model, fresh_shapes, batch_size=cfg.batch_size, lr=cfg.learning_rate, budget=Budget(steps=cfg.steps),
        seed=cfg.seed, log_every=100, on_log=on_log, state=state,
    )  # fmt: skip
    vae = model.vae.cpu().eval()
    rng = np.random.default_rng(cfg.seed)
    with torch.no_grad():
        latents = torch.cat([vae.encode(shape_batch(rng, 64)).latent_dist.mode() for _ in range(4)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    print("palette error (0..255):", {k: round(v, 1) for k, v in palette_error(vae, rng).items()})
    print(f"scaling_factor {vae.config.scaling_factor:.4f}")
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(cfg.output_dir)
    return vae


if __name__ == "__main__":
    run_main(main)
