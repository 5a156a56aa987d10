"""Token-reducer contract: typed settings and shapes, and the two places a reducer acts.

A reducer is parameter-free (``nn.Module`` with no weights, so checkpoints are unchanged) and acts in one of two
stages, named by its ``stage``:

- ``"vision"``: between the vision tower and the projector, inside the model's public ``get_image_features``. It
  receives the selected patch features ``[B, N, C_in]`` plus the hidden state a chosen encoder block consumes, and
  returns a variable number of tokens per image (``adaptive``). Whoever writes the prompt writes each image's exact
  count of placeholders (``llava_stf.generation.Generator`` and the trainer do; see ``data/placeholders.py``).
- ``"llm"``: inside the language model, which really removes image tokens from its hidden states at some layers
  (see :mod:`.language_model`).

A reducer never sees the model config: it is built from its ``Params`` (``config.reducer_kwargs``) and a
:class:`ReducerShapes` the config derives, as projectors get ``ProjectorShapes``. Bad values raise
:class:`ReducerConfigError` naming the field, and so do projector / tower combinations that cannot work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

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
    projector_tokens: int  # tokens the projector emits per image without a reducer
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
        """Image tokens per image that reach the LLM input (an upper bound when ``adaptive``)."""
        return shapes.projector_tokens
