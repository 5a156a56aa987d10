"""Two stages in one process on tiny towers: what trains, what stays bit-identical, what each stage saves and loads."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, set_seed

from llava_stf.testing import make_image
from llava_stf.train.arguments import parse_config
from llava_stf.train.checkpoint import PROJECTOR_FILE
from llava_stf.train.fixtures import tiny_run_args
from llava_stf.train.run import build, run
from llava_stf.train.stages import get_stage, part_of


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def fresh_model(config):
    set_seed(config.training.seed)  # run() seeds the same way before building
    return build(config, get_stage(config.stage.stage))[0]


def assert_parts(trained, fresh, frozen: set[str]):
    """Parameters of ``frozen`` parts are bit-identical to a fresh build; every other parameter changed."""
    before = dict(fresh.named_parameters())
    checked = set()
    for name, param in trained.named_parameters():
        part = part_of(name)
        checked.add(part)
        same = torch.equal(param.detach(), before[name].detach())
        assert same == (part in frozen), f"{name} ({part}) {'changed' if not same else 'did not change'}"
    assert frozen < checked


def test_two_stages_train_freeze_save_and_hand_over(world, tmp_path):
    stage1_dir, stage2_dir = tmp_path / "stage1", tmp_path / "stage2"
    cfg1 = parse_config(
        tiny_run_args(world.towers, world.captions, stage1_dir, "pretrain", num_train_epochs=3, learning_rate=3e-3)
    )
    trainer1 = run(cfg1)
    loss1 = losses(trainer1)
    assert sum(loss1[-3:]) / 3 < sum(loss1[:3]) / 3 - 0.2
    assert_parts(trainer1.model, fresh_model(cfg1), frozen={"vision_tower", "language_model"})

    # Stage 1 writes the projector alone (safetensors, our key names), the config and the processor.
    projector = trainer1.model.model.multi_modal_projector.state_dict()
    saved = load_file(stage1_dir / PROJECTOR_FILE)
    assert saved.keys() == projector.keys()
    assert all(torch.equal(saved[k], projector[k]) for k in saved)
    with safe_open(str(stage1_dir / PROJECTOR_FILE), "pt") as f:
        assert f.metadata()["projector_type"] == "mbtf_stf"
    assert not (stage1_dir / "model.safetensors").exists()
    processor1 = AutoProcessor.from_pretrained(stage1_dir)
    assert (processor1.conversation_template, processor1.image_aspect_ratio) == ("plain", "square")

    cfg2 = parse_config(
        tiny_run_args(
            world.towers,
            world.instruct,
            stage2_dir,
            "finetune",
            num_train_epochs=3,
            learning_rate=2e-3,
            pretrained_projector=stage1_dir,
            group_by_modality_length=True,
        )
    )
    start = fresh_model(cfg2)
    start_projector = start.model.multi_modal_projector.state_dict()
    assert all(torch.equal(start_projector[k], saved[k]) for k in saved)  # stage 2 starts from the stage-1 file
    trainer2 = run(cfg2)
    loss2 = losses(trainer2)
    assert sum(loss2[-3:]) / 3 < sum(loss2[:3]) / 3 - 0.5
    assert_parts(trainer2.model, start, frozen={"vision_tower"})
    assert trainer2.data_counts["samples"] == 3 * 48 and trainer2.data_counts["skipped"] == 0

    # Stage 2 writes a full checkpoint that reloads, with the template and image mode it trained with.
    model = AutoModelForImageTextToText.from_pretrained(stage2_dir).eval()
    processor = AutoProcessor.from_pretrained(stage2_dir)
    assert (processor.conversation_template, processor.image_aspect_ratio) == ("vicuna_v1", "pad")
    inputs = processor(images=[make_image(0)], text=["USER: <image>\nWhat color is the image? ASSISTANT:"])
    trained = trainer2.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, trained(**inputs).logits, rtol=0, atol=0)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_stage_table():
    assert get_stage("pretrain").trains == ("projector",) and get_stage("pretrain").template == "plain"
    assert get_stage("finetune").image_aspect_ratio == "pad" and get_stage("lora").lora
    with pytest.raises(ValueError, match="valid stages"):
        get_stage("stage3")
