"""The web demo without a browser: its handlers on a tiny checkpoint, the API backend against a fake OpenAI server.

The handlers are what Gradio calls (``send``, ``regenerate``, ``on_upload``): streaming yields a growing answer, the
history holds the conversation exactly as the chat CLI's session would, a refused image or question is a visible
``**error:**`` line and never an exception. ``ApiBackend`` is checked against a small OpenAI-style server on 127.0.0.1
that records the request and streams ``chat.completion.chunk`` events (the real API server has its own tests).
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from serve_helpers import OK_PNG, closed_port

from llava_stf.data.images import ImageLimits
from llava_stf.generation import GenerationSettings, Generator
from llava_stf.serve.chat import ChatSession

for _module in ("gradio", "openai"):
    pytest.importorskip(_module, reason=f"{_module} is not installed (pip install -e '.[serve]')")

from llava_stf.serve.web import build_demo, main, on_upload, regenerate, send, settings_from  # noqa: E402
from llava_stf.serve.web_backends import ApiBackend, LocalBackend, Stats, UploadedImage  # noqa: E402

GREEDY = (0.0, 0.7, 10)  # the sliders: temperature, top_p, max output tokens


@pytest.fixture(scope="module")
def backend(serve_checkpoint) -> LocalBackend:
    return LocalBackend(Generator.from_pretrained(serve_checkpoint, device="cpu"), "tiny")


@pytest.fixture(scope="module")
def image() -> UploadedImage:
    return UploadedImage.from_bytes(OK_PNG, "photo.png")


def answers(chat: list[dict]) -> list[str]:
    return [m["content"] for m in chat if m["role"] == "assistant"]


def test_send_streams_a_growing_answer_then_its_stats(backend, image) -> None:
    steps = list(send(backend, " What is shown? ", [], image, *GREEDY))
    chat, history, status, box = steps[-1]
    assert status == "" and box == "" and len(history) == 1
    turn = history[0]
    assert turn["question"] == "What is shown?" and turn["answer"]
    assert turn["stats"].startswith("image tokens: 16 · new tokens: ") and turn["stats"].endswith(" s")
    assert answers(chat) == [f"{turn['answer']}\n\n<sub>{turn['stats']}</sub>"]
    partial = [answers(step[0])[-1] for step in steps[1:-1]]  # after the first yield (the question, "…")
    assert len(partial) >= 3 and all(b.startswith(a) and len(b) > len(a) for a, b in zip(partial, partial[1:]))
    assert partial[-1].strip() == turn["answer"]


def test_multi_turn_answers_match_the_chat_cli_session(backend, image) -> None:
    history = list(send(backend, "What is shown?", [], image, *GREEDY))[-1][1]
    history = list(send(backend, "What colour is it?", history, image, *GREEDY))[-1][1]
    session = ChatSession(backend.generator, image.image, settings_from(*GREEDY))
    assert [t["answer"] for t in history] == [session.ask("What is shown?"), session.ask("What colour is it?")]
    again = list(regenerate(backend, history, image, *GREEDY))[-1][1]
    pairs = [[(t["question"], t["answer"]) for t in h] for h in (history, again)]
    assert pairs[0] == pairs[1]  # greedy: the same answer again, the history not doubled


def test_closing_the_stream_stops_the_generation(backend, image) -> None:
    """A page that stops listening (tab closed) stops the model at its next token, and frees it for the next."""
    calls: list[int] = []
    hook = backend.generator.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        stream = backend.stream([], "Describe it.", image, GenerationSettings(max_new_tokens=300, min_new_tokens=300))
        assert next(stream).text
        stream.close()
        assert backend._lock.acquire(timeout=10)
        backend._lock.release()
    finally:
        hook.remove()
    assert len(calls) < 20


def test_refused_questions_show_an_error_line_and_keep_the_history(backend, image, monkeypatch) -> None:
    chat, history, status, box = list(send(backend, "   ", [], image, *GREEDY))[-1]
    assert status == "**error:** type a question first" and history == []
    assert list(regenerate(backend, [], image, *GREEDY))[-1][2] == "**error:** nothing to regenerate yet"
    monkeypatch.setattr(backend.generator.model.config.text_config, "max_position_embeddings", 40)
    chat, history, status, box = list(send(backend, "Describe it.", [], image, *GREEDY))[-1]
    assert status.startswith("**error:** the conversation would need ") and history == [] and chat == []
    assert box == "Describe it."  # the question comes back to the box, to shorten it
    kept = [{"question": "Hi?", "answer": "Hello.", "stats": "image tokens: 16"}]
    chat, history, status = list(regenerate(backend, kept, image, *GREEDY))[-1]
    assert status.startswith("**error:** the conversation would need ") and history == kept and len(chat) == 2


def test_uploaded_images_go_through_the_image_policy(tmp_path, image) -> None:
    good, text = tmp_path / "photo.png", tmp_path / "notes.png"
    good.write_bytes(OK_PNG)
    text.write_bytes(b"not an image")
    shown, state, history, chat, status = on_upload({"path": str(good), "orig_name": "cat.png"}, ImageLimits())
    assert state.image.size == (20, 16) and status == "image: cat.png, 20 x 16; a new conversation"
    for path, limits, reason in [
        (text, ImageLimits(), "is not a readable image"),
        (good, ImageLimits(max_pixels=100), "320 pixels > 100"),
        (tmp_path / "gone.png", ImageLimits(), "No such file"),
    ]:
        shown, state, history, chat, status = on_upload({"path": str(path)}, limits)
        assert shown is None and state is None and status.startswith("**error:** image refused: ")
        assert reason in status, status
    assert image.data_uri().startswith("data:image/png;base64,iVBOR")


class _FakeOpenAI(BaseHTTPRequestHandler):
    """``GET /v1/models`` and a streamed ``POST /v1/chat/completions`` (``chat.completion.chunk`` events)."""

    requests: list[dict] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._send("application/json", json.dumps({"object": "list", "data": [{"id": "tiny", "object": "model"}]}))

    def do_POST(self) -> None:  # noqa: N802
        self.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        base = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "tiny"}
        events = [
            {**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            for piece in ["A red", " circle", "."]
        ]
        usage = {"prompt_tokens": 40, "completion_tokens": 4, "total_tokens": 44}
        events.append({**base, "choices": [], "usage": usage | {"prompt_tokens_details": {"image_tokens": 16}}})
        self._send("text/event-stream", "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n")

    def _send(self, kind: str, body: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    _FakeOpenAI.requests = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_the_api_backend_streams_through_the_openai_client(fake_api, image) -> None:
    backend = ApiBackend(fake_api, api_key="k")
    assert backend.model == "tiny"
    history = [{"question": "What is it?", "answer": "A shape.", "stats": ""}]
    steps = list(send(backend, "Which colour?", history, image, 0.2, 0.7, 30))
    chat, history, status, box = steps[-1]
    assert status == "" and history[-1]["answer"] == "A red circle."
    assert history[-1]["stats"].startswith("image tokens: 16 · new tokens: 4 · ")
    assert [answers(s[0])[-1] for s in steps[1:-1]] == ["A red", "A red circle", "A red circle."]
    sent = _FakeOpenAI.requests[-1]
    assert sent["model"] == "tiny" and sent["stream"] is True and sent["max_tokens"] == 30
    assert sent["temperature"] == 0.2 and sent["top_p"] == 0.7
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["user", "assistant", "user"]
    first = sent["messages"][0]["content"]
    assert first[0]["image_url"]["url"] == image.data_uri() and first[1] == {"type": "text", "text": "What is it?"}
    assert sent["messages"][2]["content"] == [{"type": "text", "text": "Which colour?"}]


def test_the_api_backend_reports_an_unreachable_server_in_one_line(image) -> None:
    backend = ApiBackend(f"http://127.0.0.1:{closed_port()}/v1", model="tiny")  # a model given: nothing asked yet
    status = list(send(backend, "Hi?", [], image, *GREEDY))[-1][2]
    assert status.startswith("**error:** http://127.0.0.1:") and "Connection error" in status


def test_stats_line() -> None:
    assert Stats(144, 23, 0.42).line() == "image tokens: 144 · new tokens: 23 · 0.4 s"
    assert Stats(0, None, 1.0).line() == "image tokens: none · new tokens: n/a · 1.0 s"


def test_the_page_builds(backend) -> None:
    demo = build_demo(backend, {"temperature": 0.0})
    assert demo.title == "LLaVA-STF"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model-path", "/nonexistent/ckpt"], "error: "),
        (["--api", "http://127.0.0.1:{closed}/v1"], "error: cannot list the models of http://127.0.0.1:"),
        (["--api", "http://127.0.0.1:1/v1", "--temperature", "3"], "error: --temperature must be in 0..1, got 3"),
        (["--model-path", "x", "--model", "m"], "error: --api-key and --model go with --api"),
        (["--model-path", "x", "--port", "{busy}"], "error: cannot listen on 127.0.0.1:{busy} (Address already"),
    ],
)
def test_entry_point_errors_are_one_line(argv, message, capsys) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        ports = {"{closed}": str(closed_port()), "{busy}": str(busy.getsockname()[1])}
        if "--port" not in argv:
            argv = [*argv, "--port", ports["{closed}"]]  # free now: 7860 may be taken on this machine
        for name, port in ports.items():
            argv, message = [a.replace(name, port) for a in argv], message.replace(name, port)
        assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1, err
