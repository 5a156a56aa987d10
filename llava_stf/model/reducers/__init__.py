"""The token-reducer registry: ``REDUCERS`` maps a config name (``config.reducer_type``) to its class.

A reducer is chosen by config like a projector, recorded in ``config.json`` with its resolved settings
(``reducer_kwargs``), and validated against the model's shapes at construction. Adding one is one file plus one line
here. Never change what an existing name does: add a new name.
"""

from __future__ import annotations

from typing import Any

from .base import (
    MacDims,
    Reducer,
    ReducerConfigError,
    ReducerParams,
    ReducerShapes,
    VisionReducer,
    check_budget,
    layer_average,
    token_layers,
)
from .dart import DART, DARTParams
from .divprune import DivPrune, DivPruneParams
from .fastervlm import FasterVLM, FasterVLMParams
from .fastv import FastV, FastVParams, equivalent_tokens, fastv_score_macs, kept_image_tokens
from .language_model import DropState, DropView, LLMReducer, TokenDropLlamaModel, install_llm_reducer
from .pool import Pool, PoolParams
from .prumerge import PruMerge, PruMergeParams, PruMergePlus, PruMergePlusParams, prumerge_macs
from .pyramiddrop import PyramidDrop, PyramidDropParams
from .random_drop import RandomDrop, RandomDropParams
from .sparsevlm import SparseVLM, SparseVLMParams
from .visionzip import VisionZip, VisionZipParams
from .vispruner import VisPruner, VisPrunerParams

REDUCERS: dict[str, type[Reducer]] = {
    "prumerge": PruMerge,  # vision side: CLS-attention IQR outliers + key-kNN merge (adaptive, ~32 of 576)
    "prumerge_plus": PruMergePlus,  # PruMerge + spatially uniform supplement (adaptive, ~144 of 576)
    "fastv": FastV,  # inside the LLM: drop R of the image tokens after layer K-1 (defaults K=2, R=0.5)
    "visionzip": VisionZip,  # vision side: CLS + top [CLS]-attention patches + key-merged contextual tokens (54 + 10)
    "fastervlm": FasterVLM,  # vision side: top-k patches by [CLS] attention, raster order (58 of 576)
    "vispruner": VisPruner,  # vision side: [CLS]-attention important + de-duplicated diverse patches (48 + 16)
    "divprune": DivPrune,  # vision side: greedy max-min cosine diversity subset of the patches (exact count)
    "random": RandomDrop,  # vision side: a seeded uniform random subset of the patches, raster order (baseline)
    "pool": Pool,  # vision side: 2-D average pooling of the patch grid to out_h x out_w (baseline)
    "sparsevlm": SparseVLM,  # inside the LLM: text raters prune after layers 2, 6, 15 (576 -> 300/200/110) + recycling
    "dart": DART,  # inside the LLM: after layer K-1 keep the image tokens least similar to key-norm pivots (K=2)
    "pyramiddrop": PyramidDrop,  # inside the LLM: keep a fraction λ of the image tokens after layers 8, 16, 24
}


def get_reducer_class(name: str) -> type[Reducer]:
    """Look up a reducer by name; an unknown name lists the valid ones."""
    try:
        return REDUCERS[name]
    except KeyError:
        raise ReducerConfigError(f"unknown reducer_type {name!r}; valid reducer types: {sorted(REDUCERS)}") from None


def reducer_params(name: str, kwargs: dict[str, Any] | None, shapes: ReducerShapes) -> ReducerParams:
    """``name``'s settings from ``kwargs`` (defaults filled in), checked against ``shapes``."""
    cls = get_reducer_class(name)
    params = cls.Params.from_kwargs(name, kwargs)
    cls.check(name, params, shapes)
    return params


def budget_kwargs(name: str, tokens: int, shapes: ReducerShapes) -> dict[str, Any]:
    """``name``'s settings for a budget of ``tokens`` image tokens (its paper's mapping), checked against ``shapes``."""
    kwargs = get_reducer_class(name).budget_kwargs(name, tokens, shapes)
    return reducer_params(name, kwargs, shapes).to_kwargs()


def build_reducer(name: str | None, kwargs: dict[str, Any] | None, shapes: ReducerShapes) -> Reducer | None:
    """The reducer called ``name`` (validated), or ``None`` when ``name`` is ``None``."""
    if name is None:
        return None
    return get_reducer_class(name)(reducer_params(name, kwargs, shapes), shapes)


__all__ = [
    "DART",
    "REDUCERS",
    "DivPrune",
    "DivPruneParams",
    "DARTParams",
    "DropState",
    "DropView",
    "FastV",
    "FasterVLM",
    "FasterVLMParams",
    "FastVParams",
    "LLMReducer",
    "MacDims",
    "Pool",
    "PoolParams",
    "PruMerge",
    "PruMergeParams",
    "PruMergePlus",
    "PruMergePlusParams",
    "RandomDrop",
    "RandomDropParams",
    "PyramidDrop",
    "PyramidDropParams",
    "Reducer",
    "ReducerConfigError",
    "ReducerParams",
    "ReducerShapes",
    "SparseVLM",
    "SparseVLMParams",
    "TokenDropLlamaModel",
    "VisPruner",
    "VisPrunerParams",
    "VisionReducer",
    "VisionZip",
    "VisionZipParams",
    "budget_kwargs",
    "build_reducer",
    "check_budget",
    "equivalent_tokens",
    "fastv_score_macs",
    "get_reducer_class",
    "install_llm_reducer",
    "kept_image_tokens",
    "layer_average",
    "token_layers",
    "prumerge_macs",
    "reducer_params",
]
