"""Seconds per training step and peak memory of LoRA training: latent/text cache on and off, and each preset.

Each setting runs in its own process (so peak memory is its own), on the embedded demo's model and data:

    python scripts/benchmark_training.py [--steps 30] [--preset configs/hardware/cpu.yaml ...] [--each_preset]
                                         [--output FILE.json]

- The first two rows: the demo's config (plus any `--preset` files layered on), cache on and off.
- `--each_preset`: one more row per file in `configs/hardware/`, that preset's options layered on the demo's.
  Without CUDA, the options that need it are swapped for their CPU counterparts and the row says which
  (`optimizer adamw8bit -> adamw`, `quantize_base nf4 -> none`, `mixed_precision fp16 -> no`): the row then
  measures the rest of the preset (batch, accumulation, checkpointing, caching), not its GPU memory savings.

- `--shaped sd15,sdxl` (the default when CUDA is present): randomly initialised UNets of SD 1.5's and SDXL's
  exact shapes (860M and 2.6B parameters; speed and memory do not depend on the weights), LoRA rank `--rank` on the
  attention projections, one row per preset: the SD 1.x presets at 512 px, the `-sdxl` ones at 1024 px, each
  preset's batch, accumulation, precision, checkpointing, optimizer and quantised base as training would use
  them. Text embeddings and latents are random tensors of the real shapes (training caches them too, so the VAE
  and text encoders are not resident). The issue's targets: SD 1.5 at 512 px under 6 GB with `gpu-8gb`, SDXL at
  1024 px under 12 GB with `gpu-12gb-sdxl`.

On CPU, peak memory is the process's peak resident set size; on CUDA, `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PRESETS = ROOT / "configs" / "hardware"


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
    from finetune.config import load_yaml

    for preset in presets:
        values.update(load_yaml(preset))
    return [] if on_cuda else cpu_substitutes(values)


def measured_columns(cfg, on_cuda: bool) -> dict:
    """The columns every row shares: peak memory so far and the options that set a step's cost."""
    import torch

    from finetune.optim import optimizer_name

    peak = torch.cuda.max_memory_allocated() if on_cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "peak_memory_mb": peak / 2**20,
        "memory_kind": "cuda max_memory_allocated" if on_cuda else "process peak RSS",
        "batch_size": cfg.train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "optimizer": optimizer_name(cfg),
        "quantize_base": cfg.quantize_base,
    }


def child(settings: dict) -> dict:
    """Runs one training in this process and returns its measurements."""
    import torch

    from finetune.config import TrainConfig, validate
    from finetune.demo import demo_values
    from finetune.finetune_lora import DEMO_CONFIG, LORA
    from finetune.loop import train

    values = demo_values(DEMO_CONFIG)  # the demo's model and both imagefolders
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
    cfg = TrainConfig(**values)
    validate(cfg)
    start = time.time()
    result = train(cfg, LORA)
    total = time.time() - start
    return {
        "name": settings["name"],
        "cache": cfg.cache_latents,
        "presets": settings["presets"],
        "cpu_substitutes": swapped,
        "steps": result.global_step,
        "seconds_per_step": result.seconds / result.global_step,
        "setup_seconds": total - result.seconds,
        **measured_columns(cfg, on_cuda),
        "mixed_precision": cfg.mixed_precision,
        "resolution": cfg.resolution,
    }


# The real architectures (diffusers' UNet2DConditionModel configs of SD 1.5 and SDXL base), randomly initialised.
UNET_SHAPES = {
    "sd15": dict(
        sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    ),
    "sdxl": dict(
        sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}  # fmt: skip
SHAPED_RESOLUTION = {"sd15": 512, "sdxl": 1024}
DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def shaped_unet(kind: str, config_overrides: dict, quantize: str | None, dtype, tmp: str):
    """A random UNet of `kind`'s shape, frozen, in `dtype` (or with its linear layers quantised)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**UNET_SHAPES[kind], **config_overrides})
    if quantize:  # bitsandbytes quantises while loading: save the random weights and load them back
        from finetune.quantize import load_quantized_unet

        unet.to(dtype).save_pretrained(Path(tmp) / "unet")
        del unet
        return load_quantized_unet(tmp, quantize, dtype)
    unet.requires_grad_(False)
    return unet.to(dtype)


def shaped_child(settings: dict) -> dict:
    """Times LoRA training steps of a randomly initialised SD 1.5- or SDXL-shaped UNet under one preset."""
    import torch

    from finetune.config import TrainConfig
    from finetune.model import adapter_config, add_adapter
    from finetune.optim import build_optimizer

    kind, device = settings["kind"], torch.device(settings["device"])
    on_cuda = device.type == "cuda"
    values = {}
    swapped = layer_presets(values, settings["presets"], on_cuda)
    cfg = TrainConfig(**{**values, "rank": settings["rank"], "lora_alpha": settings["rank"]})
    precision = cfg.mixed_precision if cfg.mixed_precision in DTYPES else "no"
    dtype = getattr(torch, DTYPES[precision]) if precision in DTYPES else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        unet = shaped_unet(kind, settings.get("unet_config", {}), cfg.quantize_base, dtype, tmp)
    if not cfg.quantize_base:  # a quantised UNet is already on the GPU
        unet.to(device)
    params = add_adapter(unet, adapter_config("lora", cfg.rank, cfg.lora_alpha, 0.0, None))  # fp32 LoRA
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = build_optimizer(cfg, params, lr=1e-4)

    res = settings["resolution"] // 8
    batch, cross = cfg.train_batch_size, unet.config.cross_attention_dim
    gen = torch.Generator(device).manual_seed(0)

    def micro_step():
        latents = torch.randn(batch, 4, res, res, device=device, generator=gen)
        text = torch.randn(batch, 77, cross, device=device, generator=gen)
        t = torch.randint(0, 1000, (batch,), device=device, generator=gen)
        extra = {}
        if unet.config.addition_embed_type == "text_time":
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, 1280, device=device, generator=gen),
                "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]], device=device).repeat(batch, 1),
            }  # fmt: skip
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(latents, t, text, **extra).sample
        loss = torch.nn.functional.mse_loss(pred.float(), latents) / cfg.gradient_accumulation_steps
        loss.backward()

    def step():
        for _ in range(cfg.gradient_accumulation_steps):
            micro_step()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if on_cuda:
            torch.cuda.synchronize(device)

    before = [p.detach().clone() for p in params]
    for _ in range(settings["warmup"]):
        step()
    sync()
    # A benchmark of steps that train nothing would mean nothing: the LoRA must have moved.
    lora_change = sum((p.detach() - b).float().norm() ** 2 for p, b in zip(params, before, strict=True)) ** 0.5
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.time()
    for _ in range(settings["steps"]):
        step()
    sync()
    seconds = (time.time() - start) / settings["steps"]
    return {
        "name": f"{kind} {settings['resolution']}px, {Path(settings['presets'][0]).stem}",
        "kind": kind,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "lora_parameters": sum(p.numel() for p in params),
        "lora_change_after_warmup": float(lora_change),
        "cache": True,
        "presets": settings["presets"],
        "cpu_substitutes": swapped,
        "steps": settings["steps"],
        "seconds_per_step": seconds,
        "setup_seconds": 0.0,
        **measured_columns(cfg, on_cuda),
        "mixed_precision": precision,
        "resolution": settings["resolution"],
    }


def shaped_settings(kinds: list[str], steps: int, rank: int, device: str) -> list[dict]:
    """One setting per preset that fits each kind: SD 1.x presets for sd15, `-sdxl` presets for sdxl."""
    out = []
    for kind in kinds:
        for preset in sorted(PRESETS.glob("*.yaml")):
            if preset.stem == "cpu" or preset.stem.endswith("-sdxl") != (kind == "sdxl"):
                continue
            out.append({"shaped": True, "kind": kind, "presets": [str(preset)], "resolution": SHAPED_RESOLUTION[kind],
                        "steps": steps, "warmup": 2, "rank": rank, "device": device, "name": f"{kind} {preset.stem}"})  # fmt: skip
    return out


def run_child(settings: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps({"output_dir": tmp, **settings})],
            capture_output=True, text=True,
        )  # fmt: skip
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"benchmark run failed ({settings['name']}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--preset", action="append", default=[], help="hardware preset YAML(s) to layer on")
    parser.add_argument("--each_preset", action="store_true", help=f"also one row per preset in {PRESETS}")
    parser.add_argument("--shaped", default=None, help="sd15,sdxl: SD 1.5/SDXL-shaped UNets (default on CUDA)")
    parser.add_argument("--shaped_steps", type=int, default=10, help="timed steps per shaped row (after 2 warm-up)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the shaped rows")
    parser.add_argument("--skip_demo", action="store_true", help="only the shaped rows")
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        settings = json.loads(args.child)
        print("RESULT " + json.dumps((shaped_child if settings.get("shaped") else child)(settings)))
        return

    import torch

    settings = [
        {"name": f"demo, cache {'on' if cache else 'off'}", "cache": cache, "presets": args.preset}
        for cache in (True, False)
    ] if not args.skip_demo else []  # fmt: skip
    shaped = args.shaped if args.shaped is not None else ("sd15,sdxl" if torch.cuda.is_available() else "")
    kinds = [k for k in shaped.split(",") if k]
    if unknown := sorted(set(kinds) - set(UNET_SHAPES)):
        sys.exit(f"--shaped {','.join(unknown)}: unknown; choose from {', '.join(UNET_SHAPES)}")
    if args.each_preset:
        settings += [{"name": p.stem, "cache": None, "presets": [str(p)]} for p in sorted(PRESETS.glob("*.yaml"))]
    device_name = "cuda" if torch.cuda.is_available() else "cpu"
    settings = [{**s, "steps": args.steps} for s in settings]
    settings += shaped_settings(kinds, args.shaped_steps, args.rank, device_name)
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
    main()
