"""``LlavaStfProcessor``: tokenizer + CLIP image preprocessing, expanding each ``<image>`` to the projector's count.

Images follow LLaVA-1.5: ``square`` runs the CLIP processor as is (resize shortest edge, centre crop); ``pad`` first
pastes the image centred on a square canvas of the CLIP mean colour, ``int(mean * 255)`` = (122, 116, 104), so the
crop removes nothing. Each ``<image>`` in the text becomes exactly ``num_image_tokens`` placeholder ids, the number
the configured projector emits (576 for LLaVA-1.5, 144 for MBTF+STF at 336 px). The expansion is done on token ids,
so the image span can never be split or merged by the tokenizer. With an adaptive token reducer (PruMerge) each image
has its own count, known from ``model.get_image_features``: pass them as ``image_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

IMAGE_MODES = ("pad", "square")


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``pad`` mode: centre the image on a ``max(w, h)`` square of ``background`` colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class LlavaStfProcessor(ProcessorMixin):
    """Turns ``(images, text)`` into ``input_ids``, ``attention_mask`` and ``pixel_values`` for the model.

    Args:
        image_processor: a CLIP image processor (``CLIPImageProcessorPil``; no torchvision needed).
        tokenizer: a tokenizer that knows the image token as a single id.
        num_image_tokens: placeholders per image; must equal ``model.config.num_image_tokens``.
        image_aspect_ratio: ``"pad"`` (LLaVA-1.5 stage 2 and evaluation) or ``"square"`` (stage 1).
        image_token: the placeholder string (``"<image>"``).
        conversation_template: name of the conversation template the checkpoint was trained with (a key of
            ``llava_stf.data.conversation.TEMPLATES``; ``"plain"`` after stage 1, ``"vicuna_v1"`` after stage 2).
            Saved with the processor so chat and evaluation never guess it from a directory name.
        chat_template: optional Jinja chat template.
    """

    attributes = ["image_processor", "tokenizer"]
    image_modes: tuple[str, ...] = IMAGE_MODES

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 576,
        image_aspect_ratio: str = "pad",
        image_token: str = "<image>",
        conversation_template: str = "vicuna_v1",
        chat_template: str | None = None,
        **kwargs,
    ):
        if image_aspect_ratio not in self.image_modes:
            raise ValueError(f"image_aspect_ratio must be one of {self.image_modes}, got {image_aspect_ratio!r}")
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be a positive integer, got {num_image_tokens!r}")
        self.num_image_tokens = num_image_tokens
        self.image_aspect_ratio = image_aspect_ratio
        self.image_token = image_token
        self.conversation_template = conversation_template
        ids = tokenizer.convert_tokens_to_ids(image_token)
        if ids is None or ids == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no token {image_token!r}; add it as a special token first")
        self.image_token_id = int(ids)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    # ----------------------------------------------------------------------------------------------- images
    @property
    def pad_color(self) -> tuple[int, int, int]:
        """Canvas colour of ``pad`` mode: ``int(mean * 255)`` per channel (LLaVA truncates, it does not round)."""
        return tuple(int(m * 255) for m in self.image_processor.image_mean)

    def preprocess_images(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """PIL images (any mode) -> ``pixel_values`` ``[B, 3, H, W]`` float32, in this processor's image mode."""
        if isinstance(images, Image.Image):
            images = [images]
        rgb = [img.convert("RGB") if img.mode != "RGB" else img for img in images]
        if self.image_aspect_ratio == "pad":
            rgb = [expand_to_square(img, self.pad_color) for img in rgb]
        return self.image_processor(rgb, return_tensors="pt")["pixel_values"]

    def image_inputs(self, images: Image.Image | Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """The model's image inputs: ``{"pixel_values": [n, 3, H, W]}`` (AnyRes adds crops and ``image_sizes``)."""
        return {"pixel_values": self.preprocess_images(images)}

    def image_token_counts(self, images: Image.Image | Sequence[Image.Image]) -> list[int]:
        """Placeholders each image needs, in order: ``num_image_tokens`` each (AnyRes: by image size)."""
        return [self.num_image_tokens] * (1 if isinstance(images, Image.Image) else len(images))

    # ------------------------------------------------------------------------------------------------- text
    def expand_image_tokens(self, input_ids: Sequence[int]) -> list[int]:
        """Replace each image-token id by ``num_image_tokens`` copies of it."""
        out: list[int] = []
        for tok in input_ids:
            if tok == self.image_token_id:
                out.extend([self.image_token_id] * self.num_image_tokens)
            else:
                out.append(int(tok))
        return out

    def encode_prompt(
        self, text: str, add_special_tokens: bool = True, image_tokens: Sequence[int] | None = None
    ) -> list[int]:
        """Token ids of one prompt with every ``<image>`` expanded, tokenized as LLaVA does.

        The text is split on ``<image>`` and each chunk is tokenized on its own (only the first with special tokens),
        so the text after an image starts a fresh word exactly as in LLaVA's training and evaluation (for
        SentencePiece tokenizers this keeps the word-initial marker after the image).

        Args:
            text: the prompt.
            add_special_tokens: prepend the tokenizer's special tokens (BOS).
            image_tokens: placeholders for each ``<image>`` in order (``None``: ``num_image_tokens`` each).
        """
        chunks = text.split(self.image_token)
        counts = self._counts(image_tokens, len(chunks) - 1)
        ids = list(self.tokenizer.encode(chunks[0], add_special_tokens=add_special_tokens))
        for chunk in chunks[1:]:
            ids += [self.image_token_id] * next(counts)
            ids += self.tokenizer.encode(chunk, add_special_tokens=False)
        return ids

    def _counts(self, image_tokens: Sequence[int] | None, n_images: int) -> Iterator[int]:
        if image_tokens is None:
            return iter([self.num_image_tokens] * n_images)
        counts = [int(c) for c in image_tokens]
        if len(counts) != n_images or any(c < 1 for c in counts):
            raise ValueError(f"image_tokens must give a positive count for each of the {n_images} image(s): {counts}")
        return iter(counts)

    def __call__(
        self,
        images: Image.Image | Sequence[Image.Image] | None = None,
        text: str | Sequence[str] | None = None,
        return_tensors: str | None = "pt",
        padding: bool = True,
        add_special_tokens: bool = True,
        image_tokens: Sequence[int] | None = None,
    ) -> BatchFeature:
        """Tokenize ``text`` (one string or a batch), expand ``<image>`` and preprocess ``images``.

        ``image_tokens``: placeholders per image in text order (``None``: ``image_token_counts(images)``); an
        adaptive reducer's counts come from ``model.get_image_features``.

        Returns:
            ``input_ids`` ``[B, T]`` and ``attention_mask`` ``[B, T]`` (padded on ``tokenizer.padding_side``),
            and ``image_inputs(images)`` when images are given (in text order): ``pixel_values``
            ``[n_images, 3, H, W]`` (AnyRes: ``[n_images, max_crops, 3, H, W]`` and ``image_sizes``).
        """
        if text is None:
            raise ValueError("text is required (use '<image>' where the image goes)")
        texts = [text] if isinstance(text, str) else list(text)
        n_images = 0 if images is None else (1 if isinstance(images, Image.Image) else len(images))
        n_tags = sum(t.count(self.image_token) for t in texts)
        if n_tags != n_images:
            raise ValueError(
                f"the text has {n_tags} {self.image_token!r} tag(s) but {n_images} image(s) were given; "
                "each image needs exactly one tag"
            )
        if image_tokens is None and n_images:
            image_tokens = self.image_token_counts(images)
        counts = self._counts(image_tokens, n_tags)
        sequences = [
            self.encode_prompt(t, add_special_tokens, [next(counts) for _ in range(t.count(self.image_token))])
            for t in texts
        ]
        data: dict[str, Any] = self.pad(sequences) if padding or len(sequences) == 1 else {"input_ids": sequences}
        if n_images:
            data.update(self.image_inputs(images))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def pad(self, sequences: Sequence[Sequence[int]]) -> dict[str, list[list[int]]]:
        """Pad id lists to one length on ``tokenizer.padding_side`` with an explicit attention mask."""
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before batching")
        longest = max(len(s) for s in sequences)
        ids, mask = [], []
        for seq in sequences:
            fill = longest - len(seq)
            if self.tokenizer.padding_side == "left":
                ids.append([pad_id] * fill + list(seq))
                mask.append([0] * fill + [1] * len(seq))
            else:
                ids.append(list(seq) + [pad_id] * fill)
                mask.append([1] * len(seq) + [0] * fill)
        return {"input_ids": ids, "attention_mask": mask}

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["LlavaStfProcessor", "expand_to_square", "IMAGE_MODES"]
