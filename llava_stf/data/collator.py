"""Batching dataset items: right padding with an explicit attention mask, images stacked in text order.

Padding uses the tokenizer's pad id in ``input_ids``, ``IGNORE_INDEX`` in ``labels`` and 0 in ``attention_mask``
(LLaVA's ``DataCollatorForSupervisedDataset`` in ``llava/train/train.py`` derives the mask from
``input_ids != pad_id``, which also hides real ``<unk>`` tokens).
Items are already truncated by the dataset (image tokens counted), so nothing is cut here, and each item's prompt
already holds exactly its own image's placeholders: image tokens are never padded.

AnyRes (LLaVA-NeXT) items carry ``pixel_values`` ``[n_crops, 3, H, W]`` (tiles + base image, a count that depends
on the image's size) and ``image_sizes`` ``[2]``: the crop dimension is padded with zero crops to the batch's
largest, ``[n_images, max_crops, 3, H, W]``, as transformers' ``LlavaNextImageProcessor`` pads a batch (the model
reads only each image's own crops, from its size), and ``image_sizes`` are stacked, ``[n_images, 2]``.

``always_run_vision``: a batch without images still runs the vision tower and projector on one dummy image (zeros
after normalisation, LLaVA's text-only image), whose placeholders are appended after the shortest row's last token
with ``attention_mask`` 0 and labels ``IGNORE_INDEX``. They change no loss or gradient value, but every trainable
parameter stays in every step's graph and every rank runs the same modules in the same order: DDP needs the first,
ZeRO-3's parameter gathering the second (LLaVA's ``LazySupervisedDataset`` feeds a zero image for the same reason).
The dummy is one crop-sized image run through the processor, so for AnyRes it has its crops, an image size and
that size's placeholder count (the ``image_newline`` then stays in the graph too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from .tokenization import IGNORE_INDEX

if TYPE_CHECKING:
    from llava_stf.model import LlavaStfProcessor


@dataclass
class DataCollator:
    """Pads ``LazySupervisedDataset`` items into a batch for ``LlavaStfForConditionalGeneration`` (or the NeXT one)."""

    pad_token_id: int  # id written into padding positions of input_ids
    image_token_id: int  # placeholder id (for the dummy image)
    num_image_tokens: int  # placeholders of the dummy image
    dummy_pixel_values: torch.Tensor | None = None  # [3, H, W] (AnyRes: [n_crops, 3, H, W]); always run the tower
    dummy_image_sizes: torch.Tensor | None = None  # [2] (height, width) of the dummy image; AnyRes only

    @classmethod
    def from_processor(cls, processor: LlavaStfProcessor, always_run_vision: bool = True) -> DataCollator:
        """Collator matching a ``LlavaStfProcessor`` or ``LlavaStfNextProcessor`` (pad id, image token, dummy)."""
        if processor.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before batching")
        if not always_run_vision:
            return cls(processor.tokenizer.pad_token_id, processor.image_token_id, processor.num_image_tokens)
        crop = processor.image_processor.crop_size
        height, width = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop.height, crop.width)
        blank = Image.new("RGB", (int(width), int(height)))
        inputs = processor.image_inputs([blank])
        sizes = inputs.get("image_sizes")
        return cls(
            processor.tokenizer.pad_token_id,
            processor.image_token_id,
            processor.image_token_counts([blank])[0],
            torch.zeros_like(inputs["pixel_values"][0]),
            None if sizes is None else sizes[0].clone(),
        )

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Batch the items.

        Returns:
            ``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]``, ``labels`` ``[B, T]``, ``pixel_values``
            ``[n_images, 3, H, W]`` (AnyRes: ``[n_images, max_crops, 3, H, W]``, zero crops pad, and ``image_sizes``
            ``[n_images, 2]``; both absent when there is no image and no dummy), and ``data_events``
            (``{"skipped": [reason, ...], "truncated": n}``: for the trainer's counts, not for the model).
        """
        rows = [item["input_ids"] for item in items]
        lengths = [len(r) for r in rows]
        with_image = [item for item in items if item.get("pixel_values") is not None]
        images = [item["pixel_values"] for item in with_image]
        sizes = [item["image_sizes"] for item in with_image if item.get("image_sizes") is not None]
        dummy_row = None
        if not images and self.dummy_pixel_values is not None:
            dummy_row = min(range(len(rows)), key=lambda i: lengths[i])
            images = [self.dummy_pixel_values]
            sizes = [] if self.dummy_image_sizes is None else [self.dummy_image_sizes]
        if sizes and len(sizes) != len(images):
            raise ValueError(f"{len(images)} images but {len(sizes)} image_sizes: AnyRes items need both")
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
            batch["pixel_values"] = torch.stack(pad_crops(images)) if sizes else torch.stack(images)
        if sizes:
            batch["image_sizes"] = torch.stack([torch.as_tensor(s, dtype=torch.long) for s in sizes])
        events = [item.get("data_events") or {} for item in items]
        batch["data_events"] = {
            "skipped": [reason for e in events for reason in e.get("skipped", [])],
            "truncated": sum(e.get("truncated", 0) for e in events),
        }
        return batch


def pad_crops(images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """AnyRes images ``[n_crops_i, 3, H, W]`` padded with zero crops to the largest ``n_crops``."""
    most = max(len(image) for image in images)
    return [torch.cat([image, image.new_zeros(most - len(image), *image.shape[1:])]) for image in images]


__all__ = ["DataCollator", "pad_crops"]
