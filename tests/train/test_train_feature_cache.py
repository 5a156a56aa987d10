"""``--vision_feature_cache_mb`` / ``--image_cache_mb``: the same training, each image's tower pass done once."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionModel

from llava_stf.testing import tiny_vision_config
from llava_stf.train.arguments import parse_config
from llava_stf.train.feature_cache import TowerFeatureCache, check_cacheable
from llava_stf.train.fixtures import tiny_run_args
from llava_stf.train.run import run


def frozen_tower(**overrides) -> CLIPVisionModel:
    torch.manual_seed(0)
    return CLIPVisionModel(tiny_vision_config(**overrides)).requires_grad_(False)


def pixels(n: int, seed: int) -> torch.Tensor:
    config = tiny_vision_config()
    return torch.randn(n, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(seed))


def assert_same(a, b, exact: bool = True) -> None:
    """Equal outputs; ``exact=False``: equal up to float rounding (an image computed in another batch)."""
    assert a.keys() == b.keys()
    for name in a.keys():
        x, y = a[name], b[name]
        pairs = list(zip(x, y)) if isinstance(x, tuple) else [(x, y)]
        assert [s is None for s, _ in pairs] == [t is None for _, t in pairs]
        for s, t in pairs:
            if s is not None:
                assert torch.equal(s, t) if exact else torch.allclose(s, t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hidden", [True, [2, 1]])  # a list: transformers 5.x asks for the selected layers only
def test_cached_outputs_equal_the_towers_and_skip_its_pass(hidden) -> None:
    tower = frozen_tower()
    first, second = pixels(4, 0), pixels(4, 1)
    want = tower(first, output_hidden_states=hidden, return_dict=True)
    cache = TowerFeatureCache(tower, limit_mb=64).install()
    calls = []
    original = cache.original
    cache.original = lambda *a, **k: calls.append(1) or original(*a, **k)
    got1 = tower(first, output_hidden_states=hidden, return_dict=True, num_items_in_batch=torch.tensor(7))
    got2 = tower(first.flip(0), output_hidden_states=hidden, return_dict=True, num_items_in_batch=torch.tensor(9))
    assert len(calls) == 1 and (cache.hits, cache.misses) == (4, 4)  # the batch in another order: all cached
    assert_same(got1, want)
    plain = tower.__class__.forward(tower, first.flip(0), output_hidden_states=hidden, return_dict=True)
    assert_same(got2, plain, exact=False)
    tower(second, output_hidden_states=hidden, return_dict=True)
    tower(first, output_hidden_states=False, return_dict=True)  # other arguments: another entry
    assert len(calls) == 3
    cache.remove()
    assert "forward" not in tower.__dict__


def test_a_batch_with_one_new_image_runs_the_tower_and_other_tensor_arguments_are_not_cached() -> None:
    tower = frozen_tower()
    cache = TowerFeatureCache(tower, limit_mb=64).install()
    tower(pixels(3, 0), output_hidden_states=True)
    mixed = torch.cat([pixels(3, 0)[:2], pixels(1, 5)])
    plain = tower.__class__.forward(tower, mixed, output_hidden_states=True)
    assert_same(tower(mixed, output_hidden_states=True), plain, exact=False)
    assert (cache.hits, cache.misses, len(cache.memo.entries)) == (0, 6, 4)
    tower(pixels(2, 0), interpolate_pos_encoding=False, output_hidden_states=True)
    assert len(cache.memo.entries) == 6


def test_the_memory_bound_is_kept() -> None:
    tower = frozen_tower()
    one = TowerFeatureCache(tower, limit_mb=64).install()
    tower(pixels(1, 0), output_hidden_states=True)
    one.remove()
    per_image = one.memo.used
    cache = TowerFeatureCache(tower, limit_mb=2.5 * per_image / 2**20).install()
    tower(pixels(4, 0), output_hidden_states=True)
    assert len(cache.memo.entries) == 2 and cache.memo.used <= cache.memo.limit
    tower(pixels(4, 1), output_hidden_states=True)
    assert len(cache.memo.entries) == 2


def test_a_tower_that_trains_or_has_dropout_is_refused() -> None:
    with pytest.raises(ValueError, match="frozen"):
        check_cacheable(frozen_tower().requires_grad_(True))
    with pytest.raises(ValueError, match="deterministic.*attention_dropout"):
        check_cacheable(frozen_tower(attention_dropout=0.1))
    with pytest.raises(ValueError, match="> 0"):
        TowerFeatureCache(frozen_tower(), limit_mb=-1)


@pytest.mark.parametrize(
    "stage, data, checkpointing", [("pretrain", "captions", True), ("finetune", "instruct", False)]
)
def test_a_run_with_both_caches_trains_exactly_as_without(world, tmp_path, stage, data, checkpointing) -> None:
    def train(name: str, **caches) -> list[float]:
        argv = tiny_run_args(world.towers, getattr(world, data), tmp_path / name, stage, num_train_epochs=3,
                             activation_checkpointing=checkpointing, **caches)  # fmt: skip
        trainer = run(parse_config(argv), quiet=True)
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    plain = train("plain")
    cached = train("cached", image_cache_mb=64, vision_feature_cache_mb=64)
    assert cached == plain and len(plain) >= 12


def test_a_negative_cache_size_is_one_error_line(world, tmp_path) -> None:
    from llava_stf.train.run import main

    argv = tiny_run_args(world.towers, world.captions, tmp_path / "out", "pretrain", vision_feature_cache_mb=-1)
    assert main(argv) == 1


def test_the_caches_may_change_on_resume_and_keep_a_demo_stage_reused() -> None:
    from llava_stf.train.output_dir import config_differences

    saved = {"data": {"image_cache_mb": 0, "vision_feature_cache_mb": 0, "model_max_length": 512}}
    current = {"data": {"image_cache_mb": 64, "vision_feature_cache_mb": 64, "model_max_length": 512}}
    assert config_differences(saved, current) == {}
    current["data"]["model_max_length"] = 256
    assert list(config_differences(saved, current)) == ["data.model_max_length"]


def test_zero3_is_refused_with_the_reason(monkeypatch) -> None:
    from llava_stf.train import feature_cache

    monkeypatch.setattr(feature_cache, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match="ZeRO-3.*collective"):
        feature_cache.check_cache_settings(0, 64)
    feature_cache.check_cache_settings(64, 0)  # the image cache is the data's own: fine under ZeRO-3
    with pytest.raises(ValueError, match="image_cache_mb must be >= 0"):
        feature_cache.check_cache_settings(-1, 0)
