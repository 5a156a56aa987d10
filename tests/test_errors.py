"""The shared error boundary: one line for expected errors, the traceback with --debug, bugs untouched."""

from __future__ import annotations

import pytest

from llava_stf.errors import UserError, run_main


def fail(error):
    def work():
        raise error

    return work


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (UserError("data.json line 3: not JSON"), "error: data.json line 3: not JSON"),
        (FileNotFoundError(2, "No such file or directory", "/x/q.jsonl"), "No such file or directory: /x/q.jsonl"),
        (ValueError("top_p must be in (0, 1]\n  got 2"), "error: top_p must be in (0, 1] got 2"),
    ],
)
def test_expected_errors_are_one_line(capsys, error, line):
    assert run_main(fail(error)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and line in err and "Traceback" not in err


def test_debug_and_the_environment_show_the_traceback(monkeypatch):
    with pytest.raises(UserError):
        run_main(fail(UserError("x")), debug=True)
    monkeypatch.setenv("LLAVA_STF_DEBUG", "1")
    with pytest.raises(UserError):
        run_main(fail(UserError("x")))


def test_bugs_keep_their_traceback_and_statuses_pass_through(capsys):
    with pytest.raises(KeyError):
        run_main(fail(KeyError("bug")))
    assert run_main(lambda: None) == 0 and run_main(lambda: 3) == 3
    assert run_main(fail(KeyboardInterrupt())) == 130
