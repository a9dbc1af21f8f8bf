"""The pipelines and data a hostile run uses, made the way a user outside the project would make them.

Pipelines: SD 1.5, SDXL, SD 3, Flux.1 and Chroma are built here with plain diffusers / transformers constructors, at
sizes and with schedulers the project's own tiny builders do not use (a 77-token CLIP tokenizer written here, a DDIM
or Euler scheduler, a VAE that downsamples x4, a T5 tokenizer limited to 64 tokens). The LLM-encoded 2026 families
(Qwen-Image, Flux.2 dev and klein, Z-Image) need LLM tokenizers and encoders that only `toyworld` writes offline; those
come from `toyworld.tiny_families`. Data: images of every mode and format PIL writes (PNG, JPEG, WebP, TIFF; RGB,
greyscale, palette, CMYK, 16-bit, RGBA), odd sizes, and captions in odd encodings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ChromaPipeline,
    ChromaTransformer2DModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

WORDS = ("a", "photo", "of", "sks", "dog", "red", "blue", "cat", "circle", "square")


def clip_tokenizer(out: Path) -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with SD's 77-token limit: every byte is a token, a few words are merged."""
    out.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab, merges = chars + [c + "</w>" for c in chars], []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{merged} {piece}")
            merged += piece
            vocab.append(merged)
    vocab = {t: i for i, t in enumerate(dict.fromkeys([*vocab, "<|startoftext|>", "<|endoftext|>"]))}
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)


def clip_text(tok: CLIPTokenizer, hidden: int, projection: bool = False) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=hidden, bos_token_id=len(tok) - 2,
        eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_tokenizer(out: Path, max_length: int) -> T5TokenizerFast:
    from difftune.toyworld.tiny_flow import write_t5_tokenizer  # the only offline T5 tokenizer writer at hand

    return T5TokenizerFast.from_pretrained(write_t5_tokenizer(out, WORDS, max_length=max_length))


def t5_text(tok: T5TokenizerFast, hidden: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tok), d_model=hidden, d_kv=8, d_ff=37, num_layers=1, num_heads=hidden // 8,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def vae(latent_channels: int = 4, flow: bool = False) -> AutoencoderKL:
    extra = dict(scaling_factor=0.5, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False) if flow else {}
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(4, 8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32, **extra,
    )  # fmt: skip


def sd15(out: Path) -> None:
    tok = clip_tokenizer(out.parent / f"_{out.name}_tok")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    StableDiffusionPipeline(
        vae=vae(),
        text_encoder=clip_text(tok, 12),
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(out)


def sdxl(out: Path) -> None:
    tok = clip_tokenizer(out.parent / f"_{out.name}_tok")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 4 + 8,
        cross_attention_dim=8 + 8, norm_num_groups=4,
    )  # fmt: skip
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    StableDiffusionXLPipeline(
        vae(), clip_text(tok, 8), clip_text(tok, 8, projection=True), tok, tok, unet, sched
    ).save_pretrained(out)


def sd3(out: Path, t5_limit: int = 64) -> None:
    tok = clip_tokenizer(out.parent / f"_{out.name}_tok")
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4,
    )  # fmt: skip
    t5tok = t5_tokenizer(out.parent / f"_{out.name}_t5", t5_limit)
    StableDiffusion3Pipeline(
        transformer, FlowMatchEulerDiscreteScheduler(shift=3.0), vae(flow=True), clip_text(tok, 16, True), tok,
        clip_text(tok, 16, True), tok, t5_text(t5tok, 32), t5tok,
    ).save_pretrained(out)  # fmt: skip


def flux(out: Path, t5_limit: int = 64) -> None:
    tok = clip_tokenizer(out.parent / f"_{out.name}_tok")
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 4, 8),
        guidance_embeds=True,
    )  # fmt: skip
    t5tok = t5_tokenizer(out.parent / f"_{out.name}_t5", t5_limit)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256)
    FluxPipeline(
        sched, vae(flow=True), clip_text(tok, 16), tok, t5_text(t5tok, 32), t5tok, transformer
    ).save_pretrained(out)


def chroma(out: Path) -> None:
    t5tok = t5_tokenizer(out.parent / f"_{out.name}_t5", 512)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(2, 2, 4), approximator_num_channels=16, approximator_hidden_dim=16,
        approximator_layers=1,
    )  # fmt: skip
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256)
    ChromaPipeline(sched, vae(flow=True), t5_text(t5tok, 32), t5tok, transformer).save_pretrained(out)


def toyworld_family(name: str):
    def build(out: Path) -> None:
        from difftune.toyworld.tiny_families import save_family_pipeline

        save_family_pipeline(out, name, seed=3)

    return build


PIPELINES = {
    "sd15": sd15, "sdxl": sdxl, "sd3": sd3, "flux": flux, "chroma": chroma,
    "qwen_image": toyworld_family("qwen_image"), "flux2_klein": toyworld_family("flux2_klein"),
    "z_image": toyworld_family("z_image"),
}  # fmt: skip


def build_pipelines(root: Path) -> None:
    for name, build in PIPELINES.items():
        if not (root / name / "model_index.json").exists():
            torch.manual_seed(1)
            build(root / name)


def picture(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """A coloured square on noise, `size` = (width, height), in `mode`."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    pixels[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = [(200, 30, 30), (30, 30, 200)][seed % 2]
    image = Image.fromarray(pixels)
    if mode == "I;16":
        return Image.fromarray((np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    return image.convert(mode)


def caption_folder(out: Path, n: int = 4, size: tuple[int, int] = (40, 40), ext: str = "png", **save) -> Path:
    """`n` images with .txt captions."""
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        picture(size, i).save(out / f"img{i}.{ext}", **save)
        (out / f"img{i}.txt").write_text(f"a photo of sks {['dog', 'cat'][i % 2]}")
    return out


def jsonl_folder(out: Path, n: int = 4) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        picture((32, 32), i).save(out / f"p{i}.png")
        rows.append({"file_name": f"p{i}.png", "text": f"a red circle {i}"})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out
