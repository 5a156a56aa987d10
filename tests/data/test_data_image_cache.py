"""``image_cache_mb``: processed images kept in memory, keyed by the file as it is now, within a memory bound."""

from __future__ import annotations

import os

import pytest
import torch

from llava_stf.data import dataset as dataset_module
from llava_stf.data.conversation import get_template
from llava_stf.data.dataset import LazySupervisedDataset
from llava_stf.data.image_cache import ImageCache
from llava_stf.data.images import MISSING_IMAGE
from llava_stf.testing import make_image, tiny_config, tiny_processor

RECORDS = [
    {"id": name, "image": f"{name}.png",
     "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A square."}]}
    for name in ("a", "b", "c")
]  # fmt: skip


@pytest.fixture(scope="module")
def processor(session_tokenizer):
    return tiny_processor(tiny_config(session_tokenizer), session_tokenizer)


@pytest.fixture
def folder(tmp_path):
    for i, name in enumerate("abc"):
        make_image(i, (40, 32)).save(tmp_path / f"{name}.png")
    return tmp_path


@pytest.fixture
def opened(monkeypatch):
    """Names of the image files the dataset decodes."""
    names: list[str] = []
    load = dataset_module.load_image

    def counted(path, limits):
        names.append(path.name)
        return load(path, limits)

    monkeypatch.setattr(dataset_module, "load_image", counted)
    return names


def make(processor, folder, mb):
    return LazySupervisedDataset(RECORDS, processor, get_template("vicuna_v1"), image_folder=folder, image_cache_mb=mb)


def test_cached_items_equal_fresh_ones_and_each_file_is_decoded_once(processor, folder, opened):
    cached, plain = make(processor, folder, 16), make(processor, folder, 0)
    for _ in range(3):
        for i in range(3):
            a, b = cached[i], plain[i]
            assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert opened.count("a.png") == 1 + 3  # once for the cache, three times without it
    assert (cached.image_cache.hits, cached.image_cache.misses) == (6, 3)


def test_a_changed_or_removed_file_is_read_again(processor, folder, opened):
    ds = make(processor, folder, 16)
    first = ds[0]["pixel_values"]
    make_image(7, (40, 32)).save(folder / "a.png")
    os.utime(folder / "a.png", ns=(1, 1))  # a new modification time even within the clock's resolution
    assert not torch.equal(ds[0]["pixel_values"], first) and opened.count("a.png") == 2
    (folder / "a.png").unlink()
    assert ds[0]["data_events"]["skipped"] == [MISSING_IMAGE]  # reported as without a cache, never served stale


def test_the_bound_is_kept_and_zero_is_off(processor, folder, opened):
    one = make(processor, folder, 16)
    one[0]
    per_image = one.image_cache.used
    ds = make(processor, folder, 1.5 * per_image / 2**20)
    for i in (0, 1, 2, 0, 1, 2):
        ds[i]
    assert len(ds.image_cache.entries) == 1 and ds.image_cache.used <= ds.image_cache.limit
    off = make(processor, folder, 0)
    off[0], off[0]
    assert not off.image_cache.entries and off.image_cache.hits == off.image_cache.misses == 0
    with pytest.raises(ValueError, match="image_cache_mb"):
        ImageCache(-1)
