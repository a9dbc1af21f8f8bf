import pytest

from core.errors import UserError
from finetune.config import TrainConfig, load_yaml, parse_config, validate


def write(path, text):
    path.write_text(text)
    return str(path)


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    cfg = write(tmp_path / "c.yaml", "learning_rte: 1e-4\n")
    with pytest.raises(UserError, match=r"unknown key 'learning_rte'; did you mean 'learning_rate'"):
        load_yaml(cfg)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train_batch_size: two\n", "train_batch_size must be an integer"),
        ("train_batch_size: 2.5\n", "train_batch_size must be an integer"),
        ("center_crop: 1\n", "center_crop must be true or false"),
        ("learning_rate: fast\n", "learning_rate must be a number"),
        ("validation_prompt: 3\n", "validation_prompt must be a list of strings"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_wrong_types_are_errors(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_yaml(write(tmp_path / "c.yaml", text))


def test_flags_override_files_and_later_files_win(tmp_path):
    a = write(tmp_path / "a.yaml", "learning_rate: 1.0e-3\ntrain_batch_size: 4\nrank: 8\n")
    b = write(tmp_path / "b.yaml", "train_batch_size: 2\n")
    cfg = parse_config(["--config", a, "--config", b, "--rank", "16", "--train_data_dir", "d"])
    assert (cfg.learning_rate, cfg.train_batch_size, cfg.rank, cfg.train_data_dir) == (1e-3, 2, 16, "d")
    assert cfg.resolution == TrainConfig().resolution


def test_boolean_and_list_flags():
    cfg = parse_config(["--center_crop", "--no-cache_latents", "--validation_prompt", "a b", "c d"])
    assert cfg.center_crop is True and cfg.cache_latents is False and cfg.validation_prompt == ["a b", "c d"]


def test_unknown_flag_exits():
    with pytest.raises(SystemExit):
        parse_config(["--learning_rte", "1"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "no data"),
        ({"train_data_dir": "a", "dataset_name": "b"}, "only one"),
        ({"train_data_dir": "a", "resolution": 60}, "multiple of 8"),
        ({"train_data_dir": "a", "mixed_precision": "fp8"}, "mixed_precision"),
        ({"train_data_dir": "a", "proportion_empty_prompts": 1.5}, "proportion_empty_prompts"),
    ],
)
def test_impossible_settings_stop_before_loading(kwargs, message):
    with pytest.raises(UserError, match=message):
        validate(TrainConfig(**kwargs))
