"""DivPrune: the greedy max-min selection against a loop-based transcription of the published algorithm, exact counts,
raster output order, batching, the budget mapping and errors naming the field."""

from __future__ import annotations

import pytest
import torch

from llava_stf.model.presets import load_preset
from llava_stf.model.reducers import DivPrune, DivPruneParams, ReducerConfigError, ReducerShapes, budget_kwargs
from llava_stf.model.reducers.divprune import cosine_distances, max_min_select

SHAPES = ReducerShapes(8, 8, 4, "clip_vision_model", True, "mlp2x_gelu", 64, True, "llama", 2)


def reference_divprune(x: torch.Tensor, count: int) -> list[int]:
    """One image ``[N, C]``, Python loops in float64: distances ``1 - cos``; first the token farthest from its nearest
    other token, then repeatedly the unchosen token farthest from the chosen set (lowest index on ties)."""
    x = x.double()
    n = x.shape[0]
    norms = [float(x[i].norm()) for i in range(n)]
    d = [[1.0 - float(x[i] @ x[j]) / (norms[i] * norms[j]) for j in range(n)] for i in range(n)]
    nearest = [min(d[i][j] for i in range(n) if i != j) for j in range(n)]
    chosen = [max(range(n), key=lambda j: (nearest[j], -j))]
    while len(chosen) < count:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (min(d[i][j] for i in chosen), -j)))
    return chosen


def features(seed: int, batch: int = 3, patches: int = 64, channels: int = 12) -> torch.Tensor:
    return torch.randn(batch, patches, channels, generator=torch.Generator().manual_seed(seed))


def run(tokens: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return DivPrune(DivPruneParams(tokens=tokens), SHAPES)(x, None, None)


@pytest.mark.parametrize("tokens", [1, 5, 16, 40])
def test_selection_equals_the_loop_reference(tokens):
    x = features(0)
    picks = max_min_select(cosine_distances(x), tokens)
    out, valid = run(tokens, x)
    assert out.shape == (3, tokens, 12) and valid.all()
    for b in range(3):
        expected = reference_divprune(x[b], tokens)
        assert picks[b].tolist() == expected  # the same picks in the same order
        assert torch.equal(out[b], x[b, sorted(expected)])  # passed on in raster order


def test_one_token_from_each_cluster_and_the_outlier_first():
    # Four tight clusters of 16 tokens on orthogonal axes; token 37 becomes an outlier off all of them.
    g = torch.Generator().manual_seed(1)
    axes = torch.eye(8)[:4]
    x = axes.repeat_interleave(16, dim=0)[:64] + 0.01 * torch.randn(64, 8, generator=g)
    x[37] = torch.tensor([1.0, 0, 0, 0, 0, 0, 1.0, 1.0])  # farthest from its nearest neighbour
    picks = max_min_select(cosine_distances(x[None]), 5)[0].tolist()
    assert picks[0] == 37
    assert sorted(p // 16 for p in picks[1:]) == [0, 1, 2, 3]  # then one per cluster


def test_duplicates_never_repick_so_the_count_is_exact():
    x = torch.ones(2, 64, 4)  # every distance 0: the original could pick the same token again
    out_index = max_min_select(cosine_distances(x), 64)
    assert [sorted(row.tolist()) for row in out_index] == [list(range(64))] * 2
    out, valid = run(10, x)
    assert out.shape == (2, 10, 4) and valid.all()


def test_batch_equals_each_image_alone_and_dtype_is_kept():
    x = features(2, batch=4).to(torch.bfloat16)
    out, _ = run(24, x)
    assert out.dtype == torch.bfloat16
    for b in range(4):
        assert torch.equal(out[b], run(24, x[b : b + 1])[0][0])


@pytest.mark.parametrize("tokens", [1, 7, 32, 63, 64])
def test_exact_counts_on_the_tiny_grid(tokens):
    out, valid = run(tokens, features(3, batch=2))
    assert out.shape[1] == tokens == DivPrune.image_tokens(DivPruneParams(tokens=tokens), SHAPES)
    assert valid.all() and len(set(map(tuple, out[0].tolist()))) == tokens  # distinct patches


@pytest.mark.parametrize("tokens", [64, 128, 192, 144, 36, 56])
def test_budget_is_the_kept_count_on_the_7b_shapes(tokens):
    shapes = load_preset("llava-v1.5-7b").reducer_shapes()
    assert budget_kwargs("divprune", tokens, shapes) == {"tokens": tokens}
    config = load_preset("llava-v1.5-7b").with_reducer("divprune", {"tokens": tokens})
    assert config.num_image_tokens == tokens and not config.adaptive_image_tokens


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokens": 0}, r"reducer_kwargs\.tokens must be an integer >= 1, got 0"),
        ({"tokens": 577}, r"reducer_kwargs\.tokens=577 exceeds the 576 patches of the 24x24 grid"),
        ({"tokens": 64.0}, r"reducer_kwargs\.tokens must be an integer"),
        ({"ratio": 0.1}, r"unknown field\(s\) \['ratio'\].*valid fields: \['tokens'\]"),
    ],
)
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ReducerConfigError, match=message):
        load_preset("llava-v1.5-7b").with_reducer("divprune", kwargs)


def test_budget_outside_the_grid_and_grid_merging_projectors_are_refused():
    with pytest.raises(ReducerConfigError, match=r"token budget 577 for reducer_type 'divprune'.*1\.\.576"):
        budget_kwargs("divprune", 577, load_preset("llava-v1.5-7b").reducer_shapes())
    with pytest.raises(ReducerConfigError, match=r"reducer_type 'divprune'.*projector_type 'mbtf_stf'"):
        load_preset("llava-stf-7b").with_reducer("divprune", {"tokens": 64})
