"""Peak accelerator memory, seconds per step and block-swap transfer time of a LoRA step under each hardware preset,
on denoisers of the released models' shapes with random weights (no downloads):

    python scripts/benchmark_memory.py [--quick] [--families sd15,sdxl,sd35,flux] [--steps 2] [--output rows.json]
    python scripts/benchmark_memory.py --families qwen_image,flux2,flux2_klein,z_image,chroma   # the 2026 families

For each family (SD 1.5 and SDXL UNets, SD 3.5 medium's and Flux.1-dev's transformers: `scripts/shaped_models.py`;
asked for by name, Qwen-Image, Flux.2 dev and klein 4B, Z-Image and Chroma: `scripts/shaped_families.py`) and each
of its presets in configs/hardware/ (`gpu-8gb`, ..., `a100-80gb`, with the family's suffix), one row: the
denoiser built on the device at its real width, the family's LoRA targets at `--rank`, the preset's precision,
memory options (`--fp8_base`, `--blocks_to_swap`, `--quantize_base`, gradient checkpointing) applied by the same
`finetune.memory.apply_memory_options` training calls, its optimizer, and its batch x accumulation at the family's
resolution (512 px for SD 1.5, 1024 px otherwise) on random latents and text embeddings of the cached shapes (the
VAE and text encoders are not resident while training with a cache, so they are not built). The loss is the
product's own (`finetune.objective.batch_loss` through the family's `predict`). One warm-up optimizer step, then
`--steps` timed ones; the peak is `torch.cuda.max_memory_allocated` over all of them (optimizer state included),
from a reset after the model is placed, and beside it the memory planner's prediction of the same training step
(`finetune.plan_trace`, traced on meta tensors, without the planner's CUDA margins). `--quick` runs five rows (the 8 GB preset of each family and Flux at 24 GB).

Rows whose preset needs what the machine lacks say so instead of a figure (`--quantize_base` without bitsandbytes);
`adamw8bit` without bitsandbytes runs AdamW and says so. On a CPU the same rows run at narrowed widths and 64 px
(`--narrow`, the test of this script): no memory figure, swapped block counts scaled to the narrowed depth.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from difftune.core.config import compose, load_yaml, option, parse
from difftune.core.errors import run_main
from difftune.core.paths import shipped_configs
from difftune.scripts.shaped_families import TRANSFORMER_CLASSES, TRANSFORMERS
from difftune.scripts.shaped_models import FLOW_SHAPES, SHAPED_RESOLUTION, UNET_SHAPES

CARDS = ("gpu-8gb", "gpu-12gb", "gpu-16gb", "gpu-24gb", "a100-40gb", "a100-80gb")
FAMILIES = {"sd15": ("sd1", ""), "sdxl": ("sdxl", "-sdxl"), "sd35": ("sd3", "-sd3"), "flux": ("flux", "-flux")}
# The 2026 families (run when named: their rows would take the whole run's time budget): family, preset suffix.
FAMILIES_2026 = {"qwen_image": ("qwen_image", "-qwen"), "flux2": ("flux2", "-flux2"),
                 "flux2_klein": ("flux2_klein", "-klein"), "z_image": ("z_image", "-zimage"),
                 "chroma": ("chroma", "-chroma")}  # fmt: skip
QUICK = ("gpu-8gb", "gpu-8gb-sdxl", "gpu-8gb-sd3", "gpu-8gb-flux", "gpu-24gb-flux")
# Narrowed widths for the CPU test: every architecture feature kept (dual attention, qk norms, guidance embeddings,
# SDXL's added conditioning), a few thousand parameters.
NARROW = {
    "sd15": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
                 attention_head_dim=2, sample_size=8),
    "sdxl": dict(block_out_channels=(32, 32, 64), layers_per_block=1, transformer_layers_per_block=(1, 1, 2),
                 attention_head_dim=(2, 2, 4), norm_num_groups=8, cross_attention_dim=32, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8, sample_size=8),
    "sd35": dict(num_layers=4, dual_attention_layers=(0, 1), attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
                 sample_size=8),
    "flux": dict(num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
    "qwen_image": dict(num_layers=4, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
                       axes_dims_rope=(4, 6, 6)),
    "flux2": dict(num_layers=1, num_single_layers=5, num_attention_heads=2, attention_head_dim=16,
                  joint_attention_dim=48, axes_dims_rope=(4, 4, 4, 4)),
    "flux2_klein": dict(num_layers=1, num_single_layers=3, num_attention_heads=2, attention_head_dim=16,
                        joint_attention_dim=48, axes_dims_rope=(4, 4, 4, 4)),
    "z_image": dict(dim=32, n_layers=4, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                    axes_dims=[4, 6, 6]),
    "chroma": dict(num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_hidden_dim=32, approximator_layers=1),
}  # fmt: skip
# Text tokens of the cached conditioning: CLIP, CLIP + T5 (SD 3's 256), T5 (Flux's 512); the 2026 families' 512.
TEXT_TOKENS = {"sd15": 77, "sdxl": 77, "sd35": 77 + 256, "flux": 512} | dict.fromkeys(FAMILIES_2026, 512)


@dataclass
class MemoryBenchmarkConfig:
    quick: bool = option("Five rows: each family's 8 GB preset and Flux at 24 GB.", default=False)
    families: list[str] = option("Families to run (the 2026 families when named).", default=list(FAMILIES),
                                 choices=(*FAMILIES, *FAMILIES_2026))  # fmt: skip
    presets: list[str] | None = option("Only these preset names (default: every card of each family).", default=None)
    steps: int = option("Timed optimizer steps per row, after one warm-up step.", default=2)
    rank: int = option("LoRA rank.", default=16)
    narrow: bool = option("Narrowed widths at 64 px (the CPU test of this script).", default=False)
    output: str | None = option("Also write the rows as JSON here.", default=None)

    def validate(self) -> None:
        pass


def denoiser_config(kind: str, narrow: bool) -> tuple[type, dict]:
    """The denoiser class of `kind` and its constructor arguments (the released model's, or narrowed)."""
    import diffusers
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    if kind in FAMILIES_2026:
        cls, config = getattr(diffusers, TRANSFORMER_CLASSES[kind]), TRANSFORMERS[kind]
        return cls, {**config, **NARROW[kind]} if narrow else dict(config)
    cls = {"sd15": UNet2DConditionModel, "sdxl": UNet2DConditionModel, "sd35": SD3Transformer2DModel,
           "flux": FluxTransformer2DModel}[kind]  # fmt: skip
    config = {**UNET_SHAPES, **FLOW_SHAPES}[kind]
    return cls, {**config, **NARROW[kind]} if narrow else dict(config)


def build_family(kind: str, narrow: bool, device: torch.device, dtype: torch.dtype):
    """The family object around a randomly initialised denoiser of `kind`, built on `device` and cast to `dtype`,
    with the noise scheduler and the latent scaling training uses; no VAE or text encoder."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.configuration_utils import FrozenDict

    from difftune.pipelines.families import by_name

    cls, config = denoiser_config(kind, narrow)
    with torch.device(device):
        denoiser = cls(**config).to(dtype).requires_grad_(False)
    if kind == "z_image":  # its padding tokens are left uninitialised (torch.empty) at construction
        with torch.no_grad():
            denoiser.x_pad_token.normal_()
            denoiser.cap_pad_token.normal_()
    family_cls = by_name({**FAMILIES, **FAMILIES_2026}[kind][0])
    if family_cls.objective == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    # What the families' `normalize` reads of a VAE: scaling and shift; Qwen-Image's per-channel statistics; Flux.2's
    # batch-norm statistics over the patchified channels.
    config = FrozenDict(scaling_factor=0.5, shift_factor=0.0, latents_mean=[0.0] * 16, latents_std=[1.0] * 16,
                        batch_norm_eps=1e-4)  # fmt: skip
    vae = type("LatentScaling", (), {"config": config})()
    if kind.startswith("flux2"):
        vae.bn = torch.nn.BatchNorm2d(denoiser.config.in_channels).to(device)
    parts = {"noise_scheduler": scheduler, "vae": vae, family_cls.denoiser_name: denoiser}
    return family_cls(f"shaped-{kind}", {}, parts, {})


def random_batch(kind: str, family, batch: int, resolution: int, device: torch.device) -> dict:
    """A cached batch of `kind`'s shapes: VAE posterior parameters (B, 2C, h, w) and text conditioning."""
    denoiser = family.denoiser
    # Flux.1, Chroma and Qwen-Image read 2x2-packed latents; Flux.2's VAE latents are patchified 2x2 by `normalize`
    channels = denoiser.config.in_channels // (
        4 if kind in ("flux", "chroma", "qwen_image") or kind.startswith("flux2") else 1
    )
    side = resolution // 8
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    out = {"latents": randn(batch, 2 * channels, side, side), "noise_seed": torch.arange(batch),
           "weight": torch.ones(batch, device=device)}  # fmt: skip
    tokens = TEXT_TOKENS[kind]
    if kind in FAMILIES_2026:
        out["cond"] = text_2026(kind, denoiser.config, batch, tokens, randn)
    elif kind in ("sd15", "sdxl"):
        out["cond"] = {"encoder_hidden_states": randn(batch, tokens, denoiser.config.cross_attention_dim)}
        if kind == "sdxl":
            pooled = (
                denoiser.config.projection_class_embeddings_input_dim - 6 * denoiser.config.addition_time_embed_dim
            )
            out["cond"]["text_embeds"] = randn(batch, pooled)
            out["time_ids"] = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch).to(device)
    else:
        out["cond"] = {"encoder_hidden_states": randn(batch, tokens, denoiser.config.joint_attention_dim),
                       "pooled_projections": randn(batch, denoiser.config.pooled_projection_dim)}  # fmt: skip
    return out


def text_2026(kind: str, config, batch: int, tokens: int, randn) -> dict:
    """The cached text conditioning of a 2026 family (`encode_text`'s keys), every token valid."""
    ones = torch.ones(batch, tokens, dtype=torch.long)
    if kind == "z_image":
        return {"cap_feats": randn(batch, tokens, config.cap_feat_dim), "cap_mask": ones.to(randn(1).device)}
    text = randn(batch, tokens, config.joint_attention_dim)
    if kind == "qwen_image":
        return {"encoder_hidden_states": text, "encoder_hidden_states_mask": ones.to(text.device)}
    if kind == "chroma":
        return {"encoder_hidden_states": text, "attention_mask": ones.to(text.device, torch.float32)}
    return {"encoder_hidden_states": text}  # Flux.2: three hidden layers side by side, no mask


def preset_config(name: str, narrow: bool, kind: str, rank: int):
    """The LoRA config of preset `name` (its keys over the defaults); narrowed, its swapped blocks scale down."""
    from difftune.finetune.config import LoraTrainConfig

    values = load_yaml(shipped_configs() / "hardware" / f"{name}.yaml", LoraTrainConfig)
    values.pop("allow_tf32", None)
    n = values.get("blocks_to_swap", 0)
    if narrow and n:
        from difftune.finetune.block_swap import repeated_blocks

        cls, full = denoiser_config(kind, False)
        with torch.device("meta"):
            full_count = len(repeated_blocks(cls(**full)))
            narrow_count = len(repeated_blocks(cls(**denoiser_config(kind, True)[1])))
        values["blocks_to_swap"] = max(1, round(n * narrow_count / full_count))
    return compose(LoraTrainConfig, {"pretrained_model_name_or_path": "shaped", "rank": rank, **values})


def missing(cfg, device: torch.device) -> tuple[str | None, list[str]]:
    """Why the row cannot run here (None if it can), and the substitutions it runs with."""
    import importlib.util

    bnb = device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
    if cfg.memory.quantize_base and not bnb:
        return f"--quantize_base {cfg.memory.quantize_base} needs CUDA and bitsandbytes", []
    notes = []
    if cfg.optim.optimizer == "adamw8bit" and not bnb:
        cfg.optim.optimizer = "adamw"
        notes.append("adamw8bit -> adamw (no bitsandbytes)")
    if device.type == "cpu" and cfg.training.mixed_precision == "fp16":
        cfg.training.mixed_precision = "no"
        notes.append("fp16 -> fp32 (CPU)")
    return None, notes


def quantized(family, mode: str, dtype: torch.dtype) -> None:
    """Replaces the family's denoiser by itself reloaded through diffusers' bitsandbytes config, as `--quantize_base`
    loads a pipeline's (a random model goes through a temporary folder)."""
    import tempfile

    from difftune.finetune.quantize import quantization_config

    cls = type(family.denoiser)
    with tempfile.TemporaryDirectory() as tmp:
        family.denoiser.save_pretrained(tmp)
        family.parts[family.denoiser_name] = None
        gc.collect()
        torch.cuda.empty_cache()
        loaded = cls.from_pretrained(tmp, quantization_config=quantization_config(mode, dtype), torch_dtype=dtype)
    family.parts[family.denoiser_name] = loaded.requires_grad_(False)


def run_row(kind: str, name: str, args: MemoryBenchmarkConfig, device: torch.device) -> dict:
    """One preset on one family: build, apply the memory options, warm up, time `args.steps` optimizer steps."""
    from difftune.finetune.adapters import adapter_config, add_adapter
    from difftune.finetune.memory import SWAP_ATTRIBUTE, apply_memory_options
    from difftune.finetune.objective import Objective, batch_loss
    from difftune.finetune.optim import build_optimizer

    cfg = preset_config(name, args.narrow, kind, args.rank)
    resolution = 64 if args.narrow else SHAPED_RESOLUTION[kind]
    row = {"family": kind, "preset": name, "resolution": resolution, "batch": cfg.training.train_batch_size,
           "accumulation": cfg.training.gradient_accumulation_steps, "fp8_base": cfg.memory.fp8_base,
           "quantize_base": cfg.memory.quantize_base, "blocks_to_swap": cfg.memory.blocks_to_swap,
           "mixed_precision": cfg.training.mixed_precision}  # fmt: skip
    skip, notes = missing(cfg, device)
    row.update(optimizer=cfg.optim.optimizer, notes=notes)
    if skip:
        return {**row, "skipped": skip}
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.training.mixed_precision, torch.float32)
    family = build_family(kind, args.narrow, device, dtype)
    if cfg.memory.quantize_base:
        quantized(family, cfg.memory.quantize_base, dtype)
    denoiser = family.denoiser
    add_adapter(denoiser, adapter_config(cfg.network, list(family.lora_targets)))
    params = [p for p in denoiser.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trained weights stay fp32, as the loop keeps them
    denoiser.train()
    apply_memory_options(denoiser, cfg.memory, device)
    swap = getattr(denoiser, SWAP_ATTRIBUTE, None)
    if swap is not None:
        swap.timing = swap.cuda
    optimizer = build_optimizer(cfg.optim, params, cfg.optim.learning_rate)
    objective = Objective.from_config(cfg.objective, family.noise_scheduler)
    batch = random_batch(kind, family, cfg.training.train_batch_size, resolution, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    accumulation = cfg.training.gradient_accumulation_steps

    def step() -> None:
        for _ in range(accumulation):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = batch_loss(family, {family.denoiser_name: denoiser}, batch, objective, dtype)
            scaler.scale(loss / accumulation).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step()  # warm-up: optimizer state, the swap's execution order, kernels
    if swap is not None:
        swap.collect_transfer_time()
        swap.transfer_seconds = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if not args.narrow:  # the narrowed rows have no pipeline of consistent shapes to plan
        row["planner_gib"] = planned_step(kind, cfg, resolution)
    row["seconds_per_step"] = (time.perf_counter() - start) / args.steps
    if swap is not None:
        row["transfer_seconds_per_step"] = swap.collect_transfer_time() / args.steps
        row["swapped_gib"] = swap.host_bytes / 2**30
    return row


def planned_step(kind: str, cfg, resolution: int) -> float:
    """The memory planner's traced peak of the row's training step (`finetune.plan_trace`, for a CUDA device, its
    margins left out as `max_memory_allocated` leaves them out), on a pipeline of the family's shapes, in GiB."""
    import tempfile

    from difftune.core.config import with_settings
    from difftune.finetune.plan_trace import trace_run
    from difftune.finetune.tasks import LORA
    from difftune.scripts.shaped_models import write_shaped_configs

    with tempfile.TemporaryDirectory() as tmp:
        model = write_shaped_configs(kind, Path(tmp) / kind)
        planned = with_settings(cfg, pretrained_model_name_or_path=str(model), resolution=resolution)
        return trace_run(planned, LORA, "cuda", detail=False).phases["training step"].total / 2**30


def rows_to_run(args: MemoryBenchmarkConfig) -> list[tuple[str, str]]:
    """(family, preset) pairs: every card of each family, or the quick set, or the named presets."""
    suffixes = {kind: suffix for kind, (_, suffix) in {**FAMILIES, **FAMILIES_2026}.items()}
    presets = {p.stem for p in (shipped_configs() / "hardware").glob("*.yaml")}  # Flux.2 dev ships no 8/12 GB ones
    pairs = [(kind, f"{card}{suffixes[kind]}") for kind in args.families for card in CARDS
             if f"{card}{suffixes[kind]}" in presets]  # fmt: skip
    if args.quick:
        pairs = [(kind, name) for kind, name in pairs if name in QUICK]
    if args.presets:
        pairs = [(kind, name) for kind, name in pairs if name in args.presets]
    return pairs


def table(rows: list[dict], header: str) -> str:
    """The rows as the markdown table of docs/benchmarks.md."""
    lines = [header, "", "| family | preset | px | batch x accum. | precision | base | swapped blocks | optimizer | "
             "peak (GiB) | planner (GiB) | s/step | swap transfer s/step | notes |", "|" + "---|" * 13]  # fmt: skip
    for r in rows:
        base = "fp8" if r["fp8_base"] else (r["quantize_base"] or "as is")
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        planned = f"{r['planner_gib']:.2f}" if "planner_gib" in r else "-"
        speed = f"{r['seconds_per_step']:.2f}" if "seconds_per_step" in r else "-"
        transfer = f"{r['transfer_seconds_per_step']:.2f}" if "transfer_seconds_per_step" in r else "-"
        notes = "; ".join([*r.get("notes", []), *([r["skipped"]] if "skipped" in r else [])])
        lines.append(f"| {r['family']} | `{r['preset']}` | {r['resolution']} | {r['batch']} x {r['accumulation']} | "
                     f"{r['mixed_precision'] or 'default'} | {base} | {r['blocks_to_swap'] or '-'} | {r['optimizer']} | "
                     f"{peak} | {planned} | {speed} | {transfer} | {notes} |")  # fmt: skip
    return "\n".join(lines)


def machine() -> str:
    import platform

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse(MemoryBenchmarkConfig, argv, __doc__, prog="benchmark_memory.py")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.narrow:
        print("no CUDA device: running the narrowed rows (--narrow) on the CPU; no memory figures")
        args.narrow = True
    rows, start = [], time.perf_counter()
    for kind, name in rows_to_run(args):
        try:
            row = run_row(kind, name, args, device)
        except torch.OutOfMemoryError:
            row = {"family": kind, "preset": name, "skipped": "out of memory"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    header = (f"{machine()}; {time.strftime('%Y-%m-%d')}; rank-{args.rank} LoRA on the family's targets, "
              f"{args.steps} timed steps after 1 warm-up; {time.perf_counter() - start:.0f} s in all")  # fmt: skip
    print(table(rows, header))
    if args.output:
        Path(args.output).write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    return rows


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
