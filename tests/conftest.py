"""Shared fixtures: everything is tiny, offline and CPU-only (see ``llava_stf.testing``)."""

from __future__ import annotations

import os

# Before anything imports transformers / huggingface_hub / wandb.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from llava_stf.testing import IMAGE_TOKEN, tiny_tokenizer  # noqa: E402

# Tiny models gain nothing from a second thread and lose a lot (10x) when other processes share the cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def session_tokenizer():
    """One tiny tokenizer for the whole run. Do not mutate it (use ``tokenizer`` for that)."""
    return tiny_tokenizer()


@pytest.fixture
def tokenizer():
    """A fresh tiny tokenizer (cheap to build), safe to mutate (``padding_side``, ...)."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def image_token_id(session_tokenizer) -> int:
    token_id = session_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert isinstance(token_id, int) and token_id != session_tokenizer.unk_token_id
    return token_id


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same global RNG state and restores the grad mode it found."""
    torch.manual_seed(0)
    grad_enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(grad_enabled)
