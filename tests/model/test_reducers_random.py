"""Random pruning: a seeded uniform subset in raster order, the same for every image whatever the batch, exact counts,
the budget mapping and errors naming the field."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from llava_stf.model.presets import load_preset
from llava_stf.model.reducers import RandomDrop, RandomDropParams, ReducerConfigError, ReducerShapes, budget_kwargs
from llava_stf.model.reducers.random_drop import random_patches

SHAPES = ReducerShapes(8, 8, 4, "clip_vision_model", True, "mlp2x_gelu", 64, True, "llama", 2)


def run(x: torch.Tensor, tokens: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return RandomDrop(RandomDropParams(tokens=tokens, seed=seed), SHAPES)(x, None, None)


def features(seed: int, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 64, 6, generator=torch.Generator().manual_seed(seed))


def test_keeps_the_seeded_permutations_first_patches_in_raster_order():
    x = features(0)
    g = torch.Generator().manual_seed(5)
    expected = sorted(torch.randperm(64, generator=g)[:16].tolist())  # the definition, written out
    out, valid = run(x, 16, seed=5)
    assert out.shape == (3, 16, 6) and valid.all()
    for b in range(3):
        assert torch.equal(out[b], x[b, expected])


def test_every_image_gets_the_same_patches_whatever_the_batch():
    x = torch.arange(4 * 64, dtype=torch.float32).view(4, 64, 1)  # each feature names its (image, patch)
    both = run(x)[0]
    kept = (both[..., 0] % 64).long()
    assert all(torch.equal(kept[b], kept[0]) for b in range(4))
    for order in ([3, 1], [2], [0, 2, 1, 3]):  # other batch compositions and positions
        assert torch.equal(run(x[order])[0], both[order])
    assert torch.equal(run(x.double())[0].float(), both)  # and with other dtypes


def test_seeds_give_different_subsets_that_are_uniform_over_patches():
    subsets = [tuple(random_patches(64, 16, seed).tolist()) for seed in range(400)]
    assert len(set(subsets)) == 400
    counts = Counter(p for subset in subsets for p in subset)  # each patch is kept 100 times in expectation
    assert set(counts) == set(range(64)) and 60 < min(counts.values()) <= max(counts.values()) < 140
    assert all(list(s) == sorted(s) for s in subsets)


@pytest.mark.parametrize("tokens", [1, 9, 32, 64])
def test_exact_counts_on_the_tiny_grid(tokens):
    out, valid = run(features(1, batch=2), tokens)
    assert out.shape[1] == tokens == RandomDrop.image_tokens(RandomDropParams(tokens=tokens), SHAPES)
    assert valid.all() and len(set(map(tuple, out[0].tolist()))) == tokens


@pytest.mark.parametrize("tokens", [64, 128, 192, 144, 36])
def test_budget_is_the_kept_count_on_the_7b_shapes(tokens):
    shapes = load_preset("llava-v1.5-7b").reducer_shapes()
    assert budget_kwargs("random", tokens, shapes) == {"tokens": tokens, "seed": 0}
    assert load_preset("llava-v1.5-7b").with_reducer("random", {"tokens": tokens}).num_image_tokens == tokens


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokens": 0}, r"reducer_kwargs\.tokens must be an integer >= 1, got 0"),
        ({"tokens": 600}, r"reducer_kwargs\.tokens=600 exceeds the 576 patches"),
        ({"seed": -1}, r"reducer_kwargs\.seed must be an integer >= 0, got -1"),
        ({"seed": "0"}, r"reducer_kwargs\.seed must be an integer"),
        ({"ratio": 0.5}, r"unknown field\(s\) \['ratio'\].*valid fields: \['tokens', 'seed'\]"),
    ],
)
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ReducerConfigError, match=message):
        load_preset("llava-v1.5-7b").with_reducer("random", kwargs)


def test_grid_merging_projectors_are_refused():
    with pytest.raises(ReducerConfigError, match=r"reducer_type 'random'.*projector_type 'mbtf_stf'"):
        load_preset("llava-stf-7b").with_reducer("random")
