"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs", ICCV 2025, arXiv 2412.01818 v2): important tokens by [CLS] attention plus diverse tokens by de-duplication.

Following Theia-4869/VisPruner (``llava/model/llava_arch.py`` ``encode_images``, ``clip_encoder.py``), per image:

1. Score: the CLS row of the attention of the block that outputs the feature layer (upstream ``attentions[-2]``:
   ``attn_layer = -3`` here), **mean over heads**. ``important = floor(tokens x important_ratio)`` (upstream
   ``int(T * r)``), ``diverse = tokens - important``. Sort patches by descending score: the first ``important`` are
   kept; the rest, in that order, are the residual list.
2. Diverse tokens: while the residual list (length ``R``) is longer than ``diverse``, one ToMe-style round on the
   cosine similarity of the **projector input features**: split the list into even positions ``a`` and odd positions
   ``b``, score each ``a`` by its best cosine similarity to any ``b``, **drop** (no merge) the
   ``r = min(duplicates_per_round, R - diverse)`` highest-scoring ``a`` tokens; the new list is the remaining ``a``
   tokens in descending score order, then all ``b`` tokens (this order decides the next round's split).
3. Output: important + diverse tokens in **raster (patch) order** (upstream applies a boolean index mask).

Example (README): 64 tokens, ``important_ratio = 0.75`` -> 48 important + 16 diverse; 128 tokens at 0.5 -> 64 + 64.
Budget mapping (``budget_kwargs``): ``tokens`` = the budget; ``important_ratio`` 0.75 at 64 tokens and 0.5 otherwise
(the README's two examples; 0.5 is also the evaluation scripts' default). The paper gives no other per-budget ratio.

Differences from upstream: ties go to the lower patch index / earlier list position (stable sorts); similarities are
float32; ``r`` is also capped at the number of ``a`` tokens ``ceil(R / 2)`` and ``a`` is ``ceil(R / 2)`` long when
``R`` is odd (upstream's indexing assumes ``R`` even and fails otherwise, e.g. an odd ``important``).
The rounds are a Python loop (their number depends only on the settings); images are batched within each round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    MacDims,
    ReducerParams,
    ReducerShapes,
    VisionReducer,
    check_budget,
    check_fraction,
    check_int,
)
from .cls_attention import cls_attention_macs, gather_tokens, keep_by_cls_score

PUBLISHED_RATIOS = {64: 0.75}  # README examples by budget; others use DEFAULT_RATIO
DEFAULT_RATIO = 0.5  # README's 128-token example and the evaluation scripts' default


@dataclass
class VisPrunerParams(ReducerParams):
    tokens: int = 64  # image tokens kept per image (important + diverse)
    important_ratio: float = 0.75  # share of tokens chosen by CLS attention (floor); the rest by de-duplication
    duplicates_per_round: int = 8  # most tokens dropped per bipartite matching round (upstream: 8)
    attn_layer: int = -3  # hidden state consumed by the scoring block (-3: block -2, upstream attentions[-2])


def split_counts(params: VisPrunerParams) -> tuple[int, int]:
    """``(important, diverse)`` token counts (upstream ``int(T * r)`` and ``T - int(T * r)``)."""
    important = int(params.tokens * params.important_ratio)
    return important, params.tokens - important


def matching_rounds(residual: int, diverse: int, per_round: int) -> list[tuple[int, int]]:
    """``[(R, r), ...]``: list length and tokens dropped in each de-duplication round (none when ``diverse`` is 0)."""
    rounds = []
    while diverse > 0:
        drop = min(per_round, residual - diverse, (residual + 1) // 2)
        if drop <= 0:
            break
        rounds.append((residual, drop))
        residual -= drop
    return rounds


class VisPruner(VisionReducer):
    """VisPruner: ``[B, N, C_in]`` patches -> ``[B, tokens, C_in]`` important + diverse patches, raster order."""

    Params = VisPrunerParams
    needs_cls = True

    @classmethod
    def check(cls, reducer_type: str, params: VisPrunerParams, shapes: ReducerShapes) -> None:
        check_int("tokens", params.tokens, 1)
        check_fraction("important_ratio", params.important_ratio)
        check_int("duplicates_per_round", params.duplicates_per_round, 1)
        cls.check_model(reducer_type, shapes)
        cls.check_attn_layer(params, shapes)
        cls.check_tokens(reducer_type, params.tokens, shapes)

    @classmethod
    def image_tokens(cls, params: VisPrunerParams, shapes: ReducerShapes) -> int:
        return params.tokens

    @classmethod
    def budget_kwargs(cls, reducer_type: str, tokens: int, shapes: ReducerShapes) -> dict:
        """``tokens`` kept; ``important_ratio`` from the README's examples (0.75 at 64 tokens, else 0.5)."""
        tokens = check_budget(reducer_type, tokens, shapes.num_patches)
        return {"tokens": tokens, "important_ratio": PUBLISHED_RATIOS.get(tokens, DEFAULT_RATIO)}

    @classmethod
    def own_macs(cls, params: VisPrunerParams, shapes: ReducerShapes, dims: MacDims) -> int:
        """CLS attention plus each round's ``[ceil(R/2), C_in] @ [C_in, floor(R/2)]`` similarity product."""
        important, diverse = split_counts(params)
        rounds = matching_rounds(shapes.num_patches - important, diverse, params.duplicates_per_round)
        matching = sum(((r + 1) // 2) * (r // 2) * dims.feature_channels for r, _ in rounds)
        return cls_attention_macs(shapes.num_patches, dims.vision_hidden) + matching

    # -------------------------------------------------------------------------------------------------- steps
    def select(self, score: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``[B, tokens]`` kept patch indices, ascending.

        Args:
            score: ``[B, N]`` head-mean CLS attention.
            features: ``[B, N, C_in]`` projector input features (cosine similarity for de-duplication).
        """
        important, diverse = split_counts(self.params)
        order = score.argsort(dim=1, descending=True, stable=True)
        kept, residual = order[:, :important], order[:, important:]
        if diverse > 0:
            unit = F.normalize(features.float(), dim=-1)
            for _, drop in matching_rounds(residual.shape[1], diverse, self.params.duplicates_per_round):
                tokens = gather_tokens(unit, residual)  # [B, R, C_in]
                best = (tokens[:, ::2] @ tokens[:, 1::2].transpose(1, 2)).max(dim=-1).values  # [B, ceil(R / 2)]
                survivors = best.argsort(dim=1, descending=True, stable=True)[:, drop:]
                residual = torch.cat([residual[:, ::2].gather(1, survivors), residual[:, 1::2]], dim=1)
            kept = torch.cat([kept, residual], dim=1)
        return kept.sort(dim=1).values

    def forward(
        self, features: torch.Tensor, attn_input: torch.Tensor, block: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [B, tokens, C_in], valid [B, tokens])``: the kept patches in raster order (see VisionReducer)."""
        return keep_by_cls_score(
            type(self).__name__, features, attn_input, block, lambda score: self.select(score, features)
        )
