"""Resuming: a run killed after a checkpoint and resumed ends with exactly the weights of an uninterrupted run.

Tolerance 0: one CPU process runs the same kernels on the same batches in the same order, so every float operation
is repeated bit for bit once the model, optimizer, scheduler, RNG and data position are restored; any difference means
some state was not restored (the first version of this test caught the Trainer reloading nothing, see
``LlavaStfTrainer.save_model``).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from llava_stf.train.arguments import parse_config
from llava_stf.train.fixtures import tiny_run_args
from llava_stf.train.run import run


class Killed(Exception):
    """Stands for the process dying: nothing after the raise runs, nothing more is saved."""


class KillAfterCheckpoint(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed after checkpoint-{self.step}")


def argv(world, out, stage, **extra):
    settings = dict(
        num_train_epochs=2,  # 48 samples / (4 x 2 accumulation) = 6 steps per epoch, 12 in all
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=2e-3,
        warmup_steps=0.1,
        group_by_modality_length=True,
        save_strategy="steps",
        save_steps=4,
        lora_r=4,
        lora_alpha=8,
    )
    return tiny_run_args(world.towers, world.instruct, out, stage, **{**settings, **extra})


@pytest.mark.parametrize("stage", ["finetune", "lora"])
def test_killed_and_resumed_run_equals_a_straight_run(world, tmp_path, stage):
    straight = run(parse_config(argv(world, tmp_path / "straight", stage)))
    with pytest.raises(Killed):
        run(parse_config(argv(world, tmp_path / "killed", stage)), callbacks=[KillAfterCheckpoint(8)])
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    resumed = run(parse_config(argv(world, tmp_path / "killed", stage, resume=True)))
    assert resumed.state.global_step == straight.state.global_step == 12
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    # The resumed run replayed the same batches: its last logged losses are the straight run's.
    tail = [h["loss"] for h in straight.state.log_history if "loss" in h][-4:]
    assert [h["loss"] for h in resumed.state.log_history if "loss" in h][-4:] == tail


def test_output_folder_rules(world, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(parse_config(argv(world, out, "finetune", resume=True)))
    with pytest.raises(Killed):
        run(parse_config(argv(world, out, "finetune")), callbacks=[KillAfterCheckpoint(4)])
    with pytest.raises(FileExistsError, match="already holds a run"):
        run(parse_config(argv(world, out, "finetune")))
    with pytest.raises(ValueError, match="training.learning_rate"):
        run(parse_config(argv(world, out, "finetune", resume=True, learning_rate=1e-3)))
    trainer = run(parse_config(argv(world, out, "finetune", overwrite_output_dir=True, num_train_epochs=1)))
    assert trainer.state.global_step == 6 and sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-4",
        "checkpoint-6",
    ]
