"""A small but real vision tower for the demo: a tiny CLIP trained contrastively on generated images and captions.

The paper's premise is a frozen, pre-trained encoder; a randomly initialised tower would make every projector
comparison meaningless. This trains a tiny CLIP (image and text towers) with the CLIP loss on the world's captions
(the generated world's, or the caption file of ``--data``, see ``world``) for a few hundred steps, then saves it as
an ordinary CLIP checkpoint (plus its image processor), so the demo's builder loads it exactly like
``openai/clip-vit-large-patch14-336``. The result is cached: a folder whose ``demo_vision.json`` matches the
requested settings and data is reused.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from ..testing import tiny_tokenizer
from .world import World

logger = logging.getLogger(__name__)
MARKER = "demo_vision.json"


@dataclass(frozen=True)
class VisionSettings:
    image_size: int = 64  # must match the world's images (``--data``: read from them)
    patch_size: int = 8  # 8 x 8 patch grid at 64 px (``--data``: image_size // 8, ``world.patch_size``)
    hidden_size: int = 64  # vision width
    num_layers: int = 9  # deep enough for the default 8-block MBTF
    steps: int = 100  # ~50 s on a 2-core CPU (200 steps: ~100 s for a slightly lower CLIP loss)
    batch_size: int = 48
    lr: float = 2e-3
    seed: int = 0


def _clip_config(settings: VisionSettings, vocab_size: int) -> CLIPConfig:
    vision = dict(
        hidden_size=settings.hidden_size,
        intermediate_size=4 * settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=4,
        image_size=settings.image_size,
        patch_size=settings.patch_size,
        projection_dim=64,
    )
    text = dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=96,
        projection_dim=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=64)


def pretrain_vision_tower(
    world: World, out_dir: Path, settings: VisionSettings = VisionSettings(), progress: bool = False
) -> Path:
    """Train (or reuse) the tiny CLIP on the captioned images of ``world.pretrain``; returns the checkpoint folder.

    The caption of a record is its first ``gpt`` turn; records without an image are left out. Reused when the marker
    holds the same settings and ``world.keys["captions"]`` (the content of the caption file and its images).
    """
    marker = out_dir / MARKER
    wanted = {"settings": asdict(settings), "data": world.keys["captions"]}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        logger.info("reusing the pre-trained vision tower in %s", out_dir)
        return out_dir
    records = [r for r in json.loads(world.pretrain.read_text()) if r.get("image")]
    captions = [next(t["value"] for t in r["conversations"] if t["from"] == "gpt") for r in records]
    tokenizer = tiny_tokenizer(vocab_size=512, corpus=captions)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": settings.image_size},
        crop_size={"height": settings.image_size, "width": settings.image_size},
    )
    torch.manual_seed(settings.seed)
    model = CLIPModel(_clip_config(settings, len(tokenizer))).train()
    pixels = processor([Image.open(world.root / r["image"]).convert("RGB") for r in records], return_tensors="pt")
    pixels = pixels["pixel_values"]
    text = tokenizer(captions, padding=True, truncation=True, max_length=96, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps, pct_start=0.1)
    rng = random.Random(settings.seed)
    order: list[int] = []
    for step in tqdm(range(settings.steps), desc="vision tower (CLIP loss)", disable=not progress):
        if len(order) < settings.batch_size:
            order += rng.sample(range(len(records)), len(records))
        batch, order = order[: settings.batch_size], order[settings.batch_size :]
        out = model(
            input_ids=text["input_ids"][batch],
            attention_mask=text["attention_mask"][batch],
            pixel_values=pixels[batch],
            return_loss=True,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == settings.steps - 1:
            logger.info("vision tower step %d/%d: CLIP loss %.3f", step + 1, settings.steps, out.loss.item())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    marker.write_text(json.dumps(wanted, indent=1))
    return out_dir
