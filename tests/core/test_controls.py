"""Edit pairs in the data: control images found by file name in a folder, by metadata column or by dataset column;
missing or unreadable ones named in one line; control sizes follow the pipelines' rules."""

import json
import logging

import pytest
from PIL import Image

from difftune.core.controls import control_size, decode_controls
from difftune.core.errors import UserError
from difftune.core.imagefolder import read_records

RED, BLUE, GREEN = (200, 0, 0), (0, 0, 200), (0, 150, 0)


def pixel(image: Image.Image) -> tuple[int, int, int]:
    return image.getpixel((0, 0))


def test_a_control_folder_pairs_by_file_name_in_any_image_format(tmp_path):
    data, controls = tmp_path / "data", tmp_path / "data" / "inputs"  # a control folder inside the data folder
    (data / "sub").mkdir(parents=True)
    (controls / "sub").mkdir(parents=True)
    for name, colour in (("a", RED), ("sub/b", GREEN)):
        Image.new("RGB", (8, 8), colour).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text("make it blue")
    Image.new("RGB", (8, 8), BLUE).save(controls / "a.png")
    Image.new("RGB", (8, 8), BLUE).save(controls / "sub" / "b.jpg")  # another format, the same name
    records = read_records(train_data_dir=str(data), control_data_dir=[str(controls)])
    names = [r.name.removeprefix(str(data)) for r in records]
    assert names == ["/a.png", "/sub/b.png"]  # the control folder's images are not training images
    assert [[c.removeprefix(str(controls)) for c in r.controls] for r in records] == [["/a.png"], ["/sub/b.jpg"]]
    decoded = decode_controls(records)
    assert [len(c) for c in decoded] == [1, 1] and pixel(decoded[0][0]) == BLUE


def write_imagefolder(root, rows, colours):
    (root / "control").mkdir(parents=True, exist_ok=True)
    for name, colour in colours.items():
        Image.new("RGB", (8, 8), colour).save(root / name)
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize(
    "columns",
    [
        {"control_file_name": "control/x.png", "control_file_name_2": "control/y.png"},
        {"control_file_name": ["control/x.png", "control/y.png"]},
        {"control_file_names": ["control/x.png", "control/y.png"]},
    ],
    ids=["numbered columns", "a list", "datasets' list column"],
)
def test_metadata_control_columns_give_references_in_order(tmp_path, columns, caplog):
    colours = {"t.png": RED, "control/x.png": GREEN, "control/y.png": BLUE}
    write_imagefolder(tmp_path, [{"file_name": "t.png", "text": "make it red", **columns}], colours)
    with caplog.at_level(logging.WARNING):
        records = read_records(train_data_dir=str(tmp_path))
    assert "left out" not in caplog.text  # listed control images are not unlisted training images
    assert len(records) == 1 and records[0].caption == "make it red"
    assert [pixel(c) for c in decode_controls(records)[0]] == [GREEN, BLUE]
    assert not any(key.startswith("control") for key in records[0].extra)


def test_a_dataset_control_column(tmp_path):
    import datasets

    image = Image.new("RGB", (8, 8), RED)
    ds = datasets.Dataset.from_dict(
        {"image": [image], "text": ["make it red"], "source": [Image.new("RGB", (8, 8), BLUE)]}
    )
    ds = ds.cast_column("image", datasets.Image()).cast_column("source", datasets.Image())
    ds.save_to_disk(tmp_path / "ds")
    records = read_records(dataset_name=str(tmp_path / "ds"), control_column=["source"])
    assert pixel(decode_controls(records)[0][0]) == BLUE
    with pytest.raises(UserError, match="--control_column 'input' is not a column"):
        read_records(dataset_name=str(tmp_path / "ds"), control_column=["input"])


def test_missing_and_unreadable_control_images_are_one_line_naming_the_file(tmp_path):
    colours = {"t.png": RED}
    write_imagefolder(
        tmp_path, [{"file_name": "t.png", "text": "x", "control_file_name": "control/gone.png"}], colours
    )
    with pytest.raises(UserError, match=r"control image .*control/gone.png of .*t.png not found") as missing:
        decode_controls(read_records(train_data_dir=str(tmp_path)))
    (tmp_path / "control" / "gone.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"control image .*control/gone.png of .*t.png could not be read") as bad:
        decode_controls(read_records(train_data_dir=str(tmp_path)))
    assert "\n" not in str(missing.value) + str(bad.value)
    with pytest.raises(UserError, match="--control_data_dir .*nowhere is not a folder"):
        read_records(train_data_dir=str(tmp_path), control_data_dir=[str(tmp_path / "nowhere")])


def test_control_sizes_follow_the_image_or_keep_their_own_aspect_ratio():
    # the image's aspect ratio: the image's bucket (resized and cropped alike)
    assert control_size((128, 128), (64, 64), (64, 64), 16) == (64, 64)
    assert control_size((300, 200), (600, 400), (96, 64), 16) == (96, 64)
    # another aspect ratio: kept, at the bucket's area, sides multiples of the pipeline's
    assert control_size((200, 100), (64, 64), (64, 64), 16) == (96, 48)
    assert control_size((100, 200), (512, 512), (512, 512), 32) == (352, 736)
