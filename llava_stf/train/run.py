"""One training stage: ``python -m llava_stf.train.run --config configs/train/finetune.yaml [--flag value ...]``.

The recipe reads top to bottom: parse the config (YAML -> dataclasses -> CLI overrides), check the output folder
(reading only), read and check the data (every record, the image folder, the share of bad records), build the model
from the two tower checkpoints (plus the stage-1 projector), so that a data mistake costs seconds rather than a 7B
load, apply the stage (freezing, LoRA), prepare the output folder, train, and save what the stage saves. The output
folder rules (refusal, ``--overwrite_output_dir``, ``--resume`` from the newest complete checkpoint, the crash-safe
final save) are in ``llava_stf.train.output_dir``; nothing there is removed before the new run's config and data are
checked and its model is built. Launch it with ``deepspeed``, ``torchrun`` or ``accelerate launch`` for several
processes (``scripts/*.sh`` do); plain ``python`` runs one process.

Errors: ordinary bad input (a malformed or empty data file, a missing image folder, too much bad data, a bad setting)
ends the run with one ``error: ...`` line and exit status 1 (``llava_stf.errors.run_main``); ``LLAVA_STF_DEBUG=1``
shows the traceback instead (``--debug`` is ``TrainingArguments``'s own flag). Under a launcher, a process that fails
exits at once, without the barrier and teardown that would wait for the other processes; the launcher then stops
them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path

import torch
from transformers import PrinterCallback, ProgressCallback, TrainerCallback, set_seed
from transformers.modeling_utils import set_zero3_state

from llava_stf.data.collator import DataCollator
from llava_stf.data.conversation import Template, get_template
from llava_stf.data.dataset import (
    BadSampleError,
    CheckedRecords,
    LazySupervisedDataset,
    check_records,
    load_records,
    too_many_bad,
)
from llava_stf.data.images import ImageLimits
from llava_stf.errors import UserError, run_main
from llava_stf.model import LlavaStfForConditionalGeneration, LlavaStfProcessor, generation_class
from llava_stf.model.builder import build_model

from .arguments import RunConfig, parse_config
from .checkpoint import PROJECTOR_FILE, load_projector, merge_lora_state_dict, save_adapter_extras, save_projector
from .feature_cache import check_cache_settings, install_feature_cache
from .output_dir import RUN_CONFIG, STAGING, check_output_dir, config_differences, prepare_output_dir, publish
from .stages import PROJECTOR_ATTR, Stage, apply_stage, connector_extras, get_stage, wrap_lora
from .trainer import LlavaStfTrainer

logger = logging.getLogger("llava_stf.train")


def load_dtype(config: RunConfig) -> torch.dtype:
    """DeepSpeed trains in the half precision it is given, so load in it; otherwise fp32 (+ autocast)."""
    if config.training.deepspeed and config.training.bf16:
        return torch.bfloat16
    if config.training.deepspeed and config.training.fp16:
        return torch.float16
    return torch.float32


def build(config: RunConfig, stage: Stage) -> tuple[LlavaStfForConditionalGeneration, LlavaStfProcessor]:
    """Model and processor for ``stage``: fresh projector, or the stage-1 one; stage settings on the processor.

    ``image_grid_pinpoints`` set: an AnyRes (LLaVA-NeXT) model, whose images are always ``anyres`` (the stage's
    LLaVA-1.5 image mode does not apply) and whose stage-1 file also holds ``image_newline``.
    """
    m, d = config.model, config.data
    anyres = m.image_grid_pinpoints is not None
    model, processor = build_model(
        m.vision_tower,
        m.llm,
        projector_type=m.projector_type,
        projector_kwargs=m.projector_kwargs,
        vision_feature_layer=m.vision_feature_layer,
        reducer_type=m.reducer_type,
        reducer_kwargs=m.reducer_kwargs,
        reducer_tokens=m.reducer_tokens,
        image_aspect_ratio=d.image_aspect_ratio or ("anyres" if anyres else stage.image_aspect_ratio),
        dtype=load_dtype(config),
        attn_implementation=m.attn_implementation,
        model_max_length=d.model_max_length,
        image_grid_pinpoints=m.image_grid_pinpoints,
    )
    processor.conversation_template = get_template(d.template or stage.template).name
    if m.pretrained_projector:
        load_projector(model, m.pretrained_projector, m.projector_source)
    return model, processor


def check_deepspeed_optimizer(config: RunConfig) -> None:
    """A DeepSpeed ``optimizer`` block replaces the Trainer's parameter groups: refuse a projector_lr it would drop."""
    ds = config.training.deepspeed
    if not ds or config.stage.projector_lr is None:
        return
    block = ds if isinstance(ds, dict) else json.loads(Path(ds).read_text())
    if "optimizer" in block:
        raise ValueError(
            f"projector_lr={config.stage.projector_lr} needs the Trainer's optimizer groups, but the DeepSpeed config "
            f"{ds!r} defines its own optimizer (one group): drop projector_lr or the optimizer block"
        )


def save_outputs(trainer: LlavaStfTrainer, stage: Stage, processor: LlavaStfProcessor, config: RunConfig) -> None:
    """Write what ``stage`` saves into ``output_dir`` (every rank calls this; one writes).

    Everything is written into ``output_dir/.saving`` first and then moved into place, ``config.json`` last.
    """
    out = Path(config.training.output_dir)
    staging = out / STAGING
    main = trainer.args.should_save
    if main:
        staging.mkdir(parents=True, exist_ok=True)
    base = trainer.model.get_base_model() if stage.lora else trainer.model
    base.config.use_cache = True  # the Trainer turned it off for training; generation wants it back
    if stage.saves == "projector":
        newline = connector_extras(base)  # AnyRes: image_newline is saved with the projector
        save_projector(
            getattr(base.model, PROJECTOR_ATTR),
            staging / PROJECTOR_FILE,
            base.config.projector_type,
            main,
            image_newline=newline[0] if newline else None,
        )
        if main:
            base.config.save_pretrained(staging)
    elif stage.saves == "model":
        trainer.save_model(str(staging))
    else:
        trainer.save_model(str(staging / "adapter"))
        save_adapter_extras(base, staging / "adapter", main)  # AnyRes: image_newline, which PEFT does not save
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # gathers under ZeRO-3
        if main:
            merged = merge_lora_state_dict(state, config.stage.lora_alpha / config.stage.lora_r)
            with torch.device("meta"), set_zero3_state():  # one rank builds it: no ZeRO-3 partitioning here
                plain = generation_class(base.config)(base.config)
            plain.load_state_dict(merged, strict=True, assign=True)
            plain.generation_config = base.generation_config
            plain.save_pretrained(staging)
    _barrier()  # every rank's files (DeepSpeed shards) are in the staging folder
    if main:
        processor.save_pretrained(staging)
        publish(staging, out)
        logger.info("stage %s saved to %s", stage.name, out)


def read_data(config: RunConfig, template: Template) -> CheckedRecords:
    """Read and check the data file before any model is loaded (``check_records``, then the load-time bad share).

    Raises:
        BadSampleError: more records dropped than ``max_bad_sample_fraction`` takes (``too_many_bad``).
        UserError, FileNotFoundError, ValueError: a data file or image folder that cannot be used.
    """
    d = config.data
    checked = check_records(load_records(d.data_path), template, d.image_folder, d.on_bad_sample)
    dropped = sum(checked.dropped.values())
    if too_many_bad(d.max_bad_sample_fraction, checked.num_records, dropped):
        example = next(iter(checked.examples.values()))[0]
        raise BadSampleError(
            f"{dropped} of {checked.num_records} records of {d.data_path!r} are unusable ({dict(checked.dropped)}; "
            f"e.g. {example}) > max_bad_sample_fraction={d.max_bad_sample_fraction}; fix the data "
            "(python -m llava_stf.data.validate) or raise the limit"
        )
    logger.info("data: %d usable records of %d in %s", len(checked.samples), checked.num_records, d.data_path)
    return checked


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


class _BarOnly(ProgressCallback):
    """transformers' progress bar without the log dicts it writes under it."""

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        return None


def run(config: RunConfig, callbacks: list[TrainerCallback] | None = None, quiet: bool = False) -> LlavaStfTrainer:
    """Train one stage as configured (with extra ``TrainerCallback``s); return the trainer, after saving.

    ``quiet``: print no log dicts on the terminal (a caller that reports the run itself, like the demo); the
    progress bar stays if ``disable_tqdm`` allows it, and ``trainer.state.log_history`` keeps every log.
    """
    stage = get_stage(config.stage.stage)
    args, d = config.training, config.data
    args.remove_unused_columns = False  # the collator's keys are not all forward() arguments
    check_deepspeed_optimizer(config)
    check_cache_settings(config.data.image_cache_mb, config.data.vision_feature_cache_mb)
    plan = check_output_dir(config)
    template = get_template(d.template or stage.template)
    records = read_data(config, template)  # before the towers load: a data mistake costs seconds
    set_seed(args.seed)  # the fresh projector must be the same on every rank
    model, processor = build(config, stage)
    apply_stage(model, stage)
    tower_cache = install_feature_cache(model, d.vision_feature_cache_mb)  # the tower is frozen from here on
    if stage.lora:
        model = wrap_lora(model, stage, config.stage.lora_r, config.stage.lora_alpha, config.stage.lora_dropout)
    dataset = LazySupervisedDataset(
        records,
        processor,
        template,
        image_folder=d.image_folder,
        max_length=d.model_max_length,
        on_bad_sample=d.on_bad_sample,
        image_limits=ImageLimits(d.max_image_pixels, d.max_aspect_ratio, d.max_image_bytes),
        image_cache_mb=d.image_cache_mb,
    )
    _barrier()  # every rank has checked the folder before one changes it
    if args.should_save:
        prepare_output_dir(plan, config)
    _barrier()
    trainer = LlavaStfTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollator.from_processor(processor),
        processing_class=processor,
        projector_lr=config.stage.projector_lr,
        group_by_modality_length=d.group_by_modality_length,
        max_bad_sample_fraction=d.max_bad_sample_fraction,
        callbacks=callbacks,
    )
    if quiet:
        trainer.remove_callback(PrinterCallback)
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(_BarOnly)
    try:
        trainer.train(resume_from_checkpoint=plan.resume_from)
    finally:
        if tower_cache is not None:
            tower_cache.remove()
            logger.info("vision feature cache: %d images answered from it, %d computed (%.0f MiB held)",
                        tower_cache.hits, tower_cache.misses, tower_cache.memo.used / 2**20)  # fmt: skip
    if any(trainer.data_counts[k] for k in ("dropped", "skipped", "truncated")):
        logger.warning("data: %s", dict(trainer.data_counts))
    save_outputs(trainer, stage, processor, config)
    return trainer


def _train(argv: list[str] | None) -> None:
    try:
        run(parse_config(argv))
    except UserError as error:
        # A DataLoader worker's error comes back with the worker's traceback as its text: keep its last line.
        text = str(error)
        if "\nOriginal Traceback" in text:
            last = text.strip().splitlines()[-1]
            raise type(error)(last.split(": ", 1)[-1]) from error
        raise


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
    )
    try:
        status = run_main(lambda: _train(argv))
    except Exception:
        if not _distributed():
            raise
        traceback.print_exc()  # a bug: its traceback, then out without waiting for the other processes
        status = 1
    if _distributed():
        if status == 0:
            # Every output is written and every rank is here. Leave without the interpreter's teardown: on CPU
            # (gloo + DeepSpeed's comm ops) a rank sometimes aborts while destroying native threads at exit
            # ("terminate called without an active exception"), which turns a finished run into a failed launch.
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        # After an error the other ranks may be waiting in a collective: no barrier, no teardown; the launcher
        # stops them when this process exits.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = [
    "RUN_CONFIG",  # re-exported from output_dir, like check_output_dir and config_differences
    "build",
    "check_output_dir",
    "config_differences",
    "main",
    "read_data",
    "run",
    "save_outputs",
]
