"""Fixtures for the evaluation tests (the benchmark layout builders are in ``eval_fixtures.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_stf.eval.__main__ import default_model_id
from llava_stf.provenance import checkpoint_digest
from llava_stf.testing import save_tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny MBTF+STF checkpoint (model + processor, template vicuna_v1), saved once per session."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llava-stf-tiny")


@pytest.fixture(scope="session")
def model_id(checkpoint) -> str:
    """The checkpoint's default model id: folder name + digest (``llava-stf-tiny-1a2b3c4d``)."""
    return default_model_id(checkpoint, checkpoint_digest(checkpoint))
