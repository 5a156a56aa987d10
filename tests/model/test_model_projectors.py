"""Projectors: the registry contract, and each merge checked against an independent formulation.

The references below index the row-major ``[B, H*W, C]`` patch tokens directly (``token (r, c) = features[:, r*W + c]``)
and never call ``pixel_unshuffle`` / ``avg_pool2d`` / ``Conv2d``, so they check the projectors' tensor plumbing rather
than repeat it. The window layout is the official release's (an ``unfold`` over each window in
visresearch/LLaVA-STF ``llava/model/llava_arch.py``):
``v[ch*k*k + dy*k + dx] = x[k*I + dy, k*J + dx, ch]``, windows row-major.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llava_stf.model import PROJECTORS, build_projector, get_projector_class
from llava_stf.model.projectors import Projector, ProjectorConfigError, ProjectorParams
from llava_stf.testing import tiny_config

GRID = 8  # tiny vision config: 32 px images, patch 4
VISION_HIDDEN = 32
TEXT_HIDDEN = 64

# Non-default settings exercised on top of every registry entry's defaults (skipped if a name leaves the registry).
EXTRA_VARIANTS = [
    ("avgpool", {"window": 4}),
    ("avgpool", {"window": 8}),
    ("token_concat", {"window": 4}),
    ("stf", {"window": 1}),
    ("stf", {"window": 4, "fused_tokens": 2}),
    ("stf", {"window": 2, "fused_tokens": 4, "fusion_width": 64, "num_align_layers": 2, "final_activation": True}),
    ("mbtf", {"block_final_activation": True, "block_hidden": 48, "block_out": 24}),
    ("mbtf_stf", {"window": 4, "fused_tokens": 4, "num_align_layers": 3, "align_width": 40}),
]
VARIANTS = [(name, None) for name in PROJECTORS] + [(n, kw) for n, kw in EXTRA_VARIANTS if n in PROJECTORS]
VARIANT_IDS = [name if kw is None else f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, kw in VARIANTS]
SPATIAL = [name for name, cls in PROJECTORS.items() if cls.spatial]


def make_projector(tokenizer, name, kwargs=None, **config_kwargs):
    config = tiny_config(tokenizer, name, kwargs, **config_kwargs)
    return config, build_projector(config)


def random_features(config, batch=2, dtype=torch.float32):
    channels = config.vision_config.hidden_size * len(config.vision_layers)
    return torch.randn(batch, GRID * GRID, channels, dtype=dtype)


# ------------------------------------------------------------------------------------------ independent references
def window_vectors(features: torch.Tensor, grid_h: int, grid_w: int, k: int) -> torch.Tensor:
    """``[B, H*W, C] -> [B, (H/k)*(W/k), C*k*k]``, windows row-major, ``v[ch*k*k + dy*k + dx] = x[kI+dy, kJ+dx, ch]``.

    Built by explicit indexing (no pixel_unshuffle / unfold); every slot is written exactly once.
    """
    b, n, c = features.shape
    assert n == grid_h * grid_w
    windows = []
    for i in range(grid_h // k):
        for j in range(grid_w // k):
            v = features.new_full((b, c * k * k), float("nan"))
            for dy in range(k):
                for dx in range(k):
                    token = features[:, (k * i + dy) * grid_w + (k * j + dx), :]  # [B, C]
                    v[:, dy * k + dx :: k * k] = token  # slots ch*k*k + dy*k + dx, ch = 0..C-1
            windows.append(v)
    out = torch.stack(windows, dim=1)
    assert not out.isnan().any()
    return out


def window_means(features: torch.Tensor, grid_h: int, grid_w: int, k: int) -> torch.Tensor:
    """``[B, H*W, C] -> [B, (H/k)*(W/k), C]``: the mean of each k x k window, windows row-major."""
    windows = []
    for i in range(grid_h // k):
        for j in range(grid_w // k):
            tokens = [features[:, (k * i + dy) * grid_w + (k * j + dx), :] for dy in range(k) for dx in range(k)]
            windows.append(torch.stack(tokens, dim=0).sum(dim=0) / (k * k))
    return torch.stack(windows, dim=1)


def split_groups(fused: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, M, F] -> [B, M*n, F/n]``: each window's channels cut into n contiguous groups, window-major then group."""
    b, m, f = fused.shape
    width = f // n
    rows = [fused[:, t, g * width : (g + 1) * width] for t in range(m) for g in range(n)]
    return torch.stack(rows, dim=1)


def mlp_head(x: torch.Tensor, linear_1: nn.Linear, linear_2: nn.Linear) -> torch.Tensor:
    """LLaVA-1.5 MLP with the exact (erf) GELU."""
    hidden = F.gelu(F.linear(x, linear_1.weight, linear_1.bias), approximate="none")
    return F.linear(hidden, linear_2.weight, linear_2.bias)


def stf_reference(stf_module, features: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Window flatten, the conv as a Linear with ``W.view(F, C*k*k)``, split into n groups, the align layers."""
    weight, bias = stf_module.fusion.weight, stf_module.fusion.bias
    out_channels, in_channels, kh, kw = weight.shape
    assert (kh, kw) == (k, k)
    v = window_vectors(features, GRID, GRID, k)
    assert v.shape[-1] == in_channels * k * k
    fused = F.linear(v, weight.reshape(out_channels, in_channels * k * k), bias)
    return stf_module.align(split_groups(fused, n))


# ------------------------------------------------------------------------------------------------ reference sanity
def test_window_reference_matches_the_documented_layout():
    """The hand-written reference itself: channel-major (ch, dy, dx) slots, row-major windows."""
    grid, channels, k = 4, 2, 2
    # token (r, c), channel ch holds 100*ch + 10*r + c
    values = [[100 * ch + 10 * r + c for ch in range(channels)] for r in range(grid) for c in range(grid)]
    features = torch.tensor(values, dtype=torch.float64).unsqueeze(0)
    v = window_vectors(features, grid, grid, k)
    assert v.shape == (1, 4, 8)
    # window t=1 is (I=0, J=1): patch rows 0-1, columns 2-3
    assert v[0, 1].tolist() == [2, 3, 12, 13, 102, 103, 112, 113]
    # window t=2 is (I=1, J=0): patch rows 2-3, columns 0-1
    assert v[0, 2].tolist() == [20, 21, 30, 31, 120, 121, 130, 131]
    # ... which is the pixel_unshuffle order (the release's ``unfold``), not the (dy, dx, ch) einops order
    nchw = features.transpose(1, 2).reshape(1, channels, grid, grid)
    unshuffled = F.pixel_unshuffle(nchw, k).flatten(2).transpose(1, 2)
    torch.testing.assert_close(v, unshuffled, rtol=0, atol=0)
    assert v[0, 1].tolist() != [2, 102, 3, 103, 12, 112, 13, 113]


def test_split_groups_reference():
    fused = torch.arange(2 * 3 * 4, dtype=torch.float64).reshape(2, 3, 4)
    out = split_groups(fused, 2)
    assert out.shape == (2, 6, 2)
    assert out[0, :4].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]  # window 0 group 0, window 0 group 1, window 1 ...


# ------------------------------------------------------------------------------------------------- registry
def test_registry_holds_the_documented_projectors():
    assert {"mlp2x_gelu", "avgpool", "token_concat", "stf", "mbtf", "mbtf_stf"} <= set(PROJECTORS)
    for name, cls in PROJECTORS.items():
        assert issubclass(cls, Projector), name
        assert issubclass(cls.Params, ProjectorParams), name
        assert get_projector_class(name) is cls


def test_unknown_projector_name_lists_the_valid_ones():
    with pytest.raises(ProjectorConfigError) as info:
        get_projector_class("mlp3x_gelu")
    message = str(info.value)
    assert "mlp3x_gelu" in message
    for name in PROJECTORS:
        assert name in message


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=VARIANT_IDS)
def test_output_shape_matches_config_token_count(tokenizer, name, kwargs):
    config, projector = make_projector(tokenizer, name, kwargs)
    assert isinstance(projector, PROJECTORS[name])
    features = random_features(config, batch=3)
    with torch.no_grad():
        out = projector(features)
    assert out.shape == (3, config.num_image_tokens, TEXT_HIDDEN)
    assert torch.isfinite(out).all()
    # Images are independent: the second image's output does not depend on the first one.
    with torch.no_grad():
        alone = projector(features[1:2])
    torch.testing.assert_close(alone[0], out[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=VARIANT_IDS)
def test_num_image_tokens_agrees_between_projector_params_and_config(tokenizer, name, kwargs):
    config, projector = make_projector(tokenizer, name, kwargs)
    gh, gw = config.grid_size
    assert (gh, gw) == (GRID, GRID)
    assert projector.num_image_tokens(gh, gw) == config.num_image_tokens
    assert config.projector_params().num_image_tokens(gh, gw) == config.num_image_tokens
    assert config.image_seq_length == config.num_image_tokens


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=VARIANT_IDS)
def test_backward_reaches_every_projector_parameter(tokenizer, name, kwargs):
    config, projector = make_projector(tokenizer, name, kwargs)
    projector.train()
    features = random_features(config).requires_grad_(True)
    out = projector(features)
    loss = (out * torch.randn_like(out)).sum()
    loss.backward()
    params = dict(projector.named_parameters())
    assert params, f"{name} has no parameters"
    for pname, param in params.items():
        assert param.requires_grad, pname
        assert param.grad is not None, f"{name}: no gradient reached {pname}"
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"
    assert features.grad is not None and features.grad.abs().sum() > 0


@pytest.mark.parametrize("name", SPATIAL)
def test_spatial_projector_rejects_wrong_token_count(tokenizer, name):
    config, projector = make_projector(tokenizer, name)
    features = random_features(config)
    with pytest.raises(ValueError, match=str(GRID * GRID)):
        projector(features[:, 1:])  # 63 tokens: e.g. CLS kept on one side, or a wrong image size
    with pytest.raises(ValueError, match=str(GRID * GRID)):
        projector(torch.cat([features[:, :1], features], dim=1))  # 65 tokens (CLS not dropped)


# ------------------------------------------------------------------------------------------------ STF equivalence
STF_CASES = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 4)]


@pytest.mark.parametrize(("k", "n"), STF_CASES, ids=[f"k{k}-n{n}" for k, n in STF_CASES])
def test_stf_equals_window_concat_then_linear(tokenizer, k, n):
    config, projector = make_projector(tokenizer, "stf", {"window": k, "fused_tokens": n})
    projector = projector.double().eval()
    weight = projector.stf.fusion.weight
    assert weight.shape == (4 * k * k * VISION_HIDDEN, VISION_HIDDEN, k, k)  # F = 4*k*k*C (official release)
    features = random_features(config, dtype=torch.float64)
    with torch.no_grad():
        expected = stf_reference(projector.stf, features, k, n)
        actual = projector(features)
    assert actual.shape == expected.shape == (2, (GRID // k) ** 2 * n, TEXT_HIDDEN)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_stf_over_several_concatenated_layers_equals_reference(tokenizer):
    config, projector = make_projector(tokenizer, "stf", {"window": 2, "fused_tokens": 2}, vision_feature_layer=[-2, 4])
    projector = projector.double()
    assert projector.stf.fusion.weight.shape[1] == 2 * VISION_HIDDEN
    features = random_features(config, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(projector(features), stf_reference(projector.stf, features, 2, 2), atol=1e-5, rtol=0)


def test_stf_reference_detects_a_wrong_window_layout(tokenizer):
    """The comparison is sensitive: the (dy, dx, ch) order (the einops layout) gives a different answer."""
    config, projector = make_projector(tokenizer, "stf", {"window": 2})
    projector = projector.double()
    features = random_features(config, dtype=torch.float64)
    weight, bias = projector.stf.fusion.weight, projector.stf.fusion.bias
    wrong_weight = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)  # treats v as (dy, dx, ch)
    with torch.no_grad():
        wrong = projector.stf.align(F.linear(window_vectors(features, GRID, GRID, 2), wrong_weight, bias))
        assert (projector(features) - wrong).abs().max() > 1e-3


def test_stf_default_layer_stack_is_the_official_one(tokenizer):
    """Conv(C -> 4k^2C, k, stride k), then GELU, Linear(4k^2C -> D), no final activation.

    As visresearch/LLaVA-STF ``llava/model/multimodal_projector/builder.py`` builds it.
    """
    config, projector = make_projector(tokenizer, "stf")
    stf = projector.stf
    assert isinstance(stf.fusion, nn.Conv2d)
    assert stf.fusion.kernel_size == (2, 2) and stf.fusion.stride == (2, 2) and stf.fusion.padding == (0, 0)
    assert stf.fusion.out_channels == 16 * VISION_HIDDEN
    layers = list(stf.align)
    assert len(layers) == 2
    torch.testing.assert_close(layers[0](torch.tensor([-1.0, 0.5])), F.gelu(torch.tensor([-1.0, 0.5])))
    assert isinstance(layers[1], nn.Linear)
    assert (layers[1].in_features, layers[1].out_features) == (16 * VISION_HIDDEN, TEXT_HIDDEN)


def test_stf_paper_variant_layer_stack(tokenizer):
    """num_align_layers=2, final_activation=True: GELU, Linear(F/n -> A), GELU, Linear(A -> D), GELU."""
    kwargs = {
        "fusion_width": 128,
        "fused_tokens": 2,
        "num_align_layers": 2,
        "align_width": 48,
        "final_activation": True,
    }
    config, projector = make_projector(tokenizer, "stf", kwargs)
    linears = [m for m in projector.stf.align if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 48), (48, TEXT_HIDDEN)]
    assert len(projector.stf.align) == 5
    x = torch.randn(1, 4, 64)
    with torch.no_grad():
        h = F.gelu(F.linear(F.gelu(x), linears[0].weight, linears[0].bias))
        expected = F.gelu(F.linear(h, linears[1].weight, linears[1].bias))
        torch.testing.assert_close(projector.stf.align(x), expected)


# --------------------------------------------------------------------------------------- MBTF and MBTF + STF
def mbtf_reference(mbtf: nn.Sequential, features: torch.Tensor, final_activation: bool) -> torch.Tensor:
    first, second = mbtf[0], mbtf[2]
    out = F.linear(F.gelu(F.linear(features, first.weight, first.bias)), second.weight, second.bias)
    return F.gelu(out) if final_activation else out


@pytest.mark.parametrize("final_activation", [False, True])
def test_mbtf_equals_per_token_two_layer_fusion_then_mlp(tokenizer, final_activation):
    config, projector = make_projector(tokenizer, "mbtf", {"block_final_activation": final_activation})
    projector = projector.double()
    assert config.vision_feature_layer == [8, 7, 6, 5, 4, 3, 2, 1]  # 9-block tiny tower, deepest first
    assert projector.mbtf[0].in_features == 8 * VISION_HIDDEN
    assert projector.mbtf[0].out_features == 4 * VISION_HIDDEN and projector.mbtf[2].out_features == VISION_HIDDEN
    features = random_features(config, dtype=torch.float64)
    with torch.no_grad():
        fused = mbtf_reference(projector.mbtf, features, final_activation)
        expected = mlp_head(fused, projector.mlp.linear_1, projector.mlp.linear_2)
        torch.testing.assert_close(projector(features), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("k", "n"), [(2, 1), (4, 2)])
def test_mbtf_stf_equals_mbtf_then_stf_reference(tokenizer, k, n):
    config, projector = make_projector(tokenizer, "mbtf_stf", {"window": k, "fused_tokens": n})
    projector = projector.double()
    features = random_features(config, dtype=torch.float64)
    with torch.no_grad():
        fused = mbtf_reference(projector.mbtf, features, final_activation=False)
        expected = stf_reference(projector.stf, fused, k, n)
        actual = projector(features)
    assert actual.shape == (2, (GRID // k) ** 2 * n, TEXT_HIDDEN)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_mbtf_stf_state_dict_mirrors_the_release_modules(tokenizer):
    """``mbtf.{0,2}`` = ``mm_projector_crosslayer.{0,2}``; ``stf.fusion`` and ``stf.align`` = ``mm_projector.{0,2}``."""
    config, projector = make_projector(tokenizer, "mbtf_stf")
    shapes = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    c, d = VISION_HIDDEN, TEXT_HIDDEN
    assert shapes == {
        "mbtf.0.weight": (4 * c, 8 * c),
        "mbtf.0.bias": (4 * c,),
        "mbtf.2.weight": (c, 4 * c),
        "mbtf.2.bias": (c,),
        "stf.fusion.weight": (16 * c, c, 2, 2),
        "stf.fusion.bias": (16 * c,),
        "stf.align.1.weight": (d, 16 * c),
        "stf.align.1.bias": (d,),
    }


# ------------------------------------------------------------------------------------------------ pooling ablations
@pytest.mark.parametrize("k", [2, 4, 8])
def test_avgpool_equals_window_mean_then_mlp(tokenizer, k):
    config, projector = make_projector(tokenizer, "avgpool", {"window": k})
    projector = projector.double()
    features = random_features(config, dtype=torch.float64)
    with torch.no_grad():
        expected = mlp_head(window_means(features, GRID, GRID, k), projector.mlp.linear_1, projector.mlp.linear_2)
        actual = projector(features)
    assert actual.shape == (2, (GRID // k) ** 2, TEXT_HIDDEN)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_token_concat_equals_window_concat_then_mlp(tokenizer, k):
    config, projector = make_projector(tokenizer, "token_concat", {"window": k})
    projector = projector.double()
    assert projector.mlp.linear_1.in_features == k * k * VISION_HIDDEN
    features = random_features(config, dtype=torch.float64)
    with torch.no_grad():
        expected = mlp_head(window_vectors(features, GRID, GRID, k), projector.mlp.linear_1, projector.mlp.linear_2)
        actual = projector(features)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_mlp2x_gelu_equals_linear_gelu_linear(tokenizer):
    config, projector = make_projector(tokenizer, "mlp2x_gelu")
    projector = projector.double()
    assert set(projector.state_dict()) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    features = random_features(config, dtype=torch.float64)
    with torch.no_grad():
        expected = mlp_head(features, projector.linear_1, projector.linear_2)
        torch.testing.assert_close(projector(features), expected, atol=1e-5, rtol=0)
