"""Denoisers of each architecture at a few thousand parameters, and a fixed example loss for each: for tests that
compare one step's loss and gradients across memory options (block swap, fp8 base) without a pipeline around them.

Flux (double- and single-stream blocks, diffusers' `FluxTransformer2DModel`), SD 3 (joint blocks,
`SD3Transformer2DModel`) and an SD 1.x-layout UNet (`UNet2DConditionModel` with cross-attention transformer blocks),
sized as in diffusers' own model tests.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from torch import nn


def flux() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(2, 2, 4))  # fmt: skip


def sd3() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                 caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8)  # fmt: skip


def unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2)  # fmt: skip


BUILDERS = {"flux": flux, "sd3": sd3, "unet": unet}


def example_loss(kind: str, model: nn.Module, device: str | torch.device = "cpu") -> torch.Tensor:
    """The mean squared output of `model` (of architecture `kind`) on a fixed batch of 2, made on `device`."""
    g = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    if kind == "flux":  # 16 image tokens of 16 channels, 5 text tokens
        out = model(hidden_states=randn(2, 16, 16), encoder_hidden_states=randn(2, 5, 32),
                    pooled_projections=randn(2, 32), timestep=torch.tensor([0.3, 0.7], device=device),
                    img_ids=torch.zeros(16, 3, device=device), txt_ids=torch.zeros(5, 3, device=device),
                    return_dict=False)[0]  # fmt: skip
    elif kind == "sd3":
        out = model(hidden_states=randn(2, 4, 8, 8), encoder_hidden_states=randn(2, 5, 16),
                    pooled_projections=randn(2, 16), timestep=torch.tensor([300, 700], device=device),
                    return_dict=False)[0]  # fmt: skip
    else:
        out = model(randn(2, 4, 8, 8), torch.tensor([10, 500], device=device), randn(2, 3, 8)).sample
    return out.square().mean()
