"""What a trained checkpoint's image tokens carry: linear probes on the tokens its LLM reads.

The miniature's question answering is bounded by its tiny LLM (the caption recipe reads colour and count and little
else), so accuracy alone cannot show what a projector keeps or loses. This measures the projector side on its own:
each scene of the generated world goes through the checkpoint's tower and projector (``get_image_features``, the
``[tokens, D]`` the LLM receives), and one linear probe per attribute (``demo.probe.linear_probe``) is fitted on the
training scenes and scored on the held-out ones, reading the token whose area covers a point: each object's centre
(its ``color`` and ``shape``) and, in a ``detail`` world, the tiny dot's centre (its colour, ``dot``). At 64 px the
dot fills about 18 % of an 8-px patch and 4 % of the 2 x 2 patches a 4x projector fuses into one token: what survives
the fusion is what this reads. Tokens must form a square grid in raster order (every projector of ``compare``; not a
token reducer's selection).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image

from ..data.synthetic import COLORS, GRID, SHAPES, Scene
from ..eval.answers import read_jsonl
from .probe import linear_probe

ATTRIBUTES = ("dot", "color", "shape")


def token_at(x: float, y: float, size: int, side: int) -> int:
    """The raster index of the token covering pixel ``(x, y)`` of a ``size``-px image read as ``side x side``."""
    return min(int(y / size * side), side - 1) * side + min(int(x / size * side), side - 1)


@torch.no_grad()
def token_features(checkpoint: Path, data: Path, batch_size: int = 100) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per attribute: ``(features [N, D], labels [N], training mask [N])`` from the image tokens of ``checkpoint``
    on the generated world in ``data`` (its ``scenes.jsonl``; training scenes are the images of ``pretrain.json``).
    Attributes without samples (``dot`` in a world without dots) are left out."""
    from ..loading import load_checkpoint

    model, processor = load_checkpoint(checkpoint, torch.device("cpu"), torch.float32)
    size = model.config.vision_config.image_size
    scenes = [Scene.from_json(s) for s in read_jsonl(data / "scenes.jsonl")]
    training = {r["image"] for r in json.loads((data / "pretrain.json").read_text()) if r.get("image")}
    samples: dict[str, tuple[list, list, list]] = {a: ([], [], []) for a in ATTRIBUTES}
    cell = size / GRID
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        images = [Image.open(data / s.image).convert("RGB") for s in chunk]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        tokens = model.model.get_image_features(pixel_values=pixels).pooler_output  # n x [tokens, D]
        for scene, image_tokens in zip(chunk, tokens):
            side = math.isqrt(len(image_tokens))
            if side * side != len(image_tokens):
                raise ValueError(f"{checkpoint}: {len(image_tokens)} image tokens are not a square grid")
            points = [("color", (o.col + 0.5) * cell, (o.row + 0.5) * cell, list(COLORS).index(o.color))
                      for o in scene.objects]  # fmt: skip
            points += [("shape", x, y, SHAPES.index(o.shape)) for (_, x, y, _), o in zip(points, scene.objects)]
            if scene.dot is not None:
                d = scene.dot
                points.append(
                    ("dot", (d.col + 0.5 + d.dx) * cell, (d.row + 0.5 + d.dy) * cell, list(COLORS).index(d.color))
                )
            for attribute, x, y, label in points:
                features, labels, train = samples[attribute]
                features.append(image_tokens[token_at(x, y, size, side)].float())
                labels.append(label)
                train.append(scene.image in training)
    return {a: (torch.stack(f), torch.tensor(y), torch.tensor(t)) for a, (f, y, t) in samples.items() if f}


def probe_tokens(checkpoint: Path, data: Path) -> dict[str, float]:
    """Held-out accuracy (percent) of a linear probe per attribute of ``token_features`` (``probe_<attribute>``)."""
    out = {}
    for attribute, (features, labels, train) in token_features(checkpoint, data).items():
        out[f"probe_{attribute}"] = linear_probe(features[train], labels[train], features[~train], labels[~train])
    return out


__all__ = ["ATTRIBUTES", "probe_tokens", "token_at", "token_features"]
