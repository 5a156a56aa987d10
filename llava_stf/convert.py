"""Convert released checkpoints to the llava_stf format, and export LLaVA-1.5 / LLaVA-NeXT-style models to llava-hf.

Usage::

    python -m llava_stf.convert --from llava SRC DST [--vision-tower PATH]
    python -m llava_stf.convert --from llava-next SRC DST [--vision-tower PATH]
    python -m llava_stf.convert --from llava-stf-official SRC DST [--vision-tower PATH] [--vision-feature-layer 8,7,..]
    python -m llava_stf.convert --from llava-hf SRC DST
    python -m llava_stf.convert --to llava-hf SRC DST
    python -m llava_stf.convert --projector-only --from {llava,llava-stf-official} SRC/mm_projector.bin DST.safetensors

AnyRes (LLaVA-NeXT): ``--from llava-next`` reads the original 1.6 release of haotian-liu/LLaVA (e.g.
``liuhaotian/llava-v1.6-vicuna-7b``: ``image_aspect_ratio: anyres``, ``mm_patch_merge_type: spatial_unpad``,
``image_grid_pinpoints`` as ``[width, height]`` pairs, the ``model.image_newline`` weight) and writes a
``LlavaStfNextForConditionalGeneration`` folder (``mlp2x_gelu``, pinpoints as ``[height, width]``) with a
``LlavaStfNextProcessor``. ``--to llava-hf`` on an AnyRes ``mlp2x_gelu`` checkpoint writes transformers' own
``LlavaNextForConditionalGeneration`` + ``LlavaNextProcessor`` folder (llava-hf ``llava-v1.6-*`` format); a llava-hf
NeXT folder needs no conversion (``LlavaStfNextForConditionalGeneration.from_pretrained`` reads it as it is).

A converted folder holds safetensors weights, ``config.json``, the tokenizer (with ``<image>`` added and ``<unk>`` as
padding, as LLaVA pads), the processor and a greedy ``generation_config.json``. This file does the file I/O; the key
maps and config mapping are data in ``llava_stf.model.conversion`` and ``llava_stf.model.conversion_config``.

Outputs are never overwritten by accident and never left half-written: an existing ``DST`` (a non-empty folder, or
any file) is refused unless ``--overwrite`` is given, which never replaces the source itself; everything is written
under a temporary name next to ``DST`` (``.DST.partial-*``) and renamed into place only when complete, so a crash or
Ctrl-C leaves ``DST`` as it was (an old folder being replaced is moved to ``.DST.old-*`` for the instant of the swap).
The source is checked before anything heavy is loaded (the folder exists, its ``config.json`` is the kind ``--from``
names), and every expected failure is one ``error:`` line with exit status 1 (``llava_stf.errors.run_main``;
``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
)

from .errors import UserError, add_debug_flag, run_main
from .loading import PROCESSORS, check_checkpoint, read_json_object
from .model import LlavaStfConfig, LlavaStfProcessor, generation_class
from .model.builder import build_processor, prepare_tokenizer
from .model.conversion import (
    EXPORT_TARGETS,
    SOURCES,
    ConversionError,
    StateDict,
    convert_projector_state_dict,
    convert_state_dict,
    export_llava_hf,
    has_vision_tower,
)
from .model.conversion_config import (
    build_config,
    check_fields,
    greedy_generation_config,
    image_aspect_ratio,
    padded_vocab_size,
)
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


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_tensors(path: Path) -> StateDict:
    """One safetensors or ``torch.save`` file (``weights_only=True``: tensors only, no pickled code).

    Raises:
        UserError: The file is missing, or not a file of tensors (corrupt, truncated, pickled code, another format).
    """
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a file-reading boundary: whatever the loader raises is about this file
        raise UserError(f"{path} is not a readable weights file ({type(err).__name__}: {_first_line(err)})") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path} does not hold a dict of tensors (a state dict), but a {type(state_dict).__name__}")
    return state_dict


def load_weights(folder: Path) -> StateDict:
    """Every tensor of a checkpoint folder (sharded or not, safetensors or ``pytorch_model*.bin``)."""
    name = next((n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if name is None:
        raise UserError(f"no weights in {folder}: looked for {', '.join(WEIGHT_FILES)}")
    index = read_json_object(folder / name) if name.endswith(".index.json") else None
    if index is not None and not isinstance(index.get("weight_map"), dict):
        raise UserError(f"{folder / name} has no weight_map")
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
                f"cannot read a CLIP config from {tower!r} ({_first_line(err)}); pass --vision-tower PATH"
            ) from err
        logger.warning("%s is not available locally; using its known architecture (llava_stf.model.presets)", tower)
        preset.pop("hub_id")
        return CLIPVisionConfig(**preset).to_dict()


def load_vision_weights(tower: str) -> StateDict:
    """A CLIP vision tower's tensors (from a full CLIP or a vision-only checkpoint); missing keys are an error."""
    try:
        model, info = CLIPVisionModel.from_pretrained(tower, output_loading_info=True)
    except OSError as err:
        raise ConversionError(
            f"the checkpoint has no vision tower and {tower!r} cannot be loaded ({_first_line(err)})"
        ) from err
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


def check_destination(dst: Path, folder: bool, overwrite: bool, src: Path) -> None:
    """Refuse an output that would replace something, before any work is done.

    ``dst`` may not exist yet, or be an empty folder (``folder`` outputs); anything else needs ``overwrite``, and even
    then must be of the same kind (folder / file) and must not be or hold the source.

    Raises:
        UserError: Naming ``dst`` and what is in the way.
    """
    kind = "folder" if folder else "file"
    if dst.is_symlink() or dst.exists():
        if folder and dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
            return
        if dst.is_dir() != folder:
            raise UserError(f"{dst} exists and is not a {kind}; the output is a {kind}: choose another path")
        if not overwrite:
            raise UserError(f"{dst} already exists; pass --overwrite to replace it")
        src_real, dst_real = src.resolve(), dst.resolve()
        if src_real == dst_real or dst_real in src_real.parents:
            raise UserError(f"{dst} holds the source {src}: replacing it would delete the source")
    if dst.parent.exists() and not dst.parent.is_dir():
        raise UserError(f"{dst.parent} is not a folder, so {dst} cannot be written")


@contextmanager
def staged_output(dst: Path, folder: bool) -> Iterator[Path]:
    """Yield a temporary path next to ``dst`` to write into; on success rename it to ``dst`` (replacing what was
    there: :func:`check_destination` decided that was allowed), on failure or Ctrl-C remove it and leave ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    temporary = dst.with_name(f".{dst.name}.partial-{tag}")
    if folder:
        temporary.mkdir()
    try:
        yield temporary
        if not folder:
            os.replace(temporary, dst)  # atomic for a file, over an existing one too
        elif dst.is_symlink() or dst.exists():
            old = dst.with_name(f".{dst.name}.old-{tag}")
            os.rename(dst, old)
            try:
                os.rename(temporary, dst)
            except BaseException:
                os.rename(old, dst)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(temporary, dst)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists():
            temporary.unlink()


def read_source_config(source: str, src: Path) -> dict[str, Any]:
    """The source folder's ``config.json``, checked to be the kind ``--from source`` names (before loading weights).

    Raises:
        UserError: The folder is missing or not a folder, has no ``config.json``, or holds another kind of checkpoint.
        ConversionError: A field of an original LLaVA config the conversion cannot reproduce.
    """
    if not src.exists():
        raise UserError(f"source folder not found: {src}")
    if not src.is_dir():
        hint = " (an mm_projector.bin converts with --projector-only)" if src.suffix in (".bin", ".safetensors") else ""
        raise UserError(f"{src} is a file, not a checkpoint folder{hint}")
    config = read_json_object(src / "config.json")
    if config is None:
        raise UserError(f"{src} is not a checkpoint folder: no config.json")
    model_type = config.get("model_type")
    if model_type in PROCESSORS:
        raise UserError(
            f"{src} is already a llava_stf checkpoint (model_type {model_type!r}): nothing to convert (to export an "
            "mlp2x_gelu one to transformers' LLaVA: --to llava-hf)"
        )
    if source == "llava-hf":
        if model_type != "llava" or "text_config" not in config:
            hints = {
                "llava_llama": "an original LLaVA config: use --from llava or --from llava-stf-official",
                "llava_next": "a llava-hf LLaVA-NeXT checkpoint needs no conversion: "
                "LlavaStfNextForConditionalGeneration.from_pretrained reads it as it is",
            }
            if model_type == "llava_llama" and config.get("image_aspect_ratio") == "anyres":
                hints["llava_llama"] = "an original LLaVA-NeXT config: use --from llava-next"
            raise UserError(
                f"{src}/config.json is not a llava-hf config (model_type {model_type!r}, "
                f"{'with' if 'text_config' in config else 'no'} text_config)"
                + (f"; {hints[model_type]}" if model_type in hints else "")
            )
    else:
        check_fields(source, config)
    return config


def convert_checkpoint(
    source: str,
    src: str | Path,
    dst: str | Path,
    vision_tower: str | None = None,
    vision_feature_layer: Sequence[int] | None = None,
    image_mode: str | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Convert the checkpoint folder ``src`` (``--from source``) into a llava_stf folder ``dst``.

    Args:
        source: ``llava``, ``llava-next`` (AnyRes: the output is a ``LlavaStfNextForConditionalGeneration``),
            ``llava-stf-official`` or ``llava-hf``.
        src: source folder (config.json, weights, tokenizer files).
        dst: new output folder.
        vision_tower: CLIP checkpoint for the vision config, preprocessing and (when the source lacks them) the
            tower weights; default: the source config's ``mm_vision_tower``.
        vision_feature_layer: explicit hidden-state indices (the official release on a non-24-block tower).
        image_mode: processor image mode override (``pad`` / ``square``; not for AnyRes); default from the source.
        overwrite: replace an existing ``dst`` (see :func:`check_destination`).

    Returns:
        Notes on what was not carried over (also logged).
    """
    src, dst = Path(src), Path(dst)
    src_config = read_source_config(source, src)
    if image_mode is not None and image_aspect_ratio(src_config) == "anyres":
        raise UserError(
            f"--image-aspect-ratio {image_mode} is for LLaVA-1.5 sources; {src} is AnyRes (LLaVA-NeXT), whose "
            "processor tiles every image"
        )
    check_destination(dst, folder=True, overwrite=overwrite, src=src)
    state_dict = load_weights(src)
    # LlavaLlamaConfig is unknown to transformers; its tokenizer is Llama's (llava-hf configs load as they are).
    family = {} if source == "llava-hf" else {"config": LlamaConfig()}
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, padding_side="right", **family)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer of {src}: {_first_line(err)}") from None
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
        model = generation_class(config)(config)
    model.load_state_dict(converted, strict=True, assign=True)
    model.generation_config, notes = greedy_generation_config(
        read_json_object(src / "generation_config.json"), src_config, tokenizer.pad_token_id
    )
    image_processor, pads = load_image_processor(tower, config.vision_config.image_size)
    source_mode = ("pad" if pads else "square") if source == "llava-hf" else image_aspect_ratio(src_config)
    processor = build_processor(config, image_processor, tokenizer, image_mode or source_mode)
    with staged_output(dst, folder=True) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    for note in notes:
        logger.warning(note)
    logger.info("converted %s (--from %s) -> %s: %s", src, source, dst, config.projector_type)
    return notes


def export_to_llava_hf(src: str | Path, dst: str | Path, overwrite: bool = False) -> None:
    """Write our ``mlp2x_gelu`` checkpoint ``src`` as a transformers folder: ``LlavaForConditionalGeneration`` +
    ``LlavaProcessor``, or for an AnyRes checkpoint ``LlavaNextForConditionalGeneration`` + ``LlavaNextProcessor``."""
    src, dst = Path(src), Path(dst)
    check_checkpoint(src)  # a one-line reason for anything but a llava_stf checkpoint, before building a model
    check_destination(dst, folder=True, overwrite=overwrite, src=src)
    config: LlavaStfConfig = AutoConfig.from_pretrained(src)
    model, info = generation_class(config).from_pretrained(src, dtype="auto", output_loading_info=True)
    if info["missing_keys"]:
        raise ConversionError(f"{src} lacks weights: {sorted(info['missing_keys'])}")
    processor = AutoProcessor.from_pretrained(src)
    hf_config, state_dict = export_llava_hf(model.config, model.state_dict())
    hf_config.dtype = model.dtype
    with torch.device("meta"):
        hf_model = EXPORT_TARGETS[config.anyres].model_class(hf_config)
    hf_model.load_state_dict(state_dict, strict=True, assign=True)
    hf_model.generation_config = model.generation_config
    with staged_output(dst, folder=True) as staging:
        hf_model.save_pretrained(staging)
        export_processor(processor, model.config).save_pretrained(staging)


def export_processor(processor: LlavaStfProcessor, config: LlavaStfConfig) -> LlavaProcessor | LlavaNextProcessor:
    """transformers' own processor for an exported model: the same tokenizer, preprocessing and placeholder count.

    An AnyRes processor's image processor is transformers' ``LlavaNextImageProcessorPil`` already; a LLaVA-1.5 one
    pads to square in our processor, which llava-hf's ``LlavaImageProcessor`` records as ``do_pad``.
    """
    if config.anyres:
        processor_class, image_processor = LlavaNextProcessor, processor.image_processor
    else:
        image_settings = processor.image_processor.to_dict()
        image_settings.pop("image_processor_type", None)
        do_pad = processor.image_aspect_ratio == "pad"
        processor_class, image_processor = LlavaProcessor, LlavaImageProcessorPil(**image_settings, do_pad=do_pad)
    return processor_class(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=processor.chat_template,
    )


def convert_projector_file(source: str, src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """A stage-1 ``mm_projector.bin`` (file, or the folder holding it) -> a safetensors projector state dict.

    The file's keys load into ``model.model.multi_modal_projector``; its metadata records ``projector_type``.
    An existing ``dst`` is replaced only with ``overwrite`` (see :func:`check_destination`).
    """
    src, dst = Path(src), Path(dst)
    if source not in PROJECTOR_TYPES:
        raise UserError(f"--projector-only needs --from one of {', '.join(PROJECTOR_TYPES)}, not {source}")
    path = src / "mm_projector.bin" if src.is_dir() else src
    if not path.is_file():
        raise UserError(f"projector file not found: {path}")
    check_destination(dst, folder=False, overwrite=overwrite, src=path)
    projector = convert_projector_state_dict(source, load_tensors(path))
    metadata = {"format": "pt", "source": source, "projector_type": PROJECTOR_TYPES[source]}
    with staged_output(dst, folder=False) as staging:
        save_file({k: v.contiguous() for k, v in projector.items()}, staging, metadata=metadata)
    return dst


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: 0 when written; 1 with one ``error:`` line (the offending keys listed on it) for
    bad input; 2 for bad arguments (argparse)."""
    parser = argparse.ArgumentParser(prog="python -m llava_stf.convert", description=__doc__.splitlines()[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source", choices=SOURCES, help="convert a released checkpoint to ours")
    direction.add_argument(
        "--to", dest="target", choices=("llava-hf",), help="export our mlp2x_gelu checkpoint (LLaVA-1.5 or AnyRes)"
    )
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
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST (never the source)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.target and (args.vision_tower or args.vision_feature_layer or args.image_aspect_ratio):
        parser.error("--vision-tower, --vision-feature-layer and --image-aspect-ratio apply to --from only")
    if args.projector_only and args.source not in PROJECTOR_TYPES:
        parser.error(f"--projector-only needs --from one of {', '.join(PROJECTOR_TYPES)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_main(lambda: convert(args), args.debug)


def convert(args: argparse.Namespace) -> None:
    """Run the conversion ``main`` parsed; expected failures raise (``run_main`` prints them)."""
    try:
        _convert(args)
    except ConversionError as err:
        head, *details = str(err).splitlines()
        if not details:
            raise
        # A key listing (up to 20 keys per kind) goes to stderr as it is; the error line says what failed, and the hint.
        hints = [line.strip() for line in details if line.strip().startswith("hint:")]
        print("\n".join(line for line in details if not line.strip().startswith("hint:")), file=sys.stderr)
        raise UserError("; ".join([f"{head.rstrip(':')} (the keys are listed above)", *hints])) from err
    print(f"wrote {args.dst}")


def _convert(args: argparse.Namespace) -> None:
    if args.projector_only:
        convert_projector_file(args.source, args.src, args.dst, args.overwrite)
    elif args.target == "llava-hf":
        export_to_llava_hf(args.src, args.dst, args.overwrite)
    else:
        convert_checkpoint(
            args.source,
            args.src,
            args.dst,
            args.vision_tower,
            args.vision_feature_layer,
            args.image_aspect_ratio,
            args.overwrite,
        )


if __name__ == "__main__":
    raise SystemExit(main())
