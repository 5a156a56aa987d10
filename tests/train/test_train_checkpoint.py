"""Stage hand-offs: the projector file (ours and LLaVA's), strict loading with named errors, LoRA merging, groups."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import TrainingArguments

from llava_stf.model.conversion import ConversionError
from llava_stf.testing import make_image, tiny_config, tiny_model, tiny_processor
from llava_stf.train.checkpoint import PROJECTOR_FILE, load_projector, merge_lora_state_dict, save_projector
from llava_stf.train.stages import apply_stage, get_stage, lora_target_modules, parameter_counts, wrap_lora
from llava_stf.train.trainer import LlavaStfTrainer


@pytest.fixture
def pair(session_tokenizer):
    """Two tiny models with the same config and different weights."""
    config = tiny_config(session_tokenizer)
    return tiny_model(config, seed=0), tiny_model(config, seed=1)


def projector_of(model):
    return model.model.multi_modal_projector


def write_stage1(model, folder):
    folder.mkdir(exist_ok=True)
    save_projector(projector_of(model), folder / PROJECTOR_FILE, model.config.projector_type)
    model.config.save_pretrained(folder)
    return folder


def test_projector_round_trip_through_a_stage1_folder_and_a_file(pair, tmp_path):
    source, target = pair
    folder = write_stage1(source, tmp_path / "stage1")
    load_projector(target, folder)
    for (name, a), b in zip(projector_of(source).state_dict().items(), projector_of(target).state_dict().values()):
        assert torch.equal(a, b), name
    other = tiny_model(source.config, seed=2)
    load_projector(other, folder / PROJECTOR_FILE)  # the file alone works too
    assert torch.equal(projector_of(other).stf.fusion.weight, projector_of(source).stf.fusion.weight)


def test_another_projector_setting_is_named(pair, session_tokenizer, tmp_path):
    folder = write_stage1(pair[0], tmp_path / "stage1")
    stf_only = tiny_model(tiny_config(session_tokenizer, projector_type="stf"))
    with pytest.raises(ValueError, match="projector_type: file 'mbtf_stf' vs model 'stf'"):
        load_projector(stf_only, folder)
    wider = tiny_model(tiny_config(session_tokenizer, projector_kwargs={"fusion_width": 64}))
    with pytest.raises(ValueError, match="projector_kwargs"):
        load_projector(wider, folder)
    alone = tmp_path / "alone.safetensors"  # no config.json beside it: the file's metadata is checked
    alone.write_bytes((folder / PROJECTOR_FILE).read_bytes())
    with pytest.raises(ValueError, match="holds a 'mbtf_stf' projector"):
        load_projector(stf_only, alone)


def test_missing_extra_and_misshaped_keys_are_listed(pair, tmp_path):
    source, target = pair
    state = {k: v.clone() for k, v in projector_of(source).state_dict().items()}
    state.pop("stf.fusion.bias")
    state["stf.extra.weight"] = torch.zeros(2)
    state["mbtf.0.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "bad.safetensors")
    before = projector_of(target).mbtf[0].weight.clone()
    with pytest.raises(ConversionError) as info:
        load_projector(target, tmp_path / "bad.safetensors")
    message = str(info.value)
    assert "stf.fusion.bias" in message and "stf.extra.weight" in message and "mbtf.0.weight: file (3, 3)" in message
    assert torch.equal(projector_of(target).mbtf[0].weight, before)  # nothing half-loaded


def test_llava_mm_projector_bin_is_converted(session_tokenizer, tmp_path):
    model = tiny_model(tiny_config(session_tokenizer, projector_type="mlp2x_gelu"))
    mlp = projector_of(model)
    upstream = {
        "model.mm_projector.0.weight": torch.randn_like(mlp.linear_1.weight),
        "model.mm_projector.0.bias": torch.randn_like(mlp.linear_1.bias),
        "model.mm_projector.2.weight": torch.randn_like(mlp.linear_2.weight),
        "model.mm_projector.2.bias": torch.randn_like(mlp.linear_2.bias),
    }
    (tmp_path / "pretrain").mkdir()
    torch.save(upstream, tmp_path / "pretrain" / "mm_projector.bin")
    load_projector(model, tmp_path / "pretrain")
    assert torch.equal(mlp.linear_2.weight, upstream["model.mm_projector.2.weight"])
    upstream.pop("model.mm_projector.2.bias")
    torch.save(upstream, tmp_path / "short.bin")
    with pytest.raises(ConversionError, match="linear_2.bias"):
        load_projector(model, tmp_path / "short.bin")
    with pytest.raises(FileNotFoundError, match="projector"):
        load_projector(model, tmp_path / "nowhere")


def test_merge_lora_state_dict_equals_peft_merge(session_tokenizer):
    config = tiny_config(session_tokenizer)
    model = tiny_model(config)
    apply_stage(model, get_stage("lora"))
    peft = wrap_lora(model, get_stage("lora"), r=4, alpha=8, dropout=0.0)
    torch.manual_seed(3)
    with torch.no_grad():
        for param in peft.parameters():
            if param.requires_grad:  # LoRA B starts at zero: make the adapters and the projector copy non-trivial
                param.add_(torch.randn_like(param) * 0.05)
    merged = merge_lora_state_dict(peft.state_dict(), scaling=8 / 4)
    plain = tiny_model(config, seed=5)
    plain.load_state_dict(merged, strict=True)
    inputs = tiny_processor(config, session_tokenizer)(images=[make_image(0)], text=["<image>\nWhat? ASSISTANT:"])
    with torch.no_grad():
        expected = peft.eval()(**inputs).logits
        torch.testing.assert_close(plain(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(tiny_model(config)(**inputs).logits, expected, atol=1e-3)
    with pytest.raises(ValueError, match="lora_magnitude"):
        merge_lora_state_dict({"base_model.model.x.lora_magnitude_vector.default": torch.zeros(1)}, 1.0)


def test_lora_targets_every_llm_linear_and_nothing_else(session_tokenizer):
    model = tiny_model(tiny_config(session_tokenizer))
    targets = lora_target_modules(model)
    assert len(targets) == 7 * model.config.text_config.num_hidden_layers  # q k v o gate up down
    assert all(t.startswith("model.language_model.layers.") for t in targets)
    apply_stage(model, get_stage("lora"))
    counts = parameter_counts(wrap_lora(model, get_stage("lora"), r=2, alpha=4, dropout=0.0))
    assert set(counts["trainable"]) == {"lora", "projector"}
    assert counts["frozen"]["projector"] == counts["trainable"]["projector"]  # PEFT keeps the original, frozen


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "lora"])
def test_optimizer_groups_give_the_projector_its_own_lr(session_tokenizer, tmp_path, stage):
    model = tiny_model(tiny_config(session_tokenizer))
    apply_stage(model, get_stage(stage))
    if stage == "lora":
        model = wrap_lora(model, get_stage(stage), r=2, alpha=4, dropout=0.0)
    args = TrainingArguments(tmp_path, use_cpu=True, learning_rate=1e-3, weight_decay=0.1, report_to="none")
    trainer = LlavaStfTrainer(model=model, args=args, projector_lr=7e-5)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            is_projector = "multi_modal_projector" in name
            assert group["lr"] == (7e-5 if is_projector else 1e-3), name  # the official release gave every one 7e-5
            assert group["weight_decay"] == (0.0 if name.endswith("bias") or "norm" in name else 0.1), name
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {g["lr"] for g in optimizer.param_groups} == ({7e-5} if stage == "pretrain" else {7e-5, 1e-3})
