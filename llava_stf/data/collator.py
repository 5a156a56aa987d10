"""Batching dataset items: right padding with an explicit attention mask, images stacked in text order.

Padding uses the tokenizer's pad id in ``input_ids``, ``IGNORE_INDEX`` in ``labels`` and 0 in ``attention_mask``
(LLaVA's ``DataCollatorForSupervisedDataset`` in ``llava/train/train.py`` derives the mask from
``input_ids != pad_id``, which also hides real ``<unk>`` tokens).
Items are already truncated by the dataset (image tokens counted), so nothing is cut here.

``always_run_vision``: a batch without images still runs the vision tower and projector on one dummy image (zeros
after normalisation, LLaVA's text-only image), whose placeholders are appended after the shortest row's last token
with ``attention_mask`` 0 and labels ``IGNORE_INDEX``. They change no loss or gradient value, but every trainable
parameter stays in every step's graph and every rank runs the same modules in the same order: DDP needs the first,
ZeRO-3's parameter gathering the second (LLaVA's ``LazySupervisedDataset`` feeds a zero image for the same reason).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .tokenization import IGNORE_INDEX

if TYPE_CHECKING:
    from llava_stf.model import LlavaStfProcessor


@dataclass
class DataCollator:
    """Pads ``LazySupervisedDataset`` items into a batch for ``LlavaStfForConditionalGeneration``."""

    pad_token_id: int  # id written into padding positions of input_ids
    image_token_id: int  # placeholder id (for the dummy image)
    num_image_tokens: int  # placeholders per image
    dummy_pixel_values: torch.Tensor | None = None  # [3, H, W]; set to always run the vision tower

    @classmethod
    def from_processor(cls, processor: LlavaStfProcessor, always_run_vision: bool = True) -> DataCollator:
        """Collator matching a ``LlavaStfProcessor`` (pad id, image token, image size)."""
        if processor.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before batching")
        dummy = None
        if always_run_vision:
            crop = processor.image_processor.crop_size
            dummy = torch.zeros(3, crop["height"], crop["width"])
        return cls(processor.tokenizer.pad_token_id, processor.image_token_id, processor.num_image_tokens, dummy)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Batch the items.

        Returns:
            ``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]``, ``labels`` ``[B, T]``, ``pixel_values``
            ``[n_images, 3, H, W]`` (absent when there is no image and no dummy), and ``data_events``
            (``{"skipped": [reason, ...], "truncated": n}``: for the trainer's counts, not for the model).
        """
        rows = [item["input_ids"] for item in items]
        lengths = [len(r) for r in rows]
        images = [item["pixel_values"] for item in items if item.get("pixel_values") is not None]
        dummy_row = None
        if not images and self.dummy_pixel_values is not None:
            dummy_row = min(range(len(rows)), key=lambda i: lengths[i])
            images = [self.dummy_pixel_values]
        width = max(lengths)
        if dummy_row is not None:
            width = max(width, lengths[dummy_row] + self.num_image_tokens)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, item in enumerate(items):
            n = lengths[i]
            input_ids[i, :n] = item["input_ids"]
            labels[i, :n] = item["labels"]
            attention_mask[i, :n] = 1
        if dummy_row is not None:
            start = lengths[dummy_row]
            input_ids[dummy_row, start : start + self.num_image_tokens] = self.image_token_id
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if images:
            batch["pixel_values"] = torch.stack(images)
        events = [item.get("data_events") or {} for item in items]
        batch["data_events"] = {
            "skipped": [reason for e in events for reason in e.get("skipped", [])],
            "truncated": sum(e.get("truncated", 0) for e in events),
        }
        return batch


__all__ = ["DataCollator"]
