"""Resuming and overwriting: what a killed run leaves behind, and what the next run makes of it.

Tolerance 0: one CPU process runs the same kernels on the same batches in the same order, so every float operation
is repeated bit for bit once the model, optimizer, scheduler, RNG and data position are restored; any difference means
some state was not restored (the first version of this test caught the Trainer reloading nothing, see
``LlavaStfTrainer.save_model``). A kill while a checkpoint is being written is a real SIGKILL of a child process
(its checkpoint write is slowed in the child); "killed" in the other tests is an exception raised from a callback,
after which nothing of the run executes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, TrainerCallback

from llava_stf.errors import UserError
from llava_stf.train.arguments import parse_config
from llava_stf.train.checkpoint import COMPLETE_MARKER, list_checkpoints
from llava_stf.train.fixtures import tiny_run_args
from llava_stf.train.output_dir import RUN_CONFIG, STAGING, run_outputs
from llava_stf.train.run import run


class Killed(Exception):
    """Stands for the process dying: nothing after the raise runs, nothing more is saved."""


class KillAfterCheckpoint(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed after checkpoint-{self.step}")


class KillAtStart(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        raise Killed("killed before the first step")


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
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
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
    assert all(c.complete for c in list_checkpoints(out))
    assert set(out.iterdir()) == set(run_outputs(out))  # RUN_OUTPUTS names everything a run writes


# A child that trains with a checkpoint every 2 steps and, at the write of checkpoint-4, signals and then stalls after
# the weights and the optimizer state are written (the Trainer writes trainer_state.json next): the parent SIGKILLs it.
CHILD = """
import sys, time
from pathlib import Path
from transformers import TrainerState
from llava_stf.train.run import main

write = TrainerState.save_to_json

def stalled(self, path):
    if "checkpoint-4" in str(path):
        Path(sys.argv[1]).write_text("writing")
        time.sleep(600)
    write(self, path)

TrainerState.save_to_json = stalled
sys.exit(main(sys.argv[2:]))
"""


def test_resume_after_a_sigkill_during_a_checkpoint_write(world, tmp_path, caplog):
    out, signal_file = tmp_path / "killed", tmp_path / "writing"
    flags = dict(max_steps=6, save_strategy="steps", save_steps=2, per_device_train_batch_size=8, learning_rate=2e-3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        str(signal_file),
        *tiny_run_args(world.towers, world.instruct, out, "finetune", **flags),
    ]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not signal_file.exists():
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the child never reached checkpoint-4"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stderr.close()
    assert [c.path.name for c in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    partial = out / "checkpoint-4"  # the weights and optimizer state are written, the Trainer's state is not
    assert (partial / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()

    with caplog.at_level(logging.INFO, logger="llava_stf.train"):
        resumed = run(parse_config(tiny_run_args(world.towers, world.instruct, out, "finetune", resume=True, **flags)))
    log = caplog.text
    assert "skipping incomplete checkpoint-4" in log and f"resuming from {out / 'checkpoint-2'}" in log
    assert resumed.state.global_step == 6
    assert [(c.path.name, c.complete) for c in list_checkpoints(out)] == [
        ("checkpoint-2", True),
        ("checkpoint-4", True),
        ("checkpoint-6", True),
    ]
    straight = tmp_path / "straight"
    run(parse_config(tiny_run_args(world.towers, world.instruct, straight, "finetune", **flags)))
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_total_limit_keeps_complete_checkpoints_and_removes_markers_first(world, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-1").mkdir(parents=True)  # a write killed long ago
    (out / "checkpoint-1" / "model.safetensors").write_bytes(b"partial")
    removed = []  # checkpoints whose marker was removed, while the folder was still whole
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == COMPLETE_MARKER and self.exists():
            removed.append((self.parent.name, (self.parent / "model.safetensors").exists()))
        return real_unlink(self, missing_ok=missing_ok)

    flags = dict(max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=1, overwrite_output_dir=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "unlink", unlink)
        run(parse_config(tiny_run_args(world.towers, world.instruct, out, "finetune", **flags)))
    assert [(c.path.name, c.complete) for c in list_checkpoints(out)] == [("checkpoint-6", True)]
    assert removed == [("checkpoint-2", True), ("checkpoint-4", True)]  # each marker before the rest of its folder
    assert json.loads((out / "checkpoint-6" / COMPLETE_MARKER).read_text()) == {"global_step": 6}


@pytest.fixture
def finished(world, tmp_path):
    """A finished stage-2 run with checkpoints, plus a file of the user's."""
    out = tmp_path / "run"
    run(parse_config(argv(world, out, "finetune", num_train_epochs=1)))
    (out / "notes.txt").write_text("mine")
    assert (out / "model.safetensors").is_file() and list_checkpoints(out)
    return out


def test_an_overwrite_killed_early_leaves_no_loadable_old_model(world, finished):
    AutoModelForImageTextToText.from_pretrained(finished)  # loads before the overwrite
    with pytest.raises(Killed):
        run(parse_config(argv(world, finished, "finetune", overwrite_output_dir=True)), callbacks=[KillAtStart()])
    with pytest.raises((OSError, ValueError), match="config.json"):
        AutoModelForImageTextToText.from_pretrained(finished)
    assert sorted(p.name for p in finished.iterdir()) == ["notes.txt", RUN_CONFIG]  # the new run's config, no old model


def test_an_overwrite_removes_nothing_before_its_inputs_are_checked(world, finished):
    before = sorted(p.name for p in finished.rglob("*"))
    with pytest.raises(UserError, match="holds no records"):
        data = world.instruct.parent / "empty.json"
        data.write_text("[]")
        run(parse_config(tiny_run_args(world.towers, data, finished, "finetune", overwrite_output_dir=True)))
    with pytest.raises(OSError):
        run(parse_config(argv(world, finished, "finetune", overwrite_output_dir=True, llm=world.root / "no_llm")))
    assert sorted(p.name for p in finished.rglob("*")) == before


def test_an_overwrite_by_another_stage_leaves_no_stale_weights(world, finished):
    run(parse_config(tiny_run_args(world.towers, world.captions, finished, "pretrain", overwrite_output_dir=True)))
    names = {p.name for p in finished.iterdir()}
    assert "projector.safetensors" in names and "model.safetensors" not in names and "notes.txt" in names
    assert not list_checkpoints(finished) and STAGING not in names
