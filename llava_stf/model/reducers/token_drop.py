"""Run a Llama-style decoder while really removing tokens from its hidden states at one layer.

Both reducer stages end here: PruMerge's unused image placeholders are dropped before layer 0 (positions compacted,
as if the sequence had been written without them), FastV's least-attended image tokens after layer ``K - 1``
(original positions kept). Layers before the drop layer run on the whole sequence, later layers on the survivors
only, so the saving is real compute and real KV cache.

Mechanism (chosen as the least invasive that works with transformers 5): instead of patching or subclassing the
language model, :func:`forward_with_drop` drives its public parts (``layers``, ``norm``, ``rotary_emb``) with
transformers' own ``create_causal_mask``; the weights and parameter names are untouched and the attention
implementation (eager, SDPA, FlashAttention) is whatever the model was loaded with. ``LlamaModel.forward`` cannot be
reused because it builds one mask and one set of position embeddings for all layers.

KV cache: the layers before the drop layer cache every token, the later ones only the survivors. What decoding needs
to keep extending the shorter caches (their 2-D padding mask and the position offset) is stored on the cache object
itself as a :class:`DropState` (attribute ``DROP_STATE``), so it lives exactly as long as that generation. Later calls
(decode steps) build each group's mask with ``create_causal_mask(..., layer_idx=...)`` from it.

Outputs keep the input length: the survivors' final states are scattered back to their positions and dropped
positions carry the state they had when dropped (their logits are meaningless; they are image positions, which
never carry labels). Per-layer ``hidden_states`` / ``attentions`` outputs are not available on this path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

DROP_STATE = "llava_stf_drop_state"

# keep_fn(layer_input, layer, position_embeddings, attention_mask_2d) -> keep [B, T] bool, run before layer drop-1
KeepFn = Callable[[torch.Tensor, nn.Module, tuple[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass
class DropState:
    """What decoding after a pruned prefill needs (stored on the KV cache)."""

    layer: int  # first layer whose cache holds only the survivors
    prompt_len: int  # length of the pruned call in original positions
    mask: torch.Tensor  # [B, T'] 2-D attention mask of the survivors (0 at padding and at pad slots)
    shift: torch.Tensor  # [B] subtracted from original position ids in layers >= layer (0 unless compacted)
    keep_index: torch.Tensor  # [B, T'] original positions of the survivors (pad slots point at dropped positions)


def gather_plan(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Survivor positions of ``keep [B, T]`` in ascending order, padded to the batch maximum.

    Returns:
        ``(index [B, T'], valid [B, T'])``; pad slots point at distinct dropped positions.
    """
    t = keep.shape[1]
    ar = torch.arange(t, device=keep.device)
    order = torch.where(keep, ar, t + ar).argsort(dim=1)
    width = int(keep.sum(dim=1).max())
    valid = ar[None, :width] < keep.sum(dim=1)[:, None]
    return order[:, :width], valid


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for ``x [B, T, ...]`` and ``index [B, T']``."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:]))


def _prepare(lm: nn.Module, hidden, mask_2d, position_ids, cache, layer_idx: int):
    """The 4-D (or skipped) causal mask sized against ``layer_idx``'s cache, and the RoPE tables."""
    mask = create_causal_mask(
        config=lm.config,
        inputs_embeds=hidden,
        attention_mask=mask_2d,
        past_key_values=cache,
        position_ids=position_ids,
        layer_idx=layer_idx if cache is not None else None,
    )
    return mask, lm.rotary_emb(hidden, position_ids=position_ids)


def _layer(lm: nn.Module, i: int, hidden, prepared, position_ids, cache, use_cache, kwargs) -> torch.Tensor:
    mask, position_embeddings = prepared
    return lm.layers[i](
        hidden,
        attention_mask=mask,
        position_embeddings=position_embeddings,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=use_cache,
        **kwargs,
    )


def forward_with_drop(
    lm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values: Cache | None = None,
    use_cache: bool | None = None,
    drop_layer: int | None = None,
    keep: torch.Tensor | None = None,
    keep_fn: KeepFn | None = None,
    compact_positions: bool = False,
    **kwargs,
) -> BaseModelOutputWithPast:
    """A Llama-style decoder forward that drops tokens before layer ``drop_layer``.

    Args:
        lm: the decoder (``layers``, ``norm``, ``rotary_emb``, ``config``), e.g. ``LlamaModel``.
        inputs_embeds: ``[B, T, D]``.
        attention_mask: ``[B, past + T]`` 2-D mask in original positions, or ``None`` (all ones).
        position_ids: ``[B, T]`` original positions, or ``None`` (``past + arange(T)``).
        past_key_values: a ``DynamicCache`` or ``None``; ``use_cache`` creates one as ``LlamaModel`` does.
        drop_layer: first layer that sees the survivors; ``None`` or >= layers: nothing is dropped in this call.
        keep: ``[B, T]`` survivors, when known before the first layer (PruMerge's unused placeholders).
        keep_fn: computes ``keep`` from the input of layer ``drop_layer - 1`` (FastV); needs ``drop_layer >= 1``.
        compact_positions: renumber survivors as if the dropped tokens were never written (PruMerge padding).

    Returns:
        ``last_hidden_state [B, T, D]`` (after the final norm) and the cache.
    """
    for flag in ("output_hidden_states", "output_attentions"):
        if kwargs.pop(flag, None):
            raise ValueError(f"{flag}=True is not supported while a token reducer drops tokens in the LLM")
    b, t, _ = inputs_embeds.shape
    n_layers = lm.config.num_hidden_layers
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache(config=lm.config)
    if past_key_values is not None and not isinstance(past_key_values, DynamicCache):
        raise TypeError(f"token reducers support transformers' DynamicCache only, got {type(past_key_values).__name__}")
    state: DropState | None = getattr(past_key_values, DROP_STATE, None)
    if state is not None:
        return _continue(lm, state, inputs_embeds, attention_mask, position_ids, past_key_values, use_cache, kwargs)

    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    device = inputs_embeds.device
    if attention_mask is None:
        attention_mask = torch.ones(b, past + t, dtype=torch.long, device=device)
    if position_ids is None:
        position_ids = torch.arange(t, device=device) + past
    position_ids = position_ids.expand(b, -1)
    dropping = drop_layer is not None and drop_layer < n_layers and (keep is not None or keep_fn is not None)
    if dropping and past:
        raise ValueError(f"tokens can only be dropped in the first call of a sequence; the cache holds {past} tokens")
    if dropping and keep is None and drop_layer < 1:
        raise ValueError("keep_fn ranks with the input of layer drop_layer - 1, so drop_layer must be >= 1")
    first_dropped = drop_layer if dropping else n_layers
    hidden = inputs_embeds
    if first_dropped > 0:
        prepared = _prepare(lm, hidden, attention_mask, position_ids, past_key_values, 0)
        for i in range(first_dropped):
            if dropping and keep is None and i == first_dropped - 1:
                keep = keep_fn(hidden, lm.layers[i], prepared[1], attention_mask[:, past:])
            hidden = _layer(lm, i, hidden, prepared, position_ids, past_key_values, use_cache, kwargs)
    if dropping:
        index, valid = gather_plan(keep)
        shift = (~keep).long().cumsum(dim=1) if compact_positions else torch.zeros_like(position_ids)
        kept_positions = _take(position_ids, index) - _take(shift, index)
        kept_mask = (_take(attention_mask[:, past:].bool(), index) & valid).long()
        kept_hidden = _take(hidden, index)
        prepared = _prepare(lm, kept_hidden, kept_mask, kept_positions, past_key_values, first_dropped)
        for i in range(first_dropped, n_layers):
            kept_hidden = _layer(lm, i, kept_hidden, prepared, kept_positions, past_key_values, use_cache, kwargs)
        hidden = hidden.scatter(1, index[..., None].expand_as(kept_hidden), kept_hidden)
        if past_key_values is not None:
            setattr(past_key_values, DROP_STATE, DropState(first_dropped, t, kept_mask, shift[:, -1], index))
    return BaseModelOutputWithPast(last_hidden_state=lm.norm(hidden), past_key_values=past_key_values)


def _continue(lm, state: DropState, inputs_embeds, attention_mask, position_ids, cache, use_cache, kwargs):
    """A call after a pruned prefill: layers < ``state.layer`` see the full history, later ones the survivors."""
    b, t, _ = inputs_embeds.shape
    decoded = cache.get_seq_length(state.layer) - state.mask.shape[1]  # tokens added since the pruned call
    past = state.prompt_len + decoded  # in original positions
    device = inputs_embeds.device
    if attention_mask is None:
        attention_mask = torch.ones(b, past + t, dtype=torch.long, device=device)
    if attention_mask.shape[1] != past + t:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[1]} positions but the sequence has {past + t} "
            f"({state.prompt_len} prompt + {decoded} decoded + {t} new, in original positions)"
        )
    if position_ids is None:
        position_ids = torch.arange(t, device=device) + past
    position_ids = position_ids.expand(b, -1)
    hidden = inputs_embeds
    if state.layer > 0:
        prepared = _prepare(lm, hidden, attention_mask, position_ids, cache, 0)
        for i in range(state.layer):
            hidden = _layer(lm, i, hidden, prepared, position_ids, cache, use_cache, kwargs)
    mask = torch.cat([state.mask, attention_mask[:, state.prompt_len :].long()], dim=1)
    positions = position_ids - state.shift[:, None]
    prepared = _prepare(lm, hidden, mask, positions, cache, state.layer)
    for i in range(state.layer, lm.config.num_hidden_layers):
        hidden = _layer(lm, i, hidden, prepared, positions, cache, use_cache, kwargs)
    return BaseModelOutputWithPast(last_hidden_state=lm.norm(hidden), past_key_values=cache)
