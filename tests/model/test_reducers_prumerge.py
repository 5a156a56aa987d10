"""PruMerge / PruMerge+: the IQR selection, the merge against a per-token loop, PruMerge+ positions, batching, and
the model path (each image's own token count written into the prompt; the stock LLaVA forward does the rest)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from llava_stf.data.placeholders import fit_image_placeholders
from llava_stf.generation import GenerationSettings, Generator, Request
from llava_stf.model import LlavaStfConfig, LlavaStfForConditionalGeneration, LlavaStfProcessor
from llava_stf.model.reducers import PruMerge as _PruMerge
from llava_stf.model.reducers import PruMergeParams, PruMergePlusParams, ReducerShapes
from llava_stf.model.reducers import PruMergePlus as _PruMergePlus
from llava_stf.model.reducers.prumerge import max_outliers
from llava_stf.testing import IMAGE_TOKEN, make_image, tiny_config, tiny_model, tiny_processor

# The selection and merge need no model shapes; these describe an 8 x 8 patch grid.
SHAPES = ReducerShapes(8, 8, 4, "clip_vision_model", True, "mlp2x_gelu", 64, True, "llama", 2)


def PruMerge(params):  # noqa: N802 - stands for the class, built with the test's shapes
    return _PruMerge(params, SHAPES)


def PruMergePlus(params):  # noqa: N802
    return _PruMergePlus(params, SHAPES)


class IdentityBlock(nn.Module):
    """Stands in for a CLIP block: ``layer_norm1``, ``q_proj`` and ``k_proj`` are identities, so q = k = input."""

    def __init__(self):
        super().__init__()
        self.layer_norm1 = nn.Identity()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Identity()
        self.self_attn.k_proj = nn.Identity()


def random_inputs(seed: int, scale: float, batch: int = 2, patches: int = 64, width: int = 16, channels: int = 5):
    """Patch features ``[B, N, channels]`` and a scoring input ``[B, N + 1, width]`` (larger scale: peakier)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, patches, channels, generator=g)
    return x, scale * torch.randn(batch, patches + 1, width, generator=g)


def reference_prumerge(x, attn_input, knn, plus=False):
    """Direct per-token transcription of the reference pseudo-code for one image (float64, Python loops)."""
    x, h = x.double(), attn_input.double()
    n_patches, width = x.shape[0], h.shape[1]
    logits = np.array([float(h[0] @ h[j]) for j in range(n_patches + 1)]) / math.sqrt(width)
    probs = np.exp(logits - logits.max())
    a = (probs / probs.sum())[1:]
    q1, q3 = np.percentile(a, [25, 75])
    n = max(int((a > q3 + 1.5 * (q3 - q1)).sum()), 1)
    selected = [int(i) for i in np.argsort(-a, kind="stable")[:n]]
    if plus:
        stride = max((n_patches // n) // 3, 1)
        selected += [p for p in range(0, n_patches - 1, stride) if p not in selected]
    keys = h[1:] / h[1:].norm(dim=-1, keepdim=True)
    rows = []
    for i in selected:
        sims = [float(keys[i] @ keys[j]) if j != i else -math.inf for j in range(n_patches)]
        neighbours = np.argsort(sims, kind="stable")[::-1][:knn]
        rows.append(x[i] + sum(a[j] * x[j] for j in neighbours))
    rows.append(sum((a[j] * x[j] for j in range(n_patches) if j not in selected), torch.zeros_like(x[0])))
    return torch.stack(rows), selected, a


@pytest.mark.parametrize("plus", [False, True])
def test_merged_tokens_equal_a_per_token_computation(plus):
    reducer = PruMergePlus(PruMergePlusParams(knn=8)) if plus else PruMerge(PruMergeParams(knn=8))
    x, h = random_inputs(0, scale=1.0 if plus else 2.0)  # about 20 / 12 tokens kept: neither saturates
    tokens, valid = reducer(x, h, IdentityBlock())
    assert 1 < int(valid.sum(dim=1).min()) and int(valid.sum(dim=1).max()) < 64
    for b in range(2):
        expected, selected, _ = reference_prumerge(x[b], h[b], knn=8, plus=plus)
        assert int(valid[b].sum()) == len(selected) + 1
        assert valid[b, : len(selected) + 1].all() and not valid[b, len(selected) + 1 :].any()
        torch.testing.assert_close(tokens[b, valid[b]].double(), expected, rtol=1e-5, atol=1e-5)


def test_constructed_attention_keeps_exactly_the_iqr_outliers():
    # CLS = e0; patch j has e0-component v_j: a spread of small values plus five planted peaks.
    patches, width = 64, 8
    h = torch.zeros(1, patches + 1, width)
    h[0, 0, 0] = 1.0
    h[0, 1:, 0] = torch.linspace(-0.2, 0.2, patches)
    planted = [3, 17, 40, 41, 60]
    h[0, [p + 1 for p in planted], 0] = torch.tensor([9.0, 12.0, 10.0, 8.0, 11.0])
    h[0, 1:, 1:] = torch.randn(patches, width - 1)  # keys differ, so similarities are not all tied
    x = torch.randn(1, patches, 4)
    reducer = PruMerge(PruMergeParams(knn=4))
    _, selected, a = reference_prumerge(x[0], h[0], knn=4)
    q1, q3 = np.percentile(a, [25, 75])
    assert set(np.nonzero(a > q3 + 1.5 * (q3 - q1))[0].tolist()) == set(planted) == set(selected)  # the peaks
    attn = torch.softmax(h[0, 0] @ h[0].T / math.sqrt(width), dim=-1)[1:][None]
    index, valid, mask = reducer.select(attn)
    assert index[0, valid[0]].tolist() == [17, 60, 40, 3, 41]  # descending attention (published order)
    assert mask[0].nonzero().squeeze(1).tolist() == sorted(planted)
    raster = PruMerge(PruMergeParams(knn=4, order="raster")).select(attn)[0]
    assert raster[0].tolist() == sorted(planted)


def test_flat_attention_keeps_min_tokens():
    attn = torch.full((1, 64), 1 / 65)
    index, valid, _ = PruMerge(PruMergeParams(min_tokens=3)).select(attn)
    assert int(valid.sum()) == 3


def test_prumerge_plus_count_and_positions():
    # n = 4 planted outliers of 64 patches: step = 16, stride = 5, uniform candidates 0, 5, ..., 60 (< 63).
    attn = torch.full((1, 64), 0.01)
    attn[0, 63] = 0.0  # one low value so the quartiles are well defined
    planted = {10: 0.5, 31: 0.4, 45: 0.3, 57: 0.2}  # 10 and 45 are also uniform candidates
    for p, v in planted.items():
        attn[0, p] = v
    index, valid, _ = PruMergePlus(PruMergePlusParams()).select(attn)
    uniform = [0, 5, 15, 20, 25, 30, 35, 40, 50, 55, 60]
    assert index[0, valid[0]].tolist() == [10, 31, 45, 57] + uniform
    assert int(valid.sum()) == 15
    raster = PruMergePlus(PruMergePlusParams(order="raster")).select(attn)[0][0].tolist()
    assert raster == sorted([10, 31, 45, 57] + uniform)


@pytest.mark.parametrize("plus", [False, True])
def test_batch_equals_each_image_alone(plus):
    reducer = PruMergePlus(PruMergePlusParams(knn=8)) if plus else PruMerge(PruMergeParams(knn=8))
    x, h = random_inputs(0, scale=1.0 if plus else 2.0)
    tokens, valid = reducer(x, h, IdentityBlock())
    counts = valid.sum(dim=1).tolist()
    assert counts[0] != counts[1]  # different adaptive counts: the batch is padded
    for b in range(2):
        alone, alone_valid = reducer(x[b : b + 1], h[b : b + 1], IdentityBlock())
        assert alone.shape[1] == counts[b]
        torch.testing.assert_close(tokens[b, valid[b]], alone[0], rtol=1e-6, atol=1e-6)


def test_placeholder_bound_covers_the_worst_case():
    assert max_outliers(576) == 144 and max_outliers(64) == 16
    for seed in range(5):  # heavy-tailed attention never exceeds the bound
        attn = torch.rand(4, 64, generator=torch.Generator().manual_seed(seed)) ** 8
        _, valid, _ = PruMerge(PruMergeParams()).select(attn)
        assert int(valid.sum(dim=1).max()) <= max_outliers(64)


# ---------------------------------------------------------------------------------------------------- the model
@pytest.fixture
def prumerge_setup(tokenizer):
    tokenizer.padding_side = "left"
    config = tiny_config(tokenizer, "mlp2x_gelu", reducer_type="prumerge_plus", reducer_kwargs={"knn": 8})
    return tiny_model(config), tiny_processor(config, tokenizer)


PROMPTS = [
    f"USER: {IMAGE_TOKEN}\nWhat is shown? ASSISTANT:",
    f"USER: {IMAGE_TOKEN}\nDescribe the image briefly. ASSISTANT:",
]


def test_model_features_match_the_reducer_and_batch_alone(prumerge_setup):
    model, processor = prumerge_setup
    images = [make_image(1), make_image(2)]
    pixel_values = processor.preprocess_images(images)
    with torch.no_grad():
        both = model.get_image_features(pixel_values=pixel_values).pooler_output
        alone = [model.get_image_features(pixel_values=pixel_values[i : i + 1]).pooler_output[0] for i in range(2)]
    assert len(both[0]) != len(both[1])
    for a, b in zip(both, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert len(a) <= model.config.num_image_tokens == 65


def counts_of(model, pixel_values) -> list[int]:
    with torch.no_grad():
        return [len(f) for f in model.get_image_features(pixel_values=pixel_values).pooler_output]


def test_prompt_holds_each_images_count_and_the_stock_forward_runs(prumerge_setup):
    """Written with the image's own count, the logits are the stock LLM's on that prompt; the bound is refused."""
    model, processor = prumerge_setup
    images = [make_image(1)]
    bound = processor(images=images, text=PROMPTS[:1])
    with pytest.raises(ValueError, match="its own number of tokens"), torch.no_grad():
        model(**bound)  # num_image_tokens placeholders: the most one image can get, not this image's count
    (n,) = counts_of(model, bound["pixel_values"])
    assert n < model.config.num_image_tokens
    batch = processor(images=images, text=PROMPTS[:1], image_tokens=[n])
    seen = []
    handle = model.model.language_model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    with torch.no_grad():
        out = model(**batch)
        features = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output[0]
        ids = batch["input_ids"]
        image = (ids == model.config.image_token_id)[..., None]
        embeds = model.get_input_embeddings()(ids).masked_scatter(image, features)
        handle.remove()
        expected = model.lm_head(model.model.language_model(inputs_embeds=embeds).last_hidden_state)
    assert seen == [ids.shape[1]]
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_fitting_a_bound_batch_equals_writing_the_counts(prumerge_setup, tokenizer, side):
    model, processor = prumerge_setup
    tokenizer.padding_side = side
    images = [make_image(1), make_image(2)]
    bound = processor(images=images, text=PROMPTS)
    counts = counts_of(model, bound["pixel_values"])
    assert counts[0] != counts[1]
    exact = processor(images=images, text=PROMPTS, image_tokens=counts)
    fitted = fit_image_placeholders(bound, counts, model.config.image_token_id, model.config.num_image_tokens,
                                    tokenizer.pad_token_id, padding_side=side)  # fmt: skip
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(fitted[key], exact[key]), key
    assert fitted["pixel_values"] is bound["pixel_values"]


def test_generation_with_and_without_cache_and_batched(prumerge_setup):
    model, processor = prumerge_setup
    generator = Generator(model, processor)
    questions = ["What is shown?", "Describe the image briefly."]
    requests = [Request.single(q, make_image(i + 1)) for i, q in enumerate(questions)]
    settings = GenerationSettings(max_new_tokens=6)
    both = generator.generate(requests, settings)
    assert both == [generator.generate([r], settings)[0] for r in requests]
    inputs = generator.encode(requests)
    kwargs = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        cached = model.generate(**inputs, **kwargs)
        uncached = model.generate(**inputs, **kwargs, use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_trained_checkpoint_runs_prumerge_with_its_own_processor(tmp_path, tokenizer):
    """The README flow: switch PruMerge+ on for a checkpoint trained without it; its saved processor just works."""
    config = tiny_config(tokenizer, "mlp2x_gelu")
    tiny_model(config).save_pretrained(tmp_path)
    tiny_processor(config, tokenizer).save_pretrained(tmp_path)
    reduced = LlavaStfConfig.from_pretrained(tmp_path).with_reducer("prumerge_plus", {"knn": 8})
    model = LlavaStfForConditionalGeneration.from_pretrained(tmp_path, config=reduced).eval()
    processor = LlavaStfProcessor.from_pretrained(tmp_path)
    assert processor.num_image_tokens == 64 and model.config.num_image_tokens == 65
    generator = Generator(model, processor)
    (n,) = [len(f) for f in generator.encode([Request.single("Hi?", make_image(1))])["mm_encoder_outputs"]["image"]
            .pooler_output]  # fmt: skip
    assert n < 64
    assert len(generator.generate([Request.single("What is shown?", make_image(1))], GenerationSettings(3))) == 1


def test_trains_through_the_reducer(prumerge_setup, tokenizer):
    model, processor = prumerge_setup
    model.train()
    bound = processor(images=[make_image(1), make_image(2)], text=PROMPTS)
    labels = bound["input_ids"].masked_fill(bound["input_ids"] == model.config.image_token_id, -100)
    labels = labels.masked_fill(bound["attention_mask"] == 0, -100)
    features = model.get_image_features(pixel_values=bound["pixel_values"])
    counts = [len(f) for f in features.pooler_output]
    slots, image_id = model.config.num_image_tokens, model.config.image_token_id
    batch = fit_image_placeholders({**bound, "labels": labels}, counts, image_id, slots, tokenizer.pad_token_id, "left")
    del batch["pixel_values"]
    out = model(**batch, mm_encoder_outputs={"image": features})
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    out.loss.backward()
    grad = model.model.multi_modal_projector.linear_1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matches_the_reducer_count(prumerge_setup):
    model, processor = prumerge_setup
    model = model.to("cuda", torch.bfloat16)
    generator = Generator(model, processor)
    requests = [Request.single("What is shown?", make_image(i)) for i in (1, 2)]
    inputs = generator.encode(requests)
    counts = [len(f) for f in inputs["mm_encoder_outputs"]["image"].pooler_output]
    assert all(2 <= c <= model.config.num_image_tokens for c in counts)
    assert len(generator.generate(requests, GenerationSettings(max_new_tokens=4))) == 2
