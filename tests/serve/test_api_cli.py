"""``python -m llava_stf.serve.api`` startup: a folder that is not a checkpoint, a port in use, a bad flag or reducer is
one ``error:`` line and status 1, before anything slow; the served model id is the folder name + digest."""

from __future__ import annotations

import socket

import pytest

from llava_stf.serve import api


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_not_a_checkpoint_is_one_line(tmp_path, capsys) -> None:
    assert api.main(["--model-path", str(tmp_path), "--port", "0"]) == 1
    assert str(tmp_path) in _error_line(capsys)


def test_a_port_in_use_is_one_line(serve_checkpoint, capsys, monkeypatch) -> None:
    monkeypatch.setattr(api, "load_generator", lambda *a, **k: pytest.fail("no model may be loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert api.main(["--model-path", str(serve_checkpoint), "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in _error_line(capsys)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--max-queue", "0"], "--max-queue must be >= 1"),
        (["--batch-window-ms", "-1"], "--batch-window-ms must be >= 0"),
        (["--max-image-bytes", "0"], "--max-image-bytes must be positive"),
        (["--reducer", "no-such-reducer"], "no-such-reducer"),
    ],
)
def test_bad_flags_are_one_line(serve_checkpoint, capsys, monkeypatch, flags, message) -> None:
    monkeypatch.setattr(api, "load_generator", lambda *a, **k: pytest.fail("no model may be loaded"))
    assert api.main(["--model-path", str(serve_checkpoint), "--port", "0", *flags]) == 1
    assert message in _error_line(capsys)


def test_the_host_defaults_to_this_machine() -> None:
    args = api.build_parser().parse_args(["--model-path", "x"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)


def test_the_listening_socket_gives_connections_tcp_nodelay() -> None:
    """asyncio sets TCP_NODELAY on accepted connections only when the listening socket says IPPROTO_TCP; without it
    each response on a kept-alive connection waited ~40 ms for a delayed ACK."""
    with api.listen("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP
