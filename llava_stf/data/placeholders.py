"""Fitting a batch's image placeholders to each image's own token count (adaptive reducers such as PruMerge).

The processor and the collator write ``num_image_tokens`` placeholders per image, which for an adaptive reducer is
the most one image can get. Once ``get_image_features`` has said how many tokens each image really has, this keeps
the first ``count`` placeholders of each image's span, removes the rest (labels there are ``IGNORE_INDEX`` anyway)
and pads the rows again, so the model sees a prompt written with exactly each image's count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .tokenization import IGNORE_INDEX

PAD_VALUES = {"attention_mask": 0, "labels": IGNORE_INDEX}  # input_ids get the pad id; other [B, T] entries 0


def fit_image_placeholders(
    batch: Mapping[str, Any],
    counts: Sequence[int],
    image_token_id: int,
    slots: int,
    pad_token_id: int,
    padding_side: str = "right",
) -> dict[str, Any]:
    """The batch with each image's placeholder span shortened to its token count.

    Args:
        batch: ``input_ids [B, T]`` plus any other ``[B, T]`` entries (``attention_mask``, ``labels``,
            ``position_ids``) shortened alike; other entries (``pixel_values``, ...) are passed through.
        counts: tokens per image, in the order the images' spans appear (row by row, left to right).
        image_token_id: the placeholder id.
        slots: placeholders written per image (each span is ``slots`` long; adjacent images' spans abut).
        pad_token_id: written into new padding of ``input_ids``.
        padding_side: where rows are padded again (``"right"`` for training, ``"left"`` for generation).

    Returns:
        A new dict; ``[B, T']`` entries with ``T' <= T``.
    """
    ids = batch["input_ids"]
    image = ids == image_token_id
    per_row = image.sum(dim=1)
    if bool((per_row % slots).any()) or int(per_row.sum()) != slots * len(counts):
        raise ValueError(
            f"the batch has {per_row.tolist()} placeholders per row, which is not {slots} for each of the "
            f"{len(counts)} image(s)"
        )
    if any(not 0 < c <= slots for c in counts):
        raise ValueError(f"image token counts {list(counts)} must lie in [1, {slots}]")
    rank = (image.long().cumsum(dim=1) - 1) % slots  # position of each placeholder within its image's span
    first = per_row.cumsum(dim=0) - per_row  # placeholders before each row
    span = (first[:, None] + image.long().cumsum(dim=1) - 1).div(slots, rounding_mode="floor")
    limit = torch.tensor(list(counts), device=ids.device)[span.clamp(0, len(counts) - 1)]
    keep = ~image | (rank < limit)
    width = int(keep.sum(dim=1).max())
    out = dict(batch)
    for name, value in batch.items():
        if not (isinstance(value, torch.Tensor) and value.shape[:2] == ids.shape):
            continue
        fill = pad_token_id if name == "input_ids" else PAD_VALUES.get(name, 0)
        rows = []
        for row, kept in zip(value, keep):
            row = row[kept]
            pad = row.new_full((width - len(row), *row.shape[1:]), fill)
            rows.append(torch.cat([row, pad] if padding_side == "right" else [pad, row]))
        out[name] = torch.stack(rows)
    return out


__all__ = ["fit_image_placeholders"]
