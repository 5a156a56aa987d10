"""The token-reducer registry: ``REDUCERS`` maps a config name (``config.reducer_type``) to its class.

A reducer is chosen by config like a projector, recorded in ``config.json`` with its resolved settings
(``reducer_kwargs``), and validated against the projector and towers at construction. Adding one is one file plus
one line here. Never change what an existing name does: add a new name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Reducer, ReducerConfigError, ReducerParams
from .fastv import FastV, FastVParams, equivalent_tokens, fastv_score_macs, kept_image_tokens
from .prumerge import PruMerge, PruMergeParams, PruMergePlus, PruMergePlusParams, prumerge_macs
from .token_drop import DROP_STATE, DropState, forward_with_drop

if TYPE_CHECKING:
    from ..configuration_llava_stf import LlavaStfConfig

REDUCERS: dict[str, type[Reducer]] = {
    "prumerge": PruMerge,  # vision side: CLS-attention IQR outliers + key-kNN merge (adaptive, ~32 of 576)
    "prumerge_plus": PruMergePlus,  # PruMerge + spatially uniform supplement (adaptive, ~144 of 576)
    "fastv": FastV,  # inside the LLM: drop R of the image tokens after layer K-1 (defaults K=2, R=0.5)
}


def get_reducer_class(name: str) -> type[Reducer]:
    """Look up a reducer by name; an unknown name lists the valid ones."""
    try:
        return REDUCERS[name]
    except KeyError:
        raise ReducerConfigError(f"unknown reducer_type {name!r}; valid reducer types: {sorted(REDUCERS)}") from None


def build_reducer(config: LlavaStfConfig) -> Reducer | None:
    """The configured reducer (validated again), or ``None`` when ``config.reducer_type`` is unset."""
    if config.reducer_type is None:
        return None
    cls = get_reducer_class(config.reducer_type)
    params = cls.Params.from_kwargs(config.reducer_type, config.reducer_kwargs)
    cls.check_config(config.reducer_type, params, config)
    return cls(params)


__all__ = [
    "DROP_STATE",
    "REDUCERS",
    "DropState",
    "FastV",
    "FastVParams",
    "PruMerge",
    "PruMergeParams",
    "PruMergePlus",
    "PruMergePlusParams",
    "Reducer",
    "ReducerConfigError",
    "ReducerParams",
    "build_reducer",
    "equivalent_tokens",
    "fastv_score_macs",
    "forward_with_drop",
    "get_reducer_class",
    "kept_image_tokens",
    "prumerge_macs",
]
