"""``LlavaStfNextConfig``: LLaVA-STF on LLaVA-NeXT AnyRes (``image_grid_pinpoints``, crops + base image).

The projector and reducer fields are :class:`LlavaStfConfig`'s, applied per 336-px crop; ``image_grid_pinpoints`` is
LLaVA-NeXT's. A llava-hf ``llava-v1.6-*`` ``config.json`` (``model_type`` ``llava_next``) loads as-is and means the
``mlp2x_gelu`` projector. ``num_image_tokens`` is the count of one crop; an image's count depends on its size:
:meth:`image_token_count` (base crop + unpadded tiles + one ``image_newline`` per row of the projector's grid).
"""

from __future__ import annotations

from typing import Any

from .anyres import DEFAULT_PINPOINTS, CropGrid, check_pinpoints, image_token_count, num_crops
from .configuration_llava_stf import LlavaStfConfig
from .projectors import ProjectorConfigError
from .reducers import get_reducer_class


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
        if self.reducer_type is not None and get_reducer_class(self.reducer_type).stage == "vision":
            raise ProjectorConfigError(
                f"reducer_type '{self.reducer_type}' reduces before the projector, which AnyRes models do not "
                "support yet; in-LLM reducers (fastv, dart, pyramiddrop, sparsevlm) work"
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

    def image_token_count(self, height: int, width: int) -> int:
        """Placeholders for one ``height x width`` image (2,928 for 672x672 with ``mlp2x_gelu``: 5 x 576 + 48).

        In-LLM reducers (FastV) remove image tokens inside the LLM, so the prompt holds the full AnyRes count.
        """
        return image_token_count(height, width, self.image_grid_pinpoints, self.crop_size, self.crop_grid)


__all__ = ["LlavaStfNextConfig"]
