"""Trains the tiny AutoencoderKL of the embedded base on the shapes world (step 1 of reproducing `tiny_shapes`).

The VAE compresses 64x64x3 images to 16x16x4 latents. Its loss is SD's: L1 reconstruction plus a tiny KL
(1e-6) so latents stay near unit scale. The learning rate decays on a cosine (a constant 1e-3 was seen to go
unstable late and shift the palette). At the end it checks every palette colour's reconstruction and sets
`scaling_factor` to 1 / std of the latents, as SD's VAE config does.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toyworld import shapes
from toyworld.tiny import SIZES, tiny_vae


def shape_batch(rng: np.random.Generator, n: int, colours=tuple(shapes.COLOURS)) -> torch.Tensor:
    images = [
        np.asarray(shapes.render(rng.choice(colours), rng.choice(shapes.SHAPES), rng), dtype=np.float32)
        for _ in range(n)
    ]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, 3, 64, 64)
    return x / 127.5 - 1.0


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="base", choices=sorted(SIZES), help="tiny component size")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    vae = tiny_vae(SIZES[args.size])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=0.0)
    warmup = min(100, max(1, args.steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)),
    )
    start = time.time()
    for step in range(args.steps):
        x = shape_batch(rng, args.batch_size)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)

    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(shape_batch(rng, 64)).latent_dist.mode() for _ in range(4)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    print("palette error (0..255):", {k: round(v, 1) for k, v in palette_error(vae, rng).items()})
    print(f"scaling_factor {vae.config.scaling_factor:.4f}")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
