"""Average pooling of the patch grid: against avg_pool2d and a plain loop over the adaptive windows, batching, the
budget -> grid rule on the 7B shapes, its errors, and the counted accumulates."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llava_stf.model.presets import load_preset
from llava_stf.model.reducers import MacDims, Pool, PoolParams, ReducerConfigError, ReducerShapes, budget_kwargs

SHAPES = ReducerShapes(8, 8, 4, "clip_vision_model", True, "mlp2x_gelu", 64, True, "llama", 2)
SHAPES_7B = load_preset("llava-v1.5-7b").reducer_shapes()


def run(x: torch.Tensor, out_h: int, out_w: int, shapes: ReducerShapes = SHAPES):
    return Pool(PoolParams(out_h=out_h, out_w=out_w), shapes)(x, None, None)


def features(seed: int, batch: int = 2, patches: int = 64, channels: int = 5) -> torch.Tensor:
    return torch.randn(batch, patches, channels, generator=torch.Generator().manual_seed(seed))


def windows(size: int, out: int) -> list[range]:
    """Adaptive pooling windows written out: ``floor(i size / out) .. ceil((i + 1) size / out)``."""
    return [range(math.floor(i * size / out), math.ceil((i + 1) * size / out)) for i in range(out)]


def loop_pool(x: torch.Tensor, grid_h: int, grid_w: int, out_h: int, out_w: int) -> torch.Tensor:
    """One image ``[grid_h * grid_w, C]`` -> ``[out_h * out_w, C]``: the mean of each window, rows then columns."""
    rows = []
    for rh in windows(grid_h, out_h):
        for rw in windows(grid_w, out_w):
            cells = [x[r * grid_w + c] for r in rh for c in rw]
            rows.append(torch.stack(cells).mean(dim=0))
    return torch.stack(rows)


@pytest.mark.parametrize(("out_h", "out_w"), [(4, 4), (2, 4), (1, 1), (8, 8), (4, 8)])
def test_divisible_grids_equal_avg_pool2d(out_h, out_w):
    x = features(0)
    out, valid = run(x, out_h, out_w)
    grid = x.transpose(1, 2).reshape(2, 5, 8, 8)
    expected = F.avg_pool2d(grid, (8 // out_h, 8 // out_w)).flatten(2).transpose(1, 2)
    assert out.shape == (2, out_h * out_w, 5) and valid.all()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(("out_h", "out_w"), [(3, 5), (4, 6), (7, 7), (5, 8)])
def test_any_grid_equals_the_window_loop(out_h, out_w):
    x = features(1)
    out, _ = run(x, out_h, out_w)
    for b in range(2):
        torch.testing.assert_close(out[b], loop_pool(x[b], 8, 8, out_h, out_w))


def test_non_square_grid_rows_and_columns_are_not_swapped():
    shapes = ReducerShapes(4, 6, 4, "clip_vision_model", True, "mlp2x_gelu", 24, True, "llama", 2)
    x = torch.arange(24.0).view(1, 24, 1)  # patch (r, c) holds 6 r + c
    out, _ = run(x, 2, 3, shapes)
    assert out[0, :, 0].tolist() == [3.5, 5.5, 7.5, 15.5, 17.5, 19.5]
    assert budget_kwargs("pool", 6, shapes) == {"out_h": 2, "out_w": 3}  # the grid's own aspect ratio


def test_batch_equals_each_image_alone():
    x = features(2, batch=3)
    out, _ = run(x, 3, 5)
    for b in range(3):
        assert torch.equal(out[b], run(x[b : b + 1], 3, 5)[0][0])


def test_a_wrong_patch_count_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"8x8 patch grid: got 65 patch features"):
        run(features(0, patches=65), 4, 4)


@pytest.mark.parametrize(("tokens", "grid"), [(1, (1, 1)), (4, (2, 2)), (8, (2, 4)), (16, (4, 4)), (24, (4, 6)),
                                              (32, (4, 8)), (48, (6, 8)), (64, (8, 8))])  # fmt: skip
def test_budget_gives_exact_counts_on_the_tiny_grid(tokens, grid):
    kwargs = budget_kwargs("pool", tokens, SHAPES)
    assert (kwargs["out_h"], kwargs["out_w"]) == grid
    assert run(features(3), **kwargs)[0].shape[1] == tokens == Pool.image_tokens(PoolParams(**kwargs), SHAPES)


@pytest.mark.parametrize(
    ("tokens", "grid"),
    [(64, (8, 8)), (144, (12, 12)), (36, (6, 6)), (128, (8, 16)), (192, (12, 16)), (576, (24, 24)), (288, (16, 18))],
)
def test_budget_on_the_7b_shapes(tokens, grid):
    assert budget_kwargs("pool", tokens, SHAPES_7B) == {"out_h": grid[0], "out_w": grid[1]}
    config = load_preset("llava-v1.5-7b").with_reducer("pool", budget_kwargs("pool", tokens, SHAPES_7B))
    assert config.num_image_tokens == tokens


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (97, r"token budget 97 for reducer_type 'pool' has no out_h x out_w.*24x24.*96 \(8x12\) and 98 \(7x14\)"),
        (31, r"token budget 31 .*nearest valid budgets: 30 \(5x6\) and 32 \(4x8\)"),
        (577, r"token budget 577 for reducer_type 'pool' must be an integer in 1\.\.576"),
    ],
)
def test_budget_without_a_fitting_grid_names_the_nearest(tokens, message):
    with pytest.raises(ReducerConfigError, match=message):
        budget_kwargs("pool", tokens, SHAPES_7B)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"out_h": 25}, r"reducer_kwargs\.out_h=25 exceeds the 24 rows of the 24x24 patch grid"),
        ({"out_w": 30}, r"reducer_kwargs\.out_w=30 exceeds the 24 columns"),
        ({"out_h": 0}, r"reducer_kwargs\.out_h must be an integer >= 1, got 0"),
        ({"tokens": 64}, r"unknown field\(s\) \['tokens'\].*valid fields: \['out_h', 'out_w'\]"),
    ],
)
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ReducerConfigError, match=message):
        load_preset("llava-v1.5-7b").with_reducer("pool", kwargs)


@pytest.mark.parametrize(("out_h", "out_w"), [(12, 12), (12, 16), (7, 9)])
def test_own_macs_count_every_window_element_once_per_channel(out_h, out_w):
    dims = MacDims(1024, 16, 1024, 4096, 4096, 32, 0, out_h * out_w)
    elements = sum(len(rh) * len(rw) for rh in windows(24, out_h) for rw in windows(24, out_w))
    assert Pool.own_macs(PoolParams(out_h, out_w), SHAPES_7B, dims) == elements * 1024
    if 24 % out_h == 0 and 24 % out_w == 0:
        assert elements == 576  # disjoint windows: N x C_in
