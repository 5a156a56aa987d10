"""A run's output folder: what a new, resumed or overwriting run may do with it, and the crash-safe final save.

``check_output_dir`` reads the folder and decides (changing nothing, so it runs before the inputs are checked);
``prepare_output_dir`` carries the decision out once the run's config and data are checked and its model is built,
so a mistake in the new run never costs the old one:

- a new run refuses a folder that already holds a run (``checkpoint-*``, ``run_config.yaml`` or ``config.json``)
  unless ``--overwrite_output_dir``, which removes the previous run's outputs (``RUN_OUTPUTS``; ``config.json``
  first, so the folder stops loading as a model at once) before the new run writes its ``run_config.yaml``; other
  files in the folder are kept;
- ``--resume`` continues from the newest *complete* ``checkpoint-*`` (``checkpoint_complete.json``, see
  ``llava_stf.train.checkpoint``): incomplete ones, left by a run killed while writing them, are named in the log
  and skipped, and the checkpoints newer than the one resumed from are removed (the resumed run writes them again).
  It refuses a folder without a complete checkpoint, and settings that differ from the saved ``run_config.yaml`` in
  anything but logging, resume and cache settings (``RESUMABLE``);
- the final outputs are written into ``output_dir/.saving`` and moved into place by ``publish``, ``config.json``
  last, so a run killed while saving leaves nothing that loads half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml

from llava_stf.errors import UserError

from .arguments import RunConfig
from .checkpoint import COMPLETE_MARKER, Checkpoint, list_checkpoints, remove_checkpoint

logger = logging.getLogger("llava_stf.train")

RUN_CONFIG = "run_config.yaml"
STAGING = ".saving"  # the final outputs are written here, then moved into the output folder
# What a run writes into its output folder, so what --overwrite_output_dir removes, in this order: the first entry
# makes the folder stop loading as a model. save_pretrained's model, processor and tokenizer files, the PEFT adapter,
# the Trainer's arguments and checkpoints, the run's config and an interrupted final save.
RUN_OUTPUTS = (
    "config.json",
    RUN_CONFIG,
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.*",
    "adapter",
    "checkpoint-*",
    STAGING,
)
# Settings that may change between a run and its resumption (everything else must be identical).
RESUMABLE = {
    "data": {"image_cache_mb", "vision_feature_cache_mb"},  # memory for speed; the same training either way
    "stage": {"resume", "overwrite_output_dir"},
    "training": {"resume_from_checkpoint", "report_to", "logging_steps", "logging_strategy", "disable_tqdm",
                 "run_name", "dataloader_num_workers", "save_total_limit", "local_rank", "log_level"},
}  # fmt: skip


@dataclass(frozen=True)
class OutputPlan:
    """What ``check_output_dir`` decided; ``prepare_output_dir`` carries it out."""

    resume_from: str | None = None  # the checkpoint to resume from
    remove: tuple[Path, ...] = ()  # removed before the run writes anything, in this order
    why: str = ""  # said in the log line of each removal


def run_outputs(folder: str | Path) -> list[Path]:
    """The entries of ``folder`` that a run writes (``RUN_OUTPUTS``), in that order."""
    folder = Path(folder)
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    found: list[Path] = []
    for pattern in RUN_OUTPUTS:
        found += [e for e in entries if fnmatch(e.name, pattern) and e not in found]
    return found


def check_output_dir(config: RunConfig) -> OutputPlan:
    """Apply the output-folder rules (see the module docstring) without changing anything.

    Raises:
        FileExistsError: the folder holds a run and neither ``--resume`` nor ``--overwrite_output_dir`` was given.
        FileNotFoundError: ``--resume`` without a complete checkpoint.
        UserError: an explicit ``resume_from_checkpoint`` that is incomplete.
        ValueError: ``--resume`` with settings that differ from the saved ``run_config.yaml``.
    """
    out = Path(config.training.output_dir)
    checkpoints = list_checkpoints(out)
    if config.stage.resume or config.training.resume_from_checkpoint:
        return _resume_plan(config, out, checkpoints)
    held = [name for name in (RUN_CONFIG, "config.json") if (out / name).is_file()]
    held += [checkpoints[-1].path.name] if checkpoints else []
    if not held:
        return OutputPlan()
    if not config.stage.overwrite_output_dir:
        raise FileExistsError(
            f"{str(out)!r} already holds a run ({', '.join(held)}); pass --resume to continue it, "
            "--overwrite_output_dir to start over, or choose another output_dir"
        )
    return OutputPlan(None, tuple(run_outputs(out)), "--overwrite_output_dir: the previous run's output")


def _resume_plan(config: RunConfig, out: Path, checkpoints: list[Checkpoint]) -> OutputPlan:
    incomplete = [c.path.name for c in checkpoints if not c.complete]
    explicit = config.training.resume_from_checkpoint
    if explicit:
        chosen = Path(explicit)
        if not chosen.is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint {explicit!r} is not a folder")
        if not (chosen / COMPLETE_MARKER).is_file():
            raise UserError(
                f"checkpoint {explicit!r} is incomplete (no {COMPLETE_MARKER}: the run stopped while writing it); "
                "resume from an earlier one, or create that file if you know every file is in it"
            )
    else:
        complete = [c.path for c in checkpoints if c.complete]
        if not complete:
            left = f" (incomplete, left by a run stopped while writing them: {incomplete})" if incomplete else ""
            raise FileNotFoundError(f"--resume: no complete checkpoint-* folder in {str(out)!r}{left}")
        chosen = complete[-1]
    saved = out / RUN_CONFIG
    if saved.is_file():
        diff = config_differences(yaml.safe_load(saved.read_text()), config.to_dict())
        if diff:
            raise ValueError(f"--resume with settings that differ from the saved {RUN_CONFIG}: {diff}")
    if incomplete:
        logger.warning("--resume: skipping incomplete %s (the run stopped while writing it)", ", ".join(incomplete))
    step = next((c.step for c in checkpoints if c.path.resolve() == chosen.resolve()), None)
    newer = tuple(c.path for c in checkpoints if step is not None and c.step > step)
    logger.info("resuming from %s", chosen)
    return OutputPlan(str(chosen), newer, f"newer than {chosen.name}: the resumed run writes it again")


def prepare_output_dir(plan: OutputPlan, config: RunConfig) -> None:
    """Carry out ``plan``, remove an interrupted final save, and write the run's ``run_config.yaml``.

    Only the process that saves calls this.
    """
    out = Path(config.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in plan.remove:
        logger.warning("removing %s (%s)", path, plan.why)
        _remove(path)
    if (out / STAGING).exists():
        logger.warning("removing %s (an interrupted final save)", out / STAGING)
        _remove(out / STAGING)
    (out / RUN_CONFIG).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        remove_checkpoint(path)  # its marker first, if it has one
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(staging: Path, out: Path) -> None:
    """Move the staged final outputs into ``out``; its ``config.json`` goes first and the new one comes last."""
    (out / "config.json").unlink(missing_ok=True)
    for entry in sorted(staging.iterdir(), key=lambda e: e.name == "config.json"):
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # e.g. the adapter/ of a run resumed after it had finished
        os.replace(entry, target)
    staging.rmdir()


def config_differences(saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{group.key: (saved, current)}`` for settings that must not change on resume."""
    diff = {}
    for group, values in current.items():
        for key, value in values.items():
            if key in RESUMABLE.get(group, set()):
                continue
            before = saved.get(group, {}).get(key)
            if json.dumps(before, sort_keys=True, default=str) != json.dumps(value, sort_keys=True, default=str):
                diff[f"{group}.{key}"] = (before, value)
    return diff


__all__ = [
    "RESUMABLE",
    "RUN_CONFIG",
    "RUN_OUTPUTS",
    "STAGING",
    "OutputPlan",
    "check_output_dir",
    "config_differences",
    "prepare_output_dir",
    "publish",
    "run_outputs",
]
