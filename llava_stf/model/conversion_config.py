"""Config side of checkpoint conversion: a source ``config.json`` -> ``LlavaStfConfig``, generation config, image mode.

Original LLaVA-1.5 and the official LLaVA-STF release save a ``LlavaLlamaConfig``: the Llama fields plus ``mm_*``
fields (``mm_vision_tower``, ``mm_vision_select_layer``, ``mm_hidden_size``, ...) and no vision config, which comes
from the CLIP checkpoint instead. The release's ``config.json`` does not identify STF (it says ``mm_projector_type:
mlp2x_gelu``), so the caller's source choice decides, and the converted config records ``projector_type: mbtf_stf``
with the release's hidden-state indices written out. The original LLaVA-NeXT (1.6) release adds ``image_aspect_ratio:
anyres``, ``mm_patch_merge_type: spatial_unpad`` and ``image_grid_pinpoints`` as ``[width, height]`` pairs
(haotian-liu/LLaVA ``llava/mm_utils.py``); it becomes a ``LlavaStfNextConfig`` with the pairs as transformers' and
ours read them, ``[height, width]``. Which fields each source may hold is a table (:data:`SOURCE_FIELDS`). Pure
functions over dicts; no file I/O.
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import GenerationConfig

from .configuration_llava_stf import LlavaStfConfig
from .configuration_llava_stf_next import LlavaStfNextConfig
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
# LLaVA-NeXT 1.6: AnyRes tiles, each row of the unpadded tile grid closed by image_newline (spatial_unpad). Not
# reproduced: "flat" / "spatial" merges (no unpadding, no newlines), the later LLaVA-NeXT repository's "anyres_max_N"
# and grid-range pinpoints ("(1x1),...,(3x3)"), and CLS tokens (AnyRes re-assembles patch grids).
NEXT_SUPPORTED_FIELDS: dict[str, tuple] = dict(
    SUPPORTED_FIELDS,
    mm_patch_merge_type=("spatial_unpad",),
    mm_vision_select_feature=(None, "patch"),
    image_aspect_ratio=("anyres",),
)
SOURCE_FIELDS: dict[str, dict[str, tuple]] = {
    "llava": SUPPORTED_FIELDS,
    "llava-stf-official": SUPPORTED_FIELDS,
    "llava-next": NEXT_SUPPORTED_FIELDS,
}
ANYRES_SOURCES = ("llava-next",)  # sources whose config.json is AnyRes (image_aspect_ratio "anyres")
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


def check_fields(source: str, src_config: Mapping[str, Any], supported: Mapping[str, tuple] | None = None) -> None:
    """Raise naming every ``config.json`` field whose value the conversion cannot reproduce.

    Args:
        source: the ``--from`` source; its row of :data:`SOURCE_FIELDS` is the default ``supported`` table.
        src_config: the source ``config.json``.
        supported: ``{field: accepted values}`` (``None`` in the values: the field may be absent).
    """
    supported = SOURCE_FIELDS[source] if supported is None else supported
    bad = [
        f"{name}={src_config.get(name)!r} (supported: {list(values)})"
        for name, values in supported.items()
        if src_config.get(name) not in values
    ]
    if "text_config" in src_config:
        bad.append("text_config (a llava-hf config.json; use --from llava-hf)")
    anyres = src_config.get("image_aspect_ratio") == "anyres"
    if bad and anyres and source not in ANYRES_SOURCES:
        bad.append(f"an AnyRes (LLaVA-NeXT) config: use --from {ANYRES_SOURCES[0]}")
    elif bad and source in ANYRES_SOURCES and src_config.get("image_aspect_ratio") in (None, "square", "pad"):
        bad.append("a LLaVA-1.5-style config (no AnyRes): use --from llava or --from llava-stf-official")
    if bad:
        raise ConversionError(f"--from {source}: unsupported config.json field(s): " + "; ".join(bad))
    if source in ANYRES_SOURCES:
        source_pinpoints(src_config)  # a form it cannot read fails here, before any weights are loaded


def source_pinpoints(src_config: Mapping[str, Any]) -> list[list[int]]:
    """The original release's ``image_grid_pinpoints`` (``[width, height]`` pairs) as ``[height, width]`` pairs.

    haotian-liu/LLaVA reads each pinpoint as ``(width, height)`` (``select_best_resolution`` in ``llava/mm_utils.py``)
    and accepts a list or its Python literal as a string; transformers' LLaVA-NeXT and ours read ``[height, width]``.
    Swapping each pair keeps the choice of resolution, ties included, for every image.

    Raises:
        ConversionError: the field is missing, or in a form other than a list of positive integer pairs (e.g. the
            later LLaVA-NeXT repository's grid range ``"(1x1),...,(3x3)"``).
    """
    value = src_config.get("image_grid_pinpoints")
    pairs: object = value
    if isinstance(value, str):
        if re.search(r"\(\s*\d+\s*x\s*\d+\s*\)", value):
            raise ConversionError(
                f"image_grid_pinpoints={value!r} is a grid range (the later LLaVA-NeXT repository's form), which "
                "--from llava-next does not convert; it reads a list of [width, height] pairs (LLaVA-NeXT 1.6)"
            )
        try:
            pairs = ast.literal_eval(value)  # literals only: never code
        except (ValueError, SyntaxError):
            pairs = None
    valid = (
        isinstance(pairs, (list, tuple))
        and len(pairs) > 0
        and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) and v > 0 for v in p) for p in pairs
        )
    )
    if not valid:
        raise ConversionError(
            f"image_grid_pinpoints={value!r} is not a list of [width, height] pairs of positive integers "
            "(LLaVA-NeXT 1.6 writes e.g. [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])"
        )
    return [[int(height), int(width)] for width, height in pairs]


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

    Returns:
        A ``LlavaStfConfig``, or for ``llava-next`` a ``LlavaStfNextConfig`` (AnyRes, ``mlp2x_gelu``).

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
    config_class, anyres = LlavaStfConfig, {}
    if source in ANYRES_SOURCES:
        pinpoints = source_pinpoints(src_config)
        crop = int(vision_config["image_size"])
        bad = [p for p in pinpoints if p[0] % crop or p[1] % crop]
        if bad:
            raise ConversionError(
                f"image_grid_pinpoints {bad} ([height, width]) are not multiples of the vision tower's "
                f"image_size {crop}: wrong --vision-tower?"
            )
        config_class, anyres = LlavaStfNextConfig, {"image_grid_pinpoints": pinpoints}
    if source in ("llava", *ANYRES_SOURCES):
        if vision_feature_layer is not None:
            raise ConversionError("--vision-feature-layer is for --from llava-stf-official; LLaVA reads one layer")
        projector = dict(projector_type="mlp2x_gelu", vision_feature_layer=src_config.get("mm_vision_select_layer", -2))
    else:
        depth = int(vision_config["num_hidden_layers"])
        layers = official_vision_layers(src_config, depth, vision_feature_layer)
        projector = dict(projector_type="mbtf_stf", projector_kwargs=OFFICIAL_PROJECTOR_KWARGS)
        projector["vision_feature_layer"] = layers
    return config_class(
        vision_config=dict(vision_config),
        text_config=text_config_from_llava(src_config, vocab_size, pad_token_id),
        image_token_index=image_token_id,
        vision_feature_select_strategy=SELECT_STRATEGY[src_config.get("mm_vision_select_feature")],
        projector_hidden_act="gelu",  # nn.GELU(): the exact erf form
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(src_config.get("tie_word_embeddings", False)),
        **projector,
        **anyres,
    )


def image_aspect_ratio(src_config: Mapping[str, Any]) -> str:
    """Processor image mode: LLaVA pads to square only when ``image_aspect_ratio == "pad"``; LLaVA-NeXT tiles
    (``"anyres"``); anything else is a plain resize and centre crop (``"square"``)."""
    value = src_config.get("image_aspect_ratio")
    return value if value in ("pad", "anyres") else "square"


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
    "ANYRES_SOURCES",
    "NEXT_SUPPORTED_FIELDS",
    "OFFICIAL_LOWER_LAYERS",
    "OFFICIAL_PROJECTOR_KWARGS",
    "SOURCE_FIELDS",
    "SUPPORTED_FIELDS",
    "build_config",
    "check_fields",
    "greedy_generation_config",
    "image_aspect_ratio",
    "official_vision_layers",
    "padded_vocab_size",
    "source_pinpoints",
    "text_config_from_llava",
]
