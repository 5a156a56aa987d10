"""Token reducers on AnyRes (LLaVA-NeXT): every image has its own token count (crops x per-crop tokens).

- In-LLM reducers (FastV, DART, PyramidDrop, SparseVLM) keep the full AnyRes prompt and drop inside the LLM: each
  layer's input length follows the reducer's schedule for *that image's* count (the count ``llava_stf.flops`` uses),
  FastV / DART keep the fraction ``budget / crop tokens``, batches of different image sizes (left padded) give the
  tokens of one-by-one runs, and the KV cache does not change them.
- Vision-side reducers (VisionZip, FasterVLM, VisPruner, DivPrune, random, pool) reduce each crop to the budget:
  crops x budget tokens per image, no newlines, the same count from the model, the config and the processor; VisionZip's
  kept tokens per crop equal a loop-based reference of its rule.

Tiny AnyRes model: 56-px crops, 8x8 patches, ``mlp2x_gelu`` (64 tokens per crop), a 4-layer LLM (FastV's K = 2 drops).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_stf.model import LlavaStfNextConfig, LlavaStfNextProcessor
from llava_stf.model.reducers import REDUCERS, MacDims, ReducerConfigError, budget_kwargs, get_reducer_class
from llava_stf.reducer_choice import ReducerChoice, reducer_variant
from llava_stf.testing import (
    IMAGE_TOKEN,
    TINY_NEXT_CROP,
    TINY_NEXT_PATCH,
    TINY_PINPOINTS,
    make_image,
    tiny_next_model,
    tiny_next_processor,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)

LLM_REDUCERS = ["fastv", "dart", "pyramiddrop", "sparsevlm"]
LLM_BUDGETS = {"pyramiddrop": 24}  # with 4 layers PyramidDrop's layer average is at least 16 (all gone after 1)
VISION_REDUCERS = ["visionzip", "fastervlm", "vispruner", "divprune", "random", "pool"]
BUDGET, CROP_TOKENS = 8, 64  # 8 of the 64 tokens of one crop
# (width, height) -> crops: 112x112: 4 tiles + base; 40x90 (portrait) and 90x40: 2 tiles + base
SIZES = [(112, 112), (40, 90), (90, 40)]
TEXTS = [f"USER: {IMAGE_TOKEN}\nWhat is shown? ASSISTANT:", f"{IMAGE_TOKEN} a short one", f"Look: {IMAGE_TOKEN}\nWhy?"]


@pytest.fixture(scope="module")
def left_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


def next_config(tokenizer, reducer: str | None = None, tokens: int | None = BUDGET, projector: str = "mlp2x_gelu",
                **reducer_kwargs) -> LlavaStfNextConfig:  # fmt: skip
    """The tiny AnyRes config with a 4-layer LLM; ``reducer`` at ``tokens`` per crop (or ``reducer_kwargs``)."""
    config = LlavaStfNextConfig(
        vision_config=tiny_vision_config(image_size=TINY_NEXT_CROP, patch_size=TINY_NEXT_PATCH),
        text_config=tiny_text_config(len(tokenizer), num_hidden_layers=4),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_type=projector,
        image_grid_pinpoints=TINY_PINPOINTS,
    )
    if reducer is None:
        return config
    kwargs = reducer_kwargs or budget_kwargs(reducer, tokens, config.reducer_shapes())
    return config.with_reducer(reducer, kwargs)


def model_and_processor(tokenizer, reducer: str | None, **kwargs):
    config = next_config(tokenizer, reducer, **kwargs)
    processor = tiny_next_processor(config, tokenizer).with_reduced_crops(config.reduced_crop_tokens)
    return tiny_next_model(config), processor


def layer_lengths(model, inputs, **kwargs) -> list[int]:
    """Sequence length entering each decoder layer in one forward call."""
    lengths, hooks = [], []
    for layer in model.model.language_model.layers:
        hook = lambda m, args, kw: lengths.append((args[0] if args else kw["hidden_states"]).shape[1])  # noqa: E731
        hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return lengths


def generate(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False, **kwargs)[:, -4:]


# ------------------------------------------------------------------------------------------------ in the LLM


@pytest.mark.parametrize("name", LLM_REDUCERS)
def test_llm_reducers_drop_by_each_images_own_count(name, left_tokenizer):
    model, processor = model_and_processor(left_tokenizer, name, tokens=LLM_BUDGETS.get(name, BUDGET))
    config, cls = model.config, get_reducer_class(name)
    assert config.reduced_crop_tokens is None and config.num_image_tokens == CROP_TOKENS  # the prompt is unreduced
    for width, height in SIZES:
        n = config.image_token_count(height, width)
        inputs = processor(images=[make_image(width, (width, height))], text=TEXTS[0])
        total = inputs["input_ids"].shape[1]
        assert int((inputs["input_ids"] == config.image_token_id).sum()) == n
        schedule = cls.llm_schedule(config.reducer_params(), config.reducer_shapes(), n)  # what FLOPs count
        bounds = [layer for layer, _ in schedule[1:]] + [4]
        expected = [total - n + count for (start, count), end in zip(schedule, bounds) for _ in range(start, end)]
        assert len(schedule) > 1 and schedule[-1][1] < n  # really drops
        assert layer_lengths(model, inputs) == expected, (name, width, height)
        if name in ("fastv", "dart"):  # keep ratio budget / crop tokens of this image's own count, after layer 2
            assert expected[2:] == [total - n + math.floor(n * BUDGET / CROP_TOKENS + 0.5)] * 2


@pytest.mark.parametrize("name", LLM_REDUCERS)
def test_llm_reducers_batch_equals_one_by_one_and_cache_changes_nothing(name, left_tokenizer):
    model, processor = model_and_processor(left_tokenizer, name, tokens=LLM_BUDGETS.get(name, BUDGET))
    images = [make_image(i, size) for i, size in enumerate(SIZES)]
    batch = processor(images=images, text=TEXTS)
    counts = (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert counts == [model.config.image_token_count(h, w) for w, h in SIZES] == [336, 208, 200]
    assert batch["attention_mask"][:, 0].tolist() != [1, 1, 1]  # left padding in the batch
    cached = generate(model, batch)
    alone = [generate(model, processor(images=[i], text=t))[0] for i, t in zip(images, TEXTS)]
    assert torch.equal(cached, torch.stack(alone))
    assert torch.equal(generate(model, batch, use_cache=False), cached)


# ------------------------------------------------------------------------------------------------ vision side


@pytest.mark.parametrize("name", VISION_REDUCERS)
def test_vision_reducers_leave_the_budget_in_every_crop(name, left_tokenizer):
    model, processor = model_and_processor(left_tokenizer, name)
    config = model.config
    assert config.reduced_crop_tokens == config.num_image_tokens == processor.reduced_crop_tokens == BUDGET
    plain = tiny_next_processor(next_config(left_tokenizer), left_tokenizer)
    images = [make_image(i, size) for i, size in enumerate(SIZES)]
    inputs = processor(images=images, text=TEXTS)
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    expected = [config.num_crops(h, w) * BUDGET for w, h in SIZES]
    assert expected == [40, 24, 24]  # crops x 8, no newlines
    assert [len(f) for f in features] == expected == [config.image_token_count(h, w) for w, h in SIZES]
    assert processor.image_token_counts(images) == expected
    assert all(e < plain.image_token_count(h, w) for e, (w, h) in zip(expected, SIZES))  # really fewer
    lengths = layer_lengths(model, inputs)  # the LLM's input: text + reduced image tokens, in every layer
    assert lengths == [inputs["input_ids"].shape[1]] * 4
    assert (inputs["input_ids"] == config.image_token_id).sum(dim=1).tolist() == expected


@pytest.mark.parametrize("name", VISION_REDUCERS)
def test_vision_reducers_batch_equals_one_by_one(name, left_tokenizer):
    model, processor = model_and_processor(left_tokenizer, name)
    images = [make_image(10 + i, size) for i, size in enumerate(SIZES)]
    batch = generate(model, processor(images=images, text=TEXTS))
    alone = [generate(model, processor(images=[i], text=t))[0] for i, t in zip(images, TEXTS)]
    assert torch.equal(batch, torch.stack(alone))


def reference_visionzip(x, cls_x, h, block, dominant: int, contextual: int) -> torch.Tensor:
    """One crop by the published rule, with loops in float64.

    Args: ``x [N, C_in]`` patch features, ``cls_x [C_in]`` CLS feature, ``h [N + 1, C]`` the scoring block's input.
    """
    attn = block.self_attn
    with torch.no_grad():
        normed = block.layer_norm1(h).double()
        q = normed[0] @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()
        k = normed @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()
    heads, n = attn.num_heads, len(h) - 1
    d = h.shape[-1] // heads
    score, metric = [0.0] * n, torch.zeros(n, d, dtype=torch.float64)
    for head in range(heads):
        part = slice(head * d, (head + 1) * d)
        probs = torch.softmax(torch.stack([q[part] @ k[j, part] for j in range(n + 1)]) / math.sqrt(d), dim=0)
        score = [s + float(p) for s, p in zip(score, probs[1:])]  # summed over heads
        metric += k[1:, part] / heads
    metric = metric / metric.norm(dim=-1, keepdim=True)
    ranked = sorted(range(n), key=lambda p: (-score[p], p))
    top = sorted(ranked[: dominant - 1])
    rest = [p for p in range(n) if p not in top]
    step = max(1, len(rest) // contextual)
    targets = list(range(0, len(rest), step))[:contextual]
    groups = {t: [] for t in targets}
    for i, p in enumerate(rest):
        if i not in targets:
            sims = [float(metric[p] @ metric[rest[t]]) for t in targets]
            groups[targets[sims.index(max(sims))]].append(p)
    rows = [cls_x] + [x[p] for p in top]
    for t in targets:
        merged = torch.stack([x[p] for p in groups[t]]).mean(0) if groups[t] else torch.zeros_like(x[0])
        rows.append(x[rest[t]] + merged)
    return torch.stack(rows)


def test_visionzip_keeps_per_crop_what_a_loop_reference_keeps(left_tokenizer):
    model, processor = model_and_processor(left_tokenizer, "visionzip", dominant=10, contextual=6)
    images = [make_image(20, (112, 112)), make_image(21, (40, 90))]
    inputs = processor(images=images, text=TEXTS[:2])
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    inner = model.model
    block = inner.vision_tower.encoder.layers[-2]  # upstream attentions[-2]: the block that consumes state -3
    for image, pixels, got in zip(images, inputs["pixel_values"], features):
        crops = pixels[: model.config.num_crops(image.height, image.width)]  # base image first, then the tiles
        with torch.no_grad():
            hidden = inner.vision_tower(crops, output_hidden_states=True).hidden_states
            expected = torch.cat([
                inner.multi_modal_projector(reference_visionzip(hidden[-2][c, 1:], hidden[-2][c, 0], hidden[-3][c],
                                                                block, 10, 6)[None].float())[0]
                for c in range(len(crops))
            ])  # fmt: skip
        assert got.shape == (len(crops) * 16, model.config.text_config.hidden_size)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.isclose(got, inner.image_newline).all(-1).any()  # no newline among them


@pytest.mark.parametrize("name", ["visionzip", "fastervlm", "vispruner", "divprune"])
def test_vision_reducer_macs_are_per_crop(name, left_tokenizer):
    """What ``llava_stf.flops`` must count on AnyRes: ``own_macs`` (one crop) times the image's crops."""
    model, processor = model_and_processor(left_tokenizer, name, tokens=16)
    config, inner = model.config, model.model
    image = make_image(40, (112, 112))
    crops = processor.image_inputs([image])["pixel_values"][0, : config.num_crops(112, 112)]
    with torch.no_grad():
        hidden = inner.vision_tower(crops, output_hidden_states=True).hidden_states
    block = inner.reducer.block_index(len(hidden) - 1)
    extra = {"cls_features": hidden[-2][:, 0]} if inner.reducer.needs_cls_features else {}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        inner.reducer(hidden[-2][:, 1:], hidden[block], inner.vision_tower.encoder.layers[block], **extra)
    vision, text = config.vision_config, config.text_config
    dims = MacDims(vision.hidden_size, vision.num_attention_heads, config.projector_shapes().in_channels,
                   text.hidden_size, 32, text.num_attention_heads, 0, 16)  # fmt: skip
    macs = get_reducer_class(name).own_macs(config.reducer_params(), config.reducer_shapes(), dims)
    assert macs > 0 and counter.get_total_flops() == 2 * macs * len(crops) == 2 * macs * 5


# ------------------------------------------------------------------------------------------- config, processor


def test_adaptive_reducers_are_refused_naming_the_ones_that_work(session_tokenizer):
    supported = sorted(name for name, cls in REDUCERS.items() if not cls.adaptive)
    assert set(VISION_REDUCERS + LLM_REDUCERS) <= set(supported)
    for name in ("prumerge", "prumerge_plus"):
        with pytest.raises(ReducerConfigError, match=rf"'{name}' gives each crop its own adaptive.*{supported!r}"):
            next_config(session_tokenizer).with_reducer(name)
    with pytest.raises(ReducerConfigError, match="projector_type 'mbtf_stf' merges the"):  # a grid-merging projector
        next_config(session_tokenizer, "visionzip", projector="mbtf_stf")


def test_budgets_are_per_crop(session_tokenizer):
    config = next_config(session_tokenizer)
    fastv = ReducerChoice("fastv", tokens=16).resolve(config)
    assert fastv.kwargs["r"] == 1 - 16 / 64 and fastv.config.image_token_count(112, 112) == 336  # unreduced prompt
    assert fastv.describe().endswith("64 image tokens per crop")
    zipped = ReducerChoice("visionzip", tokens=16).resolve(config)
    assert zipped.config.image_token_count(112, 112) == 5 * 16
    assert zipped.describe().endswith("16 image tokens per crop")
    with pytest.raises(ReducerConfigError, match=r"token budget 65 .* must be an integer in 1\.\.64"):
        ReducerChoice("fastv", tokens=65).resolve(config)


def test_processor_saves_the_reduced_count(tmp_path, session_tokenizer):
    config = next_config(session_tokenizer, "visionzip")
    assert tiny_next_processor(config, session_tokenizer).reduced_crop_tokens == 8  # the test kit follows the config
    processor = tiny_next_processor(config, session_tokenizer).with_reduced_crops(None)  # a checkpoint's own one
    assert processor.reduced_crop_tokens is None and processor.image_token_count(112, 112) == 336
    reduced = processor.with_reduced_crops(config.reduced_crop_tokens)
    assert (reduced.num_image_tokens, reduced.image_token_count(112, 112), processor.num_image_tokens) == (8, 40, 64)
    reduced.save_pretrained(tmp_path)
    loaded = LlavaStfNextProcessor.from_pretrained(tmp_path)
    assert loaded.reduced_crop_tokens == 8 and loaded.num_image_tokens == 8 and loaded.image_token_count(40, 90) == 24
    assert loaded.with_reduced_crops(None).image_token_count(112, 112) == 336
    with pytest.raises(ValueError, match=r"num_image_tokens=64 disagrees with reduced_crop_tokens \(8 per crop\)"):
        LlavaStfNextProcessor(processor.image_processor, session_tokenizer, [8, 8, 1], 64, reduced_crop_tokens=8)
    with pytest.raises(ValueError, match="reduced_crop_tokens must be None or a positive integer, got 0"):
        processor.with_reduced_crops(0)


def test_reducer_variant_shares_weights_and_equals_a_built_model(left_tokenizer):
    base, processor = model_and_processor(left_tokenizer, None)
    images = [make_image(30, (112, 112)), make_image(31, (90, 40))]
    for name in ("visionzip", "fastv"):
        config = ReducerChoice(name, tokens=BUDGET).resolve(base.config).config
        variant, variant_processor = reducer_variant(base, processor, config)
        assert variant.model.image_newline is base.model.image_newline
        assert variant_processor.reduced_crop_tokens == config.reduced_crop_tokens
        built = tiny_next_model(config)  # same seed: the same weights
        inputs = variant_processor(images=images, text=TEXTS[:2])
        with torch.no_grad():
            torch.testing.assert_close(variant(**inputs).logits, built(**inputs).logits, rtol=0, atol=0)


def test_other_feature_layers_are_refused_with_a_vision_reducer(left_tokenizer):
    model, processor = model_and_processor(left_tokenizer, "fastervlm")
    inputs = processor(images=[make_image(0, (56, 56))], text=TEXTS[0])
    with pytest.raises(ValueError, match=r"vision_feature_layer=-3 is not supported with reducer_type 'fastervlm'"):
        model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=-3)
