"""Every training setting carries its metadata: what a resume may do with it, whether the model card shows it, and
(where it is one family's) the families it applies to. Resume, the card and the family checks read nothing else."""

from __future__ import annotations

import pytest

from difftune.core.config import PASSIVE, REFUSED, RESUME_KINDS, SETTABLE, compose, leaf_fields, to_dict
from difftune.core.errors import UserError
from difftune.finetune.config import FullTrainConfig, LoraTrainConfig, check_family
from difftune.finetune.resume import check_resume, resume_kinds


@pytest.mark.parametrize("cls", [LoraTrainConfig, FullTrainConfig])
def test_every_setting_says_what_resume_and_the_card_do_with_it(cls):
    for name, (_, f, _) in leaf_fields(cls).items():
        assert f.metadata.get("resume") in RESUME_KINDS, f"{name}: resume kind missing"
        assert isinstance(f.metadata.get("card"), bool), f"{name}: card flag missing"
        assert f.metadata.get("help"), f"{name}: help missing"


def test_flags_stay_flat_and_unique_across_sections():
    names = list(leaf_fields(LoraTrainConfig))
    assert len(names) == len(set(names))
    cfg = compose(LoraTrainConfig, {"pretrained_model_name_or_path": "m", "resolution": 64, "rank": 8, "seed": 3})
    assert (cfg.data.resolution, cfg.network.rank, cfg.training.seed) == (64, 8, 3)
    flat = to_dict(cfg)
    assert flat["resolution"] == 64 and flat["rank"] == 8 and "data" not in flat


def test_secrets_never_leave_the_config():
    cfg = compose(LoraTrainConfig, {"pretrained_model_name_or_path": "m", "hub_token": "hf_secret"})
    assert "hub_token" not in to_dict(cfg)


def record(cfg) -> dict:
    return {"settings": to_dict(cfg), "num_processes": 1, "data": {"fingerprint": "x", "examples": 4}}


def test_resume_reads_each_settings_kind_from_its_metadata(tmp_path, caplog):
    kinds = resume_kinds(LoraTrainConfig)
    assert kinds["output_dir"] == PASSIVE and kinds["learning_rate"] == SETTABLE and kinds["rank"] == REFUSED
    base = {"pretrained_model_name_or_path": "m", "train_data_dir": "d"}
    old = record(compose(LoraTrainConfig, base))
    # passive and settable changes resume; a settable one is logged
    new = record(compose(LoraTrainConfig, {**base, "output_dir": "elsewhere", "learning_rate": 3e-4}))
    assert check_resume(tmp_path, old, new, False, kinds) is False
    # a trajectory change is refused, naming it
    with pytest.raises(UserError, match=r"--rank 4 -> 8 would change the training trajectory"):
        check_resume(tmp_path, old, record(compose(LoraTrainConfig, {**base, "rank": 8})), False, kinds)
    # a batch-layout change, when allowed, restarts the epoch
    changed = record(compose(LoraTrainConfig, {**base, "train_batch_size": 2}))
    assert check_resume(tmp_path, old, changed, True, kinds) is True


@pytest.mark.parametrize(
    ("family", "objective", "settings", "refused"),
    [
        ("sd3", "flow", {"snr_gamma": 5.0}, "--snr_gamma"),
        ("sd1", "ddpm", {"weighting_scheme": "logit_normal"}, "--weighting_scheme"),
        ("sd1", "ddpm", {"max_sequence_length": 77}, "--max_sequence_length"),
        ("sd3", "flow", {"guidance_scale": 3.5}, "--guidance_scale"),
        ("sd2", "ddpm", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}, None),
        ("flux", "flow", {"guidance_scale": 3.5, "max_sequence_length": 128}, None),
    ],
)
def test_a_setting_of_another_family_is_one_line_before_loading(family, objective, settings, refused):
    cfg = compose(LoraTrainConfig, {"pretrained_model_name_or_path": "m", **settings})
    if refused is None:
        check_family(cfg, family, "Pipeline", objective)
        return
    with pytest.raises(UserError, match=rf"^{refused} does not apply to {family} models") as err:
        check_family(cfg, family, "Pipeline", objective)
    assert "\n" not in str(err.value)


def test_no_hand_kept_lists_of_setting_names_remain():
    """Resume, the model card and the family checks read field metadata: no module names settings in a tuple."""
    import difftune.finetune.export as export
    import difftune.finetune.objective as objective
    import difftune.finetune.resume as resume

    for module in (export, objective, resume):
        for value in vars(module).values():
            if isinstance(value, tuple) and len(value) > 3 and all(isinstance(v, str) for v in value):
                assert not set(value) & set(leaf_fields(LoraTrainConfig)), (module.__name__, value)
