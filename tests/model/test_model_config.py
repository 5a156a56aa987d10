"""``LlavaStfConfig``: token counts at the real 336 px shapes, release defaults, errors, and save / load."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, CLIPVisionConfig

from llava_stf.model import PROJECTORS, LlavaStfConfig
from llava_stf.model.projectors import ProjectorConfigError, evenly_spaced_blocks
from llava_stf.testing import tiny_config

SPATIAL = [name for name, cls in PROJECTORS.items() if cls.spatial]
NON_SPATIAL = [name for name, cls in PROJECTORS.items() if not cls.spatial]
WINDOWED = [name for name in SPATIAL if "window" in PROJECTORS[name].Params.__dataclass_fields__]


def clip_l_336() -> CLIPVisionConfig:
    """CLIP ViT-L/14-336 vision tower shapes (config only; no weights are built anywhere in this file)."""
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )


def real_config(projector_type: str = "mlp2x_gelu", projector_kwargs=None, **kwargs) -> LlavaStfConfig:
    return LlavaStfConfig(
        projector_type=projector_type, projector_kwargs=projector_kwargs, vision_config=clip_l_336(), **kwargs
    )


# ------------------------------------------------------------------------------------------ real 336 px shapes
def test_default_llava_vision_config_is_clip_l_336():
    config = LlavaStfConfig()
    vision = config.vision_config
    assert (vision.image_size, vision.patch_size, vision.num_hidden_layers, vision.hidden_size) == (336, 14, 24, 1024)
    assert config.grid_size == (24, 24)
    assert config.projector_type == "mlp2x_gelu"
    assert config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default"
    assert config.num_image_tokens == 576


REAL_COUNTS = [
    ("mlp2x_gelu", None, 576),
    ("avgpool", {"window": 2}, 144),
    ("token_concat", {"window": 2}, 144),
    ("stf", {"window": 2, "fused_tokens": 1}, 144),
    ("mbtf_stf", {"window": 2, "fused_tokens": 1}, 144),
    ("avgpool", None, 144),
    ("token_concat", None, 144),
    ("stf", None, 144),
    ("mbtf_stf", None, 144),
    ("mbtf", None, 576),
    ("stf", {"window": 2, "fused_tokens": 2}, 288),
    ("stf", {"window": 4, "fused_tokens": 4}, 144),
    ("stf", {"window": 3}, 64),
    ("avgpool", {"window": 6}, 16),
]


@pytest.mark.parametrize(("name", "kwargs", "expected"), REAL_COUNTS)
def test_token_counts_at_336px(name, kwargs, expected):
    for config in (real_config(name, kwargs), LlavaStfConfig(projector_type=name, projector_kwargs=kwargs)):
        assert config.num_image_tokens == expected
        assert config.image_seq_length == expected


def test_mbtf_stf_defaults_are_the_official_release():
    config = real_config("mbtf_stf")
    assert config.vision_feature_layer == [23, 21, 18, 15, 12, 9, 6, 3]
    kwargs = config.projector_kwargs
    assert kwargs["fusion_width"] == 16384
    assert kwargs["block_hidden"] == 4096
    assert kwargs["block_out"] == 1024
    assert kwargs["num_align_layers"] == 1
    assert kwargs["num_blocks"] == 8
    assert kwargs["window"] == 2 and kwargs["fused_tokens"] == 1
    assert kwargs["final_activation"] is False and kwargs["block_final_activation"] is False
    assert kwargs["align_width"] == config.text_config.hidden_size == 4096
    assert config.num_image_tokens == 144
    shapes = config.projector_shapes()
    assert shapes.in_channels == 8 * 1024 and shapes.num_vision_blocks == 24


def test_mbtf_default_layers_and_explicit_layers():
    assert real_config("mbtf").vision_feature_layer == [23, 21, 18, 15, 12, 9, 6, 3]
    four = real_config("mbtf", {"num_blocks": 4})
    assert four.vision_feature_layer == [23, 18, 12, 6]
    explicit = real_config("mbtf_stf", vision_feature_layer=[-2, 18, 12, 6])
    assert explicit.vision_feature_layer == [-2, 18, 12, 6]
    assert explicit.projector_kwargs["num_blocks"] == 4
    # Non-MBTF projectors keep LLaVA's penultimate block.
    assert real_config("stf").vision_feature_layer == -2


def test_evenly_spaced_blocks():
    assert evenly_spaced_blocks(24, 8) == [23, 21, 18, 15, 12, 9, 6, 3]
    assert evenly_spaced_blocks(9, 8) == [8, 7, 6, 5, 4, 3, 2, 1]
    with pytest.raises(ProjectorConfigError, match="num_blocks"):
        evenly_spaced_blocks(8, 8)


def test_stf_fusion_width_follows_window():
    assert real_config("stf", {"window": 4}).projector_kwargs["fusion_width"] == 4 * 16 * 1024


def test_stf_fusion_width_override_is_kept():
    config = real_config("stf", {"fusion_width": 4096, "num_align_layers": 2})
    assert config.projector_kwargs["fusion_width"] == 4096
    assert config.projector_kwargs["align_width"] == 4096


# -------------------------------------------------------------------------------------------------------- errors
def test_unknown_projector_type_lists_valid_names(session_tokenizer):
    with pytest.raises(ValueError) as info:
        tiny_config(session_tokenizer, "qformer")
    message = str(info.value)
    assert "qformer" in message
    for name in PROJECTORS:
        assert name in message


@pytest.mark.parametrize("name", list(PROJECTORS))
def test_unknown_projector_kwargs_key_is_named(session_tokenizer, name):
    with pytest.raises(ValueError, match="windw"):
        tiny_config(session_tokenizer, name, {"windw": 2})


@pytest.mark.parametrize("name", WINDOWED)
@pytest.mark.parametrize("window", [3, 5, 16])
def test_window_that_does_not_divide_grid_raises_at_config_time(session_tokenizer, name, window):
    with pytest.raises(ValueError, match="window"):
        tiny_config(session_tokenizer, name, {"window": window})


@pytest.mark.parametrize("name", WINDOWED)
def test_window_5_does_not_divide_the_336px_grid(name):
    with pytest.raises(ValueError, match="window"):
        real_config(name, {"window": 5})


@pytest.mark.parametrize("name", WINDOWED)
@pytest.mark.parametrize("window", [0, -2, 2.0, True])
def test_window_must_be_a_positive_integer(session_tokenizer, name, window):
    with pytest.raises(ValueError, match="window"):
        tiny_config(session_tokenizer, name, {"window": window})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"fused_tokens": 0}, "fused_tokens"),
        ({"fusion_width": 100, "fused_tokens": 3}, "fused_tokens"),
        ({"num_align_layers": 0}, "num_align_layers"),
        ({"fusion_width": -1}, "fusion_width"),
    ],
)
def test_bad_stf_settings_name_the_field(session_tokenizer, kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(session_tokenizer, "stf", kwargs)


@pytest.mark.parametrize("name", ["mbtf", "mbtf_stf"])
def test_mbtf_with_too_few_vision_blocks_errors(session_tokenizer, name):
    # The default 8 blocks need a tower of at least 9 blocks.
    with pytest.raises(ValueError, match="num_blocks"):
        tiny_config(session_tokenizer, name, vision_overrides={"num_hidden_layers": 4})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        tiny_config(session_tokenizer, name, vision_overrides={"num_hidden_layers": 8})
    # Fewer blocks fit a smaller tower.
    config = tiny_config(session_tokenizer, name, {"num_blocks": 2}, vision_overrides={"num_hidden_layers": 4})
    assert config.vision_feature_layer == [3, 2]


@pytest.mark.parametrize("name", ["mbtf", "mbtf_stf"])
def test_mbtf_num_blocks_must_match_the_layer_list(session_tokenizer, name):
    with pytest.raises(ValueError, match="num_blocks"):
        tiny_config(session_tokenizer, name, {"num_blocks": 3}, vision_feature_layer=[-2, 4])


@pytest.mark.parametrize("layer", [10, -11, [8, 12]])
def test_vision_feature_layer_out_of_range_errors(session_tokenizer, layer):
    with pytest.raises(ValueError, match="vision_feature_layer"):
        tiny_config(session_tokenizer, "mlp2x_gelu", vision_feature_layer=layer)


@pytest.mark.parametrize("name", SPATIAL)
def test_spatial_projector_with_full_strategy_errors(session_tokenizer, name):
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        tiny_config(session_tokenizer, name, vision_feature_select_strategy="full")


@pytest.mark.parametrize("name", NON_SPATIAL)
def test_non_spatial_projector_with_full_strategy_keeps_cls(session_tokenizer, name):
    default = tiny_config(session_tokenizer, name)
    full = tiny_config(session_tokenizer, name, vision_feature_select_strategy="full")
    assert full.num_image_tokens == default.num_image_tokens + 1 == 65


def test_image_size_not_multiple_of_patch_errors(session_tokenizer):
    with pytest.raises(ValueError, match="patch_size"):
        tiny_config(session_tokenizer, "mlp2x_gelu", vision_overrides={"image_size": 30})


def test_projector_config_error_is_a_value_error():
    assert issubclass(ProjectorConfigError, ValueError)


# ----------------------------------------------------------------------------------------------- save / load
ROUND_TRIP = [(name, None) for name in PROJECTORS] + [
    ("stf", {"window": 4, "fused_tokens": 2, "num_align_layers": 2, "final_activation": True}),
    ("mbtf_stf", {"window": 4, "fused_tokens": 4, "block_hidden": 48}),
    ("avgpool", {"window": 8}),
]


@pytest.mark.parametrize(("name", "kwargs"), ROUND_TRIP)
def test_config_save_load_round_trip(session_tokenizer, tmp_path, name, kwargs):
    config = tiny_config(session_tokenizer, name, kwargs)
    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == "llava_stf"
    assert on_disk["projector_type"] == name
    assert on_disk["projector_kwargs"] == config.projector_kwargs  # explicit, resolved numbers
    assert None not in on_disk["projector_kwargs"].values()
    for loaded in (LlavaStfConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is LlavaStfConfig
        assert loaded.projector_type == config.projector_type
        assert loaded.projector_kwargs == config.projector_kwargs
        assert loaded.vision_feature_layer == config.vision_feature_layer
        assert loaded.num_image_tokens == config.num_image_tokens
        assert loaded.image_token_id == config.image_token_id
        assert loaded.projector_shapes() == config.projector_shapes()


def test_saved_mbtf_layers_win_over_the_default(session_tokenizer, tmp_path):
    """A loaded config is rebuilt from the recorded list, not re-derived from the projector's default."""
    config = tiny_config(session_tokenizer, "mbtf_stf", vision_feature_layer=[-2, 5, 1])
    assert config.projector_kwargs["num_blocks"] == 3
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.vision_feature_layer == [-2, 5, 1]
    assert loaded.projector_params().num_blocks == 3


def test_llava_hf_config_dict_loads_as_mlp2x_gelu(tmp_path):
    from transformers import LlavaConfig

    LlavaConfig(vision_config=clip_l_336(), image_token_index=32000).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava"
    loaded = LlavaStfConfig.from_pretrained(tmp_path)
    assert loaded.model_type == "llava_stf"
    assert loaded.projector_type == "mlp2x_gelu"
    assert loaded.vision_feature_layer == -2
    assert loaded.num_image_tokens == 576
    assert loaded.image_token_id == 32000
