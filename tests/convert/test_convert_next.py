"""``--from llava-next`` and ``--to llava-hf`` for AnyRes: the original LLaVA-NeXT (1.6) layout, tiny, both ways.

The source is written the way haotian-liu/LLaVA's ``LlavaLlamaForCausalLM`` saves a 1.6 model: LLaVA-1.5's keys plus
``model.image_newline`` (``[D]``), and a ``config.json`` with ``image_aspect_ratio: anyres``, ``mm_patch_merge_type:
spatial_unpad`` and ``image_grid_pinpoints`` as that code reads them, ``[width, height]`` pairs. The reference is
transformers' own ``LlavaNextForConditionalGeneration`` holding the same tensors, mapped by the table below (written
here, not taken from the converter), with the pinpoints turned into transformers' ``[height, width]`` by hand. A small
square image resolves a tie between the 56x112 and 112x56 pinpoints, so the pinpoint orientation is checked too.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_convert_llava import ROPE_THETA, TOWER_PREFIX, llava_config_json
from torch import nn
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)

from llava_stf.convert import convert_checkpoint, main
from llava_stf.model import LlavaStfNextForConditionalGeneration, LlavaStfNextProcessor
from llava_stf.testing import (
    TINY_NEXT_CROP,
    TINY_NEXT_PATCH,
    TINY_PINPOINTS,
    make_image,
    save_tiny_next_checkpoint,
    tiny_image_processor,
    tiny_next_image_processor,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)

PROMPT = "USER: <image>\nWhat is shown in the image? ASSISTANT:"
SOURCE_PINPOINTS = TINY_PINPOINTS  # written as the original code reads them: [width, height]
HF_PINPOINTS = [[112, 56], [56, 112], [112, 112]]  # the same resolutions, in the same order, as [height, width]
IMAGES = {"square": (40, 40), "non-square": (90, 40)}  # (width, height); 40x40 ties 56x112 with 112x56
VOCAB = 576  # the converted vocabulary: the source tokens + <image>, padded to a multiple of 64
# Source key prefix -> transformers' LlavaNextForConditionalGeneration key prefix (its in-memory names).
REFERENCE_KEYS = [
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.image_newline", "model.image_newline"),
    (TOWER_PREFIX, "model.vision_tower."),
]


def next_config_json(vocab: int, tower: str, **overrides) -> dict:
    """liuhaotian/llava-v1.6-vicuna-7b's config.json fields, on the tiny towers."""
    fields = dict(
        image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=SOURCE_PINPOINTS,
        image_crop_resolution=224, image_split_resolution=224, mm_resampler_type=None, mm_projector_lr=2e-5,
        mm_vision_tower_lr=2e-6, freeze_mm_vision_resampler=False, tune_mm_vision_resampler=False,
        unfreeze_mm_vision_tower=True, transformers_version="4.36.2",
    )  # fmt: skip
    return llava_config_json(vocab, tower) | fields | overrides


def make_next_source(tmp_path, with_tower: bool = True, **config_overrides) -> SimpleNamespace:
    """Random tiny LLaVA-NeXT modules saved in the original layout (one pytorch_model.bin); the state dict returned."""
    tokenizer = tiny_tokenizer(with_image_token=False, with_pad_token=False)
    tokenizer.pad_token = tokenizer.unk_token
    tower = CLIPVisionModel(tiny_vision_config(image_size=TINY_NEXT_CROP, patch_size=TINY_NEXT_PATCH)).eval()
    llm = LlamaForCausalLM(tiny_text_config(len(tokenizer), pad_token_id=0, rope_theta=ROPE_THETA)).eval()
    projector = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))
    clip_dir, src = tmp_path / "clip", tmp_path / "llava-next"
    tower.save_pretrained(clip_dir)
    tiny_image_processor(TINY_NEXT_CROP).save_pretrained(clip_dir)
    state_dict = dict(llm.state_dict()) | {f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}
    state_dict["model.image_newline"] = torch.randn(64)
    if with_tower:
        state_dict |= {TOWER_PREFIX + k: v for k, v in tower.state_dict().items()}
    src.mkdir()
    torch.save({k: v.clone() for k, v in state_dict.items()}, src / "pytorch_model.bin")
    config = next_config_json(len(tokenizer), str(clip_dir), **config_overrides)
    (src / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(src)
    return SimpleNamespace(src=src, clip=clip_dir, tower=tower, llm=llm, vocab=len(tokenizer), state_dict=state_dict)


def reference_model(source: SimpleNamespace, image_token_id: int) -> LlavaNextForConditionalGeneration:
    """transformers' LLaVA-NeXT with the source tensors (tower from ``source.tower``), mapped by REFERENCE_KEYS."""
    tensors = {k: v for k, v in source.state_dict.items() if not k.startswith(TOWER_PREFIX)}
    tensors |= {TOWER_PREFIX + k: v for k, v in source.tower.state_dict().items()}
    mapped = {}
    for key, tensor in tensors.items():
        ours, theirs = next((o, t) for o, t in REFERENCE_KEYS if key.startswith(o))
        mapped[theirs + key[len(ours) :]] = tensor
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):  # rows for <image> and padding
        mapped[key] = torch.cat([mapped[key], torch.zeros(VOCAB - len(mapped[key]), 64)])
    config = LlavaNextConfig(
        vision_config=source.tower.config.to_dict(),
        text_config=source.llm.config.to_dict() | {"vocab_size": VOCAB},
        image_token_index=image_token_id,
        image_grid_pinpoints=HF_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    model.load_state_dict(mapped, strict=True)
    return model


def reference_processor(tokenizer) -> LlavaNextProcessor:
    return LlavaNextProcessor(
        image_processor=tiny_next_image_processor(TINY_NEXT_CROP, HF_PINPOINTS),
        tokenizer=tokenizer,
        patch_size=TINY_NEXT_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def check_against_reference(source: SimpleNamespace, dst) -> None:
    model = AutoModelForImageTextToText.from_pretrained(dst).eval()
    processor = AutoProcessor.from_pretrained(dst)
    assert isinstance(model, LlavaStfNextForConditionalGeneration) and isinstance(processor, LlavaStfNextProcessor)
    reference = reference_model(source, processor.image_token_id)
    ref_processor = reference_processor(processor.tokenizer)
    for name, size in IMAGES.items():
        image = make_image(seed=sum(size), size=size)
        ours, theirs = (
            processor(images=[image], text=[PROMPT]),
            ref_processor(images=[image], text=[PROMPT], return_tensors="pt"),
        )
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"]), name  # same tiles (pinpoint orientation)
        assert torch.equal(ours["image_sizes"], theirs["image_sizes"]) and torch.equal(
            ours["input_ids"], theirs["input_ids"]
        ), name
        with torch.no_grad():
            logits, ref_logits = model(**ours).logits, reference(**theirs).logits
        n = source.vocab  # the source's own rows (the converter pads with mean rows, the reference with zeros)
        torch.testing.assert_close(logits[..., :n], ref_logits[..., :n], rtol=0, atol=1e-5, msg=name)
        assert ref_logits.std() > 1e-2  # a wrong mapping would not hide under the tolerance


def test_llava_next_checkpoint_matches_transformers_llava_next(tmp_path):
    source = make_next_source(tmp_path, with_tower=True)
    convert_checkpoint("llava-next", source.src, tmp_path / "out")
    check_against_reference(source, tmp_path / "out")

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llava_stf_next" and config["projector_type"] == "mlp2x_gelu"
    assert config["image_grid_pinpoints"] == HF_PINPOINTS and config["vision_feature_layer"] == -2
    processor = json.loads((tmp_path / "out" / "processor_config.json").read_text())
    assert processor["crop_grid"] == [8, 8, 1] and processor["image_aspect_ratio"] == "anyres"
    assert processor["image_processor"]["image_grid_pinpoints"] == HF_PINPOINTS
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation.get("do_sample", False) is False and generation["pad_token_id"] == 0


def test_llava_next_tower_taken_from_vision_tower_flag(tmp_path, capsys):
    source = make_next_source(tmp_path, with_tower=False)
    (source.src / "config.json").write_text(
        json.dumps(json.loads((source.src / "config.json").read_text()) | {"mm_vision_tower": "not/here"})
    )
    assert (
        main(["--from", "llava-next", str(source.src), str(tmp_path / "out"), "--vision-tower", str(source.clip)]) == 0
    )
    assert "wrote" in capsys.readouterr().out
    check_against_reference(source, tmp_path / "out")


def test_pinpoints_as_a_python_literal_string_convert_like_the_list(tmp_path):
    source = make_next_source(tmp_path, image_grid_pinpoints="[(56, 112), (112, 56), (112, 112)]")
    convert_checkpoint("llava-next", source.src, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["image_grid_pinpoints"] == HF_PINPOINTS


def _error(capsys, *argv) -> tuple[str, str]:
    assert main([str(a) for a in argv]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and lines and "Traceback" not in err, err
    return lines[-1], err


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"mm_patch_merge_type": "flat"}, "mm_patch_merge_type='flat' (supported: ['spatial_unpad'])"),
        ({"mm_patch_merge_type": "spatial"}, "mm_patch_merge_type='spatial' (supported: ['spatial_unpad'])"),
        ({"image_aspect_ratio": "anyres_max_9"}, "image_aspect_ratio='anyres_max_9' (supported: ['anyres'])"),
        ({"mm_vision_select_feature": "cls_patch"}, "mm_vision_select_feature='cls_patch' (supported: [None, 'pat"),
        ({"image_grid_pinpoints": "(1x1),...,(3x3)"}, "image_grid_pinpoints='(1x1),...,(3x3)' is a grid range"),
        ({"image_grid_pinpoints": None}, "image_grid_pinpoints=None is not a list of [width, height] pairs"),
        ({"image_grid_pinpoints": [[56, 100]]}, "image_grid_pinpoints [[100, 56]] ([height, width]) are not multiples"),
        ({"image_aspect_ratio": "pad", "mm_patch_merge_type": "flat"}, "use --from llava or --from llava-stf-official"),
    ],
    ids=["flat", "spatial", "anyres_max_9", "cls", "grid-range", "no-pinpoints", "pinpoint-size", "a-1.5-config"],
)  # fmt: skip
def test_unsupported_source_settings_are_one_error_line(tmp_path, capsys, overrides, expected):
    source = make_next_source(tmp_path, **overrides)
    line, _ = _error(capsys, "--from", "llava-next", source.src, tmp_path / "out")
    assert line.startswith("error: ") and expected in line, line
    assert not (tmp_path / "out").exists()


def test_missing_image_newline_is_one_error_line_naming_the_key(tmp_path, capsys):
    source = make_next_source(tmp_path)
    state_dict = torch.load(source.src / "pytorch_model.bin", weights_only=True)
    del state_dict["model.image_newline"]
    torch.save(state_dict, source.src / "pytorch_model.bin")
    line, err = _error(capsys, "--from", "llava-next", source.src, tmp_path / "out")
    assert line == "error: cannot convert the 'llava-next' checkpoint (the keys are listed above)"
    assert "model.image_newline (source key model.image_newline)" in err
    assert not (tmp_path / "out").exists()


def test_a_next_checkpoint_with_from_llava_points_to_llava_next(tmp_path, capsys):
    source = make_next_source(tmp_path)
    line, _ = _error(capsys, "--from", "llava", source.src, tmp_path / "out")
    assert "image_aspect_ratio='anyres'" in line and line.endswith(
        "an AnyRes (LLaVA-NeXT) config: use --from llava-next"
    )
    line, _ = _error(capsys, "--from", "llava-next", source.src, tmp_path / "out", "--image-aspect-ratio", "pad")
    assert line.startswith("error: --image-aspect-ratio pad is for LLaVA-1.5 sources")


def test_export_to_llava_hf_next_loads_in_transformers_with_identical_logits(tmp_path):
    source = make_next_source(tmp_path)
    convert_checkpoint("llava-next", source.src, tmp_path / "ours")
    assert main(["--to", "llava-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["image_grid_pinpoints"] == HF_PINPOINTS
    assert "projector_type" not in config

    hf_model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    hf_processor = LlavaNextProcessor.from_pretrained(tmp_path / "hf")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "ours").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "ours")
    back = LlavaStfNextForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()  # and back, as it is
    for name, size in IMAGES.items():
        image = make_image(seed=sum(size) + 1, size=size)
        ours, theirs = (
            processor(images=[image], text=[PROMPT]),
            hf_processor(images=[image], text=[PROMPT], return_tensors="pt"),
        )
        assert torch.equal(ours["input_ids"], theirs["input_ids"]), name
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"]), name
        with torch.no_grad():
            logits = model(**ours).logits
            torch.testing.assert_close(hf_model(**theirs).logits, logits, rtol=0, atol=1e-5, msg=name)
            torch.testing.assert_close(back(**ours).logits, logits, rtol=0, atol=1e-5, msg=name)


def test_export_of_a_next_checkpoint_with_another_projector_is_one_error_line(tmp_path, capsys):
    ours = save_tiny_next_checkpoint(tmp_path / "ours", projector_type="mbtf_stf")
    line, _ = _error(capsys, "--to", "llava-hf", ours, tmp_path / "hf")
    assert line.startswith("error: cannot export projector_type 'mbtf_stf' to llava-hf: transformers' ")
    assert "LlavaNextForConditionalGeneration only has the LLaVA-1.5 projector ('mlp2x_gelu')" in line
    assert not (tmp_path / "hf").exists()
