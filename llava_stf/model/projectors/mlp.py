"""``mlp2x_gelu``: the LLaVA-1.5 projector, Linear -> GELU -> Linear, one LLM token per patch.

Parameter names (``linear_1``, ``linear_2``) are those of transformers' ``LlavaMultiModalProjector`` so llava-hf
checkpoints load unchanged. :class:`MlpHead` is reused by the ablations that put this MLP after a token merge.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Projector, ProjectorParams, ProjectorShapes


class MlpHead(nn.Module):
    """Linear(in -> D) -> act -> Linear(D -> D), applied per token: ``[B, M, in] -> [B, M, D]``."""

    def __init__(self, in_features: int, out_features: int, act: nn.Module, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias)
        self.act = act
        self.linear_2 = nn.Linear(out_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class Mlp2xGeluProjector(Projector):
    """LLaVA-1.5 baseline: ``[B, N, C_in] -> [B, N, D]`` (576 tokens at 336 px)."""

    Params = ProjectorParams

    def __init__(self, params: ProjectorParams, shapes: ProjectorShapes, act: str = "gelu", bias: bool = True):
        super().__init__(params, shapes, act, bias)
        self.linear_1 = nn.Linear(shapes.in_channels, shapes.text_hidden, bias=bias)
        self.act = self.make_act()
        self.linear_2 = nn.Linear(shapes.text_hidden, shapes.text_hidden, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Args: features ``[B, N, C_in]``. Returns ``[B, N, D_text]``."""
        return self.linear_2(self.act(self.linear_1(features)))
