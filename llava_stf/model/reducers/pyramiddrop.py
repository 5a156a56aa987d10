"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): drop image tokens in stages, a fraction λ kept each time.

The rule (the paper's method section; Cooperx521/PyramidDrop, ``pdrop_rank_drop`` in
``llava/model/modeling_llama_pdrop.py``): the LLM is cut into stages at ``layers`` (the code's ``layer_list``, default
``[8, 16, 24]``); at the end of each stage the image tokens that reach layer ``d`` are ranked by the attention of the
last instruction token (the last prompt token) to them, averaged over heads, using layer ``d``'s own
``input_layernorm`` / ``q_proj`` / ``k_proj`` and RoPE on its input, and the top ``λ`` of them survive; layers ``d ..``
run on the survivors. ``λ = 0.5`` keeps 50 / 25 / 12.5 % of the image tokens after layers 8 / 16 / 24 (the code's
``image_token_ratio_list [0.5, 0.25, 0.125]``). The scores are recomputed here for the query row only (no attention
map, SDPA / FlashAttention stay usable). The dropping itself is done by :class:`.language_model.TokenDropLlamaModel`.

Counts: each stage keeps ``round(λ c)`` of the ``c`` image tokens of a row that reach it (the code keeps
``int(n λ^s)`` of the ``n`` entering the LLM: the same for λ = 0.5 and 576 tokens). Stage layers at or beyond the
LLM's depth are ignored. Survivors keep their original position ids, as in every in-LLM reducer here (the code
renumbers them ``0 .. T'-1`` at each stage).

Budgets (:meth:`PyramidDrop.budget_kwargs`): a budget is the layer-averaged image-token count ``sum_l n_l / L``, the
convention of the tables that compare PDrop at 192 / 128 / 64 (PyramidDrop#22). With ``[8, 16, 24]`` no λ reaches
128 or 64 (at λ = 0 the first quarter alone averages 144; PyramidDrop#10). The author's recipe (PyramidDrop#29):
stages ``[2, 8, 16]`` and λ solved from the layer average (λ = 0.19 for 64). Scaled to depth ``L`` the stages are
``L/16, L/4, L/2`` (rounded, strictly ascending from 1); λ is the 4-decimal value whose realised average is closest
to the budget. On LLaVA-1.5-7B (576 tokens, 32 layers):

======  ==========  ======  ==========================  =============
budget  layers      λ       image tokens in each stage  layer average
======  ==========  ======  ==========================  =============
192     [2, 8, 16]  0.5598  576 / 322 / 180 / 101       191.875
128     [2, 8, 16]  0.4194  576 / 242 / 101 / 42        127.625
64      [2, 8, 16]  0.1919  576 / 111 / 21 / 4          64.0625
======  ==========  ======  ==========================  =============

Here the realised average is within half a token of each budget (tested); the full budget gives λ = 1, a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import (
    MacDims,
    ReducerConfigError,
    ReducerParams,
    ReducerShapes,
    check_budget,
    check_fraction,
    check_int,
    layer_average,
)
from .fastv import fastv_score_macs, query_attention
from .language_model import DropView, LLMReducer

BUDGET_STAGES = (1 / 16, 1 / 4, 1 / 2)  # budget_kwargs' stage layers as fractions of the depth ([2, 8, 16] of 32)


@dataclass
class PyramidDropParams(ReducerParams):
    layers: list[int] = field(default_factory=lambda: [8, 16, 24])  # layer_list: stage s ends after layer d_s - 1
    ratio: float = 0.5  # λ: each stage keeps round(λ c) of the c image tokens reaching it


def stage_keep(count: int, ratio: float) -> int:
    """Image tokens a stage keeps of the ``count`` reaching it: ``round(λ count)`` (half up)."""
    return int(ratio * count + 0.5)


class PyramidDrop(LLMReducer):
    """Ranks the image tokens by the last prompt token's attention at each stage's end and keeps a fraction λ."""

    Params = PyramidDropParams

    @classmethod
    def check(cls, reducer_type: str, params: PyramidDropParams, shapes: ReducerShapes) -> None:
        layers = params.layers
        if not isinstance(layers, list) or not layers:
            raise ReducerConfigError(f"reducer_kwargs.layers must be a non-empty list of layers, got {layers!r}")
        for layer in layers:
            check_int("layers[]", layer, 1)
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ReducerConfigError(f"reducer_kwargs.layers must be strictly ascending, got {layers}")
        check_fraction("ratio", params.ratio)
        cls.check_model(reducer_type, shapes)

    @classmethod
    def budget_kwargs(cls, reducer_type: str, tokens: int, shapes: ReducerShapes) -> dict:
        """Stages ``L/16, L/4, L/2`` and the λ whose layer-averaged image-token count is closest to ``tokens``.

        See the module docstring for the source (PyramidDrop#29) and the 7B table.
        """
        n, depth = shapes.projector_tokens, shapes.num_text_layers
        check_budget(reducer_type, tokens, n)
        layers = budget_layers(depth)
        if layers is None:
            raise ReducerConfigError(
                f"reducer_type '{reducer_type}' needs at least 4 text layers for its 3 budget stages, "
                f"text_config.num_hidden_layers is {depth}"
            )

        if tokens == n:
            return {"layers": layers, "ratio": 1.0}

        def average(step: int) -> float:
            params = PyramidDropParams(layers=layers, ratio=step / 10_000)
            return layer_average(cls.llm_schedule(params, shapes, n), depth)

        if tokens < average(0):
            raise ReducerConfigError(
                f"token budget {tokens} for reducer_type '{reducer_type}' is below {average(0):g}, the layer average "
                f"when every image token is dropped after layer {layers[0]} (stages {layers})"
            )
        low, high = 0, 10_000  # smallest 4-decimal λ whose average reaches the budget (the average rises with λ)
        while low < high:
            mid = (low + high) // 2
            low, high = (mid + 1, high) if average(mid) < tokens else (low, mid)
        if low > 0 and tokens - average(low - 1) <= average(low) - tokens:
            low -= 1
        return {"layers": layers, "ratio": low / 10_000}

    @classmethod
    def llm_schedule(cls, params: PyramidDropParams, shapes: ReducerShapes, image_tokens: int) -> list[tuple[int, int]]:
        """``n`` image tokens up to the first stage layer, then ``round(λ c)`` of the previous count at each stage."""
        schedule = [(0, image_tokens)]
        for layer in active_layers(params, shapes.num_text_layers):
            schedule.append((layer, stage_keep(schedule[-1][1], params.ratio)))
        return schedule

    @classmethod
    def own_macs(cls, params: PyramidDropParams, shapes: ReducerShapes, dims: MacDims) -> int:
        """One ranking per stage over the sequence reaching it (as FastV's: ``k_proj``, the query, its row)."""
        schedule = cls.llm_schedule(params, shapes, dims.image_tokens)
        return sum(
            fastv_score_macs(count + dims.text_tokens, dims.text_hidden, dims.text_kv_hidden)
            for _, count in schedule[:-1]
        )

    def drop_layers(self) -> list[int]:
        """The stage layers within the LLM's depth (none when λ = 1)."""
        return active_layers(self.params, self.shapes.num_text_layers)

    @torch.no_grad()
    def select(self, view: DropView) -> torch.Tensor:
        """Survivors ``[B, T]``: every non-image token and the ``round(λ c)`` best-attended image tokens of each row."""
        layer = view.model.layers[view.layer_index + 1]  # the stage's first layer ranks, on its own input
        scores = query_attention(view.layer_output, layer, view.position_embeddings, view.attention_mask,
                                 view.query_index)  # fmt: skip
        counts = view.image_mask.sum(dim=1).tolist()
        kept = torch.tensor([stage_keep(c, self.params.ratio) for c in counts], device=scores.device)
        rank = scores.masked_fill(~view.image_mask, float("-inf")).argsort(dim=1, descending=True, stable=True)
        return ~view.image_mask | (rank.argsort(dim=1) < kept[:, None])


def active_layers(params: PyramidDropParams, depth: int) -> list[int]:
    """Stage layers below ``depth`` (none when λ = 1: nothing is dropped)."""
    return [layer for layer in params.layers if layer < depth] if params.ratio < 1 else []


def budget_layers(depth: int) -> list[int] | None:
    """``BUDGET_STAGES`` of ``depth`` rounded, each at least one past the previous; ``None`` if they do not fit."""
    layers: list[int] = []
    for fraction in BUDGET_STAGES:
        layers.append(max(int(fraction * depth + 0.5), layers[-1] + 1 if layers else 1))
    return layers if layers[-1] < depth else None
