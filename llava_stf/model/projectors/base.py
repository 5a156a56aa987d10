"""Projector contract and shared helpers.

A projector maps the selected vision hidden states of one image batch, ``[B, N, C_in]`` with ``N = grid_h * grid_w``
patch tokens (CLS already dropped) and ``C_in = vision_hidden * num_layers`` (layers concatenated on channels, in
the order of ``config.vision_feature_layer``), to ``[B, M, D_text]`` LLM input embeddings.

Every projector has a ``Params`` dataclass: its typed settings, stored in ``config.projector_kwargs``. ``Params``
resolves its defaults against the model shapes (so the saved config records explicit numbers), validates them with
errors that name the bad field, and answers ``num_image_tokens(grid_h, grid_w)`` without building any weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import initialization as hf_init
from transformers.activations import ACT2FN


@dataclass(frozen=True)
class ProjectorShapes:
    """The model shapes a projector is built against (derived from the config, never from names)."""

    vision_hidden: int  # width of one vision hidden state (1024 for CLIP ViT-L)
    num_layers: int  # how many vision hidden states are concatenated on channels
    text_hidden: int  # LLM embedding width D_text
    grid_h: int  # patch rows (24 at 336 px / patch 14)
    grid_w: int  # patch columns
    num_vision_blocks: int  # encoder depth (24 for CLIP ViT-L), for projectors that choose blocks

    @property
    def in_channels(self) -> int:
        return self.vision_hidden * self.num_layers


class ProjectorConfigError(ValueError):
    """A projector setting that cannot work with the model shapes; the message names the field."""


@dataclass
class ProjectorParams:
    """Base of every projector's settings. Subclasses add fields, each with a one-line comment."""

    def resolve(self, shapes: ProjectorShapes) -> None:
        """Fill ``None`` defaults with explicit numbers derived from ``shapes``."""

    def validate(self, shapes: ProjectorShapes) -> None:
        """Raise :class:`ProjectorConfigError` naming the field when a setting cannot work."""

    def num_image_tokens(self, grid_h: int, grid_w: int) -> int:
        """Number of LLM tokens emitted per image for a ``grid_h x grid_w`` patch grid."""
        return grid_h * grid_w

    def output_grid(self, grid_h: int, grid_w: int) -> tuple[int, int, int]:
        """The emitted tokens as a row-major grid: ``(rows, cols, tokens per cell)``.

        AnyRes (LLaVA-NeXT) re-assembles crops on this grid, unpads it and puts a newline after each row, so it must
        describe the real token order; ``rows * cols * cell == num_image_tokens(grid_h, grid_w)``.
        """
        return grid_h, grid_w, 1

    @classmethod
    def from_kwargs(cls, projector_type: str, kwargs: dict[str, Any] | None) -> ProjectorParams:
        """Build from ``config.projector_kwargs``; unknown keys are an error listing the valid ones."""
        kwargs = dict(kwargs or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ProjectorConfigError(
                f"projector_kwargs has unknown field(s) {unknown} for projector_type '{projector_type}'; "
                f"valid fields: {valid or 'none'}"
            )
        return cls(**kwargs)

    def to_kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ProjectorConfigError(f"projector_kwargs.{name} must be a positive integer, got {value!r}")


def check_window_divides_grid(window: int, shapes: ProjectorShapes) -> None:
    """The k x k windows must tile the patch grid exactly (no silent cropping)."""
    check_positive_int("window", window)
    if shapes.grid_h % window or shapes.grid_w % window:
        raise ProjectorConfigError(
            f"projector_kwargs.window={window} does not divide the {shapes.grid_h}x{shapes.grid_w} patch grid "
            "(vision_config.image_size / vision_config.patch_size); choose a window that divides it"
        )


class Projector(nn.Module):
    """Base class: subclasses set ``Params`` and implement ``forward``.

    Args:
        params: the resolved, validated settings.
        shapes: model shapes the layers are sized for.
        act: name of the activation in ``transformers.activations.ACT2FN`` (``"gelu"`` is the exact erf form).
        bias: whether linear / conv layers carry a bias.
    """

    Params: ClassVar[type[ProjectorParams]] = ProjectorParams
    spatial: ClassVar[bool] = False  # True when the projector needs the patch grid (so CLS must be dropped)

    def __init__(self, params: ProjectorParams, shapes: ProjectorShapes, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.params = params
        self.shapes = shapes
        self.act_name = act
        self.bias = bias

    @classmethod
    def default_vision_layers(cls, params: ProjectorParams, num_vision_blocks: int) -> int | list[int]:
        """Hidden-state indices read when the config does not name them (LLaVA-1.5: the penultimate block)."""
        return -2

    def num_image_tokens(self, grid_h: int, grid_w: int) -> int:
        """Tokens per image for a ``grid_h x grid_w`` patch grid (pure; same as ``Params.num_image_tokens``)."""
        return self.params.num_image_tokens(grid_h, grid_w)

    def make_act(self) -> nn.Module:
        return ACT2FN[self.act_name]

    def tokens_to_grid(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` patch tokens (row-major) to an NCHW map ``[B, C, grid_h, grid_w]``."""
        b, n, c = features.shape
        gh, gw = self.shapes.grid_h, self.shapes.grid_w
        if n != gh * gw:
            raise ValueError(
                f"{type(self).__name__} expects {gh}x{gw}={gh * gw} patch tokens per image, got {n}; "
                "the vision tower's image size must match vision_config.image_size and CLS must be dropped"
            )
        return features.transpose(1, 2).reshape(b, c, gh, gw)

    @torch.no_grad()
    def reset_parameters(self, layer: nn.Module | None = None) -> None:
        """PyTorch's default init for every Linear / Conv layer (what LLaVA and the LLaVA-STF release get).

        Args:
            layer: one of this projector's layers to initialise (``None``: all of them).

        Uses transformers' init functions, which skip tensors already loaded from a checkpoint.
        """
        for module in self.modules() if layer is None else [layer]:
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                hf_init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                if module.bias is not None:
                    fan_in = module.weight[0].numel()
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                    hf_init.uniform_(module.bias, -bound, bound)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """NCHW ``[B, C, H, W]`` to row-major tokens ``[B, H*W, C]``."""
    return grid.flatten(2).transpose(1, 2)
