"""The training configs through the one loader (core.config): strict keys, types, choices, per-script flags."""

import re

import pytest

from difftune.core.config import compose, from_values, load_yaml, parse
from difftune.core.errors import UserError, run_main
from difftune.finetune.config import FullTrainConfig, LoraTrainConfig
from difftune.finetune.optim import LR_SCHEDULERS


def write(path, text):
    path.write_text(text)
    return str(path)


def lora(argv):
    """The LoRA script's config from `argv`, with a model named unless `argv` names one (the flag is required)."""
    model = [] if "--pretrained_model_name_or_path" in argv else ["--pretrained_model_name_or_path", "base"]
    return parse(LoraTrainConfig, [*model, *argv], prog="finetune_lora.py")


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    cfg = write(tmp_path / "c.yaml", "learning_rte: 1e-4\n")
    with pytest.raises(UserError, match=r"unknown key 'learning_rte'; did you mean 'learning_rate'"):
        load_yaml(cfg, LoraTrainConfig)


def test_yaml_exponent_learning_rate_is_a_number(tmp_path):
    """YAML 1.1 reads `1e-4` as a string; the most common way to write a learning rate must work."""
    cfg = lora(["--config", write(tmp_path / "c.yaml", "learning_rate: 1e-4\n"), "--train_data_dir", "d"])
    assert cfg.optim.learning_rate == 1e-4 and isinstance(cfg.optim.learning_rate, float)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train_batch_size: two\n", "train_batch_size must be an integer"),
        ("train_batch_size: 2.5\n", "train_batch_size must be an integer"),
        ("center_crop: 1\n", "center_crop must be true or false"),
        ("learning_rate: fast\n", "learning_rate must be a number"),
        ("learning_rate: .nan\n", "learning_rate must be a finite number"),
        ("validation_prompt: [3, {a: 1}]\n", r"validation_prompt\[1\] must be a string"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_wrong_types_are_errors(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_yaml(write(tmp_path / "c.yaml", text), LoraTrainConfig)


def test_flags_override_files_and_later_files_win(tmp_path):
    a = write(tmp_path / "a.yaml", "learning_rate: 1.0e-3\ntrain_batch_size: 4\nrank: 8\n")
    b = write(tmp_path / "b.yaml", "train_batch_size: 2\n")
    cfg = lora(["--config", a, "--config", b, "--rank", "16", "--train_data_dir", "d"])
    assert (cfg.optim.learning_rate, cfg.training.train_batch_size, cfg.network.rank, cfg.data.train_data_dir) == (
        1e-3,
        2,
        16,
        "d",
    )
    assert cfg.data.resolution == compose(LoraTrainConfig, dict(pretrained_model_name_or_path="base")).data.resolution


def test_boolean_and_list_flags():
    cfg = lora(["--center_crop", "--no-cache_latents", "--validation_prompt", "a b", "c d", "--train_data_dir", "d"])
    assert (
        cfg.data.center_crop is True
        and cfg.cache.cache_latents is False
        and cfg.validation.validation_prompt == ["a b", "c d"]
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning_rte", "1"], "unknown flag --learning_rte; did you mean --learning_rate"),
        (["--learning", "1e-3"], "unknown flag --learning; did you mean --learning_rate"),  # no abbreviations
        (["--quantize_bse", "nf4"], "unknown flag --quantize_bse; did you mean --quantize_base"),
        (["--ema_decay", "1"], "--ema_decay must be within"),
        (["--validation_split", "-0.1"], "--validation_split -0.1 must be within"),
        (["--lr_scheduler", "cosin"], "--lr_scheduler cosin: unknown .did you mean 'cosine'"),
        (["--optimizer", "adam"], "--optimizer adam: unknown"),
        (["--adapter", "lorA"], "--adapter lorA: unknown"),
        (["--mixed_precision", "fp8"], "--mixed_precision fp8: unknown"),
        (["--lora_dropout", "5"], "--lora_dropout 5.0 must be within"),
        (["--seed", "-1"], "--seed -1 must be within"),
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be at least 1"),
        (["--checkpoints_total_limit", "-1"], "--checkpoints_total_limit must be at least 1"),
        (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must not be negative"),
        (["--num_train_epochs", "0"], "--num_train_epochs must be at least 1"),
        (["--train_batch_size", "x"], "--train_batch_size must be an integer"),
    ],
)
def test_bad_flags_are_one_line_errors_before_any_model_loads(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda a: lora(a), [*argv, "--train_data_dir", "d"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and re.search(message, err), err


def test_full_script_has_no_adapter_flags():
    for flag in (["--rank", "4"], ["--adapter", "dora"], ["--target_modules", "to_q"], ["--output_kohya_format"]):
        with pytest.raises(UserError, match=f"finetune_full.py: unknown flag {flag[0]}"):
            parse(FullTrainConfig, [*flag, "--pretrained_model_name_or_path", "b", "--train_data_dir", "d"],
                  prog="finetune_full.py")  # fmt: skip
    full = ["--pretrained_model_name_or_path", "base", "--use_ema", "--train_data_dir", "d"]
    assert parse(FullTrainConfig, full, prog="finetune_full.py").training.use_ema
    assert lora(["--use_ema", "--train_data_dir", "d"]).training.use_ema  # an EMA of the adapter weights


def test_lr_scheduler_choices_are_diffusers_own():
    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "give exactly one of --train_data_dir"),
        ({"train_data_dir": "a", "dataset_name": "b"}, "exactly one"),
        ({"train_data_dir": "a", "resolution": 60}, "multiple of 8"),
        ({"train_data_dir": "a", "proportion_empty_prompts": 1.5}, "proportion_empty_prompts"),
        ({"train_data_dir": "a", "adapter": "loha", "output_kohya_format": True}, "plain LoRA only"),
    ],
)
def test_impossible_settings_stop_before_loading(kwargs, message):
    with pytest.raises(UserError, match=message):
        from_values(LoraTrainConfig, {"pretrained_model_name_or_path": "base", **kwargs})


def test_the_base_model_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda a: parse(LoraTrainConfig, a, prog="finetune_lora.py"), ["--train_data_dir", "d"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: --pretrained_model_name_or_path is required: a diffusers pipeline folder or Hub id\n"
    )
