"""One training stage: ``python -m llava_stf.train.run --config configs/train/finetune.yaml [--flag value ...]``.

The recipe reads top to bottom: parse the config (YAML -> dataclasses -> CLI overrides), check the output folder,
build the model from the two tower checkpoints (plus the stage-1 projector), apply the stage (freezing, LoRA),
build the data, train, and save what the stage saves. Launch it with ``deepspeed``, ``torchrun`` or
``accelerate launch`` for several processes (``scripts/*.sh`` do); plain ``python`` runs one process.

Output folder rules: a new run refuses a folder that already holds a run (``checkpoint-*`` or ``run_config.yaml``)
unless ``--overwrite_output_dir``; ``--resume`` continues from the newest ``checkpoint-*`` and refuses a folder
without one, or one whose saved ``run_config.yaml`` differs in anything but logging and resume settings.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainerCallback, set_seed
from transformers.modeling_utils import set_zero3_state
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from llava_stf.data.collator import DataCollator
from llava_stf.data.conversation import get_template
from llava_stf.data.dataset import LazySupervisedDataset, load_records
from llava_stf.data.images import ImageLimits
from llava_stf.model import LlavaStfForConditionalGeneration, LlavaStfProcessor
from llava_stf.model.builder import build_model

from .arguments import RunConfig, parse_config
from .checkpoint import PROJECTOR_FILE, load_projector, merge_lora_state_dict, save_projector
from .stages import PROJECTOR_ATTR, Stage, apply_stage, get_stage, wrap_lora
from .trainer import LlavaStfTrainer

logger = logging.getLogger("llava_stf.train")

RUN_CONFIG = "run_config.yaml"
# Settings that may change between a run and its resumption (everything else must be identical).
RESUMABLE = {
    "stage": {"resume", "overwrite_output_dir"},
    "training": {"resume_from_checkpoint", "report_to", "logging_steps", "logging_strategy", "disable_tqdm",
                 "run_name", "dataloader_num_workers", "save_total_limit", "local_rank", "log_level"},
}  # fmt: skip


def check_output_dir(config: RunConfig) -> str | None:
    """Apply the output-folder rules; return the checkpoint to resume from (or ``None``)."""
    out = Path(config.training.output_dir)
    explicit = config.training.resume_from_checkpoint
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if config.stage.resume or explicit:
        checkpoint = explicit or last
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint-* folder in {str(out)!r} to resume from")
        saved = out / RUN_CONFIG
        if saved.is_file():
            diff = config_differences(yaml.safe_load(saved.read_text()), config.to_dict())
            if diff:
                raise ValueError(f"--resume with settings that differ from the saved {RUN_CONFIG}: {diff}")
        logger.info("resuming from %s", checkpoint)
        return checkpoint
    if last is not None or (out / RUN_CONFIG).is_file():
        if not config.stage.overwrite_output_dir:
            raise FileExistsError(
                f"{str(out)!r} already holds a run ({last or RUN_CONFIG}); pass --resume to continue it, "
                "--overwrite_output_dir to start over, or choose another output_dir"
            )
        if config.training.should_save:  # stale checkpoints would otherwise be what a later --resume picks
            for old in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
                logger.warning("--overwrite_output_dir: removing %s", old)
                shutil.rmtree(old)
    return None


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


def load_dtype(config: RunConfig) -> torch.dtype:
    """DeepSpeed trains in the half precision it is given, so load in it; otherwise fp32 (+ autocast)."""
    if config.training.deepspeed and config.training.bf16:
        return torch.bfloat16
    if config.training.deepspeed and config.training.fp16:
        return torch.float16
    return torch.float32


def build(config: RunConfig, stage: Stage) -> tuple[LlavaStfForConditionalGeneration, LlavaStfProcessor]:
    """Model and processor for ``stage``: fresh projector, or the stage-1 one; stage settings on the processor."""
    m, d = config.model, config.data
    model, processor = build_model(
        m.vision_tower,
        m.llm,
        projector_type=m.projector_type,
        projector_kwargs=m.projector_kwargs,
        vision_feature_layer=m.vision_feature_layer,
        reducer_type=m.reducer_type,
        reducer_kwargs=m.reducer_kwargs,
        image_aspect_ratio=d.image_aspect_ratio or stage.image_aspect_ratio,
        dtype=load_dtype(config),
        attn_implementation=m.attn_implementation,
        model_max_length=d.model_max_length,
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
    """Write what ``stage`` saves into ``output_dir`` (every rank calls this; one writes)."""
    out = Path(config.training.output_dir)
    main = trainer.args.should_save
    base = trainer.model.get_base_model() if stage.lora else trainer.model
    base.config.use_cache = True  # the Trainer turned it off for training; generation wants it back
    if stage.saves == "projector":
        save_projector(getattr(base.model, PROJECTOR_ATTR), out / PROJECTOR_FILE, base.config.projector_type, main)
        if main:
            base.config.save_pretrained(out)
    elif stage.saves == "model":
        trainer.save_model(str(out))
    else:
        trainer.save_model(str(out / "adapter"))
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # gathers under ZeRO-3
        if main:
            merged = merge_lora_state_dict(state, config.stage.lora_alpha / config.stage.lora_r)
            with torch.device("meta"), set_zero3_state():  # one rank builds it: no ZeRO-3 partitioning here
                plain = LlavaStfForConditionalGeneration(base.config)
            plain.load_state_dict(merged, strict=True, assign=True)
            plain.generation_config = base.generation_config
            plain.save_pretrained(out)
    if main:
        processor.save_pretrained(out)
        logger.info("stage %s saved to %s", stage.name, out)


def run(config: RunConfig, callbacks: list[TrainerCallback] | None = None) -> LlavaStfTrainer:
    """Train one stage as configured (with extra ``TrainerCallback``s); return the trainer, after saving."""
    stage = get_stage(config.stage.stage)
    args = config.training
    args.remove_unused_columns = False  # the collator's keys are not all forward() arguments
    check_deepspeed_optimizer(config)
    checkpoint = check_output_dir(config)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank has checked the folder before one writes into it
    if args.should_save:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / RUN_CONFIG).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    set_seed(args.seed)  # the fresh projector must be the same on every rank
    model, processor = build(config, stage)
    apply_stage(model, stage)
    if stage.lora:
        model = wrap_lora(model, stage, config.stage.lora_r, config.stage.lora_alpha, config.stage.lora_dropout)
    d = config.data
    dataset = LazySupervisedDataset(
        load_records(d.data_path),
        processor,
        get_template(processor.conversation_template),
        image_folder=d.image_folder,
        max_length=d.model_max_length,
        on_bad_sample=d.on_bad_sample,
        image_limits=ImageLimits(d.max_image_pixels, d.max_aspect_ratio),
    )
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
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.data_counts["skipped"] or trainer.data_counts["truncated"]:
        logger.warning("data: %s", dict(trainer.data_counts))
    save_outputs(trainer, stage, processor, config)
    return trainer


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
    )
    run(parse_config(argv))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every output is written and every rank is here. Leave without the interpreter's teardown: on CPU (gloo +
        # DeepSpeed's comm ops) a rank sometimes aborts while destroying native threads at exit ("terminate called
        # without an active exception"), which turns a finished run into a failed launch.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = ["RUN_CONFIG", "build", "check_output_dir", "config_differences", "main", "run", "save_outputs"]
