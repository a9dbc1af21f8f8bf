"""The training configurations: one typed dataclass per entry script, on a shared base, filled by `core.config`.

`TrainConfig` holds what both scripts use; `LoraTrainConfig` (finetune_lora.py) adds the adapter, `FullTrainConfig`
(finetune_full.py) nothing yet. A flag of the other script is an unknown flag here, named in a one-line error.
Flags are named as in diffusers' example scripts; `--config FILE.yaml` (repeatable; later files win) holds the
same keys and flags win. Every choice is checked and `validate()` rejects impossible combinations, all before
any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from difftune.core.config import option
from difftune.core.errors import UserError
from difftune.core.paths import check_output_dir
from difftune.finetune.optim import OPTIMIZERS, validate_optim
from difftune.finetune.quantize import check_quantize
from difftune.finetune.speed import SCOPES

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_BASE = str(REPO_ROOT / "pipelines" / "tiny_shapes")
# diffusers.optimization.SchedulerType's values (tested against it; importing diffusers here would slow --help).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")  # fmt: skip
ADAPTERS = ("lora", "dora", "loha", "lokr")
FLOW_WEIGHTING = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")  # diffusers' compute_density/weighting


@dataclass
class TrainConfig:
    """Settings both entry scripts share."""

    # Model
    pretrained_model_name_or_path: str = option("Base pipeline: a diffusers folder or Hub id.", default=EMBEDDED_BASE)
    prediction_type: str | None = option(
        "Default: the scheduler config's.", default=None, choices=("epsilon", "v_prediction")
    )
    rescale_betas_zero_snr: bool = option("Zero terminal SNR noise schedule (use with v_prediction).", default=False)
    # Data
    train_data_dir: str | None = option("Imagefolder with metadata.jsonl, or images with .txt captions.", default=None)
    dataset_name: str | None = option("A datasets name or local dataset path.", default=None)
    dataset_config_name: str | None = option("The dataset's configuration name.", default=None)
    image_column: str = option("Image column of the dataset.", default="image")
    caption_column: str = option("Caption column of the dataset or metadata.jsonl.", default="text")
    caption_extension: str = option("Caption sidecar extension.", default=".txt")
    resolution: int = option("Training resolution in pixels (square).", default=512)
    center_crop: bool = option("Crop the centre rather than a random window.", default=False)
    random_flip: bool = option("Flip images horizontally at random.", default=False)
    proportion_empty_prompts: float = option("Fraction of captions replaced by '' (for CFG).", default=0.0)
    shuffle_caption: bool = option("Shuffle comma-separated caption tags each time.", default=False)
    keep_tokens: int = option("With --shuffle_caption: keep the first N tags in place.", default=0)
    repeats: int = option("Times each image appears per epoch.", default=1)
    enable_bucket: bool = option("Aspect-ratio bucketing: batches of one bucket each.", default=False)
    min_bucket_reso: int = option("Smallest bucket side in pixels.", default=256)
    max_bucket_reso: int = option("Largest bucket side in pixels.", default=1024)
    bucket_reso_steps: int = option("Bucket sides are multiples of this.", default=64)
    bucket_no_upscale: bool = option("Never enlarge an image to fit a bucket.", default=False)
    # DreamBooth
    instance_prompt: str | None = option("Caption every training image with this prompt (DreamBooth).", default=None)
    class_prompt: str | None = option("Prompt of generated class images (prior preservation).", default=None)
    class_data_dir: str | None = option(
        "Class/regularisation images: captioned (metadata.jsonl or .txt) are used as they are; otherwise they are "
        "captioned --class_prompt and missing ones generated.",
        default=None,
    )
    with_prior_preservation: bool = option("Add the class-prior loss (DreamBooth).", default=False)
    prior_loss_weight: float = option("Weight of the class-prior loss.", default=1.0)
    num_class_images: int = option("Class images wanted in --class_data_dir.", default=100)
    cache_latents: bool = option("Encode latents and text embeddings once, not every step.", default=True)
    cache_dir: str | None = option("Where the latent cache lives; default <output_dir>/.cache.", default=None)
    # Optimisation
    output_dir: str = option("Where weights, checkpoints, samples and logs go.", default="outputs/run")
    seed: int = option("Seed of everything random: data order, noise, init.", default=0)
    train_batch_size: int = option("Batch size per device.", default=1)
    num_train_epochs: int = option("Epochs, unless --max_train_steps is set.", default=1)
    max_train_steps: int | None = option("Optimizer steps; overrides --num_train_epochs.", default=None)
    gradient_accumulation_steps: int = option("Micro-batches per optimizer step.", default=1)
    gradient_checkpointing: bool = option("Trade compute for memory in the UNet.", default=False)
    learning_rate: float = option("Peak learning rate.", default=1e-4)
    scale_lr: bool = option("Multiply the LR by batch size x accumulation x processes.", default=False)
    lr_scheduler: str = option(
        "Learning-rate schedule (diffusers' get_scheduler).", default="constant", choices=LR_SCHEDULERS
    )
    lr_warmup_steps: int = option("Warm-up steps of the LR schedule.", default=0)
    adam_beta1: float = option("AdamW beta1.", default=0.9)
    adam_beta2: float = option("AdamW beta2.", default=0.999)
    adam_weight_decay: float = option("AdamW weight decay.", default=1e-2)
    adam_epsilon: float = option("AdamW epsilon.", default=1e-8)
    max_grad_norm: float = option("Gradient clipping norm.", default=1.0)
    optimizer: str = option("The optimizer.", default="adamw", choices=OPTIMIZERS)
    use_8bit_adam: bool = option("Shorthand for --optimizer adamw8bit (bitsandbytes, CUDA).", default=False)
    mixed_precision: str | None = option("Default: accelerate's config.", default=None, choices=("no", "fp16", "bf16"))
    allow_tf32: bool = option("Allow TF32 matmuls on Ampere+ GPUs.", default=False)
    dataloader_num_workers: int = option("Data loading worker processes.", default=0)
    # Speed of a step (finetune/speed.py)
    compile: bool = option("torch.compile the denoiser; the first step compiles.", default=False)
    compile_scope: str = option(
        "With --compile: 'blocks' compiles the repeated blocks (diffusers' regional compilation), 'model' all of it.",
        default="blocks", choices=SCOPES,
    )  # fmt: skip
    fused_optimizer: bool = option("AdamW's fused kernel (torch; CPU and CUDA).", default=False)
    channels_last: bool = option("A convolutional denoiser's (UNet's) weights in channels-last format.", default=False)
    # Objective
    snr_gamma: float | None = option("Min-SNR weighting gamma (5.0 is usual); off when unset.", default=None)
    noise_offset: float = option("Noise offset (0.05-0.1 helps very dark/bright images).", default=0.0)
    input_perturbation: float = option("Input perturbation of the noise (0.1 is usual).", default=0.0)
    timestep_bias_strategy: str = option(
        "Sample some timesteps more.", default="none", choices=("none", "earlier", "later", "range")
    )
    timestep_bias_multiplier: float = option("Weight of the favoured timesteps.", default=1.0)
    timestep_bias_begin: int = option("With 'range': first favoured timestep.", default=0)
    timestep_bias_end: int = option("With 'range': last favoured timestep.", default=1000)
    timestep_bias_portion: float = option("With earlier/later: fraction of timesteps favoured.", default=0.25)
    # Objective: rectified flow (SD 3/3.5, Flux), flag names of diffusers' SD3/Flux scripts and kohya's
    weighting_scheme: str = option(
        "Flow timestep density (logit_normal, mode) or loss weighting (sigma_sqrt, cosmap).", default="none",
        choices=FLOW_WEIGHTING,
    )  # fmt: skip
    logit_mean: float = option("logit_normal: mean.", default=0.0)
    logit_std: float = option("logit_normal: standard deviation.", default=1.0)
    mode_scale: float = option("mode: scale of the mode-seeking density.", default=1.29)
    precondition_outputs: int = option(
        "1: compare pred x (-sigma) + x_t with x_0 (SD3's option); 0: eps - x_0.", default=0
    )
    timestep_sampling: str = option(
        "kohya's flow timestep sampling; sigma: the scheduler's sigmas at --weighting_scheme's density.",
        default="sigma", choices=("sigma", "uniform", "sigmoid", "shift", "flux_shift"),
    )  # fmt: skip
    sigmoid_scale: float = option(
        "sigmoid/shift/flux_shift: scale of the normal draw before the sigmoid.", default=1.0
    )
    discrete_flow_shift: float | None = option(
        "shift: the sigma shift; default: the scheduler's `shift`.", default=None
    )
    max_sequence_length: int | None = option("T5 tokens per caption (SD3, Flux); default: the family's.", default=None)
    guidance_scale: float | None = option(
        "Guidance-distilled Flux: the guidance the transformer is conditioned on while training (default 3.5).",
        default=None,
    )
    train_text_encoder: bool = option("Also train the text encoder(s) (LoRA script: LoRA on them).", default=False)
    # Checkpoints
    checkpointing_steps: int = option("Save a resumable checkpoint every N steps.", default=500)
    checkpoints_total_limit: int | None = option("Keep at most N checkpoints.", default=None)
    resume_from_checkpoint: str | None = option("'latest' or a checkpoint folder.", default=None)
    resume_allow_changes: bool = option(
        "Resume even though settings that change the training trajectory (batch size, data, ...) differ from the "
        "checkpoint's; the interrupted epoch then restarts.", default=False,
    )  # fmt: skip
    # Validation and logging
    validation_prompt: list[str] | None = option("Prompts for validation images.", default=None)
    num_validation_images: int = option("Images per validation prompt.", default=4)
    validation_steps: int = option("Validation images and validation loss every N steps.", default=100)
    validation_inference_steps: int = option("Sampler steps for validation images.", default=20)
    # Validation loss, best checkpoint, early stopping (finetune/validation_loss.py)
    validation_split: float = option("Hold out this fraction of the images for the validation loss.", default=0.0)
    validation_data_dir: str | None = option("A folder of held-out images (read like --train_data_dir).", default=None)
    keep_best_by: str | None = option(
        "Keep the checkpoint of the lowest validation loss in <output_dir>/best/.", default=None,
        choices=("validation_loss",),
    )  # fmt: skip
    early_stopping_patience: int | None = option(
        "Stop after N validations without a better validation loss; the best checkpoint becomes the output.",
        default=None,
    )  # fmt: skip
    report_to: str = option("Tracker.", default="tensorboard", choices=("tensorboard", "none"))
    logging_dir: str = option("Logs folder inside output_dir.", default="logs")
    # EMA (adapters: of the adapter weights only)
    use_ema: bool = option("Keep an EMA of the trained weights and save it as the result.", default=False)
    ema_decay: float = option("EMA decay.", default=0.9999)
    # Export
    push_to_hub: bool = option("Upload the final result to the Hugging Face Hub.", default=False)
    hub_model_id: str | None = option("Hub repository id; default: the output folder's name.", default=None)
    hub_token: str | None = option("Hub token; default: the cached login. Never logged or saved.", default=None)
    hub_private: bool = option("Create the Hub repository as private.", default=False)

    def validate(self) -> None:
        """Combinations that cannot work, caught before any model is loaded."""
        if (self.train_data_dir is None) == (self.dataset_name is None):
            raise UserError("give exactly one of --train_data_dir FOLDER or --dataset_name NAME")
        for ok, message in self.checks():
            if not ok:
                raise UserError(message)
        validate_optim(self)
        check_output_dir(self.output_dir)
        if self.push_to_hub:
            from difftune.finetune.hub import resolve_token

            resolve_token(self)

    def family_options(self) -> dict:
        """The settings a model family reads while loading (see `pipelines.families.Family.load`)."""
        return {"prediction_type": self.prediction_type, "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
                "max_sequence_length": self.max_sequence_length, "guidance_scale": self.guidance_scale}  # fmt: skip

    def checks(self) -> list[tuple[bool, str]]:
        checks = [
            (self.resolution > 0 and self.resolution % 8 == 0, f"--resolution {self.resolution} must be a multiple of 8"),
            (self.train_batch_size >= 1, "--train_batch_size must be at least 1"),
            (self.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be at least 1"),
            (self.max_train_steps is None or self.max_train_steps >= 1, "--max_train_steps must be at least 1"),
            (self.num_train_epochs >= 1, "--num_train_epochs must be at least 1"),
            (self.learning_rate > 0, "--learning_rate must be positive"),
            (0.0 <= self.proportion_empty_prompts <= 1.0, "--proportion_empty_prompts must be within [0, 1]"),
            (self.checkpointing_steps >= 1, "--checkpointing_steps must be at least 1"),
            (self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
             "--checkpoints_total_limit must be at least 1 (leave it unset to keep every checkpoint)"),
            (self.snr_gamma is None or self.snr_gamma > 0, "--snr_gamma must be positive"),
            (self.repeats >= 1, "--repeats must be at least 1"),
            (self.keep_tokens >= 0, "--keep_tokens must not be negative"),
            (not self.keep_tokens or self.shuffle_caption, "--keep_tokens only applies with --shuffle_caption"),
            (0 < self.timestep_bias_portion < 1, "--timestep_bias_portion must be within (0, 1)"),
            (self.timestep_bias_begin < self.timestep_bias_end, "--timestep_bias_begin must be below --timestep_bias_end"),
            (not self.with_prior_preservation or self.class_data_dir, "--with_prior_preservation needs --class_data_dir"),
            (self.num_class_images >= 1, "--num_class_images must be at least 1"),
            (0 <= self.seed < 2**32, f"--seed {self.seed} must be within [0, 2**32)"),
            (self.dataloader_num_workers >= 0, "--dataloader_num_workers must not be negative"),
            (self.validation_steps >= 1, "--validation_steps must be at least 1"),
            (self.logit_std > 0, "--logit_std must be positive"),
            (self.precondition_outputs in (0, 1), "--precondition_outputs must be 0 or 1"),
            (self.discrete_flow_shift is None or self.discrete_flow_shift > 0, "--discrete_flow_shift must be positive"),
            (self.max_sequence_length is None or self.max_sequence_length >= 1, "--max_sequence_length must be >= 1"),
            (self.guidance_scale is None or self.guidance_scale >= 0, "--guidance_scale must not be negative"),
            (0.0 < self.ema_decay < 1.0, "--ema_decay must be within (0, 1)"),
            (0.0 <= self.validation_split < 1.0, f"--validation_split {self.validation_split} must be within [0, 1)"),
            (not (self.validation_split and self.validation_data_dir),
             "give --validation_split or --validation_data_dir, not both"),
            (self.keep_best_by is None or bool(self.validation_split or self.validation_data_dir),
             "--keep_best_by validation_loss needs held-out images: --validation_split 0.1 or --validation_data_dir"),
            (self.early_stopping_patience is None or self.early_stopping_patience >= 1,
             "--early_stopping_patience must be at least 1"),
            (self.early_stopping_patience is None or self.keep_best_by is not None,
             "--early_stopping_patience saves the best checkpoint as the output: add --keep_best_by validation_loss"),
        ]  # fmt: skip
        if self.enable_bucket:
            checks += [
                (self.bucket_reso_steps % 8 == 0, f"--bucket_reso_steps {self.bucket_reso_steps} must be a multiple of 8"),
                (self.min_bucket_reso <= self.resolution <= self.max_bucket_reso,
                 f"--resolution {self.resolution} must lie within --min_bucket_reso {self.min_bucket_reso} and "
                 f"--max_bucket_reso {self.max_bucket_reso}"),
            ]  # fmt: skip
        return checks


@dataclass
class LoraTrainConfig(TrainConfig):
    """finetune_lora.py: an adapter on the denoiser (and optionally the text encoders) through peft."""

    adapter: str = option("Adapter type (peft).", default="lora", choices=ADAPTERS)
    rank: int = option("LoRA rank.", default=4)
    lora_alpha: float | None = option("LoRA alpha; default: equal to rank (scale 1).", default=None)
    lora_dropout: float = option("LoRA dropout, within [0, 1).", default=0.0)
    target_modules: list[str] | None = option("Denoiser modules to adapt; default: the family's.", default=None)
    output_kohya_format: bool = option("Also write the LoRA with kohya/A1111 key names.", default=False)
    quantize_base: str | None = option(
        "Load the frozen denoiser quantised (bitsandbytes, CUDA).", default=None, choices=("nf4", "int8")
    )

    def validate(self) -> None:
        super().validate()
        if self.quantize_base is not None:
            check_quantize(self.quantize_base)

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.rank >= 1, "--rank must be at least 1"),
            (0.0 <= self.lora_dropout < 1.0, f"--lora_dropout {self.lora_dropout} must be within [0, 1)"),
            (self.lora_alpha is None or self.lora_alpha > 0, "--lora_alpha must be positive"),
            (not self.output_kohya_format or self.adapter == "lora",
             f"--output_kohya_format writes plain LoRA only; --adapter {self.adapter} has no kohya key format"),
        ]  # fmt: skip


@dataclass
class FullTrainConfig(TrainConfig):
    """finetune_full.py: the denoiser's own weights (and optionally the text encoders') train."""
