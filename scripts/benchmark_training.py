"""Seconds per training step and peak memory of LoRA training: latent/text cache on and off, and each preset.

Each setting runs in its own process (so peak memory is its own), on the embedded demo's model and data:

    python scripts/benchmark_training.py [--steps 30] [--preset configs/hardware/cpu.yaml ...] [--each_preset]
                                         [--output FILE.json]

- The first two rows: the demo's config (plus any `--preset` files layered on), cache on and off.
- `--each_preset`: one more row per file in `configs/hardware/`, that preset's options layered on the demo's.
  Without CUDA, the options that need it are swapped for their CPU counterparts and the row says which
  (`optimizer adamw8bit -> adamw`, `quantize_base nf4 -> none`, `mixed_precision fp16 -> no`): the row then
  measures the rest of the preset (batch, accumulation, checkpointing, caching), not its GPU memory savings.

- `--shaped sd15,sdxl,sd35,flux` (the default when CUDA is present): randomly initialised pipelines of SD 1.5's,
  SDXL's, SD 3.5 medium's and Flux.1-dev's exact denoiser shapes (UNets of 860M and 2.6B parameters, MMDiT
  transformers of 2.5B and 12B; speed and memory do not depend on the weights), with their VAEs and CLIP
  encoders, trained by the product's own loop (`finetune.loop.train`, the LoRA task, rank `--rank`, the family's
  default targets) on random images, one row per preset: the SD 1.x presets at 512 px, the `-sdxl`, `-sd3` and
  `-flux` ones at 1024 px, with each preset's batch, accumulation, precision, checkpointing, optimizer and
  quantised base. Latents and text embeddings are cached as in any run, and the cached-away VAE and text
  encoders wait in CPU memory (`finetune/offload.py`). T5-XXL is built at its real width (4096, what the
  transformer reads) but 2 layers deep: it only fills the text cache before the timed steps and is never
  resident while training, so its depth changes no figure of the table. The targets: SD 1.5 at 512 px under 6 GB
  with `gpu-8gb`, SDXL at 1024 px under 12 GB with `gpu-12gb-sdxl`, SD 3.5 medium under 12 GB with
  `gpu-12gb-sd3`, Flux.1-dev under 16 GB with `gpu-16gb-flux`.
- `--tiny_flow`: the CPU rows of the flow families: the tiny SD 3 and Flux pipelines (`toyworld`, base size) on
  the shapes world at 64 px, cache on and off.

- `--options`: the step options of `finetune/speed.py` on the tiny SD 1.5-layout pipeline (diffusers'
  own test layout: UNet 32/64 channels, 2 layers per block, CLIP 32 wide; 64 px, 32x32 latents; 64 shapes-world
  images, batch 8, rank-4 attention LoRA, lr 1e-4): each option alone, all together, and a "floor" row timed here,
  the bare forward + backward + AdamW step of the same LoRA UNet on random tensors of the same shapes. Each row reads
  as a ratio to the floor (above 1: faster than eager PyTorch), with compile time apart from step time, the time
  from process start to the end of the first step, and the process's peak RSS. `--threads` sets torch's threads.
  `scripts/compare_diffusers_training.py` runs diffusers' own example script on the same model and data.

On CPU, peak memory is the process's peak resident set size; on CUDA, `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from difftune.core.config import option, parse
from difftune.core.errors import UserError, run_main
from difftune.core.paths import shipped_configs
from difftune.scripts.shaped_models import SHAPED_RESOLUTION, build_shaped_pipeline

PRESETS = shipped_configs() / "hardware"


def cpu_substitutes(values: dict) -> list[str]:
    """Replaces, in place, the options that need CUDA by what runs on a CPU; returns what was swapped."""
    swapped = []
    if values.get("use_8bit_adam") or values.get("optimizer") == "adamw8bit":
        values.update(use_8bit_adam=False, optimizer="adamw")
        swapped.append("optimizer adamw8bit -> adamw")
    if values.get("quantize_base"):
        swapped.append(f"quantize_base {values['quantize_base']} -> none")
        values["quantize_base"] = None
    if values.get("mixed_precision") in ("fp16", "bf16"):  # fp16 is no CPU compute type; bf16 is slow on most CPUs
        swapped.append(f"mixed_precision {values['mixed_precision']} -> no")
        values["mixed_precision"] = "no"
    return swapped


def layer_presets(values: dict, presets: list[str], on_cuda: bool) -> list[str]:
    """Layers the preset files onto `values` in order (later wins); off CUDA, swaps what needs it (listed)."""
    from difftune.core.config import load_yaml
    from difftune.finetune.config import LoraTrainConfig

    for preset in presets:
        values.update(load_yaml(preset, LoraTrainConfig))
    return [] if on_cuda else cpu_substitutes(values)


def measured_columns(cfg, on_cuda: bool) -> dict:
    """The columns every row shares: peak memory so far and the options that set a step's cost."""
    import torch

    from difftune.finetune.optim import optimizer_name

    peak = torch.cuda.max_memory_allocated() if on_cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "peak_memory_mb": peak / 2**20,
        "memory_kind": "cuda max_memory_allocated" if on_cuda else "process peak RSS",
        "batch_size": cfg.training.train_batch_size,
        "gradient_accumulation_steps": cfg.training.gradient_accumulation_steps,
        "gradient_checkpointing": cfg.memory.gradient_checkpointing,
        "optimizer": optimizer_name(cfg.optim),
        "quantize_base": cfg.memory.quantize_base,
    }


def child(settings: dict) -> dict:
    """Runs one training in this process and returns its measurements."""
    import torch

    from difftune.core.config import from_values
    from difftune.finetune.config import LoraTrainConfig
    from difftune.finetune.demo import demo_values
    from difftune.finetune.loop import train
    from difftune.finetune.tasks import LORA

    values = demo_values("unet", Path(settings["output_dir"]))  # the demo's model and both imagefolders
    on_cuda = torch.cuda.is_available()
    swapped = layer_presets(values, settings["presets"], on_cuda)
    values.update(
        output_dir=settings["output_dir"],
        cache_dir=settings["output_dir"] + "/cache",
        max_train_steps=settings["steps"],
        validation_prompt=None,
        report_to="none",
        checkpointing_steps=10**9,
    )
    if settings["cache"] is not None:
        values["cache_latents"] = settings["cache"]
    cfg = from_values(LoraTrainConfig, values)
    start = time.time()
    result = train(cfg, LORA)
    total = time.time() - start
    return {
        "name": settings["name"],
        "cache": cfg.cache.cache_latents,
        "presets": settings["presets"],
        "cpu_substitutes": swapped,
        "steps": result.global_step,
        "seconds_per_step": result.seconds / result.global_step,
        "setup_seconds": total - result.seconds,
        **measured_columns(cfg, on_cuda),
        "mixed_precision": cfg.training.mixed_precision,
        "resolution": cfg.data.resolution,
    }


def write_images(folder: Path, count: int, resolution: int) -> Path:
    """`count` random RGB images with captions: the data of a shaped row (its latents are cached like any data)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of sks object {i}")
    return folder


def fit_swap(values: dict, model: str) -> str:
    """Caps the preset's `blocks_to_swap` at the model's block count (narrowed test models); says what changed."""
    from difftune.finetune.block_swap import repeated_blocks
    from difftune.finetune.memory import meta_denoiser
    from difftune.pipelines.families import detect, read_model_index

    index = read_model_index(model)
    count = len(repeated_blocks(meta_denoiser(model, index, detect(model, index).denoiser_name)))
    asked = values["blocks_to_swap"]
    values["blocks_to_swap"] = min(asked, count)
    return f"blocks_to_swap {asked} -> {values['blocks_to_swap']} (narrowed model)"


def shaped_child(settings: dict) -> dict:
    """Times `finetune.loop.train` (the product's loop, LoRA task) on a randomly initialised SD 1.5- or SDXL-shaped
    pipeline under one preset: steps after the warm-up are timed; peak memory covers the whole run."""
    import torch
    from safetensors.torch import load_file

    from difftune.core.config import from_values
    from difftune.finetune.config import LoraTrainConfig
    from difftune.finetune.loop import train
    from difftune.finetune.tasks import LORA

    kind, on_cuda = settings["kind"], torch.cuda.is_available()
    work = Path(settings["output_dir"])
    values: dict = {}
    swapped = layer_presets(values, settings["presets"], on_cuda)
    model = build_shaped_pipeline(kind, work / "model", settings.get("overrides", {}))
    if values.get("blocks_to_swap") and settings.get("overrides"):  # a narrowed model has fewer blocks to swap
        swapped.append(fit_swap(values, str(model)))
    per_step = values.get("train_batch_size", 1) * values.get("gradient_accumulation_steps", 1)
    values.update(
        pretrained_model_name_or_path=str(model), output_dir=str(work / "out"), resolution=settings["resolution"],
        train_data_dir=str(write_images(work / "data", per_step, settings["resolution"])), center_crop=True,
        max_train_steps=settings["warmup"] + settings["steps"], rank=settings["rank"], lora_alpha=settings["rank"],
        learning_rate=1e-3, report_to="none", checkpointing_steps=10**9, validation_prompt=None,
    )  # fmt: skip
    cfg = from_values(LoraTrainConfig, values)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg, LORA)
    lora = load_file(work / "out" / "pytorch_lora_weights.safetensors")
    # A benchmark of steps that train nothing would mean nothing: the LoRA (B initialised to zero) must have moved.
    moved = sum(v.float().norm().item() ** 2 for k, v in lora.items() if "lora_B" in k or "lora.up" in k) ** 0.5
    timed = result.step_seconds[settings["warmup"] :]
    return {
        "name": f"{kind} {settings['resolution']}px, {Path(settings['presets'][0]).stem}",
        "kind": kind,
        "lora_parameters": sum(v.numel() for v in lora.values()),
        "lora_change": moved,
        "cache": cfg.cache.cache_latents,
        "presets": settings["presets"],
        "cpu_substitutes": swapped,
        "steps": len(timed),
        "seconds_per_step": sum(timed) / len(timed),
        "setup_seconds": 0.0,
        **measured_columns(cfg, on_cuda),
        "mixed_precision": cfg.training.mixed_precision or "no",
        "resolution": settings["resolution"],
    }


def tiny_flow_child(settings: dict) -> dict:
    """The product's LoRA loop on the tiny SD 3 or Flux pipeline (base size) and the shapes world at 64 px."""
    from difftune.core.config import from_values
    from difftune.finetune.config import LoraTrainConfig
    from difftune.finetune.loop import train
    from difftune.finetune.tasks import LORA
    from difftune.toyworld import shapes
    from difftune.toyworld.tiny import save_tiny_pipeline

    work = Path(settings["output_dir"])
    model = save_tiny_pipeline(work / "model", size="base", family=settings["tiny_flow"])
    data = work / "data"
    shapes.write_dataset(data, shapes.BASE_COLOURS, shapes.SHAPES, per_class=8, seed=0)
    cfg = from_values(LoraTrainConfig, dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(work / "out"),
        resolution=64, center_crop=True, train_batch_size=16, max_train_steps=2 + settings["steps"],
        cache_latents=settings["cache"], max_sequence_length=16, learning_rate=1e-3, report_to="none",
        checkpointing_steps=10**9,
    ))  # fmt: skip
    result = train(cfg, LORA)
    timed = result.step_seconds[2:]
    return {"name": settings["name"], "cache": result.cached, "presets": [], "cpu_substitutes": [],
            "steps": len(timed), "seconds_per_step": sum(timed) / len(timed), "setup_seconds": 0.0,
            **measured_columns(cfg, False), "mixed_precision": "no", "resolution": 64}  # fmt: skip


def preset_kind(stem: str) -> str | None:
    """Which shaped model a preset is for: `-sdxl` files SDXL, `-sd3` SD 3.5 medium, `-flux` Flux.1-dev, the others
    SD 1.x; the cpu preset none."""
    for suffix, kind in (("-sdxl", "sdxl"), ("-sd3", "sd35"), ("-flux", "flux")):  # fmt: skip
        if stem.endswith(suffix):
            return kind
    return None if stem == "cpu" else "sd15"


def shaped_settings(kinds: list[str], steps: int, rank: int) -> list[dict]:
    """One setting per preset that fits each kind: SD 1.x presets for sd15, `-sdxl` ones for sdxl, and so on."""
    out = []
    for kind in kinds:
        for preset in sorted(PRESETS.glob("*.yaml")):
            if preset_kind(preset.stem) != kind:
                continue
            out.append({"shaped": True, "kind": kind, "presets": [str(preset)], "resolution": SHAPED_RESOLUTION[kind],
                        "steps": steps, "warmup": 2, "rank": rank, "name": f"{kind} {preset.stem}"})  # fmt: skip
    return out


# diffusers' own SD test components (StableDiffusionPipelineFastTests.get_dummy_components) in SD 1.5's layout.
TINY_SD15 = dict(
    unet=dict(sample_size=32, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32),
    vae=dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2),
    text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4, projection_dim=32),
)  # fmt: skip
# The rows of --options: each step option alone, then all together (the flags of finetune/speed.py).
OPTION_ROWS = {
    "eager (today's default)": {},
    "--compile": {"compile": True},
    "--compile --compile_scope model": {"compile": True, "compile_scope": "model"},
    "--fused_optimizer": {"fused_optimizer": True},
    "--channels_last": {"channels_last": True},
    "--mixed_precision bf16": {"mixed_precision": "bf16"},
    "all together": {"compile": True, "fused_optimizer": True, "channels_last": True, "mixed_precision": "bf16"},
}
TINY_RUN = dict(resolution=64, center_crop=True, train_batch_size=8, rank=4, learning_rate=1e-4, seed=0)


def build_tiny_run(folder: Path) -> tuple[Path, Path]:
    """The tiny SD 1.5-layout pipeline and 64 shapes-world images (metadata.jsonl imagefolder) of the --options
    rows; `scripts/compare_diffusers_training.py` trains on the same two folders."""
    from difftune.toyworld import shapes

    model = folder / "model"
    if not (model / "model_index.json").exists():
        build_shaped_pipeline("sd15", model, TINY_SD15)
    data = folder / "data"
    if not (data / "metadata.jsonl").exists():
        shapes.write_dataset(data, shapes.BASE_COLOURS, shapes.SHAPES[:2], per_class=8, seed=0)
    return model, data


def option_child(settings: dict) -> dict:
    """One --options row: `finetune.loop.train` with the row's flags, started the way the entry script starts."""
    from difftune.core.config import from_values
    from difftune.finetune.config import LoraTrainConfig

    values = {**TINY_RUN, **settings["flags"], "pretrained_model_name_or_path": settings["model"],
              "train_data_dir": settings["data"], "output_dir": settings["output_dir"], "report_to": "none",
              "max_train_steps": settings["warmup"] + settings["steps"], "checkpointing_steps": 10**9}  # fmt: skip
    cfg = from_values(LoraTrainConfig, values)
    import torch

    from difftune.finetune import loop
    from difftune.finetune.tasks import LORA

    finished, real_finish = [], loop.finish
    loop.finish = lambda run, task: finished.append(time.time()) or real_finish(run, task)  # when the last step ended
    result = loop.train(cfg, LORA)
    loop_started = finished[0] - result.seconds
    timed = result.step_seconds[settings["warmup"] :]
    per_step = sum(timed) / len(timed)
    return {
        "name": settings["name"], "seconds_per_step": per_step,
        "compile_seconds": sum(result.step_seconds[: settings["warmup"]]) - settings["warmup"] * per_step,
        "first_step_after_start": loop_started + result.step_seconds[0] - settings["spawned_at"],
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": torch.get_num_threads(),
        "losses": result.losses,
    }  # fmt: skip


def floor_child(settings: dict) -> dict:
    """The floor: the same LoRA UNet's forward + backward + AdamW step on random tensors of the training shapes,
    nothing else (no data, no noise schedule, no accelerate, no clipping)."""
    import torch
    from diffusers import UNet2DConditionModel

    from difftune.finetune.adapters import AdapterConfig, adapter_config, add_adapter
    from difftune.pipelines.families.base import Family

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(settings["model"], subfolder="unet")
    unet.requires_grad_(False)
    add_adapter(unet, adapter_config(AdapterConfig(rank=TINY_RUN["rank"]), list(Family.lora_targets)))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=TINY_RUN["learning_rate"])
    batch, side = TINY_RUN["train_batch_size"], TINY_RUN["resolution"] // 2  # the VAE downsamples x2
    text = torch.randn(batch, 77, TINY_SD15["unet"]["cross_attention_dim"])
    seconds = []
    for _ in range(settings["warmup"] + settings["steps"]):
        start = time.perf_counter()
        latents, target = torch.randn(batch, 4, side, side), torch.randn(batch, 4, side, side)
        timesteps = torch.randint(0, 1000, (batch,))
        loss = torch.nn.functional.mse_loss(unet(latents, timesteps, text).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    timed = seconds[settings["warmup"] :]
    return {"name": "floor: bare forward + backward + AdamW", "seconds_per_step": sum(timed) / len(timed),
            "compile_seconds": 0.0, "first_step_after_start": None,
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads(), "losses": []}  # fmt: skip


def option_rows(args, work: Path) -> list[dict]:
    """The floor row, then one row per OPTION_ROWS entry, each in its own process with `--threads` threads."""
    model, data = build_tiny_run(work)
    common = {"model": str(model), "data": str(data), "steps": args.steps, "warmup": 2}
    rows = [run_child({**common, "kind": "floor", "name": "floor"}, threads=args.threads)]
    for name, flags in OPTION_ROWS.items():
        rows.append(run_child({**common, "kind": "option", "name": name, "flags": flags}, threads=args.threads))
        print(f"{name}: {rows[-1]['seconds_per_step']:.3f} s/step", file=sys.stderr, flush=True)
    return rows


def print_option_rows(rows: list[dict], steps: int) -> None:
    floor = rows[0]["seconds_per_step"]
    eager = rows[1]
    print(f"Step options, tiny SD 1.5 layout (64 px, batch 8, rank-4 attention LoRA), {rows[0]['threads']} threads, "
          f"{steps} timed steps after 2 untimed")  # fmt: skip
    print("| row | s/step | floor / row | compile s | process start to first step end s | peak RSS MB | "
          "max loss diff vs eager |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        first = "-" if r["first_step_after_start"] is None else f"{r['first_step_after_start']:.1f}"
        diff = max((abs(a - b) for a, b in zip(r["losses"], eager["losses"], strict=False)), default=None)
        print(f"| {r['name']} | {r['seconds_per_step']:.4f} | {floor / r['seconds_per_step']:.2f}x | "
              f"{r['compile_seconds']:.1f} | {first} | {r['peak_memory_mb']:.0f} | "
              f"{'-' if diff is None else f'{diff:.2e}'} |")  # fmt: skip


def run_child(settings: dict, threads: int | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with tempfile.TemporaryDirectory() as tmp:
        settings = {"output_dir": tmp, "spawned_at": time.time(), **settings}
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(settings)], capture_output=True, text=True, env=env
        )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"benchmark run failed ({settings['name']}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


@dataclass
class BenchmarkConfig:
    steps: int = option("Timed steps of the demo and preset rows.", default=30)
    preset: list[str] = option("Hardware preset YAML(s) layered on the demo rows.", default=[])
    each_preset: bool = option("Also one row per preset in configs/hardware/.", default=False)
    shaped: str | None = option("sd15,sdxl,sd35,flux: pipelines of those shapes (default on CUDA: all).", default=None)
    tiny_flow: bool = option("Rows for the tiny SD 3 and Flux pipelines, cache on and off (CPU).", default=False)
    shaped_steps: int = option("Timed steps per shaped row (after 2 warm-up).", default=10)
    rank: int = option("LoRA rank of the shaped rows.", default=16)
    skip_demo: bool = option("Only the shaped rows.", default=False)
    options: bool = option("Only the step-option rows (floor, each option, all together) on the tiny SD 1.5 layout.",
                           default=False)  # fmt: skip
    threads: int | None = option("--options: torch threads of each row's process (OMP_NUM_THREADS).", default=None)
    work_dir: str | None = option("--options: keep the tiny model and data here (default: a temporary folder).",
                                  default=None)  # fmt: skip
    output: str | None = option("Also write the rows as JSON here.", default=None)
    child: str | None = option("Internal: run one row in this process (JSON settings).", default=None)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(BenchmarkConfig, argv, __doc__, prog="benchmark_training.py")
    if args.child:
        settings = json.loads(args.child)
        if settings.get("shaped"):
            row_of = shaped_child
        elif settings.get("tiny_flow"):
            row_of = tiny_flow_child
        else:
            row_of = {"floor": floor_child, "option": option_child}.get(settings.get("kind"), child)
        print("RESULT " + json.dumps(row_of(settings)))
        return
    if args.options:
        with tempfile.TemporaryDirectory() as tmp:
            rows = option_rows(args, Path(args.work_dir or tmp))
        print_option_rows(rows, args.steps)
        if args.output:
            Path(args.output).write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2))
        return

    import torch

    settings = [
        {"name": f"demo, cache {'on' if cache else 'off'}", "cache": cache, "presets": args.preset}
        for cache in (True, False)
    ] if not args.skip_demo else []  # fmt: skip
    shaped = (
        args.shaped if args.shaped is not None else (",".join(SHAPED_RESOLUTION) if torch.cuda.is_available() else "")
    )
    kinds = [k for k in shaped.split(",") if k]
    if unknown := sorted(set(kinds) - set(SHAPED_RESOLUTION)):
        raise UserError(f"--shaped {','.join(unknown)}: unknown; choose from {', '.join(SHAPED_RESOLUTION)}")
    if args.each_preset:
        settings += [{"name": p.stem, "cache": None, "presets": [str(p)]} for p in sorted(PRESETS.glob("*.yaml"))]
    settings = [{**s, "steps": args.steps} for s in settings]
    settings += shaped_settings(kinds, args.shaped_steps, args.rank)
    if args.tiny_flow:
        settings += [{"name": f"tiny {f} 64px, cache {'on' if c else 'off'}", "tiny_flow": f, "cache": c,
                      "steps": args.steps} for f in ("sd3", "flux") for c in (True, False)]  # fmt: skip
    rows = []
    for s in settings:
        rows.append(run_child(s))
        print(f"{s['name']}: {rows[-1]['seconds_per_step']:.3f} s/step", file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    print(f"LoRA training, device: {device}, torch threads: {torch.get_num_threads()}; demo rows {args.steps} steps, "
          f"shaped rows {args.shaped_steps} timed steps")  # fmt: skip
    print("| setting | px | batch x accumulation | grad. checkpointing | precision | optimizer | quantised base "
          "| latent/text cache | s/step | setup s | peak memory MB | swapped for CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['resolution']} | {r['batch_size']} x {r['gradient_accumulation_steps']} | "
              f"{'on' if r['gradient_checkpointing'] else 'off'} | {r['mixed_precision'] or 'default'} | "
              f"{r['optimizer']} | {r.get('quantize_base') or '-'} | {'on' if r['cache'] else 'off'} | "
              f"{r['seconds_per_step']:.3f} | "
              f"{r['setup_seconds']:.1f} | {r['peak_memory_mb']:.0f} | {', '.join(r['cpu_substitutes']) or '-'} |")  # fmt: skip
    print(f"(peak memory: {rows[0]['memory_kind']})")
    if args.output:
        Path(args.output).write_text(json.dumps({"device": device, "steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    run_main(main)
