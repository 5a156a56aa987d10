"""DivPrune, random pruning and pooling in the model: exact token counts reach the LLM, batch equals one by one,
KV cache on/off give the same tokens, generation through ``Generator`` (also on a checkpoint trained without the
reducer), and FLOPs against FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_stf.flops import count_flops
from llava_stf.generation import GenerationSettings, Generator, Request
from llava_stf.model import LlavaStfConfig, LlavaStfForConditionalGeneration, LlavaStfProcessor
from llava_stf.model.reducers import REDUCERS
from llava_stf.testing import IMAGE_TOKEN, make_image, tiny_config, tiny_model, tiny_processor

# Each keeps 16 of the tiny model's 8 x 8 patches (pool 3 x 5: 15, with overlapping windows).
SETTINGS = [
    ("divprune", {"tokens": 16}),
    ("random", {"tokens": 16, "seed": 3}),
    ("pool", {"out_h": 4, "out_w": 4}),
    ("pool", {"out_h": 3, "out_w": 5}),
]
IDS = ["divprune", "random", "pool", "pool-3x5"]
PROMPT = f"USER: {IMAGE_TOKEN}\nWhat is shown? ASSISTANT:"


def build(tokenizer, reducer, kwargs, projector="mlp2x_gelu"):
    tokenizer.padding_side = "left"
    config = tiny_config(tokenizer, projector, reducer_type=reducer, reducer_kwargs=kwargs)
    return tiny_model(config), tiny_processor(config, tokenizer)


@pytest.mark.parametrize(("reducer", "kwargs"), SETTINGS, ids=IDS)
def test_features_are_the_reducer_on_the_towers_patches_and_batch_equals_alone(tokenizer, reducer, kwargs):
    model, processor = build(tokenizer, reducer, kwargs)
    count = REDUCERS[reducer].image_tokens(model.config.reducer_params(), model.config.reducer_shapes())
    assert model.config.num_image_tokens == processor.num_image_tokens == count < 64
    assert not model.config.adaptive_image_tokens
    pixel_values = processor.preprocess_images([make_image(1), make_image(2), make_image(3)])
    with torch.no_grad():
        both = model.get_image_features(pixel_values=pixel_values).pooler_output
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        reduced, valid = model.model.reducer(hidden, None, None)
        expected = model.model.multi_modal_projector(reduced)
        for i in range(3):
            alone = model.get_image_features(pixel_values=pixel_values[i : i + 1]).pooler_output[0]
            assert alone.shape == (count, model.config.text_config.hidden_size)
            torch.testing.assert_close(both[i], alone, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(both[i], expected[i], rtol=1e-5, atol=1e-6)
    assert valid.all()


@pytest.mark.parametrize(("reducer", "kwargs"), SETTINGS, ids=IDS)
def test_the_llm_sees_only_the_kept_tokens(tokenizer, reducer, kwargs):
    model, processor = build(tokenizer, reducer, kwargs)
    batch = processor(images=[make_image(1)], text=[PROMPT])
    full = tiny_processor(tiny_config(tokenizer, "mlp2x_gelu"), tokenizer)(images=[make_image(1)], text=[PROMPT])
    seen = []
    handle = model.model.language_model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    assert seen == [full["input_ids"].shape[1] - 64 + model.config.num_image_tokens]


@pytest.mark.parametrize(("reducer", "kwargs"), SETTINGS[:3], ids=IDS[:3])
def test_generation_batched_alone_and_with_and_without_cache(tokenizer, reducer, kwargs):
    model, processor = build(tokenizer, reducer, kwargs)
    generator = Generator(model, processor)
    questions = ["What is shown?", "Describe the image briefly. How many shapes are there?"]
    requests = [Request.single(q, make_image(i + 1)) for i, q in enumerate(questions)]
    settings = GenerationSettings(max_new_tokens=6)
    both = generator.generate(requests, settings)
    assert both == [generator.generate([r], settings)[0] for r in requests]
    inputs = generator.encode(requests)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("reducer", ["divprune", "random", "pool"])
def test_a_trained_checkpoint_generates_with_the_reducer(tmp_path, tokenizer, reducer):
    """Switch a reducer on for a checkpoint trained without it: the saved processor (64 placeholders, the projector's
    count) is adopted by ``Generator`` at the reducer's count (16); a processor of another model is still refused."""
    config = tiny_config(tokenizer, "mlp2x_gelu")
    tiny_model(config).save_pretrained(tmp_path)
    tiny_processor(config, tokenizer).save_pretrained(tmp_path)
    shapes = LlavaStfConfig.from_pretrained(tmp_path).reducer_shapes()
    kwargs = REDUCERS[reducer].budget_kwargs(reducer, 16, shapes)
    reduced = LlavaStfConfig.from_pretrained(tmp_path).with_reducer(reducer, kwargs)
    model = LlavaStfForConditionalGeneration.from_pretrained(tmp_path, config=reduced).eval()
    assert model.config.num_image_tokens == 16
    processor = LlavaStfProcessor.from_pretrained(tmp_path)
    assert processor.num_image_tokens == 64
    generator = Generator(model, processor)
    assert generator.processor.num_image_tokens == 16
    answers = generator.generate([Request.single("What is shown?", make_image(1))], GenerationSettings(3))
    assert len(answers) == 1 and isinstance(answers[0], str)
    processor.num_image_tokens = 32  # neither the projector's count nor the reducer's: a mismatched pair
    with pytest.raises(ValueError, match="processor: 32, model: 16"):
        Generator(model, processor)


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "mbtf"])
@pytest.mark.parametrize(("reducer", "kwargs"), SETTINGS, ids=IDS)
def test_flops_match_flop_counter_mode(tokenizer, projector, reducer, kwargs):
    """Exact for DivPrune (its similarities are one batched matmul) and random pruning (no arithmetic). Pooling's
    accumulates are not matmuls, which FlopCounterMode alone counts: the rest must match, and the pooling term is
    one accumulate per window element and channel."""
    model, processor = build(tokenizer, reducer, kwargs, projector)
    model.set_attn_implementation("eager")  # FlopCounterMode sees the attention matmuls only in eager mode
    inputs = processor(images=[make_image(0)], text=[PROMPT])
    n_text = inputs["input_ids"].shape[1] - model.config.num_image_tokens
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs, logits_to_keep=1)
    report = count_flops(model.config, n_text)
    channels = model.config.projector_shapes().in_channels
    assert report.image_tokens == model.config.num_image_tokens
    if reducer == "pool":
        assert counter.get_total_flops() == report.full - report.reducer
        elements = 64 if kwargs["out_h"] == 4 else 10 * 12  # 3 x 5 of 8 x 8: row windows 3+4+3, columns 2+3+2+3+2
        assert report.reducer == 2 * elements * channels
    else:
        assert counter.get_total_flops() == report.full
        assert report.reducer == (2 * 64 * 64 * channels if reducer == "divprune" else 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("reducer", "kwargs"), SETTINGS[:3], ids=IDS[:3])
def test_cuda_bf16_batch_equals_alone_and_random_keeps_the_cpu_subset(tokenizer, reducer, kwargs):
    model, processor = build(tokenizer, reducer, kwargs)
    x = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(0))
    cpu = model.model.reducer(x, None, None)[0]
    model = model.to("cuda", torch.bfloat16)
    gpu_x = x.to("cuda", torch.bfloat16)
    both = model.model.reducer(gpu_x, None, None)[0]
    for i in range(3):
        assert torch.equal(both[i], model.model.reducer(gpu_x[i : i + 1], None, None)[0][0])
    if reducer == "random":  # the draw does not depend on the device
        assert torch.equal(both.float().cpu(), cpu.to(torch.bfloat16).float())
    requests = [Request.single("What is shown?", make_image(i)) for i in (1, 2)]
    assert len(Generator(model, processor).generate(requests, GenerationSettings(max_new_tokens=4))) == 2
