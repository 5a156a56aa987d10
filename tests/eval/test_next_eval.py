"""AnyRes (LLaVA-NeXT) checkpoints in the generation engine and the evaluation: loaded as the NeXT class from their
saved config, prompts of images with different tile counts batched with the same answers as one by one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_fixtures import make_pope

import llava_stf.eval.__main__ as cli
from llava_stf.eval.answers import read_jsonl
from llava_stf.eval.engine import Sample, finalize, open_image, run_shard
from llava_stf.eval.identity import resolve_reducer
from llava_stf.generation import GenerationSettings, Generator, Request
from llava_stf.loading import check_checkpoint, load_config
from llava_stf.model import LlavaStfNextConfig, LlavaStfNextForConditionalGeneration
from llava_stf.reducer_choice import ReducerChoice
from llava_stf.testing import (
    make_image,
    save_tiny_next_checkpoint,
    tiny_config,
    tiny_next_config,
    tiny_next_model,
    tiny_next_processor,
    tiny_processor,
    tiny_tokenizer,
)

SIZES = [(112, 112), (56, 56), (40, 90), (112, 56), (90, 100)]  # (width, height): 5 or 3 crops, several counts
SETTINGS = GenerationSettings(max_new_tokens=5)


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_next_checkpoint(tmp_path_factory.mktemp("next") / "llava-stf-next-tiny", seed=3)


@pytest.fixture(scope="module")
def generator(next_checkpoint) -> Generator:
    return Generator.from_pretrained(next_checkpoint, device="cpu")


def test_a_next_checkpoint_loads_as_the_next_class_from_its_saved_config(next_checkpoint, generator):
    check_checkpoint(next_checkpoint)
    config = load_config(next_checkpoint)
    assert isinstance(config, LlavaStfNextConfig) and config.anyres
    assert isinstance(generator.model, LlavaStfNextForConditionalGeneration)
    assert generator.processor.num_image_tokens == generator.model.config.num_image_tokens == 16  # one crop
    resolved = resolve_reducer(next_checkpoint, ReducerChoice("fastv", tokens=8))
    assert resolved is not None and resolved.config.anyres  # identity.py reads the NeXT config, not a 1.5 one


def test_batched_anyres_prompts_give_the_answers_of_batch_one(generator):
    requests = [Request.single(f"What is shown in picture {i}?", make_image(i, s)) for i, s in enumerate(SIZES)]
    requests.insert(2, Request.single("Which number comes after two?"))  # text-only among them
    counts = generator.processor.image_token_counts([r.image for r in requests if r.image is not None])
    assert len(set(counts)) >= 3
    inputs = generator.encode(requests)
    placeholders = (inputs["input_ids"] == generator.processor.image_token_id).sum(1).tolist()
    assert [p for p in placeholders if p] == counts  # each prompt holds exactly its image's count
    answers = generator.generate(requests, SETTINGS)
    assert answers == [generator.generate([r], SETTINGS)[0] for r in requests]
    assert len(set(answers)) > 2  # the answers differ, so a mix-up between rows would show


def test_run_shard_batches_anyres_questions_as_batch_one(generator, tmp_path):
    samples = []
    for i, size in enumerate(SIZES):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        make_image(10 + i, size).save(path)
        samples.append(Sample(f"q{i}#0", i, f"Describe image {i}.", f"Describe image {i}.", path))
    texts = {}
    for batch_size in (1, 4):
        answers = tmp_path / f"answers-b{batch_size}.jsonl"
        run_shard(
            samples,
            answers,
            lambda: generator,
            model_id="next",
            settings=SETTINGS,
            batch_size=batch_size,
            progress=False,
        )
        texts[batch_size] = [r["text"] for r in finalize(samples, answers)]
    assert texts[4] == texts[1] and len(set(texts[1])) > 2


def test_eval_cli_answers_pope_with_a_next_checkpoint(next_checkpoint, generator, tmp_path, capsys):
    questions = make_pope(tmp_path)
    images = sorted({q["image"] for q in questions})
    for image, size in zip(images, SIZES):  # three images, three tile counts
        make_image(len(size), size).save(tmp_path / "pope" / "val2014" / image)
    argv = ["--benchmark", "pope", "--model-path", str(next_checkpoint), "--data-root", str(tmp_path)]
    assert cli.main([*argv, "--no-progress", "--max-new-tokens", "4", "--batch-size", "5"]) == 0
    answers = next((tmp_path / "pope" / "answers").glob("*.jsonl"))
    expected = [
        generator.generate(
            [Request.single(q["text"], open_image(tmp_path / "pope" / "val2014" / q["image"]))],
            GenerationSettings(max_new_tokens=4),
        )[0]
        for q in questions
    ]
    assert [r["text"] for r in read_jsonl(answers)] == expected


def test_mismatched_processor_and_model_are_refused(tmp_path):
    tokenizer = tiny_tokenizer()
    next_config = tiny_next_config(tokenizer)
    model = tiny_next_model(next_config)
    with pytest.raises(ValueError, match="the model needs an AnyRes"):
        Generator(model, tiny_processor(tiny_config(tokenizer), tokenizer))
    other = tiny_next_processor(tiny_next_config(tokenizer, image_grid_pinpoints=[[56, 112], [112, 56]]), tokenizer)
    with pytest.raises(ValueError, match=r"image_grid_pinpoints: processor: \[\[56, 112\], \[112, 56\]\]"):
        Generator(model, other)
    model.save_pretrained(tmp_path)
    tiny_processor(tiny_config(tokenizer), tokenizer).save_pretrained(tmp_path)  # a 1.5 processor in a NeXT folder
    with pytest.raises(
        ValueError,
        match=r"no LlavaStfNextProcessor saved .*found: 'LlavaStfProcessor'\); a 'llava_stf_next' checkpoint",
    ):
        check_checkpoint(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava_stf_next"
