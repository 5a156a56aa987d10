"""Run configuration: YAML files -> typed dataclasses, command-line flags last.

``python -m llava_stf.train.run --config A.yaml [--config B.yaml ...] [--flag value ...]``: the YAML files are flat
mappings of field names, merged left to right; any field can then be overridden on the command line (``--lr`` style
names are the dataclass fields below and every ``transformers.TrainingArguments`` field). A key that is not a
field is an error that suggests the nearest names. ``preset`` fills the model fields from ``configs/model`` (hub ids
of the towers and the projector settings) unless they are set explicitly.

``--config``, ``preset`` and ``deepspeed`` take a file path or the name of a config shipped in the package
(``--config finetune``, ``--preset llava-stf-7b``, ``--deepspeed zero2``; see :mod:`llava_stf.configs`), so the
shipped recipes run from any working directory and from a non-editable install.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from llava_stf import configs
from llava_stf.data.dataset import MAX_BAD_SAMPLE_FRACTION
from llava_stf.data.images import ImageLimits
from llava_stf.errors import UserError
from llava_stf.model import presets

from .stages import STAGES


@dataclass
class ModelArguments:
    """What model to build and where its weights come from."""

    preset: str | None = field(default=None, metadata={"help": "configs/model preset name or YAML path"})
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP checkpoint (hub id or folder)"})
    llm: str | None = field(default=None, metadata={"help": "causal LM checkpoint with its tokenizer"})
    projector_type: str | None = field(default=None, metadata={"help": "PROJECTORS name (default mbtf_stf)"})
    projector_kwargs: dict | str | None = field(default=None, metadata={"help": "projector settings (JSON on CLI)"})
    vision_feature_layer: list[int] | None = field(default=None, metadata={"help": "vision hidden-state indices"})
    reducer_type: str | None = field(default=None, metadata={"help": "REDUCERS name (llava_stf.model.REDUCERS)"})
    reducer_kwargs: dict | str | None = field(default=None, metadata={"help": "reducer settings (JSON on CLI)"})
    reducer_tokens: int | None = field(
        default=None, metadata={"help": "token budget: the reducer's settings for N image tokens (not with kwargs)"}
    )
    pretrained_projector: str | None = field(
        default=None, metadata={"help": "stage-1 output folder, projector .safetensors, or LLaVA mm_projector.bin"}
    )
    projector_source: str | None = field(
        default=None, metadata={"help": "layout of a .bin projector: llava | llava-stf-official (default: guess)"}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, flash_attention_2"})
    image_grid_pinpoints: list | str | None = field(
        default=None,
        metadata={"help": "AnyRes (LLaVA-NeXT) tilings [[height, width], ...] (JSON on CLI); unset: LLaVA-1.5"},
    )


@dataclass
class DataArguments:
    """Where the data is and how it is turned into samples."""

    data_path: str | None = field(default=None, metadata={"help": "LLaVA JSON list (or .jsonl)"})
    image_folder: str | None = field(default=None, metadata={"help": "root of the records' image paths"})
    template: str | None = field(default=None, metadata={"help": "conversation template (default: the stage's)"})
    image_aspect_ratio: str | None = field(
        default=None, metadata={"help": "pad | square (default: the stage's; anyres for an AnyRes model)"}
    )
    model_max_length: int = field(default=2048, metadata={"help": "tokens per sample, image tokens included"})
    group_by_modality_length: bool = field(default=False, metadata={"help": "LLaVA's modality-grouped order"})
    on_bad_sample: str = field(default="skip", metadata={"help": "skip (count + log) | error"})
    max_bad_sample_fraction: float = field(
        default=MAX_BAD_SAMPLE_FRACTION, metadata={"help": "stop above this share of bad data (dropped + skipped)"}
    )
    max_image_pixels: int = field(default=ImageLimits.max_pixels, metadata={"help": "larger images are skipped"})
    max_aspect_ratio: float = field(
        default=ImageLimits.max_aspect_ratio, metadata={"help": "more elongated images are skipped"}
    )
    max_image_bytes: int = field(default=ImageLimits.max_bytes, metadata={"help": "larger image files are skipped"})
    image_cache_mb: float = field(
        default=0, metadata={"help": "MiB of processed images kept in memory across epochs (0: none)"}
    )
    vision_feature_cache_mb: float = field(
        default=0, metadata={"help": "MiB of frozen-tower outputs kept per image across epochs (0: none)"}
    )


@dataclass
class StageArguments:
    """Which stage runs, its recipe-level knobs, and how the output folder is treated."""

    stage: str = field(default="finetune", metadata={"help": f"one of {sorted(STAGES)}"})
    projector_lr: float | None = field(default=None, metadata={"help": "projector learning rate (default: lr)"})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in output_dir"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start over in a folder holding a run"})


@dataclass
class RunConfig:
    """The four argument groups of one run."""

    model: ModelArguments
    data: DataArguments
    stage: StageArguments
    training: TrainingArguments

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """A YAML-able record of the resolved configuration."""
        return {
            "model": asdict(self.model),
            "data": asdict(self.data),
            "stage": asdict(self.stage),
            "training": json.loads(self.training.to_json_string()),
        }


GROUPS = (ModelArguments, DataArguments, StageArguments, TrainingArguments)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A flat YAML mapping (``{}`` for an empty file)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a training config is a flat mapping of field names, got {type(data).__name__}")
    return data


def apply_preset(model: ModelArguments) -> None:
    """Fill unset model fields from ``model.preset`` (towers' hub ids, projector settings)."""
    if model.preset is None:
        return
    try:
        path = presets.preset_path(model.preset)
    except FileNotFoundError:
        raise ValueError(f"unknown model preset {model.preset!r}; valid presets: {presets.list_presets()}") from None
    spec = yaml.safe_load(path.read_text())
    values = {
        "vision_tower": presets.VISION_TOWERS[spec["vision"]]["hub_id"],
        "llm": presets.LLMS[spec["llm"]]["hub_id"],
        "projector_type": spec.get("projector_type"),
        "projector_kwargs": spec.get("projector_kwargs"),
        "vision_feature_layer": spec.get("vision_feature_layer"),
        "image_grid_pinpoints": spec.get("image_grid_pinpoints"),  # AnyRes presets (llava-v1.6-*, *-next-*)
    }
    for name, value in values.items():
        if getattr(model, name) is None:
            setattr(model, name, value)


def resolve_deepspeed(value: Any) -> Any:
    """A DeepSpeed json path or shipped name (``zero2``) -> a path; anything else (``""`` = off, a dict) as it is."""
    if not isinstance(value, str) or not value:
        return value
    try:
        return str(configs.resolve("deepspeed", value))
    except FileNotFoundError:
        return value  # transformers also takes base64-encoded JSON, and otherwise says what it expects


def _finish(model: ModelArguments, data: DataArguments, stage: StageArguments) -> None:
    apply_preset(model)
    for name in ("projector_kwargs", "reducer_kwargs"):
        value = getattr(model, name)
        if isinstance(value, str):
            try:
                setattr(model, name, json.loads(value))
            except ValueError as err:
                raise UserError(f"{name} must be a JSON object, got {value!r} ({err})") from None
    if isinstance(model.image_grid_pinpoints, str):
        try:
            model.image_grid_pinpoints = json.loads(model.image_grid_pinpoints)
        except ValueError as err:
            raise UserError(f"image_grid_pinpoints must be JSON, got {model.image_grid_pinpoints!r} ({err})") from None
    pinpoints = model.image_grid_pinpoints
    if pinpoints is not None and not (
        isinstance(pinpoints, list)
        and pinpoints
        and all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) for v in p) for p in pinpoints)
    ):
        raise UserError(f"image_grid_pinpoints must be a non-empty list of [height, width] pairs, got {pinpoints!r}")
    if model.reducer_tokens is not None:
        if model.reducer_type is None:
            raise UserError(f"reducer_tokens={model.reducer_tokens} needs a reducer_type (the method it budgets)")
        if model.reducer_kwargs is not None:
            raise UserError(
                f"reducer_tokens={model.reducer_tokens} chooses the reducer's settings itself; give reducer_tokens "
                f"or reducer_kwargs ({model.reducer_kwargs}), not both"
            )
        if isinstance(model.reducer_tokens, bool) or model.reducer_tokens < 1:
            raise UserError(f"reducer_tokens must be a positive number of image tokens, got {model.reducer_tokens}")
    if isinstance(model.vision_feature_layer, list) and len(model.vision_feature_layer) == 1:
        model.vision_feature_layer = model.vision_feature_layer[0]
    model.projector_type = model.projector_type or "mbtf_stf"
    missing = [n for n, v in (("vision_tower", model.vision_tower), ("llm", model.llm), ("data_path", data.data_path))
               if v is None]  # fmt: skip
    if missing:
        raise ValueError(f"missing required settings: {missing} (set them in a --config YAML or on the command line)")
    if stage.stage not in STAGES:
        raise ValueError(f"unknown stage {stage.stage!r}; valid stages: {sorted(STAGES)}")
    if not 0.0 <= data.max_bad_sample_fraction <= 1.0:
        raise ValueError(f"max_bad_sample_fraction must be in [0, 1], got {data.max_bad_sample_fraction}")


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """``--config`` YAML files (merged in order), then command-line flags, into a ``RunConfig``."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", action="append", default=[])
    pre.add_argument("--deepspeed", default=None)  # resolved before TrainingArguments reads the file
    known, rest = pre.parse_known_args(argv)
    merged: dict[str, Any] = {}
    for path in known.config:
        merged.update(load_yaml(configs.resolve("train", path)))
    if known.deepspeed is not None:
        merged["deepspeed"] = known.deepspeed
    if "deepspeed" in merged:
        merged["deepspeed"] = resolve_deepspeed(merged["deepspeed"])
    parser = HfArgumentParser(GROUPS)
    valid = {f.name for group in GROUPS for f in dataclasses.fields(group) if f.init}
    unknown = sorted(set(merged) - valid)
    if unknown:
        hints = {k: difflib.get_close_matches(k, valid, n=3) for k in unknown}
        raise ValueError(f"unknown config keys {unknown} in {known.config}; nearest valid names: {hints}")
    parser.set_defaults(**merged)
    model, data, stage, training = parser.parse_args_into_dataclasses(rest, look_for_args_file=False)
    _finish(model, data, stage)
    return RunConfig(model, data, stage, training)


__all__ = [
    "DataArguments",
    "GROUPS",
    "ModelArguments",
    "RunConfig",
    "StageArguments",
    "apply_preset",
    "load_yaml",
    "parse_config",
    "resolve_deepspeed",
]
