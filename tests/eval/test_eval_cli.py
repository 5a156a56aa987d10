"""``python -m llava_stf.eval`` and ``scripts/eval/*.sh``: chunked runs, kill and restart, tables, loud errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from eval_fixtures import make_pope, make_vizwiz, save_image, write_jsonl

import llava_stf.eval.__main__ as cli
from llava_stf.errors import UserError
from llava_stf.eval.answers import parts_dir, read_jsonl

REPO = Path(__file__).resolve().parents[2]


def _argv(benchmark: str, checkpoint: Path, root: Path, *extra: str) -> list[str]:
    argv = ["--benchmark", benchmark, "--model-path", str(checkpoint), "--data-root", str(root), "--no-progress"]
    return [*argv, "--max-new-tokens", "4", *extra]


def _no_model(*args, **kwargs):
    raise AssertionError("no model may be loaded here")


def test_chunks_from_env_then_merge_without_a_model(tmp_path, checkpoint, model_id, monkeypatch, capsys) -> None:
    make_pope(tmp_path)
    answers = tmp_path / "pope" / "answers" / f"{model_id}.jsonl"
    for idx in ("1", "0"):
        monkeypatch.setenv("CHUNKS", "2")
        monkeypatch.setenv("IDX", idx)
        cli.main(_argv("pope", checkpoint, tmp_path))
        assert answers.is_file() == (idx == "0")  # the chunk that answers the last question merges
    monkeypatch.delenv("CHUNKS")
    monkeypatch.delenv("IDX")
    monkeypatch.setattr(cli, "load_checkpoint", _no_model)
    cli.main(_argv("pope", checkpoint, tmp_path))  # everything answered: merge + score only
    assert [r["question_id"] for r in read_jsonl(answers)] == [1, 2, 3, 4, 5]
    assert f"| {model_id} |" in capsys.readouterr().out


def test_preflight_lists_missing_images_before_loading(tmp_path, checkpoint, monkeypatch, capsys) -> None:
    make_pope(tmp_path)
    questions = make_vizwiz(tmp_path)
    (tmp_path / "vizwiz" / "test" / questions[1]["image"]).unlink()
    monkeypatch.setattr(cli, "load_checkpoint", _no_model)
    assert cli.main(_argv("pope", checkpoint, tmp_path, "--benchmark", "pope", "vizwiz")) == 1  # before POPE runs
    err = capsys.readouterr().err
    assert err.startswith("error: 1 image(s) of unanswered questions cannot be used") and err.count("\n") == 1
    assert f"missing_image: no file '{tmp_path / 'vizwiz' / 'test' / questions[1]['image']}'" in err
    assert not (tmp_path / "pope" / "answers").exists()


def test_record_server_scores_and_combined_table(tmp_path, checkpoint, model_id, capsys) -> None:
    cli.main(["--record", "vqav2=78.25", "vizwiz=50", "--model-path", str(checkpoint), "--data-root", str(tmp_path)])
    results = json.loads((tmp_path / "results" / model_id / "results.json").read_text())
    assert results["benchmarks"]["vqav2/llava_vqav2_mscoco_test-dev2015"] == {
        "column": "VQAv2",
        "headline": 78.25,
        "headline_metric": "server",
        "source": "server",
        "split": "llava_vqav2_mscoco_test-dev2015",
    }
    assert results["model_digest"].startswith("sha256:") and results["model_id"] == model_id
    capsys.readouterr()
    argv = ["--table", "--paper", "--model-path", str(checkpoint), "--data-root", str(tmp_path)]
    cli.main(argv)
    cli.main([*argv[:2], "--model-id", model_id, "other", "--data-root", str(tmp_path)])  # ids instead of folders
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines[2:5]] == [
        "| LLaVA-1.5-7B (paper)",
        "| LLaVA-STF-7B (paper)",
        f"| {model_id}",
    ]
    assert "| 78.2 | 50.0 | 64.1* |" in lines[4]
    assert [line.split(" | ")[0] for line in lines[-3:-1]] == [f"| {model_id}", "| other"]
    assert "| 78.2 | 50.0 | 64.1* |" in lines[-3]


def test_cli_guards(tmp_path, checkpoint, monkeypatch, capsys) -> None:
    assert cli.main(_argv("gqa2", checkpoint, tmp_path)) == 1
    assert "error: unknown benchmark 'gqa2'; valid benchmarks: gqa" in capsys.readouterr().err
    with pytest.raises(ValueError, match="valid benchmarks: gqa"):
        cli.main(_argv("gqa2", checkpoint, tmp_path, "--debug"))
    monkeypatch.setenv("CHUNKS", "2")
    with pytest.raises(UserError, match="--overwrite deletes every chunk"):
        cli.main(_argv("pope", checkpoint, tmp_path, "--overwrite", "--debug"))
    with pytest.raises(SystemExit):  # argparse: several checkpoints only with --table
        cli.main(["--benchmark", "pope", "--model-path", "a", "b"])
    assert cli.model_id_from_path("/x/llava-stf-7b/checkpoint-500") == "llava-stf-7b_checkpoint-500"


def _many_questions(root: Path, n: int) -> None:
    folder = root / "vizwiz"
    for i in range(3):
        save_image(folder / "test" / f"{i}.jpg", i)
    write_jsonl(
        folder / "llava_test.jsonl", [{"question_id": i, "image": f"{i % 3}.jpg", "text": f"Q{i}?"} for i in range(n)]
    )


@pytest.mark.slow
def test_sigkill_then_restart_gives_one_answer_per_question(tmp_path, checkpoint, model_id) -> None:
    n = 20
    _many_questions(tmp_path, n)
    argv = _argv("vizwiz", checkpoint, tmp_path, "--batch-size", "1", "--max-new-tokens", "32")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llava_stf.eval", *argv], env=env, stderr=subprocess.DEVNULL)
    part = parts_dir(tmp_path / "vizwiz" / "answers" / f"{model_id}.jsonl") / "1_0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if part.is_file() and part.read_bytes().count(b"\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert 3 <= part.read_bytes().count(b"\n") < n
    cli.main(argv)  # restart
    keys = [r["key"] for r in read_jsonl(part)]
    assert len(keys) == len(set(keys)) == n
    answers = read_jsonl(part.parent.parent / f"{model_id}.jsonl")
    reference_root = tmp_path / "reference"
    _many_questions(reference_root, n)
    cli.main(_argv("vizwiz", checkpoint, reference_root, "--batch-size", "8", "--max-new-tokens", "32"))
    assert answers == read_jsonl(reference_root / "vizwiz" / "answers" / f"{model_id}.jsonl")


@pytest.mark.slow
def test_script_runs_two_chunk_processes_then_merges(tmp_path, checkpoint, model_id) -> None:
    make_pope(tmp_path)
    env = {**os.environ, "CHUNKS": "2", "DATA_ROOT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    script = REPO / "scripts" / "eval" / "pope.sh"
    done = subprocess.run(
        ["bash", str(script), str(checkpoint), "--max-new-tokens", "4", "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answers = tmp_path / "pope" / "answers" / f"{model_id}.jsonl"
    assert sorted(p.name for p in parts_dir(answers).iterdir()) == ["2_0.jsonl", "2_1.jsonl"]
    assert [r["question_id"] for r in read_jsonl(answers)] == [1, 2, 3, 4, 5]
    assert "POPE" in done.stdout and f"| {model_id} |" in done.stdout
