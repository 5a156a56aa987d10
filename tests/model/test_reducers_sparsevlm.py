"""SparseVLM inside the LLM: published budgets and schedules, errors naming the field, a per-sample loop-based
reference of the published algorithm, real removal at every stage, KV cache, batching, SDPA / eager, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_stf.flops import count_flops
from llava_stf.generation import GenerationSettings, Generator, Request
from llava_stf.model import LlavaStfConfig, LlavaStfForConditionalGeneration, LlavaStfProcessor
from llava_stf.model.presets import load_preset
from llava_stf.model.reducers import ReducerConfigError, SparseVLM, budget_kwargs, reducer_params
from llava_stf.model.reducers.sparsevlm import cluster, default_layers
from llava_stf.testing import IMAGE_TOKEN, make_image, tiny_model, tiny_processor, tiny_text_config, tiny_vision_config

PROMPTS = [
    f"USER: {IMAGE_TOKEN}\nWhat is shown in the image? ASSISTANT:",
    f"USER: {IMAGE_TOKEN}\nDescribe the image briefly. How many shapes are there? ASSISTANT:",
]
LAYERS = 6
KWARGS = {"layers": [1, 2, 4]}  # drops after layers 0 (raters only), 1, 2 and 4; keep [33, 22, 12] of 64 (192/576)


def config(tokenizer, reducer_kwargs=None, text_model="llama") -> LlavaStfConfig:
    text = tiny_text_config(len(tokenizer), num_hidden_layers=LAYERS).to_dict() | {"model_type": text_model}
    return LlavaStfConfig(
        vision_config=tiny_vision_config(),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_type="mlp2x_gelu",
        reducer_type="sparsevlm" if reducer_kwargs is not None else None,
        reducer_kwargs=reducer_kwargs,
    )


@pytest.fixture
def setup(tokenizer):
    """(baseline model, SparseVLM factory with the same weights, processor)."""
    tokenizer.padding_side = "left"
    base = tiny_model(config(tokenizer))

    def sparse(attn="sdpa", **kwargs):
        model = tiny_model(config(tokenizer, kwargs))
        model.load_state_dict(base.state_dict())
        model.set_attn_implementation(attn)
        return model

    return base, sparse, tiny_processor(base.config, tokenizer)


# ----------------------------------------------------------------------------------------- settings and budgets
@pytest.mark.parametrize(
    ("tokens", "keep", "after"),
    [(64, [66, 30, 17], [82, 32, 18]), (96, [238, 48, 26], [249, 55, 27]), (128, [303, 110, 36], [312, 117, 39]),
     (192, [300, 200, 110], [309, 204, 113])],
)  # fmt: skip
def test_budgets_are_the_published_schedules_on_the_7b_preset(tokens, keep, after):
    shapes = load_preset("llava-v1.5-7b").reducer_shapes()
    kwargs = budget_kwargs("sparsevlm", tokens, shapes)
    assert kwargs == {"layers": [2, 6, 15], "keep": keep, "recycle": 0.3, "cluster_size": 10}
    # recycled merged tokens stay: kept + int((int(0.3 d) + 1) / 10) + 1 after each stage (d deleted)
    params = reducer_params("sparsevlm", kwargs, shapes)
    assert SparseVLM.llm_schedule(params, shapes, 576) == [(0, 576), (3, after[0]), (7, after[1]), (16, after[2])]
    nominal = (2 * 576 + 4 * keep[0] + 10 * keep[1] + 16 * keep[2]) / 32  # the paper's count ("2*576 4*300 ...")
    assert nominal == pytest.approx(tokens, rel=0.03)


def test_other_budgets_interpolate_and_scale():
    shapes = load_preset("llava-v1.5-7b").reducer_shapes()
    assert budget_kwargs("sparsevlm", 160, shapes)["keep"] == [302, 155, 73]  # halfway between 128 and 192
    assert budget_kwargs("sparsevlm", 576, shapes)["keep"] == [576, 576, 576]
    stf = load_preset("llava-stf-7b").reducer_shapes()  # 144 tokens: 48 of 144 is 192 of 576
    assert stf.projector_tokens == 144 and budget_kwargs("sparsevlm", 48, stf)["keep"] == [75, 50, 28]
    for bad in (0, 577):
        with pytest.raises(ReducerConfigError, match=rf"token budget {bad} for reducer_type 'sparsevlm'.*1\.\.576"):
            budget_kwargs("sparsevlm", bad, shapes)


def test_layers_scale_with_depth():
    depths = {1: [], 2: [0], 4: [0, 1, 2], 6: [0, 1, 2], 8: [0, 1, 3], 16: [1, 3, 7], 32: [2, 6, 15], 40: [2, 6, 15]}
    assert {depth: default_layers(depth) for depth in depths} == depths


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": [1, 5]}, r"reducer_kwargs\.layers must be .* in 0\.\.4 .*num_hidden_layers is 6\), got \[1, 5\]"),
        ({"layers": [2, 1, 3]}, r"reducer_kwargs\.layers must be a list of strictly increasing"),
        ({"keep": [10, -1, 2]}, r"reducer_kwargs\.keep must be a list of counts >= 0"),
        ({"layers": [1, 2], "keep": [9, 5, 1]}, r"reducer_kwargs\.keep has 3 counts but there are 2 scoring layers"),
        ({"recycle": 1.5}, r"reducer_kwargs\.recycle must be a number in \[0, 1\]"),
        ({"cluster_size": 0}, r"reducer_kwargs\.cluster_size must be an integer >= 1"),
        ({"rank": True}, r"unknown field\(s\) \['rank'\]"),
    ],
)
def test_bad_settings_name_the_field(tokenizer, kwargs, message):
    with pytest.raises(ReducerConfigError, match=message):
        config(tokenizer, kwargs)


def test_needs_a_llama_decoder(tokenizer):
    with pytest.raises(ReducerConfigError, match=r"text_config\.model_type is 'qwen2'"):
        config(tokenizer, {}, text_model="qwen2")


# ------------------------------------------------------------------------------ the reference (one sample, loops)
def reference_cluster(x: torch.Tensor, c: int) -> tuple[list[int], list[int]]:
    """DPC-kNN as published (k = c neighbours, self included), ties to the earlier (better-scored) token."""
    m = len(x)
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(x.shape[1]) for j in range(m)] for i in range(m)]
    rho = [math.exp(-sum(d * d for d in sorted(dist[i])[:c]) / c) for i in range(m)]
    far = max(max(row) for row in dist)
    delta = [min([dist[i][j] for j in range(m) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)], default=far)
             for i in range(m)]  # fmt: skip
    centres = sorted(range(m), key=lambda i: (-delta[i] * rho[i], i))[:c]
    assign = [centres.index(i) if i in centres else min(range(c), key=lambda k: (dist[i][centres[k]], k))
              for i in range(m)]  # fmt: skip
    return centres, assign


def reference(model, inputs, layers, keep, recycle=0.3, cluster_size=10):
    """SparseVLM on one prompt, layer by layer with the stock modules and eager attention weights.

    Returns:
        logits ``[T_final, V]`` of the survivors and the surviving original positions after each scoring layer.
    """
    lm, ids = model.model.language_model, inputs["input_ids"][0]
    image = (ids == model.config.image_token_id).tolist()
    features = torch.cat(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
    hidden = model.get_input_embeddings()(ids[None]).masked_scatter(torch.tensor(image)[None, :, None], features)
    pictures = [p for p in range(len(ids)) if image[p]]
    after = [p for p in range(max(pictures) + 1, len(ids))]
    m = (hidden[0, pictures] @ hidden[0, after].T).softmax(dim=-1).mean(dim=0)
    raters = [p for p, v in zip(after, m.tolist()) if v > m.mean()]
    alive, survivors = list(range(len(ids))), []
    for i, layer in enumerate(lm.layers):
        n, pos = len(alive), torch.tensor(alive)[None]
        rope = lm.rotary_emb(hidden, pos)
        mask = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]
        out = layer(hidden, attention_mask=mask, position_embeddings=rope, position_ids=pos)
        if i in layers:
            _, weights = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=rope, attention_mask=mask)
            probs = weights[0].mean(dim=0)  # [n, n]
            vis = [j for j in range(n) if image[alive[j]]]
            score = probs[[alive.index(p) for p in raters]][:, vis].mean(dim=0).tolist()
            ranked = sorted(range(len(vis)), key=lambda j: (-score[j], j))
            k = min(keep[layers.index(i)], len(vis) - 1)
            r = int((len(vis) - k) * recycle) + 1
            recycled = [vis[j] for j in ranked[k : k + r]]
            centres, assign = reference_cluster(out[0, recycled], int(r / cluster_size) + 1)
            out = out.clone()
            for c, centre in enumerate(centres):
                members = [recycled[j] for j in range(r) if assign[j] == c]
                out[0, recycled[centre]] = out[0, members].sum(dim=0) / (len(members) + 1e-6)
            slots = sorted([j for j in range(n) if not image[alive[j]]] + [vis[j] for j in ranked[:k]]
                           + [recycled[c] for c in centres])  # fmt: skip
            alive, out = [alive[j] for j in slots], out[:, slots]
            survivors.append(alive)
        hidden = out
    return model.lm_head(lm.norm(hidden))[0], survivors


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kwargs", [KWARGS, {}])  # {}: layers [0, 1, 2] at 6 layers (layer 0 scores and rates)
def test_matches_the_loop_reference(setup, attn, kwargs):
    base, sparse, processor = setup
    base.set_attn_implementation("eager")
    model = sparse(attn, **kwargs)
    layers = kwargs.get("layers", default_layers(LAYERS))
    for seed, prompt in enumerate(PROMPTS):
        inputs = processor(images=[make_image(seed + 1)], text=[prompt])
        with torch.no_grad():
            expected, survivors = reference(base, inputs, layers, [33, 22, 12])
            out = model(**inputs, use_cache=True)
        stages = model.model.language_model.drop_state(out.cache).stages
        assert [s.index[0].tolist() for s in stages if s.layer - 1 in layers] == survivors
        torch.testing.assert_close(out.logits[0, survivors[-1]], expected, rtol=1e-4, atol=1e-5)


def test_cluster_matches_the_reference_with_ties():
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(0))
    x[5] = x[2]  # identical tokens tie in density
    for c in (1, 2, 3):
        centres, assign = cluster(x, c)
        assert (centres.tolist(), assign.tolist()) == reference_cluster(x, c)


# ---------------------------------------------------------------------------------------- the LLM and generation
def layer_lengths(model, inputs):
    lengths = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
             for layer in model.model.language_model.layers]  # fmt: skip
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    for hook in hooks:
        hook.remove()
    return lengths, out.cache


def test_tokens_are_removed_at_every_stage_and_cache_shrinks(setup):
    _, sparse, processor = setup
    inputs = processor(images=[make_image(1), make_image(2)], text=PROMPTS)
    lengths, cache = layer_lengths(sparse(**KWARGS), inputs)
    t = inputs["input_ids"].shape[1]  # 64 image tokens -> 33 + 2 merged, 22 + 1, 12 + 1
    assert lengths == [t, t, t - 29, t - 41, t - 41, t - 51]
    assert [cache.get_seq_length(i) for i in range(LAYERS)] == lengths


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generation_with_and_without_kv_cache_gives_the_same_tokens(setup, attn):
    _, sparse, processor = setup
    model = sparse(attn, **KWARGS)
    inputs = processor(images=[make_image(1), make_image(2)], text=PROMPTS)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_batch_with_a_text_only_row_equals_each_alone(setup):
    _, sparse, processor = setup
    model = sparse(**KWARGS)
    text_only = "USER: What is two plus two? Answer with one long sentence. ASSISTANT:"
    rows = [([make_image(1)], PROMPTS[0]), ([make_image(2)], PROMPTS[1]), ([], text_only)]
    batch = processor(images=[make_image(1), make_image(2)], text=[p for _, p in rows])
    kwargs = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        both = model.generate(**batch, **kwargs)
        logits = model(**batch).logits[:, -1]
        for row, (images, prompt) in enumerate(rows):
            alone = processor(images=images or None, text=[prompt])
            assert both[row, -6:].tolist() == model.generate(**alone, **kwargs)[0, -6:].tolist()
            torch.testing.assert_close(logits[row], model(**alone).logits[0, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs", [KWARGS, {"layers": [0, 3], "keep": [40, 5], "recycle": 0.0}])
def test_flops_match_flop_counter_mode(tokenizer, kwargs):
    model = tiny_model(config(tokenizer, kwargs))
    model.set_attn_implementation("eager")  # FlopCounterMode sees the attention matmuls only in eager mode
    inputs = tiny_processor(model.config, tokenizer)(images=[make_image(0)], text=PROMPTS[:1])
    n_text = inputs["input_ids"].shape[1] - model.config.num_image_tokens
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs, logits_to_keep=1)
    report = count_flops(model.config, n_text)
    assert counter.get_total_flops() == report.full and report.reducer > 0


def test_a_trained_checkpoint_generates_through_the_generator(tmp_path, tokenizer):
    tiny_model(config(tokenizer)).save_pretrained(tmp_path)
    tiny_processor(config(tokenizer), tokenizer).save_pretrained(tmp_path)
    saved = LlavaStfConfig.from_pretrained(tmp_path)
    reduced = saved.with_reducer("sparsevlm", budget_kwargs("sparsevlm", 16, saved.reducer_shapes()))
    assert reduced.reducer_kwargs["keep"] == [34, 15, 6]  # retain 144 of 576, scaled to 64 tokens
    model = LlavaStfForConditionalGeneration.from_pretrained(tmp_path, config=reduced).eval()
    generator = Generator(model, LlavaStfProcessor.from_pretrained(tmp_path))
    requests = [Request.single("What is shown?", make_image(1)), Request.single("Describe the image.", make_image(2))]
    both = generator.generate(requests, GenerationSettings(max_new_tokens=5))
    assert both == [generator.generate([r], GenerationSettings(max_new_tokens=5))[0] for r in requests]


def test_trains_with_gradient_checkpointing_like_without(setup):
    base, sparse, processor = setup
    inputs = processor(images=[make_image(1), make_image(2)], text=PROMPTS)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == base.config.image_token_id, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    losses, grads = [], []
    for checkpointing in (False, True):
        model = sparse(**KWARGS).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = model(**inputs, labels=labels)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(model.model.multi_modal_projector.linear_1.weight.grad)  # flows through the merged tokens too
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sdpa_fp32_and_bf16(setup):
    _, sparse, processor = setup
    inputs = processor(images=[make_image(1), make_image(2)], text=PROMPTS).to("cuda")
    model = sparse(**KWARGS).to("cuda")
    kwargs = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, **kwargs), model.generate(**inputs, **kwargs, use_cache=False))
        model.to(torch.bfloat16)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        lengths, cache = layer_lengths(model, inputs)
        assert torch.isfinite(model(**inputs).logits[:, -1]).all()
        model.generate(**inputs, **kwargs)
    t = inputs["input_ids"].shape[1]
    assert lengths == [t, t, t - 29, t - 41, t - 41, t - 51]
    assert [cache.get_seq_length(i) for i in range(LAYERS)] == lengths
