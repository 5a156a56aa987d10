"""SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417, section 3): text-rated pruning of image tokens at three LLM
layers, with the best of the pruned tokens recycled into merged tokens.

As its code does it (github.com/Gumpest/SparseVLMs, v1.5 release, ``USE_VERSION=1_0``:
``llava/model/language_model/modelling_sparse_llama.py``, ``score.py``, ``utils.py``):

1. Text raters, once, on the LLM input embeddings: ``m = mean_v softmax_t(v . t)`` over the image tokens ``v`` and
   the text tokens ``t`` after the image; the raters are the text tokens whose ``m`` is above the mean of ``m``.
2. After each scoring layer ``l`` (``[2, 6, 15]``): that layer's attention probabilities from the raters to the image
   tokens still present, averaged over heads and raters, rank them; the top ``min(keep_l, n - 1)`` stay.
3. Recycling: of the ``d`` deleted tokens the ``int(0.3 d) + 1`` best-scored are clustered (DPC-kNN on the layer's
   output hidden states, density from ``c`` nearest neighbours) into ``c = int(r / 10) + 1`` averaged tokens.

Choices here:
- Per sample (the original handles batch element 0): raters, counts and clusters per row, so a batch gives each row's
  answer alone; rows without images keep everything. Scores are recomputed from the layer's ``q_proj`` / ``k_proj``
  with RoPE for the text rows only (never ``output_attentions``), so SDPA / FlashAttention stay usable.
- The whole batch is chosen at once ("top ``c``" as ``rank < c``, clustering padded to the most recycled tokens of a
  row): a GPU runs a fixed number of kernels per stage, and the host waits for it once per forward call (the rows'
  token counts after layer 0, from which every stage's counts and shapes follow).
- Positions: survivors keep their original position ids (the v1.5 code renumbers them; SparseVLM+ keeps them). A
  merged token is written into the slot of its cluster centre (a pruned token that survives as it), with its position
  (the original inserts merged tokens right after the kept image tokens).
- DPC-kNN breaks density ties by recycled order (best-scored first) instead of random noise of 1e-6 (deterministic);
  distances come from a centred Gram matrix in float32.
- Counts: the fixed per-budget schedules of the v1.5 code, not the first release's rank-adaptive
  ``rank(A) * scale + bias`` (an SVD tolerance decides it, and its FLOPs are unknown before running).
- Raters need the input of layer 0: unless layer 0 scores, a first stage after layer 0 drops nothing and records them.
- Depth: layers ``[2, 6, 15]`` for 32 or more layers (the original uses them for 7B and 13B); shallower LLMs use
  ``floor(l L / 32)``, made strictly increasing, dropping stages past layer ``L - 2``.
- ``keep`` counts are for one image of ``projector_tokens`` tokens; a row with ``n`` image tokens keeps
  ``round(keep n / projector_tokens)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from .base import MacDims, ReducerConfigError, ReducerParams, ReducerShapes, check_budget, check_fraction, check_int
from .language_model import DropView, LLMReducer, gather_plan, host_tensor

PUBLISHED_LAYERS = (2, 6, 15)  # scoring layers of a 32-layer LLM (pruning_loc)
PUBLISHED_DEPTH, PUBLISHED_TOKENS = 32, 576  # what the schedules were written for (LLaVA-1.5-7B)
# retain-N -> image tokens kept after layers 2, 6, 15 (sparse_token_list_N in score.py, v1.5 release)
SCHEDULES = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}


@dataclass
class SparseVLMParams(ReducerParams):
    layers: list[int] | None = None  # layers whose attention ranks image tokens (pruned after each); None: [2, 6, 15]
    keep: list[int] | None = None  # image tokens kept at each of those layers (one image, before recycling); None: 192
    recycle: float = 0.3  # fraction of each stage's deleted image tokens (best-scored) recycled, int(f d) + 1; 0: none
    cluster_size: int = 10  # recycled tokens per merged token: int(recycled / cluster_size) + 1 merged tokens


def default_layers(num_layers: int) -> list[int]:
    """``[2, 6, 15]`` from 32 layers on; below, ``floor(l L / 32)`` strictly increasing, up to layer ``L - 2``."""
    if num_layers >= PUBLISHED_DEPTH:
        return list(PUBLISHED_LAYERS)
    layers: list[int] = []
    for published in PUBLISHED_LAYERS:
        layer = max(published * num_layers // PUBLISHED_DEPTH, layers[-1] + 1 if layers else 0)
        if layer > num_layers - 2:
            break
        layers.append(layer)
    return layers


def schedule(tokens: Fraction | int, n: int) -> list[int]:
    """Kept counts for a retain-``tokens`` budget in 576-token units, scaled to ``n`` image tokens (half up).

    Published budgets give their schedules exactly; others interpolate each stage linearly between the neighbouring
    published ones, with ``[0, 0, 0]`` at 0 and ``[576] * 3`` at 576.
    """
    anchors = [(0, (0, 0, 0)), *sorted(SCHEDULES.items()), (PUBLISHED_TOKENS, (PUBLISHED_TOKENS,) * 3)]
    t = Fraction(tokens)
    (a, low), (b, high) = next((lo, hi) for lo, hi in zip(anchors, anchors[1:]) if t <= hi[0])
    f = (t - a) / (b - a)
    return [int((lo + f * (hi - lo)) * n / PUBLISHED_TOKENS + Fraction(1, 2)) for lo, hi in zip(low, high)]


def scale_count(keep: int, n: int, reference: int) -> int:
    """``keep`` of ``reference`` image tokens, for a row with ``n`` (``round(keep n / reference)``, half up)."""
    return (2 * keep * n + reference) // (2 * reference)


def stage_counts(present: int, keep: int, recycle: float, cluster_size: int) -> tuple[int, int, int]:
    """``(kept, recycled, merged)`` image tokens of one stage with ``present`` of them (the original's arithmetic)."""
    kept = max(min(keep, present - 1), 0)
    deleted = present - kept
    recycled = min(deleted, int(deleted * recycle) + 1) if recycle > 0 and deleted > 0 else 0
    merged = min(recycled, int(recycled / cluster_size) + 1) if recycled else 0
    return kept, recycled, merged


class SparseVLM(LLMReducer):
    """Rates image tokens by the text raters' attention at three layers; the language model drops the rest."""

    Params = SparseVLMParams

    @classmethod
    def resolve(cls, params: SparseVLMParams, shapes: ReducerShapes) -> tuple[list[int], list[int]]:
        """``(scoring layers, kept counts)`` with the defaults filled in for ``shapes``."""
        layers = list(params.layers) if params.layers is not None else default_layers(shapes.num_text_layers)
        keep = list(params.keep) if params.keep is not None else schedule(192, shapes.projector_tokens)[: len(layers)]
        return layers, keep

    @classmethod
    def check(cls, reducer_type: str, params: SparseVLMParams, shapes: ReducerShapes) -> None:
        cls.check_model(reducer_type, shapes)
        check_fraction("recycle", params.recycle)
        check_int("cluster_size", params.cluster_size, 1)
        last = shapes.num_text_layers - 2
        if params.layers is not None and not (
            int_list(params.layers) and list(params.layers) == sorted(set(params.layers))
            and all(0 <= x <= last for x in params.layers)
        ):  # fmt: skip
            raise ReducerConfigError(
                f"reducer_kwargs.layers must be a list of strictly increasing layers in 0..{last} (each is followed "
                f"by a pruned layer; text_config.num_hidden_layers is {last + 2}), got {params.layers!r}"
            )
        if params.keep is not None and not (int_list(params.keep) and all(x >= 0 for x in params.keep)):
            raise ReducerConfigError(f"reducer_kwargs.keep must be a list of counts >= 0, got {params.keep!r}")
        layers, keep = cls.resolve(params, shapes)
        if len(keep) != len(layers):
            raise ReducerConfigError(
                f"reducer_kwargs.keep has {len(keep)} counts but there are {len(layers)} scoring layers {layers} "
                "(reducer_kwargs.layers)"
            )

    @classmethod
    def budget_kwargs(cls, reducer_type: str, tokens: int, shapes: ReducerShapes) -> dict:
        """The published retain-``tokens`` schedule (64 / 96 / 128 / 192 of 576 exactly), see :func:`schedule`.

        With ``n`` image tokens per image the budget is read as ``tokens * 576 / n`` of 576 and the counts scaled back.
        """
        n = shapes.projector_tokens
        layers = default_layers(shapes.num_text_layers)
        keep = schedule(Fraction(check_budget(reducer_type, tokens, n) * PUBLISHED_TOKENS, n), n)
        return {"layers": layers, "keep": keep[: len(layers)]}

    @classmethod
    def stages(cls, params: SparseVLMParams, shapes: ReducerShapes, image_tokens: int) -> list[tuple[int, int, int]]:
        """Per scoring layer: ``(image tokens before it, recycled ones, image tokens after it incl. merged)``."""
        layers, keep = cls.resolve(params, shapes)
        present, out = image_tokens, []
        for k in keep:
            kept, recycled, merged = stage_counts(present, scale_count(k, image_tokens, shapes.projector_tokens),
                                                  params.recycle, params.cluster_size)  # fmt: skip
            out.append((present, recycled, kept + merged))
            present = kept + merged
        return out if image_tokens else []

    @classmethod
    def llm_schedule(cls, params: SparseVLMParams, shapes: ReducerShapes, image_tokens: int) -> list[tuple[int, int]]:
        """``n`` image tokens up to the first scoring layer, then after each ``l`` the kept plus merged tokens."""
        layers, _ = cls.resolve(params, shapes)
        stages = cls.stages(params, shapes, image_tokens)
        return [(0, image_tokens)] + [(layer + 1, after) for layer, (_, _, after) in zip(layers, stages)]

    @classmethod
    def own_macs(cls, params: SparseVLMParams, shapes: ReducerShapes, dims: MacDims) -> int:
        """Rater similarity ``V T^T`` on the embeddings; per stage ``k_proj`` of the sequence, ``q_proj`` of the text
        tokens and their attention rows; the recycled tokens' Gram matrix."""
        stages = cls.stages(params, shapes, dims.image_tokens)
        d, t = dims.text_hidden, dims.text_tokens
        macs = dims.image_tokens * t * d if stages else 0
        for present, recycled, _ in stages:
            seq = present + t
            macs += seq * d * dims.text_kv_hidden + t * d * d + t * seq * d + recycled * recycled * d
        return macs

    # ------------------------------------------------------------------------------------------------ in the LLM
    def drop_layers(self) -> list[int]:
        """After each scoring layer, plus layer 1 (records the raters) unless layer 0 scores."""
        layers, _ = self.resolve(self.params, self.shapes)
        return ([] if not layers or layers[0] == 0 else [1]) + [layer + 1 for layer in layers]

    def select(self, view: DropView) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Survivors ``[B, T]`` (and, when tokens merge, the layer output ``[B, T, D]`` with merged tokens written).

        The whole batch at once. One host synchronisation per forward call, after layer 0: the rows' text and image
        counts, from which every stage's counts follow on the host (the original arithmetic) and go back in one copy
        that does not wait; later shapes (index widths, recycled and merged tokens) are their maxima.
        """
        layers, keep = self.resolve(self.params, self.shapes)
        pos = torch.arange(view.image_mask.shape[1], device=view.image_mask.device)
        text = view.attention_mask & ~view.image_mask & (pos[None] <= view.query_index[:, None])
        if view.layer_index == 0:  # state for the later stages of this forward call
            texts, counts = torch.stack([text.sum(dim=1), view.image_mask.sum(dim=1)]).tolist()  # the host sync
            stages = self.stage_plan(counts, keep)  # [stage][row] (kept, recycled, merged)
            self._stages = host_tensor(stages, pos.device)  # [S, B, 3]
            self._widths = [tuple(max(row[i] for row in stage) for i in (1, 2)) for stage in stages]
            plans = gather_plan(text, max(texts)), gather_plan(view.image_mask, max(counts))
            self._raters = self.raters(view.layer_input, view.image_mask, text, *plans)
        if view.layer_index not in layers:
            return torch.ones_like(view.image_mask)
        raters = getattr(self, "_raters", None)
        if raters is None or raters.shape[0] != text.shape[0]:
            raise RuntimeError("SparseVLM scores with the raters recorded after layer 0 of the same forward call")
        text_index, _ = gather_plan(text, raters.shape[1])  # [B, R]: each row's text tokens, in order (never dropped)
        scores = self.scores(view, text_index, raters)
        stage = layers.index(view.layer_index)
        return self.prune(scores, view.image_mask, view.layer_output, self._stages[stage], self._widths[stage])

    def stage_plan(self, counts: list[int], keep: list[int]) -> list[list[tuple[int, int, int]]]:
        """Per stage and row: ``(kept, recycled, merged)`` image tokens, from each row's image tokens at the input."""
        present, out = list(counts), []
        for k in keep:
            out.append([stage_counts(p, scale_count(k, n, self.shapes.projector_tokens), self.params.recycle,
                                     self.params.cluster_size) for p, n in zip(present, counts)])  # fmt: skip
            present = [kept + merged for kept, _, merged in out[-1]]
        return out

    @torch.no_grad()
    def raters(self, embeds, image_mask, text, text_plan, image_plan) -> torch.Tensor:
        """``[B, R]`` bool: which text tokens rate, from the embeddings ``[B, T, D]``.

        ``text_plan`` / ``image_plan``: ``(index, valid)`` of the text tokens ``[B, R]`` and image tokens ``[B, V]``.
        """
        (text_index, text_valid), (image_index, image_valid) = text_plan, image_plan
        pos = torch.arange(text.shape[1], device=text.device)
        after = text & (pos[None] > torch.where(image_mask, pos, -1).amax(dim=1, keepdim=True))
        after = torch.where(after.any(dim=1, keepdim=True), after, text)  # nothing after the image: all text rates
        candidates = after.gather(1, text_index) & text_valid
        similarity = (rows(embeds, image_index) @ rows(embeds, text_index).transpose(1, 2)).float()  # [B, V, R]
        probs = similarity.masked_fill(~candidates[:, None], float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        m = (probs * image_valid[..., None]).sum(dim=1) / image_valid.sum(dim=1, keepdim=True).clamp(min=1)
        mean = (m * candidates).sum(dim=1, keepdim=True) / candidates.sum(dim=1, keepdim=True).clamp(min=1)
        chosen = candidates & (m > mean)
        return torch.where(chosen.any(dim=1, keepdim=True), chosen, candidates)  # all equal: every candidate rates

    @torch.no_grad()
    def scores(self, view: DropView, text_index: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` float32: attention probabilities of the layer, raters to every key, mean over heads and raters."""
        layer, attn, hidden = view.layer, view.layer.self_attn, view.layer_input
        (b, t, _), r = hidden.shape, text_index.shape[1]
        normed = layer.input_layernorm(hidden)
        cos, sin = (e.expand(b, -1, -1) for e in view.position_embeddings)
        keys = attn.k_proj(normed).view(b, t, -1, attn.head_dim).transpose(1, 2)  # [B, H_kv, T, d]
        _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
        query = attn.q_proj(rows(normed, text_index)).view(b, r, -1, attn.head_dim).transpose(1, 2)  # [B, H, R, d]
        query, _ = apply_rotary_pos_emb(query, query, rows(cos, text_index), rows(sin, text_index))
        logits = (query @ repeat_kv(keys, attn.num_key_value_groups).transpose(2, 3)).float() * attn.scaling
        pos = torch.arange(t, device=hidden.device)
        allowed = view.attention_mask[:, None] & (pos[None, None] <= text_index[..., None])  # [B, R, T]
        probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1).mean(dim=1)  # [B, R, T]
        probs = torch.where(raters[..., None], probs, 0.0)
        return probs.sum(dim=1) / raters.sum(dim=1, keepdim=True).clamp(min=1)

    def prune(self, scores, image_mask, output, counts: torch.Tensor, widths: tuple[int, int]):
        """The top-scored image tokens of each row stay; the best deleted ones merge into their cluster centres' slots.

        Args:
            scores: ``[B, T]`` float32 rating of every position.
            image_mask: ``[B, T]`` bool image tokens present.
            output: ``[B, T, D]`` the layer's output.
            counts: ``[B, 3]`` each row's kept, recycled and merged image tokens at this stage.
            widths: the most ``(recycled, merged)`` tokens of a row at this stage (host integers).

        Returns:
            ``keep [B, T]``, or ``(keep, hidden [B, T, D])`` when some row merges.
        """
        (b, t), (width, clusters) = image_mask.shape, widths
        kept, recycled, merged = counts[:, 0, None], counts[:, 1, None], counts[:, 2]
        order = scores.masked_fill(~image_mask, float("-inf")).argsort(dim=1, descending=True, stable=True)
        keep = ~image_mask | (order.argsort(dim=1) < kept)
        if not clusters:
            return keep
        slot = torch.arange(width, device=order.device)
        tokens = order.gather(1, (kept + slot).clamp(max=t - 1))  # [B, M] the recycled, best first
        valid = slot < recycled
        x = rows(output, tokens).float()
        centres, assign = cluster_rows(x.detach(), valid, merged, clusters)  # [B, C], [B, M]
        into = torch.where(valid, assign, clusters)[..., None]  # padding goes to a spare cluster
        sums = x.new_zeros(b, clusters + 1, x.shape[-1]).scatter_add(1, into.expand_as(x), x)[:, :clusters]
        sizes = x.new_zeros(b, clusters + 1).scatter_add(1, into[..., 0], valid.to(x.dtype))[:, :clusters, None]
        where = torch.where(slot[:clusters] < merged[:, None], tokens.gather(1, centres), t)  # [B, C]; spare: T
        mean = (sums / (sizes + 1e-6)).to(output.dtype)  # the original's mean
        hidden = torch.cat([output, output.new_zeros(b, 1, output.shape[-1])], dim=1)
        hidden = hidden.scatter(1, where[..., None].expand(-1, -1, output.shape[-1]), mean)[:, :t]
        keep = torch.cat([keep, keep.new_zeros(b, 1)], dim=1).scatter(1, where, True)[:, :t]
        return keep, hidden


@torch.no_grad()
def cluster_rows(
    x: torch.Tensor, valid: torch.Tensor, clusters: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN (density peaks, k = a row's cluster count of nearest neighbours) for each row of a batch.

    Args:
        x: ``[B, M, C]`` each row's tokens, ordered best-scored first (ties in density go to the earlier one).
        valid: ``[B, M]`` bool real tokens (a row's first ones).
        clusters: ``[B]`` clusters of each row (at most its real tokens).
        width: at least ``clusters.max()`` (a host integer), at most ``M``.

    Returns:
        ``(centres [B, width], assign [B, M])``: each row's centres (its first ``clusters`` entries), and each
        token's cluster (centres their own; padding arbitrary).
    """
    (b, m, channels), invalid = x.shape, ~valid
    steps, order = torch.arange(width, device=x.device), torch.arange(m, device=x.device)
    x = x.float()
    x = x - (x * valid[..., None]).sum(dim=1, keepdim=True) / valid.sum(dim=1).clamp(min=1)[:, None, None]
    squares = (x * x).sum(dim=-1)
    dist = (squares[:, :, None] + squares[:, None] - 2 * (x @ x.transpose(1, 2))).clamp(min=0)
    dist = dist.masked_fill(torch.eye(m, dtype=torch.bool, device=x.device), 0).sqrt() / channels**0.5
    near = dist.masked_fill(invalid[:, None], float("inf")).topk(width, dim=-1, largest=False).values  # [B, M, W]
    first = steps < clusters[:, None, None]
    density = (-torch.where(first, near**2, 0.0).sum(dim=-1) / clusters.clamp(min=1)[:, None]).exp()  # [B, M]
    ties = (density[:, None] == density[:, :, None]) & (order[None] < order[:, None])
    denser = ((density[:, None] > density[:, :, None]) | ties) & valid[:, None]  # [b, i, j]: j is denser than i
    far = dist.masked_fill(invalid[:, :, None] | invalid[:, None], 0).amax(dim=(1, 2))  # [B]
    parent = torch.where(denser, dist, far[:, None, None]).amin(dim=-1)
    score = (parent * density).masked_fill(invalid, float("-inf"))
    centres = score.argsort(dim=-1, descending=True, stable=True)[:, :width]  # [B, W]
    real = steps[None] < clusters[:, None]
    to_centre = dist.gather(2, centres[:, None].expand(-1, m, -1)).masked_fill(~real[:, None], float("inf"))
    assign = torch.cat([to_centre.argmin(dim=-1), order.new_zeros(b, 1)], dim=1)
    return centres, assign.scatter(1, torch.where(real, centres, m), steps.expand(b, -1))[:, :m]


def cluster(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN of one row ``x [M, C]`` (see :func:`cluster_rows`): ``(centres [clusters], assign [M])``."""
    valid = torch.ones(1, x.shape[0], dtype=torch.bool, device=x.device)
    count = torch.full((1,), clusters, device=x.device)
    centres, assign = cluster_rows(x[None], valid, count, clusters)
    return centres[0], assign[0]


def int_list(values) -> bool:
    return isinstance(values, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in values)


def rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for ``x [B, T, D]`` and ``index [B, R]``: ``[B, R, D]``."""
    return x.gather(1, index[..., None].expand(*index.shape, x.shape[-1]))
