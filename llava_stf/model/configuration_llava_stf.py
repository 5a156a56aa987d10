"""``LlavaStfConfig``: transformers' ``LlavaConfig`` plus the projector and token-reducer choices and their settings.

Architecture only (no training flags). The projector settings are resolved against the model shapes at
construction, so the saved ``config.json`` records explicit numbers (block list, window, fused width, token
count) and a model is always rebuilt from them, never from a directory name. The optional token reducer
(``reducer_type`` / ``reducer_kwargs``: PruMerge, PruMerge+, FastV) is recorded the same way; it is checked against
the :class:`ReducerShapes` this config derives (reducers never see the config itself). Bad settings and
invalid projector / reducer combinations raise at construction with a message that names the field.
"""

from __future__ import annotations

from typing import Any

from transformers import LlavaConfig

from .projectors import ProjectorConfigError, ProjectorParams, ProjectorShapes, get_projector_class
from .reducers import ReducerParams, ReducerShapes, get_reducer_class, reducer_params


class LlavaStfConfig(LlavaConfig):
    """LLaVA config whose projector comes from the ``PROJECTORS`` registry.

    Args:
        projector_type: registry name (``mlp2x_gelu``, ``avgpool``, ``token_concat``, ``stf``, ``mbtf``,
            ``mbtf_stf``). The default, ``mlp2x_gelu``, is LLaVA-1.5, so a llava-hf ``config.json`` loads as-is.
        projector_kwargs: the projector's settings (its ``Params`` dataclass fields); ``None`` values are resolved.
        vision_feature_layer: hidden-state index or list of indices read from the vision tower (concatenated on
            channels in list order). ``None`` asks the projector for its default (LLaVA: -2; MBTF: 8 blocks).
        reducer_type: optional token reducer from ``llava_stf.model.reducers.REDUCERS`` (``prumerge``,
            ``prumerge_plus``, ``fastv``); ``None`` (default) keeps every token.
        reducer_kwargs: the reducer's settings (its ``Params`` dataclass fields); defaults are filled in.
        **kwargs: every ``LlavaConfig`` field (``vision_config``, ``text_config``, ``image_token_index``, ...).
    """

    model_type = "llava_stf"
    anyres = False  # LLaVA-NeXT's crops + base image (LlavaStfNextConfig)

    def __init__(
        self,
        projector_type: str = "mlp2x_gelu",
        projector_kwargs: dict[str, Any] | None = None,
        vision_feature_layer: int | list[int] | None = None,
        reducer_type: str | None = None,
        reducer_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ):
        # A llava-hf config.json says model_type "llava"; this class is always "llava_stf" (the weight layout is
        # the same, and transformers picks key renamings by model_type).
        kwargs.pop("model_type", None)
        self.projector_type = projector_type
        self.projector_kwargs = dict(projector_kwargs or {})
        self.reducer_type = reducer_type
        self.reducer_kwargs = dict(reducer_kwargs or {})
        super().__init__(vision_feature_layer=-2 if vision_feature_layer is None else vision_feature_layer, **kwargs)
        projector_cls = get_projector_class(projector_type)
        params = projector_cls.Params.from_kwargs(projector_type, self.projector_kwargs)
        if vision_feature_layer is None:
            self.vision_feature_layer = projector_cls.default_vision_layers(params, self._vision_depth())
        shapes = self.projector_shapes()
        params.resolve(shapes)
        params.validate(shapes)
        if projector_cls.spatial and self.vision_feature_select_strategy != "default":
            raise ProjectorConfigError(
                f"projector_type '{projector_type}' merges the patch grid, so vision_feature_select_strategy must "
                f"be 'default' (CLS dropped), got {self.vision_feature_select_strategy!r}"
            )
        self.projector_kwargs = params.to_kwargs()
        if reducer_type is not None:
            self.reducer_kwargs = reducer_params(reducer_type, self.reducer_kwargs, self.reducer_shapes()).to_kwargs()
        self.image_seq_length = self.num_image_tokens

    def with_reducer(self, reducer_type: str | None, reducer_kwargs: dict[str, Any] | None = None) -> LlavaStfConfig:
        """A validated copy with another reducer (``None``: none), e.g. to run PruMerge on a trained checkpoint."""
        fields = self.to_dict()
        fields.update(reducer_type=reducer_type, reducer_kwargs=reducer_kwargs)
        return type(self)(**fields)

    def image_token_count(self, height: int, width: int) -> int:
        """Placeholders for one ``height x width`` image: ``num_image_tokens`` at any size (AnyRes overrides)."""
        return self.num_image_tokens

    # ----------------------------------------------------------------------------------------- derived shapes
    def _vision_depth(self) -> int:
        return int(self.vision_config.num_hidden_layers)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` of one image at ``vision_config.image_size``."""
        size, patch = self.vision_config.image_size, self.vision_config.patch_size
        if size % patch:
            raise ProjectorConfigError(
                f"vision_config.image_size={size} is not a multiple of vision_config.patch_size={patch}"
            )
        return size // patch, size // patch

    @property
    def vision_layers(self) -> list[int]:
        """``vision_feature_layer`` as a list."""
        layer = self.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    def projector_shapes(self) -> ProjectorShapes:
        depth = self._vision_depth()
        for idx in self.vision_layers:
            if not -(depth + 1) <= idx <= depth:
                raise ProjectorConfigError(
                    f"vision_feature_layer entry {idx} is out of range for a vision tower with {depth} blocks "
                    f"(hidden-state indices run from {-(depth + 1)} to {depth})"
                )
        grid_h, grid_w = self.grid_size
        return ProjectorShapes(
            vision_hidden=int(self.vision_config.hidden_size),
            num_layers=len(self.vision_layers),
            text_hidden=int(self.text_config.hidden_size),
            grid_h=grid_h,
            grid_w=grid_w,
            num_vision_blocks=depth,
        )

    def projector_params(self) -> ProjectorParams:
        """The projector's resolved settings as its typed dataclass."""
        return get_projector_class(self.projector_type).Params.from_kwargs(self.projector_type, self.projector_kwargs)

    def _projector_tokens(self) -> int:
        grid_h, grid_w = self.grid_size
        extra = 1 if self.vision_feature_select_strategy == "full" else 0  # CLS kept (non-spatial projectors)
        return self.projector_params().num_image_tokens(grid_h, grid_w) + extra

    def reducer_shapes(self) -> ReducerShapes:
        """The shapes a token reducer is checked and built against."""
        grid_h, grid_w = self.grid_size
        per_patch = self.projector_params().num_image_tokens(grid_h, grid_w) == grid_h * grid_w
        return ReducerShapes(
            grid_h=grid_h,
            grid_w=grid_w,
            num_vision_blocks=self._vision_depth(),
            vision_model_type=str(getattr(self.vision_config, "model_type", "")),
            drops_cls=self.vision_feature_select_strategy == "default",
            projector=self.projector_type,
            projector_tokens=self._projector_tokens(),
            projector_per_patch=per_patch and not get_projector_class(self.projector_type).spatial,
            text_model_type=str(getattr(self.text_config, "model_type", "")),
            num_text_layers=int(self.text_config.num_hidden_layers),
        )

    @property
    def adaptive_image_tokens(self) -> bool:
        """Whether images get different token counts (a vision-side reducer such as PruMerge): then each prompt
        must be written with each image's own count, known only after ``get_image_features``."""
        return self.reducer_type is not None and get_reducer_class(self.reducer_type).adaptive

    def reducer_params(self) -> ReducerParams | None:
        """The reducer's settings as its typed dataclass (``None`` without a reducer)."""
        if self.reducer_type is None:
            return None
        return get_reducer_class(self.reducer_type).Params.from_kwargs(self.reducer_type, self.reducer_kwargs)

    @property
    def num_image_tokens(self) -> int:
        """Placeholders per image: what the processor expands each ``<image>`` into.

        The projector's token count. With an adaptive reducer (``adaptive_image_tokens``: PruMerge) it is the most
        one image can get; the prompt must then hold each image's own count (see ``data/placeholders.py``).
        """
        tokens = self._projector_tokens()
        if self.reducer_type is not None:
            tokens = get_reducer_class(self.reducer_type).image_tokens(self.reducer_params(), self.reducer_shapes())
        return tokens


__all__ = ["LlavaStfConfig"]
