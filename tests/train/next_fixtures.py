"""A stand-in for ``build_model(..., image_grid_pinpoints=...)`` while the builder cannot build AnyRes models.

``use_anyres_builder(monkeypatch)`` leaves ``llava_stf.train.run.build_model`` alone when the real builder takes
``image_grid_pinpoints``; otherwise it routes calls that pass pinpoints to ``build_next_model`` (the builder's steps
for a ``LlavaStfNextConfig``: both towers loaded, ``<image>`` and pad token added, a fresh projector, an AnyRes
processor over the tower's crop size) and every other call to the real builder.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel, LlavaNextImageProcessorPil

from llava_stf.model import LlavaStfNextConfig, LlavaStfNextForConditionalGeneration, LlavaStfNextProcessor, builder
from llava_stf.train import run as run_module


def build_next_model(
    vision_tower: str,
    llm: str,
    projector_type: str = "mbtf_stf",
    projector_kwargs: dict[str, Any] | None = None,
    vision_feature_layer: int | list[int] | None = None,
    image_grid_pinpoints: list[list[int]] | None = None,
    dtype: torch.dtype | None = None,
    model_max_length: int = 2048,
    **_: Any,
) -> tuple[LlavaStfNextForConditionalGeneration, LlavaStfNextProcessor]:
    vision = CLIPVisionModel.from_pretrained(vision_tower, dtype=dtype or torch.float32)
    language = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(llm, model_max_length=model_max_length, padding_side="right")
    image_token_id = builder.prepare_tokenizer(tokenizer)
    if len(tokenizer) > language.get_input_embeddings().weight.shape[0]:
        language.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    config = LlavaStfNextConfig(
        vision_config=vision.config.to_dict(),
        text_config=language.config.to_dict(),
        image_token_index=image_token_id,
        projector_type=projector_type,
        projector_kwargs=projector_kwargs,
        vision_feature_layer=vision_feature_layer,
        image_grid_pinpoints=image_grid_pinpoints,
    )
    model = LlavaStfNextForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = language.get_decoder()
    model.lm_head = language.get_output_embeddings()
    model.generation_config = language.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    crop, grid = config.crop_size, config.crop_grid
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    processor = LlavaStfNextProcessor(image_processor, tokenizer, crop_grid=[grid.rows, grid.cols, grid.cell])
    return model.train(), processor


def use_anyres_builder(monkeypatch) -> None:
    """Route AnyRes builds to ``build_next_model`` unless the real builder already takes ``image_grid_pinpoints``."""
    real = run_module.build_model
    if "image_grid_pinpoints" in inspect.signature(real).parameters:
        return

    def build(*args: Any, image_grid_pinpoints: list[list[int]] | None = None, **kwargs: Any):
        if image_grid_pinpoints is None:
            return real(*args, **kwargs)
        return build_next_model(*args, image_grid_pinpoints=image_grid_pinpoints, **kwargs)

    monkeypatch.setattr(run_module, "build_model", build)
