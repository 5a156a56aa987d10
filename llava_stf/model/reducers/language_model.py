"""A language model that really removes image tokens at some layers: the home of every in-LLM reducer.

:class:`TokenDropLlamaModel` is transformers' ``LlamaModel`` (same modules, same parameter names, so checkpoints are
unchanged) with an in-LLM reducer attached. Its forward *is* the stock one; the tokens are removed by PyTorch's public
module hooks on its own decoder layers:

- after layer ``d - 1`` of each drop layer ``d``, the reducer names the survivors (:meth:`LLMReducer.select`, which
  may only drop image tokens) and the layer's output is gathered to them, so layers ``d ..`` run on a shorter
  sequence; survivors keep their original position ids;
- before each later layer, a hook hands it the survivors' position ids, RoPE tables and the causal mask that
  transformers' own ``create_causal_mask`` builds for them (sized against that cache layer with ``layer_idx``), so the
  attention implementation the model was loaded with (eager, SDPA, FlashAttention) runs unchanged;
- the stock forward's output is scattered back to the input length. Dropped positions hold zeros: they are image
  positions, which never carry labels, and the last position (the one generation reads) is never an image token.

With a KV cache the layers from ``d`` on cache only the survivors. What later calls need (each stage's surviving
original positions and their padding mask) is kept per cache object in a weak dictionary, so it lives exactly as
long as that cache; decode steps get each stage's mask from it.

The multimodal model says which input positions are image tokens, and where the prompt ends, with
:meth:`TokenDropLlamaModel.reducing` around a call. Called without it the model is the stock ``LlamaModel``.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import LlamaModel
from transformers.masking_utils import create_causal_mask

from .base import Reducer, ReducerConfigError, ReducerShapes

# ------------------------------------------------------------------------------------------------ the contract


@dataclass
class DropView:
    """What an in-LLM reducer sees when it chooses the survivors after layer ``layer_index`` (all rows padded)."""

    layer_index: int  # the layer that just ran (d - 1)
    layer: nn.Module  # that decoder layer (its weights may be used for scoring, e.g. q_proj / k_proj)
    layer_input: torch.Tensor  # [B, T, D] its input hidden states
    layer_output: torch.Tensor  # [B, T, D] its output hidden states
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # RoPE (cos, sin), each [B, T, d_head]
    attention_mask: torch.Tensor  # [B, T] bool: real tokens (False at padding)
    image_mask: torch.Tensor  # [B, T] bool: image tokens still present
    query_index: torch.Tensor  # [B] position of each row's last prompt token
    model: nn.Module  # the language model running (its later layers and final norm may be used for scoring)


# Decoders whose layers follow transformers' Llama layout (input_layernorm, self_attn.{q,k}_proj, RoPE).
SUPPORTED_LLMS = ("llama",)


class LLMReducer(Reducer):
    """Base of in-LLM reducers: which layers see fewer tokens, and which tokens survive there."""

    stage = "llm"

    @classmethod
    def check_model(cls, reducer_type: str, shapes: ReducerShapes) -> None:
        """In-LLM reducers run inside a Llama-style decoder (call from ``check``)."""
        if shapes.text_model_type not in SUPPORTED_LLMS:
            raise ReducerConfigError(
                f"reducer_type '{reducer_type}' runs inside a Llama-style decoder; text_config.model_type is "
                f"{shapes.text_model_type!r} (supported: {list(SUPPORTED_LLMS)})"
            )

    def drop_layers(self) -> list[int]:
        """Ascending layers that see a shorter sequence than the one before (each >= 1); empty: a no-op."""
        raise NotImplementedError

    def select(self, view: DropView) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``[B, T]`` bool survivors of ``view``'s sequence (non-image tokens are always kept).

        A reducer that merges (e.g. recycles dropped tokens into a kept slot) returns ``(keep, hidden)``: ``hidden``
        ``[B, T, D]`` replaces the layer's output before it is gathered to the survivors.
        """
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- bookkeeping


@dataclass
class Stage:
    """The sequence from ``layer`` on: one slot per survivor of each row, padded to the batch maximum."""

    layer: int  # first layer that sees this sequence
    index: torch.Tensor  # [B, T_s] original position of each slot (pad slots point at distinct dropped positions)
    mask: torch.Tensor  # [B, T_s] bool: real survivors (False at padding and at pad slots)


@dataclass
class DropState:
    """Kept per KV cache after a call that dropped tokens: what the following calls need."""

    prompt_length: int  # length of that call in original positions
    stages: list[Stage]


@dataclass
class _Live:
    """The current sequence inside one forward call (before the first drop: the whole input)."""

    index: torch.Tensor  # [B, T_c] original positions
    slot: torch.Tensor  # [B, T_c] bool: not a pad slot
    real: torch.Tensor  # [B, T_c] bool: attended (slot and not padding)
    image: torch.Tensor  # [B, T_c] bool
    positions: torch.Tensor  # [B, T_c] position ids
    query: torch.Tensor  # [B]
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # None: the stock tables of the whole input


@dataclass
class _Plan:
    """One forward call: the live sequence and, per stage, what its layers are handed."""

    drop_layers: list[int]  # where this call drops (empty on decode steps)
    live: _Live | None
    stages: list[tuple[Stage, dict]] = field(default_factory=list)  # (stage, layer kwargs that replace the stock)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for ``x [B, T, ...]`` and ``index [B, T']``."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:]))


def gather_plan(keep: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Survivor positions of ``keep [B, T]`` in ascending order, padded to the batch maximum.

    ``width``: that maximum when the caller knows it (a host integer, at least the maximum), so that nothing waits for
    the device to count.

    Returns:
        ``(index [B, T'], valid [B, T'])``; pad slots point at distinct dropped positions.
    """
    t = keep.shape[1]
    ar = torch.arange(t, device=keep.device)
    order = torch.where(keep, ar, t + ar).argsort(dim=1)
    counts = keep.sum(dim=1)
    width = int(counts.max()) if width is None else width
    return order[:, :width], ar[None, :width] < counts[:, None]


def host_tensor(values: list, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values)`` (integers) on ``device``, copied without waiting for it (CUDA: from pinned memory)."""
    x = torch.tensor(values, dtype=torch.long)
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def query_index(mask_2d: torch.Tensor | None, b: int, t: int, prompt_length: int | None, device) -> torch.Tensor:
    """``[B]`` index of each row's last prompt token: its last real token up to ``prompt_length``."""
    if mask_2d is None:
        end = t if prompt_length is None else min(prompt_length, t)
        return torch.full((b,), end - 1, dtype=torch.long, device=device)
    mask = mask_2d.bool()[:, :prompt_length] if prompt_length is not None else mask_2d.bool()
    return mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)


# ------------------------------------------------------------------------------------------------- the model


class TokenDropLlamaModel(LlamaModel):
    """``LlamaModel`` whose decoder layers drop image tokens as its reducer says (see the module docstring)."""

    reducer: LLMReducer

    @classmethod
    def install(cls, language_model: LlamaModel, reducer: LLMReducer) -> TokenDropLlamaModel:
        """Turn a stock ``LlamaModel`` (as built by ``AutoModel.from_config``) into this class, in place.

        Converting the built model instead of constructing this class keeps transformers' own construction path
        (dtype, DeepSpeed ZeRO-3 init) and builds no weights twice; modules and parameter names are unchanged.
        """
        if type(language_model) is not LlamaModel:
            raise TypeError(f"token dropping needs transformers' LlamaModel, got {type(language_model).__name__}")
        language_model.__class__ = cls
        language_model._attach(reducer)
        return language_model

    def _attach(self, reducer: LLMReducer) -> None:
        self.reducer = reducer
        self._call: tuple[torch.Tensor, int | None] | None = None  # (image mask [B, T], prompt length) of one call
        self._plan: _Plan | None = None
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> DropState
        for i, layer in enumerate(self.layers):  # partials of bound methods: a deep copy hooks the copy, not us
            layer.register_forward_pre_hook(functools.partial(self._before_layer, i), with_kwargs=True)
            layer.register_forward_hook(functools.partial(self._after_layer, i), with_kwargs=True)

    @contextlib.contextmanager
    def reducing(self, image_mask: torch.Tensor, prompt_length: int | None = None) -> Iterator[None]:
        """Within this block, calls know their image positions ``[B, T]`` and prompt length (``None``: whole input)."""
        self._call = (image_mask, prompt_length)
        try:
            yield
        finally:
            self._call = None

    def drop_state(self, cache) -> DropState | None:
        """What the call that filled ``cache`` dropped (``None`` if it dropped nothing)."""
        return self._states.get(cache) if cache is not None else None

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None, **kwargs):
        """``LlamaModel.forward`` (same arguments and outputs); tokens are dropped when a call or its cache says so."""
        state = self.drop_state(cache)
        image_mask, prompt_length = self._call if self._call is not None else (None, None)
        drops = self.reducer.drop_layers() if image_mask is not None and bool(image_mask.any()) else []
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        inputs.update(inputs_embeds=inputs_embeds, **kwargs)
        if state is None and not drops:
            return super().forward(**inputs)
        for flag in ("output_hidden_states", "output_attentions"):
            if kwargs.get(flag):
                raise ValueError(f"{flag}=True is not supported while a token reducer drops tokens in the LLM")
        ref = inputs_embeds if inputs_embeds is not None else input_ids
        b, t = ref.shape[:2]
        if state is not None:
            if drops:
                raise ValueError("images cannot be added to a KV cache whose tokens were already reduced")
            self._plan, inputs["position_ids"] = self._decode_plan(state, attention_mask, position_ids, cache, ref)
        else:
            past = cache.get_seq_length() if cache is not None else 0
            if past:
                raise ValueError(
                    f"tokens can only be dropped in the first call of a sequence; the KV cache holds {past} tokens"
                )
            real = attention_mask.bool() if attention_mask is not None else torch.ones(b, t, dtype=torch.bool)
            real = real.to(ref.device)
            positions = position_ids if position_ids is not None else torch.arange(t, device=ref.device)[None]
            index = torch.arange(t, device=ref.device).expand(b, t)
            query = query_index(attention_mask, b, t, prompt_length, ref.device)
            live = _Live(index, torch.ones_like(real), real, image_mask.to(ref.device), positions.expand(b, t), query)
            self._plan = _Plan(drops, live)
        try:
            out = super().forward(**inputs)
        finally:
            plan, self._plan = self._plan, None
        if plan.drop_layers:
            live = plan.live
            hidden = out.last_hidden_state * live.slot[..., None]
            full = hidden.new_zeros(b, t, hidden.shape[-1])
            out.last_hidden_state = full.scatter(1, live.index[..., None].expand_as(hidden), hidden)
            if out.cache is not None:
                self._states[out.cache] = DropState(t, [stage for stage, _ in plan.stages])
        return out

    def _decode_plan(self, state: DropState, attention_mask, position_ids, cache, ref) -> tuple[_Plan, torch.Tensor]:
        """A call after a dropping prefill: each stage's layers attend to its survivors plus everything since.

        Returns:
            The plan, and the position ids of the new tokens (original positions, ``[B or 1, T]``).
        """
        b, t = ref.shape[:2]
        decoded = cache.get_seq_length(state.stages[0].layer) - state.stages[0].index.shape[1]
        total = state.prompt_length + decoded + t
        if attention_mask is None:
            attention_mask = torch.ones(b, total, dtype=torch.long, device=ref.device)
        if attention_mask.shape[1] != total:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} positions but the sequence has {total} "
                f"({state.prompt_length} prompt + {decoded} decoded + {t} new, in original positions)"
            )
        if position_ids is None:
            position_ids = torch.arange(t, device=ref.device)[None] + state.prompt_length + decoded
        dtype = self.embed_tokens.weight.dtype
        embeds = ref if ref.dim() == 3 else torch.empty(b, t, 0, dtype=dtype, device=ref.device)
        plan = _Plan([], None)
        for stage in state.stages:
            mask = torch.cat([stage.mask, attention_mask[:, state.prompt_length :].bool()], dim=1)
            causal = create_causal_mask(config=self.config, inputs_embeds=embeds, attention_mask=mask, cache=cache,
                                        position_ids=position_ids, layer_idx=stage.layer)  # fmt: skip
            plan.stages.append((stage, {"attention_mask": causal}))
        return plan, position_ids

    # ------------------------------------------------------------------------------------------------- hooks
    def _stage_kwargs(self, i: int) -> dict | None:
        found = None
        for stage, kwargs in self._plan.stages:
            if stage.layer <= i:
                found = kwargs
        return found

    def _before_layer(self, i: int, module, args, kwargs):
        """Layers after a drop get the survivors' mask, position ids and RoPE tables instead of the stock ones."""
        if self._plan is None or (replaced := self._stage_kwargs(i)) is None:
            return None
        return args, {**kwargs, **replaced}

    def _after_layer(self, i: int, module, args, kwargs, output):
        """After layer ``d - 1``: the reducer names the survivors and the output is gathered to them."""
        plan = self._plan
        if plan is None or i + 1 not in plan.drop_layers or i + 1 >= len(self.layers):
            return None
        live = plan.live
        hidden_in = args[0] if args else kwargs["hidden_states"]
        rope = live.rope or tuple(e.expand(hidden_in.shape[0], -1, -1) for e in kwargs["position_embeddings"])
        view = DropView(i, module, hidden_in, output, rope, live.real, live.image, live.query, self)
        chosen = self.reducer.select(view)
        keep, output = chosen if isinstance(chosen, tuple) else (chosen, output)
        keep = keep | ~live.image
        idx, valid = gather_plan(keep)
        slot = _take(live.slot, idx) & valid
        live = _Live(
            index=_take(live.index, idx),
            slot=slot,
            real=_take(live.real, idx) & slot,
            image=_take(live.image, idx) & slot,
            positions=_take(live.positions, idx),
            query=keep.long().cumsum(dim=1).gather(1, live.query[:, None]).squeeze(1) - 1,
            rope=tuple(_take(e, idx) for e in rope),
        )
        hidden = _take(output, idx)
        causal = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=live.real,
            cache=kwargs.get("cache"),
            position_ids=live.positions,
            layer_idx=i + 1,
        )
        replaced = {"attention_mask": causal, "position_ids": live.positions, "position_embeddings": live.rope}
        plan.live = live
        plan.stages.append((Stage(i + 1, live.index, live.real), replaced))
        return hidden


def install_llm_reducer(language_model: nn.Module, reducer: Reducer) -> nn.Module:
    """``language_model`` as a :class:`TokenDropLlamaModel` when ``reducer`` acts inside the LLM, else unchanged."""
    if not isinstance(reducer, LLMReducer):
        return language_model
    return TokenDropLlamaModel.install(language_model, reducer)


__all__ = [
    "SUPPORTED_LLMS",
    "DropState",
    "DropView",
    "LLMReducer",
    "Stage",
    "TokenDropLlamaModel",
    "gather_plan",
    "host_tensor",
    "install_llm_reducer",
    "query_index",
]
