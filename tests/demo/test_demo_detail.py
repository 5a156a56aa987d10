"""The comparison's world (``--detail``): a tiny dot per scene, its own cached world, a ``detail`` column."""

from __future__ import annotations

import json
from dataclasses import replace

from llava_stf.demo.compare import aggregate, write_markdown
from llava_stf.demo.pipeline import DETAIL, FAST, PRESETS, prepare_data


def _dots(folder) -> int:
    return sum("dot" in json.loads(line) for line in (folder / "scenes.jsonl").read_text().splitlines())


def test_the_detail_world_and_the_default_are_never_taken_for_each_other(tmp_path) -> None:
    plain, detail = replace(FAST, num_train=6, num_eval=2), replace(FAST, num_train=6, num_eval=2, detail=True)
    folder = prepare_data(tmp_path, plain)
    assert _dots(folder) == 0
    marker = (folder / "demo_data.json").read_text()
    assert "detail" not in marker  # the default world's marker, and so its cache keys, as before
    assert _dots(prepare_data(tmp_path, detail)) == 8  # regenerated, not the plain world reused
    assert _dots(prepare_data(tmp_path, plain)) == 0  # and back
    assert (folder / "demo_data.json").read_text() == marker


def test_compare_measures_the_detail_world_by_default(tmp_path, monkeypatch) -> None:
    from llava_stf.demo import compare

    seen = []
    monkeypatch.setattr(compare, "compare", lambda out, results, settings, *a: seen.append((settings, a[3])))
    assert compare.main(["--out", str(tmp_path)]) == 0
    assert compare.main(["--out", str(tmp_path), "--captions"]) == 0
    assert seen == [(DETAIL, "-detail"), (PRESETS["captions"], "-captions")]
    assert DETAIL.detail and DETAIL.num_eval == 200 and DETAIL.llm == "captions"


def _row(projector: str, seed: int, accuracy: float, detail: float | None) -> dict:
    families = {f"accuracy_{f}": accuracy for f in ("color", "shape", "position", "count", "text", "existence")}
    blank = {f"blank_{k}": 20.0 for k in ("accuracy", *families)}
    extra = {} if detail is None else {"accuracy_detail": detail, "blank_accuracy_detail": 17.0}
    return {"projector": projector, "seed": seed, "visual_tokens": 64, "prefill_flops": 1e8, "llm_visual_flops": 4e7,
            "accuracy": accuracy, **families, "questions": 1900, **blank, **extra}  # fmt: skip


def test_the_tables_have_a_detail_column_only_for_a_world_with_one(tmp_path) -> None:
    rows = [_row("mlp2x_gelu", 0, 30.0, 50.0), _row("mlp2x_gelu", 1, 33.0, 40.0), _row("avgpool", 0, 31.0, 20.0),
            _row("avgpool", 1, 31.5, 24.0)]  # fmt: skip
    path = tmp_path / "results.md"
    write_markdown(path, aggregate(rows), "note", rows)
    table = path.read_text()
    header = table.splitlines()[0]
    assert header.endswith("| existence | detail |")
    assert "| mlp2x_gelu | 64 | 100.0 | 40.00 | 31.5 ± 2.1 |" in table and "| 45.0 ± 7.1 |" in table
    assert "| 22.0 ± 2.8 |" in table  # avgpool's detail
    assert "(1900 per run)" in table and "largest sample std of overall accuracy across seeds is 2.1 points" in table
    assert "(mlp2x_gelu)" in table
    control = table.split("Blank-image control")[1]
    assert control.splitlines()[2].endswith("| existence | detail |") and "| 17.0 ± 0.0 |" in control
    plain = [{k: v for k, v in r.items() if "detail" not in k} for r in rows]
    write_markdown(path, aggregate(plain), "note", plain)
    assert path.read_text().splitlines()[0].endswith("| existence |")


def test_one_caption_llm_for_every_training_seed_when_llm_seed_is_set(tmp_path) -> None:
    from llava_stf.demo.pipeline import prepare_llm
    from llava_stf.demo.world import generated_world

    s = replace(FAST, num_train=6, num_eval=2)
    world = generated_world(prepare_data(tmp_path, s), s.image_size)
    own = [prepare_llm(tmp_path, world, replace(s, seed=seed)) for seed in (0, 1)]
    assert [p.name for p in own] == ["llm-seed0", "llm-seed1"]  # None: one LLM per training seed, as before
    built = (own[0] / "model.safetensors").stat().st_mtime_ns
    assert (own[0] / "model.safetensors").read_bytes() != (own[1] / "model.safetensors").read_bytes()
    shared = [prepare_llm(tmp_path, world, replace(s, seed=seed, llm_seed=0)) for seed in (1, 2)]
    assert shared == [own[0], own[0]] and not (tmp_path / "llm-seed2").exists()
    assert (own[0] / "model.safetensors").stat().st_mtime_ns == built  # found, not built again
    assert json.loads((own[0] / "demo_llm.json").read_text())["seed"] == 0
