"""``python -m llava_stf.demo probe``: what the demo's frozen vision tower encodes, measured by linear probes.

Every answer the tiny LLaVA gives about an object has to come through the tower's features; a family the tower
does not encode cannot be learned downstream, whatever the projector or the LLM. This reads the tower's hidden
states (``--layer``, default -2: the layer LLaVA-1.5's projector reads) at the patch under each object's centre in
the generated world, fits one linear classifier per attribute (colour, shape, grid position) on the training
scenes' objects and reports its accuracy on the held-out scenes' objects. Position is read from the features alone
(the patch is chosen by the object's place, but the classifier sees only its features): an LLM with rotary
positions has to find "top left" in the content of the image tokens, so this is what it can find there.

Run after ``python -m llava_stf.demo`` (it reuses that folder's world and tower). The same probe is the yardstick of
a tower pre-training recipe: the LLM's accuracy on a family is bounded by what this finds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPVisionModel

from ..data.synthetic import COLORS, GRID, SHAPES, Scene
from ..errors import UserError
from ..eval.answers import read_jsonl

ATTRIBUTES = ("color", "shape", "position")


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_eval: torch.Tensor, y_eval: torch.Tensor,
                 steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-3) -> float:  # fmt: skip
    """Accuracy (percent) on ``(x_eval, y_eval)`` of a softmax classifier fitted to ``(x_train, y_train)``.

    Args:
        x_train: ``[N, D]`` features; standardised with the training statistics (also applied to ``x_eval``).
        y_train: ``[N]`` class ids; ``x_eval`` ``[M, D]``, ``y_eval`` ``[M]``.
    """
    if len(x_train) == 0 or len(x_eval) == 0:
        raise ValueError("linear_probe: no training or no held-out samples")
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_eval = (x_train - mean) / std, (x_eval - mean) / std
    classes = int(max(y_train.max(), y_eval.max())) + 1
    weight = torch.zeros(x_train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        logits = x_train @ weight + bias
        loss = torch.nn.functional.cross_entropy(logits, y_train) + weight_decay * weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return 100.0 * ((x_eval @ weight + bias).argmax(-1) == y_eval).float().mean().item()


@torch.no_grad()
def object_features(tower: Path, data: Path, layer: int = -2, batch_size: int = 100):
    """Features ``[N, D]`` of the patch under each object's centre, labels ``{attribute: [N]}`` and a ``[N]`` mask of
    objects from training scenes (the images of ``pretrain.json``; the others are the held-out ones), for the
    generated world in ``data`` (its ``scenes.jsonl``). A ``layer`` the tower does not have is a ``UserError``."""
    model = CLIPVisionModel.from_pretrained(tower).eval()
    states = model.config.num_hidden_layers + 1  # the embeddings, then one per block
    if not -states <= layer < states:
        raise UserError(f"--layer {layer}: the tower has hidden states -{states}..{states - 1}")
    processor = CLIPImageProcessorPil.from_pretrained(tower)
    grid = model.config.image_size // model.config.patch_size
    scenes = [Scene.from_json(s) for s in read_jsonl(data / "scenes.jsonl")]
    training = {r["image"] for r in json.loads((data / "pretrain.json").read_text()) if r.get("image")}
    features, train, labels = [], [], {a: [] for a in ATTRIBUTES}
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        pixels = processor([Image.open(data / s.image).convert("RGB") for s in chunk], return_tensors="pt")
        hidden = model(pixel_values=pixels["pixel_values"], output_hidden_states=True).hidden_states[layer]
        for scene, patches in zip(chunk, hidden[:, 1:]):  # [grid * grid, D] without CLS
            for obj in scene.objects:
                row, col = int((obj.row + 0.5) / GRID * grid), int((obj.col + 0.5) / GRID * grid)
                features.append(patches[row * grid + col])
                train.append(scene.image in training)
                labels["color"].append(list(COLORS).index(obj.color))
                labels["shape"].append(SHAPES.index(obj.shape))
                labels["position"].append(obj.row * GRID + obj.col)
    return torch.stack(features), {a: torch.tensor(v) for a, v in labels.items()}, torch.tensor(train)


def probe_tower(tower: Path, data: Path, layer: int = -2) -> dict[str, float]:
    """Held-out accuracy (percent) of a linear probe per attribute (``ATTRIBUTES``), plus ``objects`` held out."""
    features, labels, train = object_features(tower, data, layer)
    result = {a: linear_probe(features[train], y[train], features[~train], y[~train]) for a, y in labels.items()}
    return {**result, "objects": int((~train).sum())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_stf.demo probe", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("playground/demo"), help="the demo's artifact folder")
    parser.add_argument("--layer", type=int, default=-2, help="hidden-state index (default -2, LLaVA-1.5's)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the CLIP checkpoint's text tower is reported as unused when only vision loads
    hf_logging.disable_progress_bar()
    tower, data = args.out / "vision", args.out / "synthetic"
    missing = [str(p) for p in (tower / "config.json", data / "scenes.jsonl") if not p.is_file()]
    if missing:
        hint = f"run `python -m llava_stf.demo --out {args.out}` first"
        raise SystemExit(f"error: {', '.join(missing)} not found; {hint}")
    m = probe_tower(tower, data, args.layer)
    print(f"vision tower {tower}, hidden states {args.layer}: linear probes on {m['objects']} held-out objects")
    for attribute in ATTRIBUTES:
        print(f"    {attribute:9} {m[attribute]:5.1f}%")
    return 0


__all__ = ["ATTRIBUTES", "linear_probe", "main", "object_features", "probe_tower"]
