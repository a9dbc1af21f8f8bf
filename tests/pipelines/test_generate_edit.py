"""`difftune-generate --image` with an edit model (a tiny Flux Kontext pipeline): the input is edited at its own size,
the record regenerates the edit exactly, and an input image for the wrong kind of model is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from difftune.core.errors import UserError
from difftune.pipelines import generate
from difftune.toyworld import shapes
from difftune.toyworld.tiny import save_tiny_pipeline

FAST = ["--steps", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("kontext") / "model", size="test", family="flux-kontext")


@pytest.fixture(scope="module")
def input_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "in.png"
    shapes.render("red", "square", np.random.default_rng(0), size=64).resize((48, 32)).save(path)
    return path


def test_an_edit_keeps_the_inputs_size_and_its_record_regenerates_it(kontext, input_image, tmp_path):
    record = generate.main(["--model", str(kontext), "--image", str(input_image), "--prompt", "make it green",
                            "--num_images", "2", "--output_dir", str(tmp_path / "a"), *FAST])  # fmt: skip
    assert (record["width"], record["height"]) == (48, 32)
    assert record["config"]["image"] == [str(input_image)] and record["family"] == "flux-kontext"
    first = tmp_path / "a" / record["images"][0]["file"]
    assert Image.open(first).size == (48, 32)
    again = generate.main(["--from_record", str(tmp_path / "a" / "record.json"), "--output_dir", str(tmp_path / "b")])
    assert json.dumps(again["images"]) == json.dumps(record["images"])
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(tmp_path / "b" / first.name)))


def test_the_output_size_flags_still_decide(kontext, input_image, tmp_path):
    record = generate.main(["--model", str(kontext), "--image", str(input_image), "--prompt", "make it green",
                            "--height", "32", "--width", "32", "--output_dir", str(tmp_path), *FAST])  # fmt: skip
    assert Image.open(tmp_path / record["images"][0]["file"]).size == (32, 32)


def test_input_images_for_the_wrong_kind_of_model_are_one_line(kontext, input_image, tiny_sd1, tmp_path):
    out = ["--output_dir", str(tmp_path), "--prompt", "make it green"]
    with pytest.raises(
        UserError, match=r"FluxKontextPipeline\) is an edit model: give the image to edit with --image"
    ):
        generate.main(["--model", str(kontext), *out])
    with pytest.raises(UserError, match=r"--image: .* \(StableDiffusionPipeline\) is a text-to-image model"):
        generate.main(["--model", str(tiny_sd1), "--image", str(input_image), *out])
    with pytest.raises(UserError, match="--image .*missing.png not found"):
        generate.main(["--model", str(kontext), "--image", str(tmp_path / "missing.png"), *out])
    with pytest.raises(UserError, match="takes 1 input image"):
        generate.main(["--model", str(kontext), "--image", str(input_image), "--image", str(input_image), *out])
