"""Model presets: ``configs/model/*.yaml`` -> ``LlavaStfConfig`` on the real shapes, without any weights.

The presets ship inside the package (``llava_stf/configs/model``, see :mod:`llava_stf.configs`), so a name such as
``llava-stf-7b`` resolves from any working directory and in a non-editable install; a path to a YAML file works too.

A preset names a vision tower and an LLM from the shape tables below (the public architectures of
``openai/clip-vit-large-patch14-336`` and ``lmsys/vicuna-{7,13}b-v1.5``) plus the projector settings. Tools that
count FLOPs or parameters build the model on the meta device (:func:`build_meta_model`), which allocates nothing.

Run ``python -m llava_stf.model.presets [NAME ...]`` to print each preset's image tokens and parameter counts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import configs
from .configuration_llava_stf import LlavaStfConfig
from .configuration_llava_stf_next import LlavaStfNextConfig
from .modeling_llava_stf import LlavaStfForConditionalGeneration
from .modeling_llava_stf_next import generation_class

PRESET_DIR = configs.CONFIG_ROOT / "model"

# Architecture facts of the public checkpoints (config.json values), so presets need no download.
VISION_TOWERS: dict[str, dict[str, Any]] = {
    "clip-vit-large-patch14-336": dict(
        hub_id="openai/clip-vit-large-patch14-336",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
}
LLMS: dict[str, dict[str, Any]] = {
    "vicuna-7b-v1.5": dict(
        hub_id="lmsys/vicuna-7b-v1.5",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "vicuna-13b-v1.5": dict(
        hub_id="lmsys/vicuna-13b-v1.5",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
}
# Vicuna's 32000 tokens + <image> (id 32000), padded to a multiple of 64 as llava-hf does.
VOCAB_SIZE, IMAGE_TOKEN_ID, PAD_TOKEN_ID = 32064, 32000, 0
PRESET_KEYS = {"vision", "llm", "projector_type", "projector_kwargs", "vision_feature_layer", "image_grid_pinpoints"}


def list_presets() -> list[str]:
    return configs.names("model")


def preset_path(name_or_path: str | Path) -> Path:
    """The YAML file of a preset name (shipped in the package) or of a path; FileNotFoundError lists the names."""
    try:
        return configs.resolve("model", name_or_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no preset {str(name_or_path)!r}; available: {list_presets()}") from None


def _lookup(table: dict[str, dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r} in preset; known: {sorted(table)}")
    shapes = dict(table[name])
    shapes.pop("hub_id")
    return shapes


def load_preset(name_or_path: str | Path) -> LlavaStfConfig:
    """Config for a preset name (a file in ``configs/model``) or a path to a preset YAML.

    A preset with ``image_grid_pinpoints`` is an AnyRes (LLaVA-NeXT) model: a :class:`LlavaStfNextConfig`.
    """
    path = preset_path(name_or_path)
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - PRESET_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; valid: {sorted(PRESET_KEYS)}")
    vision = _lookup(VISION_TOWERS, "vision tower", spec["vision"])
    text = _lookup(LLMS, "llm", spec["llm"])
    anyres = {"image_grid_pinpoints": spec["image_grid_pinpoints"]} if "image_grid_pinpoints" in spec else {}
    return (LlavaStfNextConfig if anyres else LlavaStfConfig)(
        **anyres,
        vision_config=dict(model_type="clip_vision_model", **vision),
        text_config=dict(model_type="llama", vocab_size=VOCAB_SIZE, pad_token_id=PAD_TOKEN_ID, **text),
        image_token_index=IMAGE_TOKEN_ID,
        projector_type=spec["projector_type"],
        projector_kwargs=spec.get("projector_kwargs"),
        vision_feature_layer=spec.get("vision_feature_layer"),
    )


def build_meta_model(name_or_path: str | Path | LlavaStfConfig) -> LlavaStfForConditionalGeneration:
    """The full model on the meta device: real shapes and parameter counts, no memory."""
    config = name_or_path if isinstance(name_or_path, LlavaStfConfig) else load_preset(name_or_path)
    with torch.device("meta"):
        return generation_class(config)(config)


def parameter_counts(model: LlavaStfForConditionalGeneration) -> dict[str, int]:
    parts = {
        "vision_tower": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "llm": model.model.language_model,
        "lm_head": model.lm_head,
    }
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    newline = getattr(model.model, "image_newline", None)  # AnyRes: one learned [D] row, counted with the projector
    counts["projector"] += 0 if newline is None else newline.numel()
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"preset names or YAML paths (default: all of {PRESET_DIR})")
    args = parser.parse_args(argv)
    names = args.names or list_presets()
    print(
        f"{'preset':28} {'projector':13} {'tokens':>6} {'at 672x672':>10} {'projector params':>17} {'total params':>14}"
    )
    for name in names:
        model = build_meta_model(name)
        counts, config = parameter_counts(model), model.config
        at_672 = config.image_token_count(672, 672) if config.anyres else config.num_image_tokens  # 1.5: resized
        print(
            f"{name:28} {config.projector_type:13} {config.num_image_tokens:>6} {at_672:>10} "
            f"{counts['projector']:>17,} {sum(counts.values()):>14,}"
        )


if __name__ == "__main__":
    main()
