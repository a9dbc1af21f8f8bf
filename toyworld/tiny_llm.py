"""Tiny LLM text encoders and their tokenizers, as the 2026 image families use them: Qwen2.5-VL (Qwen-Image), Qwen3
(Flux.2 klein, Z-Image) and Mistral Small 3.1 (Flux.2 dev), built from configs with random weights.

`write_llm_tokenizer` writes a byte-level BPE tokenizer (`Qwen2Tokenizer`, the class Qwen's tokenizers load as) in
which every word the project uses, and every word of the families' prompt templates and system message, is one
token, as in the real vocabularies: Qwen-Image drops its template's first 34 tokens by position, so the template
must tokenize to the real count. Each chat template is the project's own, rendering what the real one renders for
a text-only conversation:
- ``qwen``: ChatML (`<|im_start|>role\\n...<|im_end|>\\n`), and with `enable_thinking=False` the empty think block
  Qwen3 appends after the generation prompt (Flux.2 klein asks for it; Z-Image does not).
- ``qwen_vl``: ``qwen`` with Qwen2.5-VL's image tokens (`<|vision_start|>`, `<|image_pad|>`, `<|vision_end|>`) and
  Qwen-Image-Edit's template words, which tokenize to the real 64 tokens the edit pipelines drop.
- ``mistral``: `<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]` over messages whose content is a list of
  text parts, as Flux.2's `format_input` builds them. The real Flux.2 dev ships a `PixtralProcessor`; its pipeline
  only calls `apply_chat_template` for text, which a tokenizer has, so the tiny pipeline carries the tokenizer
  (transformers' Pixtral image processor needs torchvision, which does not import here).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from difftune.toyworld.tiny_parts import WORDS

SPACE = "Ġ"  # byte-level BPE's mark of a leading space
# Every word of Qwen-Image's prompt template, Flux.2's system message and the chat roles: one token each.
TEMPLATE_WORDS = (
    "system", "user", "assistant", "Describe", "the", "image", "by", "detailing", "color", "shape", "size",
    "texture", "quantity", "text", "spatial", "relationships", "of", "objects", "and", "background",
    "You", "are", "an", "AI", "that", "reasons", "about", "descriptions", "give", "structured", "responses",
    "focusing", "on", "object", "attribution", "actions", "without", "speculation",
)  # fmt: skip
# ... and of Qwen-Image-Edit's (Plus: each input image is introduced as "Picture N:").
EDIT_TEMPLATE_WORDS = (
    "key", "features", "input", "objects", "then", "explain", "how", "instruction", "should", "alter", "or",
    "modify", "Generate", "new", "meets", "requirements", "while", "maintaining", "consistency", "with", "original",
    "where", "appropriate", "Picture",
)  # fmt: skip
EDIT_TEMPLATE_PIECES = (SPACE + "(", "'s", "),")  # one token each in Qwen's vocabulary: the template's 64 tokens
CHAT_TEMPLATES = {
    "qwen": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% set text = m['content'][0]['text'] %}"
        "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
        "{% else %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}"
    ),
}
SPECIAL_TOKENS = {
    "qwen": dict(pad="<|endoftext|>", eos="<|im_end|>", bos=None,
                 extra=("<|im_start|>", "<|im_end|>", "<think>", "</think>")),
    # Qwen2.5-VL's image tokens: the processor repeats <|image_pad|> once per merged patch of each image
    "qwen_vl": dict(pad="<|endoftext|>", eos="<|im_end|>", bos=None,
                    extra=("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>")),
    "mistral": dict(pad="<pad>", eos="</s>", bos="<s>",
                    extra=("<unk>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")),
}  # fmt: skip


def _chain(word: str, vocab: list[str], merges: list[tuple[str, str]]) -> None:
    """Merges that join `word`'s byte-level characters left to right into one token."""
    merged = word[0]
    for char in word[1:]:
        rule = (merged, char)
        merged += char
        if rule not in merges:
            merges.append(rule)
            vocab.append(merged)


def write_llm_tokenizer(
    out_dir: str | Path, style: str, words: tuple[str, ...] = WORDS, max_length: int = 1024
) -> Path:
    """Writes a `Qwen2Tokenizer` folder with `style`'s special tokens and chat template (``qwen`` or ``mistral``);
    returns the folder. Deterministic.

    Every merge of a space-led word comes before every merge of a bare word (a prompt's first word, or a role after
    a newline): a bare word's merges then never split a space-led word, whose pieces all start with the space."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = list(bytes_to_unicode().values()), []
    template_words = TEMPLATE_WORDS + (EDIT_TEMPLATE_WORDS if style == "qwen_vl" else ())
    all_words = tuple(dict.fromkeys(template_words + words))
    for word in all_words:
        _chain(SPACE + word, vocab, merges)
    for word in all_words:
        _chain(word, vocab, merges)
    for piece in EDIT_TEMPLATE_PIECES if style == "qwen_vl" else ():
        _chain(piece, vocab, merges)
    special = SPECIAL_TOKENS[style]
    names = [special["pad"], special["eos"], *([special["bos"]] if special["bos"] else []), *special["extra"]]
    vocab += list(dict.fromkeys(names))
    tokenizer = Qwen2Tokenizer(
        vocab={token: i for i, token in enumerate(dict.fromkeys(vocab))}, merges=merges, pad_token=special["pad"],
        eos_token=special["eos"], bos_token=special["bos"], unk_token=None, model_max_length=max_length,
        additional_special_tokens=list(special["extra"]),
    )  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATES[style.removesuffix("_vl")]
    tokenizer.save_pretrained(out)
    return out


def load_llm_tokenizer(style: str) -> Qwen2Tokenizer:
    """The project's `style` tokenizer, written to a temporary folder and read back."""
    with tempfile.TemporaryDirectory(prefix="difftune-llm-tok-") as tmp:
        return Qwen2Tokenizer.from_pretrained(write_llm_tokenizer(tmp, style))


def _text(vocab_size: int, hidden: int, layers: int, tokenizer) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip


def tiny_qwen25_vl(tokenizer, hidden: int = 16, layers: int = 2) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen-Image's text encoder: a Qwen2.5-VL (multimodal RoPE over three position sections) with a one-layer
    vision tower (14-pixel patches, 2x2 merged), which Qwen-Image-Edit reads its input images with and the
    text-to-image pipeline never calls."""
    vocab_size = len(tokenizer)
    text = _text(vocab_size, hidden, layers, tokenizer)
    text.pop("head_dim")  # Qwen2.5-VL derives it from the width and heads
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}  # sums to head_dim / 2
    vision = dict(depth=1, hidden_size=hidden, intermediate_size=hidden, num_heads=2, out_hidden_size=hidden,
                  fullatt_block_indexes=[0])  # fmt: skip
    # The image/video/vision token ids must lie in the vocabulary: a `qwen_vl` tokenizer's own (Qwen-Image-Edit reads
    # images), else the last id, which no text-only prompt contains.
    image, start, end = (
        tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")
    )
    if None in (image, start, end):
        image = start = end = vocab_size - 1
    ids = dict(image_token_id=image, video_token_id=vocab_size - 1, vision_start_token_id=start,
               vision_end_token_id=end)  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen3(tokenizer, hidden: int = 16, layers: int = 2, causal_lm: bool = False) -> Qwen3Model | Qwen3ForCausalLM:
    """Z-Image's text encoder (`Qwen3Model`) or Flux.2 klein's (`Qwen3ForCausalLM`); klein reads hidden layers
    9, 18 and 27, so its encoder needs at least 27 layers."""
    config = Qwen3Config(**_text(len(tokenizer), hidden, layers, tokenizer))
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval()


def tiny_mistral3(tokenizer, hidden: int = 16, layers: int = 31) -> Mistral3ForConditionalGeneration:
    """Flux.2 dev's text encoder: Mistral Small 3.1 (a Mistral language model with a Pixtral vision tower the
    text-to-image pipeline never calls). Flux.2 reads hidden layers 10, 20 and 30: at least 30 layers."""
    vocab_size = len(tokenizer)
    text = {"model_type": "mistral", **_text(vocab_size, hidden, layers, tokenizer), "sliding_window": None}
    vision = dict(model_type="pixtral", hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=hidden // 2, image_size=32, patch_size=8)  # fmt: skip
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=vocab_size - 1,
                            spatial_merge_size=2)  # fmt: skip
    return Mistral3ForConditionalGeneration(config).eval()
