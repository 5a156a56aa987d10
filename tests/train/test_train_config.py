"""Run configuration (YAML -> dataclasses -> CLI), the shipped configs and scripts, and the DeepSpeed files."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from llava_stf.train.arguments import parse_config
from llava_stf.train.run import check_deepspeed_optimizer

ROOT = Path(__file__).resolve().parents[2]
CPU = ["--deepspeed", "", "--tf32", "false", "--use_cpu", "true", "--report_to", "none"]  # GPU-only settings off


def parse(*argv):
    return parse_config([str(a) for a in argv])


@pytest.mark.parametrize(
    ("name", "stage", "lr", "per_device", "global_batch", "deepspeed"),
    [
        ("pretrain", "pretrain", 1e-3, 32, 256, "zero2.json"),
        ("finetune", "finetune", 2e-5, 16, 128, "zero3.json"),
        ("finetune_lora", "lora", 2e-4, 16, 128, "zero3.json"),
    ],
)
def test_shipped_configs_hold_the_paper_defaults(name, stage, lr, per_device, global_batch, deepspeed):
    path = ROOT / "configs" / "train" / f"{name}.yaml"
    raw = parse("--config", path, *CPU)
    t = raw.training
    assert raw.stage.stage == stage and t.learning_rate == lr
    assert t.per_device_train_batch_size * 8 * t.gradient_accumulation_steps == global_batch
    assert (t.num_train_epochs, t.warmup_steps, t.weight_decay, t.lr_scheduler_type.value) == (1, 0.03, 0.0, "cosine")
    assert t.bf16 and t.activation_checkpointing and raw.data.model_max_length == 2048
    assert raw.model.vision_tower == "openai/clip-vit-large-patch14-336" and raw.model.llm == "lmsys/vicuna-7b-v1.5"
    assert raw.model.projector_type == "mbtf_stf"
    text = path.read_text()
    assert "tf32: true" in text and f"deepspeed: configs/deepspeed/{deepspeed}" in text
    assert (ROOT / "configs" / "deepspeed" / deepspeed).is_file()
    if stage != "pretrain":
        assert raw.data.group_by_modality_length and raw.model.pretrained_projector
    if stage == "lora":
        assert (raw.stage.lora_r, raw.stage.lora_alpha, raw.stage.projector_lr) == (128, 256, 2e-5)


def test_later_yaml_then_cli_override(tmp_path):
    paper = ROOT / "configs" / "train" / "data-cc595k.yaml"
    cfg = parse("--config", ROOT / "configs/train/pretrain.yaml", "--config", paper, *CPU, "--learning_rate", "5e-4")
    assert cfg.data.data_path.endswith("LLaVA-CC3M-Pretrain-595K/chat.json") and cfg.training.learning_rate == 5e-4
    yaml_text = "stage: lora\ndata_path: a\nvision_tower: v\nllm: l\nprojector_kwargs: {window: 4}\n"
    (tmp_path / "a.yaml").write_text(yaml_text)
    cfg = parse("--config", tmp_path / "a.yaml", "--use_cpu", "true", "--vision_feature_layer", "-2", "-5")
    assert cfg.model.projector_kwargs == {"window": 4} and cfg.model.vision_feature_layer == [-2, -5]
    cfg = parse("--config", tmp_path / "a.yaml", "--use_cpu", "true", "--projector_kwargs", '{"window": 8}')
    assert cfg.model.projector_kwargs == {"window": 8}


def test_preset_fills_only_unset_model_fields(tmp_path):
    base = ["--data_path", "d.json", "--use_cpu", "true"]
    cfg = parse("--preset", "llava-v1.5-7b", *base, "--vision_tower", "/local/clip")
    assert cfg.model.projector_type == "mlp2x_gelu" and cfg.model.vision_tower == "/local/clip"
    assert cfg.model.llm == "lmsys/vicuna-7b-v1.5"
    with pytest.raises(ValueError, match="valid presets"):
        parse("--preset", "llava-v9", *base)


def test_bad_configs_fail_with_the_names(tmp_path):
    (tmp_path / "typo.yaml").write_text("learning_rat: 1.0e-3\n")
    with pytest.raises(ValueError, match="learning_rat.*learning_rate"):
        parse("--config", tmp_path / "typo.yaml")
    with pytest.raises(ValueError, match="data_path"):
        parse("--vision_tower", "v", "--llm", "l", "--use_cpu", "true")
    with pytest.raises(ValueError, match="valid stages"):
        parse("--vision_tower", "v", "--llm", "l", "--data_path", "d", "--stage", "sft", "--use_cpu", "true")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ValueError, match="flat mapping"):
        parse("--config", tmp_path / "list.yaml")


def test_deepspeed_configs():
    names = ("zero2", "zero3", "zero3_offload")
    ds = {n: json.loads((ROOT / "configs/deepspeed" / f"{n}.json").read_text()) for n in names}
    assert [ds[n]["zero_optimization"]["stage"] for n in ds] == [2, 3, 3]
    for config in ds.values():
        assert "train_batch_size" not in config  # filled while world_size is still 1 (as in Roblox/FAI-RL#72)
        assert config["gradient_clipping"] == "auto" and config["bf16"]["enabled"] == "auto"
    assert ds["zero3"]["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["zero3_offload"]["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "scheduler" not in ds["zero3_offload"]  # upstream's WarmupLR silently replaced the cosine schedule


def test_projector_lr_is_refused_with_a_deepspeed_optimizer(tmp_path):
    cfg = parse("--vision_tower", "v", "--llm", "l", "--data_path", "d", "--use_cpu", "true", "--projector_lr", "1e-5")
    cfg.training.deepspeed = str(ROOT / "configs/deepspeed/zero3_offload.json")
    with pytest.raises(ValueError, match="projector_lr"):
        check_deepspeed_optimizer(cfg)
    cfg.training.deepspeed = str(ROOT / "configs/deepspeed/zero3.json")
    check_deepspeed_optimizer(cfg)


def dry_run(script: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "DRY_RUN": "1", **{k: str(v) for k, v in env.items()}}
    return subprocess.run([ROOT / "scripts" / script, "--output_dir", "x"], env=full, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("script", "global_batch"), [("pretrain.sh", 256), ("finetune.sh", 128), ("finetune_lora.sh", 128)]
)
def test_scripts_keep_the_global_batch(script, global_batch, tmp_path):
    out = dry_run(script, NUM_GPUS=2, PER_DEVICE_BATCH=4)
    assert out.returncode == 0, out.stderr
    assert f"--gradient_accumulation_steps {global_batch // 8} " in out.stdout and "--output_dir x" in out.stdout
    assert out.stdout.startswith("deepspeed --num_gpus 2 ")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode1 slots=8\nnode2 slots=8\n")
    out = dry_run(script, HOSTFILE=hostfile, PER_DEVICE_BATCH=2)
    assert f"--hostfile {hostfile}" in out.stdout
    assert f"--gradient_accumulation_steps {global_batch // 32} " in out.stdout
    out = dry_run(script, NUM_GPUS=3)
    assert out.returncode == 2 and "not a multiple" in out.stderr
    out = dry_run(script, DATA="paper", LAUNCHER="torchrun", NUM_GPUS=1, PER_DEVICE_BATCH=global_batch)
    assert out.stdout.startswith("torchrun --nproc_per_node 1 ") and "data-" in out.stdout
