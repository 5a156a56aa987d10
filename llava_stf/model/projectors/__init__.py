"""The projector registry: ``PROJECTORS`` maps a config name to its class.

Adding a projector is one file plus one line here; the registry-parametrized tests pick it up. Never change what an
existing name builds (saved checkpoints depend on it): add a new name instead.
"""

from __future__ import annotations

from .base import Projector, ProjectorConfigError, ProjectorParams, ProjectorShapes
from .mbtf import MbtfProjector, MbtfStfProjector, evenly_spaced_blocks
from .mlp import Mlp2xGeluProjector
from .pooling import AvgPoolProjector, TokenConcatProjector
from .stf import StfProjector
from .tokenpacker import TokenPackerProjector

PROJECTORS: dict[str, type[Projector]] = {
    "mlp2x_gelu": Mlp2xGeluProjector,  # LLaVA-1.5 baseline, 576 tokens
    "avgpool": AvgPoolProjector,  # paper ablation: k x k average pooling + MLP
    "token_concat": TokenConcatProjector,  # paper ablation: k x k concatenation + MLP
    "stf": StfProjector,  # Spatial Token Fusion alone
    "mbtf": MbtfProjector,  # Multi-Block Token Fusion + MLP, 576 tokens
    "mbtf_stf": MbtfStfProjector,  # LLaVA-STF: MBTF then STF, 144 tokens
    "tokenpacker": TokenPackerProjector,  # TokenPacker (arXiv 2407.02392): region-to-point attention, 144/64/36
}


def get_projector_class(name: str) -> type[Projector]:
    """Look up a projector by name; an unknown name lists the valid ones."""
    try:
        return PROJECTORS[name]
    except KeyError:
        raise ProjectorConfigError(
            f"unknown projector_type {name!r}; valid projector types: {sorted(PROJECTORS)}"
        ) from None


__all__ = [
    "PROJECTORS",
    "Projector",
    "ProjectorConfigError",
    "ProjectorParams",
    "ProjectorShapes",
    "evenly_spaced_blocks",
    "get_projector_class",
]
