"""Control images of edit pairs: the input image an edit model (Flux Kontext, Qwen-Image-Edit) is given beside the
instruction, paired with the training image, which is the wanted result.

A training image finds its control image(s) in the conventions users already have:
- a folder with the same file names (`--control_data_dir DIR`, as ai-toolkit's and musubi-tuner's datasets): the
  image `sub/x.png` of the training folder pairs with `DIR/sub/x.png`, or `DIR/sub/x.*` in another image format;
  several folders give several references, in order;
- a metadata column: `control_file_name` (a path relative to the metadata file, read by `datasets`' imagefolder as
  an image column named `control`), `control_file_name_2`, `control_2_file_name`, ... for more references, or a
  list of paths in `control_file_name` / `control_file_names`;
- a dataset column (`--control_column NAME`, an image column or a list of images).

Control images are kept encoded (path or bytes) in each `Record` until `decode_controls`, which opens them all; a
missing or unreadable one is one `UserError` line naming the file and the training image it belongs to.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from difftune.core.errors import UserError

# `control` / `control_2` are what datasets' imagefolder makes of `control_file_name` / `control_2_file_name`;
# `control_file_name_2` and lists it leaves as they are.
CONTROL_COLUMN = re.compile(r"^control(?:_file_names?)?(?:_(\d+))?$")


def control_columns(columns: list[str]) -> list[str]:
    """The control columns among `columns`, in reference order (`control`, then `control_2`, ...)."""
    found = [(int(m.group(1) or 1), name) for name in columns if (m := CONTROL_COLUMN.match(name))]
    return [name for _, name in sorted(found)]


def is_control_column(name: str) -> bool:
    return CONTROL_COLUMN.match(name) is not None


def sources_of(value, root: str) -> list[str | bytes]:
    """One column's value as control sources: a path relative to `root` (or absolute), an image column's value
    (`datasets.Image(decode=False)` dict or a PIL image), or a list of them. None or "" gives none."""
    from difftune.core.imagefolder import png_bytes

    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [source for item in value for source in sources_of(item, root)]
    if isinstance(value, dict):
        return [value["bytes"] if value.get("bytes") is not None else value["path"]]
    if isinstance(value, Image.Image):
        return [png_bytes(value)]
    path = Path(root) / str(value)  # an absolute `value` stays itself
    return [str(path if path.exists() or Path(root).is_dir() else value)]


def in_folders(image: Path, root: Path, folders: list[str]) -> list[str]:
    """The control image of training image `image` (under `root`) in each of `folders`: the same relative path, or
    the same name in another image format. A missing one is returned as the path expected (reported on decoding)."""
    from difftune.core.imagefolder import IMAGE_EXTENSIONS

    relative = image.relative_to(root)
    out = []
    for folder in folders:
        exact = Path(folder) / relative
        if exact.is_file():
            out.append(str(exact))
            continue
        others = [exact.with_suffix(ext) for ext in IMAGE_EXTENSIONS if exact.with_suffix(ext).is_file()]
        out.append(str(others[0] if others else exact))
    return out


def inside(path: Path, folders: list[str]) -> bool:
    """Whether `path` lies in one of `folders` (a control folder inside the training folder is not training data)."""
    resolved = path.resolve()
    return any(resolved.is_relative_to(Path(folder).resolve()) for folder in folders)


def decode_controls(records) -> list[list[Image.Image]]:
    """Each record's control images, decoded to RGB. One line naming the file for a missing or unreadable one."""
    from difftune.core.imagefolder import open_source

    out = []
    for record in records:
        images = []
        for k, source in enumerate(record.controls):
            name = source if isinstance(source, str) else f"control image {k + 1} of {record.name}"
            try:
                images.append(open_source(source))
            except FileNotFoundError:
                raise UserError(
                    f"control image {name} of {record.name} not found; add it, or move {record.name} out"
                ) from None
            except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
                raise UserError(
                    f"control image {name} of {record.name} could not be read ({str(err).splitlines()[0]}); replace it"
                ) from None
        out.append(images)
    return out


def check_pairs(records) -> int:
    """The number of control images every record has (0: no pairs). Records with different counts are one line
    naming the first that differs."""
    counts = [len(record.controls) for record in records]
    if not counts or len(set(counts)) == 1:
        return counts[0] if counts else 0
    first = next(r for r in records if len(r.controls) != counts[0])
    raise UserError(
        f"{first.name} has {len(first.controls)} control image(s) where {records[0].name} has {counts[0]}: every "
        "training image needs the same number of control images"
    )


def control_size(
    size: tuple[int, int], image_size: tuple[int, int], bucket: tuple[int, int], multiple: int
) -> tuple[int, int]:
    """The (w, h) an edit pair's control image of `size` trains at, its image (of `image_size`) being in `bucket`.

    A control of the image's aspect ratio (within 1%) takes the image's bucket, so both are resized and cropped alike
    (as diffusers' Kontext training script does). Another aspect ratio is kept, not cropped, at the bucket's area with
    sides a multiple of `multiple`, which is how `FluxKontextPipeline` (without `_auto_resize`) sizes an input image
    for itself. A family whose pipeline sizes inputs otherwise says so (`Family.control_size`: Qwen-Image-Edit's
    about a megapixel, whatever the result's size)."""
    ratio = (size[0] / size[1]) / (image_size[0] / image_size[1])
    if abs(math.log(ratio)) < 0.01:
        return bucket
    area, aspect = bucket[0] * bucket[1], size[0] / size[1]
    width, height = math.sqrt(area * aspect), math.sqrt(area / aspect)
    return max(multiple, round(width / multiple) * multiple), max(multiple, round(height / multiple) * multiple)
