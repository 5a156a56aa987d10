"""Multi-Block Token Fusion (MBTF), alone (``mbtf``) and followed by STF (``mbtf_stf``, the headline model).

MBTF reads several encoder blocks (``config.vision_feature_layer``, concatenated on channels in that order) and
fuses them per token with two 1x1 convolutions, written as per-token Linear layers:
``[B, N, L*C] -> Linear(L*C -> 4C) -> act -> Linear(4C -> C)[ -> act]``.

Defaults follow the official release: hidden states [23, 21, 18, 15, 12, 9, 6, 3] of the 24-block CLIP (deepest
first; 23 is LLaVA's penultimate block), no activation after the second layer. The submodule is an
``nn.Sequential`` so its keys (``mbtf.0``, ``mbtf.2``) line up with the release's ``mm_projector_crosslayer.{0,2}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Projector, ProjectorConfigError, ProjectorParams, ProjectorShapes, check_positive_int
from .mlp import MlpHead
from .stf import SpatialTokenFusion, StfParams

DEFAULT_NUM_BLOCKS = 8


def evenly_spaced_blocks(depth: int, num_blocks: int) -> list[int]:
    """Hidden-state indices, deepest first: the penultimate block, then every ``depth // num_blocks`` blocks down.

    For CLIP ViT-L (24 blocks) and 8 blocks: ``[23, 21, 18, 15, 12, 9, 6, 3]``, the official release's list.
    """
    step = depth // num_blocks
    blocks = [depth - 1] + [step * i for i in range(num_blocks - 1, 0, -1)]
    if step < 1 or len(set(blocks)) != num_blocks:
        raise ProjectorConfigError(
            f"projector_kwargs.num_blocks={num_blocks} needs a vision tower with at least {num_blocks + 1} blocks "
            f"(vision_config.num_hidden_layers={depth}); pass vision_feature_layer explicitly or use fewer blocks"
        )
    return blocks


@dataclass
class MbtfParams(ProjectorParams):
    num_blocks: int | None = None  # encoder blocks fused; None -> len(vision_feature_layer) (default list: 8)
    block_hidden: int | None = None  # width of the first 1x1 conv; None -> 4 * vision hidden (4096)
    block_out: int | None = None  # width of the fused token; None -> vision hidden (1024)
    block_final_activation: bool = False  # activation after the second 1x1 conv (official: no; paper: yes)

    def resolve(self, shapes: ProjectorShapes) -> None:
        if self.num_blocks is None:
            self.num_blocks = shapes.num_layers
        if self.block_hidden is None:
            self.block_hidden = 4 * shapes.vision_hidden
        if self.block_out is None:
            self.block_out = shapes.vision_hidden

    def validate(self, shapes: ProjectorShapes) -> None:
        for name in ("num_blocks", "block_hidden", "block_out"):
            check_positive_int(name, getattr(self, name))
        if self.num_blocks != shapes.num_layers:
            raise ProjectorConfigError(
                f"projector_kwargs.num_blocks={self.num_blocks} but vision_feature_layer lists "
                f"{shapes.num_layers} hidden state(s); they must agree"
            )


def build_mbtf(params: MbtfParams, shapes: ProjectorShapes, act_factory, bias: bool) -> nn.Sequential:
    """``Sequential(Linear(L*C -> hidden), act, Linear(hidden -> out)[, act])``: ``[B, N, L*C] -> [B, N, out]``."""
    layers = [
        nn.Linear(shapes.in_channels, params.block_hidden, bias=bias),
        act_factory(),
        nn.Linear(params.block_hidden, params.block_out, bias=bias),
    ]
    if params.block_final_activation:
        layers.append(act_factory())
    return nn.Sequential(*layers)


def _default_blocks(params: MbtfParams, num_vision_blocks: int) -> list[int]:
    num_blocks = params.num_blocks if params.num_blocks is not None else DEFAULT_NUM_BLOCKS
    check_positive_int("num_blocks", num_blocks)
    return evenly_spaced_blocks(num_vision_blocks, num_blocks)


class MbtfProjector(Projector):
    """MBTF, then the LLaVA-1.5 MLP: ``[B, N, L*C] -> [B, N, D]`` (paper: "MBTF only", 576 tokens)."""

    Params = MbtfParams

    def __init__(self, params: MbtfParams, shapes: ProjectorShapes, act: str = "gelu", bias: bool = True):
        super().__init__(params, shapes, act, bias)
        self.mbtf = build_mbtf(params, shapes, self.make_act, bias)
        self.mlp = MlpHead(params.block_out, shapes.text_hidden, self.make_act(), bias)

    @classmethod
    def default_vision_layers(cls, params: MbtfParams, num_vision_blocks: int) -> list[int]:
        return _default_blocks(params, num_vision_blocks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Args: features ``[B, N, L*C]``. Returns ``[B, N, D_text]``."""
        return self.mlp(self.mbtf(features))


@dataclass
class MbtfStfParams(MbtfParams, StfParams):
    """MBTF settings followed by STF settings (see both classes)."""

    def stf_in_channels(self, shapes: ProjectorShapes) -> int:
        return self.block_out if self.block_out is not None else shapes.vision_hidden

    def resolve(self, shapes: ProjectorShapes) -> None:
        MbtfParams.resolve(self, shapes)
        StfParams.resolve(self, shapes)

    def validate(self, shapes: ProjectorShapes) -> None:
        MbtfParams.validate(self, shapes)
        StfParams.validate(self, shapes)


class MbtfStfProjector(Projector):
    """MBTF then STF: ``[B, H*W, L*C] -> [B, (H/k)*(W/k)*n, D]`` (144 tokens at 336 px with k=2, n=1)."""

    Params = MbtfStfParams
    spatial = True

    def __init__(self, params: MbtfStfParams, shapes: ProjectorShapes, act: str = "gelu", bias: bool = True):
        super().__init__(params, shapes, act, bias)
        self.mbtf = build_mbtf(params, shapes, self.make_act, bias)
        self.stf = SpatialTokenFusion(params.block_out, params, shapes.text_hidden, self.make_act, bias)

    @classmethod
    def default_vision_layers(cls, params: MbtfStfParams, num_vision_blocks: int) -> list[int]:
        return _default_blocks(params, num_vision_blocks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Args: features ``[B, H*W, L*C]``. Returns ``[B, (H/k)*(W/k)*n, D_text]``."""
        return self.stf(self.tokens_to_grid(self.mbtf(features)))
