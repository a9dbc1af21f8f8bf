"""Reading the user's data into (image, caption) records: the one place every trainer (finetune and baselines)
reads images from.

Sources, in the conventions users already have:
- an imagefolder with `metadata.jsonl` (or `metadata.csv`) holding `file_name` + a caption column, read with
  `datasets`' imagefolder builder;
- a folder of images with caption sidecars (`image.png` + `image.txt`; kohya's convention, which `datasets`
  does not read, so it is walked here);
- a `datasets` name or local dataset path (`--dataset_name`) with `--image_column` / `--caption_column`.

A loss mask per image (masked loss: train on a subject's region only) is `<image>_mask.png` beside the image, or a
`mask` column (a file name relative to the folder, or an image column of a dataset): grey levels are loss weights,
white 1, black 0 (16-bit masks rescaled; a mask whose alpha channel is not all opaque is read from its alpha). A mask
that is black everywhere is an error: its image would train nothing. Mask files are never read as training images.

An edit pair's control (input) images come with each record too: from a folder of the same file names, a
`control_file_name` metadata column or a dataset column (`core.controls`).

Images are kept encoded (path or bytes) until `decode_all`, which opens each one, applies its EXIF
orientation, converts any PIL mode to RGB and skips corrupt files with one warning that counts them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from difftune.core.controls import control_columns, in_folders, inside, is_control_column, sources_of
from difftune.core.errors import UserError
from difftune.core.files import read_text

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Record:
    """One training example before decoding: where its image is, its caption, and any other columns."""

    source: str | bytes  # a file path, or the encoded bytes of the image
    caption: str
    name: str  # shown in messages: a file name or "dataset[i]"
    extra: dict = field(default_factory=dict)
    mask: str | bytes | None = None  # the loss mask's file path or encoded bytes, if the image has one
    controls: list[str | bytes] = field(default_factory=list)  # an edit pair's control images (paths or bytes)

    def image_bytes(self) -> bytes:
        return _raw(self.source)


def _raw(source: str | bytes) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def _open(source: str | bytes) -> Image.Image:
    """An image file or encoded bytes, fully decoded (truncated files fail here, not later inside a batch), with its
    EXIF orientation applied. Raises OSError/ValueError (UnidentifiedImageError included) for corrupt data."""
    with Image.open(io.BytesIO(_raw(source))) as image:
        image.load()
        return ImageOps.exif_transpose(image)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _grey_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer or float grey images rescaled to 8-bit grey ("L"), not clipped (PIL's `convert`
    clips a 16-bit 50% grey to white); any other image as it is."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8))
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: EXIF rotation applied, transparency composited on white, 16-bit rescaled."""
    image = _grey_8bit(ImageOps.exif_transpose(image))  # idempotent: `_open` applied the rotation already
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def open_source(source: str | bytes) -> Image.Image:
    """Decodes an image file or encoded bytes to RGB; raises OSError/ValueError (UnidentifiedImageError included)
    for corrupt data, FileNotFoundError for a missing file."""
    return to_rgb(_open(source))


def open_rgb(record: Record) -> Image.Image:
    """Decodes one record's image."""
    return open_source(record.source)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def decode_all(records: list[Record]) -> tuple[list[Image.Image], list[Record]]:
    """Decodes every record; missing and corrupt images are skipped and counted in one warning (logged once).
    Never returns nothing."""
    images, kept, missing, bad = [], [], [], []
    for record in records:
        try:
            images.append(open_rgb(record))
            kept.append(record)
        except FileNotFoundError:
            missing.append(record.name)
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
            bad.append(record.name)
    parts = [f"{len(missing)} missing ({_shown(missing)})"] if missing else []
    parts += [f"{len(bad)} that could not be decoded ({_shown(bad)})"] if bad else []
    if not images:
        raise UserError(f"none of the {len(records)} images could be read: {'; '.join(parts)}; check the files")
    if parts:
        logger.warning("skipped %d of %d images: %s", len(missing) + len(bad), len(records), "; ".join(parts))
    return images, kept


def read_records(
    train_data_dir: str | None = None,
    dataset_name: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    caption_extension: str = ".txt",
    dataset_config_name: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
    require_captions: bool = True,
    flag: str = "--train_data_dir",
    control_data_dir: list[str] | None = None,
    control_column: list[str] | None = None,
) -> list[Record]:
    """Records of a folder or a `datasets` dataset, in a stable order. Raises UserError naming the flag/file;
    `flag` is the folder's flag (`--validation_data_dir` for a held-out folder read the same way). Control images
    come from `control_data_dir` folders (same file names), a metadata file's control columns, or a dataset's
    `control_column`s (`core.controls`)."""
    check_source(train_data_dir, dataset_name, flag)
    folders = list(control_data_dir or [])
    for folder in folders:
        if not Path(folder).is_dir():
            raise UserError(f"--control_data_dir {folder} is not a folder")
    if train_data_dir is not None:
        root = Path(train_data_dir)
        records = _read_folder(root, caption_column, caption_extension, require_captions, flag, folders)
        for record in records if folders else []:
            if not isinstance(record.source, str):
                raise UserError(f"--control_data_dir pairs images by file name; {record.name} has none")
            record.controls += in_folders(Path(record.source), root, folders)
    else:
        records = _read_dataset(
            dataset_name, dataset_config_name, split, image_column, caption_column, cache_dir, require_captions,
            list(control_column or []),
        )  # fmt: skip
    if not records:
        where = f"{flag} {train_data_dir}" if train_data_dir else f"--dataset_name {dataset_name}"
        raise UserError(f"{where} holds no images; expected {', '.join(IMAGE_EXTENSIONS)} files")
    return records


def check_source(train_data_dir: str | None, dataset_name: str | None, flag: str = "--train_data_dir") -> None:
    """Exactly one source of images: a folder or a `datasets` dataset."""
    if (train_data_dir is None) == (dataset_name is None):
        raise UserError(f"give exactly one of {flag} (a folder) or --dataset_name (a datasets name or path)")


def _read_folder(
    root: Path, caption_column: str, caption_extension: str, require_captions: bool, flag: str,
    control_folders: list[str] = (),
) -> list[Record]:  # fmt: skip
    if not root.is_dir():
        raise UserError(f"{flag} {root} is not a folder")
    for meta_name in ("metadata.jsonl", "metadata.csv"):
        if (root / meta_name).exists():
            check_metadata(root, root / meta_name, control_folders)
            return _read_imagefolder(root, root / meta_name, caption_column)
    files = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not inside(p, control_folders)
        and not hidden(p, root)
    )  # fmt: skip
    stems = {(p.parent, p.stem) for p in files}  # `x_mask.png` is a mask when an image `x.*` lies beside it
    masks = {p for p in files if p.stem.endswith(MASK_SUFFIX) and (p.parent, p.stem[: -len(MASK_SUFFIX)]) in stems}
    records, missing = [], []
    for path in (p for p in files if p not in masks):
        sidecar = path.with_suffix(caption_extension)
        if sidecar.exists():
            caption = read_text(sidecar).strip()
        elif require_captions:
            missing.append(path)
            continue
        else:
            caption = ""
        records.append(Record(str(path), caption, str(path), mask=sibling_mask(path)))
    if missing and not records:
        raise UserError(
            f"{flag} {root} has {len(missing)} images but no captions: add metadata.jsonl "
            f'(lines of {{"file_name": ..., "{caption_column}": ...}}) or {caption_extension} files beside the images'
        )
    if missing:
        raise UserError(
            f"{len(missing)} images in {root} have no {caption_extension} caption (first: {missing[0].name}); "
            "caption them or move them out"
        )
    return records


MASK_SUFFIX = "_mask"


def hidden(path: Path, root: Path) -> bool:
    """Whether `path` is hidden below `root` (a name starting with a dot: macOS's `._*` AppleDouble files beside
    copied images, `.ipynb_checkpoints/`, `.cache/`), which datasets' imagefolder skips too."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def sibling_mask(image: Path) -> str | None:
    """`<image>_mask.png` (or another image extension) beside `image`, if there is one."""
    for ext in (".png", *IMAGE_EXTENSIONS):
        candidate = image.with_name(f"{image.stem}{MASK_SUFFIX}{ext}")
        if candidate.is_file():
            return str(candidate)
    return None


def _mask_source(value, root: str) -> str | bytes | None:
    """A `mask` column's value as a path or bytes: a file name (relative to the dataset folder) or an image."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):  # datasets.Image(decode=False)
        return value["bytes"] if value.get("bytes") is not None else value["path"]
    if isinstance(value, Image.Image):
        return png_bytes(value)
    return str(Path(root) / str(value))  # named with its folder in messages, whether or not it exists


def decode_masks(records: list[Record], images: list[Image.Image]) -> list[Image.Image | None]:
    """Each record's loss mask as an 8-bit grey image of its image's size (EXIF rotation applied), or None."""
    masks = []
    for record, image in zip(records, images, strict=True):
        if record.mask is None:
            masks.append(None)
            continue
        name = record.mask if isinstance(record.mask, str) else f"the mask of {record.name}"
        try:
            mask = to_weights(_open(record.mask))
        except FileNotFoundError:
            raise UserError(f"{name}: no such mask file; add it or remove the image's mask entry") from None
        except UnidentifiedImageError:
            raise UserError(f"{name}: not an image file; fix or remove the mask") from None
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise UserError(
                f"{name}: not a readable mask image ({str(err).splitlines()[0]}); fix or remove it"
            ) from err
        if mask.size != image.size:
            raise UserError(f"{name}: mask is {mask.size[0]}x{mask.size[1]}, its image {record.name} is "
                            f"{image.size[0]}x{image.size[1]}; save the mask at the image's size")  # fmt: skip
        if mask.getextrema()[1] == 0:
            raise UserError(
                f"{name}: every pixel is black (weight 0), so {record.name} would train nothing; white marks what "
                "trains: fix the mask or remove it"
            )
        masks.append(mask)
    return masks


def to_weights(mask: Image.Image) -> Image.Image:
    """A mask image as 8-bit grey loss weights (white 1, black 0). A mask with an alpha channel that is not all
    opaque is read from its alpha (a cut-out drawn in transparency); otherwise from its grey level (colour as
    luminance). 16-bit masks are rescaled, so a 16-bit 50% grey weighs 0.5."""
    mask = _grey_8bit(mask)
    if mask.mode == "P":  # a palette, possibly with a transparent entry
        mask = mask.convert("RGBA")
    if mask.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = mask.getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
    return mask.convert("L")


def _metadata_rows(meta: Path) -> list[dict]:
    """The entries of metadata.jsonl / metadata.csv, as written."""
    text = read_text(meta)
    if meta.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                row.get("file_name")
            except (ValueError, AttributeError):
                raise UserError(f"{meta} line {number} is not a JSON object: {line[:80]!r}") from None
            rows.append(row)
    return rows


def _control_names(row: dict) -> list[str]:
    """The control image paths an entry lists (`control_file_name`, `control_file_name_2`, lists of them)."""
    names = []
    for key, value in row.items():
        if is_control_column(key) or (key.startswith("control") and key.endswith("_file_name")):
            names += [str(v) for v in (value if isinstance(value, list) else [value]) if v]
    return names


def _own_metadata(folder: Path, root: Path) -> Path | None:
    """A metadata file in `folder` or a folder between it and `root` (not `root` itself)."""
    for d in (folder, *folder.parents):
        if d == root:
            return None
        for name in ("metadata.jsonl", "metadata.csv"):
            if (d / name).exists():
                return d / name
    return None


def check_metadata(root: Path, meta: Path, control_folders: list[str] = ()) -> None:
    """What `datasets`' imagefolder passes over without a word: an empty metadata file (an error), a file listed
    more than once (it trains once per entry) and images in the folder that no entry lists (left out; control
    images, listed or in a control folder, are not training images)."""
    rows = _metadata_rows(meta)
    listed = [row.get("file_name", "") for row in rows]
    if not listed:
        raise UserError(
            f'{meta} lists no images; add lines of {{"file_name": ..., "text": ...}} (one per image) or remove it '
            "to use .txt captions"
        )
    repeated = sorted(name for name, n in Counter(listed).items() if n > 1)
    if repeated:
        logger.warning("%s lists %d file(s) more than once (%s): each entry trains as its own example; remove the "
                       "repeats or use --repeats", meta, len(repeated), _shown(repeated))  # fmt: skip
    names = {Path(name).as_posix() for name in listed + [c for row in rows for c in _control_names(row)]}
    unlisted = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and p.relative_to(root).as_posix() not in names
        and _own_metadata(p.parent, root) is None  # a subfolder with its own metadata file lists its images there
        and not p.stem.endswith(MASK_SUFFIX)  # loss masks are found beside their images
        and not inside(p, control_folders)
    )  # fmt: skip
    if unlisted:
        logger.warning("%d image(s) in %s have no entry in %s and are left out (%s)", len(unlisted), root, meta.name,
                       _shown(unlisted))  # fmt: skip


def _quiet_datasets():
    """datasets' progress bars say "Downloading data" even for local files; they only confuse here."""
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _read_imagefolder(root: Path, meta: Path, caption_column: str) -> list[Record]:
    datasets = _quiet_datasets()

    try:
        ds = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
    except Exception as err:  # datasets raises many types for a malformed metadata file
        raise UserError(f"{meta} could not be read as an imagefolder: {str(err).splitlines()[0]}") from err
    if caption_column not in ds.column_names:
        raise UserError(
            f"{meta} has no caption column {caption_column!r} (columns: {', '.join(ds.column_names)}); "
            "set --caption_column"
        )
    ds = ds.cast_column("image", datasets.Image(decode=False))
    controls = control_columns(ds.column_names)
    return _records_of(_undecoded(ds, controls), "image", caption_column, str(root), controls)


def _undecoded(ds, columns: list[str]):
    """`ds` with its image `columns` (single or lists) read as paths/bytes, decoded later by our own reader."""
    datasets = _quiet_datasets()
    for column in columns:
        feature = ds.features[column]
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            ds = ds.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return ds


def _read_dataset(
    name, config_name, split, image_column, caption_column, cache_dir, require_captions, control_column=()
) -> list[Record]:
    datasets = _quiet_datasets()

    path = Path(name)
    try:
        if path.is_dir() and (path / "dataset_info.json").exists():
            ds = datasets.load_from_disk(str(path))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, config_name, split=split, cache_dir=cache_dir)
    except Exception as err:
        raise UserError(f"--dataset_name {name} could not be loaded: {str(err).splitlines()[0]}") from err
    required = [("--image_column", image_column), *(("--control_column", c) for c in control_column)]
    if require_captions:
        required.append(("--caption_column", caption_column))
    for flag, column in required:
        if column not in ds.column_names:
            raise UserError(f"{flag} {column!r} is not a column of {name} (columns: {', '.join(ds.column_names)})")
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return _records_of(_undecoded(ds, list(control_column)), image_column, caption_column, name, list(control_column))


def _records_of(ds, image_column: str, caption_column: str, origin: str, controls: list[str] = ()) -> list[Record]:
    records, null_captions = [], []
    for i, row in enumerate(ds):
        image = row[image_column]
        if isinstance(image, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            source = image["bytes"] if image.get("bytes") is not None else image["path"]
            name = image.get("path") or f"{origin}[{i}]"
        elif isinstance(image, Image.Image):
            source, name = png_bytes(image), f"{origin}[{i}]"
        else:
            source, name = str(image), str(image)
        caption = row.get(caption_column, "")
        if isinstance(caption, list):  # datasets with several captions per image: take the first
            caption = caption[0] if caption else ""
        if caption is None:
            null_captions.append(str(name))
        extra = {k: v for k, v in row.items() if k not in (image_column, caption_column, "mask", *controls)}
        mask = _mask_source(row.get("mask"), origin)
        if mask is None and isinstance(source, str) and Path(source).is_file():
            mask = sibling_mask(Path(source))
        control = [s for column in controls for s in sources_of(row[column], origin)]
        records.append(Record(source, "" if caption is None else str(caption), str(name), extra, mask, control))
    if null_captions:
        logger.warning("%d of %d captions in %s are null (%s): those images train without a caption", len(null_captions),
                       len(records), origin, _shown(null_captions))  # fmt: skip
    return records
