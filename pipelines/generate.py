"""Generate images from a saved pipeline (SD 1.x, 2.x, SDXL, SD 3/3.5, Flux, Flux.2, Qwen-Image, Z-Image, Chroma),
with LoRAs and a named sampler, or edit an image with an edit model (Flux Kontext).

    difftune-generate --model pipelines/tiny_shapes --prompt "a red circle" --sampler dpmpp-2m \\
        --steps 20 --num_images 4 --seed 0 --output_dir out
    difftune-generate --model pipelines/tiny_edit_shapes --image in.png --prompt "make it green" --output_dir out
    difftune-generate --from_record out/record.json --index 2 --output_dir again

Writes one PNG per image, `grid.png`, and `record.json`: everything needed to make any image again, exactly
(`--from_record`). Image i of prompt p has its own seed (`--seed` + its index) drawn on a CPU generator, so an
image does not depend on which other images share its batch; the record still keeps the batch layout, and
regeneration re-runs the image's whole batch, because batched matrix products may round differently from
unbatched ones. Classifier-free guidance is the diffusers pipeline's own: the unconditional and conditional
halves go through the UNet in one batched call per step (checked in the tests with a forward hook); `--guidance_scale`
goes to the argument each pipeline guides with (Qwen-Image's `true_cfg_scale`, the guidance a distilled Flux is
conditioned on). Flow models (SD 3/3.5, Flux, Flux.2, Qwen-Image, Z-Image, Chroma) sample with the flow samplers
(`flow-euler` by default); a sampler that does not fit the model's family, or a LoRA trained for another family, is
one line naming both. An edit model edits `--image` (every prompt applies to it; the result has its size unless
`--height`/`--width` say otherwise) and needs one; a text-to-image model refuses one.
Attention is PyTorch's scaled-dot-product attention (diffusers' default `AttnProcessor2_0`) unless
`--attention classic` asks for the explicit softmax(QK^T)V processor.

The settings are one typed dataclass, `GenerateConfig`, filled by `core.config` from flags and `--config` YAML
files (`--prompt a --prompt b` and `--prompt a b` both give two prompts). Everything that needs no weights is
checked before the model loads, each failure one `error:` line and exit code 2: seeds, finite numbers, the
output folder, each LoRA file (opened as safetensors), the model's family, and whether the sampler's scheduler
can run the step count at all (tried on the model's own scheduler config).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor
from PIL import Image
from tqdm import tqdm

from difftune.core.config import from_values, option, parse, to_dict
from difftune.core.errors import UserError, command
from difftune.core.files import read_text
from difftune.core.imagefolder import open_source
from difftune.core.images import make_grid
from difftune.core.paths import check_output_dir
from difftune.pipelines.families import Family, detect, sub_config
from difftune.pipelines.loading import (
    DTYPES,
    Adapter,
    check_device,
    check_lora_file,
    check_lora_fits,
    load_loras,
    load_pipeline,
    match_scales,
)
from difftune.pipelines.samplers import check_sampler, check_steps, sampler_names, set_sampler

PROG = "difftune-generate"
RECORD_NAME = "record.json"
GRID_NAME = "grid.png"
MAX_SEED = 2**63 - 1  # torch takes seeds up to 2**64 - 1, numpy and most tools only signed 64-bit ones
ATTENTION = {"sdpa": None, "classic": AttnProcessor}  # None: diffusers' default, SDPA (`AttnProcessor2_0`)
RUN_ONLY = ("from_record", "index")  # how this run was asked for, not what it makes: not in the record


@dataclass
class GenerateConfig:
    """What to generate and how; the command line and `--config` YAML files fill it (see `core.config`)."""

    model: str | None = option(
        "diffusers pipeline folder or Hub id (SD 1.x/2.x, SDXL, SD 3/3.5, Flux, Kontext, Flux.2, Qwen-Image, Z-Image, "
        "Chroma)",
        None,
    )
    prompt: list[str] = option("prompt(s): several values, or the flag repeated", [], repeatable=True)
    image: list[str] = option("edit models: the input image every prompt edits (several: references)", [],
                              repeatable=True)  # fmt: skip
    prompt_file: str | None = option("a text file, one prompt per line (after any --prompt)", None)
    negative_prompt: str | None = option("what to steer away from, for every image", None)
    lora: list[str] = option("LoRA file(s) or training output folder(s), diffusers or kohya keys", [], repeatable=True)
    lora_scale: list[float] = option("one scale for every --lora, or one per --lora", [1.0], repeatable=True)
    fuse_lora: bool = option("fold the adapters into the weights before sampling", False)
    sampler: str | None = option(
        "the sampler: a diffusers scheduler by A1111-style name (default: dpmpp-2m; flow-euler for SD3/Flux)",
        None, choices=sampler_names(),
    )  # fmt: skip
    steps: int = option("num_inference_steps", 20)
    guidance_scale: float = option("classifier-free guidance scale (1 or less: no guidance)", 7.5)
    num_images: int = option("images per prompt", 1)
    seed: int = option(f"image i gets seed + i; every seed within 0..{MAX_SEED}", 0)
    height: int | None = option("image height in pixels (default: the model's)", None)
    width: int | None = option("image width in pixels (default: the model's)", None)
    batch_size: int = option("images per pipeline call", 4)
    output_dir: str | None = option("folder for the images, grid.png and record.json", None)
    device: str = option("auto (the GPU when there is one) | cpu | cuda | cuda:N", "auto")
    dtype: str = option("weights and activations", "fp32", choices=tuple(DTYPES))
    channels_last: bool = option("UNet and VAE in channels-last memory format (UNet models)", False)
    compile: bool = option("torch.compile the denoiser (UNet or transformer)", False)
    attention: str = option(
        "sdpa: PyTorch's fused attention; classic: softmax(QK^T)V", "sdpa", choices=tuple(ATTENTION)
    )
    from_record: str | None = option(
        "a record.json: regenerate its images exactly (other settings come from it)", None
    )
    index: list[int] | None = option("with --from_record: which images (default: all)", None, repeatable=True)

    def prompts(self) -> list[str]:
        """--prompt values, then the lines of --prompt_file."""
        prompts = list(self.prompt)
        if self.prompt_file:
            path = Path(self.prompt_file)
            if not path.is_file():
                raise UserError(f"--prompt_file {self.prompt_file} not found")
            lines = [line.strip() for line in read_text(path).splitlines() if line.strip()]
            if not lines:
                raise UserError(f"--prompt_file {self.prompt_file} holds no prompt; write one prompt per line")
            prompts += lines
        return prompts

    def validate(self) -> None:
        """Every check that needs no model weights, so that bad input fails in a second, not after loading."""
        if self.from_record is not None:
            return self._validate_replay()
        if self.index is not None:
            raise UserError("--index only goes with --from_record")
        if not self.model:
            raise UserError("--model is required (a diffusers pipeline folder or Hub id)")
        if not self.output_dir:
            raise UserError("--output_dir is required")
        prompts = self.prompts()
        if not prompts:
            raise UserError("give at least one --prompt or a --prompt_file")
        for name in ("steps", "num_images", "batch_size", "height", "width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be at least 1, got {value}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"--seed {self.seed} out of range: a seed must lie within 0..{MAX_SEED} (2**63 - 1)")
        last_seed = self.seed + len(prompts) * self.num_images - 1  # image i gets seed + i
        if last_seed > MAX_SEED:
            raise UserError(
                f"--seed {self.seed}: the {len(prompts) * self.num_images} images would take seeds up to {last_seed}, "
                f"beyond {MAX_SEED} (2**63 - 1); use a smaller --seed"
            )
        match_scales(self.lora, self.lora_scale)
        for lora in self.lora:
            check_lora_file(lora)
        check_output_dir(self.output_dir)
        check_device(self.device, self.dtype)
        family = detect(self.model)  # a missing model or an unsupported pipeline class is one line here
        check_images(self.image, family, self.model)
        if family.denoiser_name != "unet" and (self.attention != "sdpa" or self.channels_last):
            raise UserError(
                f"--attention classic and --channels_last are for UNet models; {self.model} is {family.name}"
            )
        if self.negative_prompt is not None and not family.takes_negative_prompt:
            raise UserError(
                f"--negative_prompt: {family.pipeline_class_name} takes no negative prompt ({self.model}); drop it"
            )
        for lora in self.lora:
            check_lora_fits(lora, family, self.model)
        sampler = self.sampler or family.default_sampler
        check_sampler(sampler, family)
        scheduler_config = sub_config(self.model, "scheduler", "scheduler_config.json")
        if scheduler_config:
            check_steps(sampler, self.steps, scheduler_config)

    def _validate_replay(self) -> None:
        """With --from_record every setting comes from the record: another flag would be silently ignored."""
        defaults = GenerateConfig()
        for f in fields(self):
            if f.name not in (*RUN_ONLY, "output_dir") and getattr(self, f.name) != getattr(defaults, f.name):
                raise UserError(
                    f"--from_record regenerates the record's own settings; --{f.name} cannot change them (drop it)"
                )
        if not Path(self.from_record).is_file():
            raise UserError(f"--from_record {self.from_record} not found")


@dataclass(frozen=True)
class ImageSpec:
    index: int
    prompt: str
    seed: int


def _absolute_if_local(path: str) -> str:
    return str(Path(path).resolve()) if Path(path).exists() else path


def resolved(cfg: GenerateConfig) -> GenerateConfig:
    """The config as the record keeps it: every prompt listed, local paths absolute (the record must work from
    any working directory)."""
    return replace(
        cfg,
        model=_absolute_if_local(cfg.model),
        sampler=cfg.sampler or detect(cfg.model).default_sampler,
        prompt=cfg.prompts(),
        prompt_file=None,
        lora=[_absolute_if_local(x) for x in cfg.lora],
        image=[_absolute_if_local(x) for x in cfg.image],
    )


def prepare_pipeline(cfg: GenerateConfig) -> tuple[DiffusionPipeline, type[Family], list[Adapter]]:
    """Loads the model, its LoRAs and the sampler, applies the speed options; returns (pipe, family, adapters)."""
    pipe, family = load_pipeline(cfg.model, cfg.dtype, cfg.device)
    set_sampler(pipe, cfg.sampler or family.default_sampler)  # before LoRAs: an unknown sampler name fails fast
    adapters = load_loras(pipe, cfg.lora, cfg.lora_scale, fuse=cfg.fuse_lora)
    processor = ATTENTION[cfg.attention]
    if processor is not None:  # UNet models only (checked in `validate`)
        pipe.unet.set_attn_processor(processor())
        pipe.vae.set_attn_processor(processor())
    if cfg.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if cfg.compile:
        setattr(pipe, family.denoiser_name, torch.compile(getattr(pipe, family.denoiser_name)))
    return pipe, family, adapters


def check_images(images: list[str], family: type[Family], model: str) -> None:
    """An edit model gets its input image(s), a text-to-image model none; each one opens."""
    kind = f"{model} ({family.pipeline_class_name})"
    if family.max_controls and not images:
        raise UserError(f"{kind} is an edit model: give the image to edit with --image FILE")
    if images and not family.max_controls:
        raise UserError(f"--image: {kind} is a text-to-image model and takes no input image; drop --image")
    if len(images) > family.max_controls:
        raise UserError(f"--image given {len(images)} times; {kind} takes {family.max_controls} input image(s)")
    for path in images:
        try:
            open_source(path)
        except FileNotFoundError:
            raise UserError(f"--image {path} not found") from None
        except (OSError, ValueError) as err:
            raise UserError(f"--image {path} is not a readable image ({str(err).splitlines()[0]})") from None


def image_size(
    pipe: DiffusionPipeline, height: int | None, width: int | None, default: tuple[int, int] | None = None
) -> tuple[int, int]:
    """The requested size, or `default` (w, h; an edit's input image, rounded down to a size the model makes), or
    the model's default; a size the pipeline cannot make is a `UserError`."""
    if default is not None and hasattr(pipe, "vae_scale_factor"):
        multiple = pipe.vae_scale_factor * 2
        height = height or max(multiple, default[1] // multiple * multiple)
        width = width or max(multiple, default[0] // multiple * multiple)
    if hasattr(pipe, "default_sample_size"):  # SD3 and Flux pipelines: in latent pixels
        default = pipe.default_sample_size * pipe.vae_scale_factor
        multiple = pipe.vae_scale_factor * 2  # 2x2 patches (SD3, Flux.2) or packed latents (Flux, Qwen-Image)
    elif not hasattr(pipe, "unet"):  # ZImagePipeline: 1024 px unless told, 2x2 patches
        default, multiple = 1024, pipe.vae_scale_factor * 2
    else:
        unet_config = pipe.unet.config if hasattr(pipe.unet, "config") else pipe.unet._orig_mod.config
        default = unet_config.sample_size * pipe.vae_scale_factor
        multiple = math.lcm(8, pipe.vae_scale_factor)  # 8: diffusers' SD pipelines' own check
    height, width = height or default, width or default
    if height % multiple or width % multiple:
        raise UserError(f"--height/--width must be multiples of {multiple} for this model, got {height}x{width}")
    return height, width


def plan_images(prompts: Sequence[str], num_images: int, seed: int) -> list[ImageSpec]:
    """Image index i (prompt-major: all images of prompt 0 first) has seed `seed + i`."""
    specs = [ImageSpec(0, p, 0) for p in prompts for _ in range(num_images)]
    return [ImageSpec(i, s.prompt, seed + i) for i, s in enumerate(specs)]


def generate_batch(
    pipe: DiffusionPipeline,
    specs: Sequence[ImageSpec],
    cfg: GenerateConfig,
    height: int,
    width: int,
    family: type[Family] = Family,
    edit: dict | None = None,
) -> list[Image.Image]:
    """One pipeline call for `specs`; each image's starting noise (and any per-step noise) from its own seed. The
    guidance and negative prompt take the family's pipeline's argument names (`Family.guidance_inputs`); `edit`: an
    edit model's inputs (`Family.edit_inputs`), which also say the size."""
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in specs]
    negative = [cfg.negative_prompt] * len(specs) if cfg.negative_prompt is not None else None
    size = edit if edit is not None else {"height": height, "width": width}
    with torch.inference_mode():
        out = pipe(
            prompt=[s.prompt for s in specs],
            num_inference_steps=cfg.steps,
            generator=generators,
            **size,
            **family.guidance_inputs(cfg.guidance_scale, negative, len(specs)),
        )
    return out.images


def image_name(spec: ImageSpec) -> str:
    return f"{spec.index:05d}_seed{spec.seed}.png"


def run(cfg: GenerateConfig, only: Sequence[int] | None = None) -> dict:
    """Generates every planned image (or the batches holding `only`), writes PNGs, grid and record; returns it."""
    cfg = resolved(cfg)
    pipe, family, adapters = prepare_pipeline(cfg)
    inputs = [open_source(path) for path in cfg.image]
    height, width = image_size(pipe, cfg.height, cfg.width, inputs[0].size if inputs else None)
    edit = family.edit_inputs(pipe, inputs, height, width, None) if inputs else None
    specs = plan_images(cfg.prompt, cfg.num_images, cfg.seed)
    batches = [specs[i : i + cfg.batch_size] for i in range(0, len(specs), cfg.batch_size)]
    if only is not None:
        bad = [i for i in only if not 0 <= i < len(specs)]
        if bad:
            raise UserError(f"--index {bad[0]} out of range: the record has {len(specs)} images")
        batches = [b for b in batches if any(s.index in only for s in b)]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, rows = [], []
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc=f"{cfg.sampler} {cfg.steps} steps")
    for b, batch in enumerate(batches):
        for spec, image in zip(batch, generate_batch(pipe, batch, cfg, height, width, family, edit), strict=True):
            if only is None or spec.index in only:
                image.save(out / image_name(spec))
                written.append(image)
                rows.append({**asdict(spec), "file": image_name(spec), "batch": b})
        bar.update(len(batch))
    bar.close()
    # One row per prompt when there are several prompts; a square-ish grid of one prompt's images.
    make_grid(written, min(cfg.num_images, len(written)) if len(cfg.prompt) > 1 else None).save(out / GRID_NAME)
    record = {
        "config": to_dict(cfg, RUN_ONLY),
        "family": family.name,
        "adapters": [asdict(a) for a in adapters],
        "height": height,
        "width": width,
        "images": rows,
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
    }
    (out / RECORD_NAME).write_text(json.dumps(record, indent=2))
    return record


def config_from_record(path: str, output_dir: str | None) -> GenerateConfig:
    """The config a record was made with (checked as if typed anew), writing to `output_dir`."""
    file = Path(path)
    try:
        saved = json.loads(file.read_text())["config"]
        values = dict(saved)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path} is not a generate record ({type(err).__name__}: {err})") from err
    values["output_dir"] = output_dir or str(file.parent / "regenerated")
    return from_values(GenerateConfig, values, where=f"--from_record {path}")


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse(GenerateConfig, argv, __doc__.split("\n\n")[0], prog=PROG)
    if cfg.from_record is not None:
        return run(config_from_record(cfg.from_record, cfg.output_dir), only=cfg.index)
    return run(cfg)


def cli() -> None:
    """The `difftune-generate` command."""
    command(main)


if __name__ == "__main__":
    cli()
