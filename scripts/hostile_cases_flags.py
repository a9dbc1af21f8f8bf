"""The hostile run's flag, YAML-config, preset, planner and family cases for difftune-train-lora / -train-full."""

from __future__ import annotations

from pathlib import Path

from difftune.scripts.hostile_cases import FAMILIES, case, has_lora, lora, train_argv
from difftune.scripts.hostile_run import Case, Ctx, Loss, Result

C = "CLEAN"
MASKED_TEXT_FAMILIES = (
    "qwen_image",
    "flux2_klein",
    "z_image",
    "chroma",
)  # text encoders run with an attention mask: planned on all-valid masks


def families() -> list[Case]:
    out = [lora(f"family-{f}", model=f) for f in FAMILIES]
    out += [lora(f"family-{f}-full", model=f, command="full") for f in ("sd15", "sdxl", "sd3", "flux", "z_image")]
    out += [lora(f"family-{f}-dora", "--adapter", "dora", model=f) for f in ("sd15", "flux")]
    out += [lora(f"family-{f}-loha", "--adapter", "loha", model=f) for f in ("sd15", "sdxl", "sd3")]
    out += [lora(f"family-{f}-lokr", "--adapter", "lokr", model=f) for f in ("sd15", "flux")]
    out += [lora(f"family-{f}-text-encoder", "--train_text_encoder", model=f) for f in ("sd15", "sdxl")]
    out += [
        lora("family-flux-train-text-encoder", "--train_text_encoder", model="flux", expect="ANY"),
        lora("family-sd15-kohya", "--output_kohya_format", check=_has("pytorch_lora_weights_kohya.safetensors")),
        lora(
            "family-flux-kohya",
            "--output_kohya_format",
            model="flux",
            check=_has("pytorch_lora_weights_kohya.safetensors"),
        ),
        lora(
            "family-sdxl-kohya",
            "--output_kohya_format",
            model="sdxl",
            check=_has("pytorch_lora_weights_kohya.safetensors"),
        ),
        lora("family-sd3-t5-default-limit-64", model="sd3"),
        lora(
            "family-sd3-max-seq-beyond-t5",
            "--max_sequence_length",
            "500",
            model="sd3",
            expect=C,
            line="max_sequence_length",
        ),
        lora("family-flux-guidance-scale", "--guidance_scale", "2.0", model="flux"),
        lora("family-sd15-guidance-scale", "--guidance_scale", "2.0", expect=C, line="guidance_scale"),
        lora("family-sd15-weighting-scheme", "--weighting_scheme", "logit_normal", expect=C, line="weighting_scheme"),
        lora("family-sd3-snr-gamma", "--snr_gamma", "5", model="sd3", expect=C, line="snr_gamma"),
        lora("family-sd15-v-prediction", "--prediction_type", "v_prediction"),
        lora("family-sd15-zero-snr-eps", "--rescale_betas_zero_snr", expect="ANY", line="rescale_betas|v_prediction"),
        lora(
            "family-flux-prediction-type",
            "--prediction_type",
            "epsilon",
            model="flux",
            expect=C,
            line="prediction_type",
        ),
        lora("family-sd15-blocks-to-swap", "--blocks_to_swap", "2", expect=C, line="blocks_to_swap"),
        lora("family-flux-blocks-to-swap-99", "--blocks_to_swap", "99", model="flux", expect=C, line="blocks_to_swap"),
        lora(
            "family-flux-max-seq-0", "--max_sequence_length", "0", model="flux", expect=C, line="max_sequence_length"
        ),
        lora("family-chroma-max-seq-16", "--max_sequence_length", "16", model="chroma"),
        lora(
            "family-qwen-control-missing",
            "--control_data_dir",
            "{T}/none",
            model="qwen_image",
            expect=C,
            line="control_data_dir",
        ),
    ]
    return out


def _has(name: str):
    def check(ctx: Ctx, result: Result) -> None:
        has_lora()(ctx, result)
        if not (ctx.tmp / "o" / name).is_file():
            raise Loss(f"exit 0 but no {name}")

    return check


BAD_VALUES = [
    ("max-steps-negative", ["--max_train_steps", "-3"], "max_train_steps"),
    ("max-steps-float", ["--max_train_steps", "1.5"], "max_train_steps"),
    ("batch-zero", ["--train_batch_size", "0"], "train_batch_size"),
    ("resolution-zero", ["--resolution", "0"], "resolution"),
    ("resolution-negative", ["--resolution", "-32"], "resolution"),
    ("resolution-not-multiple-of-8", ["--resolution", "33"], "resolution"),
    ("lr-text", ["--learning_rate", "fast"], "learning_rate"),
    ("lr-nan", ["--learning_rate", "nan"], "learning_rate"),
    ("lr-inf", ["--learning_rate", "inf"], "learning_rate"),
    ("lr-negative", ["--learning_rate", "-1e-4"], "learning_rate"),
    ("rank-zero", ["--rank", "0"], "rank"),
    ("rank-negative", ["--rank", "-4"], "rank"),
    ("alpha-zero", ["--lora_alpha", "0"], "lora_alpha"),
    ("dropout-2", ["--lora_dropout", "2"], "lora_dropout"),
    ("adapter-unknown", ["--adapter", "locon"], "adapter"),
    ("target-modules-none-match", ["--target_modules", "nonexistent_proj"], "target_modules|nonexistent"),
    ("mixed-precision-fp16-cpu", ["--mixed_precision", "fp16"], "mixed_precision|fp16"),
    ("mixed-precision-unknown", ["--mixed_precision", "fp8"], "mixed_precision"),
    ("grad-accum-zero", ["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
    ("lr-scheduler-unknown", ["--lr_scheduler", "onecycle"], "lr_scheduler"),
    ("optimizer-unknown", ["--optimizer", "sgd"], "optimizer"),
    ("optimizer-adamw8bit-no-bnb", ["--optimizer", "adamw8bit"], "bitsandbytes|adamw8bit|CUDA"),
    ("use-8bit-adam-no-bnb", ["--use_8bit_adam"], "bitsandbytes|8bit|CUDA"),
    ("quantize-nf4-cpu", ["--quantize_base", "nf4"], "quantize_base|CUDA|bitsandbytes"),
    ("quantize-unknown", ["--quantize_base", "int3"], "quantize_base"),
    ("epochs-zero", ["--num_train_epochs", "0", "--max_train_steps", "0"], "num_train_epochs|max_train_steps"),
    ("repeats-zero", ["--repeats", "0"], "repeats"),
    ("keep-tokens-negative", ["--keep_tokens", "-1"], "keep_tokens"),
    ("empty-prompts-2", ["--proportion_empty_prompts", "2"], "proportion_empty_prompts"),
    ("bucket-min-over-max", ["--enable_bucket", "--min_bucket_reso", "128", "--max_bucket_reso", "64"], "bucket"),
    (
        "bucket-steps-zero",
        ["--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "64", "--bucket_reso_steps", "0"],
        "bucket_reso_steps",
    ),
    ("bucketing-default-range", ["--enable_bucket"], "min_bucket_reso|resolution"),
    ("bucketing-no-bucket", ["--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "64"], "no bucket"),
    ("epochs-only", ["--max_train_steps", "0", "--num_train_epochs", "1"], "max_train_steps"),
    ("workers-negative", ["--dataloader_num_workers", "-1"], "dataloader_num_workers"),
    ("checkpointing-zero", ["--checkpointing_steps", "0"], "checkpointing_steps"),
    ("checkpoints-limit-zero", ["--checkpoints_total_limit", "0"], "checkpoints_total_limit"),
    ("checkpoints-limit-negative", ["--checkpoints_total_limit", "-2"], "checkpoints_total_limit"),
    ("resume-missing-path", ["--resume_from_checkpoint", "{T}/nowhere/checkpoint-5"], "resume_from_checkpoint"),
    ("resume-path-is-file", ["--resume_from_checkpoint", "{W}/d/img0.png"], "resume_from_checkpoint|img0"),
    ("validation-split-1.5", ["--validation_split", "1.5"], "validation_split"),
    ("validation-split-all", ["--validation_split", "1.0"], "validation_split"),
    ("keep-best-unknown", ["--keep_best_by", "fid"], "keep_best_by"),
    ("patience-without-validation", ["--early_stopping_patience", "2"], "early_stopping_patience|validation"),
    ("with-prior-no-class-dir", ["--with_prior_preservation"], "class"),
    ("report-to-wandb", ["--report_to", "wandb"], "report_to"),
    ("output-is-file", ["--output_dir", "{W}/d/img0.txt"], "output_dir|img0.txt"),
    ("output-unwritable", ["--output_dir", "/proc/difftune-out"], "output_dir|/proc"),
    ("cache-dir-is-file", ["--cache_dir", "{W}/d/img0.txt"], "cache_dir|img0.txt"),
    ("both-data-sources", ["--dataset_name", "{W}/jsonl"], "dataset_name|train_data_dir"),
    ("dataset-name-offline", ["--train_data_dir", "", "--dataset_name", "someone/not-here-dataset"], "dataset"),
    ("validation-image-missing", ["--validation_image", "{T}/nope.png"], "validation_image|nope"),
    ("fit-zero", ["--fit", "0"], "fit"),
    ("fit-text", ["--fit", "rtx4090"], "fit"),
    ("compile-scope-unknown", ["--compile_scope", "everything"], "compile_scope"),
    ("timestep-bias-unknown", ["--timestep_bias_strategy", "middle"], "timestep_bias_strategy"),
    ("hub-without-model-id-offline", ["--push_to_hub"], "hub|token|push_to_hub"),
    ("unknown-flag", ["--learning_rat", "1e-3"], "learning_rat"),
    ("hyphenated-flag", ["--learning-rate", "1e-3"], "learning-rate"),
    ("flag-without-value", ["--rank"], "rank"),
]

GOOD_VALUES = [
    ("resume-latest-fresh", ["--resume_from_checkpoint", "latest"]),
    ("lr-scheduler-cosine-warmup", ["--lr_scheduler", "cosine", "--lr_warmup_steps", "5"]),
    ("optimizer-adafactor", ["--optimizer", "adafactor", "--learning_rate", "1e-3"]),
    ("snr-gamma", ["--snr_gamma", "5"]),
    ("noise-offset", ["--noise_offset", "0.1", "--input_perturbation", "0.1"]),
    ("timestep-bias-later", ["--timestep_bias_strategy", "later"]),
    ("ema", ["--use_ema", "--ema_decay", "0.9"]),
    ("grad-checkpointing", ["--gradient_checkpointing"]),
    ("grad-accum-3", ["--gradient_accumulation_steps", "3"]),
    (
        "bucketing",
        ["--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "64", "--bucket_reso_steps", "8"],
    ),
    ("fp8-base-cpu", ["--fp8_base"]),
    ("noise-offset-negative", ["--noise_offset", "-0.1"]),
    ("no-cache-random-flip", ["--no-cache_latents", "--random_flip"]),
    ("shuffle-keep-tokens", ["--shuffle_caption", "--keep_tokens", "1"]),
    ("empty-prompts-half", ["--proportion_empty_prompts", "0.5"]),
    ("repeats-3", ["--repeats", "3"]),
    ("workers-2", ["--dataloader_num_workers", "2"]),
    ("scale-lr", ["--scale_lr"]),
    ("instance-prompt", ["--instance_prompt", "a photo of sks dog"]),
    ("rank-1", ["--rank", "1", "--lora_alpha", "1"]),
    ("rank-64", ["--rank", "64"]),
    ("target-modules-q-only", ["--target_modules", "to_q"]),
    ("seed-huge", ["--seed", "4294967295"]),
    ("validation-split-short-run", ["--validation_split", "0.25", "--keep_best_by", "validation_loss"]),
    (
        "validation-prompt",
        [
            "--validation_prompt",
            "a photo of sks dog",
            "--validation_steps",
            "1",
            "--validation_inference_steps",
            "2",
            "--num_validation_images",
            "1",
        ],
    ),
    (
        "checkpoints-limit-1",
        ["--checkpointing_steps", "1", "--max_train_steps", "3", "--checkpoints_total_limit", "1"],
    ),
    ("cache-dir-elsewhere", ["--cache_dir", "{T}/cache"]),
    ("plan", ["--plan"]),
    ("fit-24", ["--fit", "24"]),
    ("output-dir-nested-new", ["--output_dir", "{T}/a/b/c/o"]),
]


def flags() -> list[Case]:
    out = [lora(f"flag-{name}", *argv, expect=C, line=line) for name, argv, line in BAD_VALUES]
    out += [
        lora("flag-ema-decay-without-ema", "--ema_decay", "0.9", expect="ANY", line="ema"),
        lora("flag-validation-split-short-run-says", "--validation_split", "0.25", line="validation"),
        lora("flag-sd15-zero-snr-v", "--rescale_betas_zero_snr", "--prediction_type", "v_prediction"),
    ]
    for name, argv in GOOD_VALUES:
        check = None
        if name in ("plan", "fit-24"):
            check = _no_output
        if name == "output-dir-nested-new":
            check = has_lora("a/b/c/o")
        out.append(lora(f"flag-{name}", *argv, check=check))
    out += [
        lora("full-adapter-flag", "--rank", "8", command="full", expect=C, line="rank"),
        lora("full-ema", "--use_ema", command="full"),
        lora("full-plan", "--plan", command="full", check=_no_output),
        lora("full-flux-fit", "--fit", "12", model="flux", command="full", check=_no_output),
        lora("full-lr-text", "--learning_rate", "x", command="full", expect=C, line="learning_rate"),
        lora("full-train-text-encoder", "--train_text_encoder", command="full"),
        lora("flag-plan-flux", "--plan", model="flux", check=_no_output),
        *[lora(f"flag-plan-{f}", "--plan", model=f, check=_no_output) for f in ("sdxl", "sd3")],
        *[lora(f"flag-plan-{f}", "--plan", model=f, check=_no_output) for f in MASKED_TEXT_FAMILIES],
        lora("flag-fit-qwen", "--fit", "24", model="qwen_image", check=_no_output),
        case(
            "flag-no-model",
            "lora",
            ["--train_data_dir", "{W}/d", "--output_dir", "{T}/o"],
            C,
            "pretrained_model_name_or_path",
        ),
        case(
            "flag-no-data",
            "lora",
            ["--pretrained_model_name_or_path", "{W}/p/sd15", "--output_dir", "{T}/o"],
            C,
            "train_data_dir|dataset_name",
        ),
        lora("model-missing", model="nothing-here", expect=C, line="nothing-here"),
        lora("model-is-file", model="../d/img0.png", expect=C, line="img0.png"),
        lora(
            "model-missing-unet",
            model="sd15_no_unet",
            expect=C,
            line="unet",
            setup=_copy_model("sd15_no_unet", _rm("unet")),
        ),
        lora(
            "model-index-corrupt",
            model="sd15_bad_index",
            expect=C,
            line="model_index",
            setup=_copy_model("sd15_bad_index", _put("model_index.json", "{oops")),
        ),
        lora(
            "model-index-unknown-class",
            model="sd15_unknown",
            expect=C,
            line="model_index|Pipeline",
            setup=_copy_model("sd15_unknown", _put("model_index.json", '{"_class_name": "WanPipeline"}')),
        ),
        lora(
            "model-unet-weights-truncated",
            model="sd15_trunc",
            expect=C,
            line="unet|safetensors",
            setup=_copy_model("sd15_trunc", _truncate("unet/diffusion_pytorch_model.safetensors")),
        ),
        lora("optimizer-prodigy", "--optimizer", "prodigy", "--learning_rate", "1.0", expect="ANY", line="prodigy"),
    ]
    return out


def _no_output(ctx: Ctx, result: Result) -> None:
    if (ctx.tmp / "o" / "pytorch_lora_weights.safetensors").exists() or (ctx.tmp / "o" / "unet").exists():
        raise Loss("--plan/--fit trained and wrote weights")
    if "GB" not in result.out + result.err and "GiB" not in result.out + result.err:
        raise Loss("--plan/--fit printed no memory figure")


def _copy_model(name: str, change):
    def setup(ctx: Ctx) -> None:
        import shutil

        target = ctx.world / "p" / name
        if not target.exists():
            shutil.copytree(ctx.world / "p" / "sd15", target)
            change(target)

    return setup


def _rm(part: str):
    import shutil

    return lambda folder: shutil.rmtree(folder / part)


def _put(name: str, text: str):
    return lambda folder: (folder / name).write_text(text)


def _truncate(name: str):
    def change(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return change


YAMLS = [
    ("typo-key", "learnin_rate: 1e-3\n", C, "learnin_rate"),
    ("duplicate-key", "rank: 4\nrank: 8\n", C, "rank"),
    ("wrong-type-rank", "rank: four\n", C, "rank"),
    ("list-for-scalar", "learning_rate: [1, 2]\n", C, "learning_rate"),
    ("null-required", "pretrained_model_name_or_path: null\n", "ANY", ""),
    ("empty-file", "", "OK", ""),
    ("top-level-list", "- rank: 4\n", C, "config"),
    ("syntax-error", "rank: [4\n", C, "config|yaml"),
    ("tabs", "rank:\t4\n", "ANY", ""),
    ("nested-section", "data:\n  resolution: 32\n", C, "data"),
    ("sci-notation-string", "learning_rate: 1e-4\n", "OK", ""),
    ("bool-as-string", "gradient_checkpointing: 'yes'\n", C, "gradient_checkpointing"),
    ("int-as-float", "max_train_steps: 2.0\n", "ANY", "max_train_steps"),
    ("anchors", "a: &x 4\nrank: *x\n", C, "\\ba\\b"),
    ("utf16", "rank: 4\n".encode("utf-16"), C, "config|UTF"),
    ("latin1", "instance_prompt: caf\xe9\n".encode("latin-1"), C, "config|UTF"),
    ("utf8-bom", "\ufeffrank: 4\n".encode(), "OK", ""),
    ("hub-token-secret", "hub_token: hf_secret_value_123\n", "OK", ""),
    ("lora-key-in-full", "rank: 4\n", C, "rank"),
    ("family-key-sd15", "weighting_scheme: mode\n", C, "weighting_scheme"),
]


def yamls() -> list[Case]:
    out = []
    for name, text, expect, line in YAMLS:
        command = "full" if name == "lora-key-in-full" else "lora"
        check = _no_token_leak if name == "hub-token-secret" else None

        def setup(ctx: Ctx, text=text) -> None:
            (ctx.tmp / "c.yaml").write_bytes(text.encode() if isinstance(text, str) else text)

        out.append(lora(f"yaml-{name}", "--config", "{T}/c.yaml", expect=expect, line=line, setup=setup,
                        command=command, check=check))  # fmt: skip
    out += [
        lora("yaml-missing-file", "--config", "{T}/none.yaml", expect=C, line="none.yaml"),
        lora("yaml-is-directory", "--config", "{T}", expect=C, line="config"),
        lora("preset-cpu", "--config", "cpu"),
        lora("preset-gpu-24gb-on-cpu", "--config", "gpu-24gb", expect="ANY"),
        lora("preset-unknown", "--config", "gpu-7gb", expect=C, line="gpu-7gb"),
        lora("preset-flux-on-sd15", "--config", "gpu-24gb-flux", expect="ANY", line=""),
        lora("preset-sdxl-plan", "--config", "gpu-12gb-sdxl", "--plan", model="sdxl", check=_no_output),
        lora("preset-then-flag-wins", "--config", "cpu", "--train_batch_size", "1"),
        case("yaml-flag-overrides", "lora", lambda ctx: _yaml_then_flag(ctx), "OK", check=_rank_is(2)),
    ]
    return out


def _yaml_then_flag(ctx: Ctx) -> list[str]:
    (ctx.tmp / "c.yaml").write_text("rank: 8\n")
    return train_argv("sd15", "{W}/d", "{T}/o", "--config", "{T}/c.yaml", "--rank", "2")


def _rank_is(rank: int):
    def check(ctx: Ctx, result: Result) -> None:
        from safetensors.torch import load_file

        weights = load_file(ctx.tmp / "o" / "pytorch_lora_weights.safetensors")
        ranks = {v.shape[0] for k, v in weights.items() if "lora.down" in k or "lora_A" in k}
        if ranks != {rank}:
            raise Loss(f"trained rank {ranks}, the flag said {rank}")

    return check


def _no_token_leak(ctx: Ctx, result: Result) -> None:
    for path in ctx.tmp.rglob("*"):
        if (
            path.is_file()
            and path.name != "c.yaml"
            and path.suffix in (".json", ".md", ".yaml", ".txt", ".jsonl", ".err", ".out")
        ):
            if "hf_secret_value_123" in path.read_text(errors="replace"):
                raise Loss(f"the hub token is written in {path.relative_to(ctx.tmp)}")


def cases() -> list[Case]:
    return [*families(), *flags(), *yamls()]
