"""``LlavaStfNextProcessor``: LLaVA-NeXT AnyRes preprocessing, each ``<image>`` expanded to that image's count.

Pixels come from transformers' ``LlavaNextImageProcessor`` unchanged (best pinpoint, resize + pad, crops + the
resized base image; ``pixel_values`` ``[n_images, max_crops, 3, H, W]`` and ``image_sizes`` ``[n_images, 2]``), so
they equal ``LlavaNextProcessor``'s. An image's placeholder count is :func:`llava_stf.model.anyres.image_token_count`
on the projector's per-crop grid (``crop_grid``, saved with the processor): for ``mlp2x_gelu`` the same count as
``LlavaNextProcessor``, for ``mbtf_stf`` (12x12 per crop) about a quarter. With a vision-side token reducer
(``reduced_crop_tokens``, ``config.reduced_crop_tokens``) every crop contributes that many tokens, without unpadding
or newlines (:func:`llava_stf.model.anyres.reduced_image_token_count`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from PIL import Image

from .anyres import CropGrid, check_pinpoints, image_token_count, reduced_image_token_count
from .processing_llava_stf import LlavaStfProcessor


def check_reduced_crop_tokens(tokens: object) -> None:
    """``reduced_crop_tokens`` must be ``None`` or a positive integer."""
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"reduced_crop_tokens must be None or a positive integer, got {tokens!r}")


class LlavaStfNextProcessor(LlavaStfProcessor):
    """:class:`LlavaStfProcessor` for AnyRes models.

    Args:
        image_processor: a ``LlavaNextImageProcessorPil`` (its ``image_grid_pinpoints`` must be the model's).
        tokenizer: as for :class:`LlavaStfProcessor`.
        crop_grid: ``[rows, cols, cell]``, the projector's output grid for one crop (``config.crop_grid``).
        num_image_tokens: tokens of one crop (``rows * cols * cell``, or ``reduced_crop_tokens`` when set;
            ``config.num_image_tokens``).
        image_aspect_ratio: ``"anyres"``.
        reduced_crop_tokens: ``None`` (default): each image's count follows the projector's grid (unpadded tiles +
            newlines). An integer: a vision-side reducer leaves this many tokens per crop and every crop, base image
            included, contributes exactly that many (``config.reduced_crop_tokens``; see :meth:`with_reduced_crops`).
        image_token, conversation_template, chat_template: as for :class:`LlavaStfProcessor`.
    """

    image_modes = ("anyres",)

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        crop_grid: Sequence[int] = (24, 24, 1),
        num_image_tokens: int | None = None,
        image_aspect_ratio: str = "anyres",
        reduced_crop_tokens: int | None = None,
        image_token: str = "<image>",
        conversation_template: str = "vicuna_v1",
        chat_template: str | None = None,
        **kwargs,
    ):
        # image_token / conversation_template / chat_template are named here (not only in **kwargs) because
        # ProcessorMixin saves the arguments of the class's own __init__: a stage-1 processor must reload "plain".
        grid = CropGrid(*(int(v) for v in crop_grid))
        if min(grid.rows, grid.cols, grid.cell) < 1:
            raise ValueError(f"crop_grid must be three positive integers [rows, cols, cell], got {list(crop_grid)}")
        check_reduced_crop_tokens(reduced_crop_tokens)
        per_crop = grid.tokens if reduced_crop_tokens is None else reduced_crop_tokens
        if num_image_tokens is not None and num_image_tokens != per_crop:
            source = f"crop_grid {list(crop_grid)}" if reduced_crop_tokens is None else "reduced_crop_tokens"
            raise ValueError(f"num_image_tokens={num_image_tokens} disagrees with {source} ({per_crop} per crop)")
        self.crop_grid = [grid.rows, grid.cols, grid.cell]
        self.reduced_crop_tokens = reduced_crop_tokens
        super().__init__(
            image_processor,
            tokenizer,
            num_image_tokens=per_crop,
            image_aspect_ratio=image_aspect_ratio,
            image_token=image_token,
            conversation_template=conversation_template,
            chat_template=chat_template,
            **kwargs,
        )
        check_pinpoints(self.image_processor.image_grid_pinpoints, self.crop_size)

    @property
    def crop_size(self) -> int:
        """Side of one crop in pixels (the image processor's crop height)."""
        crop = self.image_processor.crop_size
        return int(crop["height"] if isinstance(crop, dict) else crop.height)

    def with_reduced_crops(self, tokens: int | None) -> LlavaStfNextProcessor:
        """A shallow copy whose images count ``tokens`` per crop (``None``: the grid rule); shares the tokenizer.

        For a checkpoint run with a vision-side reducer switched on: ``processor.with_reduced_crops(
        config.reduced_crop_tokens)``; ``num_image_tokens`` follows (one crop's tokens).
        """
        check_reduced_crop_tokens(tokens)
        out = copy.copy(self)
        out.reduced_crop_tokens = tokens
        out.num_image_tokens = CropGrid(*self.crop_grid).tokens if tokens is None else tokens
        return out

    def image_token_count(self, height: int, width: int) -> int:
        """Placeholders for one ``height x width`` image (base crop + unpadded tiles + a newline per row; with
        ``reduced_crop_tokens``: crops x that count)."""
        pinpoints = [list(p) for p in self.image_processor.image_grid_pinpoints]
        if self.reduced_crop_tokens is not None:
            return reduced_image_token_count(height, width, pinpoints, self.crop_size, self.reduced_crop_tokens)
        return image_token_count(height, width, pinpoints, self.crop_size, CropGrid(*self.crop_grid))

    def image_token_counts(self, images: Image.Image | Sequence[Image.Image]) -> list[int]:
        images = [images] if isinstance(images, Image.Image) else images
        return [self.image_token_count(img.height, img.width) for img in images]

    def preprocess_images(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        raise TypeError(
            "an AnyRes processor gives crops and image_sizes: call image_inputs(images), not preprocess_images"
        )

    def image_inputs(self, images: Image.Image | Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """``pixel_values`` ``[n, max_crops, 3, H, W]`` (zero crops pad the batch) and ``image_sizes`` ``[n, 2]``."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        rgb = [img.convert("RGB") if img.mode != "RGB" else img for img in images]
        out = self.image_processor(rgb, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]


__all__ = ["LlavaStfNextProcessor"]
