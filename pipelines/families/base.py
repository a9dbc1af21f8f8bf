"""What every model family provides, so that training and generation never ask which family they run.

A family is one module (`pipelines/families/<name>.py`) defining a `Family` subclass. `Family` is an abstract base
class: a subclass sets the class data (`name`, `pipeline_class_name`, and whichever defaults it differs in) and
implements the abstract methods: how to recognise its pipelines from `model_index.json` (`matches`), its training
noise scheduler (`load_noise_scheduler`), how text becomes the denoiser's conditioning (`encode_text`) and how the
denoiser is called (`predict`). Everything else (loading the components, tokenizing, the VAE posterior and latent
normalisation, a resolution-dependent shift of the training sigmas, building a diffusers pipeline and its text
arguments from precomputed embeddings, the options `from_pretrained` needs) has a default a family overrides where
it differs. Text conditioning may vary in length (LLM encoders): tensors (B, L, ...) with a mask, right-padded with
zeros (`pad_sequences`). The
training objective a family uses (`objective`: "ddpm" for epsilon/v UNets, "flow" for rectified-flow transformers)
is data, looked up in `finetune.objective`. How a family's LoRA files are exported (model card tags, kohya keys)
is the export side's data (`finetune.export_formats`).

Components are read from the pipeline's own `model_index.json` (library and class of each part), as
`DiffusionPipeline.from_pretrained` does, but only from the `diffusers` and `transformers` libraries: no remote code
is ever run.
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers.utils.torch_utils import randn_tensor
from safetensors import SafetensorError
from torch import nn

from difftune.core.errors import UserError
from difftune.core.files import read_json
from difftune.core.quiet import no_loading_bars

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, SchedulerMixin

logger = logging.getLogger(__name__)
TRUSTED_LIBRARIES = ("diffusers", "transformers")
DAMAGED = "the pipeline folder is incomplete or damaged: restore it from its source"


def is_hub_id(model: str) -> bool:
    """Whether `model` names a Hub repository (`org/name`) rather than a local folder."""
    return model.count("/") == 1 and not model.startswith((".", "/", "~")) and not Path(model).exists()


def read_model_index(model: str) -> dict:
    """`model_index.json` of a local folder or, only when `model` is not a path, of a Hub id."""
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise UserError(f"{model} is a folder but not a diffusers pipeline (no model_index.json)")
    elif path.is_file():
        raise UserError(f"{model} is a file; give a diffusers pipeline folder (with model_index.json) or a Hub id")
    elif not is_hub_id(model):
        raise UserError(f"model {model!r} not found: give a diffusers pipeline folder or a Hub id like org/name")
    else:
        index = Path(_hub_file(model, "model_index.json"))
    data = read_json(index, DAMAGED)
    if not isinstance(data, dict):
        raise UserError(f"{index}: not a pipeline's model_index.json (a mapping of components); {DAMAGED}")
    return data


def _hub_file(model: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(model, filename)
    except Exception as err:  # noqa: BLE001 - hub errors come in many classes; all mean "cannot get this file"
        raise UserError(
            f"model {model!r}: could not fetch {filename} from the Hub ({type(err).__name__}); check the id, your "
            "login and the network"
        ) from err


def sub_config(model: str, subfolder: str, name: str = "config.json") -> dict:
    """A component's config (e.g. `scheduler/scheduler_config.json`); {} when the pipeline has none."""
    path = Path(model) / subfolder / name
    if not path.is_file():
        if Path(model).is_dir():
            return {}
        try:
            path = Path(_hub_file(model, f"{subfolder}/{name}"))
        except UserError:
            return {}
    data = read_json(path, DAMAGED)
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a config (a mapping of settings); {DAMAGED}")
    return data


def load_part(model: str, name: str, load):
    """`load()` (a component's `from_pretrained`), its failure one line naming the component and the folder. A local
    pipeline's component folder must exist (a tokenizer `from_pretrained` finds no files in loads empty, and fails
    only later, inside training)."""
    if Path(model).is_dir() and not (Path(model) / name).is_dir():
        raise UserError(f"{model}: has no {name}/ folder, which model_index.json lists; {DAMAGED}")
    try:
        with no_loading_bars():
            return load()
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise UserError(f"{model}: could not load its {name} ({first}); {DAMAGED}") from err


def component_class(index: dict, name: str, model: str) -> type:
    """The class `model_index.json` names for component `name`, from diffusers or transformers only."""
    entry = index.get(name)
    if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
        raise UserError(f"{model}: the pipeline has no {name!r} component (model_index.json)")
    library, cls_name = entry
    if library not in TRUSTED_LIBRARIES:
        raise UserError(f"{model}: component {name} comes from {library!r}; only diffusers/transformers are loaded")
    return getattr(importlib.import_module(library), cls_name)


def pad_sequences(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Tensors (L_i, ...) stacked into (B, max L_i, ...), each right-padded with zeros: variable-length text
    conditioning, whose mask (padded alike) marks the padding."""
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)


def dynamic_shift(scheduler, sigmas: torch.Tensor, image_seq_len: int) -> torch.Tensor:
    """`sigmas` moved by the resolution-dependent shift the Flux-style pipelines' `calculate_shift` gives for
    `image_seq_len` image tokens, when the scheduler config enables dynamic shifting (unchanged otherwise: a static
    shift is already in the scheduler's sigmas)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    if not config.get("use_dynamic_shifting", False):
        return sigmas
    mu = calculate_shift(image_seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)  # fmt: skip
    return scheduler.time_shift(mu, 1.0, sigmas)


def given(options: dict) -> dict:
    """The options actually set (not None, not False)."""
    return {k: v for k, v in options.items() if v is not None and v is not False}


class Family(ABC):
    """One model family's behaviour around its loaded components (an instance holds the components in `parts`,
    by their pipeline names)."""

    # --- what the family is: class data (`name` and `pipeline_class_name` have no default) ---------------------
    name: ClassVar[str]
    pipeline_class_name: ClassVar[str]  # diffusers' pipeline class: saving/loading LoRA files, validation, export
    denoiser_name: ClassVar[str] = "unet"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    objective: ClassVar[str] = "ddpm"
    optional_parts: ClassVar[tuple[str, ...]] = ()  # components a pipeline may lack (SD3's T5)
    adaptable_text_encoders: ClassVar[tuple[str, ...]] = (
        "text_encoder",
        "text_encoder_2",
    )  # what --train_text_encoder trains
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    text_lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    default_sampler: ClassVar[str] = "dpmpp-2m"  # pipelines.generate's default for this family
    passes_sigmas: ClassVar[bool] = False  # the pipeline hands the scheduler custom sigmas (FluxPipeline)
    # ... except to a scheduler configured with `use_flow_sigmas` (Flux2Pipeline), which then sets its own
    flow_sigmas_set_own: ClassVar[bool] = False
    unfit_samplers: ClassVar[dict[str, str]] = {}  # sampler -> why this family's pipeline cannot run it
    # Large (LLM) text encoders: with their outputs cached they are loaded alone, before the denoiser, to encode
    # every caption, then freed (`finetune.text_pass`); validation images then take the cached embeddings.
    text_first: ClassVar[bool] = False
    sample_posterior: ClassVar[bool] = True  # a latent drawn from the VAE posterior; False: its mean
    takes_negative_prompt: ClassVar[bool] = True  # the pipeline's call has a `negative_prompt`
    # Edit models (Flux Kontext, Qwen-Image-Edit) train on pairs: how many control images one example takes (0: a
    # text-to-image model), and the multiple their sides are sized to (`core.controls.control_size`).
    max_controls: ClassVar[int] = 0
    control_multiple: ClassVar[int] = 16
    # The text encoder reads the control images with the caption (Qwen-Image-Edit): `tokenize` takes them, and the
    # text conditioning is cached per caption and control images.
    text_reads_controls: ClassVar[bool] = False
    stretch_controls: ClassVar[bool] = False  # control images resized to their size without a crop (Qwen-Image-Edit)
    lora_families: ClassVar[tuple[str, ...]] = ()  # other families whose LoRAs fit this one's denoiser
    guidance_batch: ClassVar[int] = 2  # the pipeline's denoiser batch per image (classifier-free guidance)

    def __init__(self, model: str, index: dict, parts: dict[str, Any], options: dict | None = None):
        self.model = model
        self.index = index
        self.parts = parts
        self.options = options or {}
        # The text conditioning of prompts computed ahead (caption -> `encode_text` output without the batch
        # dimension), for validation images when the text encoders are not loaded (`text_first`).
        self.text_embeddings: Mapping[str, dict] | None = None

    # --- detection and loading -------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def matches(cls, index: dict, model: str) -> bool:
        """Whether the pipeline at `model`, whose `model_index.json` is `index`, is of this family."""

    @classmethod
    @abstractmethod
    def load_noise_scheduler(cls, model: str, **options) -> SchedulerMixin:
        """The scheduler training adds noise with, from the pipeline's `scheduler/`; `options` as in `load`."""

    @classmethod
    def from_pretrained_kwargs(cls, index: dict, model: str) -> dict:
        """What the pipeline class's `from_pretrained` needs besides the folder `model` (e.g. no safety checker)."""
        return {}

    @classmethod
    def pipeline_class(cls) -> type:
        return getattr(importlib.import_module("diffusers"), cls.pipeline_class_name)

    @classmethod
    def load(
        cls,
        model: str,
        index: dict,
        denoiser: nn.Module | None = None,
        options: dict | None = None,
        text_encoders: bool = True,
        make_part: Callable[[str, type], Any] | None = None,
    ) -> Family:
        """Every component training needs; `denoiser` replaces the pipeline's (e.g. a quantised one). `options` are
        the training settings a family reads (`prediction_type`, `max_sequence_length`, `guidance_scale`, ...),
        unset ones None or False. Which settings apply to which family is their config fields' metadata; the trainer
        refuses the others before loading (`finetune.config.check_family`). `text_encoders=False` leaves the text
        encoders out (None): their outputs were computed ahead (`text_first`). `make_part(name, cls)`
        makes a component instead of `cls.from_pretrained(model, subfolder=name)` (the memory planner builds them
        from their configs on the meta device)."""
        options = given(options or {})
        parts: dict[str, Any] = {
            "noise_scheduler": load_part(model, "scheduler", lambda: cls.load_noise_scheduler(model, **options))
        }
        absent = cls._absent(index, model)
        skipped = () if text_encoders else cls.text_encoder_names
        for name in ("vae", cls.denoiser_name, *cls.text_encoder_names, *cls.tokenizer_names):
            if name == cls.denoiser_name and denoiser is not None:
                parts[name] = denoiser
            elif name in absent or name in skipped:
                parts[name] = None
            else:
                cls_ = component_class(index, name, model)
                if make_part is not None:
                    parts[name] = load_part(model, name, lambda c=cls_, n=name: make_part(n, c))
                else:
                    parts[name] = load_part(model, name, lambda c=cls_, n=name: c.from_pretrained(model, subfolder=n))
        family = cls(model, index, parts, options)
        family.check_options()
        return family

    @classmethod
    def load_text(
        cls, model: str, index: dict, options: dict | None = None, dtype: torch.dtype | None = None
    ) -> Family:
        """Only the tokenizers and text encoders (in CPU memory, `dtype`): enough for `tokenize` and `encode_text`."""
        absent = cls._absent(index, model)
        parts: dict[str, Any] = {}
        for name in (*cls.text_encoder_names, *cls.tokenizer_names):
            kwargs = {"dtype": dtype} if name in cls.text_encoder_names and dtype is not None else {}
            load = component_class(index, name, model).from_pretrained
            with no_loading_bars():
                parts[name] = None if name in absent else load(model, subfolder=name, **kwargs)
        return cls(model, index, parts, given(options or {}))

    @classmethod
    def _absent(cls, index: dict, model: str) -> list[str]:
        """The optional parts this pipeline lacks, said once."""
        absent = [name for name in cls.optional_parts if (index.get(name) or [None])[0] is None]
        if absent:
            logger.warning("%s has no %s: training without them, as its pipeline runs", model, " or ".join(absent))
        return absent

    @classmethod
    def check_settings(cls, model: str, index: dict, options: dict) -> None:
        """Checks of the training settings (`options`, as in `load`) that need no weights, e.g. a text length beyond
        the family's limit: the trainer calls it before anything loads. None by default."""
        return None

    def check_options(self) -> None:
        """Checks of options against the loaded components (e.g. guidance on a model without guidance embeddings);
        none by default."""
        return None

    # --- components --------------------------------------------------------------------------------------

    @property
    def vae(self) -> AutoencoderKL:
        return self.parts["vae"]

    @property
    def denoiser(self) -> nn.Module:
        return self.parts[self.denoiser_name]

    @property
    def noise_scheduler(self) -> SchedulerMixin:
        return self.parts["noise_scheduler"]

    def text_encoders(self) -> dict[str, nn.Module]:
        return {name: self.parts[name] for name in self.text_encoder_names if self.parts.get(name) is not None}

    def default_lora_targets(self) -> list[str]:
        """The denoiser modules a LoRA adapts unless `--target_modules` says otherwise."""
        return list(self.lora_targets)

    def trainable_text_encoders(self) -> dict[str, nn.Module]:
        """The text encoders `--train_text_encoder` trains (the CLIP ones; T5 is never trained)."""
        return {name: m for name, m in self.text_encoders().items() if name in self.adaptable_text_encoders}

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Every module with weights, by component name."""
        return {"vae": self.vae, self.denoiser_name: self.denoiser, **self.text_encoders()}

    # --- text ------------------------------------------------------------------------------------------

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token ids (B, L) per tokenizer: `input_ids`, `input_ids_2`, ..."""
        out = {}
        for i, name in enumerate(self.tokenizer_names):
            tok = self.parts.get(name)
            if tok is not None:
                key = "input_ids" if i == 0 else f"input_ids_{i + 1}"
                out[key] = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                               return_tensors="pt").input_ids  # fmt: skip
        return out

    def text_cache_tag(self) -> str:
        """What besides the encoders' weights decides `encode_text`'s output (e.g. T5's length), for cache keys."""
        return ""

    @abstractmethod
    def encode_text(self, ids: dict[str, torch.Tensor], encoders: dict[str, nn.Module] | None = None) -> dict:
        """The denoiser's text conditioning as a dict of tensors (B, ...); `encoders` overrides the modules."""

    # --- images and the denoiser -------------------------------------------------------------------------

    def posterior(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters (B, 2C, h, w), mean then log-variance, of images (B, 3, H, W) in [-1, 1]."""
        return self.vae.encode(pixels).latent_dist.parameters

    def latents(self, posterior: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) drawn from VAE posterior params (B, 2C, h, w), each sample from its own seed (or
        the posterior mean, without `sample_posterior`), normalised as the denoiser sees them (`normalize`)."""
        mean, logvar = posterior.chunk(2, dim=1)
        if not self.sample_posterior:
            return self.normalize(mean)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        generators = [torch.Generator().manual_seed(int(s) ^ 0x5EED) for s in seeds]
        eps = randn_tensor(tuple(mean.shape), generator=generators, dtype=torch.float32).to(mean)
        return self.normalize(mean + std * eps)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, C, h, w) as the denoiser sees them: shifted (where the VAE has a shift factor), scaled."""
        shift = self.vae.config.get("shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def shift_sigmas(self, sigmas: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """Training sigmas (B,) drawn from the scheduler's schedule, moved as the family's pipeline moves its
        sampling sigmas for latents of `latent_shape` (a resolution-dependent shift); unchanged by default."""
        return sigmas

    def image_latents(self, posterior: torch.Tensor) -> torch.Tensor:
        """A control image's latents (B, C, h, w) from VAE posterior params (B, 2C, h, w): the posterior's mode,
        normalised as the denoiser sees latents, as the edit pipelines encode an input image
        (`retrieve_latents(..., "argmax")`)."""
        return self.normalize(posterior.chunk(2, dim=1)[0])

    @classmethod
    def control_size(
        cls, size: tuple[int, int], image_size: tuple[int, int], bucket: tuple[int, int]
    ) -> tuple[int, int]:
        """The (w, h) a control image of `size` trains at, its training image (of `image_size`) in `bucket`: by
        default `core.controls.control_size` (the bucket, or the bucket's area at the control's aspect ratio)."""
        from difftune.core.controls import control_size

        return control_size(size, image_size, bucket, cls.control_multiple)

    @classmethod
    def edit_inputs(cls, pipe, images: list, height: int, width: int, max_sequence_length: int | None) -> dict:
        """What an edit model's pipeline call takes besides the prompt to edit `images` into a `height` x `width`
        result (an edit family's own); a text-to-image family takes no images."""
        raise UserError(f"{cls.pipeline_class_name} is a text-to-image model: it takes no input image")

    @abstractmethod
    def predict(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict
    ) -> torch.Tensor:
        """The denoiser's output (B, C, h, w) for noisy latents (B, C, h, w) at `timesteps` (B,); `cond` is
        `encode_text`'s output, `batch` the training batch (for extra conditioning such as SDXL's `time_ids`)."""

    # --- pipelines ----------------------------------------------------------------------------------------

    def pipeline(self, scheduler, **overrides):
        """A diffusers pipeline around these components (the live ones, or `overrides`), for sampling or saving."""
        parts = {name: module for name, module in self.parts.items() if name != "noise_scheduler"}
        parts.update(overrides)
        return self.pipeline_class()(**parts, scheduler=scheduler, **self.pipeline_extras())

    def stand_ins(self) -> dict:
        """Components to save in place of absent ones, so that plain `DiffusionPipeline.from_pretrained` loads the
        saved folder (SD 3 without T5); none by default."""
        return {}

    def pipeline_extras(self) -> dict:
        """What the pipeline class's constructor needs besides the components (e.g. no safety checker)."""
        return {}

    @classmethod
    def guidance_inputs(cls, scale: float, negative_prompts: list[str] | None, count: int) -> dict:
        """The pipeline call's guidance arguments for generating `count` images: classifier-free guidance `scale`
        (or, for a guidance-distilled model, the guidance it is conditioned on) and the negative prompts, if any."""
        return {"guidance_scale": scale, "negative_prompt": negative_prompts}

    def prompt_inputs(self, prompts: list[str]) -> dict:
        """The pipeline call's text arguments for `prompts`: the prompts themselves, or, when the text encoders are
        not loaded, their conditioning from `text_embeddings` (`embedding_inputs`)."""
        if self.text_encoders() or self.text_embeddings is None:
            return {"prompt": prompts}
        missing = [p for p in prompts if p not in self.text_embeddings]
        if missing:
            raise UserError(f"no text embedding computed ahead for the prompt {missing[0]!r}")
        return self.embedding_inputs([self.text_embeddings[p] for p in prompts], self.text_embeddings.get(""))

    def embedding_inputs(self, conds: list[dict], empty: dict | None) -> dict:
        """The pipeline call's arguments from precomputed conditioning: `conds` per prompt (`encode_text`'s output
        without the batch dimension) and `empty`, the empty prompt's (the negative of classifier-free guidance)."""
        raise NotImplementedError(f"{type(self).__name__} does not sample from precomputed text embeddings")

    def sampling_scheduler(self) -> SchedulerMixin:
        """The scheduler validation images are drawn with (DPM-Solver++ for DDPM families, the flow's own Euler)."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)
