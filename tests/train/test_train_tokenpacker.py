"""TokenPacker through the real entry point: stage 1 trains the projector alone, stage 2 starts from it, and the
stage-2 checkpoint answers through ``llava_stf.generation.Generator`` (a few steps each, tiny towers)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from llava_stf.generation import GenerationSettings, Generator, Request
from llava_stf.testing import make_image
from llava_stf.train.arguments import parse_config
from llava_stf.train.checkpoint import PROJECTOR_FILE
from llava_stf.train.fixtures import tiny_run_args
from llava_stf.train.run import run
from llava_stf.train.stages import part_of

KWARGS = {"projector_type": "tokenpacker", "projector_kwargs": json.dumps({"scale": 2}), "max_steps": 2}


def test_tokenpacker_trains_two_stages_and_generates(world, tmp_path):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    trainer1 = run(parse_config(tiny_run_args(world.towers, world.captions, stage1, "pretrain", **KWARGS)))
    model1 = trainer1.model
    assert model1.config.projector_type == "tokenpacker" and model1.config.num_image_tokens == 16
    assert model1.config.vision_feature_layer == [4, 6, 7, 8]
    trainable = {part_of(n) for n, p in model1.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}
    saved = load_file(stage1 / PROJECTOR_FILE)
    assert {k.split(".")[0] for k in saved} == {
        "query_proj", "query_norm", "key_mlp", "key_norm", "value_mlp", "value_norm", "attn", "mlp"
    }  # fmt: skip
    assert saved["attn.in_proj_bias"].any()  # zero at init: the optimizer moved it

    trainer2 = run(
        parse_config(
            tiny_run_args(world.towers, world.instruct, stage2, "finetune", pretrained_projector=stage1, **KWARGS)
        )
    )
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer2.state.log_history if "loss" in h)
    generator = Generator.from_pretrained(stage2, device="cpu")
    assert generator.model.config.projector_kwargs["scale"] == 2 and generator.processor.num_image_tokens == 16
    requests = [Request.single("What color is the image?", make_image(i)) for i in range(2)]
    answers = generator.generate(requests, GenerationSettings(max_new_tokens=4))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert answers == [generator.generate([r], GenerationSettings(max_new_tokens=4))[0] for r in requests]
