"""PruMerge and PruMerge+ (Shang et al., 2024, arXiv 2403.15388): adaptive vision-token pruning and merging.

They act before the projector. Per image, following 42Shawn/LLaVA-PruMerge (``llava/model/multimodal_encoder/
clip_encoder.py``, ``token_prune_merge_advanced`` and its ``_plus`` variant):

1. CLS attention from one encoder block, single head over the full width: ``a = softmax(q_cls k^T / sqrt(C))`` over
   all ``N + 1`` keys, keeping the ``N`` patch columns. ``q`` and ``k`` are that block's ``q_proj`` / ``k_proj`` of
   its ``layer_norm1`` input (computed here from the block's own weights; no hooks, no patches).
2. Adaptive count: ``n`` = number of entries strictly above ``Q3 + 1.5 (Q3 - Q1)`` (linear-interpolated quartiles);
   keep the top ``n`` by attention. PruMerge+ adds patches ``0, s, 2s, ... < N - 1`` with
   ``s = floor(floor(N / n) / 3)`` that are not already kept (after the attention-ordered ones, ascending).
3. Merge: each selected token ``i`` becomes ``x_i + sum_{j in knn(i)} a_j x_j`` over its 32 most key-cosine-similar
   other patches; one extra token ``sum_{j not selected} a_j x_j`` is appended. Neither sum is renormalised.

Unlike the original, statistics are computed per image (the original pools quartiles over the batch), the whole batch
is one set of tensor ops (tokens padded to the batch maximum, with a validity mask), the output order is selectable
(``attention`` as published, or ``raster``), and ``n`` is at least ``min_tokens`` (the original crashes in PruMerge+
when no outlier exists).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import MacDims, ReducerConfigError, ReducerParams, ReducerShapes, VisionReducer, check_int

ORDERS = ("attention", "raster")


@dataclass
class PruMergeParams(ReducerParams):
    attn_layer: int = -2  # hidden-state index; the encoder block that consumes it gives q/k (-2: the last block)
    knn: int = 32  # neighbours (key cosine similarity) merged into each selected token
    iqr_scale: float = 1.5  # upper fence Q3 + iqr_scale * (Q3 - Q1); tokens strictly above it are kept
    min_tokens: int = 1  # lower bound on the adaptive count n (the original has none)
    order: str = "attention"  # "attention": descending CLS attention (published); "raster": patch order


@dataclass
class PruMergePlusParams(PruMergeParams):
    uniform_divisor: int = 3  # uniform stride = floor(floor(N / n) / uniform_divisor) (published: 3)


def max_outliers(num_patches: int) -> int:
    """Most entries that can lie strictly above the 75th percentile of ``num_patches`` values (144 of 576)."""
    return num_patches - 1 - (3 * (num_patches - 1)) // 4


def cls_attention(attn_input: torch.Tensor, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-head CLS attention of a CLIP encoder block, and its patch keys.

    Args:
        attn_input: ``[B, N + 1, C]`` the hidden state the block consumes (CLS first).
        block: a CLIP encoder layer (``layer_norm1``, ``self_attn.q_proj``, ``self_attn.k_proj``).

    Returns:
        ``(attn [B, N] float32, keys [B, N, C])``: CLS-to-patch weights of a softmax over all ``N + 1`` keys, and
        the patch keys (``k_proj`` output, bias included).
    """
    hidden = block.layer_norm1(attn_input)
    q_cls = block.self_attn.q_proj(hidden[:, :1])  # [B, 1, C]
    keys = block.self_attn.k_proj(hidden)  # [B, N + 1, C]
    logits = (q_cls @ keys.transpose(1, 2)).squeeze(1).float() / math.sqrt(keys.shape[-1])
    return logits.softmax(dim=-1)[:, 1:], keys[:, 1:]


def iqr_outlier_counts(attn: torch.Tensor, scale: float = 1.5) -> torch.Tensor:
    """``[B]`` number of entries of each row of ``attn [B, N]`` strictly above ``Q3 + scale (Q3 - Q1)``."""
    quartiles = torch.quantile(attn.float(), attn.new_tensor([0.25, 0.75], dtype=torch.float32), dim=1)
    q1, q3 = quartiles[0], quartiles[1]
    return (attn > (q3 + scale * (q3 - q1))[:, None]).sum(dim=1)


class PruMerge(VisionReducer):
    """PruMerge: ``[B, N, C_in]`` patches -> ``[B, M, C_in]`` merged tokens + ``[B, M]`` validity (M <= N/4 + 1)."""

    Params = PruMergeParams
    adaptive = True
    needs_cls = True
    uniform_supplement: ClassVar[bool] = False
    # Published average (about 32 of 576 tokens kept, plus the extra one). Used only to assume a count for FLOPs.
    assumed_keep_ratio: ClassVar[float] = 32 / 576

    @classmethod
    def check(cls, reducer_type: str, params: PruMergeParams, shapes: ReducerShapes) -> None:
        check_int("knn", params.knn, 1)
        check_int("min_tokens", params.min_tokens, 1)
        if isinstance(params.iqr_scale, bool) or not isinstance(params.iqr_scale, (int, float)) or params.iqr_scale < 0:
            raise ReducerConfigError(f"reducer_kwargs.iqr_scale must be a number >= 0, got {params.iqr_scale!r}")
        if params.order not in ORDERS:
            raise ReducerConfigError(f"reducer_kwargs.order must be one of {ORDERS}, got {params.order!r}")
        if cls.uniform_supplement:
            check_int("uniform_divisor", params.uniform_divisor, 1)
        patches = shapes.num_patches
        cls.check_model(reducer_type, shapes)
        cls.check_attn_layer(params, shapes)
        if params.knn > patches - 1:
            raise ReducerConfigError(f"reducer_kwargs.knn={params.knn} exceeds the {patches - 1} other patches")
        if params.min_tokens > patches:
            raise ReducerConfigError(f"reducer_kwargs.min_tokens={params.min_tokens} exceeds the {patches} patches")

    @classmethod
    def max_selected(cls, params: PruMergeParams, num_patches: int) -> int:
        """Most tokens selected for one image (before the extra token)."""
        if cls.uniform_supplement:
            return num_patches
        return max(max_outliers(num_patches), params.min_tokens)

    @classmethod
    def image_tokens(cls, params: PruMergeParams, shapes: ReducerShapes) -> int:
        """The most tokens one image can get: every selected token plus the extra one."""
        return cls.max_selected(params, shapes.projector_tokens) + 1

    @classmethod
    def own_macs(cls, params: PruMergeParams, shapes: ReducerShapes, dims: MacDims) -> int:
        """Scoring and merging with ``dims.image_tokens - 1`` tokens selected (the last one is the extra token)."""
        return prumerge_macs(shapes.num_patches, dims.vision_hidden, dims.feature_channels, dims.image_tokens - 1)

    # -------------------------------------------------------------------------------------------------- steps
    def select(self, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Choose the tokens kept per image.

        Args:
            attn: ``[B, N]`` CLS attention.

        Returns:
            ``(index [B, M], valid [B, M], selected [B, N])``: selected patch indices in output order (rows padded
            to the batch maximum ``M``), which entries are real, and the selection as a patch mask.
        """
        b, n_patches = attn.shape
        p = torch.arange(n_patches, device=attn.device)
        counts = iqr_outlier_counts(attn, self.params.iqr_scale)
        counts = counts.clamp(self.params.min_tokens, max(max_outliers(n_patches), self.params.min_tokens))
        rank = attn.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # 0 = most attended
        kept = rank < counts[:, None]
        uniform = torch.zeros_like(kept)
        if self.uniform_supplement:
            stride = ((n_patches // counts) // self.params.uniform_divisor).clamp(min=1)
            uniform = (p[None] % stride[:, None] == 0) & (p[None] < n_patches - 1) & ~kept
        selected = kept | uniform
        if self.params.order == "attention":  # kept by attention, then the uniform ones ascending, then the rest
            key = torch.where(kept, rank, torch.where(uniform, n_patches + p, 2 * n_patches + p))
        else:
            key = torch.where(selected, p, n_patches + p)
        total = selected.sum(dim=1)
        width = int(total.max())
        index = key.argsort(dim=1)[:, :width]
        valid = torch.arange(width, device=attn.device)[None] < total[:, None]
        return index, valid, selected

    def merge_weights(
        self, attn: torch.Tensor, keys: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, selected: torch.Tensor
    ) -> torch.Tensor:
        """``[B, M + 1, N]`` weights: row r < count is ``e_i + sum_knn a_j e_j``, row ``count`` the extra token."""
        b, n_patches = attn.shape
        width = index.shape[1]
        unit = F.normalize(keys.float(), dim=-1)
        sim = unit.gather(1, index[..., None].expand(-1, -1, unit.shape[-1])) @ unit.transpose(1, 2)  # [B, M, N]
        sim = sim.scatter(2, index[..., None], float("-inf"))  # a token is not its own neighbour
        neighbours = sim.topk(self.params.knn, dim=-1).indices  # [B, M, knn]
        rows = torch.zeros(b, width, n_patches, device=attn.device, dtype=torch.float32)
        rows = rows.scatter(2, neighbours, attn.gather(1, neighbours.flatten(1)).view_as(neighbours))
        rows = rows.scatter(2, index[..., None], 1.0) * valid[..., None]
        rows = torch.cat([rows, rows.new_zeros(b, 1, n_patches)], dim=1)
        extra_row = torch.arange(width + 1, device=attn.device)[None] == valid.sum(dim=1)[:, None]  # [B, M + 1]
        extra = (attn * ~selected)[:, None]  # [B, 1, N]
        return torch.where(extra_row[..., None], extra, rows)

    def forward(
        self, features: torch.Tensor, attn_input: torch.Tensor, block: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduce one batch of images.

        Args:
            features: ``[B, N, C_in]`` selected patch features (CLS dropped), what the projector would receive.
            attn_input: ``[B, N + 1, C]`` hidden state consumed by the scoring block (CLS first).
            block: the scoring CLIP encoder block.

        Returns:
            ``(tokens [B, M + 1, C_in], valid [B, M + 1])``: per image its selected tokens (merged) then the extra
            token, padded to the batch maximum; ``valid`` marks the real rows (a prefix of each row).
        """
        if attn_input.shape[1] != features.shape[1] + 1:
            raise ValueError(
                f"{type(self).__name__} needs the CLS token: {features.shape[1]} patch features but the scoring "
                f"hidden state has {attn_input.shape[1]} tokens (expected {features.shape[1] + 1})"
            )
        attn, keys = cls_attention(attn_input, block)
        index, valid, selected = self.select(attn)
        weights = self.merge_weights(attn, keys, index, valid, selected)
        tokens = weights.to(features.dtype) @ features
        valid_out = torch.cat([valid, valid.new_zeros(valid.shape[0], 1)], dim=1)
        valid_out |= torch.arange(valid_out.shape[1], device=valid.device)[None] == valid.sum(dim=1)[:, None]
        return tokens, valid_out


class PruMergePlus(PruMerge):
    """PruMerge+: PruMerge plus a spatially uniform supplement (about 144 of 576 tokens kept on average)."""

    Params = PruMergePlusParams
    uniform_supplement = True
    assumed_keep_ratio = 144 / 576


def prumerge_macs(num_patches: int, vision_hidden: int, feature_channels: int, selected: int) -> int:
    """Multiply-accumulates of the reducer for one image with ``selected`` tokens kept (extra token not counted).

    ``q_proj`` on CLS, ``k_proj`` on all ``N + 1`` tokens, the CLS row of ``q k^T``, the key similarities of the
    selected tokens, and the merge as one ``[selected + 1, N] @ [N, C_in]`` product.
    """
    n, c = num_patches, vision_hidden
    return c * c + (n + 1) * c * c + (n + 1) * c + selected * n * c + (selected + 1) * n * feature_channels
