"""Loading a llava_stf checkpoint for inference: a one-line check of the folder, optional 8/4-bit quantization.

Shared by the generation helper (evaluation, chat, the lmms-eval plugin); 1.5 (``llava_stf``) and AnyRes
(``llava_stf_next``) checkpoints alike, each read as its saved ``model_type`` says (``load_config``). A folder that is
not a llava_stf checkpoint (a LoRA adapter, a stage-1 projector-only folder, another model type, no processor) is
refused with a reason before anything heavy is loaded. ``load_checkpoint(..., reducer=ReducerChoice(...))`` runs any
checkpoint with another token reducer (or none): the one place evaluation and chat apply ``--reducer`` (see
``llava_stf.reducer_choice``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

# importing .model registers llava_stf and llava_stf_next with the Auto classes
from .model import LlavaStfConfig, LlavaStfNextConfig, LlavaStfNextProcessor, LlavaStfProcessor
from .reducer_choice import ReducerChoice

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
QUANTIZED_BITS = (4, 8)  # load_checkpoint(load_in_bits=...) with bitsandbytes on a CUDA device
NOT_QUANTIZED = ["vision_tower", "multi_modal_projector", "lm_head"]  # kept in ``dtype`` when quantizing the LLM
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}  # --dtype names
# model_type of each llava_stf checkpoint kind -> the processor class saved with it (1.5, and AnyRes / LLaVA-NeXT)
PROCESSORS = {
    LlavaStfConfig.model_type: LlavaStfProcessor.__name__,
    LlavaStfNextConfig.model_type: LlavaStfNextProcessor.__name__,
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_checkpoint(path: str | Path) -> None:
    """Raise a one-line error unless ``path`` is a llava_stf checkpoint: ``config.json``, weights and processor.

    Both kinds are accepted: ``llava_stf`` (LLaVA-1.5 layout) with a ``LlavaStfProcessor`` and ``llava_stf_next``
    (AnyRes) with a ``LlavaStfNextProcessor`` (``PROCESSORS``).

    Raises:
        FileNotFoundError: If ``path`` is not a folder.
        ValueError: Saying what is missing or foreign (a LoRA adapter, a stage-1 projector folder, another model
            type, a processor other than the one of its model type).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    config = read_json_object(path / "config.json")
    if config is None:
        hint = (
            " (it holds a LoRA adapter: use the merged model its training run saved)"
            if (path / "adapter_config.json").is_file()
            else ""
        )
        raise ValueError(f"{path} is not a llava_stf checkpoint: no config.json{hint}")
    model_type = config.get("model_type")
    if model_type not in PROCESSORS:
        raise ValueError(
            f"{path} holds a {model_type!r} model, not a llava_stf checkpoint (model_type "
            f"{' or '.join(repr(t) for t in PROCESSORS)}); convert it first with python -m llava_stf.convert"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(
            f"{path} has a llava_stf config but no model weights ({', '.join(WEIGHT_FILES)}); a stage-1 output "
            "holds only the projector: use a stage-2 output or a converted checkpoint"
        )
    processor = read_json_object(path / "processor_config.json")
    expected = PROCESSORS[model_type]
    if processor is None or processor.get("processor_class") != expected:
        found = "none" if processor is None else repr(processor.get("processor_class"))
        raise ValueError(
            f"{path} has no {expected} saved in processor_config.json (found: {found}); a {model_type!r} "
            "checkpoint needs one"
        )


def load_config(path: str | Path) -> LlavaStfConfig:
    """The saved config of a checkpoint folder, as its own class (``LlavaStfNextConfig`` for an AnyRes one).

    ``AutoConfig`` reads ``model_type``, so a NeXT folder never loads as a plain ``LlavaStfConfig`` (which would
    drop ``image_grid_pinpoints``).

    Raises:
        ValueError: If the folder's config is not a llava_stf one.
    """
    config = AutoConfig.from_pretrained(path)
    if not isinstance(config, LlavaStfConfig):
        raise ValueError(f"{path} holds a {config.model_type!r} config, not a llava_stf one ({sorted(PROCESSORS)})")
    return config


def read_json_object(file: Path) -> dict | None:
    """The JSON object in ``file``; ``None`` when there is no such file; ``ValueError`` when it is not valid JSON.

    One reader for the config files of checkpoints (here and in ``llava_stf.convert``).
    """
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = (str(err) or repr(err)).splitlines()[0]
        raise ValueError(f"{file} is not a readable JSON file: {reason}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return data


def quantization_config(bits: int, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """bitsandbytes settings for ``load_in_bits``: the LLM's linear layers in 8 bits, or 4-bit NF4 with double
    quantization as LLaVA's ``--load-4bit``; the vision tower, the projector and ``lm_head`` stay unquantized."""
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=NOT_QUANTIZED)
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
            llm_int8_skip_modules=NOT_QUANTIZED,
        )
    raise ValueError(f"load_in_bits must be one of {QUANTIZED_BITS}, got {bits!r}")


def load_checkpoint(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    load_in_bits: int | None = None,
    reducer: ReducerChoice | None = None,
) -> tuple[torch.nn.Module, LlavaStfProcessor]:
    """Load ``(model, processor)`` from a checkpoint folder with transformers' Auto classes, in eval mode.

    Args:
        path: A folder written by ``save_pretrained`` (model + processor; an AnyRes ``llava_stf_next`` folder loads
            as ``LlavaStfNextForConditionalGeneration``, chosen by the Auto classes from its saved ``model_type``).
        device: Where to put the model (default: ``cuda`` when available, else ``cpu``).
        dtype: Weight dtype (default: float16 on a GPU, as LLaVA evaluates, float32 on a CPU).
        load_in_bits: 8 or 4 to quantize the LLM with bitsandbytes (``quantization_config``); needs a CUDA device
            and the ``bitsandbytes`` package.
        reducer: Another token reducer than the one saved (``ReducerChoice(None)``: none); the processor then
            writes that reducer's image-token count.

    Raises:
        FileNotFoundError: If ``path`` is not a folder.
        ValueError: If ``path`` is not a llava_stf checkpoint (``check_checkpoint``), quantization is asked for
            on a device other than CUDA, or ``reducer`` cannot run on this checkpoint (``ReducerConfigError``).
    """
    path = Path(path)
    check_checkpoint(path)
    config = reducer.resolve(load_config(path)).config if reducer is not None else None
    overrides = {"config": config} if config is not None else {}
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if load_in_bits is None:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **overrides).to(device)
    else:
        if device.type != "cuda":
            raise ValueError(f"{load_in_bits}-bit loading needs a CUDA device (bitsandbytes), got {device}")
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            dtype=dtype,
            quantization_config=quantization_config(load_in_bits, dtype),
            device_map={"": device},
            **overrides,
        )
    processor = AutoProcessor.from_pretrained(path)
    if config is not None and config.anyres:  # per crop: a vision-side reducer's budget, or the grid's count
        processor = processor.with_reduced_crops(config.reduced_crop_tokens)
    elif config is not None:
        processor.num_image_tokens = config.num_image_tokens
    return model.eval(), processor
