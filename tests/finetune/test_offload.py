"""What a cached run keeps off the accelerator: the VAE with cached latents, the frozen text encoders (T5 included)
with cached text; never a trained encoder, nothing when the cache is off."""

import pytest
import torch

from difftune.finetune.offload import offload, offload_plan

SD3 = ["text_encoder", "text_encoder_2", "text_encoder_3"]


@pytest.mark.parametrize(
    ("trained", "latents", "text", "plan"),
    [
        (set(), True, True, ["vae", *SD3]),
        ({"transformer", "text_encoder"}, True, True, ["vae", "text_encoder_2", "text_encoder_3"]),
        (set(), True, False, ["vae"]),
        (set(), False, True, SD3),
        (set(), False, False, []),
    ],
)
def test_offload_plan(trained, latents, text, plan):
    assert offload_plan(SD3, trained, latents, text) == plan


def test_nothing_moves_when_training_on_the_cpu():
    class Family:
        parts = {"vae": torch.nn.Linear(2, 2)}

    assert offload(Family, ["vae"], torch.device("cpu")) == []
