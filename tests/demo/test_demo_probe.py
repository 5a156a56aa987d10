"""Linear probes of the demo's frozen vision tower: the yardstick of what the LLM can read from the image."""

from __future__ import annotations

import pytest
import torch

from llava_stf.data.synthetic import FAMILIES
from llava_stf.demo.__main__ import main
from llava_stf.demo.probe import ATTRIBUTES, linear_probe, probe_tower


def test_linear_probe_separates_what_is_linear_and_not_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=gen)
    signal = torch.nn.functional.one_hot(labels, 4).float() * 3 + 0.3 * torch.randn(400, 4, generator=gen)
    features = torch.cat([signal, torch.randn(400, 12, generator=gen)], dim=1)
    assert linear_probe(features[:300], labels[:300], features[300:], labels[300:]) == 100.0
    noise = torch.randn(400, 16, generator=gen)  # features that say nothing about the labels
    assert linear_probe(noise[:300], labels[:300], noise[300:], labels[300:]) < 50.0
    with pytest.raises(ValueError, match="no training or no held-out"):
        linear_probe(features[:0], labels[:0], features, labels)


@pytest.mark.slow
def test_probe_reads_every_attribute_from_the_demo_folder(demo_out, capsys) -> None:
    if not (demo_out / "vision" / "config.json").is_file():  # the pipeline test normally made it already
        assert main(["--fast", "--out", str(demo_out), "--no-progress", "--no-chat"]) == 0
    metrics = probe_tower(demo_out / "vision", demo_out / "synthetic")
    assert set(ATTRIBUTES) <= set(FAMILIES) and metrics["objects"] > 0
    assert all(0.0 <= metrics[a] <= 100.0 for a in ATTRIBUTES)
    capsys.readouterr()
    assert main(["probe", "--out", str(demo_out)]) == 0
    assert "linear probes on" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="run `python -m llava_stf.demo"):
        main(["probe", "--out", str(demo_out / "nothing-here")])
    assert main(["probe", "--out", str(demo_out), "--layer", "99"]) == 1  # a layer the tower lacks: one line
    assert "error: --layer 99: the tower has hidden states" in capsys.readouterr().err
