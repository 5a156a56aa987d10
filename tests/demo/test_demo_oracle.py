"""The caption oracle: the demo's text LLM asked the held-out questions with the true caption instead of the image."""

from __future__ import annotations

import pytest

from llava_stf.data.synthetic import FAMILIES, Obj, Scene
from llava_stf.demo.__main__ import main
from llava_stf.demo.oracle import caption_oracle, caption_prompt


def test_caption_prompt_is_the_pretraining_layout() -> None:
    scene = Scene("images/x.png", (Obj("square", "red", "small", 0, 2),), "7K", (1, 1))
    question = "What color is the square?\nAnswer the question using a single word or phrase."
    assert caption_prompt(scene, question) == (
        'There is a small red square at the top right. The text "7K" is written at the center.\n' + question + "\n"
    )


@pytest.mark.slow
def test_oracle_scores_every_family_from_the_demo_folder(demo_out, capsys) -> None:
    if not (demo_out / "llm-seed0" / "config.json").is_file():  # the pipeline test normally made it already
        assert main(["--fast", "--out", str(demo_out), "--no-progress", "--no-chat"]) == 0
    data = demo_out / "synthetic"
    metrics = caption_oracle(demo_out / "llm-seed0", data)
    questions = (data / "eval" / "questions.jsonl").read_text().splitlines()
    assert metrics["questions"] == len(questions) == sum(metrics[f"questions_{f}"] for f in FAMILIES)
    assert caption_oracle(demo_out / "llm-seed0", data, limit=3)["questions"] == 3
    capsys.readouterr()
    assert main(["oracle", "--out", str(demo_out), "--limit", "4"]) == 0
    assert "given the true caption" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="run `python -m llava_stf.demo"):
        main(["oracle", "--out", str(demo_out / "nothing-here")])
