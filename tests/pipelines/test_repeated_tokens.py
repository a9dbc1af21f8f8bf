"""Training SD 3 without T5 on one zero token that attention counts N times is the model diffusers' pipeline runs
with N zero tokens: same outputs, same gradients, for SD 3 and SD 3.5 (dual attention, RMS qk-norm), with a LoRA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from difftune.pipelines.families.repeated_tokens import RepeatedLastTokenProcessor, install
from difftune.toyworld.tiny import build_pipeline

N = 64


def run(transformer, context, repeats=None):
    kwargs = {"joint_attention_kwargs": {"last_token_repeats": repeats}} if repeats else {}
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, transformer.config.in_channels, 16, 16, generator=g)
    pooled = torch.randn(2, transformer.config.pooled_projection_dim, generator=g)
    out = transformer(hidden_states=latents, timestep=torch.tensor([300.0, 800.0]), encoder_hidden_states=context,
                      pooled_projections=pooled, return_dict=False, **kwargs)[0]  # fmt: skip
    loss = out.square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in transformer.parameters() if p.requires_grad]
    transformer.zero_grad()
    return out.detach(), grads


@pytest.mark.parametrize("family", ["sd3", "sd35"])
def test_one_token_counted_n_times_is_n_zero_tokens(family):
    transformer = build_pipeline("test", family, t5=False).transformer
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, init_lora_weights="gaussian", target_modules=["to_q", "add_k_proj"]))
    g = torch.Generator().manual_seed(1)
    clip = torch.randn(2, 16, transformer.config.joint_attention_dim, generator=g)
    zeros = torch.zeros(2, N, transformer.config.joint_attention_dim)
    full, full_grads = run(transformer, torch.cat([clip, zeros], 1))
    install(transformer)
    assert all(isinstance(p, RepeatedLastTokenProcessor) for p in transformer.attn_processors.values())
    short, short_grads = run(transformer, torch.cat([clip, zeros[:, :1]], 1), repeats=N)
    torch.testing.assert_close(short, full, rtol=1e-4, atol=1e-5)
    for a, b in zip(short_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    # Without the count, the installed processor is diffusers' own: one zero token is not N of them.
    plain, _ = run(transformer, torch.cat([clip, zeros], 1))
    torch.testing.assert_close(plain, full)
    one, _ = run(transformer, torch.cat([clip, zeros[:, :1]], 1))
    assert (one - full).abs().max() > 1e-3
