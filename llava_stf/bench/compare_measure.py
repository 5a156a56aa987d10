"""``bench.compare``'s measurements on real inputs: text tokens, prefill latency, KV cache, and FLOPs per row.

Every row (a checkpoint under one reducer and budget) gets the same fixed sample of the benchmark's own questions
(evenly spaced over the questions evaluated, images only); prefills run round-robin over the samples and the rows
(rows innermost, after one warm-up round), so a busy spell on the machine hits every row alike. Each prefill is the
model's forward over the whole prompt with ``use_cache=True`` (``bench.timing.prefill``: vision tower, reducer,
projector and LLM, CUDA-synchronised wall clock); an adaptive reducer's prompt holds each image's own token count
(``Generator.encode``, untimed). The KV cache is read from that forward's output: K and V bytes summed over the
layers, one image and its prompt (an in-LLM reducer's later layers hold fewer tokens). FLOPs come from
``llava_stf.flops.count_flops`` with the questions' mean text-token count; an adaptive reducer's count is the one
measured on the sample (FLOPs averaged over the sample's images).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..eval.engine import Sample, open_image
from ..flops import count_flops
from ..generation import Generator, Request
from ..model import LlavaStfConfig
from ..model.reducers import get_reducer_class, layer_average
from .timing import Clock, prefill


@dataclass
class Prefill:
    """One row's measurements over the latency sample."""

    prefill_ms: float  # median over samples x repeats
    llm_ms: float  # the LLM's share of it (median)
    kv_bytes: float  # KV cache of one image and its prompt (mean over the sample)
    image_tokens: float  # image tokens entering the LLM (mean over the sample)
    counts: list[int]  # image tokens entering the LLM, per sample image
    sizes: list[tuple[int, int]]  # (height, width) of each sample image (AnyRes FLOPs depend on it)


@dataclass
class Flops:
    paper: float  # LLM over the image tokens only (the papers' convention), FLOPs
    prefill: float  # the whole prefill: tower, projector, reducer, LLM over image + text tokens, LM head
    image_tokens: float  # entering the LLM
    equivalent_tokens: float  # averaged over the LLM's layers (differs for in-LLM reducers)


def text_tokens(generator: Generator, samples: Sequence[Sample]) -> float:
    """Mean prompt tokens besides the image placeholders (template and system prompt included) over ``samples``."""
    stand_in = Image.new("RGB", (1, 1))  # only the tag matters here
    total = 0
    for s in samples:
        request = Request.single(s.text, stand_in if s.image is not None else None)
        images = int(s.image is not None)
        total += len(generator.processor.encode_prompt(generator.prompt(request), image_tokens=[1] * images)) - images
    return total / max(len(samples), 1)


def latency_sample(samples: Sequence[Sample], count: int) -> list[Sample]:
    """``count`` questions with images, evenly spaced over ``samples`` (the same for every row)."""
    with_image = [s for s in samples if s.image is not None]
    if count <= 0 or not with_image:
        return []
    if count >= len(with_image):
        return list(with_image)
    if count == 1:
        return [with_image[0]]
    return [with_image[round(i * (len(with_image) - 1) / (count - 1))] for i in range(count)]


def kv_cache_bytes(cache) -> int:
    """Bytes of every layer's keys and values in a transformers cache."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.inference_mode()
def measure_prefill(generators: Sequence[Generator], samples: Sequence[Sample], repeats: int) -> list[Prefill | None]:
    """Round-robin prefills of every generator's model on ``samples`` (batch 1); ``None`` each when no sample.

    Args:
        generators: One per row (models may share weights).
        samples: The latency sample (questions with images).
        repeats: Timed rounds after one warm-up round.
    """
    if not samples or not generators:
        return [None] * len(generators)
    images = [open_image(s.image) for s in samples]
    inputs = []  # [row][sample] -> (input_ids [1, T], image inputs (pixel_values, AnyRes: image_sizes), image tokens)
    for gen in generators:
        dtype = next(gen.model.parameters()).dtype
        row = []
        for s, image in zip(samples, images):
            encoded = gen.encode([Request.single(s.text, image)])
            pixels = {k: v.to(gen.device) for k, v in gen.processor.image_inputs([image]).items()}
            pixels["pixel_values"] = pixels["pixel_values"].to(dtype)
            count = len(encoded["mm_encoder_outputs"]["image"].pooler_output[0])
            row.append((encoded["input_ids"], pixels, count))
        inputs.append(row)
    clock = Clock(generators[0].device)
    times: list[list[tuple[float, float]]] = [[] for _ in generators]
    kv: list[list[int]] = [[] for _ in generators]
    for repeat in range(repeats + 1):  # round 0 warms up
        for i in range(len(samples)):
            for r, gen in enumerate(generators):
                ids, pixels, _ = inputs[r][i]
                parts, out, _ = prefill(gen.model, ids, pixels["pixel_values"], clock, pixels.get("image_sizes"))
                if repeat:
                    times[r].append((parts["prefill"], parts["llm"]))
                if repeat == 1:
                    kv[r].append(kv_cache_bytes(out.cache))
                del out
    return [
        Prefill(
            prefill_ms=1e3 * statistics.median(t for t, _ in row_times),
            llm_ms=1e3 * statistics.median(t for _, t in row_times),
            kv_bytes=statistics.fmean(row_kv),
            image_tokens=statistics.fmean(c for _, _, c in row_inputs),
            counts=[c for _, _, c in row_inputs],
            sizes=[(image.height, image.width) for image in images],
        )
        for row_times, row_kv, row_inputs in zip(times, kv, inputs)
    ]


def layer_average_tokens(config: LlavaStfConfig, counts: Sequence[int]) -> float:
    """Image tokens averaged over the LLM's layers, mean over images entering the LLM with ``counts`` tokens (an
    in-LLM reducer's schedule for each image's own count; AnyRes images differ)."""
    depth, reducer = config.text_config.num_hidden_layers, config.reducer_type
    if reducer is None:
        return statistics.fmean(counts)
    cls, params, shapes = get_reducer_class(reducer), config.reducer_params(), config.reducer_shapes()
    return statistics.fmean(layer_average(cls.llm_schedule(params, shapes, n), depth) for n in counts)


def flops(
    config: LlavaStfConfig,
    text: float,
    counts: Sequence[int] | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> Flops:
    """Paper-convention and full-prefill FLOPs of one image with ``text`` tokens (rounded) under ``config``.

    Args:
        counts: Measured image tokens per image, for an adaptive reducer (FLOPs are averaged over them); ignored
            otherwise. Without them an adaptive reducer gets ``count_flops``'s assumed (published) count.
        sizes: ``(height, width)`` of each measured image: AnyRes FLOPs are averaged over them (crops and tokens
            depend on the size). Without them AnyRes gets ``count_flops``'s default size (672x672).
    """
    text_tokens = round(text)
    if config.anyres and sizes:
        reports = [count_flops(config, text_tokens, image_size=size) for size in sizes]
    elif config.adaptive_image_tokens and counts:
        # count_flops takes the adaptive reducer's selected tokens and adds its one extra (PruMerge's)
        reports = [count_flops(config, text_tokens, reducer_tokens=c - 1) for c in counts]
    else:
        reports = [count_flops(config, text_tokens)]
    return Flops(
        paper=statistics.fmean(r.paper for r in reports),
        prefill=statistics.fmean(r.full for r in reports),
        image_tokens=statistics.fmean(r.image_tokens for r in reports),
        equivalent_tokens=statistics.fmean(r.equivalent_tokens for r in reports),
    )


__all__ = [
    "Flops",
    "Prefill",
    "flops",
    "kv_cache_bytes",
    "latency_sample",
    "layer_average_tokens",
    "measure_prefill",
    "text_tokens",
]
