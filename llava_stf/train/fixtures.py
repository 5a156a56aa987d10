"""Offline stand-ins for a training run: tiny tower checkpoints and a generated LLaVA-format data set.

``save_tiny_towers`` writes a CLIP vision checkpoint and a Llama checkpoint whose tokenizer has neither ``<image>``
nor a pad token (like Vicuna), so ``llava_stf.model.builder.build_model`` runs its real path (``NEXT_TOWER``: the
tower overrides of the tiny AnyRes kit, 56-px crops of 8x8 patches). ``write_color_dataset``
draws flat-colour images from a few classes and writes stage-1 (caption) or stage-2 (instruction, some multi-turn,
some text-only) records whose answers depend on the colour, so the loss can only fall far if the projector carries
the image. Used by the tests and ``llava_stf.bench.train``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionModel, LlamaForCausalLM

from llava_stf.testing import (
    TINY_NEXT_CROP,
    TINY_NEXT_PATCH,
    tiny_image_processor,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)

NEXT_TOWER = {"image_size": TINY_NEXT_CROP, "patch_size": TINY_NEXT_PATCH}  # save_tiny_towers(vision_overrides=)

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}


def save_tiny_towers(
    folder: str | Path,
    vision_overrides: dict[str, Any] | None = None,
    text_overrides: dict[str, Any] | None = None,
    image_size: int | None = None,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Save a tiny CLIP vision tower (with its image processor) and a tiny Llama (with its tokenizer).

    Returns:
        ``(vision_dir, llm_dir)``, loadable by ``build_model``.
    """
    folder = Path(folder)
    torch.manual_seed(seed)
    vision_config = tiny_vision_config(**(vision_overrides or {}))
    vision_dir, llm_dir = folder / "clip", folder / "llm"
    CLIPVisionModel(vision_config).save_pretrained(vision_dir)
    tiny_image_processor(image_size or vision_config.image_size).save_pretrained(vision_dir)
    tokenizer = tiny_tokenizer(with_image_token=False, with_pad_token=False)
    llm = LlamaForCausalLM(tiny_text_config(len(tokenizer), pad_token_id=None, **(text_overrides or {})))
    llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    return vision_dir, llm_dir


def color_image(name: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A flat image of colour ``name`` with a little noise, ``size`` = (width, height)."""
    base = np.array(COLORS[name], dtype=np.int16)
    noise = rng.integers(-12, 13, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def write_color_dataset(
    folder: str | Path,
    num_samples: int,
    stage: str = "finetune",
    num_colors: int = 4,
    text_only_every: int = 0,
    multi_turn_every: int = 0,
    image_size: tuple[int, int] = (40, 32),
    seed: int = 0,
    sizes: list[tuple[int, int]] | None = None,
) -> Path:
    """Write ``folder/images/*.png`` and ``folder/data.json`` in the LLaVA format; return the JSON path.

    Args:
        folder: output folder (the image folder of the records).
        num_samples: number of records.
        stage: ``"pretrain"`` (``<image>`` + instruction, caption answer) or ``"finetune"`` (questions).
        num_colors: colour classes used (at most ``len(COLORS)``).
        text_only_every: every n-th record is text-only (0: none); ``finetune`` only.
        multi_turn_every: every n-th image record has a second round (0: none); ``finetune`` only.
        image_size: (width, height) of the images.
        seed: image noise and class order.
        sizes: (width, height) of the i-th image record, in turn (instead of ``image_size``): images of several
            shapes, so an AnyRes model cuts them into different numbers of tiles.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLORS)[:num_colors]
    records = []
    for i in range(num_samples):
        name = names[int(rng.integers(len(names)))]
        if stage == "finetune" and text_only_every and i % text_only_every == text_only_every - 1:
            conv = [("human", f"Say the word {name}."), ("gpt", f"{name}")]
            records.append(_record(i, None, conv))
            continue
        path = f"images/{i:05d}.png"
        color_image(name, sizes[i % len(sizes)] if sizes else image_size, rng).save(folder / path)
        if stage == "pretrain":
            conv = [("human", "Describe the image briefly.\n<image>"), ("gpt", f"a {name} picture")]
        else:
            conv = [("human", "<image>\nWhat color is the image?"), ("gpt", f"The image is {name}.")]
            if multi_turn_every and i % multi_turn_every == 0:
                conv += [("human", "Is it large?"), ("gpt", f"It is a small {name} square.")]
        records.append(_record(i, path, conv))
    data_path = folder / "data.json"
    data_path.write_text(json.dumps(records, indent=1))
    return data_path


def tiny_run_args(
    towers: tuple[Path, Path], data_path: str | Path, output_dir: str | Path, stage: str, **overrides: Any
) -> list[str]:
    """Command-line flags for ``llava_stf.train.run`` on the tiny towers, CPU, no logging service, no checkpoints.

    ``overrides`` replace or add flags (``None`` drops one); the image folder is the data file's folder.
    """
    values: dict[str, Any] = {
        "stage": stage,
        "vision_tower": towers[0],
        "llm": towers[1],
        "data_path": data_path,
        "image_folder": Path(data_path).parent,
        "output_dir": output_dir,
        "use_cpu": True,
        "report_to": "none",
        "disable_tqdm": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "per_device_train_batch_size": 8,
        "dataloader_num_workers": 0,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "weight_decay": 0.0,
    }
    values.update(overrides)
    return [item for key, value in values.items() if value is not None for item in (f"--{key}", str(value))]


def _record(i: int, image: str | None, conv: list[tuple[str, str]]) -> dict[str, Any]:
    record: dict[str, Any] = {"id": f"s{i:05d}"}
    if image is not None:
        record["image"] = image
    record["conversations"] = [{"from": role, "value": text} for role, text in conv]
    return record


__all__ = ["COLORS", "NEXT_TOWER", "color_image", "save_tiny_towers", "tiny_run_args", "write_color_dataset"]
