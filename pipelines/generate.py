"""Generate images from a saved Stable Diffusion pipeline (SD 1.x, 2.x, SDXL), with LoRAs and a named sampler.

    python -m pipelines.generate --model pipelines/tiny_shapes --prompt "a red circle" --sampler dpmpp-2m \\
        --steps 20 --num_images 4 --seed 0 --output_dir out
    python -m pipelines.generate --from_record out/record.json --index 2 --output_dir again

Writes one PNG per image, `grid.png`, and `record.json`: everything needed to make any image again, exactly
(`--from_record`). Image i of prompt p has its own seed (`--seed` + its index) drawn on a CPU generator, so an
image does not depend on which other images share its batch; the record still keeps the batch layout, and
regeneration re-runs the image's whole batch, because batched matrix products may round differently from
unbatched ones. Classifier-free guidance is the diffusers pipeline's own: the unconditional and conditional
halves go through the UNet in one batched call per step (checked in the tests with a forward hook).
Attention is PyTorch's scaled-dot-product attention (diffusers' default `AttnProcessor2_0`) unless
`--attention classic` asks for the explicit softmax(QK^T)V processor.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python pipelines/generate.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from core.errors import UserError, run_main  # noqa: E402
from core.images import make_grid  # noqa: E402
from pipelines.loading import DTYPES, Adapter, load_loras, load_pipeline  # noqa: E402
from pipelines.samplers import sampler_names, set_sampler  # noqa: E402

RECORD_NAME = "record.json"
GRID_NAME = "grid.png"


@dataclass
class GenerateConfig:
    model: str
    prompts: list[str]
    output_dir: str
    loras: list[str] = field(default_factory=list)
    lora_scales: list[float] = field(default_factory=lambda: [1.0])
    fuse_lora: bool = False
    negative_prompt: str | None = None
    sampler: str = "dpmpp-2m"
    steps: int = 20
    guidance_scale: float = 7.5
    num_images: int = 1  # per prompt
    seed: int = 0
    height: int | None = None  # None: the model's default size
    width: int | None = None
    batch_size: int = 4
    device: str = "cpu"
    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    attention: str = "sdpa"


@dataclass(frozen=True)
class ImageSpec:
    index: int
    prompt: str
    seed: int


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="diffusers pipeline folder or Hub id (SD 1.x, SD 2.x, SDXL)")
    p.add_argument("--lora", action="append", default=[], help="LoRA file or folder (diffusers or kohya); repeat")
    p.add_argument("--lora_scale", type=float, action="append", default=None, help="one, or one per --lora")
    p.add_argument("--fuse_lora", action="store_true", help="fold the adapters into the weights before sampling")
    p.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    p.add_argument("--prompt_file", help="a text file, one prompt per line")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--sampler", default="dpmpp-2m", help=f"one of: {', '.join(sampler_names())}")
    p.add_argument("--steps", type=int, default=20, help="num_inference_steps")
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--num_images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="image i gets seed + i")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--output_dir", default=None)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--channels_last", action="store_true", help="UNet and VAE in channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "classic"])
    p.add_argument("--from_record", default=None, help="a record.json: regenerate its images exactly")
    p.add_argument("--index", type=int, action="append", default=None, help="with --from_record: which images")
    return p


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    if not args.model:
        raise UserError("--model is required (a diffusers pipeline folder or Hub id)")
    if not args.output_dir:
        raise UserError("--output_dir is required")
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt_file {args.prompt_file} not found")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError("give at least one --prompt or a --prompt_file")
    for name in ("steps", "num_images", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    return GenerateConfig(
        model=_absolute_if_local(args.model),  # the record must work from any working directory
        prompts=prompts,
        output_dir=args.output_dir,
        loras=[_absolute_if_local(x) for x in args.lora],
        lora_scales=args.lora_scale if args.lora_scale is not None else [1.0],
        fuse_lora=args.fuse_lora,
        negative_prompt=args.negative_prompt,
        sampler=args.sampler,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        num_images=args.num_images,
        seed=args.seed,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        channels_last=args.channels_last,
        compile=args.compile,
        attention=args.attention,
    )


def _absolute_if_local(path: str) -> str:
    return str(Path(path).resolve()) if Path(path).exists() else path


def prepare_pipeline(cfg: GenerateConfig) -> tuple[DiffusionPipeline, str, list[Adapter]]:
    """Loads the model, its LoRAs and the sampler, applies the speed options; returns (pipe, family, adapters)."""
    if cfg.dtype == "fp16" and not cfg.device.startswith("cuda"):
        raise UserError("--dtype fp16 needs --device cuda; use fp32 or bf16 on CPU")
    pipe, family = load_pipeline(cfg.model, cfg.dtype, cfg.device)
    set_sampler(pipe, cfg.sampler)  # before LoRAs: an unknown sampler name fails fast
    adapters = load_loras(pipe, cfg.loras, cfg.lora_scales, fuse=cfg.fuse_lora)
    if cfg.attention == "classic":
        pipe.unet.set_attn_processor(AttnProcessor())
        pipe.vae.set_attn_processor(AttnProcessor())
    if cfg.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if cfg.compile:
        pipe.unet = torch.compile(pipe.unet)
    return pipe, family, adapters


def image_size(pipe: DiffusionPipeline, height: int | None, width: int | None) -> tuple[int, int]:
    """The requested size, or the model's default; a size the pipeline cannot make is a `UserError`."""
    unet_config = pipe.unet.config if hasattr(pipe.unet, "config") else pipe.unet._orig_mod.config
    default = unet_config.sample_size * pipe.vae_scale_factor
    height, width = height or default, width or default
    multiple = math.lcm(8, pipe.vae_scale_factor)  # 8: diffusers' SD pipelines' own check
    if height % multiple or width % multiple:
        raise UserError(f"--height/--width must be multiples of {multiple} for this model, got {height}x{width}")
    return height, width


def plan_images(prompts: Sequence[str], num_images: int, seed: int) -> list[ImageSpec]:
    """Image index i (prompt-major: all images of prompt 0 first) has seed `seed + i`."""
    specs = [ImageSpec(0, p, 0) for p in prompts for _ in range(num_images)]
    return [ImageSpec(i, s.prompt, seed + i) for i, s in enumerate(specs)]


def generate_batch(
    pipe: DiffusionPipeline, specs: Sequence[ImageSpec], cfg: GenerateConfig, height: int, width: int
) -> list[Image.Image]:
    """One pipeline call for `specs`; each image's starting noise (and any per-step noise) from its own seed."""
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in specs]
    negative = [cfg.negative_prompt] * len(specs) if cfg.negative_prompt is not None else None
    with torch.inference_mode():
        out = pipe(
            prompt=[s.prompt for s in specs],
            negative_prompt=negative,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            height=height,
            width=width,
            generator=generators,
        )
    return out.images


def image_name(spec: ImageSpec) -> str:
    return f"{spec.index:05d}_seed{spec.seed}.png"


def run(cfg: GenerateConfig, only: Sequence[int] | None = None) -> dict:
    """Generates every planned image (or the batches holding `only`), writes PNGs, grid and record; returns it."""
    pipe, family, adapters = prepare_pipeline(cfg)
    height, width = image_size(pipe, cfg.height, cfg.width)
    specs = plan_images(cfg.prompts, cfg.num_images, cfg.seed)
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
        for spec, image in zip(batch, generate_batch(pipe, batch, cfg, height, width), strict=True):
            if only is None or spec.index in only:
                image.save(out / image_name(spec))
                written.append(image)
                rows.append({**asdict(spec), "file": image_name(spec), "batch": b})
        bar.update(len(batch))
    bar.close()
    # One row per prompt when there are several prompts; a square-ish grid of one prompt's images.
    make_grid(written, min(cfg.num_images, len(written)) if len(cfg.prompts) > 1 else None).save(out / GRID_NAME)
    record = {
        "config": asdict(cfg),
        "family": family,
        "adapters": [asdict(a) for a in adapters],
        "height": height,
        "width": width,
        "images": rows,
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
    }
    (out / RECORD_NAME).write_text(json.dumps(record, indent=2))
    return record


def config_from_record(path: str, output_dir: str | None) -> GenerateConfig:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--from_record {path} not found")
    try:
        saved = json.loads(file.read_text())["config"]
        cfg = GenerateConfig(**saved)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a generate record ({type(err).__name__}: {err})") from err
    cfg.output_dir = output_dir or str(file.parent / "regenerated")
    return cfg


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.from_record:
        return run(config_from_record(args.from_record, args.output_dir), only=args.index)
    if args.index is not None:
        raise UserError("--index only goes with --from_record")
    return run(config_from_args(args))


if __name__ == "__main__":
    run_main(main)
