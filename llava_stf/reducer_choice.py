"""Choosing a token reducer for a checkpoint at load time: ``--reducer NAME [--reducer-kwargs JSON | --tokens N]``.

One place for evaluation, chat and ``bench.compare``. :class:`ReducerChoice` is what the flags ask for;
``resolve(config)`` checks it against a checkpoint's config and gives a :class:`ResolvedReducer`: the config with the
reducer (``LlavaStfConfig.with_reducer``), its validated settings (``--tokens N`` mapped by the registry's
``budget_kwargs``: each method's own rule for a budget of N image tokens), a short label for model ids
(``fastv@64``) and a record for the answers' provenance, so results made with different reducers or budgets are
never mixed or reused for one another. ``--reducer none`` removes a checkpoint's reducer; asking for exactly what
the checkpoint already has is no change (same model id, same answers).

:func:`reducer_variant` builds the reduced model from an already loaded one, sharing every weight (reducers have
none), so ``bench.compare`` holds one copy of a checkpoint for all its reducers and budgets.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import UserError
from .model import LlavaStfConfig, LlavaStfForConditionalGeneration, LlavaStfProcessor, generation_class
from .model.reducers import REDUCERS, TokenDropLlamaModel, budget_kwargs, build_reducer, get_reducer_class

NONE = "none"  # the --reducer value that removes a reducer


@dataclass(frozen=True)
class ResolvedReducer:
    """A reducer choice checked against one checkpoint.

    On AnyRes checkpoints (``config.anyres``) a budget ``--tokens N`` is per crop (one crop = one 1.5 image): a
    vision-side reducer leaves N tokens in every crop; an in-LLM one keeps the fraction ``N / crop tokens`` of each
    image's tokens (see ``LlavaStfNextConfig``), so ``fastv@64`` keeps the same share on 1.5 and NeXT.
    """

    type: str | None  # REDUCERS name, None: no reducer
    kwargs: dict[str, Any]  # its validated settings (defaults filled in)
    tokens: int | None  # the token budget asked for (--tokens), None: settings given or defaults
    explicit: bool  # the settings came from --reducer-kwargs
    changed: bool  # differs from the checkpoint's own reducer (else: the checkpoint as saved)
    config: LlavaStfConfig = field(repr=False, compare=False)  # the checkpoint's config with this reducer

    @property
    def label(self) -> str:
        """For model ids: ``fastv@64`` (a budget), ``fastv-1a2b3c4d`` (explicit settings), ``prumerge``, ``none``."""
        if self.type is None:
            return NONE
        if self.tokens is not None:
            return f"{self.type}@{self.tokens}"
        if self.explicit:
            digest = hashlib.sha256(json.dumps(self.kwargs, sort_keys=True).encode()).hexdigest()[:8]
            return f"{self.type}-{digest}"
        return self.type

    def describe(self) -> str:
        """One line: ``visionzip @ 64 tokens: dominant=54 contextual=10`` (image tokens entering the LLM after)."""
        unit = "crop" if self.config.anyres else "image"  # AnyRes: counts are per crop (base image and tiles)
        if self.type is None:
            return f"no reducer: {self.config.num_image_tokens} image tokens" + " per crop" * self.config.anyres
        budget = f" @ {self.tokens} tokens" if self.tokens is not None else ""
        settings = " ".join(f"{k}={_short(v)}" for k, v in self.kwargs.items()) or "no settings"
        adaptive = " (adaptive count)" if self.config.adaptive_image_tokens else ""
        return f"{self.type}{budget}: {settings}; {self.config.num_image_tokens} image tokens per {unit}{adaptive}"

    def record(self) -> dict[str, Any]:
        """What decides the answers (compared by the provenance): the reducer and its settings."""
        return {"type": self.type, "kwargs": dict(self.kwargs)}


@dataclass(frozen=True)
class ReducerChoice:
    """A reducer asked for on the command line, not yet checked against a checkpoint."""

    name: str | None  # REDUCERS name; None: no reducer (``--reducer none``)
    kwargs: Mapping[str, Any] | None = None  # explicit settings (``--reducer-kwargs``)
    tokens: int | None = None  # a token budget (``--tokens``), mapped by ``budget_kwargs``

    @classmethod
    def from_flags(
        cls, reducer: str | None, kwargs: str | Mapping[str, Any] | None = None, tokens: int | None = None
    ) -> ReducerChoice | None:
        """The choice the flags make (``None`` when no ``--reducer`` is given).

        Raises:
            UserError: For a flag combination that cannot work or settings that are not a JSON object.
            ReducerConfigError: For an unknown reducer name (listing the valid ones).
        """
        if reducer is None:
            if kwargs is not None or tokens is not None:
                raise UserError("--reducer-kwargs and --tokens go with --reducer NAME")
            return None
        if isinstance(kwargs, str):
            try:
                kwargs = json.loads(kwargs)
            except ValueError as err:
                raise UserError(f"--reducer-kwargs must be a JSON object, got {kwargs!r} ({err})") from None
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise UserError(f"--reducer-kwargs must be a JSON object, got {kwargs!r}")
        if reducer == NONE:
            if kwargs is not None or tokens is not None:
                raise UserError("--reducer none takes no --reducer-kwargs or --tokens")
            return cls(None)
        get_reducer_class(reducer)  # an unknown name lists the valid ones
        if kwargs is not None and tokens is not None:
            raise UserError("--tokens chooses the reducer's settings itself: give --tokens or --reducer-kwargs")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise UserError(f"--tokens must be a positive number of image tokens, got {tokens!r}")
        return cls(reducer, dict(kwargs) if kwargs is not None else None, tokens)

    def resolve(self, config: LlavaStfConfig) -> ResolvedReducer:
        """This choice on a checkpoint whose config is ``config``.

        Raises:
            ReducerConfigError: The reducer cannot run on this checkpoint (projector, towers), the budget is out of
                range, or the reducer has no budget (an adaptive count); the message names the field.
        """
        if self.name is None:
            kwargs = None
        elif self.tokens is not None:
            kwargs = budget_kwargs(self.name, self.tokens, config.reducer_shapes())
        else:
            kwargs = self.kwargs
        reduced = config.with_reducer(self.name, kwargs)
        resolved = dict(reduced.reducer_kwargs) if reduced.reducer_type else {}
        own = (config.reducer_type, dict(config.reducer_kwargs) if config.reducer_type else {})
        changed = (reduced.reducer_type, resolved) != own
        return ResolvedReducer(reduced.reducer_type, resolved, self.tokens, self.kwargs is not None, changed, reduced)


def add_reducer_flags(parser: argparse.ArgumentParser) -> None:
    """``--reducer``, ``--reducer-kwargs`` and ``--tokens``: what eval and chat take (``choice_from_args``)."""
    parser.add_argument(
        "--reducer",
        help=f"run the checkpoint with this token reducer ({', '.join(REDUCERS)}; '{NONE}' removes one it has)",
    )
    parser.add_argument("--reducer-kwargs", help='the reducer\'s settings as JSON, e.g. \'{"k": 3, "r": 0.75}\'')
    parser.add_argument("--tokens", type=int, help="token budget: the reducer's settings for N image tokens")


def choice_from_args(args: argparse.Namespace) -> ReducerChoice | None:
    return ReducerChoice.from_flags(args.reducer, args.reducer_kwargs, args.tokens)


def share_weights(variant: LlavaStfForConditionalGeneration, source: LlavaStfForConditionalGeneration) -> None:
    """Give ``variant`` (built on the meta device) ``source``'s vision tower, projector and LM head modules (and
    AnyRes' ``image_newline``) and its language model's tensors: the same tensors, not copies, in ``variant``'s own
    decoder-layer modules (so an in-LLM reducer's hooks stay its own)."""
    inner, base = variant.model, source.model
    inner.vision_tower, inner.multi_modal_projector = base.vision_tower, base.multi_modal_projector
    if getattr(base, "image_newline", None) is not None:
        inner.image_newline = base.image_newline
    variant.config.vision_config = source.config.vision_config  # the shared tower's own config object
    variant.lm_head = source.lm_head
    inner.language_model.load_state_dict(base.language_model.state_dict(), assign=True)
    inner.language_model.rotary_emb = base.language_model.rotary_emb  # its buffers are not in the state dict


def reducer_variant(
    model: LlavaStfForConditionalGeneration, processor: LlavaStfProcessor, config: LlavaStfConfig
) -> tuple[LlavaStfForConditionalGeneration, LlavaStfProcessor]:
    """``model`` with ``config``'s reducer, sharing all of ``model``'s weights; a processor with its token count.

    The new model (``generation_class(config)``: 1.5 or AnyRes) is built on the meta device and takes ``model``'s
    vision tower, projector and LM head modules and its language model's tensors (its own decoder-layer modules, so
    an in-LLM reducer's hooks stay its own). An AnyRes processor gets ``config.reduced_crop_tokens``.

    Raises:
        ValueError: If the reducer holds tensors that cannot be built this way.
    """
    same = (config.reducer_type, config.reducer_kwargs) == (model.config.reducer_type, model.config.reducer_kwargs)
    if same:
        return model, processor
    with torch.device("meta"):
        variant = generation_class(config)(config)
    share_weights(variant, model)
    inner = variant.model
    reducer = build_reducer(config.reducer_type, config.reducer_kwargs, config.reducer_shapes())
    inner.reducer = reducer.to(model.device) if reducer is not None else None
    if isinstance(inner.language_model, TokenDropLlamaModel):
        inner.language_model.reducer = inner.reducer  # the real one, not its meta twin
    variant.generation_config = model.generation_config
    meta = [n for n, t in (*variant.named_parameters(), *variant.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(f"reducer_type '{config.reducer_type}' holds tensors that cannot be shared: {meta[:3]}")
    if config.anyres:
        return variant.eval(), processor.with_reduced_crops(config.reduced_crop_tokens)
    out = copy.copy(processor)
    out.num_image_tokens = config.num_image_tokens
    return variant.eval(), out


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


__all__ = [
    "NONE",
    "ReducerChoice",
    "ResolvedReducer",
    "add_reducer_flags",
    "choice_from_args",
    "reducer_variant",
    "share_weights",
]
