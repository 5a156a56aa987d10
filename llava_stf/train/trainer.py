"""``LlavaStfTrainer``: transformers' ``Trainer`` with LLaVA's optimizer groups, sampler and data accounting.

Only documented extension points are overridden:

- ``create_optimizer``: parameter groups {decay, no decay} x {projector, rest}; the projector groups use
  ``projector_lr``. Projector parameters are the trainable ones under ``multi_modal_projector``, and an AnyRes
  model's ``image_newline`` (connector state, ``stages.part_of``) (the official
  LLaVA-STF release's always-true name filter in its ``LLaVATrainer.create_optimizer`` (visresearch/LLaVA-STF)
  gives *every* parameter the projector rate);
- ``_get_train_sampler``: a seeded shuffle, or LLaVA's ``group_by_modality_length`` order, both replayed exactly on
  resume (``set_epoch``);
- ``compute_loss``: takes the collator's ``data_events`` out of the batch before the forward pass, counts skipped
  and truncated samples, and stops the run (``BadSampleError``) on too much bad data; with an adaptive token reducer
  (PruMerge) it encodes the images first and fits each image's placeholders to its own token count
  (``llava_stf.data.placeholders``), then passes the features as ``mm_encoder_outputs``. The bad-data rule is
  ``llava_stf.data.dataset.too_many_bad``, judged from the first draw: the records the dataset dropped when it read
  the file count as well as the draws skipped since; the share of bad data must stay within
  ``max_bad_sample_fraction``, with a tolerance of three binomial standard deviations per count (1 bad record in 10
  is fine, a half-malformed file is not). Counts are per process; a process that stops ends the launch;
- ``log``: adds the running counts to every log line;
- ``save_model``: periodic checkpoints of a plain (non-DeepSpeed, non-PEFT) run keep the model's own key names.
  ``save_pretrained`` writes the llava-hf key layout by default, but the Trainer's resume reloads a checkpoint with a
  plain ``load_state_dict``, which matches none of those keys and only warns: training would silently continue from
  the freshly built weights (transformers 5.23). Final saves keep the default layout.

Checkpoints are marked complete, and ``save_total_limit`` is kept, by the ``CompleteCheckpoints`` callback
(``llava_stf.train.checkpoint``); the Trainer's own rotation is turned off on the trainer's copy of the arguments.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import Counter
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from llava_stf.data.dataset import MAX_BAD_SAMPLE_FRACTION, BadSampleError, bad_share, too_many_bad
from llava_stf.data.placeholders import fit_image_placeholders
from llava_stf.data.sampler import ModalityLengthGroupedSampler, ShuffleSampler

from .checkpoint import CompleteCheckpoints
from .stages import part_of

logger = logging.getLogger(__name__)


class LlavaStfTrainer(Trainer):
    """``Trainer`` for the stage table (see the module docstring).

    Args:
        model: the model to train.
        args: the training arguments; the trainer works on a copy (``save_total_limit`` moves to its callback).
        projector_lr: learning rate of the projector parameters (``None``: ``args.learning_rate``).
        group_by_modality_length: use LLaVA's modality- and length-grouped order.
        max_bad_sample_fraction: the most bad data the run takes (``too_many_bad``).
        callbacks: extra ``TrainerCallback``s (after ``CompleteCheckpoints``).
        **kwargs: other ``transformers.Trainer`` arguments; a ``train_dataset`` with ``num_records`` and
            ``dropped_records`` (``LazySupervisedDataset``) has its load-time drops counted.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: TrainingArguments | None = None,
        *,
        projector_lr: float | None = None,
        group_by_modality_length: bool = False,
        max_bad_sample_fraction: float = MAX_BAD_SAMPLE_FRACTION,
        callbacks: list[TrainerCallback] | None = None,
        **kwargs,
    ):
        self.checkpoints = CompleteCheckpoints(keep=args.save_total_limit if args is not None else None)
        if args is not None:
            args = copy.copy(args)  # the caller's arguments keep their save_total_limit
            args.save_total_limit = None  # kept by self.checkpoints, which counts complete checkpoints only
        super().__init__(model=model, args=args, callbacks=[self.checkpoints, *(callbacks or [])], **kwargs)
        self.projector_lr = projector_lr
        self.group_by_modality_length = group_by_modality_length
        self.max_bad_sample_fraction = max_bad_sample_fraction
        # "records" and "dropped[/<reason>]" (the data file, at load time); "samples" (drawn), "skipped[/<reason>]"
        # and "truncated" (this process's draws)
        self.data_counts: Counter = Counter()
        dropped = Counter(getattr(self.train_dataset, "dropped_records", None) or {})
        if getattr(self.train_dataset, "num_records", None):
            self.data_counts["records"] = self.train_dataset.num_records
        if dropped:
            self.data_counts["dropped"] = sum(dropped.values())
            self.data_counts.update({f"dropped/{reason}": n for reason, n in dropped.items()})

    # ------------------------------------------------------------------------------------------------ optimizer
    def optimizer_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """The parameter groups ``create_optimizer`` builds (empty groups left out)."""
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups.setdefault((part_of(name) == "projector", name in decay), []).append(param)
        out = []
        for (is_projector, has_decay), params in sorted(groups.items()):
            group: dict[str, Any] = {"params": params, "weight_decay": self.args.weight_decay if has_decay else 0.0}
            if is_projector and self.projector_lr is not None:
                group["lr"] = self.projector_lr
            out.append(group)
        return out

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(self.optimizer_groups(opt_model), **optimizer_kwargs)
        return self.optimizer

    # -------------------------------------------------------------------------------------------------- sampler
    def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_by_modality_length:
            world = self.args.world_size * self.args.gradient_accumulation_steps
            batch = self.args.train_batch_size
            return ModalityLengthGroupedSampler(dataset.modality_lengths, batch, world, self.args.seed)
        return ShuffleSampler(len(dataset), self.args.seed)

    # ----------------------------------------------------------------------------------------- data accounting
    def count_data_events(self, events: dict[str, Any] | None, batch_size: int) -> None:
        """Add one batch's ``data_events``; raise ``BadSampleError`` on too much bad data (``too_many_bad``)."""
        if not events:
            return
        skipped = events.get("skipped", [])
        counts = self.data_counts
        counts["samples"] += batch_size + len(skipped)
        counts["truncated"] += int(events.get("truncated", 0))
        counts["skipped"] += len(skipped)
        counts.update(f"skipped/{reason}" for reason in skipped)
        limit = self.max_bad_sample_fraction
        records, dropped, drawn, bad = counts["records"], counts["dropped"], counts["samples"], counts["skipped"]
        if too_many_bad(limit, records, dropped, drawn, bad):
            reasons = {k: v for k, v in counts.items() if k.startswith(("dropped/", "skipped/"))}
            share = bad_share(records, dropped, drawn, bad)
            at_load = f"{dropped} of {records} records dropped when the data was read, " if dropped else ""
            raise BadSampleError(
                f"too much bad data: {at_load}{bad} of {drawn} samples drawn skipped ({reasons}): about {share:.1%} > "
                f"max_bad_sample_fraction={limit}; fix the data (python -m llava_stf.data.validate) or raise the limit"
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        events = inputs.pop("data_events", None)
        self.count_data_events(events, int(inputs["input_ids"].shape[0]))
        if inputs.get("pixel_values") is not None and getattr(model.config, "adaptive_image_tokens", False):
            inputs = self.encode_images_first(model, inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def encode_images_first(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run ``get_image_features`` and write each image's own count of placeholders (adaptive reducers).

        The collator wrote ``num_image_tokens`` placeholders per image, the most one image can get; the surplus is
        removed (labels there are ignored) and the features go to the forward pass as ``mm_encoder_outputs``.
        """
        llava = self.accelerator.unwrap_model(model)
        llava = llava.get_base_model() if hasattr(llava, "get_base_model") else llava  # PEFT
        image_inputs = {"pixel_values": inputs.pop("pixel_values")}
        if "image_sizes" in inputs:  # AnyRes
            image_inputs["image_sizes"] = inputs.pop("image_sizes")
        features = llava.get_image_features(**image_inputs)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        inputs = fit_image_placeholders(
            inputs,
            [len(tokens) for tokens in features.pooler_output],
            image_token_id=llava.config.image_token_id,
            slots=llava.config.num_image_tokens,
            pad_token_id=0 if pad_id is None else pad_id,
        )
        inputs["mm_encoder_outputs"] = {"image": features}
        return inputs

    # --------------------------------------------------------------------------------------------------- saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        plain = isinstance(self.model, PreTrainedModel) and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        if not (_internal_call and plain):
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            self.model.save_pretrained(output_dir, save_original_format=False)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.data_counts:
            logs = {**logs, **{f"data/{k}": float(v) for k, v in sorted(self.data_counts.items())}}
        super().log(logs, start_time)


__all__ = ["LlavaStfTrainer"]
