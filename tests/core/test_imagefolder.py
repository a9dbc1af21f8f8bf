import json

import numpy as np
import pytest
from PIL import Image

from difftune.core.errors import UserError
from difftune.core.imagefolder import decode_all, read_records, to_rgb


def test_every_pil_mode_becomes_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent: composited on white
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (4, 4), 100)).getpixel((0, 0)) == (100, 100, 100)
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4))
    assert to_rgb(palette).mode == "RGB"
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert deep.mode.startswith("I")
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (8, 4), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "x.jpg", exif=exif)
    (tmp_path / "x.txt").write_text("a rotated thing")
    images, _ = decode_all(read_records(train_data_dir=str(tmp_path)))
    assert images[0].size == (4, 8)


def test_sidecar_captions(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f" caption {i}\n")
    records = read_records(train_data_dir=str(tmp_path))
    assert [r.caption for r in records] == ["caption 0", "caption 1", "caption 2"]


def test_imagefolder_metadata(shapes_dir):
    records = read_records(train_data_dir=str(shapes_dir))
    assert len(records) == 12 and records[0].caption.startswith("a ")
    assert records[0].extra["label"] == records[0].caption[2:]


def test_images_without_captions_is_a_clear_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="has 1 images but no captions"):
        read_records(train_data_dir=str(tmp_path))


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(UserError, match="holds no images"):
        read_records(train_data_dir=str(tmp_path))
    with pytest.raises(UserError, match="is not a folder"):
        read_records(train_data_dir=str(tmp_path / "nope"))


def test_missing_caption_column_names_it(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "x"}) + "\n")
    with pytest.raises(UserError, match="no caption column 'text'.*--caption_column"):
        read_records(train_data_dir=str(tmp_path))
    assert read_records(train_data_dir=str(tmp_path), caption_column="prompt")[0].caption == "x"


def test_corrupt_images_are_skipped_and_counted_once(tmp_path, caplog):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("ok")
    (tmp_path / "1.png").write_bytes((tmp_path / "1.png").read_bytes()[:20])  # truncated
    images, kept = decode_all(read_records(train_data_dir=str(tmp_path)))
    assert len(images) == 2 and [r.name.endswith("1.png") for r in kept] == [False, False]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("skipped 1 of 3 images: 1 that could not be decoded") and "1.png" in warning


def test_all_corrupt_never_trains_on_nothing(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not an image")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UserError, match="none of the 1 images could be read: 1 that could not be decoded"):
        decode_all(read_records(train_data_dir=str(tmp_path)))


def _imagefolder(root, names, listed):
    for name in names:
        Image.new("RGB", (8, 8)).save(root / name)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "x"}) + "\n" for n in listed))


def test_metadata_repeats_unlisted_and_missing_files_are_each_named(tmp_path, caplog):
    _imagefolder(tmp_path, ["a.png", "b.png", "extra.png"], ["a.png", "b.png", "a.png", "gone.png"])
    images, kept = decode_all(read_records(train_data_dir=str(tmp_path)))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(images) == 3  # a.png twice (as listed), b.png; gone.png skipped
    assert any("lists 1 file(s) more than once (a.png)" in w for w in warnings)
    assert any("1 image(s) in" in w and "extra.png" in w and "left out" in w for w in warnings)
    assert any(w.startswith("skipped 1 of 4 images: 1 missing (") and "gone.png" in w for w in warnings)


def test_empty_metadata_is_one_line(tmp_path):
    _imagefolder(tmp_path, ["a.png"], [])
    with pytest.raises(UserError, match="metadata.jsonl lists no images"):
        read_records(train_data_dir=str(tmp_path))


def test_dataset_name_columns_are_checked(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"img": [Image.new("RGB", (8, 8))], "caption": ["hi"]})
    ds = ds.cast_column("img", datasets.Image())
    ds.save_to_disk(tmp_path / "ds")
    with pytest.raises(UserError, match="--image_column 'image' is not a column"):
        read_records(dataset_name=str(tmp_path / "ds"), caption_column="caption")
    records = read_records(dataset_name=str(tmp_path / "ds"), image_column="img", caption_column="caption")
    images, _ = decode_all(records)
    assert records[0].caption == "hi" and images[0].size == (8, 8)
