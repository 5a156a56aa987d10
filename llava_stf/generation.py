"""The one generation helper: load a checkpoint with its processor, build prompts, generate in batches.

Everything that turns questions into answer text goes through ``Generator``: evaluation (``llava_stf.eval``) and the
chat CLI (``llava_stf.serve.cli``). It knows nothing about benchmarks. Behaviour comes from the checkpoint: the
conversation template is the one saved with the processor (``processor.conversation_template``), the image mode is the
processor's ``image_aspect_ratio`` and the stop token is the checkpoint's EOS. Prompts are tokenized one by one exactly
as for a batch of 1 (``processor.encode_prompt``) and padded on the **left** with an explicit attention mask, so a batch
of B requests yields the same greedy answers as B single requests (tested exactly on CPU in float32; in float16 the
batched kernels round differently, so a near-tie could flip a token: unverified on a GPU here). Answers are the new
tokens up to the first EOS, decoded without special tokens and stripped, as LLaVA's evaluation does. Decoding is greedy
unless ``GenerationSettings.temperature`` is above 0 (the chat CLI's ``--temperature``), which samples.
``load_checkpoint`` first checks that the folder is a llava_stf checkpoint (config, weights, processor), so a wrong
folder gets a one-line reason instead of an error from deep inside ``from_pretrained``.

AnyRes (LLaVA-NeXT) checkpoints go through the same code: their saved ``model_type`` loads the NeXT class and
processor, images become crops + ``image_sizes`` (``processor.image_inputs``), and each prompt holds its own
image's placeholder count, so a batch may mix images with different tile counts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from .data.conversation import HUMAN, IMAGE_TOKEN, Turn, get_template
from .loading import QUANTIZED_BITS, check_checkpoint, default_device, load_checkpoint, quantization_config
from .model import LlavaStfProcessor  # importing .model registers llava_stf with the Auto classes
from .reducer_choice import ReducerChoice

StreamCallback = Callable[[int, str], None]  # (row index in the batch, newly decoded text)


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings. Greedy by default (LLaVA-1.5 evaluation: temperature 0, one beam, KV cache)."""

    max_new_tokens: int = 128  # 128 for short-answer benchmarks, 1024 for ScienceQA and MMBench
    min_new_tokens: int = 0  # > 0 suppresses EOS until then; only for fixed-length throughput measurements
    temperature: float = 0.0  # 0: greedy; > 0: sample from softmax(logits / temperature) (LLaVA's chat uses 0.2)
    top_p: float | None = None  # when sampling: keep the smallest set of tokens with this probability mass

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.min_new_tokens < 0:
            raise ValueError(
                f"need max_new_tokens >= 1 and min_new_tokens >= 0, got {self.max_new_tokens}, {self.min_new_tokens}"
            )
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@dataclass(frozen=True)
class Request:
    """One conversation to continue: turns ending with a human turn, and the image its ``<image>`` tag stands for."""

    turns: tuple[Turn, ...]  # alternating human / gpt, ending with human; at most one "<image>" in all
    image: Image.Image | None = None  # required exactly when the turns hold "<image>"

    @classmethod
    def single(cls, message: str, image: Image.Image | None = None) -> Request:
        """A one-turn request. With an image, the tag goes first (``"<image>\\n" + message``), as LLaVA-1.5 does."""
        if image is not None and IMAGE_TOKEN not in message:
            message = f"{IMAGE_TOKEN}\n{message}"
        return cls((Turn(HUMAN, message),), image)


class _RowStreamer(BaseStreamer):
    """Decodes each row's new tokens as they arrive and reports only the text added since the last call."""

    def __init__(self, generator: Generator, batch_size: int, callback: StreamCallback):
        self.generator, self.callback = generator, callback
        self.tokens: list[list[int]] = [[] for _ in range(batch_size)]
        self.sent = [""] * batch_size
        self.finished = [False] * batch_size
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt ids [B, T]
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.finished[row]:
                continue
            if token in self.generator.eos_token_ids:
                self.finished[row] = True
            else:
                self.tokens[row].append(token)
            self._emit(row, final=self.finished[row])

    def end(self) -> None:
        for row in range(len(self.tokens)):
            self._emit(row, final=True)

    def _emit(self, row: int, final: bool) -> None:
        text = self.generator.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other bytes
            return
        if len(text) > len(self.sent[row]) and text.startswith(self.sent[row]):
            self.callback(row, text[len(self.sent[row]) :])
            self.sent[row] = text


class _Streamers(BaseStreamer):
    """Several streamers as one, called in order."""

    def __init__(self, streamers: list[BaseStreamer]):
        self.streamers = streamers

    def put(self, value: torch.Tensor) -> None:
        for streamer in self.streamers:
            streamer.put(value)

    def end(self) -> None:
        for streamer in self.streamers:
            streamer.end()


def check_anyres(config, processor: LlavaStfProcessor) -> None:
    """Raise a one-line error when an AnyRes model and its processor disagree (crop kind, pinpoints, per-crop grid).

    Args:
        config: the model's config (``config.anyres`` decides; a 1.5 config needs a 1.5 processor).
        processor: a ``LlavaStfProcessor`` or ``LlavaStfNextProcessor``.
    """
    anyres = bool(getattr(config, "anyres", False))
    processor_anyres = getattr(processor, "image_aspect_ratio", None) == "anyres"
    if anyres != processor_anyres:
        kinds = {True: "an AnyRes (LlavaStfNextProcessor)", False: "a LLaVA-1.5 (LlavaStfProcessor)"}
        raise ValueError(
            f"processor and model disagree: the model needs {kinds[anyres]} processor, "
            f"got {kinds[processor_anyres]} one"
        )
    if not anyres:
        return
    grid = config.crop_grid
    checks = {
        "per-crop grid [rows, cols, cell]": (list(processor.crop_grid), [grid.rows, grid.cols, grid.cell]),
        "image_grid_pinpoints": (
            [list(p) for p in processor.image_processor.image_grid_pinpoints],
            [list(p) for p in config.image_grid_pinpoints],
        ),
        "crop size": (processor.crop_size, config.crop_size),
    }
    for name, (theirs, ours) in checks.items():
        if theirs != ours:
            raise ValueError(f"processor and model disagree on {name}: processor: {theirs}, model: {ours}")


class Generator:
    """Batched generation (greedy unless the settings sample) for a loaded ``(model, processor)`` pair.

    Args:
        model: A ``LlavaStfForConditionalGeneration`` (any LLaVA-style image-text-to-text model with ``generate``).
        processor: Its ``LlavaStfProcessor``; its ``num_image_tokens`` must equal the model's (unless an adaptive
            reducer gives each image its own count, which ``encode`` writes). A processor saved with the checkpoint
            holds the projector's count; when a vision-side reducer was switched on for that checkpoint
            (``config.with_reducer``), the processor is used at the reducer's count, which the model config states.
            An AnyRes model (``config.anyres``) needs its ``LlavaStfNextProcessor``: ``num_image_tokens`` is then
            the count of one crop on both sides, and the pinpoints and per-crop grid must be the model's.
    """

    def __init__(self, model: torch.nn.Module, processor: LlavaStfProcessor):
        check_anyres(model.config, processor)
        if getattr(model.config, "anyres", False):  # a vision-side reducer sets each crop's count (None: the grid's)
            processor = processor.with_reduced_crops(model.config.reduced_crop_tokens)
        expected = getattr(model.config, "num_image_tokens", None)
        adaptive = getattr(model.config, "adaptive_image_tokens", False)  # counts come from each image's features
        if expected is not None and not adaptive and processor.num_image_tokens != expected:
            if getattr(model.config, "reducer_type", None) is not None:
                unreduced = model.config.reducer_shapes().projector_tokens
                if processor.num_image_tokens == unreduced:  # the checkpoint's processor, a reducer switched on
                    processor = copy.copy(processor)
                    processor.num_image_tokens = expected
        if expected is not None and not adaptive and processor.num_image_tokens != expected:
            raise ValueError(
                f"processor and model disagree on image tokens: processor: {processor.num_image_tokens}, "
                f"model: {expected} (was the processor saved with a different projector?)"
            )
        self.model, self.processor = model, processor
        self.tokenizer = processor.tokenizer
        self.template = get_template(processor.conversation_template)
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("neither the generation config nor the tokenizer defines an EOS token")
        self.eos_token_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else eos)
        # LLaVA pads with <unk>; the attention mask makes the pad id irrelevant, it only has to be a valid id.
        candidates = (self.tokenizer.pad_token_id, self.tokenizer.unk_token_id, min(self.eos_token_ids))
        self.pad_token_id = int(next(i for i in candidates if i is not None))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        reducer: ReducerChoice | None = None,
    ) -> Generator:
        """``Generator(*load_checkpoint(path, device, dtype, reducer=reducer))``."""
        return cls(*load_checkpoint(path, device, dtype, reducer=reducer))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe_image_tokens(self) -> str:
        """For banners: ``"144 image tokens"``, or ``"16 image tokens per crop (AnyRes: ...)"``."""
        count = f"{self.processor.num_image_tokens} image tokens"
        if getattr(self.model.config, "anyres", False):
            return f"{count} per crop (AnyRes: crops + base image by image size, plus newlines)"
        return count

    def prompt(self, request: Request) -> str:
        """The full prompt string of ``request`` in the checkpoint's template (ends with the open assistant slot)."""
        tags = sum(turn.text.count(IMAGE_TOKEN) for turn in request.turns)
        if tags != (request.image is not None):
            raise ValueError(
                f"the turns hold {tags} {IMAGE_TOKEN!r} tag(s) but {int(request.image is not None)} image(s) were "
                "given; a request takes at most one image, with exactly one tag"
            )
        return self.template.prompt(request.turns)

    def encode(self, requests: Sequence[Request]) -> dict:
        """Left-padded model inputs for a batch.

        Images are encoded first (``model.get_image_features`` on ``processor.image_inputs``), so each ``<image>`` is
        written with exactly as many placeholders as its image has tokens: a fixed count for a projector, each
        image's own count for an adaptive reducer (PruMerge) or an AnyRes model (crops + base image by image size;
        ``image_sizes`` go along). The features go to ``generate`` as ``mm_encoder_outputs`` and are not computed
        twice.

        Returns:
            ``input_ids`` ``[B, T]`` and ``attention_mask`` ``[B, T]`` (0 on the left padding), plus
            ``mm_encoder_outputs`` ``{"image": features}`` (``pooler_output``: ``[tokens_i, D]`` per image, in request
            order) when any request has an image.
        """
        if not requests:
            raise ValueError("encode got no requests")
        prompts = [self.prompt(r) for r in requests]  # checks the tags before any image is encoded
        inputs: dict = {}
        counts = iter(())
        images = [r.image for r in requests if r.image is not None]
        if images:
            dtype = next(self.model.parameters()).dtype
            image_inputs = {k: v.to(self.device) for k, v in self.processor.image_inputs(images).items()}
            image_inputs["pixel_values"] = image_inputs["pixel_values"].to(dtype)
            with torch.inference_mode():
                features = self.model.get_image_features(**image_inputs)
            counts = iter([len(tokens) for tokens in features.pooler_output])
            inputs["mm_encoder_outputs"] = {"image": features}
        sequences = [
            self.processor.encode_prompt(prompt, image_tokens=[next(counts)] if r.image is not None else [])
            for prompt, r in zip(prompts, requests)
        ]
        longest = max(len(s) for s in sequences)
        ids = [[self.pad_token_id] * (longest - len(s)) + s for s in sequences]
        mask = [[0] * (longest - len(s)) + [1] * len(s) for s in sequences]
        inputs["input_ids"] = torch.tensor(ids, dtype=torch.long, device=self.device)
        inputs["attention_mask"] = torch.tensor(mask, dtype=torch.long, device=self.device)
        return inputs

    @torch.inference_mode()
    def generate(
        self,
        requests: Sequence[Request],
        settings: GenerationSettings = GenerationSettings(),
        stream: StreamCallback | None = None,
        stopping_criteria=None,
        token_streamer: BaseStreamer | None = None,
    ) -> list[str]:
        """Answers to a batch of requests: greedy, or sampled when ``settings.temperature > 0``.

        Args:
            requests: The conversations; any mix of with and without images.
            settings: Token limits and sampling (the default is greedy; seed ``torch`` to repeat a sampled answer).
            stream: Optional ``callback(row, text)`` called with each row's newly decoded text as it is generated;
                the pieces of a row concatenate to its answer before stripping.
            stopping_criteria: Optional transformers ``StoppingCriteriaList`` run at every step besides the
                generation config's (e.g. rows that end on their own, as the API server's).
            token_streamer: Optional streamer that also gets ``generate``'s calls (the prompt ids ``[B, T]``, then
                each step's tokens ``[B]``), after ``stream``'s.

        Returns:
            One answer per request: the new tokens up to the first EOS, decoded without special tokens, stripped.
        """
        inputs = self.encode(requests)
        sampling = (
            {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p or 1.0}
            if settings.sampling
            else {"do_sample": False}
        )
        config = GenerationConfig(
            **sampling,
            num_beams=1,
            use_cache=True,
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=settings.min_new_tokens,
            eos_token_id=sorted(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        streamers = [_RowStreamer(self, len(requests), stream) if stream is not None else None, token_streamer]
        streamers = [s for s in streamers if s is not None]
        streamer = streamers[0] if len(streamers) == 1 else _Streamers(streamers) if streamers else None
        output = self.model.generate(
            **inputs, generation_config=config, streamer=streamer, stopping_criteria=stopping_criteria
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        return [self._decode(row) for row in new_tokens]

    def _decode(self, tokens: list[int]) -> str:
        for i, token in enumerate(tokens):
            if token in self.eos_token_ids:
                tokens = tokens[:i]
                break
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


__all__ = [
    "QUANTIZED_BITS",
    "GenerationSettings",
    "Generator",
    "Request",
    "StreamCallback",
    "check_anyres",
    "check_checkpoint",
    "default_device",
    "load_checkpoint",
    "quantization_config",
]
