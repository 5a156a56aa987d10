"""Multi-head [CLS] attention of one CLIP encoder block, recomputed from its own weights (no hooks, no patches).

VisionZip (arXiv 2412.04467, dvlab-research/VisionZip ``visionzip/utils.py``), FasterVLM (arXiv 2412.01818 v1,
Theia-4869/FasterVLM ``llava/model/multimodal_encoder/clip_encoder.py``) and VisPruner (arXiv 2412.01818 v2,
Theia-4869/VisPruner, same file) score patches with the CLS row of the attention probabilities of the encoder block
that outputs LLaVA's feature layer: upstream they read ``attentions[-2]`` of the tower run with
``output_attentions=True`` (eager attention only). Here the same numbers come from the block's ``layer_norm1`` ->
``q_proj`` (CLS row only) / ``k_proj`` (all ``N + 1`` tokens), split into heads, scaled by ``head_dim ** -0.5`` and
softmaxed over all ``N + 1`` keys, so the tower may run with SDPA. VisionZip also uses that block's keys averaged
over heads as its merge metric (upstream ``raw_key_states.mean(1)``).

PruMerge's single-head variant (one head over the full width) stays in :mod:`.prumerge`.
"""

from __future__ import annotations

import torch
from torch import nn


def cls_attention_heads(attn_input: torch.Tensor, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head CLS-to-patch attention probabilities of a CLIP encoder block, and its per-head keys.

    Args:
        attn_input: ``[B, N + 1, C]`` the hidden state the block consumes (CLS first).
        block: a CLIP encoder layer (``layer_norm1``, ``self_attn`` with ``q_proj``, ``k_proj``, ``num_heads``).

    Returns:
        ``(probs [B, H, N] float32, keys [B, N + 1, H, C / H])``: the CLS row of each head's softmax over all
        ``N + 1`` keys, patch columns only (each head's row sums to 1 minus its CLS-to-CLS weight), and the
        ``k_proj`` output (bias included) split into heads.
    """
    heads = int(block.self_attn.num_heads)
    b, t, width = attn_input.shape
    head_dim = width // heads
    hidden = block.layer_norm1(attn_input)
    q_cls = block.self_attn.q_proj(hidden[:, :1]).view(b, heads, 1, head_dim)  # [B, H, 1, d]
    keys = block.self_attn.k_proj(hidden).view(b, t, heads, head_dim)  # [B, N + 1, H, d]
    logits = q_cls.float() @ keys.float().permute(0, 2, 3, 1)  # [B, H, 1, N + 1]
    probs = (logits.squeeze(2) * head_dim**-0.5).softmax(dim=-1)
    return probs[..., 1:], keys


def head_mean_keys(keys: torch.Tensor) -> torch.Tensor:
    """``[B, N, C / H]`` patch keys averaged over heads, from ``keys [B, N + 1, H, C / H]`` (CLS row dropped)."""
    return keys[:, 1:].mean(dim=2)


def cls_attention_macs(num_patches: int, vision_hidden: int) -> int:
    """Multiply-accumulates of :func:`cls_attention_heads` for one image: ``q_proj`` on CLS, ``k_proj`` on all
    ``N + 1`` tokens and the CLS row of ``q k^T`` over every head (``H x d = C`` per key)."""
    n, c = num_patches, vision_hidden
    return c * c + (n + 1) * c * c + (n + 1) * c


def top_patches(score: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, count]`` indices of each row's ``count`` highest scores (``score [B, N]``), ties to the lower index."""
    return score.argsort(dim=1, descending=True, stable=True)[:, :count]


def gather_tokens(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``features [B, N, C]`` rows at ``index [B, M]`` -> ``[B, M, C]``."""
    return features.gather(1, index[..., None].expand(-1, -1, features.shape[-1]))


def check_cls_input(reducer: str, features: torch.Tensor, attn_input: torch.Tensor) -> None:
    """The scoring hidden state must hold the CLS token plus one row per patch feature."""
    if attn_input.shape[:2] != (features.shape[0], features.shape[1] + 1):
        raise ValueError(
            f"{reducer} needs the CLS token: features {tuple(features.shape)} but the scoring hidden state is "
            f"{tuple(attn_input.shape)} (expected [{features.shape[0]}, {features.shape[1] + 1}, C])"
        )


def keep_by_cls_score(
    reducer: str, features: torch.Tensor, attn_input: torch.Tensor, block: nn.Module, choose
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of a reducer that keeps patches chosen from the head-mean [CLS] attention.

    Args:
        reducer: its name, for errors.
        features: ``[B, N, C_in]`` selected patch features (CLS dropped), what the projector would receive.
        attn_input: ``[B, N + 1, C]`` hidden state consumed by the scoring block (CLS first).
        block: the scoring CLIP encoder block.
        choose: ``score [B, N] -> index [B, k]``, the kept patches in output order.

    Returns:
        ``(tokens [B, k, C_in], valid [B, k])``, all valid.
    """
    check_cls_input(reducer, features, attn_input)
    probs, _ = cls_attention_heads(attn_input, block)
    tokens = gather_tokens(features, choose(probs.mean(dim=1)))
    return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
