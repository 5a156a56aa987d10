"""``LlavaStfNextConfig``: LLaVA-STF on LLaVA-NeXT AnyRes (``image_grid_pinpoints``, crops + base image).

The projector and reducer fields are :class:`LlavaStfConfig`'s, applied per 336-px crop; ``image_grid_pinpoints`` is
LLaVA-NeXT's. A llava-hf ``llava-v1.6-*`` ``config.json`` (``model_type`` ``llava_next``) loads as-is and means the
``mlp2x_gelu`` projector. ``num_image_tokens`` is the count of one crop; an image's count depends on its size:
:meth:`image_token_count` (base crop + unpadded tiles + one ``image_newline`` per row of the projector's grid).

Token reducers on AnyRes (``reducer_type``), with ``--tokens N`` meaning N per crop in both stages:

- vision side (VisionZip, FasterVLM, VisPruner, DivPrune, random, pool): each crop (base image and every tile) is
  reduced on its own to the reducer's per-crop count (``num_image_tokens``, e.g. 64 for ``visionzip@64``); the crops'
  tokens are concatenated, base first, without unpadding or newlines (:func:`~.anyres.reduced_image_token_count`),
  as VisionZip's LLaVA-NeXT code does. ``reduced_crop_tokens`` says so to the processor. Adaptive reducers (PruMerge)
  are rejected: their count per crop is known only after the tower.
- in the LLM (FastV, DART, PyramidDrop, SparseVLM): the prompt holds the full AnyRes count; a budget of ``N`` tokens
  (``budget_kwargs`` against one crop's ``num_image_tokens``) becomes a keep ratio ``N / num_image_tokens`` that each
  row applies to its own image tokens (newlines included), so ``fastv@64`` keeps the same fraction on 1.5 and NeXT.
"""

from __future__ import annotations

from typing import Any

from .anyres import (
    DEFAULT_PINPOINTS,
    CropGrid,
    check_pinpoints,
    image_token_count,
    num_crops,
    reduced_image_token_count,
)
from .configuration_llava_stf import LlavaStfConfig
from .projectors import ProjectorConfigError
from .reducers import REDUCERS, ReducerConfigError, get_reducer_class


class LlavaStfNextConfig(LlavaStfConfig):
    """:class:`LlavaStfConfig` + LLaVA-NeXT's ``image_grid_pinpoints`` (``[[height, width], ...]`` in pixels).

    Args:
        image_grid_pinpoints: the resolutions an image may be tiled to; each side a multiple of
            ``vision_config.image_size``. ``None``: LLaVA-NeXT's five (336x672 ... 672x672 ... 336x1008).
        **kwargs: every :class:`LlavaStfConfig` field.
    """

    model_type = "llava_stf_next"
    anyres = True

    def __init__(self, image_grid_pinpoints: list[list[int]] | None = None, **kwargs: Any):
        kwargs.pop("model_type", None)
        pinpoints = [list(p) for p in (image_grid_pinpoints or DEFAULT_PINPOINTS)]
        self.image_grid_pinpoints = pinpoints
        super().__init__(**kwargs)
        self.image_grid_pinpoints = check_pinpoints(pinpoints, self.crop_size)
        if self.reducer_type is not None and get_reducer_class(self.reducer_type).adaptive:
            supported = sorted(name for name, cls in REDUCERS.items() if not cls.adaptive)
            raise ReducerConfigError(
                f"reducer_type '{self.reducer_type}' gives each crop its own adaptive token count, which AnyRes "
                f"models do not support; reducers that work on AnyRes: {supported}"
            )
        if self.vision_feature_select_strategy != "default":
            raise ProjectorConfigError(
                "AnyRes re-assembles each crop's patch grid, so vision_feature_select_strategy must be 'default' "
                f"(CLS dropped), got {self.vision_feature_select_strategy!r}"
            )

    @property
    def crop_size(self) -> int:
        """Side of one crop in pixels (``vision_config.image_size``: 336 for CLIP ViT-L/14-336)."""
        return int(self.vision_config.image_size)

    @property
    def crop_grid(self) -> CropGrid:
        """The projector's output grid for one crop (24x24 for ``mlp2x_gelu``, 12x12 for ``mbtf_stf``)."""
        rows, cols, cell = self.projector_params().output_grid(*self.grid_size)
        return CropGrid(rows, cols, cell)

    def num_crops(self, height: int, width: int) -> int:
        """Crops (tiles + base image) one ``height x width`` image is cut into."""
        return num_crops(height, width, self.image_grid_pinpoints, self.crop_size)

    @property
    def reduced_crop_tokens(self) -> int | None:
        """Tokens each crop contributes when a vision-side reducer runs (no unpadding, no newlines); else ``None``."""
        if self.reducer_type is None or get_reducer_class(self.reducer_type).stage != "vision":
            return None
        return self.num_image_tokens

    def image_token_count(self, height: int, width: int) -> int:
        """Placeholders for one ``height x width`` image (2,928 for 672x672 with ``mlp2x_gelu``: 5 x 576 + 48).

        With a vision-side reducer: crops x ``reduced_crop_tokens`` (5 x 64 = 320 for ``visionzip@64``). In-LLM
        reducers (FastV) remove image tokens inside the LLM, so the prompt holds the full AnyRes count.
        """
        pinpoints, crop = self.image_grid_pinpoints, self.crop_size
        if self.reduced_crop_tokens is not None:
            return reduced_image_token_count(height, width, pinpoints, crop, self.reduced_crop_tokens)
        return image_token_count(height, width, pinpoints, crop, self.crop_grid)


__all__ = ["LlavaStfNextConfig"]
