"""What the app's forms do with their values: the same loaders, checks and library calls as the commands.

A training form becomes a `LoraTrainConfig` through `core.config.from_values` (the command line's checks and
one-line errors); the data check is `core.imagefolder.read_records` + `decode_all`, as training reads the folder;
"try it" is `pipelines.generate.main` with the flags a user would type; a push is `finetune.hub.push_to_hub`. Each
`UserError` is answered with the field it names (its first `--flag`), so the page shows it beside that field.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import yaml

from difftune.core.config import default_of, from_values, leaf_fields, load_yaml, to_dict
from difftune.core.errors import UserError
from difftune.core.paths import shipped_configs
from difftune.finetune.config import LoraTrainConfig

# The options the form shows; every other setting goes in its "more settings" YAML box.
MAIN_FIELDS = ("pretrained_model_name_or_path", "train_data_dir", "resolution", "train_batch_size", "max_train_steps",
               "learning_rate", "rank", "checkpointing_steps", "validation_prompt", "validation_steps",
               "num_validation_images", "validation_split", "seed", "mixed_precision")  # fmt: skip
EXTRA = "more settings"  # how errors name the YAML box (as the command line names a --config file)
THUMBNAILS = 24


def field_of(message: str, extra_keys=()) -> str | None:
    """The form field an error line is about: the first `--flag` it names, or the YAML box."""
    if message.startswith(EXTRA):
        return "extra"
    found = re.search(r"--(\w+)", message)
    if found is None:
        return None
    name = found.group(1)
    if name == "config":
        return "preset"
    return "extra" if name in extra_keys else name


def form_fields() -> list[dict]:
    """The main options with their help, default and choices, from the config's own field metadata."""
    spec = leaf_fields(LoraTrainConfig)
    out = []
    for name in MAIN_FIELDS:
        _, f, tp = spec[name]
        default = default_of(f)
        out.append({"name": name, "help": f.metadata.get("help", ""), "choices": f.metadata.get("choices"),
                    "default": None if default is None else str(default), "list": "list" in str(tp)})  # fmt: skip
    return out


def presets() -> list[str]:
    """The shipped hardware presets, by the name `--config` takes."""
    return sorted(p.stem for p in (shipped_configs() / "hardware").glob("*.yaml"))


def training_config(form: dict, output_dir: Path) -> tuple[LoraTrainConfig, dict]:
    """The run's validated config and the settings to write (preset, then the YAML box, then the fields), each
    typed as the config declares it. Raises the command line's UserError."""
    values = {}
    if form.get("preset"):
        values.update(load_yaml(form["preset"], LoraTrainConfig))
    extra = form.get("extra") or ""
    try:
        extra_values = yaml.safe_load(extra) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{EXTRA}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(extra_values, dict):
        raise UserError(f"{EXTRA}: expected a mapping of keys to values")
    values.update(extra_values)
    for name, value in (form.get("values") or {}).items():
        if value not in (None, "", []):
            values[name] = value
    values["output_dir"] = str(output_dir.resolve())
    cfg = from_values(LoraTrainConfig, values, where=EXTRA)
    typed = to_dict(cfg)
    return cfg, {name: typed[name] for name in values if name in typed}  # secrets are never written


def yaml_keys(text: str | None) -> list[str]:
    """The keys of the YAML box, for naming it in errors about them; none when it does not parse."""
    try:
        values = yaml.safe_load(text or "")
    except yaml.YAMLError:
        return []
    return list(values) if isinstance(values, dict) else []


def as_yaml(settings: dict) -> str:
    return yaml.safe_dump(settings, sort_keys=False)


def memory_prediction(cfg: LoraTrainConfig) -> str:
    """The memory planner's predicted peak of this run on a CUDA card (`--plan`: its model parts built on the meta
    device from their config files, its step traced; nothing loads or trains), in one line. Raises UserError as
    `--plan` does (a model folder without configs, a Hub id offline)."""
    from difftune.finetune.planner import DURING, GIB, planned_config, predict
    from difftune.finetune.tasks import LORA

    plan = predict(planned_config(cfg, {}), LORA, detail=False)
    return f"{plan.predicted / GIB:.2f} GiB at its peak, during {DURING[plan.trace.peak.phase]} (memory planner, CUDA)"


def check_data(folder: str) -> dict:
    """What training will read from `folder`: image count, skipped files, and thumbnails with their captions."""
    from difftune.core.imagefolder import decode_all, read_records

    records = read_records(train_data_dir=folder)
    images, kept = decode_all(records)
    kept_names = {r.name for r in kept}
    skipped = [r.name for r in records if r.name not in kept_names]
    thumbs = []
    for image, record in list(zip(images, kept, strict=True))[:THUMBNAILS]:
        image = image.copy()
        image.thumbnail((96, 96))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        thumbs.append({"src": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(),
                       "caption": record.caption, "name": Path(record.name).name})  # fmt: skip
    return {"images": len(kept), "skipped": skipped, "thumbnails": thumbs}


def generate(argv: list[str]) -> dict:
    """One `difftune-generate` run (its `main`), in this process; returns its record."""
    from difftune.pipelines import generate as generate_command

    return generate_command.main(argv)


def generate_flags(form: dict) -> list[str]:
    """The flags every column of a "try it" request shares, from the form's fields (named as generate's flags)."""
    argv = []
    for name in ("prompt", "sampler", "steps", "seed", "guidance_scale"):
        value = form.get(name)
        if value not in (None, ""):
            argv += [f"--{name}", str(value)]
    return argv + ["--num_images", "1", "--device", "auto"]


def push(folder: Path, hub_model_id: str | None, private: bool, api=None) -> str:
    """The run's result to the Hub; the token is the environment's or the cached login's, never the page's."""
    from difftune.finetune.hub import HubConfig, push_to_hub

    cfg = HubConfig(push_to_hub=True, hub_model_id=hub_model_id or None, hub_private=private)
    return push_to_hub(folder, cfg, api=api)
