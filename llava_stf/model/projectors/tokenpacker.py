"""TokenPacker (Li et al., arXiv 2407.02392, Fig. 2): coarse point queries refined by region-to-point attention.

As CircleRadon/TokenPacker ``llava/model/multimodal_projector/builder.py`` (class ``TokenPacker``) and
``llava/model/multimodal_encoder/clip_encoder.py`` build it, per image with an ``H x W`` patch grid, scale ``s``:

- **queries** (``M = (H/s) * (W/s)``): the penultimate hidden state (the last entry of ``vision_feature_layer``),
  bilinearly downsampled to ``H/s x W/s`` (``F.interpolate(mode="bilinear")``, ``align_corners=False``, no
  antialias, computed in fp32), then ``Linear(C -> E, no bias)`` and ``LayerNorm(eps=1e-6)``;
- **keys / values**: every listed hidden state concatenated on channels (``[12, 16, 22, 23]``: ``L*C = 4096``), each
  through its own ``Linear(L*C -> E) -> GELU -> Linear(E -> E)`` and ``LayerNorm``;
- **region-to-point attention**: multi-head attention (8 heads; the in/out projections of ``nn.MultiheadAttention``)
  in which query ``(i, j)`` sees only the ``s*s`` keys of its region ``[s*i, s*i+s) x [s*j, s*j+s)`` of the
  full-resolution grid (regions are folded into the batch). No residual connection;
- **output**: ``Linear(E -> D) -> GELU -> Linear(D -> D)`` to the LLM width.

Initialisation follows the original's ``_init_weights``: every Linear ``trunc_normal(std=0.02)`` with zero bias,
LayerNorms one / zero, and the attention's packed in-projection ``nn.MultiheadAttention``'s own (Xavier-uniform over
``[3E, E]``, zero bias). The key part of the in-projection bias cannot change the output (softmax is shift-invariant)
and is kept for the original's parameter count (36,722,688 at 7B for every ``s``).

Upstream key names map one to one: ``q_proj_1 -> query_proj``, ``ln_q_1 -> query_norm``, ``k_proj_1 -> key_mlp``,
``ln_k_1 -> key_norm``, ``v_proj_1 -> value_mlp``, ``ln_v_1 -> value_norm``, ``clip_attn -> attn``, ``mlp -> mlp``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as hf_init

from .base import Projector, ProjectorConfigError, ProjectorParams, ProjectorShapes, check_positive_int, grid_to_tokens


@dataclass
class TokenPackerParams(ProjectorParams):
    scale: int = 2  # s: each query packs one s x s region; (H/s)*(W/s) tokens (s = 2 / 3 / 4: 144 / 64 / 36)
    num_levels: int | None = None  # hidden states concatenated for keys/values; None -> len(vision_feature_layer)
    embed_dim: int | None = None  # width of queries, keys, values and attention; None -> vision hidden (1024)
    heads: int = 8  # attention heads (the original: 1024 // 128)
    norm_eps: float = 1e-6  # epsilon of the query / key / value LayerNorms (the original: 1e-6)

    def resolve(self, shapes: ProjectorShapes) -> None:
        if self.num_levels is None:
            self.num_levels = shapes.num_layers
        if self.embed_dim is None:
            self.embed_dim = shapes.vision_hidden

    def validate(self, shapes: ProjectorShapes) -> None:
        for name in ("scale", "num_levels", "embed_dim", "heads"):
            check_positive_int(name, getattr(self, name))
        if shapes.grid_h % self.scale or shapes.grid_w % self.scale:
            raise ProjectorConfigError(
                f"projector_kwargs.scale={self.scale} does not divide the {shapes.grid_h}x{shapes.grid_w} patch grid "
                "(vision_config.image_size / vision_config.patch_size); choose a scale that divides it"
            )
        if self.num_levels != shapes.num_layers:
            raise ProjectorConfigError(
                f"projector_kwargs.num_levels={self.num_levels} but vision_feature_layer lists "
                f"{shapes.num_layers} hidden state(s); they must agree"
            )
        if self.embed_dim % self.heads:
            raise ProjectorConfigError(
                f"projector_kwargs.heads={self.heads} does not divide projector_kwargs.embed_dim={self.embed_dim}"
            )
        if not isinstance(self.norm_eps, (int, float)) or isinstance(self.norm_eps, bool) or self.norm_eps <= 0:
            raise ProjectorConfigError(f"projector_kwargs.norm_eps must be a positive number, got {self.norm_eps!r}")

    def num_image_tokens(self, grid_h: int, grid_w: int) -> int:
        return (grid_h // self.scale) * (grid_w // self.scale)

    def output_grid(self, grid_h: int, grid_w: int) -> tuple[int, int, int]:
        return grid_h // self.scale, grid_w // self.scale, 1


def default_levels(depth: int) -> list[int]:
    """Hidden states for keys/values, scaled from the original's ``[12, 16, 22, 23]`` of the 24-block CLIP.

    Rule: ``[depth // 2, 2 * depth // 3, depth - 2, depth - 1]`` (the last one, LLaVA's penultimate hidden state,
    also gives the queries). A 9-block tower gets ``[4, 6, 7, 8]``.
    """
    levels = [depth // 2, 2 * depth // 3, depth - 2, depth - 1]
    if len(set(levels)) != len(levels) or levels[0] < 1:
        raise ProjectorConfigError(
            f"tokenpacker's default vision_feature_layer {levels} needs a vision tower with at least 7 blocks "
            f"(vision_config.num_hidden_layers={depth}); pass vision_feature_layer explicitly"
        )
    return levels


def fold_regions(tokens: torch.Tensor, grid_h: int, grid_w: int, s: int) -> torch.Tensor:
    """``[B, H*W, E]`` row-major tokens to ``[B, M, s*s, E]``: region ``(i, j)`` row-major, its tokens row-major."""
    b, _, e = tokens.shape
    grid = tokens.reshape(b, grid_h // s, s, grid_w // s, s, e).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(b, (grid_h // s) * (grid_w // s), s * s, e)


class RegionAttention(nn.Module):
    """Multi-head attention of one query over its own ``R`` keys: ``[B, M, E], [B, M, R, E] x 2 -> [B, M, E]``.

    Parameters as ``nn.MultiheadAttention``: ``in_proj_weight [3E, E]`` (rows: q, k, v), ``in_proj_bias [3E]``,
    ``out_proj``. Scores are explicit matmuls (softmax in fp32 at least), so FLOP counters see them.
    """

    def __init__(self, embed_dim: int, heads: int, bias: bool = True):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.register_parameter("in_proj_bias", nn.Parameter(torch.empty(3 * embed_dim)) if bias else None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        b, m, e = query.shape
        h, d = self.heads, e // self.heads
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, wq, bq).reshape(b, m, h, 1, d)
        k = F.linear(key, wk, bk).reshape(b, m, -1, h, d).transpose(2, 3)  # [B, M, h, R, d]
        v = F.linear(value, wv, bv).reshape(b, m, -1, h, d).transpose(2, 3)
        scores = (q @ k.transpose(-1, -2)) * (d**-0.5)  # [B, M, h, 1, R]
        weights = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
        return self.out_proj((weights @ v).reshape(b, m, e))


class TokenPackerProjector(Projector):
    """``[B, H*W, L*C] -> [B, (H/s)*(W/s), D_text]``: 144 tokens at 336 px with s=2 (64 with s=3, 36 with s=4)."""

    Params = TokenPackerParams
    spatial = True

    def __init__(self, params: TokenPackerParams, shapes: ProjectorShapes, act: str = "gelu", bias: bool = True):
        super().__init__(params, shapes, act, bias)
        e, c_in, d = params.embed_dim, shapes.in_channels, shapes.text_hidden
        self.query_proj = nn.Linear(shapes.vision_hidden, e, bias=False)
        self.query_norm = nn.LayerNorm(e, eps=params.norm_eps)
        self.key_mlp = nn.Sequential(nn.Linear(c_in, e, bias=bias), self.make_act(), nn.Linear(e, e, bias=bias))
        self.key_norm = nn.LayerNorm(e, eps=params.norm_eps)
        self.value_mlp = nn.Sequential(nn.Linear(c_in, e, bias=bias), self.make_act(), nn.Linear(e, e, bias=bias))
        self.value_norm = nn.LayerNorm(e, eps=params.norm_eps)
        self.attn = RegionAttention(e, params.heads, bias)
        self.mlp = nn.Sequential(nn.Linear(e, d, bias=bias), self.make_act(), nn.Linear(d, d, bias=bias))
        self.reset_parameters()  # as the original's constructor does (also in_proj_weight, created empty)

    @classmethod
    def default_vision_layers(cls, params: TokenPackerParams, num_vision_blocks: int) -> list[int]:
        return default_levels(num_vision_blocks)

    def queries(self, features: torch.Tensor) -> torch.Tensor:
        """The coarse point queries: ``[B, H*W, L*C] -> [B, M, C]`` (last level, bilinear downsampling by s)."""
        s, gh, gw = self.params.scale, self.shapes.grid_h, self.shapes.grid_w
        grid = self.tokens_to_grid(features[..., -self.shapes.vision_hidden :])  # [B, C, H, W]
        grid = grid.to(torch.promote_types(grid.dtype, torch.float32))  # the original interpolates in fp32
        pooled = F.interpolate(grid, size=(gh // s, gw // s), mode="bilinear", align_corners=False)
        return grid_to_tokens(pooled).to(features.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Args: features ``[B, H*W, L*C]`` (the last ``C`` channels give the queries). Returns ``[B, M, D_text]``."""
        s, gh, gw = self.params.scale, self.shapes.grid_h, self.shapes.grid_w
        query = self.query_norm(self.query_proj(self.queries(features)))  # [B, M, E]
        key = fold_regions(self.key_norm(self.key_mlp(features)), gh, gw, s)  # [B, M, s*s, E]
        value = fold_regions(self.value_norm(self.value_mlp(features)), gh, gw, s)
        return self.mlp(self.attn(query, key, value))

    @torch.no_grad()
    def reset_parameters(self, layer: nn.Module | None = None) -> None:
        """The original's init (see the file docstring); ``layer``: one of this projector's modules, or all."""
        for module in self.modules() if layer is None else [layer]:
            if isinstance(module, nn.Linear):
                hf_init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    hf_init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                hf_init.ones_(module.weight)
                hf_init.zeros_(module.bias)
            elif isinstance(module, RegionAttention):
                hf_init.xavier_uniform_(module.in_proj_weight)
                if module.in_proj_bias is not None:
                    hf_init.zeros_(module.in_proj_bias)
