"""Assemble a fresh LLaVA-STF model from a vision-tower checkpoint and an LLM checkpoint (name or local path).

This is the start of stage 1: ``openai/clip-vit-large-patch14-336`` + ``lmsys/vicuna-7b-v1.5`` (or any CLIP-style
tower and causal LM that transformers loads). The builder adds the ``<image>`` token (and a pad token if the LLM
has none, reusing ``<unk>`` as LLaVA does), resizes the embeddings, creates a freshly initialised projector, and
returns the model with the matching processor. It freezes nothing: what trains is the training stage's business.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessorPil, CLIPVisionModel
from transformers.modeling_utils import set_zero3_state

from .configuration_llava_stf import LlavaStfConfig
from .modeling_llava_stf import LlavaStfForConditionalGeneration, build_projector
from .processing_llava_stf import LlavaStfProcessor
from .reducers import budget_kwargs, install_llm_reducer

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"


def prepare_tokenizer(tokenizer) -> int:
    """Add ``<image>`` as a special token (and a pad token if missing); return the image token id."""
    if tokenizer.pad_token is None:
        # LLaVA-1.5 pads with <unk> (id 0 for Llama); keep that instead of growing the vocabulary.
        tokenizer.pad_token = tokenizer.unk_token
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def build_model(
    vision_tower: str,
    llm: str,
    projector_type: str = "mbtf_stf",
    projector_kwargs: dict[str, Any] | None = None,
    vision_feature_layer: int | list[int] | None = None,
    reducer_type: str | None = None,
    reducer_kwargs: dict[str, Any] | None = None,
    reducer_tokens: int | None = None,
    image_aspect_ratio: str = "square",
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    pad_to_multiple_of: int = 64,
    model_max_length: int = 2048,
) -> tuple[LlavaStfForConditionalGeneration, LlavaStfProcessor]:
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
        image_aspect_ratio: processor image mode, ``"square"`` (stage 1) or ``"pad"`` (stage 2 and eval).
        dtype: load dtype for both towers (``None``: float32).
        attn_implementation: e.g. ``"sdpa"``; ``None`` lets transformers choose.
        pad_to_multiple_of: embedding rows are padded to a multiple of this (llava-hf uses 64: 32064 rows).
        model_max_length: tokenizer length limit recorded in the processor.

    Returns:
        ``(model, processor)``; every parameter trainable, the model in train mode as transformers leaves it.
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

    config = LlavaStfConfig(
        vision_config=vision.config.to_dict(),
        text_config=language.config.to_dict(),
        image_token_index=image_token_id,
        projector_type=projector_type,
        projector_kwargs=projector_kwargs,
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=bool(getattr(language.config, "tie_word_embeddings", False)),
    )
    if reducer_tokens is not None:
        if reducer_type is None or reducer_kwargs is not None:
            raise ValueError("reducer_tokens needs a reducer_type and chooses its settings itself (no reducer_kwargs)")
        reducer_kwargs = budget_kwargs(reducer_type, reducer_tokens, config.reducer_shapes())
        logger.info("reducer %s @ %d tokens: %s", reducer_type, reducer_tokens, reducer_kwargs)
    config = config.with_reducer(reducer_type, reducer_kwargs) if reducer_type is not None else config
    # Build the shell on the meta device, then move the loaded towers in: nothing 7B-sized is allocated twice.
    # set_zero3_state: under DeepSpeed ZeRO-3, keep transformers from wrapping the shell's sub-models in zero.Init
    # (it cannot partition meta tensors); the towers loaded above are partitioned already, the projector later.
    with torch.device("meta"), set_zero3_state():
        model = LlavaStfForConditionalGeneration(config)
    model.model.vision_tower = vision
    # An in-LLM reducer (FastV) turns the loaded decoder into its TokenDropLlamaModel (same modules and weights).
    model.model.language_model = install_llm_reducer(language.get_decoder(), model.model.reducer)
    model.lm_head = language.get_output_embeddings()
    projector = build_projector(config).to(dtype=load_kwargs["dtype"])
    projector.reset_parameters()
    model.model.multi_modal_projector = projector
    model.generation_config = language.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if config.tie_word_embeddings:
        model.tie_weights()

    processor = LlavaStfProcessor(
        image_processor=CLIPImageProcessorPil.from_pretrained(vision_tower),
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        image_aspect_ratio=image_aspect_ratio,
    )
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
