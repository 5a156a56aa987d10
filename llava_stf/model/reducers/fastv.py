"""FastV (Chen et al., 2024, arXiv 2403.06764): drop the least-attended image tokens after layer K-1 of the LLM.

Ranking (the paper's section 4; pkunlp-icler/FastV): the attention probabilities of layer ``K - 1`` from the last
prompt token to every key, averaged over heads; the ``R`` fraction of each sample's image tokens with the lowest
scores is dropped. Layers ``0 .. K-1`` see every token, layers ``K ..`` only the survivors, which keep their original
position ids (RoPE stays consistent). The scores are computed here from layer ``K - 1``'s own ``q_proj`` /
``k_proj`` for the query row only (``softmax(q_last K^T / sqrt(d_head))``), so SDPA / FlashAttention stay usable and
no attention map is materialised; the rule is applied per sample (the original uses batch element 0); and under a KV
cache the pruning happens once, at prefill (as the static-cache variant of the original). The dropping itself is
done by :class:`.language_model.TokenDropLlamaModel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from .base import MacDims, ReducerParams, ReducerShapes, check_budget, check_fraction, check_int
from .language_model import DropView, LLMReducer


@dataclass
class FastVParams(ReducerParams):
    k: int = 2  # K: layers 0..K-1 see every token; layer K-1's attention ranks the image tokens; K >= layers: no-op
    r: float = 0.5  # R: fraction of each sample's image tokens dropped (kept = round((1 - R) * image tokens))


def kept_image_tokens(num_image_tokens: int, r: float) -> int:
    """Image tokens that survive pruning: ``round((1 - r) * n)`` (half up), as the HF port."""
    return int((1.0 - r) * num_image_tokens + 0.5)


class FastV(LLMReducer):
    """Scores image tokens at layer ``K - 1`` and names the survivors; the language model drops the rest."""

    Params = FastVParams

    @classmethod
    def check(cls, reducer_type: str, params: FastVParams, shapes: ReducerShapes) -> None:
        check_int("k", params.k, 1)
        check_fraction("r", params.r)
        cls.check_model(reducer_type, shapes)

    @classmethod
    def budget_kwargs(cls, reducer_type: str, tokens: int, shapes: ReducerShapes) -> dict:
        """``tokens`` image tokens kept after layer ``K = 2`` (the paper's setting): ``R = 1 - tokens / n``."""
        n = shapes.projector_tokens
        return {"k": 2, "r": 1.0 - check_budget(reducer_type, tokens, n) / n}

    @classmethod
    def llm_schedule(cls, params: FastVParams, shapes: ReducerShapes, image_tokens: int) -> list[tuple[int, int]]:
        """All ``n`` image tokens in layers ``0 .. K-1``, ``round((1 - R) n)`` from layer ``K`` on."""
        kept = kept_image_tokens(image_tokens, params.r)
        if params.k >= shapes.num_text_layers or kept == image_tokens:
            return [(0, image_tokens)]
        return [(0, image_tokens), (params.k, kept)]

    @classmethod
    def own_macs(cls, params: FastVParams, shapes: ReducerShapes, dims: MacDims) -> int:
        """One ranking at layer ``K - 1`` over the prompt (nothing when nothing is dropped)."""
        if len(cls.llm_schedule(params, shapes, dims.image_tokens)) == 1:
            return 0
        return fastv_score_macs(dims.image_tokens + dims.text_tokens, dims.text_hidden, dims.text_kv_hidden)

    def drop_layers(self) -> list[int]:
        """``[K]``, or nothing when nothing is pruned (K >= layers or R == 0)."""
        return [self.params.k] if self.params.k < self.shapes.num_text_layers and self.params.r > 0 else []

    def select(self, view: DropView) -> torch.Tensor:
        """Survivors ``[B, T]``: every non-image token and the top ``round((1 - R) n)`` image tokens of each row."""
        scores = self.scores(view.layer_input, view.layer, view.position_embeddings, view.attention_mask,
                             view.query_index)  # fmt: skip
        return self.keep_mask(scores, view.image_mask)

    def scores(self, hidden, layer, position_embeddings, attention_mask, query_index) -> torch.Tensor:
        """``[B, T]`` head-averaged attention of each row's query at ``layer`` (see :func:`query_attention`)."""
        return query_attention(hidden, layer, position_embeddings, attention_mask, query_index)

    def keep_mask(self, scores: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` positions that survive: every non-image token and the top-scored image tokens of each row."""
        counts = image_mask.sum(dim=1)
        kept = torch.tensor(
            [kept_image_tokens(int(n), float(self.params.r)) for n in counts.tolist()], device=scores.device
        )
        ranked = scores.masked_fill(~image_mask, float("-inf"))
        rank = ranked.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        return ~image_mask | (rank < kept[:, None])


@torch.no_grad()
def query_attention(
    hidden: torch.Tensor,
    layer: nn.Module,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor,
    query_index: torch.Tensor,
) -> torch.Tensor:
    """Head-averaged attention of each row's query token to every position, as ``layer`` would compute it.

    Args:
        hidden: ``[B, T, D]`` the layer's input hidden states.
        layer: a Llama decoder layer (its ``input_layernorm`` and ``self_attn`` projections are used).
        position_embeddings: RoPE ``(cos, sin)``, each ``[B or 1, T, d_head]``.
        attention_mask: ``[B, T]`` bool real tokens.
        query_index: ``[B]`` position of each row's query (the last prompt token).

    Returns:
        ``[B, T]`` float32 probabilities (zero at padding and after the query).
    """
    attn = layer.self_attn
    b, t, _ = hidden.shape
    rows = torch.arange(b, device=hidden.device)
    normed = layer.input_layernorm(hidden)
    keys = attn.k_proj(normed).view(b, t, -1, attn.head_dim).transpose(1, 2)  # [B, H_kv, T, d]
    query = attn.q_proj(normed[rows, query_index][:, None]).view(b, 1, -1, attn.head_dim).transpose(1, 2)
    cos, sin = (e.expand(b, -1, -1) for e in position_embeddings)
    _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
    query, _ = apply_rotary_pos_emb(query, query, cos[rows, query_index][:, None], sin[rows, query_index][:, None])
    logits = (query @ repeat_kv(keys, attn.num_key_value_groups).transpose(2, 3)).float() * attn.scaling
    allowed = attention_mask.bool() & (torch.arange(t, device=hidden.device)[None] <= query_index[:, None])
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1).squeeze(1)


def fastv_score_macs(n_tokens: int, hidden: int, kv_hidden: int) -> int:
    """MACs of one ranking: ``k_proj`` over ``n`` tokens, ``q_proj`` of the query, and its row of ``q K^T``."""
    return n_tokens * hidden * kv_hidden + hidden * hidden + n_tokens * hidden


def equivalent_tokens(image_tokens: int, kept: int, k: int, num_layers: int) -> float:
    """Layer-averaged visual tokens ``(K n + (L - K) kept) / L`` (SparseVLM-style tables; FastV K=2 keep 144: 171)."""
    k = min(k, num_layers)
    return (k * image_tokens + (num_layers - k) * kept) / num_layers
