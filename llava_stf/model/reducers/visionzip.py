"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025,
arXiv 2412.04467 §3.2): dominant tokens by [CLS] attention plus merged contextual tokens, before the projector.

Following dvlab-research/VisionZip (``visionzip/clip_encoder.py`` ``CLIPVisionTower_VisionZip.forward``,
``visionzip/utils.py``), per image, with ``dominant`` counting the CLS token (``visionzip(model, dominant=54,
contextual=10)`` keeps 53 patches + CLS + 10 contextual = 64 tokens):

1. Score: the CLS row of the attention of the encoder block that outputs the feature layer (upstream
   ``attentions[-2]``: block -2, which consumes hidden state -3, so ``attn_layer = -3`` here), patch columns,
   **summed over heads** (:mod:`.cls_attention`).
2. Dominant: the top ``dominant - 1`` patches by that score, plus the CLS token, whose feature is the CLS row of the
   feature layers (``cls_features``, which the model passes because ``needs_cls_features`` is set).
3. Contextual: the ``R = N - (dominant - 1)`` other patches in raster order; metric = that block's keys averaged over
   heads, L2-normalised. Targets are list positions ``0, s, 2s, ...`` (``s = max(1, R // contextual)``, first
   ``contextual`` of them); every other remaining patch is assigned to its most cosine-similar target (first on ties)
   and each contextual token is ``target + mean(assigned)`` (``target`` alone when nothing is assigned; the target
   itself is not part of the mean).
4. Output order, as upstream: CLS, the dominant patches in raster order, then the contextual tokens in target order.

Budgets (``budget_kwargs``): ``contextual = round(tokens x 10 / 64)`` (half up), ``dominant = tokens - contextual``:
64 = 54 + 10 (README), 128 = 108 + 20, 192 = 162 + 30 (the splits used by reproductions), about 5.4 : 1 elsewhere.
Differences from upstream: ties go to the lower patch index (stable sort), scores are softmaxed in float32, the
similarity is float32, and ``contextual = 0`` is allowed (dominant tokens only; upstream divides by it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import MacDims, ReducerConfigError, ReducerParams, ReducerShapes, VisionReducer, check_budget, check_int
from .cls_attention import check_cls_input, cls_attention_heads, cls_attention_macs, gather_tokens, head_mean_keys


@dataclass
class VisionZipParams(ReducerParams):
    dominant: int = 54  # dominant tokens, the CLS token included (README: 54 = 53 patches + CLS)
    contextual: int = 10  # contextual tokens merged from the rest (README: 10)
    attn_layer: int = -3  # hidden state consumed by the scoring block (-3: block -2, upstream attentions[-2])


def contextual_targets(remaining: int, contextual: int) -> torch.Tensor:
    """``[contextual]`` target positions in the list of ``remaining`` non-dominant patches (uniform stride)."""
    step = max(1, remaining // contextual)
    return torch.arange(0, remaining, step)[:contextual]


class VisionZip(VisionReducer):
    """VisionZip: ``[B, N, C_in]`` patches + CLS -> ``[B, dominant + contextual, C_in]`` tokens."""

    Params = VisionZipParams
    needs_cls = True
    needs_cls_features = True

    @classmethod
    def check(cls, reducer_type: str, params: VisionZipParams, shapes: ReducerShapes) -> None:
        check_int("dominant", params.dominant, 1)
        check_int("contextual", params.contextual, 0)
        cls.check_model(reducer_type, shapes)
        cls.check_attn_layer(params, shapes)
        if params.dominant - 1 + params.contextual > shapes.num_patches:
            raise ReducerConfigError(
                f"reducer_kwargs.dominant={params.dominant} (CLS included) and reducer_kwargs.contextual="
                f"{params.contextual} need {params.dominant - 1 + params.contextual} of the {shapes.num_patches} "
                "patches of one image"
            )

    @classmethod
    def image_tokens(cls, params: VisionZipParams, shapes: ReducerShapes) -> int:
        return params.dominant + params.contextual

    @classmethod
    def budget_kwargs(cls, reducer_type: str, tokens: int, shapes: ReducerShapes) -> dict:
        """``contextual = round(tokens x 10 / 64)``, the rest dominant: 54 + 10, 108 + 20, 162 + 30."""
        tokens = check_budget(reducer_type, tokens, shapes.num_patches)
        contextual = (tokens * 5 + 16) // 32
        return {"dominant": tokens - contextual, "contextual": contextual}

    @classmethod
    def own_macs(cls, params: VisionZipParams, shapes: ReducerShapes, dims: MacDims) -> int:
        """CLS attention, the ``[R - c, d] @ [d, c]`` key similarity (``d = C / H``) and the
        ``[c, R - c] @ [R - c, C_in]`` sum of assigned features (``c`` contextual, ``R`` non-dominant patches)."""
        macs = cls_attention_macs(shapes.num_patches, dims.vision_hidden)
        c = params.contextual
        if c == 0:
            return macs
        others = shapes.num_patches - (params.dominant - 1) - c
        return macs + others * c * (dims.vision_hidden // dims.vision_heads) + c * others * dims.feature_channels

    # -------------------------------------------------------------------------------------------------- steps
    def split(self, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dominant [B, dominant - 1], remaining [B, R])`` patch indices, each ascending, from ``score [B, N]``."""
        n_patches = score.shape[1]
        chosen = self.params.dominant - 1
        top = score.argsort(dim=1, descending=True, stable=True)[:, :chosen]
        is_dominant = torch.zeros_like(score, dtype=torch.bool).scatter(1, top, True)
        p = torch.arange(n_patches, device=score.device)
        raster = torch.where(is_dominant, p, n_patches + p).argsort(dim=1)  # dominant first, each group ascending
        return raster[:, :chosen], raster[:, chosen:]

    def contextual_tokens(self, features: torch.Tensor, metric: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
        """``[B, contextual, C_in]`` merged tokens.

        Args:
            features: ``[B, N, C_in]`` patch features.
            metric: ``[B, N, d]`` head-mean keys of the patches.
            remaining: ``[B, R]`` non-dominant patch indices, ascending.
        """
        c, r = self.params.contextual, remaining.shape[1]
        targets = contextual_targets(r, c).to(remaining.device)
        is_target = torch.zeros(r, dtype=torch.bool, device=remaining.device).scatter(0, targets, True)
        target_idx, other_idx = remaining[:, targets], remaining[:, ~is_target]  # [B, c], [B, R - c]
        unit = F.normalize(metric.float(), dim=-1)
        sim = gather_tokens(unit, other_idx) @ gather_tokens(unit, target_idx).transpose(1, 2)  # [B, R - c, c]
        assign = F.one_hot(sim.argmax(dim=2), c).to(features.dtype)  # [B, R - c, c]
        counts = assign.sum(dim=1).clamp(min=1)[..., None]  # [B, c, 1]
        merged = (assign.transpose(1, 2) @ gather_tokens(features, other_idx)) / counts
        return gather_tokens(features, target_idx) + merged

    def forward(
        self,
        features: torch.Tensor,
        attn_input: torch.Tensor,
        block: nn.Module,
        cls_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduce one batch of images.

        Args:
            features: ``[B, N, C_in]`` selected patch features (CLS dropped), what the projector would receive.
            attn_input: ``[B, N + 1, C]`` hidden state consumed by the scoring block (CLS first).
            block: the scoring CLIP encoder block.
            cls_features: ``[B, C_in]`` the CLS row of the feature layers (same channel layout as ``features``).

        Returns:
            ``(tokens [B, dominant + contextual, C_in], valid)``: CLS, dominant patches (raster order), contextual
            tokens (target order); ``valid`` all true.
        """
        check_cls_input(type(self).__name__, features, attn_input)
        if cls_features is None or cls_features.shape != (features.shape[0], features.shape[2]):
            got = None if cls_features is None else tuple(cls_features.shape)
            raise ValueError(
                f"VisionZip keeps the CLS token, so it needs cls_features [{features.shape[0]}, {features.shape[2]}] "
                f"(the CLS row of the feature layers), got {got}"
            )
        probs, keys = cls_attention_heads(attn_input, block)
        dominant, remaining = self.split(probs.sum(dim=1))
        parts = [cls_features[:, None], gather_tokens(features, dominant)]
        if self.params.contextual > 0:
            parts.append(self.contextual_tokens(features, head_mean_keys(keys), remaining))
        tokens = torch.cat(parts, dim=1)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
