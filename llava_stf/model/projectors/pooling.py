"""The paper's non-learned merge ablations (Table 5): ``avgpool`` and ``token_concat``.

Both merge each k x k window of patch tokens into one token before the LLaVA-1.5 MLP:
- ``avgpool`` averages the k*k tokens (width stays C);
- ``token_concat`` concatenates them on channels (width k*k*C), in the channel-major (ch, dy, dx) order of
  ``torch.nn.functional.pixel_unshuffle``, which is the order the official LLaVA-STF release uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Projector, ProjectorParams, ProjectorShapes, check_window_divides_grid, grid_to_tokens
from .mlp import MlpHead


@dataclass
class WindowParams(ProjectorParams):
    window: int = 2  # k: side of the square window merged into one token (stride k)

    def validate(self, shapes: ProjectorShapes) -> None:
        check_window_divides_grid(self.window, shapes)

    def num_image_tokens(self, grid_h: int, grid_w: int) -> int:
        return (grid_h // self.window) * (grid_w // self.window)

    def output_grid(self, grid_h: int, grid_w: int) -> tuple[int, int, int]:
        return grid_h // self.window, grid_w // self.window, 1


class AvgPoolProjector(Projector):
    """k x k average pooling, then the MLP: ``[B, H*W, C] -> [B, (H/k)*(W/k), D]``."""

    Params = WindowParams
    spatial = True

    def __init__(self, params: WindowParams, shapes: ProjectorShapes, act: str = "gelu", bias: bool = True):
        super().__init__(params, shapes, act, bias)
        self.mlp = MlpHead(shapes.in_channels, shapes.text_hidden, self.make_act(), bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Args: features ``[B, H*W, C]``. Returns ``[B, (H/k)*(W/k), D_text]``."""
        k = self.params.window
        pooled = F.avg_pool2d(self.tokens_to_grid(features), kernel_size=k, stride=k)
        return self.mlp(grid_to_tokens(pooled))


class TokenConcatProjector(Projector):
    """k x k concatenation (space-to-depth), then the MLP: ``[B, H*W, C] -> [B, (H/k)*(W/k), D]``."""

    Params = WindowParams
    spatial = True

    def __init__(self, params: WindowParams, shapes: ProjectorShapes, act: str = "gelu", bias: bool = True):
        super().__init__(params, shapes, act, bias)
        k = params.window
        self.mlp = MlpHead(shapes.in_channels * k * k, shapes.text_hidden, self.make_act(), bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Args: features ``[B, H*W, C]``. Returns ``[B, (H/k)*(W/k), D_text]``."""
        merged = F.pixel_unshuffle(self.tokens_to_grid(features), self.params.window)  # [B, C*k*k, H/k, W/k]
        return self.mlp(grid_to_tokens(merged))
