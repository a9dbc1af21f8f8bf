"""The hostile run's difftune-generate cases: every family, adapters of every kind and layout, adapters of another
family, bad flags, prompt files and replays of a record. An adapter must change the image it is asked to change.
"""

from __future__ import annotations

from pathlib import Path

from difftune.scripts.hostile_cases import case, fill
from difftune.scripts.hostile_cases_more import GEN, STRONG_RUNS
from difftune.scripts.hostile_run import Case, Ctx, Loss, Result

C = "CLEAN"


def gen(name: str, *extra: str, model: str = "sd15", expect: str = "OK", line: str = "", setup=None) -> Case:
    argv = ["--model", f"{{W}}/p/{model}", *GEN, "--output_dir", "{T}/g", *extra]
    return case(f"gen-{name}", "generate", argv, expect, line, setup, check=None if expect == C else _images)


def _images(ctx: Ctx, result: Result) -> None:
    if not [p for p in (ctx.tmp / "g").rglob("*") if p.suffix in (".png", ".jpg", ".webp")]:
        raise Loss("exit 0 but no image written")


TR = "{W}/trained"


def lora_applied(name: str, model: str, lora: str) -> Case:
    """Generation with and without the adapter, same seed: the images must differ (an adapter loaded and then not
    applied is silent)."""

    def body(ctx: Ctx) -> Result:
        plain = ctx.call("generate", fill(["--model", f"{{W}}/p/{model}", *GEN, "--output_dir", "{T}/a"], ctx))
        if plain.rc != 0:
            return plain
        argv = ["--model", f"{{W}}/p/{model}", *GEN, "--output_dir", "{T}/b", "--lora", lora]
        adapted = ctx.call("generate", fill(argv, ctx))
        if adapted.rc == 0:
            a, b = (sorted((ctx.tmp / d).glob("0*.png")) for d in "ab")
            if not a or not b:
                raise Loss("exit 0 but no image written")
            if a[0].read_bytes() == b[0].read_bytes():
                raise Loss(f"the image with --lora {Path(lora).name} is the image without it")
        return adapted

    return Case(f"gen-applied-{name}", "generate", body, "OK", "", 180)


def generation() -> list[Case]:
    applied = [
        lora_applied(name, model, f"{TR}/strong_{name}") for name, model, _ in STRONG_RUNS if name != "flux_kohya"
    ]
    applied.append(
        lora_applied("flux-kohya-file", "flux", f"{TR}/strong_flux_kohya/pytorch_lora_weights_kohya.safetensors")
    )
    applied.append(lora_applied("sd15-kohya-file", "sd15", f"{TR}/strong_sd15/pytorch_lora_weights_kohya.safetensors"))
    return [
        *applied,
        gen("plain"),
        gen("sdxl", model="sdxl"),
        gen("sd3", model="sd3"),
        gen("flux", model="flux"),
        gen("chroma", model="chroma"),
        gen("z-image", model="z_image"),
        gen("lora-dir", "--lora", f"{TR}/sd15"),
        gen("lora-file", "--lora", f"{TR}/sd15/pytorch_lora_weights.safetensors"),
        gen("lora-kohya-file", "--lora", f"{TR}/sd15/pytorch_lora_weights_kohya.safetensors"),
        gen("loha", "--lora", f"{TR}/loha"),
        gen("lokr", "--lora", f"{TR}/lokr"),
        gen("dora", "--lora", f"{TR}/dora"),
        gen("sdxl-lora", "--lora", f"{TR}/sdxl", model="sdxl"),
        gen("sd3-lora", "--lora", f"{TR}/sd3", model="sd3"),
        gen("flux-lora", "--lora", f"{TR}/flux", model="flux"),
        gen(
            "flux-kohya-lora",
            "--lora",
            f"{TR}/flux/pytorch_lora_weights_kohya.safetensors",
            model="flux",
            expect="ANY",
        ),
        gen("sdxl-lora-on-sd15", "--lora", f"{TR}/sdxl", expect=C, line="lora|sdxl"),
        gen("sd15-lora-on-sdxl", "--lora", f"{TR}/sd15", model="sdxl", expect=C, line="lora|sd15"),
        gen("flux-lora-on-sd3", "--lora", f"{TR}/flux", model="sd3", expect=C, line="lora|flux"),
        gen("sd3-lora-on-flux", "--lora", f"{TR}/sd3", model="flux", expect=C, line="lora|sd3"),
        gen("two-loras-fused", "--lora", f"{TR}/sd15", f"{TR}/dora", "--fuse_lora"),
        gen("lora-scale-count", "--lora", f"{TR}/sd15", "--lora_scale", "0.5", "0.5", expect=C, line="lora_scale"),
        gen("lora-scale-negative", "--lora", f"{TR}/sd15", "--lora_scale", "-1"),
        gen("lora-missing", "--lora", "{T}/none", expect=C, line="none"),
        gen("lora-empty-dir", "--lora", "{T}", expect=C, line="lora"),
        gen(
            "lora-corrupt",
            "--lora",
            "{T}/bad.safetensors",
            expect=C,
            line="bad.safetensors",
            setup=lambda c: (c.tmp / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"),
        ),
        gen(
            "lora-empty-file",
            "--lora",
            "{T}/e.safetensors",
            expect=C,
            line="e.safetensors",
            setup=lambda c: (c.tmp / "e.safetensors").write_bytes(b""),
        ),
        gen("lora-checkpoint-folder", "--lora", f"{TR}/ref/checkpoint-4", expect="ANY", line="checkpoint"),
        gen("model-missing", model="nowhere", expect=C, line="nowhere"),
        gen("model-is-lora", model="../trained/sd15", expect=C, line="model"),
        gen("steps-zero", "--steps", "0", expect=C, line="steps"),
        gen("num-images-zero", "--num_images", "0", expect=C, line="num_images"),
        gen("height-33", "--height", "33", expect=C, line="height"),
        gen("width-negative", "--width", "-32", expect=C, line="width"),
        gen("sampler-unknown", "--sampler", "heun++", expect=C, line="sampler"),
        gen("sampler-a1111-name", "--sampler", "DPM++ 2M Karras", expect=C, line="sampler"),
        gen("sampler-euler-a-spaced", "--sampler", "Euler a", expect=C, line="euler-a"),
        gen("sampler-dpmpp-2m-karras", "--sampler", "dpmpp-2m-karras"),
        gen("sampler-euler-a", "--sampler", "euler-a"),
        gen("sampler-flux-flow-unipc", "--sampler", "flow-unipc", model="flux"),
        *prompt_cases(),
        gen("sampler-flux-ddim", "--sampler", "DDIM", model="flux", expect="ANY", line="sampler|DDIM"),
        gen("dtype-fp16-cpu", "--dtype", "fp16", expect="ANY", line="fp16|dtype"),
        gen("device-cuda-absent", "--device", "cuda", expect=C, line="cuda|device"),
        gen("device-garbage", "--device", "gpu0", expect=C, line="device"),
        gen("output-is-file", "--output_dir", "{W}/d/img0.txt", expect=C, line="output_dir|img0.txt"),
        gen("output-unwritable", "--output_dir", "/proc/difftune-out", expect=C, line="/proc"),
        gen("image-for-text-model", "--image", "{W}/d/img0.png", expect=C, line="image"),
        gen("seed-negative", "--seed", "-5", expect="ANY", line="seed"),
        gen("batch-bigger-than-images", "--batch_size", "4"),
        gen("attention-unknown", "--attention", "flash9", expect=C, line="attention"),
        gen("guidance-negative", "--guidance_scale", "-3", expect="ANY"),
        gen("unknown-flag", "--lora_weight", "1", expect=C, line="lora_weight"),
    ]


def prompt_cases() -> list[Case]:
    """Prompts from a file, and replays of a record: arguments without --prompt / --model."""
    base = ["--steps", "2", "--height", "32", "--width", "32", "--output_dir", "{T}/g"]
    model = ["--model", "{W}/p/sd15"]

    def put(name: str, content: bytes):
        return lambda ctx: (ctx.tmp / name).write_bytes(content)

    record = "{W}/trained/record/g/record.json"
    return [
        case(
            "gen-prompt-file",
            "generate",
            [*model, *base, "--prompt_file", "{T}/p.txt"],
            "OK",
            "",
            put("p.txt", b"a dog\na cat\n"),
            _images,
        ),
        case("gen-prompt-file-missing", "generate", [*model, *base, "--prompt_file", "{T}/p.txt"], C, "p.txt"),
        case(
            "gen-prompt-file-empty",
            "generate",
            [*model, *base, "--prompt_file", "{T}/p.txt"],
            C,
            "p.txt",
            put("p.txt", b"\n  \n"),
        ),
        case(
            "gen-prompt-file-and-empty",
            "generate",
            [*model, *base, "--prompt", "x", "--prompt_file", "{T}/p.txt"],
            C,
            "p.txt",
            put("p.txt", b""),
        ),
        case(
            "gen-prompt-file-latin1",
            "generate",
            [*model, *base, "--prompt_file", "{T}/p.txt"],
            C,
            "p.txt",
            put("p.txt", "caf\xe9\n".encode("latin-1")),
        ),
        case(
            "gen-prompt-file-utf16",
            "generate",
            [*model, *base, "--prompt_file", "{T}/p.txt"],
            C,
            "p.txt",
            put("p.txt", "a dog\n".encode("utf-16")),
        ),
        case("gen-no-prompt", "generate", [*model, *base], C, "prompt"),
        case(
            "gen-from-record", "generate", ["--from_record", record, "--output_dir", "{T}/g"], "OK", "", None, _images
        ),
        case(
            "gen-from-record-index",
            "generate",
            ["--from_record", record, "--index", "0", "--output_dir", "{T}/g"],
            "OK",
            "",
            None,
            _images,
        ),
        case(
            "gen-from-record-index-out-of-range",
            "generate",
            ["--from_record", record, "--index", "7", "--output_dir", "{T}/g"],
            C,
            "index",
        ),
        case(
            "gen-from-record-missing",
            "generate",
            ["--from_record", "{T}/none.json", "--output_dir", "{T}/g"],
            C,
            "none.json",
        ),
        case(
            "gen-from-record-garbage",
            "generate",
            ["--from_record", "{T}/r.json", "--output_dir", "{T}/g"],
            C,
            "r.json",
            put("r.json", b"{"),
        ),
        case(
            "gen-from-record-with-model",
            "generate",
            ["--from_record", record, *model, "--output_dir", "{T}/g"],
            C,
            "model",
        ),
    ]
