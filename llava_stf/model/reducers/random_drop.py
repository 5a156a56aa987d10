"""Random pruning: keep ``tokens`` patches drawn uniformly at random, in raster order (a strong baseline).

UniPruneBench (Peng et al., arXiv 2511.02650; TianfanPeng/VLMUniPruneBench ``methods/Random_PreLLM.py``) finds
uniform random pruning before the LLM a strong baseline. There, each call draws
``torch.randperm`` from the global generator and keeps the permutation's order.

Here the draw is reproducible: the kept subset is a function of ``seed`` and the patch grid only (a CPU
``torch.Generator`` seeded with ``seed``, moved to the features' device), so it is the same for every image, on every
device, in any batch, alone or batched. Per-image draws from a hash of the features were rejected: features differ
in their last bits between batch sizes, devices and dtypes, so the draw would too. Over seeds, the expected score
equals the per-image draw's (each image's subset is uniform either way); only the spread across seeds is larger.
The kept patches go to the LLM in raster order (UniPruneBench keeps the random order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import ReducerParams, ReducerShapes, VisionReducer, check_budget, check_int


@dataclass
class RandomDropParams(ReducerParams):
    tokens: int = 64  # image tokens kept per image (exact; at most the grid's patches)
    seed: int = 0  # seeds the draw; the same patches are kept for every image


def random_patches(num_patches: int, tokens: int, seed: int) -> torch.Tensor:
    """``[tokens]`` ascending patch indices: the first ``tokens`` of a seeded uniform permutation (CPU)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_patches, generator=generator)[:tokens].sort().values


class RandomDrop(VisionReducer):
    """Random pruning: ``[B, N, C_in]`` patches -> ``[B, tokens, C_in]`` seeded random patches in raster order."""

    Params = RandomDropParams

    @classmethod
    def check(cls, reducer_type: str, params: RandomDropParams, shapes: ReducerShapes) -> None:
        cls.check_tokens(reducer_type, params.tokens, shapes)
        check_int("seed", params.seed, 0)
        cls.check_model(reducer_type, shapes)

    @classmethod
    def image_tokens(cls, params: RandomDropParams, shapes: ReducerShapes) -> int:
        return params.tokens

    @classmethod
    def budget_kwargs(cls, reducer_type: str, tokens: int, shapes: ReducerShapes) -> dict:
        """The budget is the kept count itself (the seed keeps its default)."""
        return {"tokens": check_budget(reducer_type, tokens, shapes.num_patches)}

    # own_macs: the default 0 (a draw and a gather, no multiply-accumulates)

    def forward(
        self, features: torch.Tensor, attn_input: torch.Tensor, block: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the seeded random patches of every image.

        Args:
            features: ``[B, N, C_in]`` selected patch features (what the projector would receive).
            attn_input: unused.
            block: unused.

        Returns:
            ``(tokens [B, tokens, C_in], valid [B, tokens])``: kept features in raster order; ``valid`` all true.
        """
        b, n, _ = features.shape
        index = random_patches(n, self.params.tokens, self.params.seed).to(features.device)
        return features[:, index], torch.ones(b, len(index), dtype=torch.bool, device=features.device)
