"""Bad and hostile input against every command, one row each: the input, the exit code, and the line the user
reads (an `error:` line for exit code 2; a warning or log line that must appear for a run that goes on). A row may
also check what is on disk afterwards (nothing lost, nothing half-written). Every row runs in this process through
the command's `main` under `run_main`, as the console command runs it; kills are in `test_faults.py`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difftune.baselines import compare
from difftune.baselines import train as baseline_train
from difftune.baselines.compare_store import RunStore
from difftune.core import checkpoint as ckpt
from difftune.core.errors import run_main
from difftune.finetune import cache, export, finetune_lora
from difftune.pipelines import generate
from difftune.toyworld.tiny import save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[2]
SMALL = ("--height", "32", "--width", "32")  # the tiny Flux samples 256 px by default


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--resolution", "32", "--center_crop", "--train_batch_size", "4", "--max_train_steps", "2",
            "--checkpointing_steps", "2", "--learning_rate", "1e-2", "--report_to", "none", "--seed", "5",
            *extra]  # fmt: skip


def run(main: Callable, argv: list[str]) -> int:
    try:
        run_main(main, argv)
    except SystemExit as exit_:
        return exit_.code
    return 0


@dataclass
class World:
    """The pipelines, data and trained adapters the rows use, built once."""

    root: Path
    sd1: Path
    sd2: Path
    sd3: Path
    flux: Path
    data: Path
    lora_sd1: Path = field(init=False)


@pytest.fixture(scope="module")
def world(tiny_sd1, shapes_dir, tmp_path_factory, one_thread) -> World:
    root = tmp_path_factory.mktemp("hostile")
    w = World(
        root, tiny_sd1, save_tiny_pipeline(root / "sd2", family="sd2"), save_tiny_pipeline(root / "sd3", family="sd3"),
        save_tiny_pipeline(root / "flux", family="flux"), shapes_dir,
    )  # fmt: skip
    w.lora_sd1 = root / "lora_sd1"
    assert run(finetune_lora.main, train_args(w.sd1, w.data, w.lora_sd1)) == 0
    return w


def copy_data(world: World, tmp: Path) -> Path:
    data = tmp / "data"
    shutil.copytree(world.data, data)
    return data


def captioned_folder(tmp: Path, n: int = 4) -> Path:
    """Images with .txt captions (no metadata.jsonl), so that masks and caption files can be added."""
    folder = tmp / "folder"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("a red circle")
    return folder


# ----------------------------------------------------------------------------------------------- row inputs


def ema_decay_alone(w: World, tmp: Path, mp) -> tuple:
    return finetune_lora.main, train_args(w.sd1, w.data, tmp / "o", "--ema_decay", "0.99")


def yaml_key_twice(w: World, tmp: Path, mp) -> tuple:
    (tmp / "c.yaml").write_text("learning_rate: 1e-4\nrank: 4\nlearning_rate: 1e-3\n")
    return finetune_lora.main, train_args(w.sd1, w.data, tmp / "o", "--config", str(tmp / "c.yaml"))


def latin1_config(w: World, tmp: Path, mp) -> tuple:
    (tmp / "c.yaml").write_bytes("instance_prompt: café\n".encode("latin-1"))
    return finetune_lora.main, train_args(w.sd1, w.data, tmp / "o", "--config", str(tmp / "c.yaml"))


def latin1_caption(w: World, tmp: Path, mp) -> tuple:
    folder = captioned_folder(tmp)
    (folder / "img2.txt").write_bytes("a red circle, café".encode("latin-1"))
    return finetune_lora.main, train_args(w.sd1, folder, tmp / "o")


def black_mask(w: World, tmp: Path, mp) -> tuple:
    folder = captioned_folder(tmp)
    Image.new("L", (32, 32), 0).save(folder / "img1_mask.png")
    return finetune_lora.main, train_args(w.sd1, folder, tmp / "o")


def refuse_to_encode(*args, **kwargs):
    raise AssertionError("latents were encoded before the bad flag was refused")


def t5_length_beyond_limit(w: World, tmp: Path, mp) -> tuple:
    from difftune.finetune import data

    mp.setattr(data, "encode_images", refuse_to_encode)
    return finetune_lora.main, train_args(w.sd3, w.data, tmp / "o", "--max_sequence_length", "10000")


def t5_default(model: str) -> Callable:
    def row(w: World, tmp: Path, mp) -> tuple:
        return finetune_lora.main, train_args(getattr(w, model), w.data, tmp / "o")

    return row


def baseline_resolution(family: str, value: str) -> Callable:
    def row(w: World, tmp: Path, mp) -> tuple:
        return baseline_train.main, ["--family", family, "--shapes", "--n_per_class", "2", "--resolution", value,
                                     "--max_train_steps", "1", "--output_dir", str(tmp / "o")]  # fmt: skip

    return row


COMPARE = ["--families", "vae", "--seeds", "0", "--resolution", "8", "--n_per_class", "4", "--budget_steps", "1",
           "--classifier_steps", "1", "--n_samples", "8", "--n_samples_curve", "8", "--quality_points", "1"]  # fmt: skip


def compare_store(w: World, tmp: Path, data_dir: Path | None = None) -> tuple[list[str], Path]:
    """A comparison's argv and the `runs/` folder its first invocation leaves (settings stored, no run done)."""
    argv = [*COMPARE, "--output_dir", str(tmp / "cmp")]
    if data_dir is not None:
        argv = [*argv, "--train_data_dir", str(data_dir)]
    config = compare.parse_args(argv)
    RunStore(tmp / "cmp", dataclasses.asdict(config), False, compare.data_fingerprint(compare.load_data(config)))
    return argv, tmp / "cmp" / "runs"


def compare_settings_changed(w: World, tmp: Path, mp) -> tuple:
    argv, _ = compare_store(w, tmp)
    return compare.main, [*argv, "--n_bits", "5"]  # other data too (quantised coarser): the setting is named


def baseline_twice(w: World, tmp: Path, mp) -> tuple:
    main, argv = baseline_resolution("vae", "8")(w, tmp, mp)
    assert run(main, argv) == 0
    return main, [*argv[:-1], str(tmp / "again")]


def same_baseline(w: World, tmp: Path) -> None:
    a, b = (load_file(tmp / name / "model.safetensors") for name in ("o", "again"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # --seed seeds the initial weights


def compare_config_damaged(w: World, tmp: Path, mp) -> tuple:
    argv, runs = compare_store(w, tmp)
    (runs / "config.json").write_text('{"resolution": 8,')
    return compare.main, argv


def compare_run_damaged(w: World, tmp: Path, mp) -> tuple:
    argv, runs = compare_store(w, tmp)
    (runs / "vae-seed0.safetensors").write_bytes(b"")
    (runs / "vae-seed0.json").write_text("{not json")
    return compare.main, argv


def compare_images_changed(w: World, tmp: Path, mp) -> tuple:
    folder = captioned_folder(tmp, n=24)
    argv, _ = compare_store(w, tmp, folder)
    Image.new("RGB", (32, 32), "white").save(folder / "img3.png")  # same name, other pixels
    return compare.main, argv


def sd1_lora_on_sd2(w: World, tmp: Path, mp) -> tuple:
    return generate.main, ["--model", str(w.sd2), "--lora", str(w.lora_sd1), "--prompt", "a red circle", "--steps",
                           "2", "--output_dir", str(tmp / "g"), "--device", "cpu"]  # fmt: skip


def checkpoint_flipped(w: World, tmp: Path, resume: str) -> tuple:
    out = tmp / "o"
    shutil.copytree(w.lora_sd1 / "checkpoint-2", out / "checkpoint-2")
    weights = out / "checkpoint-2" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF  # one weight's byte: the size is unchanged, the file still parses
    weights.write_bytes(bytes(raw))
    target = "latest" if resume == "latest" else str(out / "checkpoint-2")
    return finetune_lora.main, train_args(w.sd1, w.data, out, "--resume_from_checkpoint", target)


def disk_full(module, after: int = 0) -> Callable:
    """`module.save_file` writes half a file and fails with ENOSPC, from its `after + 1`-th call on."""

    def row(w: World, tmp: Path, mp) -> tuple:
        real, calls = module.save_file, []

        def full(tensors, path, *args, **kwargs):
            calls.append(path)
            if len(calls) > after:
                Path(path).write_bytes(b"\0" * 64)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(tensors, path, *args, **kwargs)

        mp.setattr(module, "save_file", full)
        return finetune_lora.main, train_args(w.sd1, w.data, tmp / "o")

    return row


def mask_changed_on_resume(w: World, tmp: Path, mp) -> tuple:
    folder = captioned_folder(tmp)
    Image.new("L", (32, 32), 255).save(folder / "img1_mask.png")
    assert run(finetune_lora.main, train_args(w.sd1, folder, tmp / "o")) == 0
    mask = Image.new("L", (32, 32), 255)
    mask.paste(0, (0, 0, 16, 32))
    mask.save(folder / "img1_mask.png")
    return finetune_lora.main, train_args(w.sd1, folder, tmp / "o", "--resume_from_checkpoint", "latest")


def rewind_with_limit(w: World, tmp: Path, mp) -> tuple:
    out = tmp / "o"
    args = ["--max_train_steps", "6", "--checkpointing_steps", "2"]
    assert run(finetune_lora.main, train_args(w.sd1, w.data, out, *args)) == 0
    return finetune_lora.main, train_args(w.sd1, w.data, out, *args, "--resume_from_checkpoint",
                                          str(out / "checkpoint-2"), "--checkpoints_total_limit", "1",
                                          "--learning_rate", "3e-2")  # fmt: skip


def short_run_with_validation(w: World, tmp: Path, mp) -> tuple:
    return finetune_lora.main, train_args(w.sd1, w.data, tmp / "o", "--validation_split", "0.25", "--keep_best_by",
                                          "validation_loss", "--early_stopping_patience", "2")  # fmt: skip


def flux_kohya_lora(w: World, tmp: Path, mp) -> tuple:
    lora = tmp / "flux_lora"
    assert run(finetune_lora.main, train_args(w.flux, w.data, lora, "--output_kohya_format")) == 0
    return generate.main, ["--model", str(w.flux), "--lora", str(lora / "pytorch_lora_weights_kohya.safetensors"),
                           "--prompt", "a red circle", "--steps", "2", "--output_dir", str(tmp / "g"), "--device",
                           "cpu", "--guidance_scale", "1", *SMALL]  # fmt: skip


def lycoris(adapter: str) -> Callable:
    def row(w: World, tmp: Path, mp) -> tuple:
        lora = tmp / "adapter"
        assert run(finetune_lora.main, train_args(w.sd1, w.data, lora, "--adapter", adapter, "--learning_rate", "0.1",
                                                  "--train_text_encoder")) == 0  # fmt: skip
        return generate.main, ["--model", str(w.sd1), "--lora", str(lora), "--prompt", "a red circle", "--steps", "2",
                                "--output_dir", str(tmp / "g"), "--device", "cpu"]  # fmt: skip

    return row


def flags(*extra: str) -> Callable:
    def row(w: World, tmp: Path, mp) -> tuple:
        return finetune_lora.main, train_args(w.sd1, w.data, tmp / "o", *extra)

    return row


def damaged_model(edit: Callable[[Path], None]) -> Callable:
    def row(w: World, tmp: Path, mp) -> tuple:
        model = tmp / "model"
        shutil.copytree(w.sd1, model)
        edit(model)
        return finetune_lora.main, train_args(model, w.data, tmp / "o")

    return row


# ----------------------------------------------------------------------------------------------- checks after


def generated(folder: Path) -> np.ndarray:
    return np.asarray(Image.open(folder / "00000_seed0.png"), dtype=np.float64)


def base_image(model: Path, tmp: Path, *extra: str) -> np.ndarray:
    argv = ["--model", str(model), "--prompt", "a red circle", "--steps", "2", "--output_dir", str(tmp / "base"),
            "--device", "cpu", *extra]  # fmt: skip
    assert run(generate.main, argv) == 0
    return generated(tmp / "base")


def nothing_half_written(w: World, tmp: Path) -> None:
    out = tmp / "o"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], list(out.rglob("*.tmp"))
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert ckpt.damage(out / "checkpoint-2", verify=True) is None  # the trained weights are kept


def no_cache_temporaries(w: World, tmp: Path) -> None:
    assert not list((tmp / "o" / ".cache").rglob("*.tmp"))


def rewound(w: World, tmp: Path) -> None:
    out = tmp / "o"
    (aside,) = out.glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-4", "checkpoint-6"]  # the abandoned run's, kept
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-6"]  # this run's last; 2 and 4 pruned
    state = json.loads((out / "checkpoint-6" / "state.json").read_text())
    assert state["schedulers"][0]["base_lrs"] == [3e-2]  # the rewound run's, not the abandoned one's
    assert ckpt.resolve("latest", out) == out / "checkpoint-6"


def validated_at_the_end(w: World, tmp: Path) -> None:
    best = json.loads((tmp / "o" / "best" / "best.json").read_text())
    assert best["step"] == 2


def flux_kohya_matches_diffusers_file(w: World, tmp: Path) -> None:
    kohya = generated(tmp / "g")
    argv = ["--model", str(w.flux), "--lora", str(tmp / "flux_lora" / "pytorch_lora_weights.safetensors"), "--prompt",
            "a red circle", "--steps", "2", "--output_dir", str(tmp / "d"), "--device", "cpu", "--guidance_scale", "1", *SMALL]  # fmt: skip
    assert run(generate.main, argv) == 0
    assert np.abs(kohya - generated(tmp / "d")).max() <= 1  # the same adapter (float rounding of the fused form)
    assert np.abs(kohya - base_image(w.flux, tmp, "--guidance_scale", "1", *SMALL)).max() > 1


def lycoris_loaded_as_trained(w: World, tmp: Path) -> None:
    """The adapter changes the image, and what generation loads is exactly what training saved last."""
    from difftune.pipelines.loading import load_loras, load_pipeline

    assert np.abs(generated(tmp / "g") - base_image(w.sd1, tmp)).max() > 1
    pipe, _ = load_pipeline(str(w.sd1))
    load_loras(pipe, [str(tmp / "adapter")], [1.0])
    trained = load_file(tmp / "adapter" / "checkpoint-2" / "model.safetensors")  # keys `<part>.<path>.default`
    loaded = {f"{part}.{name.replace('.lora0', '.default')}": p for part in ("unet", "text_encoder")
              for name, p in getattr(pipe, part).named_parameters() if ".lora0" in name}  # fmt: skip
    assert loaded and loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k].detach(), trained[k]) for k in trained)
    # docs/generation.md's way without difftune, through peft: the same weights
    snippet = (ROOT / "docs" / "generation.md").read_text().split("```python\n")[1].split("```")[0]
    scope = {}
    snippet = textwrap.dedent(snippet).replace("stable-diffusion-v1-5/stable-diffusion-v1-5", str(w.sd1))
    exec(snippet.replace("out/my-loha", str(tmp / "adapter")), scope)
    by_docs = {f"{part}.{name}": p for part in ("unet", "text_encoder")
               for name, p in getattr(scope["pipe"], part).named_parameters() if ".default" in name}  # fmt: skip
    assert by_docs.keys() == trained.keys() and all(torch.equal(by_docs[k].detach(), trained[k]) for k in trained)


def card_names_no_local_path(w: World, tmp: Path) -> None:
    card = (w.lora_sd1 / "README.md").read_text()
    assert "base_model:" not in card and str(w.sd1) not in card and "github.com" not in card
    assert f"fine-tune of {w.sd1.name}" in card


@dataclass(frozen=True)
class Row:
    name: str
    prepare: Callable  # (world, tmp_path, monkeypatch) -> (main, argv)
    code: int
    line: str  # in the `error:` line (exit code 2), or in the log (exit code 0)
    after: Callable | None = None  # (world, tmp_path): what must hold on disk afterwards


ROWS = [
    Row("ema_decay without use_ema", ema_decay_alone, 2, "--ema_decay only applies with --use_ema"),
    Row("a YAML key given twice", yaml_key_twice, 2, "key 'learning_rate' is given twice (lines 1 and 3); keep one"),
    Row("a Latin-1 --config", latin1_config, 2, "c.yaml: not UTF-8 text (byte 0xe9"),
    Row("a Latin-1 caption", latin1_caption, 2, "img2.txt: not UTF-8 text (byte 0xe9 at position 17); save it as UTF-8"),
    Row("an all-black mask", black_mask, 2, "img1_mask.png: every pixel is black (weight 0)"),
    Row("--max_sequence_length beyond the T5 tokenizer", t5_length_beyond_limit, 2,
        "--max_sequence_length 10000 is beyond the T5 tokenizer's limit of 16 tokens"),
    Row("SD 3 whose T5 allows fewer tokens than the default", t5_default("sd3"), 0, "saved"),
    Row("Flux whose T5 allows fewer tokens than the default", t5_default("flux"), 0, "saved"),
    Row("baseline vae --resolution 0", baseline_resolution("vae", "0"), 2, "--resolution 0 must be a positive"),
    Row("baseline pixelcnn --resolution 0", baseline_resolution("pixelcnn", "0"), 2, "--resolution 0 must be"),
    Row("baseline ddpm --resolution -8", baseline_resolution("ddpm", "-8"), 2, "--resolution -8 must be a positive"),
    Row("baseline --n_per_class 0", lambda w, t, mp: (baseline_train.main, [*baseline_resolution("vae", "8")(w, t, mp)[1],
        "--n_per_class", "0"]), 2, "--n_per_class 0 must be at least 1"),
    Row("a baseline run twice", baseline_twice, 0, "", same_baseline),
    Row("compare with another setting", compare_settings_changed, 2, "another comparison (n_bits: 8 there, 5 here)"),
    Row("a damaged runs/config.json", compare_config_damaged, 2, "runs/config.json: not valid JSON"),
    Row("a damaged per-run JSON", compare_run_damaged, 2, "runs/vae-seed0.json: not valid JSON"),
    Row("compare after the images changed", compare_images_changed, 2, "holds results of a comparison on other data"),
    Row("an SD 1.x LoRA on an SD 2.x model", sd1_lora_on_sd2, 2, "was trained on an sd1 model (its file says so)"),
    Row("a checkpoint flipped in place, named", lambda w, t, mp: checkpoint_flipped(w, t, "explicit"), 2,
        "model.safetensors differs from the file saved (sha256 mismatch"),
    Row("a checkpoint flipped in place, latest", lambda w, t, mp: checkpoint_flipped(w, t, "latest"), 0,
        "checkpoint-2: incomplete or damaged (model.safetensors differs from the file saved"),
    Row("a full disk while writing the LoRA", disk_full(export), 2, "could not save the result in", nothing_half_written),
    Row("a full disk while writing the cache", disk_full(cache, after=3), 2, "could not write the cache entry",
        no_cache_temporaries),
    Row("masks changed before a resume", mask_changed_on_resume, 2, "the training data (4 examples then, 4 now"),
    Row("a rewind with a checkpoint limit", rewind_with_limit, 0, "of a run this one does not continue: moved to",
        rewound),
    Row("a validation split in a run shorter than --validation_steps", short_run_with_validation, 0,
        "the validation loss on the held-out images is computed once, at the last step", validated_at_the_end),
    Row("a Flux LoRA in kohya keys on a narrow Flux", flux_kohya_lora, 0, "", flux_kohya_matches_diffusers_file),
    Row("a LoHa adapter in generate", lycoris("loha"), 0, "", lycoris_loaded_as_trained),
    Row("a LoKr adapter in generate", lycoris("lokr"), 0, "", lycoris_loaded_as_trained),
    Row("--adam_beta1 1.5", flags("--adam_beta1", "1.5"), 2, "--adam_beta1 1.5 must be within [0, 1)"),
    Row("--max_grad_norm -1", flags("--max_grad_norm", "-1"), 2, "--max_grad_norm -1.0 must not be negative"),
    Row("a negative prior loss weight", flags("--with_prior_preservation", "--class_data_dir", "c",
        "--prior_loss_weight", "-1"), 2, "--prior_loss_weight must not be negative"),
    Row("an integer beyond 64 bits", flags("--rank", str(2**70)), 2, f"--rank {2**70} out of range"),
    Row("a damaged model_index.json", damaged_model(lambda m: (m / "model_index.json").write_text("{")), 2,
        "model_index.json: not valid JSON"),
    Row("a pipeline without its UNet weights", damaged_model(lambda m: [p.unlink() for p in (m / "unet").iterdir()
        if p.suffix == ".safetensors"]), 2, "could not load its unet"),
    Row("the model card of a local base", lambda w, t, mp: (lambda argv: None, []), 0, "", card_names_no_local_path),
]  # fmt: skip


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_hostile_input(row: Row, world, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.INFO)
    main, argv = row.prepare(world, tmp_path, monkeypatch)
    capsys.readouterr()
    code = run(main, argv)
    err = capsys.readouterr().err
    assert code == row.code and "Traceback" not in err, err[-3000:]
    if code == 2:
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and row.line in lines[0], lines
    else:
        assert row.line in err + caplog.text, (err + caplog.text)[-3000:]
    if row.after is not None:
        monkeypatch.undo()
        row.after(world, tmp_path)


# ----------------------------------------------------------------------------------------------- masks, as read

GREY16 = np.full((4, 4), 32768, dtype=np.uint16)  # 50% grey in 16 bits


def alpha_drawn() -> Image.Image:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # black, and the weights in the alpha channel
    rgba[..., 3] = 255
    rgba[:, :2, 3] = 0
    return Image.fromarray(rgba, "RGBA")


@pytest.mark.parametrize(
    "mask, weights",
    [
        (Image.fromarray(GREY16), np.full((4, 4), 128)),
        (alpha_drawn(), np.array([[0, 0, 255, 255]] * 4)),
        (Image.new("RGBA", (4, 4), (255, 255, 255, 255)), np.full((4, 4), 255)),  # opaque: its grey level
        (Image.new("LA", (4, 4), (0, 128)), np.full((4, 4), 128)),
    ],
    ids=["16-bit grey", "RGBA drawn in alpha", "opaque RGBA", "LA"],
)
def test_masks_are_read_as_the_weights_they_draw(mask, weights, tmp_path):
    from difftune.core.imagefolder import Record, decode_masks

    mask.save(tmp_path / "m.png")
    (decoded,) = decode_masks([Record("x", "", "x.png", mask=str(tmp_path / "m.png"))], [Image.new("RGB", (4, 4))])
    assert np.array_equal(np.asarray(decoded), weights)


def test_the_embedded_flow_base_loads_with_plain_diffusers():
    from diffusers import DiffusionPipeline

    from difftune.core.paths import embedded_base

    pipe = DiffusionPipeline.from_pretrained(embedded_base("tiny_flow_shapes"))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
