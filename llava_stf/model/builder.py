"""Assemble a fresh LLaVA-STF model from a vision-tower checkpoint and an LLM checkpoint (name or local path).

This is the start of stage 1: ``openai/clip-vit-large-patch14-336`` + ``lmsys/vicuna-7b-v1.5`` (or any CLIP-style
tower and causal LM that transformers loads). The builder adds the ``<image>`` token (and a pad token if the LLM
has none, reusing ``<unk>`` as LLaVA does), resizes the embeddings, creates a freshly initialised projector, and
returns the model with the matching processor. It freezes nothing: what trains is the training stage's business.
With ``image_grid_pinpoints`` it builds the AnyRes (LLaVA-NeXT) model instead: ``LlavaStfNextConfig``, its
generation class (``generation_class(config)``), a freshly initialised ``image_newline`` and a
``LlavaStfNextProcessor`` whose ``LlavaNextImageProcessorPil`` takes the CLIP processor's resize and normalisation.
:func:`build_processor` (the processor for a config) is shared with ``llava_stf.convert``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    LlavaNextImageProcessorPil,
)
from transformers.modeling_utils import set_zero3_state

from .configuration_llava_stf import LlavaStfConfig
from .configuration_llava_stf_next import LlavaStfNextConfig
from .modeling_llava_stf import LlavaStfForConditionalGeneration, build_projector
from .modeling_llava_stf_next import LlavaStfNextForConditionalGeneration, generation_class
from .processing_llava_stf import LlavaStfProcessor
from .processing_llava_stf_next import LlavaStfNextProcessor
from .reducers import budget_kwargs, install_llm_reducer

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
# CLIP preprocessing settings an AnyRes image processor takes over (each crop is preprocessed as CLIP does).
CLIP_SETTINGS = (
    "do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std",
)  # fmt: skip


def prepare_tokenizer(tokenizer) -> int:
    """Add ``<image>`` as a special token (and a pad token if missing); return the image token id."""
    if tokenizer.pad_token is None:
        # LLaVA-1.5 pads with <unk> (id 0 for Llama); keep that instead of growing the vocabulary.
        tokenizer.pad_token = tokenizer.unk_token
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def anyres_image_processor(
    image_processor: CLIPImageProcessorPil, image_grid_pinpoints: list[list[int]]
) -> LlavaNextImageProcessorPil:
    """transformers' LLaVA-NeXT preprocessing with a CLIP processor's resize, crop and normalisation + the pinpoints."""
    settings = image_processor.to_dict()
    kept = {k: settings[k] for k in CLIP_SETTINGS if settings.get(k) is not None}
    return LlavaNextImageProcessorPil(**kept, image_grid_pinpoints=[list(p) for p in image_grid_pinpoints])


def build_processor(
    config: LlavaStfConfig, image_processor: CLIPImageProcessorPil, tokenizer, image_aspect_ratio: str | None = None
) -> LlavaStfProcessor:
    """The processor for ``config``: ``LlavaStfProcessor``, or ``LlavaStfNextProcessor`` for an AnyRes config.

    Args:
        config: the model's config (its placeholder count; for AnyRes its pinpoints and ``crop_grid``).
        image_processor: the vision tower's CLIP image processor.
        tokenizer: a tokenizer that has ``<image>`` (see :func:`prepare_tokenizer`).
        image_aspect_ratio: ``"square"`` (the default) or ``"pad"``; an AnyRes model tiles (``"anyres"``, the only
            mode it takes).

    Raises:
        ValueError: an image mode the config's model family does not take.
    """
    if not config.anyres:
        return LlavaStfProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            num_image_tokens=config.num_image_tokens,
            image_aspect_ratio=image_aspect_ratio or "square",
        )
    if image_aspect_ratio not in (None, "anyres"):
        raise ValueError(
            f"image_aspect_ratio={image_aspect_ratio!r} is for LLaVA-1.5 models; an AnyRes model "
            "(image_grid_pinpoints) tiles every image: its processor's mode is 'anyres'"
        )
    grid = config.crop_grid
    return LlavaStfNextProcessor(
        image_processor=anyres_image_processor(image_processor, config.image_grid_pinpoints),
        tokenizer=tokenizer,
        crop_grid=[grid.rows, grid.cols, grid.cell],
        reduced_crop_tokens=config.reduced_crop_tokens,  # a vision-side reducer's per-crop budget (else None)
    )


def build_model(
    vision_tower: str,
    llm: str,
    projector_type: str = "mbtf_stf",
    projector_kwargs: dict[str, Any] | None = None,
    vision_feature_layer: int | list[int] | None = None,
    reducer_type: str | None = None,
    reducer_kwargs: dict[str, Any] | None = None,
    reducer_tokens: int | None = None,
    image_aspect_ratio: str | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    pad_to_multiple_of: int = 64,
    model_max_length: int = 2048,
    image_grid_pinpoints: list[list[int]] | None = None,
) -> tuple[LlavaStfForConditionalGeneration | LlavaStfNextForConditionalGeneration, LlavaStfProcessor]:
    """Load both towers, add the image token and build the model and processor.

    Args:
        vision_tower: CLIP checkpoint (hub id or folder); a full CLIP or a vision-only checkpoint.
        llm: causal LM checkpoint (hub id or folder) with its tokenizer.
        projector_type: registry name; see ``llava_stf.model.PROJECTORS``.
        projector_kwargs: projector settings (``None`` values are resolved from the shapes).
        vision_feature_layer: hidden-state indices to read; ``None`` uses the projector's default.
        reducer_type: optional token reducer (``prumerge``, ``prumerge_plus``, ``fastv``); see ``model.reducers``.
        reducer_kwargs: the reducer's settings.
        reducer_tokens: a token budget instead of ``reducer_kwargs``: the reducer's own rule for that many image
            tokens (``model.reducers.budget_kwargs``).
        image_aspect_ratio: processor image mode, ``"square"`` (stage 1, the default) or ``"pad"`` (stage 2 and
            eval); an AnyRes model takes only ``"anyres"`` (or ``None``).
        dtype: load dtype for both towers (``None``: float32).
        attn_implementation: e.g. ``"sdpa"``; ``None`` lets transformers choose.
        pad_to_multiple_of: embedding rows are padded to a multiple of this (llava-hf uses 64: 32064 rows).
        model_max_length: tokenizer length limit recorded in the processor.
        image_grid_pinpoints: ``[[height, width], ...]`` in pixels (multiples of the tower's image size): build the
            AnyRes (LLaVA-NeXT) model, ``LlavaStfNextForConditionalGeneration`` + ``LlavaStfNextProcessor``.

    Returns:
        ``(model, processor)``; every parameter trainable, the model in train mode as transformers leaves it.

    Raises:
        ValueError: settings that do not fit together (a reducer budget with explicit settings, an image mode the
            model family does not take); the config's own errors (``ProjectorConfigError``).
    """
    load_kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if attn_implementation:
        load_kwargs["attn_implementation"] = attn_implementation
    vision = CLIPVisionModel.from_pretrained(vision_tower, **load_kwargs)
    language = AutoModelForCausalLM.from_pretrained(llm, **load_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(llm, model_max_length=model_max_length, padding_side="right")
    image_token_id = prepare_tokenizer(tokenizer)
    if len(tokenizer) > language.get_input_embeddings().weight.shape[0]:
        language.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of)

    config_class, anyres = LlavaStfConfig, {}
    if image_grid_pinpoints is not None:
        config_class, anyres = LlavaStfNextConfig, {"image_grid_pinpoints": image_grid_pinpoints}
    config = config_class(
        vision_config=vision.config.to_dict(),
        text_config=language.config.to_dict(),
        image_token_index=image_token_id,
        projector_type=projector_type,
        projector_kwargs=projector_kwargs,
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=bool(getattr(language.config, "tie_word_embeddings", False)),
        **anyres,
    )
    if reducer_tokens is not None:
        if reducer_type is None or reducer_kwargs is not None:
            raise ValueError("reducer_tokens needs a reducer_type and chooses its settings itself (no reducer_kwargs)")
        reducer_kwargs = budget_kwargs(reducer_type, reducer_tokens, config.reducer_shapes())
        logger.info("reducer %s @ %d tokens: %s", reducer_type, reducer_tokens, reducer_kwargs)
    config = config.with_reducer(reducer_type, reducer_kwargs) if reducer_type is not None else config
    image_processor = CLIPImageProcessorPil.from_pretrained(vision_tower)
    processor = build_processor(config, image_processor, tokenizer, image_aspect_ratio)
    # Build the shell on the meta device, then move the loaded towers in: nothing 7B-sized is allocated twice.
    # set_zero3_state: under DeepSpeed ZeRO-3, keep transformers from wrapping the shell's sub-models in zero.Init
    # (it cannot partition meta tensors); the towers loaded above are partitioned already, the projector later.
    with torch.device("meta"), set_zero3_state():
        model = generation_class(config)(config)
    model.model.vision_tower = vision
    # An in-LLM reducer (FastV) turns the loaded decoder into its TokenDropLlamaModel (same modules and weights).
    model.model.language_model = install_llm_reducer(language.get_decoder(), model.model.reducer)
    model.lm_head = language.get_output_embeddings()
    projector = build_projector(config).to(dtype=load_kwargs["dtype"])
    projector.reset_parameters()
    model.model.multi_modal_projector = projector
    if config.anyres:  # LLaVA-NeXT's row separator, initialised as transformers does: normal, std 1/sqrt(D)
        width = config.text_config.hidden_size
        newline = torch.randn(width, dtype=load_kwargs["dtype"]) / math.sqrt(width)
        model.model.image_newline = nn.Parameter(newline)
    model.generation_config = language.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if config.tie_word_embeddings:
        model.tie_weights()

    n_proj = sum(p.numel() for p in projector.parameters())
    logger.info(
        "built %s: vision %s, llm %s, projector %s (%d params, %d image tokens)",
        type(model).__name__,
        vision_tower,
        llm,
        projector_type,
        n_proj,
        config.num_image_tokens,
    )
    return model, processor
