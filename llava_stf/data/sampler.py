"""Training samplers: LLaVA's ``group_by_modality_length`` order and a plain shuffle, both seeded per epoch.

The grouping follows LLaVA-1.5 (``get_modality_length_grouped_indices`` in haotian-liu/LLaVA
``llava/train/llava_trainer.py``) step for step: image and text-only samples are shuffled apart, cut
into megabatches of ``batch_size * world_size`` (``world_size`` = processes x gradient accumulation, so a megabatch
is one optimizer step), sorted by length inside a megabatch and split into ``world_size`` chunks of balanced total
length; the megabatches of both modalities are shuffled together and the two leftovers form one last batch. Every
optimizer step except the last is therefore single-modality, and the ``world_size`` chunks of one step have similar
lengths.

Where LLaVA draws from the global torch RNG, these samplers draw from a generator seeded with ``seed + epoch``:
every rank computes the same order without communication, and a resumed run replays it exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Split ``indices`` (sorted longest first) into ``num_chunks`` lists of equal size and balanced total length."""
    if len(indices) % num_chunks != 0:
        return [list(indices[i::num_chunks]) for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator
) -> list[int]:
    """A random order in which each megabatch is sorted by length and split into balanced per-rank chunks.

    ``lengths`` are positive (``modality_length_grouped_indices`` passes |length| for text-only data, where upstream
    passes the negative values through and so sorts those megabatches shortest first).
    """
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    size = world_size * batch_size
    megabatches = [indices[i : i + size] for i in range(0, len(lengths), size)]
    megabatches = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megabatches]
    return [i for m in megabatches for chunk in split_to_even_chunks(m, lengths, world_size) for i in chunk]


def modality_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator
) -> list[int]:
    """LLaVA's order over signed lengths (> 0: image sample, < 0: text-only sample).

    Args:
        lengths: ``LazySupervisedDataset.modality_lengths``; no zero entries.
        batch_size: per-device batch size.
        world_size: number of processes times gradient accumulation steps.
        generator: the random source (seeded by the caller).

    Returns:
        A permutation of ``range(len(lengths))``.
    """
    if any(n == 0 for n in lengths):
        raise ValueError("modality lengths must be non-zero (positive: image sample, negative: text-only)")
    if all(n > 0 for n in lengths) or all(n < 0 for n in lengths):
        return length_grouped_indices([abs(n) for n in lengths], batch_size, world_size, generator)
    size = world_size * batch_size
    megabatches, leftovers = [], []
    for sign in (1, -1):
        idx = [i for i, n in enumerate(lengths) if n * sign > 0]
        grouped = length_grouped_indices([abs(lengths[i]) for i in idx], batch_size, world_size, generator)
        order = [idx[j] for j in grouped]
        chunks = [order[i : i + size] for i in range(0, len(order), size)]
        megabatches += chunks[:-1]
        leftovers += chunks[-1]
    shuffled = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator).tolist()]
    if leftovers:
        shuffled.append(sorted(leftovers))
    return [i for m in shuffled for i in m]


class _EpochSeeded(Sampler[int]):
    """A sampler whose order is a function of ``seed + epoch`` (``set_epoch`` is called by the Trainer)."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return g


class ShuffleSampler(_EpochSeeded):
    """A uniform random permutation per epoch."""

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.num_samples, generator=self.generator()).tolist())


class ModalityLengthGroupedSampler(_EpochSeeded):
    """``group_by_modality_length`` (LLaVA-1.5 stage 2) over ``LazySupervisedDataset.modality_lengths``."""

    def __init__(self, modality_lengths: Sequence[int], batch_size: int, world_size: int, seed: int):
        super().__init__(len(modality_lengths), seed)
        self.lengths, self.batch_size, self.world_size = list(modality_lengths), batch_size, world_size

    def __iter__(self) -> Iterator[int]:
        g = self.generator()
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, g))


__all__ = [
    "ModalityLengthGroupedSampler",
    "ShuffleSampler",
    "length_grouped_indices",
    "modality_length_grouped_indices",
    "split_to_even_chunks",
]
