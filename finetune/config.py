"""The training configuration: one typed dataclass, filled from YAML files and then command-line flags.

Flags are named as in diffusers' example scripts. `--config FILE.yaml` (repeatable; later files win) holds the
same keys; flags given on the command line override the files. An unknown key, a wrong type or an impossible
combination is a `UserError` naming it, raised before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from core.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_BASE = str(REPO_ROOT / "pipelines" / "tiny_shapes")


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    # Model
    pretrained_model_name_or_path: str = _help("Base pipeline: a diffusers folder or Hub id.", default=EMBEDDED_BASE)
    prediction_type: str | None = _help("epsilon | v_prediction; default: the scheduler config's.", default=None)
    rescale_betas_zero_snr: bool = _help("Zero terminal SNR noise schedule (use with v_prediction).", default=False)
    # Data
    train_data_dir: str | None = _help("Imagefolder with metadata.jsonl, or images with .txt captions.", default=None)
    dataset_name: str | None = _help("A datasets name or local dataset path.", default=None)
    dataset_config_name: str | None = _help("The dataset's configuration name.", default=None)
    image_column: str = _help("Image column of the dataset.", default="image")
    caption_column: str = _help("Caption column of the dataset or metadata.jsonl.", default="text")
    caption_extension: str = _help("Caption sidecar extension.", default=".txt")
    resolution: int = _help("Training resolution in pixels (square).", default=512)
    center_crop: bool = _help("Crop the centre rather than a random window.", default=False)
    random_flip: bool = _help("Flip images horizontally at random.", default=False)
    proportion_empty_prompts: float = _help("Fraction of captions replaced by '' (for CFG).", default=0.0)
    shuffle_caption: bool = _help("Shuffle comma-separated caption tags each time.", default=False)
    keep_tokens: int = _help("With --shuffle_caption: keep the first N tags in place.", default=0)
    repeats: int = _help("Times each image appears per epoch.", default=1)
    enable_bucket: bool = _help("Aspect-ratio bucketing: batches of one bucket each.", default=False)
    min_bucket_reso: int = _help("Smallest bucket side in pixels.", default=256)
    max_bucket_reso: int = _help("Largest bucket side in pixels.", default=1024)
    bucket_reso_steps: int = _help("Bucket sides are multiples of this.", default=64)
    bucket_no_upscale: bool = _help("Never enlarge an image to fit a bucket.", default=False)
    # DreamBooth
    instance_prompt: str | None = _help("Caption every training image with this prompt (DreamBooth).", default=None)
    class_prompt: str | None = _help("Prompt of generated class images (prior preservation).", default=None)
    class_data_dir: str | None = _help(
        "Class/regularisation images: captioned (metadata.jsonl or .txt) are used as they are; otherwise they are "
        "captioned --class_prompt and missing ones generated.",
        default=None,
    )
    with_prior_preservation: bool = _help("Add the class-prior loss (DreamBooth).", default=False)
    prior_loss_weight: float = _help("Weight of the class-prior loss.", default=1.0)
    num_class_images: int = _help("Class images wanted in --class_data_dir.", default=100)
    cache_latents: bool = _help("Encode latents and text embeddings once, not every step.", default=True)
    cache_dir: str | None = _help("Where the latent cache lives; default <output_dir>/.cache.", default=None)
    # Optimisation
    output_dir: str = _help("Where weights, checkpoints, samples and logs go.", default="outputs/run")
    seed: int = _help("Seed of everything random: data order, noise, init.", default=0)
    train_batch_size: int = _help("Batch size per device.", default=1)
    num_train_epochs: int = _help("Epochs, unless --max_train_steps is set.", default=1)
    max_train_steps: int | None = _help("Optimizer steps; overrides --num_train_epochs.", default=None)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    gradient_checkpointing: bool = _help("Trade compute for memory in the UNet.", default=False)
    learning_rate: float = _help("Peak learning rate.", default=1e-4)
    scale_lr: bool = _help("Multiply the LR by batch size x accumulation x processes.", default=False)
    lr_scheduler: str = _help("constant | constant_with_warmup | linear | cosine | ...", default="constant")
    lr_warmup_steps: int = _help("Warm-up steps of the LR schedule.", default=0)
    adam_beta1: float = _help("AdamW beta1.", default=0.9)
    adam_beta2: float = _help("AdamW beta2.", default=0.999)
    adam_weight_decay: float = _help("AdamW weight decay.", default=1e-2)
    adam_epsilon: float = _help("AdamW epsilon.", default=1e-8)
    max_grad_norm: float = _help("Gradient clipping norm.", default=1.0)
    optimizer: str = _help("adamw | adamw8bit | prodigy | adafactor", default="adamw")
    use_8bit_adam: bool = _help("Shorthand for --optimizer adamw8bit (bitsandbytes, CUDA).", default=False)
    quantize_base: str | None = _help("nf4 | int8: load the frozen UNet quantised (bitsandbytes, CUDA).", default=None)
    mixed_precision: str | None = _help("no | fp16 | bf16; default: accelerate's config.", default=None)
    allow_tf32: bool = _help("Allow TF32 matmuls on Ampere+ GPUs.", default=False)
    dataloader_num_workers: int = _help("Data loading worker processes.", default=0)
    # Objective
    snr_gamma: float | None = _help("Min-SNR weighting gamma (5.0 is usual); off when unset.", default=None)
    noise_offset: float = _help("Noise offset (0.05-0.1 helps very dark/bright images).", default=0.0)
    input_perturbation: float = _help("Input perturbation of the noise (0.1 is usual).", default=0.0)
    timestep_bias_strategy: str = _help("none | earlier | later | range: sample some timesteps more.", default="none")
    timestep_bias_multiplier: float = _help("Weight of the favoured timesteps.", default=1.0)
    timestep_bias_begin: int = _help("With 'range': first favoured timestep.", default=0)
    timestep_bias_end: int = _help("With 'range': last favoured timestep.", default=1000)
    timestep_bias_portion: float = _help("With earlier/later: fraction of timesteps favoured.", default=0.25)
    # Adapter (LoRA script)
    adapter: str = _help("lora | dora | loha | lokr (peft).", default="lora")
    rank: int = _help("LoRA rank.", default=4)
    lora_alpha: float | None = _help("LoRA alpha; default: equal to rank (scale 1).", default=None)
    lora_dropout: float = _help("LoRA dropout.", default=0.0)
    target_modules: list[str] | None = _help("UNet modules to adapt.", default=None)
    # Full fine-tuning
    train_text_encoder: bool = _help("Also train the text encoder(s) (LoRA script: LoRA on them).", default=False)
    use_ema: bool = _help("Keep an EMA of the trained weights and save it.", default=False)
    ema_decay: float = _help("EMA decay.", default=0.9999)
    # Checkpoints
    checkpointing_steps: int = _help("Save a resumable checkpoint every N steps.", default=500)
    checkpoints_total_limit: int | None = _help("Keep at most N checkpoints.", default=None)
    resume_from_checkpoint: str | None = _help("'latest' or a checkpoint folder.", default=None)
    # Validation and logging
    validation_prompt: list[str] | None = _help("Prompts for validation images.", default=None)
    num_validation_images: int = _help("Images per validation prompt.", default=4)
    validation_steps: int = _help("Generate validation images every N steps.", default=100)
    validation_inference_steps: int = _help("Sampler steps for validation images.", default=20)
    report_to: str = _help("tensorboard | none", default="tensorboard")
    logging_dir: str = _help("Logs folder inside output_dir.", default="logs")
    # Export
    output_kohya_format: bool = _help("Also write the LoRA with kohya/A1111 key names.", default=False)
    push_to_hub: bool = _help("Upload the final result to the Hugging Face Hub.", default=False)
    hub_model_id: str | None = _help("Hub repository id; default: the output folder's name.", default=None)
    hub_token: str | None = _help("Hub token; default: the cached login. Never logged or saved.", default=None)
    hub_private: bool = _help("Create the Hub repository as private.", default=False)


def _field_types(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap(tp) -> tuple[object, bool]:
    """(inner type, optional?) of `X | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _check_value(key: str, value, tp, where: str):
    inner, optional = _unwrap(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: {key} must not be empty")
    if typing.get_origin(inner) is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{where}: {key} must be a list of strings, got {value!r}")
        return value
    if inner is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise UserError(f"{where}: {key} must be a string, got {value!r}")
    return value


def load_yaml(path: str | Path, cls=TrainConfig) -> dict:
    """The keys of a YAML config, type-checked against `cls`; unknown keys are errors naming them."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of keys to values")
    types_ = _field_types(cls)
    out = {}
    for key, value in data.items():
        if key not in types_:
            close = difflib.get_close_matches(str(key), types_, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"--config {path}: unknown key {key!r}{hint}")
        out[key] = _check_value(key, value, types_[key], f"--config {path}")
    return out


def build_parser(cls=TrainConfig, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", action="append", default=[], help="YAML file(s) of the same keys; repeatable.")
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap(_field_types(cls)[f.name])
        help_ = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help_)
        elif typing.get_origin(tp) is list:
            parser.add_argument(f"--{f.name}", nargs="+", help=help_)
        else:
            parser.add_argument(f"--{f.name}", type=tp, help=help_)
    return parser


def parse_config(argv: Sequence[str] | None, cls=TrainConfig, description: str = "", base: dict | None = None):
    """`cls` from defaults, then `base`, then each --config file, then flags. Validates before returning."""
    args = vars(build_parser(cls, description).parse_args(argv))
    values = dict(base or {})
    for path in args.pop("config"):
        values.update(load_yaml(path, cls))
    values.update(args)
    return cls(**values)


def validate(cfg: TrainConfig) -> None:
    """Combinations that cannot work, caught before any model is loaded."""
    if cfg.train_data_dir is None and cfg.dataset_name is None:
        raise UserError("no data: give --train_data_dir FOLDER or --dataset_name NAME")
    if cfg.train_data_dir is not None and cfg.dataset_name is not None:
        raise UserError("give only one of --train_data_dir and --dataset_name")
    checks = [
        (cfg.resolution > 0 and cfg.resolution % 8 == 0, f"--resolution {cfg.resolution} must be a multiple of 8"),
        (cfg.train_batch_size >= 1, "--train_batch_size must be at least 1"),
        (cfg.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be at least 1"),
        (cfg.max_train_steps is None or cfg.max_train_steps >= 1, "--max_train_steps must be at least 1"),
        (cfg.learning_rate > 0, "--learning_rate must be positive"),
        (0.0 <= cfg.proportion_empty_prompts <= 1.0, "--proportion_empty_prompts must be within [0, 1]"),
        (cfg.rank >= 1, "--rank must be at least 1"),
        (cfg.checkpointing_steps >= 1, "--checkpointing_steps must be at least 1"),
        (cfg.snr_gamma is None or cfg.snr_gamma > 0, "--snr_gamma must be positive"),
        (cfg.mixed_precision in (None, "no", "fp16", "bf16"), "--mixed_precision must be no, fp16 or bf16"),
        (cfg.prediction_type in (None, "epsilon", "v_prediction"), "--prediction_type: epsilon or v_prediction"),
        (cfg.report_to in ("tensorboard", "none"), "--report_to must be tensorboard or none"),
        (0.0 < cfg.ema_decay < 1.0, "--ema_decay must be within (0, 1)"),
    ]
    checks += [
        (cfg.adapter in ("lora", "dora", "loha", "lokr"), f"--adapter {cfg.adapter}: choose lora, dora, loha or lokr"),
        (cfg.repeats >= 1, "--repeats must be at least 1"),
        (cfg.keep_tokens >= 0, "--keep_tokens must not be negative"),
        (not cfg.keep_tokens or cfg.shuffle_caption, "--keep_tokens only applies with --shuffle_caption"),
        (cfg.timestep_bias_strategy in ("none", "earlier", "later", "range"),
         f"--timestep_bias_strategy {cfg.timestep_bias_strategy}: choose none, earlier, later or range"),
        (0 < cfg.timestep_bias_portion < 1, "--timestep_bias_portion must be within (0, 1)"),
        (cfg.timestep_bias_begin < cfg.timestep_bias_end, "--timestep_bias_begin must be below --timestep_bias_end"),
        (not cfg.with_prior_preservation or cfg.class_data_dir, "--with_prior_preservation needs --class_data_dir"),
        (cfg.num_class_images >= 1, "--num_class_images must be at least 1"),
        (not cfg.output_kohya_format or cfg.adapter == "lora",
         f"--output_kohya_format writes plain LoRA only; --adapter {cfg.adapter} has no kohya key format"),
    ]  # fmt: skip
    if cfg.enable_bucket:
        checks += [
            (cfg.bucket_reso_steps % 8 == 0, f"--bucket_reso_steps {cfg.bucket_reso_steps} must be a multiple of 8"),
            (cfg.min_bucket_reso <= cfg.resolution <= cfg.max_bucket_reso,
             f"--resolution {cfg.resolution} must lie within --min_bucket_reso {cfg.min_bucket_reso} and "
             f"--max_bucket_reso {cfg.max_bucket_reso}"),
        ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise UserError(message)
