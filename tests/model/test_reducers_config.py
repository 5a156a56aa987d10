"""Reducers chosen by config: registry, validation with errors naming the field, invalid projector / reducer
combinations, ``config.json`` round trip, placeholder counts, and checkpoints unchanged by a reducer."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import CLIPVisionConfig

from llava_stf.model import LlavaStfConfig, LlavaStfForConditionalGeneration
from llava_stf.model.reducers import REDUCERS, ReducerConfigError
from llava_stf.testing import tiny_config, tiny_model

VISION_336 = CLIPVisionConfig(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
)


def real_config(**kwargs) -> LlavaStfConfig:
    return LlavaStfConfig(vision_config=VISION_336, **kwargs)


def test_registry_lists_valid_names_on_a_typo():
    names = re.escape(str(sorted(REDUCERS)))  # every registered name, whichever reducers the registry holds
    with pytest.raises(ReducerConfigError, match=rf"unknown reducer_type 'fastv2'.*{names}"):
        real_config(reducer_type="fastv2")
    lab = "visionzip fastervlm vispruner divprune random pool fastv dart pyramiddrop sparsevlm prumerge prumerge_plus"
    assert set(lab.split()) <= set(REDUCERS)


@pytest.mark.parametrize(
    ("projector", "reducer", "placeholders"),
    [
        ("mlp2x_gelu", None, 576),
        ("mlp2x_gelu", "prumerge", 145),  # at most 144 IQR outliers of 576, plus the extra token
        ("mlp2x_gelu", "prumerge_plus", 577),  # the uniform supplement can reach every patch
        ("mbtf", "prumerge", 145),
        ("mlp2x_gelu", "fastv", 576),  # FastV drops inside the LLM: the processor writes them all
        ("mbtf_stf", "fastv", 144),
    ],
)
def test_placeholder_counts_at_336_px(projector, reducer, placeholders):
    config = real_config(projector_type=projector, reducer_type=reducer)
    assert config.num_image_tokens == config.image_seq_length == placeholders


@pytest.mark.parametrize("projector", ["mbtf_stf", "stf", "avgpool", "token_concat"])
@pytest.mark.parametrize("reducer", ["prumerge", "prumerge_plus"])
def test_prumerge_refuses_grid_merging_projectors(projector, reducer):
    with pytest.raises(ReducerConfigError, match=rf"reducer_type '{reducer}'.*projector_type '{projector}'"):
        real_config(projector_type=projector, reducer_type=reducer)


@pytest.mark.parametrize(
    ("reducer", "kwargs", "config_kwargs", "message"),
    [
        ("fastv", {"k": 0}, {}, r"reducer_kwargs\.k must be an integer >= 1, got 0"),
        ("fastv", {"r": 1.5}, {}, r"reducer_kwargs\.r must be a number in \[0, 1\], got 1.5"),
        ("fastv", {"K": 2}, {}, r"unknown field\(s\) \['K'\].*valid fields: \['k', 'r'\]"),
        ("prumerge", {"knn": 0}, {}, r"reducer_kwargs\.knn must be an integer >= 1"),
        ("prumerge", {"knn": 576}, {}, r"reducer_kwargs\.knn=576 exceeds the 575 other patches"),
        ("prumerge", {"order": "random"}, {}, r"reducer_kwargs\.order must be one of"),
        ("prumerge", {"attn_layer": -1}, {}, r"reducer_kwargs\.attn_layer=-1 names no hidden state"),
        ("prumerge_plus", {"uniform_divisor": 0}, {}, r"reducer_kwargs\.uniform_divisor"),
        ("prumerge", {}, {"vision_feature_select_strategy": "full"}, r"vision_feature_select_strategy must be"),
    ],
)
def test_bad_settings_name_the_field(reducer, kwargs, config_kwargs, message):
    with pytest.raises(ReducerConfigError, match=message):
        real_config(reducer_type=reducer, reducer_kwargs=kwargs, **config_kwargs)


def test_prumerge_needs_a_clip_tower():
    with pytest.raises(ReducerConfigError, match="needs a CLIP vision tower"):
        LlavaStfConfig(
            vision_config={"model_type": "siglip_vision_model", "image_size": 224, "patch_size": 14},
            reducer_type="prumerge",
        )


def test_fastv_needs_a_llama_decoder():
    with pytest.raises(ReducerConfigError, match=r"text_config\.model_type is 'qwen2'"):
        real_config(text_config={"model_type": "qwen2"}, reducer_type="fastv")


@pytest.mark.parametrize("reducer", sorted(REDUCERS))
def test_config_json_records_resolved_settings(tmp_path, reducer):
    projector = "mbtf" if reducer != "fastv" else "mbtf_stf"
    config = tiny_config(projector_type=projector, reducer_type=reducer)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["reducer_type"] == reducer
    assert saved["reducer_kwargs"] == REDUCERS[reducer].Params().to_kwargs()  # every default written out
    loaded = LlavaStfConfig.from_pretrained(tmp_path)
    assert (loaded.reducer_type, loaded.reducer_kwargs) == (reducer, config.reducer_kwargs)
    assert loaded.num_image_tokens == config.num_image_tokens


def test_with_reducer_validates_and_keeps_the_rest():
    config = real_config(projector_type="mbtf_stf")
    fastv = config.with_reducer("fastv", {"k": 3, "r": 0.75})
    assert fastv.reducer_kwargs == {"k": 3, "r": 0.75} and fastv.projector_kwargs == config.projector_kwargs
    assert fastv.with_reducer(None).reducer_type is None
    with pytest.raises(ReducerConfigError, match="projector_type 'mbtf_stf'"):
        config.with_reducer("prumerge")


def test_reducer_adds_no_weights_so_trained_checkpoints_load(tmp_path):
    base = tiny_model(tiny_config(projector_type="mlp2x_gelu"))
    base.save_pretrained(tmp_path)
    config = LlavaStfConfig.from_pretrained(tmp_path).with_reducer("prumerge")
    model, info = LlavaStfForConditionalGeneration.from_pretrained(tmp_path, config=config, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.reducer_type == "prumerge" and model.model.reducer is not None
    assert set(model.state_dict()) == set(base.state_dict())
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
