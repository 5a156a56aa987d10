"""``python -m llava_stf.bench.serve`` on a tiny checkpoint with tiny request counts: the server starts in its own
process, every request gets exactly one answer, answers do not change with the level; the targets' verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_stf.bench import serve, serve_targets
from llava_stf.bench.serve_engine import EngineLevel, measure_engine
from llava_stf.bench.serve_load import Level, Outcome, demo_questions, generated_questions, percentile
from llava_stf.bench.serve_report import Run
from llava_stf.testing import make_image, save_tiny_checkpoint

pytestmark = pytest.mark.slow


def test_the_load_test_runs_with_no_errors(tmp_path, capsys) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    argv = ["--model-path", str(checkpoint), "--levels", "1", "3", "--requests", "4", "--max-tokens", "3"]
    assert serve.main([*argv, "--questions", "3", "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("model ") :].splitlines()  # after any log lines of the imports
    assert lines[0].split()[:4] == ["model", "projector", "conc", "requests"] and "1 answer each" in lines[0]
    rows = [line.split() for line in lines[1:3]]
    assert [row[2:4] for row in rows] == [["1", "4/4"], ["3", "4/4"]] and all(row[8:10] == ["0", "yes"] for row in rows)
    assert "c3 / c1 requests/s" in out and "answers identical at every level and from the engine alone: yes" in out
    assert "load average" in out and "engine alone (ServeEngine.run in this process, 1 torch thread(s)" in out
    assert "engine alone, batch 3 / batch 1 requests/s = " in out
    assert "the clients (asyncio tasks in this one process) used " in out and " ms of CPU per request at c3" in out
    record = json.loads((tmp_path / "out.json").read_text())
    assert [level["errors"] for level in record["runs"][0]["levels"]] == [0, 0]
    assert [e["batch"] for e in record["runs"][0]["engine"]] == [1, 3]
    assert all(e["ms_per_request"] > 0 for e in record["runs"][0]["engine"])
    tiny = record["runs"][0]
    assert tiny["prompt_tokens"] > tiny["image_tokens"] > 0  # the usage of one request, image placeholders included


def test_the_engine_alone_answers_as_one_at_a_time(tmp_path) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    questions = generated_questions(3)
    levels = measure_engine(checkpoint, questions, [1, 2, 5], repeats=1, threads=1, max_tokens=4)
    assert [level.batch for level in levels] == [1, 2, 5] and all(level.ms_per_request > 0 for level in levels)
    assert len(levels[0].answers) == 5 and levels[0].answers[:2] == levels[0].answers[3:]  # questions cycle
    assert levels[1].answers == levels[0].answers and levels[2].answers == levels[0].answers


def test_engine_ratios_compare_batches_and_projectors() -> None:
    def run(projector: str, ms: tuple[float, float]) -> Run:
        engine = [EngineLevel(b, m) for b, m in zip((1, 16), ms)]
        return Run(Path(projector), projector, projector, [], True, engine)

    lines = serve_targets.engine_ratios([run("mlp2x_gelu", (15.0, 6.0)), run("mbtf_stf", (15.0, 4.0))])
    assert lines[0] == "mlp2x_gelu: engine alone, batch 16 / batch 1 requests/s = 2.50x"
    assert lines[2] == "mbtf_stf / mlp2x_gelu engine alone requests/s at batch 16 = 1.50x"


def test_targets_say_meets_or_misses() -> None:
    def run(projector: str, rps: tuple[float, float]) -> Run:
        levels = [Level(c, [Outcome(i) for i in range(10)], seconds=10 / r) for c, r in zip((1, 16), rps)]
        return Run(Path(projector), projector, projector, levels, True)

    lines = serve_targets.targets([run("mlp2x_gelu", (2.0, 6.0)), run("mbtf_stf", (2.0, 9.0))])
    assert lines[0].endswith("3.00x (target >= 4x): MISSES") and lines[1].endswith("4.50x (target >= 4x): meets")
    assert lines[2] == "mbtf_stf / mlp2x_gelu requests/s at c16 = 1.50x (target >= 1.5x): meets"


def test_ceilings_bound_the_targets_by_the_clients_cpu_and_the_prompt_tokens() -> None:
    def run(projector: str, rps: tuple[float, float], client_cpu: float, prompt: int, image: int) -> Run:
        levels = [Level(c, [Outcome(i) for i in range(10)], seconds=10 / r) for c, r in zip((1, 16), rps)]
        levels[-1].client_cpu = client_cpu  # seconds for its 10 requests
        return Run(Path(projector), projector, projector, levels, True, [], prompt, image)

    runs = [run("mlp2x_gelu", (25.0, 60.0), 0.1, 88, 36), run("mbtf_stf", (20.0, 60.0), 0.125, 61, 9)]
    lines = serve_targets.ceilings(runs)
    assert lines[0] == (
        "mlp2x_gelu: the clients (asyncio tasks in this one process) used 10.0 ms of CPU per request at c16: "
        "on one core they can send at most 100 requests/s, 4.00x c1"
    )
    assert lines[1].endswith(
        "12.5 ms of CPU per request at c16: on one core they can send at most 80 requests/s, 4.00x c1"
    )
    assert lines[2] == (
        "LLM prompt tokens per request: mlp2x_gelu 88 (36 image), mbtf_stf 61 (9 image): 1.44x, the most fewer "
        "image tokens can save where the LLM's prefill is the whole cost"
    )
    assert serve_targets.ceilings([run("stf", (25.0, 60.0), 0.0, 61, 9)]) == []  # no client CPU measured: no ceiling


def test_demo_questions_carry_their_images(tmp_path) -> None:
    (tmp_path / "eval").mkdir()
    (tmp_path / "images").mkdir()
    make_image(0).save(tmp_path / "images" / "a.png")
    records = [{"question_id": i, "image": "images/a.png", "text": f"Q{i}?"} for i in range(3)]
    (tmp_path / "eval" / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    questions = demo_questions(tmp_path, 2)
    assert [q.text for q in questions] == ["Q0?", "Q1?"] and questions[0].image_uri.startswith("data:image/png;base64,")
    assert questions[0].messages()[0]["content"][0]["type"] == "image_url"


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile([3.0], 0.99)) == (50.0, 99.0, 3.0)
