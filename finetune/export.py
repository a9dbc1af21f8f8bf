"""Writing results in the formats users' tools read: diffusers LoRA files, kohya LoRA files, model cards.

The LoRA file is diffusers' (`pytorch_lora_weights.safetensors`, keys `unet.`/`text_encoder.`/`text_encoder_2.`)
with peft's adapter config in the safetensors metadata, so `pipe.load_lora_weights(dir)` restores `lora_alpha`
even when it differs from the rank. The kohya file (`pytorch_lora_weights_kohya.safetensors`) is what A1111,
ComfyUI and kohya's scripts load: `lora_unet_*`, `lora_te_*` (SD 1.x/2.x) or `lora_te1_*`/`lora_te2_*` (SDXL),
each module with `.lora_down.weight`, `.lora_up.weight` and `.alpha` (scale = alpha / rank); a Flux transformer's
keys are Black Forest Labs' module names, as ComfyUI loads them. The keys themselves are `finetune.lora_keys` and
`finetune.kohya_flux`; which a family's files use, its card tags, and whether it has a kohya file at all are data
in `finetune.export_formats`. Every weights file names the family it was trained on in its metadata
(`difftune.family`). Each file is written atomically (`core.files.atomic`): a full disk leaves the old file or none,
never half of one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import yaml
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from difftune.core.config import leaves
from difftune.core.errors import UserError
from difftune.core.files import atomic
from difftune.finetune.adapters import ADAPTER_NAME as ADAPTER
from difftune.finetune.export_formats import export_format, kohya_format
from difftune.finetune.hub import repo_name
from difftune.finetune.lora_keys import kohya_layers, lora_state_dict
from difftune.pipelines.families import Family
from difftune.pipelines.families.base import is_hub_id
from difftune.pipelines.loading import FAMILY_KEY, KOHYA_FILE, LORA_FILE, PEFT_WEIGHTS

CARD_FILE = "README.md"
SAMPLES_FILE = "samples.png"


def _adapted(model: torch.nn.Module | None) -> bool:
    return model is not None and ADAPTER in (getattr(model, "peft_config", None) or {})


def _adapter_metadata(model: torch.nn.Module) -> dict:
    config = model.peft_config[ADAPTER].to_dict()
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def _adapted_models(models: dict[str, torch.nn.Module | None]) -> dict[str, torch.nn.Module]:
    """The models carrying an adapter, by component name: the prefix their keys take in diffusers' LoRA files."""
    return {name: model for name, model in models.items() if _adapted(model)}


def save_lora(family: type[Family], models: dict[str, torch.nn.Module | None], output_dir: Path) -> Path:
    """Writes the adapters of `models` (by component name) in the diffusers format of `family`'s pipeline class,
    peft's config of each in the metadata; returns the file."""
    legacy_keys = export_format(family).legacy_lora_keys
    kwargs = {}
    for name, model in _adapted_models(models).items():
        state_dict, path = lora_state_dict(model, name)
        layers = {path + k: v for k, v in state_dict.items()}
        kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(layers) if legacy_keys else layers
        kwargs[f"{name}_lora_adapter_metadata"] = _adapter_metadata(model)
    path = Path(output_dir) / LORA_FILE
    with atomic(path) as tmp:
        family.pipeline_class().save_lora_weights(tmp.parent, weight_name=tmp.name, safe_serialization=True, **kwargs)
        _tag_family(tmp, family)
    return path


def _tag_family(path: Path, family: type[Family]) -> None:
    """Adds the family the adapter was trained on to a safetensors file's metadata (`pipelines.loading` refuses it
    on a model of another family, even where the shapes happen to fit)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    save_file(tensors, path, metadata={**metadata, FAMILY_KEY: family.name})


def save_lora_kohya(family: type[Family], models: dict[str, torch.nn.Module | None], output_dir: Path) -> Path:
    """The same adapter(s) with kohya/A1111 key names (BFL's for a Flux transformer); returns the file."""
    fmt = kohya_format(family)
    kohya: dict[str, torch.Tensor] = {}
    for prefix, model in _adapted_models(models).items():
        kohya.update(fmt.denoiser_layers(model) if prefix == family.denoiser_name else kohya_layers(model, prefix))
    # diffusers names text encoders `lora_te1_`/`lora_te2_` (SDXL's convention); SD 1.x/2.x files say `lora_te_`.
    diffusers_names = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    for component, name in fmt.text_prefixes.items():
        kohya = {re.sub(f"^{diffusers_names[component]}_", f"{name}_", k): v for k, v in kohya.items()}
    path = Path(output_dir) / KOHYA_FILE
    with atomic(path) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in kohya.items()}, tmp, metadata={FAMILY_KEY: family.name}
        )
    return path


def copy_samples(output_dir: Path) -> Path | None:
    """Copies the last validation grid (`validation/step-N/grid.png`, largest N) to `samples.png`, if any."""
    grids = []
    for grid in Path(output_dir).glob("validation/step-*/grid.png"):
        step = grid.parent.name.removeprefix("step-")
        if step.isdigit():
            grids.append((int(step), grid))
    if not grids:
        return None
    target = Path(output_dir) / SAMPLES_FILE
    with atomic(target) as tmp:
        shutil.copyfile(max(grids)[1], tmp)
    return target


def _settings(cfg) -> dict[str, object]:
    """The settings table: the fields whose metadata says `card` (never a secret), unset ones left out."""
    settings = {name: value for name, (value, f) in leaves(cfg).items()
                if f.metadata.get("card") and not f.metadata.get("secret") and value is not None}  # fmt: skip
    if "lora_alpha" in settings or "rank" in settings:
        settings["lora_alpha"] = cfg.network.alpha
    return settings


def _usage(kind: str, base_model: str, ref: str) -> list[str]:
    if kind == "lora":
        return ["```python", "import torch", "from diffusers import DiffusionPipeline", "",
                f'pipe = DiffusionPipeline.from_pretrained("{base_model}")',
                f'pipe.load_lora_weights("{ref}")', 'image = pipe("<your prompt>").images[0]', "```", "",
                f"`{KOHYA_FILE}` (when present) is the same adapter for AUTOMATIC1111, ComfyUI and kohya's scripts."]  # fmt: skip
    return ["```python", "from diffusers import DiffusionPipeline", "",
            f'pipe = DiffusionPipeline.from_pretrained("{ref}")', 'image = pipe("<your prompt>").images[0]', "```"]  # fmt: skip


def write_model_card(output_dir: Path, cfg, kind: str, family: type[Family]) -> Path:
    """README.md: YAML front matter (base_model, tags, instance prompt, widget), prompts, settings, samples, usage.

    `kind` is `lora` or `full`. Its settings table holds the fields whose metadata says `card`: the Hub token is never written."""
    output_dir = Path(output_dir)
    base_model = cfg.model.pretrained_model_name_or_path
    # The Hub reads `base_model` as a repository id; a local folder's path would only leak the user's folders.
    hub_base = is_hub_id(base_model)
    base_name = base_model if hub_base else Path(base_model).resolve().name
    instance_prompt = cfg.dreambooth.instance_prompt
    prompts = list(cfg.validation.validation_prompt or [])
    samples = copy_samples(output_dir)
    tags = [*export_format(family).card_tags, "text-to-image", "diffusers", kind, "difftune"]
    licence = base_licence(base_model)
    meta: dict[str, object] = {**({"base_model": base_model} if hub_base else {}), **licence,
                               "library_name": "diffusers", "tags": tags}  # fmt: skip
    if instance_prompt:
        meta["instance_prompt"] = instance_prompt
    if samples is not None and prompts:
        meta["widget"] = [{"text": prompts[0], "output": {"url": SAMPLES_FILE}}]
    title = "LoRA" if kind == "lora" else "Full"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {title} fine-tune of {base_name}", "",
             "Trained with difftune" + ("." if hub_base else f", on a local copy of the pipeline `{base_name}`."), ""]  # fmt: skip
    if licence:
        lines += [f"Licence: the base model's, `{licence.get('license_name') or licence['license']}`"
                  + (f" ({licence['license_link']})" if licence.get("license_link") else "") + ".", ""]  # fmt: skip
    if instance_prompt:
        lines += [f"Instance prompt (the trigger for the learned concept): `{instance_prompt}`", ""]
    if prompts:
        lines += ["Validation prompts:", "", *[f"- `{p}`" for p in prompts], ""]
    if samples is not None:
        lines += ["## Samples", "", f"![samples]({SAMPLES_FILE})", "",
                  "One row per validation prompt, generated at the end of training.", ""]  # fmt: skip
    lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _settings(cfg).items()]
    base_ref = base_model if hub_base else f"path/to/{base_name}"
    lines += ["", "## Use", "", *_usage(kind, base_ref, repo_name(output_dir, cfg.hub))]
    path = output_dir / CARD_FILE
    with atomic(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


LICENCE_FIELDS = ("license", "license_name", "license_link")


def base_licence(base_model: str) -> dict[str, str]:
    """The base model card's licence fields (`license`, and `license_name`/`license_link` for `other`, as Flux.1-dev
    and SD 3.5 declare theirs), which a fine-tune inherits: from the local folder's README.md, or the Hub's card for
    a Hub id. {} when the base has no card or it cannot be read (then the card names no licence)."""
    from huggingface_hub import metadata_load

    readme = Path(base_model) / CARD_FILE
    if not readme.is_file() and not Path(base_model).exists():
        try:
            from huggingface_hub import hf_hub_download

            readme = Path(hf_hub_download(base_model, CARD_FILE))
        except Exception:  # noqa: BLE001 - offline, gated or no card: the card then names no licence
            return {}
    try:
        meta = metadata_load(readme) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return {k: str(meta[k]) for k in LICENCE_FIELDS if meta.get(k)}


def save_peft_adapters(
    family: type[Family], output_dir: Path, models: dict[str, torch.nn.Module | None]
) -> list[Path]:
    """Adapters diffusers has no LoRA format for (LoHa, LoKr): peft's own layout, one folder per model
    (`<name>/adapter_model.safetensors` + `adapter_config.json`), loadable with peft's `set_peft_model_state_dict`
    (`pipelines.loading` does it for `difftune-generate --lora`)."""
    written = []
    for name, model in models.items():
        if not _adapted(model):
            continue
        folder = Path(output_dir) / name
        state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
        with atomic(folder) as tmp:
            tmp.mkdir(parents=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / PEFT_WEIGHTS,
                      metadata={FAMILY_KEY: family.name})  # fmt: skip
            model.peft_config[ADAPTER].save_pretrained(tmp)
        written.append(folder)
    return written


def export_checkpoint(folder: Path, output_dir: Path) -> Path:
    """A LoRA training checkpoint (`checkpoint-N/`, `best/`) saved as a result in `output_dir`, the files `--lora`
    loads: the base comes from the settings the checkpoint records, the adapter is attached as training attached it
    and its trained weights (their EMA, with --use_ema) are loaded. Returns `output_dir`."""
    from difftune.core import checkpoint as ckpt
    from difftune.core.config import compose, leaf_fields
    from difftune.finetune.config import LoraTrainConfig
    from difftune.finetune.tasks import LORA
    from difftune.pipelines.families import detect, read_model_index

    record = ckpt.stored_config(folder)
    if not record:
        raise UserError(f"{folder}: no run settings recorded in its state.json; it cannot be exported")
    known = leaf_fields(LoraTrainConfig)
    cfg = compose(LoraTrainConfig, {k: v for k, v in record["settings"].items() if k in known})
    model = cfg.model.pretrained_model_name_or_path
    index = read_model_index(model)
    family_cls = detect(model, index)
    denoiser = LORA.load_denoiser(family_cls, cfg, torch.float32)
    family = family_cls.load(model, index, denoiser, cfg.model.family_options())
    trainable = LORA.setup(family, cfg)
    ckpt.load_weights(folder, trainable.models)
    if trainable.ema_decay is not None:  # the EMA is what training saves as its result
        from diffusers.training_utils import EMAModel

        params = [p for m in trainable.models.values() for p in m.parameters() if p.requires_grad]
        ema = EMAModel(params, decay=trainable.ema_decay)
        ema.load_state_dict(ckpt.load_tree(folder, "extra")["ema"])
        ema.copy_to(params)
    LORA.save(family, cfg, Path(output_dir))
    return Path(output_dir)
