"""Checkpoint conversion as data: key-rename tables and weight transforms over state dicts (pure, no file I/O).

Sources: ``llava`` (original LLaVA-1.5 ``LlavaLlamaForCausalLM``), ``llava-next`` (the original LLaVA-NeXT / 1.6
release of haotian-liu/LLaVA: the same layout plus ``model.image_newline``, AnyRes), ``llava-stf-official`` (the
official LLaVA-STF release, visresearch/LLaVA-STF: same layout plus ``mm_projector_crosslayer``, with ``mm_projector``
redefined as the STF MLP) and ``llava-hf`` (transformers' ``LlavaForConditionalGeneration``, old and new layouts). Each
source is a list of :class:`Rename` rows (regex on the source key -> our key, optional tensor transform); derived
buffers are dropped by pattern. Every conversion is checked against the target model's shapes (the AnyRes class for an
AnyRes config), and unknown keys, missing keys and shape mismatches raise one :class:`ConversionError` that lists them
all, so nothing is ever left at random init. ``export_llava_hf`` goes the other way for ``mlp2x_gelu`` models, to
transformers' ``LlavaForConditionalGeneration`` or, for AnyRes, ``LlavaNextForConditionalGeneration``
(:data:`EXPORT_TARGETS`). The config side is ``conversion_config``; file I/O and the CLI live in ``llava_stf.convert``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration

from .configuration_llava_stf import LlavaStfConfig
from .modeling_llava_stf_next import generation_class

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
Shapes = Mapping[str, tuple[int, ...]]
Transform = Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]


class ConversionError(ValueError):
    """A checkpoint that does not fit the target model; the message lists every offending key or field."""


@dataclass(frozen=True)
class Rename:
    """One key-map row: ``re.sub(pattern, replacement, key)`` on the first matching row, then ``transform``."""

    pattern: str  # regex matched at the start of a source key
    replacement: str  # our key prefix (may use regex groups)
    transform: Transform | None = None  # (source tensor, target shape) -> tensor of the target shape


def pad_vocab(weight: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Pad ``[V, D]`` embedding / LM-head rows to ``shape[0]`` with the mean row (deterministic, as HF's resize).

    New rows are ``<image>`` (never embedded: its positions take image features) and padding up to a multiple of 64;
    the mean row keeps their logits ordinary instead of random.
    """
    if weight.dim() != 2 or len(shape) != 2 or weight.shape[1] != shape[1] or weight.shape[0] >= shape[0]:
        return weight  # equal, or a mismatch the shape check reports
    mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(shape[0] - weight.shape[0], -1)], 0)


def linear_to_conv(weight: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``Linear(C*k*k -> F)`` weight ``[F, C*k*k]`` -> ``Conv2d(C, F, k, stride k)`` weight ``[F, C, k, k]``.

    The release flattens each k x k window channel-major, ``v[ch*k*k + dy*k + dx]`` (``pixel_unshuffle`` order), so
    a row-major view is exact: ``conv.weight[o, ch, dy, dx] = W[o, ch*k*k + dy*k + dx]``.
    """
    fits = weight.dim() == 2 and len(shape) == 4 and weight.shape[0] == shape[0]
    return weight.reshape(shape).contiguous() if fits and weight.shape[1] == math.prod(shape[1:]) else weight


# Derived buffers that old transformers versions saved; they are recomputed, never learned.
DROPPED_KEYS = (r"\.rotary_emb\.inv_freq$", r"(^|\.)embeddings\.position_ids$")

LLAMA_RENAMES = [  # LlavaLlamaForCausalLM's LLM is LlamaForCausalLM
    Rename(r"^model\.embed_tokens\.", "model.language_model.embed_tokens.", pad_vocab),
    Rename(r"^model\.layers\.", "model.language_model.layers."),
    Rename(r"^model\.norm\.", "model.language_model.norm."),
    Rename(r"^lm_head\.", "lm_head.", pad_vocab),
]
LLAVA_VISION_RENAMES = [Rename(r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower.")]
# Stage-1 projector files (mm_projector.bin) map to keys of ``model.model.multi_modal_projector``.
PROJECTOR_RENAMES: dict[str, list[Rename]] = {
    "llava": [
        Rename(r"^model\.mm_projector\.0\.", "linear_1."),
        Rename(r"^model\.mm_projector\.2\.", "linear_2."),
    ],
    "llava-stf-official": [
        Rename(r"^model\.mm_projector_crosslayer\.0\.", "mbtf.0."),
        Rename(r"^model\.mm_projector_crosslayer\.2\.", "mbtf.2."),
        Rename(r"^model\.mm_projector\.0\.", "stf.fusion.", linear_to_conv),  # Linear on k x k windows = k x k conv
        Rename(r"^model\.mm_projector\.2\.", "stf.align.1."),  # align.0 is the GELU
    ],
}
KEY_MAPS: dict[str, list[Rename]] = {
    source: LLAMA_RENAMES
    + LLAVA_VISION_RENAMES
    + [Rename(r.pattern, "model.multi_modal_projector." + r.replacement, r.transform) for r in rows]
    for source, rows in PROJECTOR_RENAMES.items()
}
# LLaVA-NeXT (1.6) is LLaVA-1.5's layout plus the learned row separator of ``spatial_unpad`` (``[D]``).
KEY_MAPS["llava-next"] = KEY_MAPS["llava"] + [Rename(r"^model\.image_newline", "model.image_newline")]
KEY_MAPS["llava-hf"] = [
    Rename(r"^(model\.)?language_model\.lm_head\.", "lm_head.", pad_vocab),  # transformers < 4.52
    Rename(r"^lm_head\.", "lm_head.", pad_vocab),
    Rename(r"^(model\.)?language_model\.(model\.)?embed_tokens\.", "model.language_model.embed_tokens.", pad_vocab),
    Rename(r"^(model\.)?language_model\.(model\.)?", "model.language_model."),
    Rename(r"^(model\.)?vision_tower\.(vision_model\.)?", "model.vision_tower."),
    Rename(r"^(model\.)?multi_modal_projector\.", "model.multi_modal_projector."),
]
# Where a separately loaded CLIPVisionModel's keys go in a source layout (LLaVA's checkpoints often lack the tower).
CLIP_PREFIX = {source: "model.vision_tower.vision_tower.vision_model." for source in (*PROJECTOR_RENAMES, "llava-next")}
# Ours (mlp2x_gelu) -> transformers' LlavaForConditionalGeneration: the same names, listed so nothing extra slips.
EXPORT_RENAMES = [
    Rename(r"^(model\.(vision_tower|language_model|multi_modal_projector\.linear_[12])\.|lm_head\.)", r"\1")
]
NEXT_EXPORT_RENAMES = EXPORT_RENAMES + [Rename(r"^model\.image_newline$", "model.image_newline")]


@dataclass(frozen=True)
class ExportTarget:
    """transformers' own classes that one family of our models exports to (``--to llava-hf``)."""

    config_class: type[LlavaConfig] | type[LlavaNextConfig]
    model_class: type[LlavaForConditionalGeneration] | type[LlavaNextForConditionalGeneration]
    renames: list[Rename]  # our keys -> theirs
    fields: tuple[str, ...] = ()  # our config attributes the target config takes as they are, beyond LLaVA-1.5's


# Keyed by ``config.anyres``: LLaVA-1.5 models -> transformers' LLaVA, AnyRes ones -> transformers' LLaVA-NeXT.
EXPORT_TARGETS = {
    False: ExportTarget(LlavaConfig, LlavaForConditionalGeneration, EXPORT_RENAMES),
    True: ExportTarget(
        LlavaNextConfig, LlavaNextForConditionalGeneration, NEXT_EXPORT_RENAMES, ("image_grid_pinpoints",)
    ),
}
# Keys that give a checkpoint's origin away, most specific first, for the "check --from" hint.
SOURCE_HINTS = (
    (r"mm_projector_crosslayer", "llava-stf-official"),
    (r"^model\.image_newline$", "llava-next"),
    (r"^model\.vision_tower\.vision_tower\.|^model\.layers\.", "llava"),
    (r"^(language_model|multi_modal_projector|vision_tower)\.", "llava-hf"),
)
SOURCES = tuple(KEY_MAPS)


def _origin_of(target: str, renames: list[Rename]) -> str | None:
    """Source key a missing target key would have come from (plain-prefix rows only)."""
    for r in renames:
        literal = re.sub(r"\\(.)", r"\1", r.pattern[1:])
        if r.pattern.startswith("^") and re.escape(literal) == r.pattern[1:] and target.startswith(r.replacement):
            return literal + target[len(r.replacement) :]
    return None


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more


def apply_renames(
    source: str, state_dict: Mapping[str, torch.Tensor], renames: list[Rename], expected: Shapes
) -> StateDict:
    """Rename (and transform) every key of ``state_dict``, then check the result against ``expected`` shapes.

    Args:
        source: source name, for messages.
        state_dict: source tensors by source key.
        renames: the key map; the first row whose pattern matches a key applies.
        expected: the target model's ``{key: shape}``.

    Returns:
        Tensors by target key, exactly the keys of ``expected`` with their shapes.

    Raises:
        ConversionError: listing unknown source keys, missing target keys and shape mismatches together.
    """
    out: StateDict = {}
    origin: dict[str, str] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        if any(re.search(p, key) for p in DROPPED_KEYS):
            logger.info("dropped derived buffer %s", key)
            continue
        row = next((r for r in renames if re.match(r.pattern, key)), None)
        if row is None:
            unknown.append(key)
            continue
        new = re.sub(row.pattern, row.replacement, key, count=1)
        if new in out:
            raise ConversionError(f"'{source}' checkpoint: source keys {origin[new]} and {key} both map to {new}")
        if row.transform is not None and new in expected:
            tensor = row.transform(tensor, tuple(expected[new]))
        out[new], origin[new] = tensor, key
    unknown += sorted(origin[k] for k in out if k not in expected)
    missing = [
        k + (f" (source key {_origin_of(k, renames)})" if _origin_of(k, renames) else "")
        for k in sorted(set(expected) - set(out))
    ]
    mismatched = [
        f"{origin[k]} -> {k}: source {list(out[k].shape)}, expected {list(expected[k])}"
        for k in sorted(out)
        if k in expected and tuple(out[k].shape) != tuple(expected[k])
    ]
    if unknown or missing or mismatched:
        parts = [f"cannot convert the '{source}' checkpoint:"]
        if unknown:
            parts.append(_listing(f"unexpected source keys, no rule in the '{source}' key map", sorted(unknown)))
        if missing:
            parts.append(_listing("missing keys (the converted model needs them)", missing))
        if mismatched:
            parts.append(_listing("shape mismatches", mismatched))
        guess = next((src for pat, src in SOURCE_HINTS if any(re.search(pat, k) for k in state_dict)), source)
        # No hint when this key map extends the guessed one (LLaVA-NeXT's extends LLaVA's): keys are just missing.
        if guess != source and not set(KEY_MAPS.get(guess, [])) <= set(renames):
            parts.append(f"  hint: these keys look like a '{guess}' checkpoint; check --from")
        raise ConversionError("\n".join(parts))
    return {k: out[k] for k in expected}


def expected_shapes(config: LlavaStfConfig | LlavaConfig | LlavaNextConfig) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the model ``config`` builds (on the meta device: no memory, no init)."""
    if isinstance(config, LlavaStfConfig):  # ours (a LlavaConfig subclass): the AnyRes class for an AnyRes config
        cls = generation_class(config)
    else:
        cls = next(t.model_class for t in EXPORT_TARGETS.values() if type(config) is t.config_class)
    with torch.device("meta"):
        model = cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def has_vision_tower(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the source checkpoint carries its vision tower (LLaVA's often does not)."""
    return any(k.startswith(("model.vision_tower.", "vision_tower.")) for k in state_dict)


def convert_state_dict(
    source: str,
    state_dict: Mapping[str, torch.Tensor],
    config: LlavaStfConfig,
    vision_state_dict: Mapping[str, torch.Tensor] | None = None,
) -> StateDict:
    """A source checkpoint's tensors -> the state dict of ``generation_class(config)`` (1.5 or AnyRes).

    Args:
        source: one of :data:`SOURCES`.
        state_dict: the full source checkpoint.
        config: the target config (from :func:`build_config`); embeddings are padded to its vocabulary.
        vision_state_dict: a ``CLIPVisionModel`` state dict for when the source has no vision tower.

    Raises:
        ConversionError: unknown source, or keys/shapes that do not fit (every key listed).
    """
    if source not in KEY_MAPS:
        raise ConversionError(f"unknown source {source!r}; valid sources: {list(SOURCES)}")
    merged = dict(state_dict)
    if vision_state_dict is not None:
        if source not in CLIP_PREFIX or has_vision_tower(state_dict):
            raise ConversionError(f"this --from {source} checkpoint has its own vision tower; pass no other tower")
        merged.update({CLIP_PREFIX[source] + k: v for k, v in vision_state_dict.items()})
    return apply_renames(source, merged, KEY_MAPS[source], expected_shapes(config))


def convert_projector_state_dict(
    source: str, state_dict: Mapping[str, torch.Tensor], expected: Shapes | None = None
) -> StateDict:
    """A stage-1 ``mm_projector.bin`` -> a state dict for ``model.model.multi_modal_projector``.

    Args:
        source: ``llava`` (keys ``model.mm_projector.{0,2}.*``) or ``llava-stf-official`` (plus
            ``model.mm_projector_crosslayer.{0,2}.*``).
        state_dict: the file's tensors.
        expected: the target projector's ``{key: shape}`` (``{k: v.shape for k, v in projector.state_dict()}``);
            ``None`` infers the shapes from the file (the STF window from the fused width).

    Raises:
        ConversionError: unknown source, missing / unexpected keys or shape mismatches (all listed).
    """
    if source not in PROJECTOR_RENAMES:
        raise ConversionError(f"no projector files for source {source!r}; valid: {list(PROJECTOR_RENAMES)}")
    renames = PROJECTOR_RENAMES[source]
    if expected is None:
        expected = _projector_shapes_from_file(state_dict, renames)
    return apply_renames(source, state_dict, renames, expected)


def _projector_shapes_from_file(state_dict: Mapping[str, torch.Tensor], renames: list[Rename]) -> Shapes:
    """Target shapes read off the file: every row's weight and bias (both releases train with biases)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for r in renames:
        for name in ("weight", "bias"):
            key = next((k for k in state_dict if re.fullmatch(r.pattern + name, k)), None)
            shapes[r.replacement + name] = tuple(state_dict[key].shape) if key is not None else (0,)  # (0,): missing
    fusion, mbtf_out = shapes.get("stf.fusion.weight"), shapes.get("mbtf.2.weight")
    if fusion is not None and len(fusion) == 2 and mbtf_out is not None and mbtf_out[0] > 0:
        window = math.isqrt(fusion[1] // mbtf_out[0])  # the STF conv reads MBTF's output: in = C * k * k
        shapes["stf.fusion.weight"] = (fusion[0], mbtf_out[0], window, window)
    return shapes


def export_llava_hf(
    config: LlavaStfConfig, state_dict: Mapping[str, torch.Tensor]
) -> tuple[LlavaConfig | LlavaNextConfig, StateDict]:
    """Our ``mlp2x_gelu`` model -> transformers' config and tensors: ``LlavaConfig`` / ``LlavaForConditionalGeneration``
    for a LLaVA-1.5 model, ``LlavaNextConfig`` / ``LlavaNextForConditionalGeneration`` for an AnyRes one.

    Raises:
        ConversionError: for any other projector type (transformers' LLaVA and LLaVA-NeXT have only the LLaVA-1.5 MLP).
    """
    target = EXPORT_TARGETS[config.anyres]
    if config.projector_type != "mlp2x_gelu":
        raise ConversionError(
            f"cannot export projector_type '{config.projector_type}' to llava-hf: transformers' "
            f"{target.model_class.__name__} only has the LLaVA-1.5 projector ('mlp2x_gelu'); keep this model in the "
            "llava_stf format (it loads with `import llava_stf` + AutoModelForImageTextToText)"
        )
    hf_config = target.config_class(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_index,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_feature_layer=config.vision_feature_layer,
        image_seq_length=config.num_image_tokens,
        multimodal_projector_bias=config.multimodal_projector_bias,
        tie_word_embeddings=config.tie_word_embeddings,
        **{name: getattr(config, name) for name in target.fields},
    )
    return hf_config, apply_renames("llava_stf", state_dict, target.renames, expected_shapes(hf_config))


__all__ = [
    "DROPPED_KEYS",
    "EXPORT_RENAMES",
    "EXPORT_TARGETS",
    "KEY_MAPS",
    "NEXT_EXPORT_RENAMES",
    "PROJECTOR_RENAMES",
    "SOURCES",
    "CLIP_PREFIX",
    "ConversionError",
    "ExportTarget",
    "Rename",
    "apply_renames",
    "convert_projector_state_dict",
    "convert_state_dict",
    "expected_shapes",
    "export_llava_hf",
    "has_vision_tower",
    "linear_to_conv",
    "pad_vocab",
]
