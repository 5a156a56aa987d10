"""The LoRA stage: adapters on the LLM + the projector, saved as a PEFT adapter and as a merged model that reloads."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava_stf.generation import Generator, Request
from llava_stf.testing import make_image
from llava_stf.train.arguments import parse_config
from llava_stf.train.fixtures import tiny_run_args
from llava_stf.train.run import run


def test_lora_stage_saves_an_adapter_and_a_merged_model_that_generates(world, tmp_path):
    out = tmp_path / "lora"
    config = parse_config(
        tiny_run_args(
            world.towers,
            world.instruct,
            out,
            "lora",
            num_train_epochs=2,
            learning_rate=5e-3,
            projector_lr=1e-3,
            lora_r=4,
            lora_alpha=8,
            lora_dropout=0.0,
        )
    )
    trainer = run(config)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["modules_to_save"]) == (4, 8, ["multi_modal_projector"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "LlavaStfForConditionalGeneration" and processor.conversation_template == "vicuna_v1"
    assert not any("lora" in name for name, _ in model.named_parameters())
    inputs = processor(images=[make_image(0)], text=["USER: <image>\nWhat color is the image? ASSISTANT:"])
    with torch.no_grad():
        merged = model(**inputs).logits
        torch.testing.assert_close(merged, trainer.model.eval()(**inputs).logits, rtol=1e-5, atol=1e-5)
    out_ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out_ids.shape[1] > inputs["input_ids"].shape[1]


def test_lora_stage_trains_with_a_prumerge_reducer(world, tmp_path):
    """PruMerge chosen by config at training time: recorded in config.json, the merged model reloads and generates."""
    out = tmp_path / "lora_prumerge"
    config = parse_config(
        tiny_run_args(
            world.towers,
            world.instruct,
            out,
            "lora",
            projector_type="mlp2x_gelu",
            reducer_type="prumerge_plus",
            reducer_kwargs=json.dumps({"knn": 4}),
            num_train_epochs=1,
            learning_rate=5e-3,
            lora_r=4,
            lora_alpha=8,
        )
    )
    trainer = run(config)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    saved = json.loads((out / "config.json").read_text())
    assert saved["reducer_type"] == "prumerge_plus" and saved["reducer_kwargs"]["knn"] == 4
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.num_image_tokens == model.config.num_image_tokens
    # PruMerge gives each image its own token count: the Generator writes it into the prompt
    answers = Generator(model, processor).generate([Request.single("What color is the image?", make_image(1))])
    assert len(answers) == 1
