import numpy as np
import pytest
from PIL import Image

from difftune.toyworld import shapes


@pytest.mark.parametrize("size", [64, 32])
def test_scorer_reads_rendered_ground_truth(size):
    rng = np.random.default_rng(123)
    images, prompts = [], []
    for colour in shapes.COLOURS:
        for shape in shapes.SHAPES:
            for _ in range(10):
                images.append(shapes.render(colour, shape, rng, size))
                prompts.append(shapes.caption(colour, shape))
    acc = shapes.accuracy(images, prompts)
    assert acc.colour == 1.0 and acc.shape == 1.0 and acc.n == 150


def test_scorer_counts_wrong_answers():
    rng = np.random.default_rng(0)
    red_circle = shapes.render("red", "circle", rng)
    acc = shapes.accuracy([red_circle, red_circle], ["a blue circle", "a red square"])
    assert acc.colour == 0.5 and acc.shape == 0.5


def test_blank_image_has_no_shape():
    score = shapes.score_image(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert score.colour is None and score.shape is None


def test_rendered_shape_obeys_the_spec():
    rng = np.random.default_rng(7)
    for shape in shapes.SHAPES:
        for _ in range(20):
            arr = np.asarray(shapes.render("green", shape, rng))
            assert arr.shape == (64, 64, 3)
            ys, xs = np.nonzero(np.linalg.norm(255.0 - arr, axis=-1) > 80)
            box = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
            assert shapes.MIN_BOX - 1 <= box <= shapes.MAX_BOX
            assert tuple(arr[0, 0]) == shapes.BACKGROUND or tuple(arr[-1, -1]) == shapes.BACKGROUND


def test_write_dataset_is_deterministic_and_imagefolder(tmp_path):
    a = shapes.write_dataset(tmp_path / "a", ("purple",), ("circle",), per_class=3, seed=5)
    shapes.write_dataset(tmp_path / "b", ("purple",), ("circle",), per_class=3, seed=5)
    assert [i.text for i in a] == ["a purple circle"] * 3
    for item in a:
        assert (tmp_path / "a" / item.file_name).read_bytes() == (tmp_path / "b" / item.file_name).read_bytes()
    lines = (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 3 and '"file_name"' in lines[0] and '"text"' in lines[0]


def test_base_set_holds_back_purple():
    assert shapes.HELD_OUT_COLOUR not in shapes.BASE_COLOURS
    assert all("purple" not in p for p in shapes.prompts())
