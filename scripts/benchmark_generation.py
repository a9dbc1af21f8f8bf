"""Images per second with each generation speed option on and off, on the device at hand.

    python scripts/benchmark_generation.py --output_dir benchmarks/generation [--lora DIR] [--compile]

Every row changes one thing from the default row (diffusers' defaults: SDPA attention, classifier-free guidance
as one batched UNet call, contiguous memory format, no compile, no LoRA):
- `classic attention`: diffusers' `AttnProcessor` (explicit softmax(QK^T)V) instead of SDPA (`AttnProcessor2_0`);
- `channels_last`: UNet and VAE in channels-last memory format;
- `CFG as two UNet calls`: the unconditional and conditional halves in two UNet calls per step, what the
  pipeline would cost without its batched guidance (the UNet's forward is wrapped to split its batch);
- `LoRA unfused` / `LoRA fused`: a LoRA (yours with `--lora`, else a random rank-4 one on the attention
  projections) evaluated beside the base weights, or folded into them (`--fuse_lora`);
- `torch.compile` (with `--compile`): the UNet compiled with the default inductor backend; the compile time is
  excluded (warm-up batches), and a failure is reported as a row rather than stopping the run.
Images per second come from the median batch time over `--repeats` timed batches after `--warmup` untimed ones;
the rows take turns batch by batch, so that a busy machine slows every row alike.
"""

from __future__ import annotations

import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

if __name__ == "__main__":  # run as a program: keep out the imports it does not use (core/startup.py)
    from difftune.core.startup import quiet_start

    quiet_start()

import torch
from diffusers import StableDiffusionPipeline

from difftune.core.config import option, parse
from difftune.core.errors import UserError, run_main
from difftune.core.paths import embedded_base
from difftune.pipelines.generate import GenerateConfig, generate_batch, image_size, plan_images, prepare_pipeline
from difftune.pipelines.loading import load_pipeline
from difftune.pipelines.samplers import sampler_names
from difftune.toyworld import shapes

DEFAULT_MODEL = str(embedded_base("tiny_shapes"))


@dataclass
class GenerationBenchmarkConfig:
    model: str = option("pipeline folder or Hub id (default: the embedded base)", DEFAULT_MODEL)
    lora: str | None = option("LoRA for the fuse rows (default: a random rank-4 LoRA)", None)
    sampler: str = option("the sampler every row uses", "dpmpp-2m", choices=sampler_names())
    steps: int = option("num_inference_steps", 20)
    guidance_scale: float = option("classifier-free guidance scale", 7.5)
    batch_size: int = option("images per timed batch", 12)
    repeats: int = option("timed batches per row", 3)
    warmup: int = option("untimed batches per row (2 or more with --compile)", 1)
    compile: bool = option("add the torch.compile row", False)
    device: str = option("cpu | cuda | cuda:N", "cpu")
    output_dir: str = option("folder for results.json and results.md", "benchmarks/generation")

    def generate_config(self) -> GenerateConfig:
        """The default row's settings, as `pipelines.generate` takes them; `validate` checks them the same way."""
        return GenerateConfig(
            model=self.model, prompt=["-"], output_dir=self.output_dir, sampler=self.sampler, steps=self.steps,
            guidance_scale=self.guidance_scale, batch_size=self.batch_size, device=self.device,
            lora=[self.lora] if self.lora else [],
        )  # fmt: skip

    def validate(self) -> None:
        for name in ("repeats", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise UserError(f"--warmup must be 0 or more, got {self.warmup}")
        self.generate_config().validate()  # model, LoRA file, device, sampler/steps, output folder


def random_lora(model: str, out_dir: Path, rank: int = 4) -> Path:
    """A random LoRA on the UNet's attention projections, saved in diffusers format (as finetune would)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe, _ = load_pipeline(model)
    targets = ["to_k", "to_q", "to_v", "to_out.0"]
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)
    return out_dir


def split_guidance(pipe) -> None:
    """Makes each UNet call two calls on the halves of its batch: guidance without batching, for comparison."""
    forward = pipe.unet.forward

    def halves(value, part: slice):
        if torch.is_tensor(value) and value.ndim > 0:
            return value[part]
        if isinstance(value, dict):  # SDXL's added_cond_kwargs: text_embeds, time_ids
            return {k: halves(v, part) for k, v in value.items()}
        return value

    def two_calls(sample, timestep, encoder_hidden_states, **kwargs):
        n = sample.shape[0] // 2  # (2B, C, h, w): unconditional rows first, then conditional
        outs = []
        for part in (slice(0, n), slice(n, None)):
            part_kwargs = {k: halves(v, part) for k, v in kwargs.items()}
            part_kwargs["return_dict"] = False
            outs.append(forward(sample[part], halves(timestep, part), encoder_hidden_states[part], **part_kwargs)[0])
        return (torch.cat(outs),)

    pipe.unet.forward = two_calls


def prepare_row(cfg: GenerateConfig, bench: GenerationBenchmarkConfig, after_load: Callable | None = None) -> tuple:
    """The row's pipeline, warmed up (this is where torch.compile compiles), and its batch of image specs."""
    pipe, _, _ = prepare_pipeline(cfg)
    if after_load is not None:
        after_load(pipe)
    size = image_size(pipe, None, None)
    prompts = shapes.prompts()
    specs = plan_images(prompts, max(1, -(-bench.batch_size // len(prompts))), 0)[: bench.batch_size]
    for _ in range(bench.warmup):
        generate_batch(pipe, specs, cfg, *size)
    return pipe, cfg, specs, size


def measure(bench: GenerationBenchmarkConfig) -> list[dict]:
    base = replace(bench.generate_config(), lora=[])
    lora = bench.lora or str(random_lora(bench.model, Path(tempfile.mkdtemp(prefix="difftune-lora-"))))
    options: list[tuple[str, GenerateConfig, Callable | None]] = [
        ("default (SDPA, batched CFG)", base, None),
        ("classic attention (no SDPA)", replace(base, attention="classic"), None),
        ("channels_last", replace(base, channels_last=True), None),
        ("CFG as two UNet calls", base, split_guidance),
        ("LoRA unfused", replace(base, lora=[lora]), None),
        ("LoRA fused (--fuse_lora)", replace(base, lora=[lora], fuse_lora=True), None),
    ]
    if bench.compile:
        options.append(("torch.compile (UNet)", replace(base, compile=True), None))
    prepared, results = {}, {}
    for name, cfg, after_load in options:
        try:
            prepared[name] = prepare_row(cfg, bench, after_load)
        except Exception as err:  # noqa: BLE001 - torch.compile fails in many ways; report it as the row's result
            if not cfg.compile:
                raise
            results[name] = {"option": name, "images_per_s": None, "error": str(err).strip().splitlines()[0][:200]}
    # Rows take turns, one timed batch each per round, so that load from other processes hits all rows alike.
    times: dict[str, list[float]] = {name: [] for name in prepared}
    for _ in range(bench.repeats):
        for name, (pipe, cfg, specs, size) in prepared.items():
            start = time.perf_counter()
            generate_batch(pipe, specs, cfg, *size)
            times[name].append(time.perf_counter() - start)
    for name, (_, _, specs, _) in prepared.items():
        ips = len(specs) / statistics.median(times[name])
        results[name] = {"option": name, "images_per_s": ips, "batch_seconds": times[name]}
        print(f"{name:>32}: {ips:.2f} img/s", file=sys.stderr)
    return [results[name] for name, _, _ in options]


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    rows = result["rows"]
    default = rows[0]["images_per_s"]
    lines = [
        f"# Generation speed options: {result['model']}",
        "",
        f"- command: `{result['command']}`",
        f"- device: {result['device']} ({result['machine']})",
        f"- {result['sampler']} {result['steps']} steps, guidance {result['guidance_scale']}, "
        f"batch {result['batch_size']}, median of {result['repeats']} timed batches",
        "",
        "| option | images/s | vs default |",
        "|---|---|---|",
    ]
    for r in rows:
        if r["images_per_s"] is None:
            lines.append(f"| {r['option']} | failed: {r['error']} | - |")
        else:
            lines.append(f"| {r['option']} | {r['images_per_s']:.2f} | {r['images_per_s'] / default:.2f}x |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> dict:
    bench = parse(GenerationBenchmarkConfig, argv, __doc__.split("\n\n")[0], prog="scripts/benchmark_generation.py")
    result = {
        "model": bench.model if bench.model != DEFAULT_MODEL else "pipelines/tiny_shapes",
        "device": bench.device,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "sampler": bench.sampler,
        "steps": bench.steps,
        "guidance_scale": bench.guidance_scale,
        "batch_size": bench.batch_size,
        "repeats": bench.repeats,
        "command": "python scripts/benchmark_generation.py " + shlex.join(sys.argv[1:]),
        "rows": measure(bench),
    }
    write_outputs(result, Path(bench.output_dir))
    print((Path(bench.output_dir) / "results.md").read_text())
    return result


if __name__ == "__main__":
    run_main(main)
