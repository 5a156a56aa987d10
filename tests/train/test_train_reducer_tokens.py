"""A training config names a reducer by its token budget: ``reducer_type: fastv`` + ``reducer_tokens: 16`` (issue 13).

The budget goes through the registry's ``budget_kwargs`` (the method's own rule) into the saved config; combined
with explicit ``reducer_kwargs``, without a ``reducer_type``, or beyond what the reducer can take, it is an error
naming the field.
"""

from __future__ import annotations

import pytest

from llava_stf.errors import UserError
from llava_stf.model.reducers import ReducerConfigError
from llava_stf.train.arguments import parse_config
from llava_stf.train.fixtures import tiny_run_args
from llava_stf.train.run import build
from llava_stf.train.stages import get_stage


def _config(world, tmp_path, yaml_text: str):
    path = tmp_path / "lora.yaml"
    path.write_text(yaml_text)
    args = tiny_run_args(world.towers, world.instruct, tmp_path / "out", "lora", projector_type="mlp2x_gelu")
    return parse_config(["--config", str(path), *args])


def test_a_lora_config_names_the_reducer_by_its_budget(world, tmp_path):
    config = _config(world, tmp_path, "reducer_type: fastv\nreducer_tokens: 16\n")
    assert (config.model.reducer_type, config.model.reducer_tokens, config.model.reducer_kwargs) == ("fastv", 16, None)
    model, processor = build(config, get_stage("lora"))
    assert model.config.reducer_kwargs == {"k": 2, "r": 0.75}  # FastV: keep 16 of the 64 tokens after layer K=2
    assert processor.num_image_tokens == model.config.num_image_tokens == 64


@pytest.mark.parametrize(
    ("yaml_text", "error", "message"),
    [
        ("reducer_type: fastv\nreducer_tokens: 16\nreducer_kwargs: {k: 3}\n", UserError, "give reducer_tokens or"),
        ("reducer_tokens: 16\n", UserError, "reducer_tokens=16 needs a reducer_type"),
        ("reducer_type: fastv\nreducer_tokens: 0\n", UserError, "reducer_tokens must be a positive number"),
    ],
)
def test_budget_mistakes_are_named(world, tmp_path, yaml_text, error, message):
    with pytest.raises(error, match=message):
        _config(world, tmp_path, yaml_text)


@pytest.mark.parametrize(
    ("reducer", "tokens", "message"),
    [("fastv", 65, "token budget 65 for reducer_type 'fastv' must be an integer in 1..64"),
     ("prumerge", 16, "reducer_type 'prumerge' has no token budget")],
)  # fmt: skip
def test_a_budget_the_reducer_cannot_take_is_refused_at_build(world, tmp_path, reducer, tokens, message):
    config = _config(world, tmp_path, f"reducer_type: {reducer}\nreducer_tokens: {tokens}\n")
    with pytest.raises(ReducerConfigError, match=message):
        build(config, get_stage("lora"))
