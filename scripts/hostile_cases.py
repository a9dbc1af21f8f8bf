"""The hostile run's training cases (difftune-train-lora / -train-full): data, flags, YAML configs and presets.

`all_cases()` gathers these and those of `hostile_cases_more` (resume and kills, generation, baselines, the demo).
A case's arguments may hold ``{W}`` (the shared world: pipelines under ``{W}/p``, data under ``{W}/d``) and ``{T}``
(the case's own folder).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from difftune.scripts import hostile_world as hw
from difftune.scripts.hostile_run import Case, Ctx, Loss, Result

FAMILIES = tuple(hw.PIPELINES)
BASE = ("--resolution", "32", "--max_train_steps", "2", "--train_batch_size", "2", "--report_to", "none",
        "--seed", "1")  # fmt: skip


def fill(argv, ctx: Ctx) -> list[str]:
    return [str(a).replace("{W}", str(ctx.world)).replace("{T}", str(ctx.tmp)) for a in argv]


def train_argv(model: str = "sd15", data: str = "{W}/d", out: str = "{T}/o", *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", f"{{W}}/p/{model}", "--train_data_dir", data, "--output_dir", out,
            *BASE, *extra]  # fmt: skip


def has_lora(out: str = "o") -> Callable[[Ctx, Result], None]:
    def check(ctx: Ctx, result: Result) -> None:
        from safetensors.torch import load_file

        folder = ctx.tmp / out
        files = [folder / "pytorch_lora_weights.safetensors", *folder.glob("*/adapter_model.safetensors")]
        files = [f for f in files if f.is_file()]
        if not files:
            raise Loss(f"exit 0 but no adapter weights in {out}/")
        up = [v for f in files for k, v in load_file(f).items() if any(s in k for s in UP_KEYS)]
        if not up or all(v.abs().sum() == 0 for v in up):
            raise Loss(f"{files[0].name}: no trained (non-zero) adapter weights")

    return check


UP_KEYS = ("lora.up.", "lora_B.", "hada_w1_a", "hada_w2_b", "lokr_w1", "lokr_w2")


def has_pipeline(out: str = "o") -> Callable[[Ctx, Result], None]:
    def check(ctx: Ctx, result: Result) -> None:
        if not (ctx.tmp / out / "model_index.json").is_file():
            raise Loss(f"exit 0 but no model_index.json in {out}/")

    return check


def case(name: str, command: str, argv, expect: str = "OK", line: str = "", setup=None, check=None,
         timeout: float = 120) -> Case:  # fmt: skip
    """A one-command case: `setup(ctx)` prepares files, `argv` runs, `check(ctx, result)` judges an exit 0."""

    def body(ctx: Ctx) -> Result:
        if setup:
            setup(ctx)
        result = ctx.call(command, fill(argv(ctx) if callable(argv) else argv, ctx), timeout)
        if result.rc == 0 and check and not result.hung:
            check(ctx, result)
        return result

    return Case(name, command, body, expect, line, timeout)


def lora(name: str, *extra, model: str = "sd15", data: str = "{W}/d", expect: str = "OK", line: str = "",
         setup=None, check=None, command: str = "lora") -> Case:  # fmt: skip
    if check is None and expect != "CLEAN":
        check = has_lora() if command == "lora" else has_pipeline()
    return case(name, command, train_argv(model, data, "{T}/o", *extra), expect, line, setup, check)


# ----------------------------------------------------------------------------------------------- the world


def build_world(world: Path) -> None:
    hw.build_pipelines(world / "p")
    hw.caption_folder(world / "d")
    hw.jsonl_folder(world / "jsonl")
    from difftune.scripts.hostile_cases_more import build_trained

    build_trained(world)


# ----------------------------------------------------------------------------------------------- data


def data_case(name: str, make: Callable[[Path], None], expect: str = "OK", line: str = "", model: str = "sd15",
              *extra) -> Case:  # fmt: skip
    def setup(ctx: Ctx) -> None:
        folder = ctx.tmp / "data"
        folder.mkdir()
        make(folder)

    return lora("data-" + name, *extra, model=model, data="{T}/data", expect=expect, line=line, setup=setup)


def images(n: int = 4, size=(40, 40), ext: str = "png", mode: str = "RGB", caption: str | bytes = "a photo of sks dog",
           **save) -> Callable[[Path], None]:  # fmt: skip
    def make(folder: Path) -> None:
        for i in range(n):
            hw.picture(size, i, mode).save(folder / f"img{i}.{ext}", **save)
            text = caption.encode() if isinstance(caption, str) else caption
            (folder / f"img{i}.txt").write_bytes(text)

    return make


def then(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        for step in steps:
            step(folder)

    return make


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return make


def save_image(name: str, image: Image.Image | Callable[[], Image.Image], **save) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        (image() if callable(image) else image).save(folder / name, **save)

    return make


def remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def jsonl(rows: list[dict] | str, name: str = "metadata.jsonl", n: int = 4) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        for i in range(n):
            hw.picture((32, 32), i).save(folder / f"p{i}.png")
        text = rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows)
        (folder / name).write_text(text)

    return make


ROWS = [{"file_name": f"p{i}.png", "text": f"a red circle {i}"} for i in range(4)]
mask_arr = np.zeros((40, 40), dtype=np.uint8)
mask_arr[10:30, 10:30] = 255
MASK = Image.fromarray(mask_arr)


def data_cases() -> list[Case]:
    rgb = images()
    return [
        data_case("png", rgb),
        data_case("jpeg", images(ext="jpg", quality=70)),
        data_case("jpeg-upper-ext", images(ext="JPG")),
        data_case("webp", images(ext="webp")),
        data_case("webp-lossless", images(ext="webp", lossless=True)),
        data_case("tiff", images(ext="tiff")),
        data_case("bmp", images(ext="bmp")),
        data_case("gif", images(ext="gif")),
        data_case("greyscale", images(mode="L")),
        data_case("greyscale-alpha", images(mode="LA")),
        data_case("palette", images(mode="P")),
        data_case("cmyk-jpeg", images(ext="jpg", mode="CMYK")),
        data_case("16bit-png", images(mode="I;16")),
        data_case("rgba", images(mode="RGBA")),
        data_case("1bit", images(mode="1")),
        data_case("odd-size-31x17", images(size=(31, 17))),
        data_case("tiny-8x8", images(size=(8, 8))),
        data_case("1x1", images(size=(1, 1)), "ANY"),
        data_case("very-wide-512x9", images(size=(512, 9))),
        data_case(
            "mixed-sizes",
            then(
                images(2, (40, 40)),
                lambda f: [hw.picture((64, 23), 9).save(f / "w.png"), (f / "w.txt").write_text("a cat")],
            ),
        ),
        data_case(
            "corrupt-png",
            then(rgb, write("bad.png", b"\x89PNG\r\n\x1a\nnot really"), write("bad.txt", "x")),
            "OK",
            "skipped .*bad.png",
        ),
        data_case(
            "truncated-jpeg",
            then(images(ext="jpg"), lambda f: (f / "img1.jpg").write_bytes((f / "img1.jpg").read_bytes()[:200])),
            "OK",
            "skipped .*img1",
        ),
        data_case(
            "zero-byte-image", then(rgb, write("empty.png", b""), write("empty.txt", "x")), "OK", "skipped .*empty.png"
        ),
        data_case(
            "text-named-png", then(rgb, write("notes.png", "hello"), write("notes.txt", "x")), "OK", "skipped .*notes"
        ),
        data_case("exif-rotated", then(rgb, lambda f: _exif_rotate(f / "img0.jpg"))),
        data_case("dot-ds-store", then(rgb, write(".DS_Store", b"\x00\x01junk"))),
        data_case("hidden-image-file", then(rgb, write("._img0.png", b"\x00\x05\x16\x07AppleDouble junk"))),
        data_case(
            "subfolders",
            then(
                rgb, lambda f: shutil.copytree(f, f.parent / "sub"), lambda f: shutil.move(f.parent / "sub", f / "sub")
            ),
        ),
        data_case("symlinked-images", _symlinked),
        data_case("empty-folder", lambda f: None, "CLEAN", "data"),
        data_case("only-captions", then(rgb, lambda f: [p.unlink() for p in f.glob("*.png")]), "CLEAN", "data"),
        data_case("missing-caption", then(rgb, remove("img1.txt")), "ANY"),
        data_case("empty-caption", then(rgb, write("img1.txt", ""))),
        data_case("whitespace-caption", then(rgb, write("img1.txt", "  \n\t "))),
        data_case("utf8-bom-caption", then(rgb, write("img1.txt", "\ufeffa photo of sks dog".encode("utf-8")))),
        data_case("utf16-caption", then(rgb, write("img1.txt", "a photo of sks dog".encode("utf-16"))), "ANY", "img1"),
        data_case(
            "latin1-caption", then(rgb, write("img1.txt", "caf\xe9 au lait".encode("latin-1"))), "CLEAN", "img1"
        ),
        data_case("emoji-caption", then(rgb, write("img1.txt", "a dog \U0001f436 and a caf\u00e9"))),
        data_case("nul-in-caption", then(rgb, write("img1.txt", "a dog\x00 cat"))),
        data_case("huge-caption", then(rgb, write("img1.txt", "dog " * 20000))),
        data_case("crlf-multiline-caption", then(rgb, write("img1.txt", "a photo\r\nof sks\r\n dog\r\n"))),
        data_case("jsonl", jsonl(ROWS)),
        data_case("jsonl-bom", jsonl("\ufeff" + "".join(json.dumps(r) + "\n" for r in ROWS))),
        data_case("jsonl-crlf-blank-lines", jsonl("\r\n".join(json.dumps(r) for r in ROWS) + "\r\n\r\n")),
        data_case("jsonl-bad-line", jsonl(json.dumps(ROWS[0]) + "\n{not json\n"), "CLEAN", "metadata.jsonl"),
        data_case("jsonl-missing-file-name", jsonl([{"text": "x"}] * 2), "CLEAN", "file_name|metadata"),
        data_case(
            "jsonl-missing-text", jsonl([{"file_name": "p0.png"}, {"file_name": "p1.png"}]), "CLEAN", "text|caption"
        ),
        data_case("jsonl-file-missing", jsonl([*ROWS, {"file_name": "gone.png", "text": "x"}]), "OK", "gone.png"),
        data_case("jsonl-duplicate-rows", jsonl(ROWS + ROWS), "ANY"),
        data_case("jsonl-text-not-string", jsonl([{"file_name": f"p{i}.png", "text": 5} for i in range(4)]), "ANY"),
        data_case(
            "jsonl-text-null", jsonl([{"file_name": f"p{i}.png", "text": None} for i in range(4)]), "OK", "null"
        ),
        data_case(
            "jsonl-absolute-path",
            lambda f: jsonl([{"file_name": str(f / f"p{i}.png"), "text": "x"} for i in range(4)])(f),
            "ANY",
        ),
        data_case(
            "jsonl-subfolder-path",
            then(
                jsonl(ROWS),
                lambda f: [
                    (f / "s").mkdir(),
                    *[shutil.move(f / f"p{i}.png", f / "s") for i in range(4)],
                    (f / "metadata.jsonl").write_text(
                        "".join(json.dumps({"file_name": f"s/p{i}.png", "text": "x"}) + "\n" for i in range(4))
                    ),
                ],
            ),
        ),
        data_case("jsonl-empty", jsonl(""), "ANY"),
        data_case(
            "jsonl-and-unlisted-images", then(jsonl(ROWS[:2]), save_image("extra.png", hw.picture((32, 32), 7))), "ANY"
        ),
        data_case("jsonl-latin1", _latin1_jsonl, "CLEAN", "metadata.jsonl"),
        data_case("jsonl-array-not-lines", jsonl(json.dumps(ROWS)), "CLEAN", "metadata"),
        data_case(
            "csv", jsonl("file_name,text\n" + "".join(f"p{i}.png,a red circle\n" for i in range(4)), "metadata.csv")
        ),
        data_case(
            "csv-quoted-commas",
            jsonl("file_name,text\n" + "".join(f'p{i}.png,"a, red, circle"\n' for i in range(4)), "metadata.csv"),
        ),
        data_case(
            "csv-wrong-header",
            jsonl("image,caption\n" + "".join(f"p{i}.png,x\n" for i in range(4)), "metadata.csv"),
            "CLEAN",
            "file_name|column",
        ),
        data_case("csv-and-jsonl", then(jsonl(ROWS), jsonl("file_name,text\np0.png,other\n", "metadata.csv")), "ANY"),
        data_case(
            "csv-semicolons",
            jsonl("file_name;text\n" + "".join(f"p{i}.png;x\n" for i in range(4)), "metadata.csv"),
            "CLEAN",
            "file_name|column|metadata",
        ),
        data_case(
            "caption-column",
            jsonl([{"file_name": r["file_name"], "prompt": "x"} for r in ROWS]),
            "OK",
            "",
            "sd15",
            "--caption_column",
            "prompt",
        ),
        data_case(
            "caption-column-missing",
            jsonl(ROWS),
            "CLEAN",
            "caption_column|prompt",
            "sd15",
            "--caption_column",
            "prompt",
        ),
        data_case(
            "caption-extension-caption",
            then(images(caption="x"), lambda f: [p.rename(p.with_suffix(".caption")) for p in f.glob("*.txt")]),
            "OK",
            "",
            "sd15",
            "--caption_extension",
            ".caption",
        ),
        data_case("caption-extension-no-dot", rgb, "ANY", "", "sd15", "--caption_extension", "txt"),
        data_case("mask", then(rgb, save_image("img1_mask.png", MASK.resize((40, 40))))),
        data_case("mask-other-size", then(rgb, save_image("img1_mask.png", MASK.resize((13, 29)))), "ANY"),
        data_case(
            "mask-16bit", then(rgb, save_image("img1_mask.png", Image.fromarray(mask_arr.astype(np.uint16) * 128)))
        ),
        data_case(
            "mask-rgba-alpha",
            then(rgb, save_image("img1_mask.png", Image.merge("RGBA", [Image.new("L", (40, 40), 0)] * 3 + [MASK]))),
        ),
        data_case(
            "mask-all-black",
            then(rgb, *[save_image(f"img{i}_mask.png", Image.new("L", (40, 40), 0)) for i in range(4)]),
            "CLEAN",
            "mask",
        ),
        data_case("mask-all-white", then(rgb, save_image("img1_mask.png", Image.new("L", (40, 40), 255)))),
        data_case("mask-corrupt", then(rgb, write("img1_mask.png", b"nope")), "CLEAN", "img1_mask"),
        data_case("mask-without-image", then(rgb, save_image("ghost_mask.png", MASK)), "ANY"),
        data_case("control-pairs-non-edit-model", rgb, "CLEAN", "control", "sd15", "--control_data_dir", "{W}/d"),
        data_case("control-missing-dir", rgb, "CLEAN", "control_data_dir", "flux", "--control_data_dir", "{T}/nope"),
    ]


def _latin1_jsonl(folder: Path) -> None:
    jsonl(ROWS)(folder)
    (folder / "metadata.jsonl").write_bytes(
        b"".join(json.dumps(r).encode() + b"\n" for r in ROWS[:3]) + b'{"file_name": "p3.png", "text": "caf\xe9"}\n'
    )


def _symlinked(folder: Path) -> None:
    real = folder.parent / "real"
    real.mkdir()
    images()(real)
    for path in real.iterdir():
        (folder / path.name).symlink_to(path)


def _exif_rotate(path: Path) -> None:
    image = hw.picture((48, 24), 0)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    image.save(path, exif=exif)
    path.with_suffix(".txt").write_text("a photo")


def all_cases() -> list[Case]:
    from difftune.scripts import hostile_cases_flags, hostile_cases_more

    return [*data_cases(), *hostile_cases_flags.cases(), *hostile_cases_more.cases()]
