"""``python -m llava_stf.demo`` on bad input: one ``error:`` line and exit status 1, before any work is done.

Added for issue 12; each fails before it (an ``--out`` file gave a traceback; an unknown ``--projector`` was found only
at stage 1, after the data, the vision tower and the LLM were built).
"""

from __future__ import annotations

import pytest

from llava_stf.demo.__main__ import main
from llava_stf.errors import UserError


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip()


def test_an_out_path_that_is_a_file_is_one_line(tmp_path, capsys):
    file = tmp_path / "results.txt"
    file.write_text("not a folder")
    assert _run(capsys, "--out", file, "--fast") == (
        1,
        f"error: --out {file}: {file} is a file, not a folder (--out names the artifact folder)",
    )
    assert _run(capsys, "--out", file / "demo", "--fast") == (
        1,
        f"error: --out {file / 'demo'}: {file} is a file, not a folder (--out names the artifact folder)",
    )
    assert file.read_text() == "not a folder"


def test_an_unknown_projector_is_one_line_before_any_work(tmp_path, capsys):
    code, err = _run(capsys, "--out", tmp_path / "demo", "--fast", "--projector", "mlp3x")
    assert code == 1 and err.startswith("error: unknown --projector 'mlp3x'; valid projectors: avgpool, mbtf, ")
    assert not (tmp_path / "demo").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError, match="unknown --projector"):
        main(["--out", str(tmp_path / "demo"), "--projector", "mlp3x", "--debug"])


def test_long_runs_the_long_preset_and_excludes_fast(tmp_path, capsys, monkeypatch):
    """``--long`` trains with ``pipeline.LONG`` (batch 64, 3,000 scenes) under its own run name; with ``--fast`` it is
    argparse's one usage error, before any work."""
    import llava_stf.demo.__main__ as cli
    from llava_stf.demo.pipeline import LONG

    seen = {}

    def fake_pipeline(out, settings, name, progress, data=None, files=None):
        seen.update(settings=settings, name=name)
        raise UserError("stopped here")

    monkeypatch.setattr(cli, "run_pipeline", fake_pipeline)
    assert _run(capsys, "--out", tmp_path / "demo", "--long", "--seed", "2") == (1, "error: stopped here")
    assert seen["name"] == "mbtf_stf-seed2-long" and seen["settings"].batch_size == LONG.batch_size == 64
    assert seen["settings"].num_train == 3000 and seen["settings"].seed == 2
    with pytest.raises(SystemExit) as stop:
        main(["--out", str(tmp_path / "demo"), "--long", "--fast"])
    assert stop.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_presets_pick_the_llm_recipe(tmp_path, capsys, monkeypatch):
    """The demo's default trains on the pre-built cell-word LLM at 96 px; ``--captions`` (and ``--long``, its batch-64
    variant) is the previous recipe, the caption-trained LLM at 64 px, under its own run name; the comparison
    (``compare``) measures ``--captions`` unless told ``--cells``."""
    import llava_stf.demo.__main__ as cli
    import llava_stf.demo.compare as compare_cli

    seen = []

    def fake_pipeline(out, settings, name, progress, data=None, files=None):
        seen.append((settings.llm, settings.image_size, settings.stage2_lr, name))
        raise UserError("stopped here")

    monkeypatch.setattr(cli, "run_pipeline", fake_pipeline)
    for flags in ([], ["--captions"], ["--long"], ["--cells"]):
        assert _run(capsys, "--out", tmp_path / "demo", *flags)[0] == 1
    assert seen == [("cells", 96, 2e-4, "mbtf_stf-seed0"), ("captions", 64, 1e-3, "mbtf_stf-seed0-captions"),
                    ("captions", 64, 1e-3, "mbtf_stf-seed0-long"), ("cells", 96, 2e-4, "mbtf_stf-seed0")]  # fmt: skip

    picked = []
    monkeypatch.setattr(compare_cli, "compare", lambda out, results, settings, *a, **k: picked.append(settings.llm))
    for flags in ([], ["--cells"]):
        compare_cli.main(["--out", str(tmp_path / "c"), *flags])
    assert picked == ["captions", "cells"]
