"""The evaluation engine: batch-size invariance, kill and resume, sharding and merge, pre-flight, corrupt images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_stf.errors import UserError
from llava_stf.eval.answers import PartWriter, parts_dir, read_jsonl
from llava_stf.eval.engine import (
    ImageCheckError,
    Sample,
    Shard,
    finalize,
    run_shard,
    sample_keys,
)
from llava_stf.generation import GenerationSettings, Generator
from llava_stf.testing import make_image

SETTINGS = GenerationSettings(max_new_tokens=8)
QUESTIONS = ["What is it?", "Count the shapes.", "Is it red?", "Where is the circle?", "Name the color", "Why?"]


@pytest.fixture(scope="module")
def generator(checkpoint) -> Generator:
    return Generator.from_pretrained(checkpoint, device="cpu")


@pytest.fixture
def samples(tmp_path) -> list[Sample]:
    out = []
    for i, question in enumerate(QUESTIONS):
        image = None
        if i != 2:  # one text-only question
            image = tmp_path / "images" / f"{i}.jpg"
            image.parent.mkdir(exist_ok=True)
            make_image(i, (24 + 5 * i, 40)).save(image)
        out.append(Sample(f"q{i}#0", f"q{i}", question, question, image))
    return out


def _run(samples, answers_file, generator, **kwargs):
    kwargs.setdefault("settings", SETTINGS)
    return run_shard(samples, answers_file, lambda: generator, model_id="tiny", progress=False, **kwargs)


def _part_lines(answers_file: Path) -> list[dict]:
    return [r for part in sorted(parts_dir(answers_file).glob("*.jsonl")) for r in read_jsonl(part)]


def test_batch_4_answers_equal_batch_1(tmp_path, samples, generator) -> None:
    one, four = tmp_path / "b1" / "a.jsonl", tmp_path / "b4" / "a.jsonl"
    _run(samples, one, generator, batch_size=1)
    _run(samples, four, generator, batch_size=4)
    texts_one = [r["text"] for r in finalize(samples, one)]
    assert len(set(texts_one)) > 1
    assert [r["text"] for r in finalize(samples, four)] == texts_one
    assert one.read_bytes() == four.read_bytes()  # ids, order and fields too


def test_merged_file_has_upstream_fields_in_question_order(tmp_path, samples, generator) -> None:
    answers = tmp_path / "a.jsonl"
    report = _run(samples, answers, generator, batch_size=4)
    assert (report.questions, report.generated, report.already_answered) == (6, 6, 0)
    records = finalize(samples, answers)
    assert [r["question_id"] for r in records] == [s.question_id for s in samples]
    assert set(records[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert all(r["model_id"] == "tiny" and r["metadata"] == {} for r in records)
    assert len({r["answer_id"] for r in records}) == 6


class Crash(RuntimeError):
    pass


class CrashingGenerator:
    """Answers ``batches`` batches, then dies the way a killed job would (mid-run, nothing more written)."""

    def __init__(self, generator: Generator, batches: int):
        self.generator, self.left = generator, batches

    def generate(self, requests, settings):
        if self.left == 0:
            raise Crash("killed")
        self.left -= 1
        return self.generator.generate(requests, settings)


def test_killed_run_resumes_with_exactly_one_answer_per_question(tmp_path, samples, generator) -> None:
    reference = tmp_path / "ref" / "a.jsonl"
    _run(samples, reference, generator, batch_size=2)
    finalize(samples, reference)
    answers = tmp_path / "run" / "a.jsonl"
    with pytest.raises(Crash):
        _run(samples, answers, CrashingGenerator(generator, batches=2), batch_size=2)
    assert len(_part_lines(answers)) == 4 and finalize(samples, answers) is None
    part = parts_dir(answers) / "1_0.jsonl"
    with part.open("ab") as f:  # a kill in the middle of a write leaves half a line
        f.write(b'{"question_id": "q5", "prompt": "Why?", "te')
    report = _run(samples, answers, generator, batch_size=2)
    assert (report.already_answered, report.generated) == (4, 2)
    keys = [r["key"] for r in _part_lines(answers)]
    assert sorted(keys) == sorted(s.key for s in samples)  # each question exactly once, the torn line gone
    finalize(samples, answers)
    assert answers.read_bytes() == reference.read_bytes()


def test_rerun_with_everything_answered_loads_no_model(tmp_path, samples, generator) -> None:
    answers = tmp_path / "a.jsonl"
    _run(samples, answers, generator, batch_size=3)

    def no_model():
        raise AssertionError("the model must not be loaded")

    report = run_shard(samples, answers, no_model, model_id="tiny", settings=SETTINGS, progress=False)
    assert (report.generated, report.already_answered) == (0, 6)


@pytest.mark.parametrize("chunks", [2, 4])
def test_shards_merged_equal_one_unsharded_run(tmp_path, samples, generator, chunks) -> None:
    single = tmp_path / "single" / "a.jsonl"
    _run(samples, single, generator, batch_size=2)
    finalize(samples, single)
    sharded = tmp_path / "sharded" / "a.jsonl"
    sizes = []
    for index in reversed(range(chunks)):  # finishing order must not matter
        assert finalize(samples, sharded) is None
        sizes.append(_run(samples, sharded, generator, batch_size=2, shard=Shard(index, chunks)).generated)
    assert sorted(sizes) == sorted({2: [3, 3], 4: [2, 2, 2, 0]}[chunks])
    finalize(samples, sharded)
    assert sharded.read_bytes() == single.read_bytes()


def test_restart_with_another_chunk_count_reuses_answers(tmp_path, samples, generator) -> None:
    answers = tmp_path / "a.jsonl"
    _run(samples, answers, generator, shard=Shard(0, 3))  # questions 0-1
    report = _run(samples, answers, generator, shard=Shard(0, 2))  # questions 0-2: only 2 is new
    assert (report.already_answered, report.generated) == (2, 1)
    report = _run(samples, answers, generator)
    assert (report.already_answered, report.generated) == (3, 3)
    assert len(_part_lines(answers)) == 6


def test_missing_images_are_listed_before_any_model_is_loaded(tmp_path, samples) -> None:
    samples[1].image.unlink()
    samples[4].image.unlink()

    def no_model():
        raise AssertionError("the model must not be loaded")

    with pytest.raises(ImageCheckError, match="2 image") as err:
        run_shard(samples, tmp_path / "a.jsonl", no_model, model_id="m", settings=SETTINGS)
    assert str(samples[1].image) in str(err.value) and str(samples[4].image) in str(err.value)
    with pytest.raises(ImageCheckError, match="1 image") as err:  # a shard checks its own questions only
        run_shard(samples, tmp_path / "a.jsonl", no_model, model_id="m", settings=SETTINGS, shard=Shard(0, 3))
    assert str(samples[1].image) in str(err.value) and str(samples[4].image) not in str(err.value)


def test_corrupt_image_is_named_before_loading_and_during_generation_keeps_answers(
    tmp_path, samples, generator
) -> None:
    samples[-1].image.write_bytes(b"not an image")
    answers = tmp_path / "a.jsonl"

    def no_model():
        raise AssertionError("the model must not be loaded")

    with pytest.raises(ImageCheckError, match=f"unreadable_image: '{samples[-1].image}' is not a readable image"):
        run_shard(samples, answers, no_model, model_id="m", settings=SETTINGS)
    assert not parts_dir(answers).exists()
    # A file that breaks after the pre-flight: a named error, the answers generated so far kept.
    with pytest.raises(ImageCheckError, match=f"question 'q5': cannot read {samples[-1].image}"):
        _run(samples, answers, generator, batch_size=1, check=False)
    assert 0 < len(_part_lines(answers)) < 6


def test_shard_from_env() -> None:
    assert Shard.from_env(env={}) == Shard(0, 1)
    assert Shard.from_env(env={"CHUNKS": "8", "IDX": "3"}) == Shard(3, 8)
    assert Shard.from_env(env={"WORLD_SIZE": "4", "RANK": "2"}) == Shard(2, 4)
    assert Shard.from_env(2, 1, env={"CHUNKS": "8", "IDX": "3"}) == Shard(1, 2)
    assert Shard(2, 3).select(list(range(7))) == [6]  # chunks of ceil(7 / 3) = 3, as LLaVA's split_list
    with pytest.raises(ValueError, match=r"chunk index must be in \[0, 2\)"):
        Shard.from_env(env={"CHUNKS": "2", "IDX": "2"})


def test_same_chunk_twice_at_once_is_refused(tmp_path) -> None:
    with PartWriter(tmp_path / "a.jsonl", 2, 0):
        with pytest.raises(UserError, match="another process is writing"):
            PartWriter(tmp_path / "a.jsonl", 2, 0)


def test_existing_upstream_answers_file_is_used_when_it_matches(tmp_path, samples) -> None:
    answers = tmp_path / "a.jsonl"
    rows = [{"question_id": s.question_id, "prompt": s.prompt, "text": "yes"} for s in samples]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert finalize(samples, answers) == rows
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    with pytest.raises(ValueError, match="5 answers that do not match the 6 questions"):
        finalize(samples, answers)


def test_sample_keys_tell_repeated_ids_apart() -> None:
    assert sample_keys(["a", "b", "a", "a"]) == ["a#0", "b#0", "a#1", "a#2"]
    with pytest.raises(ValueError, match="unique"):
        run_shard(
            [Sample("k", 1, "q", "q"), Sample("k", 2, "q", "q")], Path("x"), None, model_id="m", settings=SETTINGS
        )


def test_eval_images_are_converted_like_training_images(tmp_path):
    """A transparent RGBA pixel is composited on the training background, not dropped to black by a bare convert."""
    from PIL import Image

    from llava_stf.data.images import BACKGROUND, load_image
    from llava_stf.eval.engine import open_image

    path = tmp_path / "rgba.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(path)
    evaluated = open_image(path)
    trained, _ = load_image(path)
    assert evaluated.mode == "RGB" and evaluated.getpixel((0, 0)) == trained.getpixel((0, 0)) == BACKGROUND
