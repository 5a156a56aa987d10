"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): keep a maximally diverse subset of the image tokens.

The paper casts pruning as a Max-Min Diversity Problem (MMDP) and solves it greedily. As its code does
(vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``: ``pairwise_cosine_similarity`` and ``DivPrune``), per image:

1. distances ``D = 1 - cos(x_i, x_j)`` between all ``N`` token features;
2. first pick: the token farthest from its nearest other token (``argmax_j min_{i != j} D_ij``; the code takes the
   second smallest of each column, the smallest being the token itself);
3. then ``tokens - 1`` times: the token whose minimum distance to the chosen set is largest (``argmax``: the lowest
   index on a tie);
4. the kept tokens go to the LLM in their original (raster) order (the code sorts the kept indices).

Differences from the original, all deliberate: the original scores the projector's output (the LLM-space image
embeddings); a vision-side reducer here runs before the projector, so it scores the projector's input features
``[N, C_in]`` (for a per-patch projector both are per-patch features of the same tokens; the cosine geometry
differs). Distances are computed in float32 for the whole batch at once; the step-2 diagonal is excluded explicitly
and chosen tokens are never picked again, so the count is exactly ``tokens`` even with duplicate features. The
budget is the token count itself (the repository's LLaVA-1.5 scripts keep a ratio 0.098: ``round(0.098 * 576) = 56``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import MacDims, ReducerParams, ReducerShapes, VisionReducer, check_budget


@dataclass
class DivPruneParams(ReducerParams):
    tokens: int = 64  # image tokens kept per image (exact; at most the grid's patches)


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` float32 ``1 - cos`` between the tokens of each image in ``features [B, N, C]``."""
    unit = F.normalize(features.float(), dim=-1)
    return 1.0 - unit @ unit.transpose(1, 2)


def max_min_select(distances: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy max-min diverse subset, in pick order.

    Args:
        distances: ``[B, N, N]`` symmetric pairwise distances.
        count: tokens to pick per image (``1 .. N``).

    Returns:
        ``[B, count]`` token indices in the order they were picked.
    """
    b, n, _ = distances.shape
    rows = torch.arange(b, device=distances.device)
    eye = torch.eye(n, dtype=torch.bool, device=distances.device)
    nearest_other = distances.masked_fill(eye, float("inf")).amin(dim=1)  # [B, N]
    first = nearest_other.argmax(dim=1)  # a single token has no neighbour: inf, picked as index 0
    picks = [first]
    chosen = torch.zeros(b, n, dtype=torch.bool, device=distances.device)
    chosen[rows, first] = True
    to_set = distances[rows, first]  # [B, N] distance of every token to the chosen set
    for _ in range(count - 1):
        pick = to_set.masked_fill(chosen, float("-inf")).argmax(dim=1)
        picks.append(pick)
        chosen[rows, pick] = True
        to_set = torch.minimum(to_set, distances[rows, pick])
    return torch.stack(picks, dim=1)


class DivPrune(VisionReducer):
    """DivPrune: ``[B, N, C_in]`` patches -> ``[B, tokens, C_in]`` most diverse patches in raster order."""

    Params = DivPruneParams

    @classmethod
    def check(cls, reducer_type: str, params: DivPruneParams, shapes: ReducerShapes) -> None:
        cls.check_tokens(reducer_type, params.tokens, shapes)
        cls.check_model(reducer_type, shapes)

    @classmethod
    def image_tokens(cls, params: DivPruneParams, shapes: ReducerShapes) -> int:
        return params.tokens

    @classmethod
    def budget_kwargs(cls, reducer_type: str, tokens: int, shapes: ReducerShapes) -> dict:
        """The budget is the kept count itself (the paper states it as a ratio of the image tokens)."""
        return {"tokens": check_budget(reducer_type, tokens, shapes.num_patches)}

    @classmethod
    def own_macs(cls, params: DivPruneParams, shapes: ReducerShapes, dims: MacDims) -> int:
        """The ``N x N`` cosine similarities over ``C_in`` channels (norms and the greedy min / argmax not counted)."""
        return shapes.num_patches**2 * dims.feature_channels

    def forward(
        self, features: torch.Tensor, attn_input: torch.Tensor, block: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the ``tokens`` most diverse patches of each image.

        Args:
            features: ``[B, N, C_in]`` selected patch features (what the projector would receive).
            attn_input: unused (DivPrune scores features, not attention).
            block: unused.

        Returns:
            ``(tokens [B, tokens, C_in], valid [B, tokens])``: kept features in raster order; ``valid`` all true.
        """
        index = max_min_select(cosine_distances(features), self.params.tokens).sort(dim=1).values
        kept = features.gather(1, index[..., None].expand(-1, -1, features.shape[-1]))
        return kept, torch.ones(index.shape, dtype=torch.bool, device=features.device)
