"""FasterVLM (Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning", arXiv 2412.01818
v1): keep the ``tokens`` patches the [CLS] token attends to most, before the projector.

Following Theia-4869/FasterVLM (``llava/model/multimodal_encoder/clip_encoder.py`` ``feature_select``,
``llava/model/llava_arch.py`` ``encode_images``):

1. Score: the CLS row of the attention probabilities of the encoder block that outputs the feature layer
   (upstream ``attentions[select_layer]`` with ``select_layer = -2``: block -2, which consumes hidden state -3, so
   ``attn_layer = -3`` here), patch columns, **mean over heads** (:mod:`.cls_attention`).
2. Keep the top ``tokens`` by that score; the kept tokens stay in **raster (patch) order** (upstream builds a boolean
   index mask and applies it to the projected features).

Budget: ``tokens`` is the count itself (the README runs 144 / 58 / 29 of 576, i.e. 75 / 90 / 95 % reduction).
Differences from upstream: ties go to the lower patch index (stable sort; ``torch.topk`` leaves them unspecified),
scores are softmaxed in float32, and the projector runs on the kept rows only (upstream projects all 576, then masks:
the same tokens, fewer FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import MacDims, ReducerParams, ReducerShapes, VisionReducer, check_budget, check_int
from .cls_attention import cls_attention_macs, keep_by_cls_score, top_patches


@dataclass
class FasterVLMParams(ReducerParams):
    tokens: int = 58  # patches kept per image (README: 58 of 576, the 90 % reduction setting)
    attn_layer: int = -3  # hidden state consumed by the scoring block (-3: block -2, upstream attentions[-2])


class FasterVLM(VisionReducer):
    """FasterVLM: ``[B, N, C_in]`` patches -> ``[B, tokens, C_in]`` highest-[CLS]-attention patches, raster order."""

    Params = FasterVLMParams
    needs_cls = True

    @classmethod
    def check(cls, reducer_type: str, params: FasterVLMParams, shapes: ReducerShapes) -> None:
        check_int("tokens", params.tokens, 1)
        cls.check_model(reducer_type, shapes)
        cls.check_attn_layer(params, shapes)
        cls.check_tokens(reducer_type, params.tokens, shapes)

    @classmethod
    def image_tokens(cls, params: FasterVLMParams, shapes: ReducerShapes) -> int:
        return params.tokens

    @classmethod
    def budget_kwargs(cls, reducer_type: str, tokens: int, shapes: ReducerShapes) -> dict:
        """The budget is the kept count."""
        return {"tokens": check_budget(reducer_type, tokens, shapes.num_patches)}

    @classmethod
    def own_macs(cls, params: FasterVLMParams, shapes: ReducerShapes, dims: MacDims) -> int:
        """The CLS attention row only (selection is a sort)."""
        return cls_attention_macs(shapes.num_patches, dims.vision_hidden)

    def select(self, score: torch.Tensor) -> torch.Tensor:
        """``[B, tokens]`` kept patch indices, ascending, from ``score [B, N]`` (head-mean CLS attention)."""
        return top_patches(score, self.params.tokens).sort(dim=1).values

    def forward(
        self, features: torch.Tensor, attn_input: torch.Tensor, block: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [B, tokens, C_in], valid [B, tokens])``: the kept patches in raster order (see VisionReducer)."""
        return keep_by_cls_score(type(self).__name__, features, attn_input, block, self.select)
