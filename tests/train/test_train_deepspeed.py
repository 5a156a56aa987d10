"""DeepSpeed on CPU: the shipped scripts launch 2 processes (torchrun, gloo) for a few steps of each stage.

Stage 1 under ZeRO-2 writes the projector; stage 2 under ZeRO-3 starts from it and saves a full model; the LoRA
stage under ZeRO-3 saves an adapter and a merged model. The first DeepSpeed run on a machine compiles its
shared-memory op (about 20 s, cached in the torch extensions folder).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPVisionModel

from llava_stf.testing import make_image
from llava_stf.train.checkpoint import PROJECTOR_FILE, list_checkpoints
from llava_stf.train.fixtures import write_color_dataset

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TINY = {  # on top of the shipped YAML: tiny towers, CPU, 3 steps
    "use_cpu": True,
    "bf16": False,
    "tf32": False,
    "report_to": "none",
    "dataloader_num_workers": 0,
    "max_steps": 3,
    "save_strategy": "no",
    "logging_steps": 1,
    "disable_tqdm": True,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, tmp_path: Path, **settings) -> str:
    """Run ``scripts/<script>`` with 2 processes, global batch 8 (2 per process x 2 accumulation); return its log."""
    config = tmp_path / f"{script}.yaml"
    config.write_text(
        yaml.safe_dump({**TINY, **{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}})
    )
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "LAUNCHER": "torchrun",
        "NUM_GPUS": "2",
        "PER_DEVICE_BATCH": "2",
        "GLOBAL_BATCH": "8",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }
    out = subprocess.run(
        [ROOT / "scripts" / script, "--config", config], env=env, capture_output=True, text=True, timeout=600
    )
    log = out.stdout + out.stderr
    errors = [line for line in log.splitlines() if "Error" in line and "error_file" not in line]
    assert out.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + log[-3000:]
    assert "'data/samples': '12'" in log  # 3 steps x 2 accumulation x 2 per process, on each of 2 processes
    return log


def tiny(world, data: Path, out: Path, **extra) -> dict:
    return dict(vision_tower=world.towers[0], llm=world.towers[1], data_path=data, image_folder=data.parent,
                output_dir=out, projector_kwargs={}, **extra)  # fmt: skip


def reloads_and_generates(folder: Path, template: str) -> AutoModelForImageTextToText:
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.conversation_template == template
    inputs = processor(images=[make_image(0)], text=["USER: <image>\nWhat color is the image? ASSISTANT:"])
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] > inputs["input_ids"].shape[1]
    return model


@pytest.fixture(scope="module")
def stage1(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "stage1"
    launch("pretrain.sh", out.parent, **tiny(world, world.captions, out))  # zero2.json, activation checkpointing
    return out


def test_zero2_pretrain_writes_the_projector(stage1):
    saved = load_file(stage1 / PROJECTOR_FILE)
    assert saved and all(k.startswith(("mbtf.", "stf.")) for k in saved)
    run_config = yaml.safe_load((stage1 / "run_config.yaml").read_text())
    assert run_config["training"]["gradient_accumulation_steps"] == 2
    assert run_config["training"]["deepspeed"] == "configs/deepspeed/zero2.json"


def test_zero3_finetune_starts_from_the_stage1_projector(world, stage1, tmp_path):
    out = tmp_path / "stage2"
    launch("finetune.sh", tmp_path, **tiny(world, world.instruct, out, pretrained_projector=stage1,
                                           save_strategy="steps", save_steps=2))  # fmt: skip
    # both processes' ZeRO-3 shards are in the checkpoint marked complete; save_total_limit 1 (the YAML's) removed the
    # checkpoint of step 2 once that of step 3 was complete
    assert [(c.step, c.complete) for c in list_checkpoints(out)] == [(3, True)]
    assert list((out / "checkpoint-3").rglob("*zero_pp_rank_1_*optim_states.pt"))
    model = reloads_and_generates(out, "vicuna_v1")
    tower = CLIPVisionModel.from_pretrained(world.towers[0]).state_dict()
    mine = model.model.vision_tower.state_dict()
    assert tower.keys() == mine.keys()
    assert all(torch.equal(tower[k], mine[k]) for k in tower)  # frozen under ZeRO-3, gathered on save
    start = load_file(stage1 / PROJECTOR_FILE)
    trained = model.model.multi_modal_projector.state_dict()
    gaps = [float((trained[k] - start[k]).abs().max()) for k in start]
    assert 0 < max(gaps) < 1e-3  # 3 Adam steps at lr 2e-5 from the stage-1 weights


def test_zero3_lora_saves_adapter_and_merged_model(world, stage1, tmp_path):
    out = tmp_path / "lora"
    launch("finetune_lora.sh", tmp_path, **tiny(world, world.instruct, out, pretrained_projector=stage1,
                                                 lora_r=4, lora_alpha=8))  # fmt: skip
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    reloads_and_generates(out, "vicuna_v1")


def test_zero2_with_both_caches_trains_as_without(world, tmp_path):
    """Stage 1 under ZeRO-2 (two processes, each its own caches): 8 records, 3 steps of 8 = 3 epochs, the same loss
    at every step. (ZeRO-3 refuses the feature cache: tests/train/test_train_feature_cache.py.)"""
    data = write_color_dataset(tmp_path / "small", 8, stage="pretrain")

    def losses(name: str, **caches) -> list[str]:
        (tmp_path / name).mkdir()
        log = launch("pretrain.sh", tmp_path / name, **tiny(world, data, tmp_path / name / "out", **caches))
        return re.findall(r"'loss': '?([0-9.]+)", log)

    plain = losses("plain")
    cached = losses("cached", image_cache_mb=16, vision_feature_cache_mb=16)
    assert len(plain) == 3 and cached == plain
