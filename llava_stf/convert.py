"""Convert released checkpoints to the llava_stf format, and export LLaVA-1.5-style models to llava-hf.

Usage::

    python -m llava_stf.convert --from llava SRC DST [--vision-tower PATH]
    python -m llava_stf.convert --from llava-stf-official SRC DST [--vision-tower PATH] [--vision-feature-layer 8,7,..]
    python -m llava_stf.convert --from llava-hf SRC DST
    python -m llava_stf.convert --to llava-hf SRC DST
    python -m llava_stf.convert --projector-only --from {llava,llava-stf-official} SRC/mm_projector.bin DST.safetensors

A converted folder holds safetensors weights, ``config.json``, the tokenizer (with ``<image>`` added and ``<unk>`` as
padding, as LLaVA pads), the processor and a greedy ``generation_config.json``. This file does the file I/O; the key
maps and config mapping are data in ``llava_stf.model.conversion`` and ``llava_stf.model.conversion_config``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
)

from .model import LlavaStfForConditionalGeneration, LlavaStfProcessor
from .model.builder import prepare_tokenizer
from .model.conversion import (
    SOURCES,
    ConversionError,
    StateDict,
    convert_projector_state_dict,
    convert_state_dict,
    export_llava_hf,
    has_vision_tower,
)
from .model.conversion_config import build_config, greedy_generation_config, image_aspect_ratio, padded_vocab_size
from .model.presets import VISION_TOWERS
from .model.processing_llava_stf import IMAGE_MODES

logger = logging.getLogger(__name__)

# Looked for in this order; an index file names its shards.
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
PROJECTOR_TYPES = {"llava": "mlp2x_gelu", "llava-stf-official": "mbtf_stf"}  # of a converted mm_projector.bin


def read_json(path: Path) -> dict[str, Any] | None:
    """The parsed JSON file, or ``None`` when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


def load_tensors(path: Path) -> StateDict:
    """One safetensors or ``torch.save`` file (``weights_only=True``: tensors only, no pickled code)."""
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_weights(folder: Path) -> StateDict:
    """Every tensor of a checkpoint folder (sharded or not, safetensors or ``pytorch_model*.bin``)."""
    name = next((n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if name is None:
        raise FileNotFoundError(f"no weights in {folder}: looked for {list(WEIGHT_FILES)}")
    index = read_json(folder / name) if name.endswith(".index.json") else None
    files = sorted(set(index["weight_map"].values())) if index else [name]
    state_dict: StateDict = {}
    for file in files:
        state_dict.update(load_tensors(folder / file))
    return state_dict


def load_vision_config(tower: str) -> dict[str, Any]:
    """CLIP vision config from a folder or cached hub id; the known shapes of a preset tower as the fallback."""
    try:
        return CLIPVisionConfig.from_pretrained(tower).to_dict()
    except OSError as err:
        preset = next((dict(v) for v in VISION_TOWERS.values() if v["hub_id"] == tower), None)
        if preset is None:
            raise ConversionError(
                f"cannot read a CLIP config from {tower!r} ({err}); pass --vision-tower PATH"
            ) from err
        logger.warning("%s is not available locally; using its known architecture (llava_stf.model.presets)", tower)
        preset.pop("hub_id")
        return CLIPVisionConfig(**preset).to_dict()


def load_vision_weights(tower: str) -> StateDict:
    """A CLIP vision tower's tensors (from a full CLIP or a vision-only checkpoint); missing keys are an error."""
    try:
        model, info = CLIPVisionModel.from_pretrained(tower, output_loading_info=True)
    except OSError as err:
        raise ConversionError(f"the checkpoint has no vision tower and {tower!r} cannot be loaded ({err})") from err
    if info["missing_keys"]:
        raise ConversionError(f"vision tower {tower!r} lacks keys: {sorted(info['missing_keys'])}")
    return model.state_dict()


def load_image_processor(folder: str, image_size: int) -> tuple[CLIPImageProcessorPil, bool]:
    """The checkpoint's CLIP preprocessing (or CLIP's defaults at ``image_size``), and whether it pads to square.

    llava-hf's ``LlavaImageProcessor`` records padding as ``do_pad``; ours pads in the processor instead.
    """
    try:
        image_processor = CLIPImageProcessorPil.from_pretrained(folder)
    except OSError:
        logger.warning("no image processor config in %s; using CLIP preprocessing at %d px", folder, image_size)
        size = {"height": image_size, "width": image_size}
        return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=size), False
    pads = bool(getattr(image_processor, "do_pad", False))
    image_processor.do_pad = None
    return image_processor, pads


def _check_new_folder(dst: Path) -> None:
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty; converting into it could mix two checkpoints")


def convert_checkpoint(
    source: str,
    src: str | Path,
    dst: str | Path,
    vision_tower: str | None = None,
    vision_feature_layer: Sequence[int] | None = None,
    image_mode: str | None = None,
) -> list[str]:
    """Convert the checkpoint folder ``src`` (``--from source``) into a llava_stf folder ``dst``.

    Args:
        source: ``llava``, ``llava-stf-official`` or ``llava-hf``.
        src: source folder (config.json, weights, tokenizer files).
        dst: new output folder.
        vision_tower: CLIP checkpoint for the vision config, preprocessing and (when the source lacks them) the
            tower weights; default: the source config's ``mm_vision_tower``.
        vision_feature_layer: explicit hidden-state indices (the official release on a non-24-block tower).
        image_mode: processor image mode override (``pad`` / ``square``); default from the source.

    Returns:
        Notes on what was not carried over (also logged).
    """
    src, dst = Path(src), Path(dst)
    _check_new_folder(dst)
    src_config = read_json(src / "config.json")
    if src_config is None:
        raise FileNotFoundError(f"{src} has no config.json")
    state_dict = load_weights(src)
    # LlavaLlamaConfig is unknown to transformers; its tokenizer is Llama's (llava-hf configs load as they are).
    family = {} if source == "llava-hf" else {"config": LlamaConfig()}
    tokenizer = AutoTokenizer.from_pretrained(src, padding_side="right", **family)
    if "tokenizer_model_max_length" in src_config:
        tokenizer.model_max_length = src_config["tokenizer_model_max_length"]
    image_token_id = prepare_tokenizer(tokenizer)
    rows = next((v.shape[0] for k, v in state_dict.items() if k.endswith("embed_tokens.weight")), len(tokenizer))
    vision_config, vision_state_dict, tower = None, None, str(src)
    if source != "llava-hf":
        tower = vision_tower or src_config.get("mm_vision_tower")
        if not tower:
            raise ConversionError(f"{src}/config.json has no mm_vision_tower; pass --vision-tower PATH")
        vision_config = load_vision_config(tower)
        if not has_vision_tower(state_dict):
            logger.info("the checkpoint has no vision tower weights; loading them from %s", tower)
            vision_state_dict = load_vision_weights(tower)
    config = build_config(
        source,
        src_config,
        vision_config,
        vocab_size=padded_vocab_size(len(tokenizer), rows),
        image_token_id=image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vision_feature_layer=vision_feature_layer,
    )
    converted = convert_state_dict(source, state_dict, config, vision_state_dict)
    dtype = converted["model.language_model.embed_tokens.weight"].dtype  # the LLM's dtype for every tensor
    converted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in converted.items()}
    config.dtype = dtype
    with torch.device("meta"):
        model = LlavaStfForConditionalGeneration(config)
    model.load_state_dict(converted, strict=True, assign=True)
    model.generation_config, notes = greedy_generation_config(
        read_json(src / "generation_config.json"), src_config, tokenizer.pad_token_id
    )
    image_processor, pads = load_image_processor(tower, config.vision_config.image_size)
    source_mode = ("pad" if pads else "square") if source == "llava-hf" else image_aspect_ratio(src_config)
    processor = LlavaStfProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        image_aspect_ratio=image_mode or source_mode,
    )
    model.save_pretrained(dst)
    processor.save_pretrained(dst)
    for note in notes:
        logger.warning(note)
    logger.info("converted %s (--from %s) -> %s: %s", src, source, dst, config.projector_type)
    return notes


def export_to_llava_hf(src: str | Path, dst: str | Path) -> None:
    """Write our ``mlp2x_gelu`` checkpoint ``src`` as a transformers ``LlavaForConditionalGeneration`` folder."""
    dst = Path(dst)
    _check_new_folder(dst)
    model, info = LlavaStfForConditionalGeneration.from_pretrained(src, dtype="auto", output_loading_info=True)
    if info["missing_keys"]:
        raise ConversionError(f"{src} lacks weights: {sorted(info['missing_keys'])}")
    processor = LlavaStfProcessor.from_pretrained(src)
    hf_config, state_dict = export_llava_hf(model.config, model.state_dict())
    hf_config.dtype = model.dtype
    with torch.device("meta"):
        hf_model = LlavaForConditionalGeneration(hf_config)
    hf_model.load_state_dict(state_dict, strict=True, assign=True)
    hf_model.generation_config = model.generation_config
    hf_model.save_pretrained(dst)
    image_settings = processor.image_processor.to_dict()
    image_settings.pop("image_processor_type", None)
    LlavaProcessor(
        image_processor=LlavaImageProcessorPil(**image_settings, do_pad=processor.image_aspect_ratio == "pad"),
        tokenizer=processor.tokenizer,
        patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=processor.chat_template,
    ).save_pretrained(dst)


def convert_projector_file(source: str, src: str | Path, dst: str | Path) -> Path:
    """A stage-1 ``mm_projector.bin`` (file, or the folder holding it) -> a safetensors projector state dict.

    The file's keys load into ``model.model.multi_modal_projector``; its metadata records ``projector_type``.
    """
    src, dst = Path(src), Path(dst)
    path = src / "mm_projector.bin" if src.is_dir() else src
    projector = convert_projector_state_dict(source, load_tensors(path))
    dst.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "source": source, "projector_type": PROJECTOR_TYPES[source]}
    save_file({k: v.contiguous() for k, v in projector.items()}, dst, metadata=metadata)
    return dst


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point; conversion errors exit with status 2 and the message listing the keys."""
    parser = argparse.ArgumentParser(prog="python -m llava_stf.convert", description=__doc__.splitlines()[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source", choices=SOURCES, help="convert a released checkpoint to ours")
    direction.add_argument("--to", dest="target", choices=("llava-hf",), help="export our mlp2x_gelu checkpoint")
    parser.add_argument("src", help="source folder (or mm_projector.bin with --projector-only)")
    parser.add_argument("dst", help="new output folder (or .safetensors file with --projector-only)")
    parser.add_argument("--vision-tower", help="CLIP checkpoint (default: the source's mm_vision_tower)")
    parser.add_argument(
        "--vision-feature-layer",
        type=_int_list,
        help="hidden-state indices, deepest first (write --vision-feature-layer=-2,21,... for a negative first index)",
    )
    parser.add_argument("--image-aspect-ratio", choices=IMAGE_MODES, help="override the processor image mode")
    parser.add_argument("--projector-only", action="store_true", help="convert a stage-1 mm_projector.bin")
    args = parser.parse_args(argv)
    if args.target and (args.vision_tower or args.vision_feature_layer or args.image_aspect_ratio):
        parser.error("--vision-tower, --vision-feature-layer and --image-aspect-ratio apply to --from only")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.projector_only:
            if args.source not in PROJECTOR_TYPES:
                parser.error(f"--projector-only needs --from one of {list(PROJECTOR_TYPES)}")
            convert_projector_file(args.source, args.src, args.dst)
        elif args.target == "llava-hf":
            export_to_llava_hf(args.src, args.dst)
        else:
            convert_checkpoint(
                args.source, args.src, args.dst, args.vision_tower, args.vision_feature_layer, args.image_aspect_ratio
            )
    except (ConversionError, FileNotFoundError, FileExistsError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    main()
