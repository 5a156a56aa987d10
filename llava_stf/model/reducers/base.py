"""Token-reducer contract: typed settings and shapes, and the two places a reducer acts.

A reducer is parameter-free (``nn.Module`` with no weights, so checkpoints are unchanged) and acts in one of two
stages, named by its ``stage``:

- ``"vision"``: between the vision tower and the projector, inside the model's public ``get_image_features``
  (:class:`VisionReducer`). It receives the selected patch features ``[B, N, C_in]`` plus the hidden state a chosen
  encoder block consumes, and returns a fixed number of tokens per image, or a variable one (``adaptive``: then whoever
  writes the prompt writes each image's exact count of placeholders; ``llava_stf.generation.Generator`` and the
  trainer do, see ``data/placeholders.py``).
- ``"llm"``: inside the language model, which really removes image tokens from its hidden states at some layers
  (see :mod:`.language_model`).

A reducer never sees the model config: it is built from its ``Params`` (``config.reducer_kwargs``) and a
:class:`ReducerShapes` the config derives, as projectors get ``ProjectorShapes``. Bad values raise
:class:`ReducerConfigError` naming the field, and so do projector / tower combinations that cannot work.

Every reducer also answers, without weights: its token count (``image_tokens``), the settings for a token budget
(``budget_kwargs``: one ``--tokens`` knob for every method), its per-layer schedule of image tokens in the LLM
(``llm_schedule``) and its own multiply-accumulates (``own_macs``); ``llava_stf.flops`` counts FLOPs from these.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


class ReducerConfigError(ValueError):
    """A reducer setting, or a projector / reducer combination, that cannot work; the message names the field."""


@dataclass(frozen=True)
class ReducerShapes:
    """What a reducer may know about the model it is built into (derived from the config, never from names)."""

    grid_h: int  # patch rows of one image (24 at 336 px / patch 14)
    grid_w: int  # patch columns
    num_vision_blocks: int  # vision encoder depth (24 for CLIP ViT-L)
    vision_model_type: str  # vision_config.model_type ("clip_vision_model")
    drops_cls: bool  # vision_feature_select_strategy == "default": the projector gets patches only
    projector: str  # projector_type, for error messages
    projector_tokens: int  # tokens the projector emits per image (AnyRes: per crop) without a reducer
    projector_per_patch: bool  # the projector maps each patch feature to one token (no spatial merge)
    text_model_type: str  # text_config.model_type ("llama")
    num_text_layers: int  # decoder layers of the language model

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w


@dataclass
class ReducerParams:
    """Base of every reducer's settings. Subclasses add fields, each with a one-line comment."""

    @classmethod
    def from_kwargs(cls, reducer_type: str, kwargs: dict[str, Any] | None) -> ReducerParams:
        """Build from ``config.reducer_kwargs``; unknown keys are an error listing the valid ones."""
        kwargs = dict(kwargs or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ReducerConfigError(
                f"reducer_kwargs has unknown field(s) {unknown} for reducer_type '{reducer_type}'; "
                f"valid fields: {valid or 'none'}"
            )
        return cls(**kwargs)

    def to_kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ReducerConfigError(f"reducer_kwargs.{name} must be an integer >= {minimum}, got {value!r}")


def check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ReducerConfigError(f"reducer_kwargs.{name} must be a number in [0, 1], got {value!r}")


@dataclass(frozen=True)
class MacDims:
    """Widths a reducer's own multiply-accumulate count may need (one image, one prompt; see ``Reducer.own_macs``)."""

    vision_hidden: int  # width of one vision hidden state (1024 for CLIP ViT-L)
    vision_heads: int  # attention heads of a vision block
    feature_channels: int  # C_in: what the projector receives per patch (vision layers concatenated)
    text_hidden: int  # LLM width
    text_kv_hidden: int  # LLM K/V width (head_dim x key/value heads)
    text_heads: int  # LLM attention heads
    text_tokens: int  # text tokens of the prompt
    image_tokens: int  # image tokens entering the LLM (after a vision-side reducer)


class Reducer(nn.Module):
    """Base class: subclasses set ``Params`` and ``stage`` and implement their stage's methods.

    Args:
        params: the validated settings.
        shapes: the model shapes (see :class:`ReducerShapes`).
    """

    Params: ClassVar[type[ReducerParams]] = ReducerParams
    stage: ClassVar[str] = "vision"  # "vision" (before the projector) or "llm" (inside the language model)
    adaptive: ClassVar[bool] = False  # the number of image tokens differs per image (known only after the tower)

    def __init__(self, params: ReducerParams, shapes: ReducerShapes):
        super().__init__()
        self.params = params
        self.shapes = shapes

    @classmethod
    def check(cls, reducer_type: str, params: ReducerParams, shapes: ReducerShapes) -> None:
        """Raise :class:`ReducerConfigError` when the settings or the projector / towers cannot work together."""

    @classmethod
    def image_tokens(cls, params: ReducerParams, shapes: ReducerShapes) -> int:
        """Image tokens per image (AnyRes: per crop) that reach the LLM input (an upper bound when ``adaptive``)."""
        return shapes.projector_tokens

    # ------------------------------------------------------------------------------------- budget and FLOPs
    @classmethod
    def budget_kwargs(cls, reducer_type: str, tokens: int, shapes: ReducerShapes) -> dict[str, Any]:
        """The settings that give ``tokens`` image tokens, mapped as the method's paper does (one knob for all).

        Vision-side reducers: the tokens that enter the LLM. In-LLM reducers: see each one's docstring (single-stage
        ones keep ``tokens`` after their drop layer; multi-stage ones follow their papers' per-budget schedules).
        The result goes into ``reducer_kwargs`` and is checked like any other setting.
        """
        raise ReducerConfigError(f"reducer_type '{reducer_type}' has no token budget (its count is adaptive)")

    @classmethod
    def llm_schedule(cls, params: ReducerParams, shapes: ReducerShapes, image_tokens: int) -> list[tuple[int, int]]:
        """``[(first_layer, image tokens from that layer on), ...]`` from layer 0, ascending: what FLOPs count.

        ``image_tokens`` enter the LLM. Vision-side reducers keep the default (one stage); in-LLM ones list every
        stage, recycled or merged tokens included.
        """
        return [(0, image_tokens)]

    @classmethod
    def own_macs(cls, params: ReducerParams, shapes: ReducerShapes, dims: MacDims) -> int:
        """Multiply-accumulates of the reducer's own work (scoring, merging) for one image and prompt."""
        return 0


def token_layers(schedule: list[tuple[int, int]], depth: int) -> int:
    """Sum over ``depth`` decoder layers of the tokens an ``llm_schedule`` ``[(first_layer, tokens), ...]`` gives
    each: ``sum_l n_l``."""
    bounds = [layer for layer, _ in schedule[1:]] + [depth]
    return sum(count * (end - start) for (start, count), end in zip(schedule, bounds))


def layer_average(schedule: list[tuple[int, int]], depth: int) -> float:
    """Image tokens of an ``llm_schedule`` averaged over the ``depth`` layers: ``sum_l n_l / L`` (the
    "equivalent tokens" of the in-LLM reducers' tables)."""
    return token_layers(schedule, depth) / depth


def check_budget(reducer_type: str, tokens: Any, available: int) -> int:
    """``tokens`` as a budget between 1 and ``available`` image tokens, or an error naming the budget."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= available:
        raise ReducerConfigError(
            f"token budget {tokens!r} for reducer_type '{reducer_type}' must be an integer in 1..{available} "
            f"(the image tokens it reduces)"
        )
    return tokens


# ------------------------------------------------------------------------------------------ vision side


class VisionReducer(Reducer):
    """Base of reducers between the vision tower and the projector (``stage = "vision"``).

    The model calls ``forward(features, attn_input, block)`` inside ``get_image_features``: ``features`` are the
    selected patch features ``[B, N, C_in]`` (what the projector would receive), ``attn_input`` the hidden state
    ``[B, N + 1, C]`` (CLS first) that encoder block ``block`` consumes (``block_index`` chooses it; reducers that
    score with CLS attention recompute it from that block's own ``q_proj`` / ``k_proj``). It returns
    ``(tokens [B, M, C_in], valid [B, M])``: each image's tokens, padded to the batch maximum, ``valid`` a prefix of
    each row. A non-``adaptive`` reducer returns exactly ``image_tokens(params, shapes)`` tokens for every image.
    A reducer that sets ``needs_cls_features`` also gets ``cls_features [B, C_in]``: the CLS row of the feature
    layers in the projector's channel layout (VisionZip passes the CLS token on to the projector).
    """

    stage = "vision"
    needs_cls: ClassVar[bool] = False  # scores with CLS attention: needs a CLIP tower and CLS dropped for the projector
    needs_cls_features: ClassVar[bool] = False  # forward also takes cls_features [B, C_in] (CLS of the feature layers)

    def block_index(self, depth: int) -> int:
        """Index of the scoring block (and of its input in ``hidden_states``) for ``depth`` blocks: ``attn_layer``
        of the settings when they have one, else the last block (hidden state -2, LLaVA's feature layer)."""
        return getattr(self.params, "attn_layer", -2) % (depth + 1)

    def forward(
        self, features: torch.Tensor, attn_input: torch.Tensor, block: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def reduce_tower(self, vision_tower: nn.Module, pixel_values: torch.Tensor, vision_layers: list[int]):
        """Run a CLIP-style ``vision_tower`` on ``pixel_values`` ``[B, 3, H, W]`` and reduce each image (or crop).

        Args:
            vision_tower: the model's tower (``encoder.layers`` are its blocks; hidden states with CLS first).
            pixel_values: ``[B, 3, H, W]`` images, or AnyRes crops, each reduced on its own.
            vision_layers: hidden-state indices concatenated on channels (``config.vision_layers``).

        Returns:
            ``(outputs, tokens [B, M, C_in], valid [B, M])``: the tower's output (``hidden_states`` set) and this
            reducer's ``forward`` result.
        """
        outputs = vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        hidden = outputs.hidden_states
        features = torch.cat([hidden[i][:, 1:] for i in vision_layers], dim=-1)
        extra = {}
        if self.needs_cls_features:  # VisionZip keeps the CLS token: its row of the same layers
            extra["cls_features"] = torch.cat([hidden[i][:, 0] for i in vision_layers], dim=-1)
        block = self.block_index(len(hidden) - 1)
        tokens, valid = self(features, hidden[block], vision_tower.encoder.layers[block], **extra)
        return outputs, tokens, valid

    @classmethod
    def check_model(cls, reducer_type: str, shapes: ReducerShapes) -> None:
        """The projector / tower combinations a vision-side reducer can work with (call from ``check``)."""
        if not shapes.projector_per_patch:
            raise ReducerConfigError(
                f"reducer_type '{reducer_type}' passes a reduced set of patch tokens to the projector, so it needs a "
                f"projector that maps each patch to one token; projector_type '{shapes.projector}' merges the "
                f"{shapes.grid_h}x{shapes.grid_w} patch grid (use mlp2x_gelu or mbtf)"
            )
        if cls.needs_cls and not shapes.drops_cls:
            raise ReducerConfigError(
                f"reducer_type '{reducer_type}' scores patches by CLS attention, so vision_feature_select_strategy "
                "must be 'default' (CLS dropped)"
            )
        if cls.needs_cls and shapes.vision_model_type != "clip_vision_model":
            raise ReducerConfigError(
                f"reducer_type '{reducer_type}' needs a CLIP vision tower (a CLS token and CLIP encoder blocks); "
                f"vision_config.model_type is {shapes.vision_model_type!r}"
            )

    @staticmethod
    def check_tokens(reducer_type: str, tokens: Any, shapes: ReducerShapes) -> None:
        """``reducer_kwargs.tokens``: a count of patches one image has."""
        check_int("tokens", tokens, 1)
        if tokens > shapes.num_patches:
            raise ReducerConfigError(
                f"reducer_kwargs.tokens={tokens} exceeds the {shapes.num_patches} patches of the "
                f"{shapes.grid_h}x{shapes.grid_w} grid (reducer_type '{reducer_type}')"
            )

    @staticmethod
    def check_attn_layer(params: ReducerParams, shapes: ReducerShapes) -> None:
        """``params.attn_layer`` must name a hidden state that an encoder block consumes."""
        depth = shapes.num_vision_blocks
        layer = params.attn_layer
        in_range = isinstance(layer, int) and not isinstance(layer, bool) and -(depth + 1) <= layer <= depth
        if not in_range or layer % (depth + 1) == depth:
            raise ReducerConfigError(
                f"reducer_kwargs.attn_layer={layer} names no hidden state consumed by an encoder block "
                f"(with {depth} blocks: {-(depth + 1)}..{depth - 1}, except -1, the final output)"
            )
