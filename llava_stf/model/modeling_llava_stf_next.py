"""``LlavaStfNextForConditionalGeneration``: transformers' LLaVA-NeXT (AnyRes) with the projector from ``PROJECTORS``.

A thin subclass, as transformers' own multimodal models subclass each other: the forward pass, the crop batching of
``get_image_features``, the image/text merge, generation and the KV cache are transformers' ``LlavaNext`` ones. The
projector runs per crop (base image + tiles, ``[n_crops, N, C] -> [n_crops, M, D]``). Overridden hooks:

- construction: projector from the registry, optional token reducer (as :class:`LlavaStfModel`);
- ``get_image_features``: with a vision-side reducer (VisionZip, ...) each crop is reduced to the reducer's count
  and an image's crops are concatenated (no unpadding, no newlines); otherwise transformers' own;
- ``pack_image_features``: re-assembles the tiles on the *projector's* output grid (``config.crop_grid``: 24x24 for
  ``mlp2x_gelu``, 12x12 for ``mbtf_stf``), unpads it with transformers' ``unpad_image`` and closes each row with
  ``image_newline``; for ``mlp2x_gelu`` this is exactly transformers' packing, so llava-hf ``llava-v1.6`` checkpoints
  give the same logits;
- ``forward`` / ``get_placeholder_mask`` / ``generate``: the shared LLaVA-STF hooks (:class:`StfModelHooks`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoModel, LlavaNextForConditionalGeneration, LlavaNextModel, LlavaNextPreTrainedModel
from transformers.models.llava_next.modeling_llava_next import unpad_image

from .anyres import tile_layout
from .configuration_llava_stf import LlavaStfConfig
from .configuration_llava_stf_next import LlavaStfNextConfig
from .modeling_llava_stf import (
    LlavaStfForConditionalGeneration,
    StfGenerationHooks,
    StfModelHooks,
    build_projector,
    init_projector_layer,
)
from .reducers import build_reducer, install_llm_reducer


class LlavaStfNextPreTrainedModel(LlavaNextPreTrainedModel):
    config_class = LlavaStfNextConfig
    config: LlavaStfNextConfig

    def _init_weights(self, module: nn.Module) -> None:
        if not init_projector_layer(self, module):
            super()._init_weights(module)


class LlavaStfNextModel(StfModelHooks, LlavaStfNextPreTrainedModel, LlavaNextModel):
    """Vision tower + registry projector (per crop) + ``image_newline`` + LLM backbone (no LM head)."""

    def __init__(self, config: LlavaStfNextConfig):
        # Build each part once (LlavaNextModel.__init__ would build the stock projector first).
        LlavaNextPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = build_projector(config)
        embed_std = 1 / math.sqrt(config.text_config.hidden_size)
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std)
        self.vocab_size = config.text_config.vocab_size
        self.reducer = build_reducer(config.reducer_type, config.reducer_kwargs, config.reducer_shapes())
        self.language_model = install_llm_reducer(AutoModel.from_config(config.text_config), self.reducer)
        self.post_init()

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ):
        """transformers' ``LlavaNextModel.get_image_features``; with a vision-side reducer, each crop reduced.

        With a vision-side reducer (VisionZip, FasterVLM, ...) the tower runs once on every crop of every image, the
        reducer leaves ``config.num_image_tokens`` tokens per crop (each crop on its own), the projector maps them
        and each image's crops are concatenated, base image first, then the tiles row-major. Reduced tokens are no
        longer a grid, so nothing is unpadded and no ``image_newline`` is added, as in VisionZip's LLaVA-NeXT path
        (dvlab-research/VisionZip ``visionzip/llava_arch.py``; there the tiles' kept patches are further ordered on
        the re-assembled grid, here each crop keeps its reducer's order). ``config.image_token_count`` gives the count.

        Args:
            pixel_values: ``[n_images, max_crops, 3, H, W]`` (zero crops pad) or ``[sum of crops, 3, H, W]``.
            image_sizes: ``[n_images, 2]`` original ``(height, width)``.
            vision_feature_layer, vision_feature_select_strategy: as transformers'; with a vision-side reducer
                only the config's own values (or ``None``).

        Returns:
            The tower's output with ``pooler_output``: one ``[tokens_i, D]`` per image.
        """
        if self.reducer is None or self.reducer.stage != "vision":
            return super().get_image_features(
                pixel_values,
                image_sizes,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                **kwargs,
            )
        config = self.config
        given = dict(
            vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy
        )
        for name, value in given.items():
            if value is not None and value != getattr(config, name):
                raise ValueError(
                    f"{name}={value!r} is not supported with reducer_type '{config.reducer_type}' (the config's "
                    f"{getattr(config, name)!r} only)"
                )
        crops = [config.num_crops(*(int(v) for v in size)) for size in image_sizes.tolist()]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pixels[:n] for pixels, n in zip(pixel_values, crops)])
        if pixel_values.shape[0] != sum(crops):
            raise ValueError(
                f"image_sizes give {sum(crops)} crops ({crops} per image), pixel_values {pixel_values.shape[0]}"
            )
        outputs, tokens, valid = self.reducer.reduce_tower(self.vision_tower, pixel_values, config.vision_layers)
        if not bool(valid.all()):  # the config rejects adaptive reducers; a reducer that pads would land here
            raise ValueError(f"reducer_type '{config.reducer_type}' left a different count per crop on AnyRes")
        projected = self.multi_modal_projector(tokens.flatten(0, 1)[None])[0]  # per-token projector
        outputs.pooler_output = list(projected.split([n * tokens.shape[1] for n in crops]))
        return outputs

    def pack_image_features(self, image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        """Each image's crops as one token sequence: base crop, then the unpadded tile grid row by row + newlines.

        Args:
            image_features: one ``[n_crops_i, crop_tokens, D]`` per image (base image first, then the tiles
                row-major), ``crop_tokens = rows * cols * cell`` of ``config.crop_grid``.
            image_sizes: ``[n_images, 2]`` original ``(height, width)``.
            vision_feature_select_strategy: must be ``"default"`` (checked by the config).
            image_newline: ``[D]`` or ``None`` (no newlines).

        Returns:
            ``(features, lengths)``: a list of ``[tokens_i, D]`` and ``[n_images]`` ``tokens_i``
            (``config.image_token_count(height, width)``).
        """
        grid, config = self.config.crop_grid, self.config
        packed = []
        for features, size in zip(image_features, image_sizes):
            height, width = (int(v) for v in (size.tolist() if torch.is_tensor(size) else size))
            n_crops, tokens, dim = features.shape
            if tokens != grid.tokens:
                raise ValueError(f"each crop should give {grid.tokens} tokens ({grid}), got {tokens}")
            base, tiles = features[0], features[1:]
            if not len(tiles):  # a single crop: base image + one newline, as transformers does
                newline = [] if image_newline is None else [image_newline[None].to(base)]
                packed.append(torch.cat([base, *newline]))
                continue
            rows, cols = tile_layout(height, width, config.image_grid_pinpoints, config.crop_size)
            if len(tiles) != rows * cols:
                raise ValueError(
                    f"an image of {height}x{width} px is cut into {rows}x{cols} tiles + the base image, but "
                    f"{n_crops} crops were given (image_sizes and pixel_values disagree)"
                )
            # [tiles, r*c*cell, D] -> [cell*D, rows*r, cols*c]: the tiles re-assembled on one grid of cells
            full = tiles.reshape(rows, cols, grid.rows, grid.cols, grid.cell * dim)
            full = full.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
            full = unpad_image(full, [height, width])
            h, w = full.shape[1:]
            lines = full.permute(1, 2, 0).reshape(h, w * grid.cell, dim)  # a cell's tokens stay adjacent
            if image_newline is not None:
                lines = torch.cat([lines, image_newline.to(lines)[None, None].expand(h, 1, dim)], dim=1)
            packed.append(torch.cat([base, lines.reshape(-1, dim)]))
        lengths = torch.tensor([len(p) for p in packed], dtype=torch.long, device=image_features[0].device)
        return packed, lengths


class LlavaStfNextForConditionalGeneration(
    StfGenerationHooks, LlavaStfNextPreTrainedModel, LlavaNextForConditionalGeneration
):
    """LLaVA-STF on AnyRes, for generation and training: ``forward``/``generate`` are transformers' ``LlavaNext``."""

    def __init__(self, config: LlavaStfNextConfig):
        LlavaNextPreTrainedModel.__init__(self, config)
        self.model = LlavaStfNextModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


def generation_class(config: LlavaStfConfig) -> type[LlavaStfForConditionalGeneration]:
    """The generation class a saved config builds: the AnyRes one for ``config.anyres`` (never from names)."""
    return LlavaStfNextForConditionalGeneration if config.anyres else LlavaStfForConditionalGeneration


__all__ = [
    "LlavaStfNextForConditionalGeneration",
    "LlavaStfNextModel",
    "LlavaStfNextPreTrainedModel",
    "generation_class",
]
