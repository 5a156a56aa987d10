"""Spatial Token Fusion (STF): fuse each k x k window of patch tokens with a learned k x k, stride-k convolution.

Pipeline, per image: ``[H*W, C] -> Conv2d(C -> F, k, stride k) -> act -> n tokens per window of width F/n ->
alignment layers (1x1 convs, written as per-token Linear) -> [(H/k)*(W/k)*n, D]``.

Defaults follow the official LLaVA-STF release (k=2, n=1, F = 4*k*k*C = 16384 for C=1024, one alignment layer, no
activation after it). The paper's text differs (F = k*k*C, two alignment layers, GELU after every layer): set
``fusion_width``, ``num_align_layers`` and ``final_activation`` for that variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import (
    Projector,
    ProjectorConfigError,
    ProjectorParams,
    ProjectorShapes,
    check_positive_int,
    check_window_divides_grid,
    grid_to_tokens,
)


@dataclass
class StfParams(ProjectorParams):
    window: int = 2  # k: side and stride of the fusion convolution
    fused_tokens: int = 1  # n: tokens each window becomes (the fused channels are split into n equal groups)
    fusion_width: int | None = None  # F: fusion conv output channels; None -> 4*k*k*C_in (official release)
    num_align_layers: int = 1  # 1x1 alignment layers after the fusion (official release: 1; paper text: 2)
    align_width: int | None = None  # width of hidden alignment layers (num_align_layers >= 2); None -> D_text
    final_activation: bool = False  # activation after the last alignment layer (official: no; paper: yes)

    def stf_in_channels(self, shapes: ProjectorShapes) -> int:
        """Channels entering the fusion conv (overridden when another module runs first)."""
        return shapes.in_channels

    def resolve(self, shapes: ProjectorShapes) -> None:
        if self.fusion_width is None and isinstance(self.window, int):
            self.fusion_width = 4 * self.window * self.window * self.stf_in_channels(shapes)
        if self.align_width is None:
            self.align_width = shapes.text_hidden

    def validate(self, shapes: ProjectorShapes) -> None:
        check_window_divides_grid(self.window, shapes)
        for name in ("fused_tokens", "fusion_width", "num_align_layers", "align_width"):
            check_positive_int(name, getattr(self, name))
        if self.fusion_width % self.fused_tokens:
            raise ProjectorConfigError(
                f"projector_kwargs.fusion_width={self.fusion_width} is not divisible by "
                f"projector_kwargs.fused_tokens={self.fused_tokens}"
            )

    def num_image_tokens(self, grid_h: int, grid_w: int) -> int:
        return (grid_h // self.window) * (grid_w // self.window) * self.fused_tokens

    def output_grid(self, grid_h: int, grid_w: int) -> tuple[int, int, int]:
        return grid_h // self.window, grid_w // self.window, self.fused_tokens  # a window's n tokens are adjacent


class SpatialTokenFusion(nn.Module):
    """Conv fusion + alignment: ``[B, H*W, C] -> [B, (H/k)*(W/k)*n, D]``.

    Attributes:
        fusion: ``Conv2d(C, F, kernel_size=k, stride=k)``.
        align: ``Sequential(act, Linear(F/n -> A), act, ..., Linear(A -> D)[, act])``.
    """

    def __init__(self, in_channels: int, params: StfParams, text_hidden: int, act_factory, bias: bool = True):
        super().__init__()
        k, n = params.window, params.fused_tokens
        self.window, self.fused_tokens = k, n
        self.fusion = nn.Conv2d(in_channels, params.fusion_width, kernel_size=k, stride=k, bias=bias)
        layers: list[nn.Module] = [act_factory()]
        width = params.fusion_width // n
        for i in range(params.num_align_layers):
            last = i == params.num_align_layers - 1
            out = text_hidden if last else params.align_width
            layers.append(nn.Linear(width, out, bias=bias))
            if not last or params.final_activation:
                layers.append(act_factory())
            width = out
        self.align = nn.Sequential(*layers)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """Args: grid ``[B, C, H, W]``. Returns ``[B, (H/k)*(W/k)*n, D]``, windows row-major, then the n tokens."""
        fused = grid_to_tokens(self.fusion(grid))  # [B, M, F]
        b, m, f = fused.shape
        fused = fused.reshape(b, m * self.fused_tokens, f // self.fused_tokens)
        return self.align(fused)


class StfProjector(Projector):
    """STF alone over one (or several concatenated) vision hidden states (paper: "STF only")."""

    Params = StfParams
    spatial = True

    def __init__(self, params: StfParams, shapes: ProjectorShapes, act: str = "gelu", bias: bool = True):
        super().__init__(params, shapes, act, bias)
        self.stf = SpatialTokenFusion(shapes.in_channels, params, shapes.text_hidden, self.make_act, bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Args: features ``[B, H*W, C_in]``. Returns ``[B, (H/k)*(W/k)*n, D_text]``."""
        return self.stf(self.tokens_to_grid(features))
