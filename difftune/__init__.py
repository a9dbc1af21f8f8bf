"""difftune: fine-tune diffusion models (LoRA and full) with diffusers, generate from the result, and compare the
other generative families on the same data.

The installed package holds the repository's folders as subpackages: `difftune.finetune`, `difftune.pipelines`,
`difftune.baselines`, `difftune.toyworld`, `difftune.core`, `difftune.scripts` and the YAML `difftune.configs`.

The Python API for scripted runs: `train_lora` and `train_full` take the same settings as the commands' flags, as
keyword arguments (or a config built with `load_config`), checked the same way, and return the run's result:

    from difftune import train_lora

    result = train_lora(pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        train_data_dir="my_images", output_dir="out/my-lora", max_train_steps=500)
    print(result.global_step, result.losses[-1])

Importing `difftune` itself imports nothing heavy; torch and diffusers load when a run starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from difftune.finetune.config import FullTrainConfig, LoraTrainConfig
    from difftune.finetune.loop import TrainResult

__version__ = "0.2.0"
__all__ = ["load_config", "train_full", "train_lora"]


def load_config(kind: str, *config_files: str, **settings: Any) -> LoraTrainConfig | FullTrainConfig:
    """The checked config of `kind` ("lora" or "full"): YAML files (shipped presets by name too, e.g. "gpu-12gb"),
    then `settings` (flag names), exactly as the command line combines `--config` files and flags."""
    from contextlib import nullcontext

    from difftune.core.config import from_values, load_yaml
    from difftune.finetune.planner import planning
    from difftune.finetune.tasks import task_named

    cls = task_named(kind).config_class
    values: dict[str, Any] = {}
    for path in config_files:
        values.update(load_yaml(path, cls))
    values.update(settings)
    config = from_values(cls, values, "train_" + kind, validate=False)
    with planning() if config.plan.requested else nullcontext():  # a plan is checked for the machine it plans for
        config.validate()
    return config


def _train(kind: str, config, settings: dict[str, Any]) -> TrainResult | None:
    from difftune.core.startup import quiet_start
    from difftune.finetune.loop import train
    from difftune.finetune.tasks import task_named

    if config is not None and settings:
        raise TypeError(f"train_{kind}: give a config or settings, not both")
    quiet_start()
    config = config if config is not None else load_config(kind, **settings)
    if config.plan.requested:  # plan=True or fit=GB: the memory plan is printed, nothing trains
        from difftune.finetune.planner import run_plan

        run_plan(config, task_named(kind))
        return None
    return train(config, task_named(kind))


def train_lora(config: LoraTrainConfig | None = None, /, **settings: Any) -> TrainResult:
    """Trains an adapter as `difftune-train-lora` does; `settings` are its flags (`rank=16, learning_rate=1e-4`)."""
    return _train("lora", config, settings)


def train_full(config: FullTrainConfig | None = None, /, **settings: Any) -> TrainResult:
    """Fine-tunes the denoiser's own weights as `difftune-train-full` does; `settings` are its flags."""
    return _train("full", config, settings)
