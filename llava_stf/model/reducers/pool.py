"""Plain 2-D average pooling of the patch grid: a training-free baseline.

VTC-Bench (arXiv 2510.07143) finds that plain image downsampling beats many token-compression methods, so any
comparison should include it. Here the ``grid_h x grid_w`` patch features (the projector's input) are averaged down
to an ``out_h x out_w`` grid with ``torch.nn.functional.adaptive_avg_pool2d`` (windows ``floor(i L / out) ..
ceil((i + 1) L / out)`` per axis: disjoint equal blocks when ``out`` divides ``L``, e.g. 24 -> 12, 8, 6; overlapping
ones otherwise, e.g. 24 -> 16) and passed on in raster order. UniPruneBench's ``pool_pre_llm``
(TianfanPeng/VLMUniPruneBench ``methods/Pool_PreLLM.py``) does the same with square targets only.

Budget: ``tokens`` becomes the factor pair ``out_h x out_w = tokens`` that fits the grid and whose aspect ratio is
closest to the grid's (a square when one exists: 64 -> 8x8, 144 -> 12x12, 36 -> 6x6); on a tie, the one with fewer
rows (24x24 grid: 128 -> 8x16, 192 -> 12x16). A budget with no such pair (a prime above the grid side, say) is an
error naming the nearest budgets that have one.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from .base import MacDims, ReducerConfigError, ReducerParams, ReducerShapes, VisionReducer, check_budget, check_int


@dataclass
class PoolParams(ReducerParams):
    out_h: int = 8  # rows of the pooled grid (at most grid_h)
    out_w: int = 8  # columns of the pooled grid (at most grid_w); image tokens = out_h * out_w


def pooled_grid(tokens: int, grid_h: int, grid_w: int) -> tuple[int, int] | None:
    """``(out_h, out_w)`` with ``out_h * out_w == tokens`` inside the grid, closest to its aspect ratio (ties: fewer
    rows), or ``None`` when no factor pair fits."""
    pairs = [(h, tokens // h) for h in range(1, grid_h + 1) if tokens % h == 0 and tokens // h <= grid_w]
    if not pairs:
        return None

    def skew(pair: tuple[int, int]) -> Fraction:  # >= 1; 1 when the pair has the grid's aspect ratio
        a, b = pair[0] * grid_w, pair[1] * grid_h
        return Fraction(max(a, b), min(a, b))

    return min(pairs, key=lambda pair: (skew(pair), pair[0]))


def window_sum(size: int, out: int) -> int:
    """Total length of the ``out`` adaptive-pooling windows over ``size`` inputs (``size`` when ``out`` divides it)."""
    return sum(-(-(i + 1) * size // out) - (i * size) // out for i in range(out))


class Pool(VisionReducer):
    """Average pooling: ``[B, grid_h * grid_w, C_in]`` patches -> ``[B, out_h * out_w, C_in]`` in raster order."""

    Params = PoolParams

    @classmethod
    def check(cls, reducer_type: str, params: PoolParams, shapes: ReducerShapes) -> None:
        axes = (("out_h", params.out_h, shapes.grid_h, "rows"), ("out_w", params.out_w, shapes.grid_w, "columns"))
        for name, value, limit, axis in axes:
            check_int(name, value, 1)
            if value > limit:
                raise ReducerConfigError(
                    f"reducer_kwargs.{name}={value} exceeds the {limit} {axis} of the "
                    f"{shapes.grid_h}x{shapes.grid_w} patch grid (reducer_type '{reducer_type}')"
                )
        cls.check_model(reducer_type, shapes)

    @classmethod
    def image_tokens(cls, params: PoolParams, shapes: ReducerShapes) -> int:
        return params.out_h * params.out_w

    @classmethod
    def budget_kwargs(cls, reducer_type: str, tokens: int, shapes: ReducerShapes) -> dict:
        """The pooled grid for ``tokens`` (see the module docstring); no fitting pair is an error naming neighbours."""
        check_budget(reducer_type, tokens, shapes.num_patches)
        grid = pooled_grid(tokens, shapes.grid_h, shapes.grid_w)
        if grid is None:
            nearest = []
            for candidates in (range(tokens - 1, 0, -1), range(tokens + 1, shapes.num_patches + 1)):
                found = next((t for t in candidates if pooled_grid(t, shapes.grid_h, shapes.grid_w)), None)
                if found is not None:
                    h, w = pooled_grid(found, shapes.grid_h, shapes.grid_w)
                    nearest.append(f"{found} ({h}x{w})")
            raise ReducerConfigError(
                f"token budget {tokens} for reducer_type '{reducer_type}' has no out_h x out_w factor pair within "
                f"the {shapes.grid_h}x{shapes.grid_w} patch grid; nearest valid budgets: {' and '.join(nearest)}"
            )
        return {"out_h": grid[0], "out_w": grid[1]}

    @classmethod
    def own_macs(cls, params: PoolParams, shapes: ReducerShapes, dims: MacDims) -> int:
        """One accumulate per input in each pooling window and channel (``N x C_in`` for disjoint windows); the
        division by the window size is not counted (like norms)."""
        rows, cols = window_sum(shapes.grid_h, params.out_h), window_sum(shapes.grid_w, params.out_w)
        return rows * cols * dims.feature_channels

    def forward(
        self, features: torch.Tensor, attn_input: torch.Tensor, block: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Average the patch grid of each image down to ``out_h x out_w``.

        Args:
            features: ``[B, grid_h * grid_w, C_in]`` selected patch features in raster order (CLS dropped).
            attn_input: unused.
            block: unused.

        Returns:
            ``(tokens [B, out_h * out_w, C_in], valid [B, out_h * out_w])``: pooled features in raster order;
            ``valid`` all true.
        """
        b, n, c = features.shape
        grid_h, grid_w = self.shapes.grid_h, self.shapes.grid_w
        if n != grid_h * grid_w:
            raise ValueError(f"{type(self).__name__} expects the {grid_h}x{grid_w} patch grid: got {n} patch features")
        grid = features.transpose(1, 2).reshape(b, c, grid_h, grid_w)
        pooled = F.adaptive_avg_pool2d(grid, (self.params.out_h, self.params.out_w)).flatten(2).transpose(1, 2)
        return pooled, torch.ones(pooled.shape[:2], dtype=torch.bool, device=features.device)
