"""The latency benchmark's models: configs on real or scaled-down shapes, and variants sharing one set of weights.

``build`` makes one model per ``projector[+reducer[@tokens]]`` spec (``@tokens``: the reducer's settings for that
token budget, ``model.reducers.budget_kwargs``) that shares a single randomly initialised vision tower,
LLM weights and LM head, so only the projector (and reducer) differs between the variants being timed. Each variant
keeps its own language-model module (an in-LLM reducer's ``TokenDropLlamaModel`` hooks its own layers) holding the
shared parameter tensors.

AnyRes (LLaVA-NeXT) variants: a NeXT preset (``--preset llava-v1.6-vicuna-7b``), or :func:`anyres_config` on the
``--size`` shapes (the NeXT presets' ``image_grid_pinpoints`` in units of the crop), built with the generation class
the config names (``model.generation_class``). :func:`image_inputs` gives the pixel tensors either model takes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, is_dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from ..flops import image_geometry
from ..model import LlavaStfConfig, LlavaStfNextConfig, build_projector, generation_class
from ..model.presets import load_preset
from ..model.reducers import budget_kwargs, get_reducer_class
from ..reducer_choice import share_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = {  # image, patch, vision hidden / layers, LLM hidden / FFN / layers / heads
    "cpu": (336, 14, 256, 24, 1024, 2752, 32, 16),  # LLaVA-1.5-7B with every width / 4 (same depths and grid)
    "tiny": (32, 4, 32, 9, 64, 128, 4, 4),
}


NEXT_PRESET = "llava-v1.6-vicuna-7b"  # whose image_grid_pinpoints --anyres takes


def base_config(preset: str | None, size: str, anyres: bool = False) -> LlavaStfConfig:
    """A preset's real shapes, else the ``size`` shapes; ``anyres``: on LLaVA-NeXT AnyRes (:func:`anyres_config`)."""
    config = load_preset(preset) if preset else size_config(size)
    return anyres_config(config) if anyres and not config.anyres else config


def anyres_config(config: LlavaStfConfig) -> LlavaStfNextConfig:
    """``config`` on AnyRes: the NeXT preset's pinpoints scaled to ``config``'s crop (the same at 336 px)."""
    crop, next_config = int(config.vision_config.image_size), load_preset(NEXT_PRESET)
    pinpoints = [[side // next_config.crop_size * crop for side in p] for p in next_config.image_grid_pinpoints]
    return LlavaStfNextConfig(image_grid_pinpoints=pinpoints, **config.to_dict())


def size_config(size: str) -> LlavaStfConfig:
    image, patch, vh, vl, th, tf, tl, heads = SIZES[size]
    vision = CLIPVisionConfig(hidden_size=vh, intermediate_size=4 * vh, num_hidden_layers=vl, num_attention_heads=4,
                              image_size=image, patch_size=patch)  # fmt: skip
    text = LlamaConfig(vocab_size=32064, hidden_size=th, intermediate_size=tf, num_hidden_layers=tl,
                       num_attention_heads=heads, num_key_value_heads=heads)  # fmt: skip
    return LlavaStfConfig(vision_config=vision, text_config=text, image_token_index=32000)


def variant_config(base: LlavaStfConfig, spec: str) -> LlavaStfConfig:
    """The config of ``projector[+reducer[@tokens]]`` on ``base``'s towers (e.g. ``mlp2x_gelu+visionzip@64``)."""
    projector, _, reducer = spec.partition("+")
    reducer, _, tokens = reducer.partition("@")
    fields = base.to_dict()
    fields.update(projector_type=projector, projector_kwargs=None, vision_feature_layer=None)
    fields.update(reducer_type=None, reducer_kwargs=None)
    config = type(base)(**fields)
    if not reducer:
        return config
    if tokens and not tokens.isdigit():
        raise ValueError(f"variant {spec!r}: the token budget after '@' must be an integer")
    kwargs = budget_kwargs(reducer, int(tokens), config.with_reducer(reducer).reducer_shapes()) if tokens else None
    return config.with_reducer(reducer, kwargs)


def lab_variants(projector: str, reducers: list[str], budgets: list[int]) -> list[str]:
    """``projector`` alone, then every reducer at every budget (adaptive ones once, at their own count)."""
    specs = [projector]
    for name in reducers:
        adaptive = get_reducer_class(name).adaptive
        specs += [f"{projector}+{name}"] if adaptive else [f"{projector}+{name}@{t}" for t in budgets]
    return specs


def build(base: LlavaStfConfig, specs: list[str], device: torch.device, dtype: torch.dtype) -> list:
    """``(spec, config, model)`` per variant; all share one vision tower, LLM and LM head."""
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype (no fp32 copy of a 7B model)
    try:
        with torch.device(device):
            first = variant_config(base, specs[0])
            shared = generation_class(first)(first).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    models = []
    for spec in specs:
        config = variant_config(base, spec)
        with torch.device("meta"):
            model = generation_class(config)(config)
        share_weights(model, shared)
        model.model.multi_modal_projector = build_projector(config).to(device, dtype)  # each variant's own
        model.model.multi_modal_projector.reset_parameters()
        models.append((spec, config, model.eval()))
    return models


def image_inputs(
    config: LlavaStfConfig, height: int, width: int, batch: int, device, dtype, generator: torch.Generator | None = None
) -> dict:
    """Random pixel inputs for ``batch`` copies of one ``height x width`` image, as the model takes them.

    Returns:
        ``{"pixel_values": [batch, 3, S, S]}`` (LLaVA-1.5: the image resized to one ``S``-px crop), or for AnyRes
        ``{"pixel_values": [batch, crops, 3, S, S], "image_sizes": [batch, 2]}``.
    """
    size, g = config.vision_config.image_size, generator or torch.Generator().manual_seed(0)
    crops, _ = image_geometry(config, height, width)
    shape = (1, crops, 3, size, size) if config.anyres else (1, 3, size, size)
    pixels = torch.randn(*shape, generator=g).to(device, dtype)
    inputs = {"pixel_values": pixels.expand(batch, *shape[1:])}
    if config.anyres:
        inputs["image_sizes"] = torch.tensor([[height, width]], device=device).expand(batch, 2)
    return inputs


def add_shape_arguments(parser: argparse.ArgumentParser, size: str) -> None:
    """``--preset``, ``--size`` (default ``size``), ``--dtype``, ``--device``: what every benchmark here takes."""
    parser.add_argument("--preset", default=None, help="real shapes from the model presets (e.g. llava-v1.5-7b)")
    parser.add_argument("--size", choices=sorted(SIZES), default=size, help="shapes when no preset is given")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")


def write_json(path: str | None, args: argparse.Namespace, rows: list) -> None:
    """The run's settings and rows as JSON (for ``bench.gpu_check``); nothing when ``path`` is ``None``."""
    if path:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        with open(path, "w") as f:
            json.dump({"settings": settings, "rows": [asdict(r) if is_dataclass(r) else r for r in rows]}, f, indent=1)
