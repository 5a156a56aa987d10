"""``LlavaStfForConditionalGeneration``: transformers' LLaVA with the projector (and token reducer) from registries.

Without a token reducer only construction and the placeholder check differ from the parent classes: the forward pass,
the image/text merge (one ``masked_scatter`` of projector rows into ``<image>`` placeholder positions), generation and
the KV cache are transformers' own. Because every projector returns ``[B, M, D_text]``, the stock
``get_image_features`` works for token-reducing projectors; only the number of placeholders the processor writes
changes (``config.num_image_tokens``).

With ``config.reducer_type`` set, ``LlavaStfModel.forward`` takes the reducer path: a vision-side reducer (PruMerge)
runs between the tower and the projector and its unused placeholders are dropped before the first LLM layer; an
in-LLM reducer (FastV) drops image tokens at its layer. Both go through ``reducers.forward_with_drop``, which drives
the language model's own layers (see that module for the mechanism and its KV-cache handling).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaModelOutputWithPast,
    LlavaPreTrainedModel,
)
from transformers.utils import can_return_tuple

from .configuration_llava_stf import LlavaStfConfig
from .projectors import Projector, get_projector_class
from .reducers import DROP_STATE, build_reducer, forward_with_drop


def build_projector(config: LlavaStfConfig) -> Projector:
    """Instantiate ``config.projector_type`` with its resolved settings and the model shapes."""
    cls = get_projector_class(config.projector_type)
    return cls(
        config.projector_params(),
        config.projector_shapes(),
        act=config.projector_hidden_act,
        bias=config.multimodal_projector_bias,
    )


class LlavaStfPreTrainedModel(LlavaPreTrainedModel):
    config_class = LlavaStfConfig
    config: LlavaStfConfig

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers treats this package as custom code and then skips modules without direct parameters (such
        # as a Projector), so reset_parameters would never run. Our _init_weights only uses transformers' guarded
        # init functions (loaded tensors are left alone), so that shortcut is not needed.
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module: nn.Module) -> None:
        # Children are initialised before their parent, so this replaces the generic normal(0.02) init of the
        # projector's layers with PyTorch's default (what LLaVA and the LLaVA-STF release train from). Tensors
        # loaded from a checkpoint are flagged by transformers and left alone.
        if isinstance(module, Projector):
            module.reset_parameters()
            return
        super()._init_weights(module)


class LlavaStfModel(LlavaStfPreTrainedModel, LlavaModel):
    """Vision tower + registry projector + LLM backbone (no LM head)."""

    def __init__(self, config: LlavaStfConfig):
        # Build each part once (calling LlavaModel.__init__ would build the stock projector first).
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = build_projector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.reducer = build_reducer(config)  # parameter-free; None without config.reducer_type
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Projected image tokens; ``pooler_output`` is a list of ``[tokens_i, D]``, one per image.

        With a vision-side reducer (PruMerge) each image has its own adaptive number of tokens.
        """
        if self.reducer is None or self.reducer.stage != "vision":
            return super().get_image_features(pixel_values=pixel_values, **kwargs)
        hidden = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        features = torch.cat([hidden[i][:, 1:] for i in self.config.vision_layers], dim=-1)
        block = self.reducer.block_index(len(hidden) - 1)
        tokens, valid = self.reducer(features, hidden[block], self.vision_tower.encoder.layers[block])
        if tokens.shape[1] > self.config.num_image_tokens:
            raise ValueError(
                f"reducer returned {tokens.shape[1]} tokens per image but only {self.config.num_image_tokens} "
                "placeholders exist"
            )
        projected = self.multi_modal_projector(tokens[valid][None])[0]  # per-token projector, real rows only
        return BaseModelOutputWithPooling(pooler_output=list(projected.split(valid.sum(dim=1).tolist())))

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        prompt_length: int | None = None,
        **kwargs,
    ) -> LlavaModelOutputWithPast:
        """transformers' ``LlavaModel.forward``, or, with a token reducer, the same contract with tokens dropped.

        Args:
            input_ids, pixel_values, attention_mask, position_ids, past_key_values, inputs_embeds: as in
                ``LlavaModel.forward`` (``[B, T]``, ``[n_images, 3, H, W]``, ``[B, past + T]``, ...).
            prompt_length: prompt length in tokens; FastV ranks with the last prompt token (``generate`` passes it,
                so that generation without a KV cache prunes the same tokens as with one). ``None``: the last
                non-padding token of the input.

        Returns:
            ``last_hidden_state [B, T, D]`` (input length kept), ``past_key_values``, ``image_hidden_states``.
        """
        inputs = dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
        inputs.update(position_ids=position_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds)
        if self.reducer is None:
            return super().forward(**inputs, **kwargs)
        return self._reduced_forward(prompt_length=prompt_length, **inputs, **kwargs)

    def _reduced_forward(
        self,
        input_ids,
        pixel_values,
        attention_mask,
        position_ids,
        past_key_values,
        inputs_embeds,
        prompt_length,
        use_cache=None,
        mm_encoder_outputs=None,
        **kwargs,
    ) -> LlavaModelOutputWithPast:
        for name in ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes"):
            if kwargs.pop(name, None) is not None:
                raise ValueError(f"{name} is not supported with reducer_type '{self.config.reducer_type}'")
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values=pixel_values)
        if image_outputs is not None and getattr(past_key_values, DROP_STATE, None) is not None:
            raise ValueError("images cannot be added to a KV cache whose tokens were already reduced")
        lm = self.language_model
        use_cache = lm.config.use_cache if use_cache is None else use_cache
        use_cache = use_cache and not (lm.gradient_checkpointing and self.training)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_features = keep = None
        image_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        if image_outputs is not None:
            merged = self._merge_images(input_ids, inputs_embeds, image_outputs)
            inputs_embeds, image_mask, keep, image_features = merged
        lm_inputs = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values)
        lm_inputs.update(use_cache=use_cache, **kwargs)
        if self.reducer.stage == "vision":
            drop = keep is not None and not bool(keep.all())
            out = forward_with_drop(
                lm, inputs_embeds, **lm_inputs, drop_layer=0 if drop else None, keep=keep if drop else None,
                compact_positions=True,
            )  # fmt: skip
        else:
            layer = self.reducer.prune_layer(lm.config.num_hidden_layers) if bool(image_mask.any()) else None
            query = self._query_index(attention_mask, inputs_embeds, past_key_values, prompt_length)

            def keep_fn(hidden, block, position_embeddings, mask_2d):
                scores = self.reducer.scores(hidden, block, position_embeddings, mask_2d, query)
                return self.reducer.keep_mask(scores, image_mask)

            out = forward_with_drop(lm, inputs_embeds, **lm_inputs, drop_layer=layer, keep_fn=keep_fn)
        return LlavaModelOutputWithPast(
            last_hidden_state=out.last_hidden_state,
            past_key_values=out.past_key_values,
            image_hidden_states=image_features,
        )

    def _merge_images(self, input_ids, inputs_embeds, image_outputs):
        """Scatter the image tokens into their placeholders.

        Returns:
            ``(inputs_embeds [B, T, D], image_mask [B, T], keep [B, T] or None, image_features [n, D])``; ``keep``
            (vision-side reducers) marks every position except the placeholders left unused by each image's
            adaptive count, which must be dropped before the first LLM layer.
        """
        per_image = list(image_outputs.pooler_output)  # [tokens_i, D] each
        image_features = torch.cat(per_image).to(inputs_embeds.device, inputs_embeds.dtype)
        padded, keep = image_features, None
        if self.reducer.stage == "vision":  # image i fills the first tokens_i of its placeholders
            slots, device = self.config.num_image_tokens, inputs_embeds.device
            lengths = torch.tensor([len(t) for t in per_image], device=device)
            valid = (torch.arange(slots, device=device)[None] < lengths[:, None]).flatten()
            padded = image_features.new_zeros(len(per_image) * slots, image_features.shape[-1])
            padded = padded.masked_scatter(valid[:, None], image_features)
        mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=padded)
        image_mask = mask[..., 0]
        if self.reducer.stage == "vision":
            keep = (~image_mask).masked_scatter(image_mask, valid)
        return inputs_embeds.masked_scatter(mask, padded), image_mask, keep, image_features

    @staticmethod
    def _query_index(attention_mask, inputs_embeds, past_key_values, prompt_length: int | None) -> torch.Tensor:
        """``[B]`` index in this input of each row's last prompt token (its last real one up to the prompt end)."""
        (b, length), device = inputs_embeds.shape[:2], inputs_embeds.device
        if attention_mask is None:
            end = length if prompt_length is None else min(prompt_length, length)
            return torch.full((b,), end - 1, dtype=torch.long, device=device)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        mask = attention_mask[:, past:].bool()
        if prompt_length is not None:
            mask = mask[:, :prompt_length]
        return mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Boolean mask ``[B, T, 1]`` of placeholder positions; raises when their count differs from the features.

        Args:
            input_ids: ``[B, T]`` or ``None`` (then placeholders are found by their embedding).
            inputs_embeds: ``[B, T, D]``.
            image_features: ``[sum of tokens over images, D]``.
        """
        if input_ids is None:
            image_embed = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embed).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        n_tokens, n_rows = int(mask.sum()), int(image_features.shape[0])
        if n_tokens != n_rows:
            per_image = self.config.num_image_tokens
            source = f"projector '{self.config.projector_type}'"
            if self.config.reducer_type is not None:
                source += f" with reducer '{self.config.reducer_type}'"
            raise ValueError(
                f"Image features and image tokens do not match, tokens: {n_tokens}, features: {n_rows} "
                f"({source} needs {per_image} placeholders per image, so "
                f"{n_rows // max(per_image, 1)} image(s) need {n_rows} placeholder ids "
                f"{self.config.image_token_id}); expand each <image> with the LlavaStfProcessor"
            )
        return mask.unsqueeze(-1).to(inputs_embeds.device)


class LlavaStfForConditionalGeneration(LlavaStfPreTrainedModel, LlavaForConditionalGeneration):
    """LLaVA-STF for generation and training: ``forward``/``generate`` are transformers' ``Llava`` ones."""

    def __init__(self, config: LlavaStfConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = LlavaStfModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def generate(self, *args, **kwargs):
        """transformers' ``generate``; with an in-LLM reducer it also passes ``prompt_length`` (see the model)."""
        reducer = self.model.reducer
        if reducer is not None and reducer.stage == "llm" and kwargs.get("prompt_length") is None:
            prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            prompt = kwargs.get("inputs_embeds") if prompt is None else prompt
            if prompt is not None:
                kwargs["prompt_length"] = prompt.shape[1]
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids,
        next_sequence_length=None,
        past_key_values=None,
        attention_mask=None,
        inputs_embeds=None,
        is_first_iteration=False,
        prompt_length: int | None = None,
        **kwargs,
    ):
        inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if prompt_length is not None:
            inputs["prompt_length"] = prompt_length
        return inputs


__all__ = ["LlavaStfForConditionalGeneration", "LlavaStfModel", "LlavaStfPreTrainedModel", "build_projector"]
