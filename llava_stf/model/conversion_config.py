"""Config side of checkpoint conversion: a source ``config.json`` -> ``LlavaStfConfig``, generation config, image mode.

Original LLaVA-1.5 and the official LLaVA-STF release save a ``LlavaLlamaConfig``: the Llama fields plus ``mm_*``
fields (``mm_vision_tower``, ``mm_vision_select_layer``, ``mm_hidden_size``, ...) and no vision config, which comes
from the CLIP checkpoint instead. The release's ``config.json`` does not identify STF (it says ``mm_projector_type:
mlp2x_gelu``), so the caller's source choice decides, and the converted config records ``projector_type: mbtf_stf``
with the release's hidden-state indices written out. Pure functions over dicts; no file I/O.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import GenerationConfig

from .configuration_llava_stf import LlavaStfConfig
from .conversion import ConversionError

logger = logging.getLogger(__name__)

# The release reads mm_vision_select_layer (-2: block 23), then seven hard-coded blocks of the 24-block CLIP.
OFFICIAL_VISION_DEPTH = 24
OFFICIAL_LOWER_LAYERS = (21, 18, 15, 12, 9, 6, 3)
# The release's layer stack (window 2, one token per window, no activation after either last Linear); the widths
# (4C, C, 4*k*k*C) resolve from the shapes and are checked against the weights.
OFFICIAL_PROJECTOR_KWARGS = dict(
    window=2, fused_tokens=1, num_align_layers=1, final_activation=False, block_final_activation=False
)
# config.json field -> the values this converter reproduces (None: field absent).
SUPPORTED_FIELDS: dict[str, tuple] = {
    "model_type": ("llava", "llava_llama"),
    "mm_projector_type": ("mlp2x_gelu",),
    "mm_patch_merge_type": (None, "flat"),
    "mm_use_im_start_end": (None, False),
    "mm_use_im_patch_token": (None, False),
    "mm_vision_select_feature": (None, "patch", "cls_patch"),
    "image_aspect_ratio": (None, "square", "pad"),
}
SELECT_STRATEGY = {None: "default", "patch": "default", "cls_patch": "full"}  # mm_vision_select_feature -> ours
# LLaVA-only fields of a LlavaLlamaConfig (everything else is the Llama text config).
LLAVA_ONLY_FIELD = re.compile(
    r"^(mm_|use_mm_|tune_mm_|freeze_mm_|unfreeze_mm_|image_|tokenizer_|s2|_name_or_path$|architectures$"
    r"|model_type$|transformers_version$|torch_dtype$|dtype$|vision_feature_layer$)"
)
# Generation fields that change what is decoded; of these only the kept ones are carried over, the rest are noted.
DECODING_FIELDS = (
    "max_length", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "num_beams",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
)  # fmt: skip
KEPT_GENERATION_FIELDS = ("bos_token_id", "eos_token_id", "max_length")


def check_fields(source: str, src_config: Mapping[str, Any], supported: Mapping[str, tuple] = SUPPORTED_FIELDS) -> None:
    """Raise naming every ``config.json`` field whose value the conversion cannot reproduce."""
    bad = [
        f"{name}={src_config.get(name)!r} (supported: {list(values)})"
        for name, values in supported.items()
        if src_config.get(name) not in values
    ]
    if "text_config" in src_config:
        bad.append("text_config (a llava-hf config.json; use --from llava-hf)")
    if bad:
        raise ConversionError(f"--from {source}: unsupported config.json field(s): " + "; ".join(bad))


def padded_vocab_size(num_tokens: int, source_rows: int, multiple: int = 64) -> int:
    """Embedding rows after adding tokens: ``max(tokens, rows)`` rounded up to ``multiple`` (32001 -> 32064)."""
    rows = max(num_tokens, source_rows)
    return -(-rows // multiple) * multiple


def text_config_from_llava(src_config: Mapping[str, Any], vocab_size: int, pad_token_id: int) -> dict[str, Any]:
    """The Llama fields of a ``LlavaLlamaConfig`` (``mm_*``, tokenizer and generation fields removed)."""
    text = {k: v for k, v in src_config.items() if not LLAVA_ONLY_FIELD.match(k) and k not in DECODING_FIELDS}
    if text.get("rope_scaling", 0) is None:  # transformers 5 reads rope_theta into rope_parameters by itself
        del text["rope_scaling"]
    return dict(text, model_type="llama", vocab_size=vocab_size, pad_token_id=pad_token_id)


def official_vision_layers(
    src_config: Mapping[str, Any], depth: int, override: Sequence[int] | None = None
) -> list[int]:
    """Hidden-state indices of the release, deepest first, as explicit non-negative numbers.

    Args:
        src_config: the release's ``config.json`` (``mm_vision_select_layer``, and optionally our
            ``vision_feature_layer`` list for towers other than the 24-block CLIP).
        depth: vision encoder blocks.
        override: explicit indices (``--vision-feature-layer``); wins over the config.

    Raises:
        ConversionError: a tower that is not 24 blocks deep with no explicit indices, or an index out of range.
    """
    layers = override if override is not None else src_config.get("vision_feature_layer")
    if layers is None:
        if depth != OFFICIAL_VISION_DEPTH:
            raise ConversionError(
                f"the official release hard-codes hidden states [-2, {', '.join(map(str, OFFICIAL_LOWER_LAYERS))}] "
                f"of a {OFFICIAL_VISION_DEPTH}-block CLIP, but this vision tower has {depth} blocks; pass the "
                "indices with --vision-feature-layer (or a 'vision_feature_layer' list in the source config.json)"
            )
        layers = [src_config.get("mm_vision_select_layer", -2), *OFFICIAL_LOWER_LAYERS]
    layers = [layers] if isinstance(layers, int) else list(layers)
    bad = [i for i in layers if not -(depth + 1) <= int(i) <= depth]
    if bad:
        raise ConversionError(f"vision feature layer(s) {bad} out of range for a {depth}-block tower")
    return [int(i) % (depth + 1) for i in layers]


def build_config(
    source: str,
    src_config: Mapping[str, Any],
    vision_config: Mapping[str, Any] | None,
    *,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    vision_feature_layer: Sequence[int] | None = None,
) -> LlavaStfConfig:
    """Our config for a source checkpoint.

    Args:
        source: ``llava``, ``llava-stf-official`` or ``llava-hf``.
        src_config: the source ``config.json``.
        vision_config: the CLIP vision config (``CLIPVisionConfig.to_dict()``); unused for ``llava-hf``.
        vocab_size: embedding rows after adding ``<image>`` (see :func:`padded_vocab_size`).
        image_token_id: the tokenizer's ``<image>`` id.
        pad_token_id: the tokenizer's pad id (``<unk>`` for LLaVA).
        vision_feature_layer: explicit hidden-state indices (official release on a non-24-block tower).

    Raises:
        ConversionError: a field the conversion cannot reproduce, naming it.
    """
    if source == "llava-hf":
        if src_config.get("model_type") != "llava" or "projector_type" in src_config:
            raise ConversionError(f"--from llava-hf expects model_type 'llava', got {src_config.get('model_type')!r}")
        if src_config.get("image_token_index", image_token_id) != image_token_id:
            raise ConversionError(
                f"config image_token_index {src_config['image_token_index']} != tokenizer <image> id {image_token_id}"
            )
        kwargs = {k: v for k, v in src_config.items() if k not in ("architectures", "transformers_version")}
        text = dict(kwargs.pop("text_config"), vocab_size=vocab_size)
        return LlavaStfConfig(**dict(kwargs, text_config=text, image_token_index=image_token_id))
    check_fields(source, src_config)
    if vision_config is None:
        raise ConversionError(f"--from {source} needs the CLIP vision config (the source config.json has none)")
    if src_config.get("mm_hidden_size", vision_config["hidden_size"]) != vision_config["hidden_size"]:
        raise ConversionError(
            f"config mm_hidden_size {src_config['mm_hidden_size']} != vision tower hidden_size "
            f"{vision_config['hidden_size']}: wrong --vision-tower?"
        )
    if source == "llava":
        if vision_feature_layer is not None:
            raise ConversionError("--vision-feature-layer is for --from llava-stf-official; LLaVA reads one layer")
        projector = dict(projector_type="mlp2x_gelu", vision_feature_layer=src_config.get("mm_vision_select_layer", -2))
    else:
        depth = int(vision_config["num_hidden_layers"])
        layers = official_vision_layers(src_config, depth, vision_feature_layer)
        projector = dict(projector_type="mbtf_stf", projector_kwargs=OFFICIAL_PROJECTOR_KWARGS)
        projector["vision_feature_layer"] = layers
    return LlavaStfConfig(
        vision_config=dict(vision_config),
        text_config=text_config_from_llava(src_config, vocab_size, pad_token_id),
        image_token_index=image_token_id,
        vision_feature_select_strategy=SELECT_STRATEGY[src_config.get("mm_vision_select_feature")],
        projector_hidden_act="gelu",  # nn.GELU(): the exact erf form
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(src_config.get("tie_word_embeddings", False)),
        **projector,
    )


def image_aspect_ratio(src_config: Mapping[str, Any]) -> str:
    """Processor image mode: LLaVA pads to square only when ``image_aspect_ratio == "pad"``."""
    return "pad" if src_config.get("image_aspect_ratio") == "pad" else "square"


def greedy_generation_config(
    src_generation: Mapping[str, Any] | None, src_config: Mapping[str, Any], pad_token_id: int
) -> tuple[GenerationConfig, list[str]]:
    """A greedy generation config from the source's, and notes naming every setting not carried over.

    Vicuna and the official release ship ``do_sample: true`` (temperature 0.9, top-p 0.6); LLaVA's evaluation
    decodes greedily. Sampling is never carried over silently: the dropped settings are returned as notes.
    """
    src = dict(src_generation or {k: src_config[k] for k in DECODING_FIELDS if k in src_config})
    kept = {k: src.get(k, src_config.get(k)) for k in KEPT_GENERATION_FIELDS}
    dropped = {k: v for k, v in src.items() if k in DECODING_FIELDS and k not in KEPT_GENERATION_FIELDS}
    dropped = {k: v for k, v in dropped.items() if v is not None and not (k == "do_sample" and v is False)}
    notes = []
    if dropped:
        settings = ", ".join(f"{k}={v!r}" for k, v in sorted(dropped.items()))
        notes.append(
            f"generation config: not carried over from the source: {settings}; the converted model decodes "
            "greedily (do_sample=False); pass sampling settings to generate() to sample"
        )
    config = GenerationConfig(**{k: v for k, v in kept.items() if v is not None}, do_sample=False)
    config.pad_token_id = pad_token_id
    return config, notes


__all__ = [
    "OFFICIAL_LOWER_LAYERS",
    "OFFICIAL_PROJECTOR_KWARGS",
    "SUPPORTED_FIELDS",
    "build_config",
    "check_fields",
    "greedy_generation_config",
    "image_aspect_ratio",
    "official_vision_layers",
    "padded_vocab_size",
    "text_config_from_llava",
]
