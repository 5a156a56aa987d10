"""``LlavaStfForConditionalGeneration``: transformers' LLaVA with the projector taken from the registry.

Only construction and the placeholder check differ from the parent classes. The forward pass, the image/text merge
(one ``masked_scatter`` of projector rows into ``<image>`` placeholder positions), generation and the KV cache are
transformers' own. Because every projector returns ``[B, M, D_text]``, the stock ``get_image_features`` works for
token-reducing projectors; only the number of placeholders the processor writes changes (``config.num_image_tokens``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
)

from .configuration_llava_stf import LlavaStfConfig
from .projectors import Projector, get_projector_class


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
        self.post_init()

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
            raise ValueError(
                f"Image features and image tokens do not match, tokens: {n_tokens}, features: {n_rows} "
                f"(projector '{self.config.projector_type}' emits {per_image} tokens per image, so "
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


__all__ = ["LlavaStfForConditionalGeneration", "LlavaStfModel", "LlavaStfPreTrainedModel", "build_projector"]
