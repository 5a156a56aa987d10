"""fit_image_placeholders: each image's span shortened to its own count, rows padded again, errors named."""

from __future__ import annotations

import pytest
import torch

from llava_stf.data.placeholders import fit_image_placeholders

IMG, PAD = 9, 0


def test_adjacent_spans_and_rows_are_cut_per_image():
    # row 0: two images back to back (3 slots each); row 1: one image, right padding
    ids = torch.tensor([[1, IMG, IMG, IMG, IMG, IMG, IMG, 2], [1, IMG, IMG, IMG, 3, 4, PAD, PAD]])
    mask = (ids != PAD).long()
    labels = torch.where(ids == IMG, -100, ids)
    pixels = torch.zeros(3, 3, 4, 4)
    out = fit_image_placeholders(
        {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}, [1, 2, 3], IMG, 3, PAD
    )
    # only surplus placeholders go (padding stays: the collator's dummy image sits there, masked)
    assert out["input_ids"].tolist() == [[1, IMG, IMG, IMG, 2, PAD, PAD, PAD], ids[1].tolist()]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], mask[1].tolist()]
    assert out["labels"].tolist() == [[1, -100, -100, -100, 2, -100, -100, -100], labels[1].tolist()]
    assert out["pixel_values"] is pixels


def test_left_padding_is_kept_on_the_left():
    ids = torch.tensor([[PAD, PAD, 1, IMG, IMG, 2], [1, IMG, IMG, 3, 4, 5]])
    out = fit_image_placeholders({"input_ids": ids, "attention_mask": (ids != PAD).long()}, [1, 1], IMG, 2, PAD, "left")
    assert out["input_ids"].tolist() == [[PAD, PAD, 1, IMG, 2], [1, IMG, 3, 4, 5]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize(
    ("counts", "slots", "match"),
    [([1], 2, "not 2 for each of the 1 image"), ([1, 1, 1], 2, "not 2 for each of the 3"), ([3, 1], 2, r"\[1, 2\]")],
)
def test_mismatches_are_named(counts, slots, match):
    ids = torch.tensor([[1, IMG, IMG, IMG, IMG, 2]])
    with pytest.raises(ValueError, match=match):
        fit_image_placeholders({"input_ids": ids}, counts, IMG, slots, PAD)
