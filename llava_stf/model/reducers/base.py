"""Token-reducer contract: typed settings checked against the model config, and the two places a reducer acts.

A reducer is parameter-free (``nn.Module`` with no weights, so checkpoints are unchanged) and acts in one of two
stages, named by its ``stage``:

- ``"vision"``: between the vision tower and the projector. It receives the selected patch features
  ``[B, N, C_in]`` plus the hidden state a chosen encoder block consumes, and returns a variable number of tokens per
  image, padded to the batch maximum, with a validity mask. The processor writes ``placeholder_tokens`` placeholders
  per image (an upper bound); the model drops the unused ones before the first LLM layer (see ``token_drop.py``).
- ``"llm"``: inside the language model, where it drops image tokens from the hidden states at some layer.

Settings live in ``config.reducer_kwargs`` as the reducer's ``Params`` dataclass; bad values raise
:class:`ReducerConfigError` naming the field, and invalid projector / reducer combinations raise it too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

if TYPE_CHECKING:  # only for annotations: reducers never import the config module at run time
    from ..configuration_llava_stf import LlavaStfConfig


class ReducerConfigError(ValueError):
    """A reducer setting, or a projector / reducer combination, that cannot work; the message names the field."""


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
    """Base class: subclasses set ``Params`` and ``stage`` and implement ``forward``.

    Args:
        params: the validated settings.
    """

    Params: ClassVar[type[ReducerParams]] = ReducerParams
    stage: ClassVar[str] = "vision"  # "vision" (before the projector) or "llm" (inside the language model)

    def __init__(self, params: ReducerParams):
        super().__init__()
        self.params = params

    @classmethod
    def check_config(cls, reducer_type: str, params: ReducerParams, config: LlavaStfConfig) -> None:
        """Raise :class:`ReducerConfigError` when the settings or the projector / towers cannot work together."""

    @classmethod
    def placeholder_tokens(cls, params: ReducerParams, config: LlavaStfConfig, projector_tokens: int) -> int:
        """Placeholders per image the processor must write, given the projector's own count."""
        return projector_tokens
