"""AnyRes geometry (LLaVA-NeXT): how one image becomes crops, and how many LLM tokens the crops give back.

LLaVA-NeXT (``llava/mm_utils.py`` and ``llava_arch.py`` of haotian-liu/LLaVA; transformers' ``llava_next``) picks
the best ``image_grid_pinpoints`` resolution for each image, cuts it into ``crop_size`` crops and adds one resized
global ("base") image. Each crop's features form a grid; the tile grids are re-assembled into one large grid, the
rows / columns of padding the resize added are stripped (``unpad_image``, by the original aspect ratio) and a learned
``image_newline`` closes every row. The base image's tokens go first, without newlines.

Here the grid is the *projector's* output grid (``ProjectorParams.output_grid``): 24x24 for LLaVA's MLP on a 336-px
CLIP crop, 12x12 for MBTF+STF (k = 2), so unpadding and newline placement follow the fused grid. One function,
:func:`image_token_count`, answers "how many placeholders does this image need" for the processor, FLOPs and
benchmarks; it runs transformers' own ``unpad_image`` on an empty tensor, so it can never disagree with the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-NeXT's (height, width)


@dataclass(frozen=True)
class CropGrid:
    """The projector's output for one crop: ``rows x cols`` cells of ``cell`` tokens each (STF with n > 1: n)."""

    rows: int
    cols: int
    cell: int = 1

    @property
    def tokens(self) -> int:
        return self.rows * self.cols * self.cell


def check_pinpoints(pinpoints: object, crop_size: int) -> list[list[int]]:
    """``image_grid_pinpoints`` as ``[[height, width], ...]``; each side a positive multiple of ``crop_size``."""
    if not isinstance(pinpoints, (list, tuple)) or not pinpoints:
        raise ValueError(f"image_grid_pinpoints must be a non-empty list of [height, width] pairs, got {pinpoints!r}")
    out = []
    for pair in pinpoints:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"image_grid_pinpoints entry {pair!r} is not a [height, width] pair")
        height, width = (int(v) for v in pair)
        if height < crop_size or width < crop_size or height % crop_size or width % crop_size:
            raise ValueError(
                f"image_grid_pinpoints entry {[height, width]} is not a multiple of the vision crop size {crop_size} "
                "(vision_config.image_size)"
            )
        out.append([height, width])
    return out


def tile_layout(height: int, width: int, pinpoints: list[list[int]], crop_size: int) -> tuple[int, int]:
    """``(tile_rows, tile_cols)`` of crops for an image of ``height x width`` pixels (base image not counted)."""
    best_h, best_w = select_best_resolution((int(height), int(width)), pinpoints)
    return best_h // crop_size, best_w // crop_size


def num_crops(height: int, width: int, pinpoints: list[list[int]], crop_size: int) -> int:
    """Crops the vision tower sees for one image: the tiles plus the base image."""
    rows, cols = tile_layout(height, width, pinpoints, crop_size)
    return rows * cols + 1


def unpadded_grid(
    height: int, width: int, pinpoints: list[list[int]], crop_size: int, grid: CropGrid
) -> tuple[int, int]:
    """``(rows, cols)`` of cells left after unpadding the re-assembled tile grid (transformers' ``unpad_image``)."""
    tile_rows, tile_cols = tile_layout(height, width, pinpoints, crop_size)
    empty = torch.empty(0, tile_rows * grid.rows, tile_cols * grid.cols)
    rows, cols = unpad_image(empty, [int(height), int(width)]).shape[1:]
    return int(rows), int(cols)


def image_token_count(
    height: int, width: int, pinpoints: list[list[int]], crop_size: int, grid: CropGrid, newline: bool = True
) -> int:
    """LLM tokens for one ``height x width`` image: base crop + unpadded tiles + one newline per unpadded row."""
    rows, cols = unpadded_grid(height, width, pinpoints, crop_size, grid)
    return grid.tokens + rows * cols * grid.cell + (rows if newline else 0)


def reduced_image_token_count(
    height: int, width: int, pinpoints: list[list[int]], crop_size: int, crop_tokens: int
) -> int:
    """LLM tokens for one ``height x width`` image when a vision-side reducer leaves ``crop_tokens`` per crop.

    The reduced tokens of a crop are no longer a grid, so nothing is unpadded and no ``image_newline`` is added
    (as VisionZip's LLaVA-NeXT path, dvlab-research/VisionZip ``visionzip/llava_arch.py``, does for tiled images):
    every crop, the base image included, contributes exactly ``crop_tokens``.
    """
    return num_crops(height, width, pinpoints, crop_size) * crop_tokens


__all__ = [
    "DEFAULT_PINPOINTS",
    "CropGrid",
    "check_pinpoints",
    "image_token_count",
    "num_crops",
    "reduced_image_token_count",
    "tile_layout",
    "unpadded_grid",
]
