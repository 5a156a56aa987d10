"""The samplers: LLaVA's group_by_modality_length order, step for step, seeded per epoch."""

from __future__ import annotations

import random

import pytest
import torch

from llava_stf.data.sampler import (
    ModalityLengthGroupedSampler,
    ShuffleSampler,
    modality_length_grouped_indices,
    split_to_even_chunks,
)


# LLaVA-1.5's functions (llava/train/llava_trainer.py @ 4e2277a), verbatim except that the generator is passed to the
# inner calls too (upstream gives them None, i.e. the global RNG): the port must reproduce them exactly.
def upstream_split_to_even_chunks(indices, lengths, num_chunks):
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    num_indices_per_chunk = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    chunks_lengths = [0 for _ in range(num_chunks)]
    for index in indices:
        shortest_chunk = chunks_lengths.index(min(chunks_lengths))
        chunks[shortest_chunk].append(index)
        chunks_lengths[shortest_chunk] += lengths[index]
        if len(chunks[shortest_chunk]) == num_indices_per_chunk:
            chunks_lengths[shortest_chunk] = float("inf")
    return chunks


def upstream_get_length_grouped_indices(lengths, batch_size, world_size, generator=None, merge=True):
    indices = torch.randperm(len(lengths), generator=generator)
    megabatch_size = world_size * batch_size
    megabatches = [indices[i : i + megabatch_size].tolist() for i in range(0, len(lengths), megabatch_size)]
    megabatches = [sorted(megabatch, key=lambda i: lengths[i], reverse=True) for megabatch in megabatches]
    megabatches = [upstream_split_to_even_chunks(megabatch, lengths, world_size) for megabatch in megabatches]
    return [i for megabatch in megabatches for batch in megabatch for i in batch]


def upstream_get_modality_length_grouped_indices(lengths, batch_size, world_size, generator=None):
    assert all(l != 0 for l in lengths), "Should not have zero length."  # noqa: E741
    if all(l > 0 for l in lengths) or all(l < 0 for l in lengths):  # noqa: E741
        return upstream_get_length_grouped_indices(lengths, batch_size, world_size, generator=generator)
    mm_indices, mm_lengths = zip(*[(i, l) for i, l in enumerate(lengths) if l > 0])  # noqa: E741
    lang_indices, lang_lengths = zip(*[(i, -l) for i, l in enumerate(lengths) if l < 0])  # noqa: E741
    mm_shuffle = [
        mm_indices[i]
        for i in upstream_get_length_grouped_indices(mm_lengths, batch_size, world_size, generator=generator)
    ]
    lang_shuffle = [
        lang_indices[i]
        for i in upstream_get_length_grouped_indices(lang_lengths, batch_size, world_size, generator=generator)
    ]
    megabatch_size = world_size * batch_size
    mm_megabatches = [mm_shuffle[i : i + megabatch_size] for i in range(0, len(mm_shuffle), megabatch_size)]
    lang_megabatches = [lang_shuffle[i : i + megabatch_size] for i in range(0, len(lang_shuffle), megabatch_size)]
    last_mm = mm_megabatches[-1]
    last_lang = lang_megabatches[-1]
    additional_batch = last_mm + last_lang
    megabatches = mm_megabatches[:-1] + lang_megabatches[:-1]
    megabatch_indices = torch.randperm(len(megabatches), generator=generator)
    megabatches = [megabatches[i] for i in megabatch_indices]
    if len(additional_batch) > 0:
        megabatches.append(sorted(additional_batch))
    return [i for megabatch in megabatches for i in megabatch]


def random_lengths(seed: int, n: int, text_fraction: float) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 300) * (-1 if rng.random() < text_fraction else 1) for _ in range(n)]


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.mark.parametrize("n", [1, 7, 64, 203])
@pytest.mark.parametrize("text_fraction", [0.0, 0.3, 0.9])
@pytest.mark.parametrize(("batch", "world"), [(2, 1), (4, 2), (3, 4)])
def test_matches_upstream(n, text_fraction, batch, world):
    lengths = random_lengths(n * 31 + batch, n, text_fraction)
    lengths[0] = abs(lengths[0])  # at least one image sample (all-text data: see the next test)
    ours = modality_length_grouped_indices(lengths, batch, world, gen(5))
    assert ours == upstream_get_modality_length_grouped_indices(lengths, batch, world, gen(5))
    assert sorted(ours) == list(range(n))


def test_every_global_batch_but_the_last_has_one_modality():
    lengths = random_lengths(1, 500, 0.25)
    batch, world = 4, 3
    order = modality_length_grouped_indices(lengths, batch, world, gen(0))
    size = batch * world
    n_image = sum(n > 0 for n in lengths)
    extra = (n_image - 1) % size + 1 + (len(lengths) - n_image - 1) % size + 1  # both modalities' last megabatch
    head, tail = order[:-extra], order[-extra:]
    assert len(head) % size == 0 and tail == sorted(tail)  # upstream appends the leftovers sorted by index
    steps = [head[i : i + size] for i in range(0, len(head), size)]
    assert all(len({lengths[i] > 0 for i in step}) == 1 for step in steps)
    assert {len({lengths[i] > 0 for i in step}) for step in steps} == {1} and len(steps) > 30


def test_even_chunks_balance_lengths():
    lengths = [10, 9, 8, 7, 3, 2, 1, 1]
    chunks = split_to_even_chunks(list(range(8)), lengths, 2)
    assert [len(c) for c in chunks] == [4, 4]
    totals = sorted(sum(lengths[i] for i in c) for c in chunks)
    assert totals == [20, 21]
    assert split_to_even_chunks([0, 1, 2], lengths, 2) == [[0, 2], [1]]  # uneven: round-robin


def test_text_only_data_is_grouped_by_length_like_image_data():
    # Upstream passes the negative lengths through (sorting shortest first); here |length| is used, as for images.
    lengths = random_lengths(2, 40, 0.0)
    negated = [-n for n in lengths]
    expected = modality_length_grouped_indices(lengths, 2, 2, gen(1))
    assert modality_length_grouped_indices(negated, 2, 2, gen(1)) == expected


def test_zero_length_is_refused():
    with pytest.raises(ValueError, match="non-zero"):
        modality_length_grouped_indices([3, 0, -2], 1, 1, gen(0))


@pytest.mark.parametrize("make", [lambda: ShuffleSampler(50, seed=3), lambda: ModalityLengthGroupedSampler(
    random_lengths(0, 50, 0.3), batch_size=2, world_size=2, seed=3)])  # fmt: skip
def test_order_is_a_function_of_seed_and_epoch(make):
    a, b = make(), make()
    assert list(a) == list(b) and len(a) == 50 and sorted(a) == list(range(50))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
