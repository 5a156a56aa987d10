"""Offline test kit: tiny CLIP / Llama configs, a tokenizer trained in memory, a tiny processor, generated images.

Everything here builds in well under a second with no network, so tests, the demo and the benchmarks can exercise
the real code paths (``from_pretrained``, ``save_pretrained``, ``generate``) on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextImageProcessorPil,
    PreTrainedTokenizerFast,
)

from .model import (
    LlavaStfConfig,
    LlavaStfForConditionalGeneration,
    LlavaStfNextConfig,
    LlavaStfNextForConditionalGeneration,
    LlavaStfNextProcessor,
    LlavaStfProcessor,
)
from .model.builder import build_processor

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
IMAGE_TOKEN = "<image>"

# Small enough to be instant, deep enough for the default 8-block MBTF ([8, 7, ..., 1]), and an 8x8 patch grid so
# windows k in {1, 2, 4, 8} all tile it.
TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 4

_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is shown in the image? ASSISTANT: A red circle next to a blue square.",
    "What color is the triangle? Answer the question using a single word or phrase.",
    "How many shapes are there? There are three shapes: two circles and one square.",
    "Is there a green star in the image? Yes, there is. No, there is not.",
    "Describe the image briefly. The picture shows small objects on a grey background.",
    "left right top bottom center large small red green blue yellow purple orange white black",
    "zero one two three four five six seven eight nine 0 1 2 3 4 5 6 7 8 9 A B C D E F",
]


def tiny_tokenizer(
    vocab_size: int = 512, corpus: list[str] | None = None, with_image_token: bool = True, with_pad_token: bool = True
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in memory, with ``<unk> <s> </s> <pad> <image>`` and BOS prepended.

    ``with_image_token=False`` / ``with_pad_token=False`` give a plain LLM tokenizer (like Vicuna's), for code that
    must add those tokens itself.
    """
    specials = [
        t for t in SPECIAL_TOKENS if (with_image_token or t != IMAGE_TOKEN) and (with_pad_token or t != "<pad>")
    ]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or _CORPUS, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    extra: dict[str, Any] = {"extra_special_tokens": {"image_token": IMAGE_TOKEN}} if with_image_token else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>" if with_pad_token else None,
        padding_side="right",
        model_max_length=2048,
        **extra,
    )


def tiny_vision_config(**overrides: Any) -> CLIPVisionConfig:
    """CLIP-style tower: hidden 32, 9 blocks, 32 px images, patch 4 (8x8 grid + CLS)."""
    kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=9,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
        projection_dim=32,
    )
    kwargs.update(overrides)
    return CLIPVisionConfig(**kwargs)


def tiny_text_config(vocab_size: int, **overrides: Any) -> LlamaConfig:
    """Llama-style LLM: hidden 64, 2 layers, 4 heads (2 KV heads)."""
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_config(
    tokenizer: PreTrainedTokenizerFast | None = None,
    projector_type: str = "mbtf_stf",
    projector_kwargs: dict[str, Any] | None = None,
    vision_overrides: dict[str, Any] | None = None,
    **config_kwargs: Any,
) -> LlavaStfConfig:
    """A ``LlavaStfConfig`` over the tiny towers; the image token id comes from ``tokenizer``."""
    tokenizer = tokenizer or tiny_tokenizer()
    return LlavaStfConfig(
        vision_config=tiny_vision_config(**(vision_overrides or {})),
        text_config=tiny_text_config(len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_type=projector_type,
        projector_kwargs=projector_kwargs,
        **config_kwargs,
    )


def tiny_image_processor(image_size: int = TINY_IMAGE_SIZE) -> CLIPImageProcessorPil:
    """CLIP preprocessing (bicubic resize of the shortest edge, centre crop, CLIP mean/std) at ``image_size``."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


def tiny_processor(
    config: LlavaStfConfig, tokenizer: PreTrainedTokenizerFast | None = None, image_aspect_ratio: str = "pad"
) -> LlavaStfProcessor:
    """A processor matching ``config`` (placeholder count and image size)."""
    return LlavaStfProcessor(
        image_processor=tiny_image_processor(config.vision_config.image_size),
        tokenizer=tokenizer or tiny_tokenizer(),
        num_image_tokens=config.num_image_tokens,
        image_aspect_ratio=image_aspect_ratio,
    )


def tiny_model(config: LlavaStfConfig, seed: int = 0) -> LlavaStfForConditionalGeneration:
    """A randomly initialised model in eval mode (seeded, so two calls give the same weights)."""
    torch.manual_seed(seed)
    return LlavaStfForConditionalGeneration(config).eval()


def make_image(seed: int = 0, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    """A deterministic random-noise image of ``size`` (width, height) in PIL ``mode``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    return image if mode == "RGB" else image.convert(mode)


def save_tiny_checkpoint(
    path: str | Path, projector_type: str = "mbtf_stf", seed: int = 0, **projector_kwargs: Any
) -> Path:
    """Save a tiny model + processor to ``path`` (a folder ``from_pretrained`` can load) and return it."""
    path = Path(path)
    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer, projector_type, projector_kwargs or None)
    tiny_model(config, seed).save_pretrained(path)
    tiny_processor(config, tokenizer).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------ AnyRes (NeXT)
# 56-px crops with patch 7 (an 8x8 patch grid per crop, so k = 2 fusion gives 4x4), tiled up to 112x112.
TINY_NEXT_CROP = 56
TINY_NEXT_PATCH = 7
TINY_PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def tiny_next_config(
    tokenizer: PreTrainedTokenizerFast | None = None,
    projector_type: str = "mbtf_stf",
    projector_kwargs: dict[str, Any] | None = None,
    **config_kwargs: Any,
) -> LlavaStfNextConfig:
    """A ``LlavaStfNextConfig`` (AnyRes) over the tiny towers at 56-px crops, pinpoints ``TINY_PINPOINTS``."""
    tokenizer = tokenizer or tiny_tokenizer()
    config_kwargs.setdefault("image_grid_pinpoints", TINY_PINPOINTS)
    return LlavaStfNextConfig(
        vision_config=tiny_vision_config(image_size=TINY_NEXT_CROP, patch_size=TINY_NEXT_PATCH),
        text_config=tiny_text_config(len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_type=projector_type,
        projector_kwargs=projector_kwargs,
        **config_kwargs,
    )


def tiny_next_image_processor(
    crop: int = TINY_NEXT_CROP, pinpoints: list[list[int]] | None = None
) -> LlavaNextImageProcessorPil:
    """transformers' LLaVA-NeXT preprocessing at ``crop`` px crops over ``pinpoints``."""
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        image_grid_pinpoints=pinpoints or TINY_PINPOINTS,
    )


def tiny_next_processor(
    config: LlavaStfNextConfig, tokenizer: PreTrainedTokenizerFast | None = None
) -> LlavaStfNextProcessor:
    """An AnyRes processor matching ``config`` (crop size, pinpoints, per-crop grid, a vision reducer's budget): the
    builder's own ``build_processor`` over the tiny CLIP preprocessing."""
    return build_processor(config, tiny_image_processor(config.crop_size), tokenizer or tiny_tokenizer())


def tiny_next_model(config: LlavaStfNextConfig, seed: int = 0) -> LlavaStfNextForConditionalGeneration:
    """A randomly initialised AnyRes model in eval mode (seeded)."""
    torch.manual_seed(seed)
    return LlavaStfNextForConditionalGeneration(config).eval()


def save_tiny_next_checkpoint(path: str | Path, projector_type: str = "mbtf_stf", seed: int = 0) -> Path:
    """Save a tiny AnyRes model + processor to ``path`` and return it."""
    path = Path(path)
    tokenizer = tiny_tokenizer()
    config = tiny_next_config(tokenizer, projector_type)
    tiny_next_model(config, seed).save_pretrained(path)
    tiny_next_processor(config, tokenizer).save_pretrained(path)
    return path
