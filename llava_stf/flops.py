"""Analytic prefill FLOPs of a LLaVA-STF model on its real shapes (no weights), in two conventions.

- **paper**: the LLM only, over the visual tokens only, ``2 x sum over layers of 4nd^2 + 2n^2d + 3ndm`` (Q/K/V/O,
  the two attention products, the SwiGLU FFN). Reproduces the 7.6 / 1.9 TFLOPs of LLaVA-1.5-7B / LLaVA-STF-7B.
- **full prefill**: visual + text tokens through the LLM, plus the vision encoder, the projector, the token reducer's
  own work and the LM head on the last position (what ``generate`` computes at prefill), each part shown.

Token reducers (``--reducer``) are counted from their own answers (``model.reducers.base.Reducer``): the image tokens
that enter the LLM, the per-layer schedule of image tokens inside it (FastV: ``K f(n) + (L - K) f(kept)``, multi-stage
schedules alike; the layer-averaged "equivalent tokens" are reported) and their own scoring / merging work. An
adaptive count (PruMerge) is decided per image at run time, so a count must be assumed: by default the published
average (32 of 576 tokens, PruMerge+: 144 of 576, plus the extra token), or ``--reducer-tokens``. FLOPs = 2 x
multiply-accumulates throughout; softmax, norms, RoPE and lookups are ignored.

AnyRes (LLaVA-NeXT) models are counted by the same code path with two numbers per image: its crops (tiles + base
image, each through the vision tower and the projector) and its LLM tokens (``config.image_token_count(h, w)``,
newlines included); a LLaVA-1.5 model resizes every image to one crop. ``image_kv_bytes`` is the KV cache one image's
tokens occupy (bf16, by the reducer's per-layer schedule).
The report on presets: ``python -m llava_stf.bench.flops``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .model import LlavaStfConfig
from .model.modeling_llava_stf import build_projector
from .model.reducers import MacDims, get_reducer_class, layer_average, token_layers


def decoder_layer_macs(n: int, hidden: int, ffn: int, kv_hidden: int | None = None, ffn_mats: int = 3) -> int:
    """MACs of one decoder layer at prefill over ``n`` tokens (Q/O at full width, K/V at ``kv_hidden``)."""
    kv_hidden = hidden if kv_hidden is None else kv_hidden
    projections = 2 * n * hidden * hidden + 2 * n * hidden * kv_hidden
    attention = 2 * n * n * hidden
    return projections + attention + ffn_mats * n * hidden * ffn


def kv_width(text_config) -> int:
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    return head_dim * (text_config.num_key_value_heads or text_config.num_attention_heads)


def llm_macs(n: int, text_config, layers: int | None = None) -> int:
    """``layers`` (default: all) decoder layers of a Llama-style LLM (SwiGLU, 3 FFN matrices) over ``n`` tokens."""
    per_layer = decoder_layer_macs(n, text_config.hidden_size, text_config.intermediate_size, kv_width(text_config))
    return (text_config.num_hidden_layers if layers is None else layers) * per_layer


def vision_macs(vision_config) -> int:
    """CLIP-style ViT over one image: patch embedding plus every block (plain 2-matrix MLP), CLS included."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    d = vision_config.hidden_size
    embed = patches * vision_config.num_channels * vision_config.patch_size**2 * d
    per_layer = decoder_layer_macs(patches + 1, d, vision_config.intermediate_size, ffn_mats=2)
    return embed + vision_config.num_hidden_layers * per_layer


def default_image_size(config: LlavaStfConfig) -> tuple[int, int]:
    """``(height, width)`` counted when none is given: 2 x 2 crops for AnyRes (672x672 at 336-px crops), one crop
    otherwise (a LLaVA-1.5 model resizes every image to it)."""
    crop = int(config.vision_config.image_size)
    return (2 * crop, 2 * crop) if config.anyres else (crop, crop)


def image_geometry(config: LlavaStfConfig, height: int, width: int) -> tuple[int, int]:
    """``(crops, LLM tokens)`` of one ``height x width`` image (AnyRes: tiles + base image, newlines counted)."""
    crops = config.num_crops(height, width) if config.anyres else 1  # LLaVA-1.5 resizes the image to one crop
    return crops, config.image_token_count(height, width)


def kv_cache_bytes(schedule: list[tuple[int, int]], text_config, bytes_per_value: int = 2) -> int:
    """Keys + values cached for a schedule's tokens (bf16: 2 bytes): ``2 x kv_heads x head_dim x bytes`` per token
    and layer."""
    return 2 * kv_width(text_config) * token_layers(schedule, text_config.num_hidden_layers) * bytes_per_value


def module_macs(module: nn.Module, example: torch.Tensor) -> int:
    """MACs of ``module(example)``: every matmul, linear and convolution torch runs (meta device ok).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs = 2 x MACs), so attention products inside a
    projector (TokenPacker's region-to-point attention) count as well as its Linear / Conv2d layers; bias adds,
    norms, softmax, pooling and interpolation are not counted, as everywhere in this file.
    """
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(example)
    return counter.get_total_flops() // 2


def projector_macs(config: LlavaStfConfig, tokens: int | None = None) -> int:
    """The projector over one image (``tokens`` rows for a per-token projector after PruMerge), on the meta device."""
    shapes = config.projector_shapes()
    with torch.device("meta"):
        projector = build_projector(config)
        example = torch.empty(1, tokens or shapes.grid_h * shapes.grid_w, shapes.in_channels)
    return module_macs(projector, example)


@dataclass
class FlopsReport:
    """FLOPs (2 x MACs) of one image + ``text_tokens`` at prefill."""

    image_size: tuple[int, int]  # (height, width) of the image in pixels (LLaVA-1.5 resizes it to one crop)
    crops: int  # crops through the vision tower and the projector (AnyRes: tiles + base image; else 1)
    image_tokens: int  # image tokens entering the LLM (AnyRes: newlines included)
    text_tokens: int
    equivalent_tokens: float  # image tokens averaged over the LLM layers (differs from image_tokens for FastV)
    paper: int  # LLM over the visual tokens only
    vision: int
    projector: int
    reducer: int  # the reducer's own work (PruMerge's scoring and merge, FastV's ranking)
    llm: int  # LLM over visual + text tokens
    lm_head: int  # last position only
    image_kv_bytes: int  # KV cache of the image's tokens, bf16, over the LLM layers that keep them

    @property
    def full(self) -> int:
        return self.vision + self.projector + self.reducer + self.llm + self.lm_head


def assumed_selected(config: LlavaStfConfig) -> int:
    """PruMerge tokens assumed kept per image (without the extra one): the published average, scaled to the grid."""
    grid_h, grid_w = config.grid_size
    return round(get_reducer_class(config.reducer_type).assumed_keep_ratio * grid_h * grid_w)


def schedule_macs(schedule: list[tuple[int, int]], text_tokens: int, text_config) -> int:
    """LLM MACs of a per-layer schedule ``[(first_layer, image tokens), ...]`` plus ``text_tokens`` in every layer."""
    bounds = [layer for layer, _ in schedule[1:]] + [text_config.num_hidden_layers]
    return sum(llm_macs(n + text_tokens, text_config, end - start) for (start, n), end in zip(schedule, bounds))


def count_flops(
    config: LlavaStfConfig,
    text_tokens: int = 0,
    reducer_tokens: int | None = None,
    image_size: tuple[int, int] | None = None,
) -> FlopsReport:
    """Prefill FLOPs of one ``image_size`` image (``(height, width)``, default :func:`default_image_size`) and
    ``text_tokens``; ``reducer_tokens`` is the adaptive (PruMerge) count to assume (``None``: published average).

    The vision tower and the projector run once per crop; the LLM sees the image's own token count.
    """
    text, layers = config.text_config, config.text_config.num_hidden_layers
    height, width = image_size or default_image_size(config)
    crops, n_img = image_geometry(config, height, width)
    proj, reducer_macs = crops * projector_macs(config), 0
    schedule = [(0, n_img)]
    reducer = get_reducer_class(config.reducer_type) if config.reducer_type else None
    if reducer is not None:
        params, shapes = config.reducer_params(), config.reducer_shapes()
        if reducer.adaptive:
            n_img = (assumed_selected(config) if reducer_tokens is None else reducer_tokens) + 1
        # A vision-side reducer works per crop (AnyRes: every crop keeps n_img / crops tokens, no newlines); an
        # in-LLM one sees the whole image's tokens once.
        per_run, runs = (n_img // crops, crops) if reducer.stage == "vision" else (n_img, 1)
        if reducer.stage == "vision":
            proj = crops * projector_macs(config, per_run)
        schedule = reducer.llm_schedule(params, shapes, n_img)
        vision, heads = config.vision_config, config.text_config.num_attention_heads
        dims = MacDims(
            vision_hidden=vision.hidden_size,
            vision_heads=vision.num_attention_heads,
            feature_channels=config.projector_shapes().in_channels,
            text_hidden=text.hidden_size,
            text_kv_hidden=kv_width(text),
            text_heads=heads,
            text_tokens=text_tokens,
            image_tokens=per_run,
        )
        reducer_macs = runs * reducer.own_macs(params, shapes, dims)
    return FlopsReport(
        image_size=(height, width),
        crops=crops,
        image_tokens=n_img,
        text_tokens=text_tokens,
        equivalent_tokens=layer_average(schedule, layers),
        paper=2 * schedule_macs(schedule, 0, text),
        vision=2 * crops * vision_macs(config.vision_config),
        projector=2 * proj,
        reducer=2 * reducer_macs,
        llm=2 * schedule_macs(schedule, text_tokens, text),
        lm_head=2 * text.hidden_size * text.vocab_size,
        image_kv_bytes=kv_cache_bytes(schedule, text),
    )
