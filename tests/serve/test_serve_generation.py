"""What the chat added to the generation helper: sampling settings, checkpoint checks, quantized loading settings."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from llava_stf.generation import (
    GenerationSettings,
    Generator,
    Request,
    check_checkpoint,
    load_checkpoint,
    quantization_config,
)
from llava_stf.testing import make_image


@pytest.fixture(scope="module")
def generator(serve_checkpoint) -> Generator:
    return Generator.from_pretrained(serve_checkpoint, device="cpu")


def _answer(generator: Generator, settings: GenerationSettings, seed: int = 0) -> str:
    torch.manual_seed(seed)
    return generator.generate([Request.single("What is shown?", make_image(2))], settings)[0]


def test_greedy_stays_the_default_and_a_temperature_samples(generator) -> None:
    greedy = _answer(generator, GenerationSettings(max_new_tokens=8))
    assert not GenerationSettings().sampling and _answer(generator, GenerationSettings(max_new_tokens=8), 1) == greedy
    hot = GenerationSettings(max_new_tokens=8, temperature=1.5)
    sampled = [_answer(generator, hot, seed) for seed in range(4)]
    assert sampled[0] == _answer(generator, hot, 0)  # a seed repeats a sampled answer
    assert len(set(sampled)) > 1 and greedy not in sampled[:2]
    # top_p that keeps only the most likely token turns sampling back into greedy decoding.
    assert _answer(generator, GenerationSettings(max_new_tokens=8, temperature=1.5, top_p=1e-6), 3) == greedy


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"max_new_tokens": 0}, "max_new_tokens >= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationSettings(**kwargs)


def _copy(checkpoint, folder, skip=()):
    folder.mkdir()
    for file in checkpoint.iterdir():
        if file.name not in skip:
            shutil.copy(file, folder / file.name)
    return folder


def test_check_checkpoint_names_what_is_wrong(serve_checkpoint, tmp_path) -> None:
    check_checkpoint(serve_checkpoint)
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        check_checkpoint(tmp_path / "nope")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no config.json \\(it holds a LoRA adapter"):
        check_checkpoint(adapter)
    stage1 = _copy(serve_checkpoint, tmp_path / "stage1", skip=("model.safetensors",))
    with pytest.raises(ValueError, match="no model weights .* stage-1 output holds only the projector"):
        check_checkpoint(stage1)
    hf = _copy(serve_checkpoint, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(ValueError, match="holds a 'llava' model, not a llava_stf checkpoint.*llava_stf.convert"):
        check_checkpoint(hf)
    broken = _copy(serve_checkpoint, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not a readable JSON file"):
        check_checkpoint(broken)
    no_processor = _copy(serve_checkpoint, tmp_path / "no_processor", skip=("processor_config.json",))
    with pytest.raises(ValueError, match="no LlavaStfProcessor saved in processor_config.json \\(found: none\\)"):
        load_checkpoint(no_processor, device="cpu")


def test_quantization_settings_keep_the_vision_side_unquantized() -> None:
    four = quantization_config(4, torch.bfloat16)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    eight = quantization_config(8, torch.float16)
    assert eight.load_in_8bit and not eight.load_in_4bit
    for config in (four, eight):
        assert {"vision_tower", "multi_modal_projector", "lm_head"} <= set(config.llm_int8_skip_modules)
    with pytest.raises(ValueError, match="load_in_bits must be one of"):
        quantization_config(3, torch.float16)


def test_quantized_loading_needs_cuda(serve_checkpoint) -> None:
    with pytest.raises(ValueError, match="4-bit loading needs a CUDA device"):
        load_checkpoint(serve_checkpoint, device="cpu", load_in_bits=4)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="needs CUDA and bitsandbytes",
)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint_chats_on_a_gpu(serve_checkpoint, bits) -> None:
    model, processor = load_checkpoint(serve_checkpoint, device="cuda", load_in_bits=bits)
    kinds = {name: type(module).__name__ for name, module in model.named_modules()}
    quantized = "Linear4bit" if bits == 4 else "Linear8bitLt"
    assert kinds["model.language_model.layers.0.self_attn.q_proj"] == quantized
    assert all(kind != quantized for name, kind in kinds.items() if "projector" in name or "vision_tower" in name)
    answer = Generator(model, processor).generate([Request.single("What?", make_image(0))], GenerationSettings(8))
    assert len(answer) == 1
