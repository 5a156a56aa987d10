"""AnyRes (LLaVA-NeXT) checkpoints in serving: the chat CLI and the API answer as the generation engine does, and
usage / the web demo count each image's own placeholders (crops + base image by image size), not one crop's."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from api_helpers import client, data_uri, running, user

from llava_stf.generation import GenerationSettings, Generator, Request
from llava_stf.serve.cli import main
from llava_stf.serve.engine import ServeEngine
from llava_stf.testing import make_image, save_tiny_next_checkpoint

SIZE = (112, 112)  # (width, height): 4 tiles + base image


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_next_checkpoint(tmp_path_factory.mktemp("serve_next") / "llava-stf-next-tiny", seed=1)


@pytest.fixture(scope="module")
def generator(next_checkpoint) -> Generator:
    return Generator.from_pretrained(next_checkpoint, device="cpu")


def _png(size: tuple[int, int], seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    make_image(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_chat_cli_one_shot_on_a_next_checkpoint(next_checkpoint, generator, tmp_path, capsys):
    image = tmp_path / "photo.png"
    image.write_bytes(_png(SIZE))
    argv = ["--model-path", next_checkpoint, "--image-file", image, "--max-new-tokens", 6, "--query", "What is it?"]
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    expected = generator.generate([Request.single("What is it?", make_image(0, SIZE))], GenerationSettings(6))[0]
    assert code == 0 and out == expected + "\n"
    assert "16 image tokens per crop (AnyRes" in err and "image mode anyres" in err


def test_api_usage_counts_each_images_own_placeholders(generator):
    counts = {size: generator.processor.image_token_counts([make_image(0, size)])[0] for size in (SIZE, (56, 56))}
    assert len(set(counts.values())) == 2  # two sizes, two counts (88 and 36), neither one crop's 16
    engine = ServeEngine(generator, max_tokens=8)
    with running(engine) as (url, _):
        api = client(url)
        for (size, count), seed in zip(counts.items(), (0, 1)):
            reply = api.chat.completions.create(
                model="tiny", messages=[user("What is it?", data_uri(_png(size, seed)))], max_tokens=5, temperature=0
            )
            request = Request.single("What is it?", make_image(seed, size))
            prompt_ids = generator.encode([request])["input_ids"][0]
            assert reply.usage.image_tokens == count and reply.usage.prompt_tokens == len(prompt_ids)
            assert engine.prompt_tokens(request) == (len(prompt_ids) - count, count)
            assert reply.choices[0].message.content == generator.generate([request], GenerationSettings(5))[0]


def test_web_backend_shows_the_images_own_count(generator):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[serve]')")
    from llava_stf.serve.web_backends import LocalBackend, UploadedImage

    backend = LocalBackend(generator, "tiny")
    image = UploadedImage.from_bytes(_png(SIZE), "photo.png")
    assert backend.image_tokens(image) == generator.processor.image_token_counts([image.image])[0] == 88
