"""AnyRes (LLaVA-NeXT) through the real training entry point: the stage table with ``image_newline`` as connector
state (trained and saved with the projector in stage 1, handed to stage 2, kept beside a LoRA adapter)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, set_seed

from llava_stf.errors import UserError
from llava_stf.generation import GenerationSettings, Generator, Request
from llava_stf.model import LlavaStfNextForConditionalGeneration
from llava_stf.testing import (
    TINY_PINPOINTS,
    make_image,
    tiny_config,
    tiny_model,
    tiny_next_config,
    tiny_next_model,
    tiny_next_processor,
    tiny_tokenizer,
)
from llava_stf.train.arguments import parse_config
from llava_stf.train.checkpoint import ADAPTER_EXTRAS_FILE, PROJECTOR_FILE, load_adapter, load_projector, save_projector
from llava_stf.train.fixtures import NEXT_TOWER, save_tiny_towers, tiny_run_args, write_color_dataset
from llava_stf.train.run import build, run
from llava_stf.train.stages import get_stage, part_of

SIZES = [(112, 112), (56, 56), (40, 90), (112, 56)]  # 5, 3, 3 and 3 crops: batches mix tile counts


@pytest.fixture(scope="module")
def next_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("next_world")
    return SimpleNamespace(
        towers=save_tiny_towers(root / "towers", vision_overrides=NEXT_TOWER),
        captions=write_color_dataset(root / "captions", 8, stage="pretrain", sizes=SIZES),
        instruct=write_color_dataset(root / "instruct", 8, text_only_every=4, sizes=SIZES),
    )


def _config(world, data, out, stage, **overrides):
    args = tiny_run_args(
        world.towers,
        data,
        out,
        stage,
        image_grid_pinpoints=json.dumps(TINY_PINPOINTS),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        **overrides,
    )
    return parse_config(args)


def _fresh(config):
    set_seed(config.training.seed)  # run() seeds the same way before building
    return build(config, get_stage(config.stage.stage))[0]


def _assert_parts(trained, start, frozen: set[str]) -> None:
    """Parameters of ``frozen`` parts are bit-identical to ``start``; every other one changed."""
    before = dict(start.named_parameters())
    for name, param in trained.named_parameters():
        same = torch.equal(param.detach(), before[name].detach())
        assert same == (part_of(name) in frozen), f"{name} ({part_of(name)}) {'did not change' if same else 'changed'}"


def _answers(generator: Generator) -> None:
    requests = [Request.single("What color?", make_image(i, size)) for i, size in enumerate(SIZES)]
    settings = GenerationSettings(max_new_tokens=4)
    assert generator.generate(requests, settings) == [generator.generate([r], settings)[0] for r in requests]


def test_stage1_trains_projector_and_newline_then_stage2_starts_from_both(next_world, tmp_path):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    cfg1 = _config(next_world, next_world.captions, stage1, "pretrain")
    trainer1 = run(cfg1)
    model1 = trainer1.model
    assert isinstance(model1, LlavaStfNextForConditionalGeneration)
    assert part_of("model.image_newline") == "projector"
    _assert_parts(model1, _fresh(cfg1), frozen={"vision_tower", "language_model"})

    saved = load_file(stage1 / PROJECTOR_FILE)
    projector = model1.model.multi_modal_projector.state_dict()
    assert saved.keys() == {*projector, "image_newline"}
    assert torch.equal(saved["image_newline"], model1.model.image_newline.detach())
    assert json.loads((stage1 / "config.json").read_text())["model_type"] == "llava_stf_next"
    reloaded = AutoProcessor.from_pretrained(stage1)
    assert (reloaded.image_aspect_ratio, reloaded.conversation_template) == ("anyres", "plain")

    cfg2 = _config(next_world, next_world.instruct, stage2, "finetune", pretrained_projector=stage1)
    start = _fresh(cfg2)
    assert torch.equal(start.model.image_newline.detach(), saved["image_newline"])  # the hand-off
    start_projector = start.model.multi_modal_projector.state_dict()
    assert all(torch.equal(start_projector[k], saved[k]) for k in projector)
    trainer2 = run(cfg2)
    _assert_parts(trainer2.model, start, frozen={"vision_tower"})

    generator = Generator.from_pretrained(stage2, device="cpu")
    assert isinstance(generator.model, LlavaStfNextForConditionalGeneration)
    assert torch.equal(generator.model.model.image_newline, trainer2.model.model.image_newline.detach())
    _answers(generator)


def test_lora_keeps_newline_and_projector_trainable_and_saves_them_beside_the_adapter(next_world, tmp_path):
    out = tmp_path / "lora"
    config = _config(next_world, next_world.instruct, out, "lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    trainer = run(config)
    fresh = _fresh(config)
    trained = trainer.model.get_base_model()
    assert not torch.equal(trained.model.image_newline.detach(), fresh.model.image_newline.detach())
    extras = load_file(out / "adapter" / ADAPTER_EXTRAS_FILE)
    assert torch.equal(extras["image_newline"], trained.model.image_newline.detach())

    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(merged, LlavaStfNextForConditionalGeneration) and processor.image_aspect_ratio == "anyres"
    assert not any("lora" in name for name, _ in merged.named_parameters())
    images = [make_image(0, SIZES[0]), make_image(1, SIZES[1])]
    inputs = processor(images=images, text=["USER: <image>\nWhat? ASSISTANT:"] * 2)
    reloaded = load_adapter(fresh, out / "adapter").eval()
    with torch.no_grad():
        logits = merged(**inputs).logits
        torch.testing.assert_close(logits, trainer.model.eval()(**inputs).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded(**inputs).logits, logits, rtol=1e-5, atol=1e-5)
    _answers(Generator(merged, processor))


def test_the_stage_template_survives_saving_an_anyres_processor(tmp_path):
    tokenizer = tiny_tokenizer()
    processor = tiny_next_processor(tiny_next_config(tokenizer), tokenizer)
    processor.conversation_template = "plain"  # what train.run.build sets for stage 1
    processor.save_pretrained(tmp_path)
    assert AutoProcessor.from_pretrained(tmp_path).conversation_template == "plain"


def test_run_config_takes_pinpoints_from_flags_and_presets(next_world, tmp_path):
    base = tiny_run_args(next_world.towers, next_world.instruct, tmp_path / "x", "finetune")
    assert parse_config(base).model.image_grid_pinpoints is None  # LLaVA-1.5, as before
    flags = parse_config([*base, "--image_grid_pinpoints", "[[56, 112], [112, 112]]"])
    assert flags.model.image_grid_pinpoints == [[56, 112], [112, 112]]
    preset = parse_config(["--preset", "llava-stf-next-7b", "--data_path", str(next_world.instruct)])
    assert preset.model.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    for bad in ("[[56, 112", "[[56]]", "[]"):
        with pytest.raises(UserError, match="image_grid_pinpoints"):
            parse_config([*base, "--image_grid_pinpoints", bad])


def test_projector_files_and_image_newline_between_model_kinds(tmp_path, caplog):
    tokenizer = tiny_tokenizer()
    source, target = tiny_next_model(tiny_next_config(tokenizer), seed=1), tiny_next_model(tiny_next_config(tokenizer))
    with_newline = save_projector(
        source.model.multi_modal_projector,
        tmp_path / "next.safetensors",
        "mbtf_stf",
        image_newline=source.model.image_newline,
    )
    load_projector(target, with_newline)
    assert torch.equal(target.model.image_newline, source.model.image_newline)
    with pytest.raises(ValueError, match=r"unexpected keys \['image_newline'\]"):  # an AnyRes file into a 1.5 model
        load_projector(tiny_model(tiny_config(tokenizer)), with_newline)
    plain = save_projector(
        tiny_model(tiny_config(tokenizer), seed=2).model.multi_modal_projector, tmp_path / "p.safetensors", "mbtf_stf"
    )
    fresh = tiny_next_model(tiny_next_config(tokenizer), seed=3)
    newline = fresh.model.image_newline.detach().clone()
    with caplog.at_level("INFO", logger="llava_stf.train.checkpoint"):
        load_projector(fresh, plain)  # a LLaVA-1.5 projector: the AnyRes model keeps its fresh image_newline
    assert torch.equal(fresh.model.image_newline, newline) and "keeps a fresh one" in caplog.text
