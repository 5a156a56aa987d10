"""DART (Wen et al., EMNLP 2025, arXiv 2502.11494): after layer K-1, keep the image tokens least duplicated by pivots.

The rule (the paper's method, "Duplication-Aware Reduction of Tokens"; ZichenWen1/DART,
``get_retained_image_token`` in its LLaVA ``modeling_llama.py``), with ``K = 2`` and 4 + 4 pivots by default:

1. Pivots: the image tokens, and the text tokens after the image, whose key states at layer ``K - 1`` have the
   largest L1 norm (that layer's ``k_proj`` of its normed input, after RoPE, every head concatenated).
2. Each pivot in turn claims, among the image tokens not yet kept, those with the *lowest* cosine similarity to it,
   on layer ``K - 1``'s output passed through the model's final RMSNorm (the code's ``self.norm(layer_outputs[0])``).
3. The image pivots and every claimed token survive; text pivots are text and are kept anyway.

Layers ``0 .. K-1`` see every token, layers ``K ..`` the survivors at their original position ids (the code sets
``position_ids = keep_indexs``). No attention map is needed, so SDPA / FlashAttention stay usable. The dropping
itself is done by :class:`.language_model.TokenDropLlamaModel`.

Where this differs from the released code (which runs one sample whose image starts at the hard-coded index 35):

- the image span is each row's own (``DropView.image_mask``), so batches, left padding and text-only rows work;
  text pivots come from the row's real tokens after its first image token up to the last prompt token;
- the count is exact: ``round((1 - R) n)`` image tokens survive, image pivots included. The code keeps the image
  pivots plus ``floor(budget / P)`` tokens per pivot (``P`` pivots), e.g. 4 + 8 x 16 = 132 for "retain 128"; here
  the ``kept - image pivots`` claims are split over the pivots as evenly as possible (earlier ones take one more);
- pivots claim in ascending position order (the code iterates a Python ``set``); ties go to the lower position;
- the whole batch is chosen at once ("top ``c``" as ``rank < c``, the pivots' claims in turn over every row), so a
  GPU runs a fixed number of kernels with one host synchronisation (the rows' counts), whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .base import MacDims, ReducerParams, ReducerShapes, check_budget, check_fraction, check_int
from .fastv import kept_image_tokens
from .language_model import DropView, LLMReducer, gather_plan, host_tensor


@dataclass
class DARTParams(ReducerParams):
    k: int = 2  # K: layers 0..K-1 see every token; layer K-1's keys and output choose; K >= layers: no-op
    r: float = 0.778  # R (the code's reduction_ratio): kept image tokens = round((1 - R) n); 0.778 keeps 128 of 576
    image_pivots: int = 4  # image tokens with the largest key L1 norm used as pivots (kept themselves; >= 1)
    text_pivots: int = 4  # text tokens after the image with the largest key L1 norm used as pivots


class DART(LLMReducer):
    """Chooses pivots by key norm at layer ``K - 1`` and keeps the image tokens least similar to them."""

    Params = DARTParams

    @classmethod
    def check(cls, reducer_type: str, params: DARTParams, shapes: ReducerShapes) -> None:
        check_int("k", params.k, 1)
        check_fraction("r", params.r)
        check_int("image_pivots", params.image_pivots, 1)
        check_int("text_pivots", params.text_pivots, 0)
        cls.check_model(reducer_type, shapes)

    @classmethod
    def budget_kwargs(cls, reducer_type: str, tokens: int, shapes: ReducerShapes) -> dict:
        """``tokens`` image tokens kept after layer ``K = 2`` with 4 + 4 pivots (the paper's "retain 192/128/64").

        ``R = 1 - tokens / n``: 192 / 128 / 64 of 576 give ``R`` = 0.667 / 0.778 / 0.889, the code's ratios.
        """
        n = shapes.projector_tokens
        r = 1.0 - check_budget(reducer_type, tokens, n) / n
        return {"k": 2, "r": r, "image_pivots": 4, "text_pivots": 4}

    @classmethod
    def llm_schedule(cls, params: DARTParams, shapes: ReducerShapes, image_tokens: int) -> list[tuple[int, int]]:
        """All ``n`` image tokens in layers ``0 .. K-1``, ``round((1 - R) n)`` from layer ``K`` on."""
        kept = kept_image_tokens(image_tokens, params.r)
        if params.k >= shapes.num_text_layers or kept >= image_tokens:
            return [(0, image_tokens)]
        return [(0, image_tokens), (params.k, kept)]

    @classmethod
    def own_macs(cls, params: DARTParams, shapes: ReducerShapes, dims: MacDims) -> int:
        """``k_proj`` over the prompt at layer ``K - 1`` and each pivot's dot products with the image tokens."""
        n = dims.image_tokens
        if len(cls.llm_schedule(params, shapes, n)) == 1:
            return 0
        pivots = min(params.image_pivots, kept_image_tokens(n, params.r)) + min(params.text_pivots, dims.text_tokens)
        return (n + dims.text_tokens) * dims.text_hidden * dims.text_kv_hidden + pivots * n * dims.text_hidden

    def drop_layers(self) -> list[int]:
        """``[K]``, or nothing when nothing is pruned (K >= layers or R == 0)."""
        return [self.params.k] if self.params.k < self.shapes.num_text_layers and self.params.r > 0 else []

    @torch.no_grad()
    def select(self, view: DropView) -> torch.Tensor:
        """Survivors ``[B, T]``: every non-image token, the image pivots and the tokens they claim."""
        norms = rotated_keys(view.layer_input, view.layer, view.position_embeddings).float().abs().sum(dim=(1, 3))
        unit = F.normalize(view.model.norm(view.layer_output).float(), dim=-1)  # [B, T, D]
        image = view.image_mask
        ar = torch.arange(image.shape[1], device=image.device)
        first = torch.where(image, ar, image.shape[1]).amin(dim=1, keepdim=True)  # [B, 1]; T in text-only rows
        text = view.attention_mask & ~image & (ar > first) & (ar <= view.query_index[:, None])
        return ~image | self.keep_image(norms, unit, image, text)

    def keep_image(self, norms: torch.Tensor, unit: torch.Tensor, image: torch.Tensor, text: torch.Tensor):
        """``[B, T]`` bool: the image tokens each row keeps, for the whole batch at once.

        One host synchronisation reads each row's image and text counts; the counts of the rule (kept tokens, pivots,
        each pivot's quota of claims) follow on the host, as the published arithmetic, and go back in one copy that
        does not wait. On the device "the top ``c``" of a row is ``rank < c`` (``rank``: place in a stable descending
        sort, so ties go to the lower position), and the pivots claim in turn, each step over every row.

        Args:
            norms: ``[B, T]`` L1 norms of the key states.
            unit: ``[B, T, D]`` unit-length normed hidden states (cosine similarity is their dot product).
            image: ``[B, T]`` bool image tokens.
            text: ``[B, T]`` bool candidate text pivots.
        """
        counts, texts = torch.stack([image.sum(dim=1), text.sum(dim=1)]).tolist()  # the host synchronisation
        plans = [self.row_plan(n, m) for n, m in zip(counts, texts)]
        width = max(len(quota) for _, _, _, quota in plans)
        plan = host_tensor([[full, i, m, *quota, *[0] * (width - len(quota))] for full, i, m, quota in plans],
                           image.device)  # fmt: skip
        full, image_pivots, text_pivots, quota = plan[:, 0].bool(), plan[:, 1, None], plan[:, 2, None], plan[:, 3:]
        where, valid = gather_plan(image, max(counts))  # [B, V] each row's image positions in order
        image_pivot = valid & (ranks(norms.gather(1, where), valid) < image_pivots)  # [B, V]
        pivot = (text & (ranks(norms, text) < text_pivots)) | torch.zeros_like(image).scatter(1, where, image_pivot)
        t = image.shape[1]
        ar = torch.arange(t, device=image.device)
        pivots = torch.where(pivot, ar, t + ar).argsort(dim=1)[:, :width]  # [B, P] by position (padding: quota 0)
        similarity = rows(unit, pivots) @ rows(unit, where).transpose(1, 2)  # [B, P, V]
        order = similarity.masked_fill(~valid[:, None], float("inf")).argsort(dim=-1, stable=True)  # least first
        free = valid & ~image_pivot  # [B, V] image tokens not kept yet
        for j in range(width):  # pivot j claims the first quota[:, j] free tokens of its order
            free_in_order = free.gather(1, order[:, j])
            free = free.scatter(1, order[:, j], free_in_order & (free_in_order.cumsum(dim=1) > quota[:, j, None]))
        return torch.where(full[:, None], image, torch.zeros_like(image).scatter(1, where, valid & ~free))

    def row_plan(self, n: int, text: int) -> tuple[bool, int, int, list[int]]:
        """One row's ``(keeps every image token, image pivots, text pivots, claims of each pivot in position order)``
        with ``n`` image tokens and ``text`` candidate text pivots."""
        kept = kept_image_tokens(n, self.params.r)
        if kept >= n:
            return True, 0, 0, []
        image_pivots, text_pivots = min(self.params.image_pivots, kept), min(self.params.text_pivots, text)
        pivots, claims = image_pivots + text_pivots, kept - image_pivots
        quota = [claims // pivots + int(j < claims % pivots) for j in range(pivots)]
        return False, image_pivots, text_pivots, quota


def ranks(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` place of each position among ``allowed`` ones by descending ``scores`` (ties: lower position first).

    Positions not allowed come after every allowed one, so ``rank < c`` picks a row's top ``c`` allowed positions.
    """
    order = scores.masked_fill(~allowed, float("-inf")).argsort(dim=1, descending=True, stable=True)
    return order.argsort(dim=1)


def rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for ``x [B, T, D]`` and ``index [B, R]``: ``[B, R, D]``."""
    return x.gather(1, index[..., None].expand(*index.shape, x.shape[-1]))


def rotated_keys(hidden: torch.Tensor, layer: nn.Module, position_embeddings) -> torch.Tensor:
    """A Llama layer's key states after RoPE, ``[B, H_kv, T, d]``, from its input ``hidden [B, T, D]``."""
    attn = layer.self_attn
    b, t, _ = hidden.shape
    keys = attn.k_proj(layer.input_layernorm(hidden)).view(b, t, -1, attn.head_dim).transpose(1, 2)
    cos, sin = (e.expand(b, -1, -1) for e in position_embeddings)
    _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
    return keys
