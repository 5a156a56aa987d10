"""Shared by the training tests: one thread per process, tiny tower checkpoints and generated data sets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llava_stf.train.fixtures import save_tiny_towers, write_color_dataset


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Tiny CLIP + Llama checkpoints, captions (stage 1) and instructions (stage 2: multi-turn, text-only)."""
    root = tmp_path_factory.mktemp("train_world")
    return SimpleNamespace(
        root=root,
        towers=save_tiny_towers(root / "towers"),
        captions=write_color_dataset(root / "captions", 48, stage="pretrain"),
        instruct=write_color_dataset(root / "instruct", 48, text_only_every=6, multi_turn_every=4),
    )
