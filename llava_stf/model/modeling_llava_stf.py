"""``LlavaStfForConditionalGeneration``: transformers' LLaVA with the projector and token reducer from registries.

The forward pass, the image/text merge (one ``masked_scatter`` of projector rows into ``<image>`` placeholders),
generation and the KV cache are transformers' own. This file builds the parts and overrides public hooks only:

- construction: the projector comes from ``PROJECTORS``; with an in-LLM reducer (FastV) the language model is a
  :class:`~.reducers.TokenDropLlamaModel` (same modules and parameter names), which removes image tokens itself;
- ``get_image_features``: with a vision-side reducer (PruMerge) each image gets its own number of tokens (the public
  ``pooler_output`` list). Prompts must then hold exactly that many placeholders per image: ``Generator`` and the
  trainer write them (``llava_stf.data.placeholders``); nothing downstream is patched;
- ``forward``: with an in-LLM reducer it tells the language model where the image tokens are and where the prompt
  ends (``prompt_length``, which ``generate`` adds), around the stock forward;
- ``get_placeholder_mask``: the stock check, with a message saying how many placeholders this model needs;
- ``_init_weights``: PyTorch's default init for the projector's layers (what LLaVA and the LLaVA-STF release train
  from), transformers' own for everything else.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration, LlavaModel, LlavaPreTrainedModel

from .configuration_llava_stf import LlavaStfConfig
from .projectors import Projector, get_projector_class
from .reducers import TokenDropLlamaModel, build_reducer, install_llm_reducer


def build_projector(config: LlavaStfConfig) -> Projector:
    """Instantiate ``config.projector_type`` with its resolved settings and the model shapes."""
    cls = get_projector_class(config.projector_type)
    return cls(
        config.projector_params(),
        config.projector_shapes(),
        act=config.projector_hidden_act,
        bias=config.multimodal_projector_bias,
    )


def init_projector_layer(model: nn.Module, module: nn.Module) -> bool:
    """PyTorch's default init when ``module`` is one of ``model``'s projector layers; ``False`` otherwise.

    transformers initialises children before parents and, for code outside its own package, skips containers
    without parameters of their own (a Projector), so the projector's layers are recognised one by one.
    ``Projector.reset_parameters`` uses transformers' init functions, which leave loaded tensors alone.
    """
    projector = getattr(model, "multi_modal_projector", None)
    if isinstance(projector, Projector) and any(module is layer for layer in projector.modules()):
        projector.reset_parameters(module)
        return True
    return False


class LlavaStfPreTrainedModel(LlavaPreTrainedModel):
    config_class = LlavaStfConfig
    config: LlavaStfConfig

    def _init_weights(self, module: nn.Module) -> None:
        if not init_projector_layer(self, module):
            super()._init_weights(module)


class StfModelHooks:
    """The hooks LLaVA-STF overrides on a transformers multimodal base model (``LlavaModel``, ``LlavaNextModel``).

    A mixin placed before the transformers class, so ``super()`` is always transformers' own method.
    """

    config: LlavaStfConfig

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        prompt_length: int | None = None,
        **kwargs,
    ):
        """transformers' ``LlavaModel.forward``; with an in-LLM reducer, inside its language model's ``reducing``.

        Args:
            input_ids, pixel_values, attention_mask, position_ids, cache, inputs_embeds: as in
                ``LlavaModel.forward`` (``[B, T]``, ``[n_images, 3, H, W]``, ``[B, past + T]``, ...).
            prompt_length: prompt length in tokens; FastV ranks with the last prompt token (``generate`` passes it,
                so that generation without a KV cache prunes the same tokens as with one). ``None``: the last
                real token of the input.
        """
        inputs = dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
        inputs.update(position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        if cache is not None:
            inputs["cache"] = cache
        if not isinstance(self.language_model, TokenDropLlamaModel):
            return super().forward(**inputs)
        if input_ids is not None:
            image_mask = input_ids == self.config.image_token_id
        else:
            image_embed = self.get_input_embeddings().weight[self.config.image_token_id]
            image_mask = (inputs_embeds == image_embed.to(inputs_embeds.dtype)).all(-1)
        with self.language_model.reducing(image_mask, prompt_length):
            return super().forward(**inputs)

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """The stock ``[B, T, 1]`` placeholder mask; a count mismatch says what this model needs per image.

        Args:
            input_ids: ``[B, T]`` or ``None`` (then placeholders are found by their embedding).
            inputs_embeds: ``[B, T, D]``.
            image_features: ``[sum of tokens over images, D]``.
        """
        try:
            return super().get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)
        except ValueError as err:
            raise ValueError(f"{err} ({self._placeholder_hint(int(image_features.shape[0]))})") from None

    def _placeholder_hint(self, rows: int) -> str:
        config, per_image = self.config, self.config.num_image_tokens
        source = f"projector '{config.projector_type}'"
        if config.reducer_type is not None:
            source += f" with reducer '{config.reducer_type}'"
        if config.anyres:
            layout = "unpadded, plus newlines" if config.reduced_crop_tokens is None else "no newlines"
            return (
                f"{rows} image feature rows: AnyRes with {source} gives each image its own count (crops + base "
                f"image, {per_image} tokens each, {layout}): config.image_token_count(height, width); "
                "expand each <image> with the LlavaStfNextProcessor at the model's reduced_crop_tokens"
            )
        if config.adaptive_image_tokens:
            return (
                f"{rows} image feature rows: {source} gives each image its own number of tokens (at most "
                f"{per_image}); write each image's count from get_image_features, as llava_stf.generation.Generator "
                "and llava_stf.data.placeholders.fit_image_placeholders do"
            )
        return (
            f"{rows} image feature rows: {source} needs {per_image} placeholder ids {config.image_token_id} per image, "
            f"so {rows // max(per_image, 1)} image(s) need {rows}; expand each <image> with the LlavaStfProcessor"
        )


class LlavaStfModel(StfModelHooks, LlavaStfPreTrainedModel, LlavaModel):
    """Vision tower + registry projector + LLM backbone (no LM head), with an optional token reducer."""

    def __init__(self, config: LlavaStfConfig):
        # Build each part once (calling LlavaModel.__init__ would build the stock projector first).
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = build_projector(config)
        self.reducer = build_reducer(config.reducer_type, config.reducer_kwargs, config.reducer_shapes())
        self.language_model = install_llm_reducer(AutoModel.from_config(config.text_config), self.reducer)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs):
        """Projected image tokens: ``pooler_output`` is a list of ``[tokens_i, D]``, one per image.

        Args:
            pixel_values: ``[n_images, 3, H, W]``.

        With a vision-side reducer (PruMerge) each image has its own adaptive number of tokens ``tokens_i``.
        """
        if self.reducer is None or self.reducer.stage != "vision":
            return super().get_image_features(pixel_values=pixel_values, **kwargs)
        for name in ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name} is not supported with reducer_type '{self.config.reducer_type}'")
        outputs, tokens, valid = self.reducer.reduce_tower(self.vision_tower, pixel_values, self.config.vision_layers)
        projected = self.multi_modal_projector(tokens[valid][None])[0]  # per-token projector, real rows only
        outputs.pooler_output = list(projected.split(valid.sum(dim=1).tolist()))
        return outputs


class StfGenerationHooks:
    """``generate`` hooks of the LLaVA-STF generation classes (a mixin before the transformers class)."""

    def generate(self, *args, **kwargs):
        """transformers' ``generate``; with an in-LLM reducer it also passes ``prompt_length`` (see the model)."""
        if isinstance(self.model.language_model, TokenDropLlamaModel) and kwargs.get("prompt_length") is None:
            prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            prompt = kwargs.get("inputs_embeds") if prompt is None else prompt
            if prompt is not None:
                kwargs["prompt_length"] = prompt.shape[1]
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args, prompt_length: int | None = None, **kwargs):
        """transformers' preparation; ``prompt_length`` (a model input of ours) is passed on to every step."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if prompt_length is not None:
            inputs["prompt_length"] = prompt_length
        return inputs


class LlavaStfForConditionalGeneration(StfGenerationHooks, LlavaStfPreTrainedModel, LlavaForConditionalGeneration):
    """LLaVA-STF for generation and training: ``forward``/``generate`` are transformers' ``Llava`` ones."""

    def __init__(self, config: LlavaStfConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = LlavaStfModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


__all__ = [
    "LlavaStfForConditionalGeneration",
    "LlavaStfModel",
    "LlavaStfPreTrainedModel",
    "StfGenerationHooks",
    "StfModelHooks",
    "build_projector",
    "init_projector_layer",
]
