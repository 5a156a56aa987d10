"""``python -m llava_stf.serve.web``: a Gradio web demo to chat with a checkpoint about an image, answers streamed.

Usage::

    python -m llava_stf.serve.web --model-path CKPT                     # http://127.0.0.1:7860
    python -m llava_stf.serve.web --api http://127.0.0.1:8000/v1 [--api-key KEY] [--model NAME]

The page follows LLaVA's demo (``llava/serve/gradio_web_server.py`` in haotian-liu/LLaVA): the image and the decoding
parameters (temperature, top_p, max output tokens) on the left, the chat on the right with Send, Regenerate and Clear.
Each answer streams in as it is generated and ends with a small line of what it cost (``image tokens: 144 · new
tokens: 23 · 0.4 s``). One conversation is about one image, as in LLaVA-1.5: uploading another image starts a new
conversation. ``--model-path`` runs the checkpoint in this process through the chat CLI's session (the same prompts
and answers as ``python -m llava_stf.serve.cli``); ``--api`` sends the conversation to an OpenAI-compatible server
(``python -m llava_stf.serve.api``) instead (``web_backends``). An uploaded image goes through the package's image
policy (``data.images.ImageLimits``); a refused image or question is shown on the page as one line, never a traceback.

The page listens on 127.0.0.1 unless ``--host`` says otherwise; Gradio's usage analytics are off. Errors before the
page is up (a folder that is not a checkpoint, a server that does not answer, a port in use) are one ``error:`` line.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import gradio as gr

from ..data.images import ImageLimits
from ..errors import DEBUG_ENV, UserError, run_main
from ..generation import GenerationSettings
from ..loading import DTYPES
from .images import ImageSourceError
from .web_backends import ApiBackend, Backend, BackendError, LocalBackend, UploadedImage

History = list[dict]  # finished turns: {"question", "answer", "stats"} (the stats line as shown)
CSS = "#image img { width: 100%; height: 100%; object-fit: contain; }"  # small images shown large, not 64 px wide
SLIDERS = {  # name: (label, minimum, maximum, step, LLaVA's default)
    "temperature": ("Temperature", 0.0, 1.0, 0.1, 0.2),
    "top_p": ("Top P", 0.1, 1.0, 0.1, 0.7),
    "max_new_tokens": ("Max output tokens", 1, 1024, 1, 512),
}


def render(history: History, pending: tuple[str, str] | None = None) -> list[dict]:
    """The chatbot's messages (``{"role", "content"}``): each answer followed by its stats line, in small type."""
    messages = []
    for turn in history:
        messages.append({"role": "user", "content": turn["question"]})
        messages.append({"role": "assistant", "content": f"{turn['answer']}\n\n<sub>{turn['stats']}</sub>"})
    if pending is not None:
        messages.append({"role": "user", "content": pending[0]})
        messages.append({"role": "assistant", "content": pending[1] or "…"})
    return messages


def error_line(message: str) -> str:
    return f"**error:** {message}"


def on_upload(payload: dict | None, limits: ImageLimits) -> tuple:
    """A new image (Gradio's raw upload, not decoded by Gradio): checked by the image policy, a new conversation.

    Returns:
        ``(image shown, image state, history, chat, status)``; a refused image is removed and the reason shown.
    """
    if not payload or not payload.get("path"):
        return None, None, [], [], ""
    name = payload.get("orig_name") or Path(payload["path"]).name
    try:
        image = UploadedImage.from_bytes(Path(payload["path"]).read_bytes(), name, limits)
    except (ImageSourceError, OSError) as err:
        return None, None, [], [], error_line(f"image refused: {err}")
    width, height = image.image.size
    return gr.update(), image, [], [], f"image: {name}, {width} x {height}; a new conversation"


def clear() -> tuple:
    """Clear: no image, no conversation. ``(image shown, image state, history, chat, status, question)``."""
    return None, None, [], [], "", ""


def answer(
    backend: Backend,
    history: History,
    question: str,
    image: UploadedImage | None,
    settings: GenerationSettings,
    on_error: History | None = None,
) -> Iterator[tuple[list[dict], History, str]]:
    """Stream the answer to ``question``: yields ``(chat, history, status)`` as it grows; the exchange is added to
    the history only once it is complete. An error shows its reason and leaves the history as it was (or
    ``on_error``: Regenerate keeps the answer it was replacing)."""
    exchanges = [(turn["question"], turn["answer"]) for turn in history]
    yield render(history, (question, "")), history, ""
    text = ""
    try:
        for reply in backend.stream(exchanges, question, image, settings):
            text = reply.text
            if reply.stats is not None:
                history = [*history, {"question": question, "answer": text, "stats": reply.stats.line()}]
                yield render(history), history, ""
                return
            yield render(history, (question, text)), history, ""
    except BackendError as err:
        history = history if on_error is None else on_error
        yield render(history), history, error_line(str(err))


def settings_from(temperature: float, top_p: float, max_new_tokens: float) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p))


def send(backend: Backend, question: str, history: History, image: UploadedImage | None, *sliders) -> Iterator:
    """Send: ``(chat, history, status, question box)``; the box empties while answering, and gets the question
    back when it was refused."""
    question = (question or "").strip()
    if not question:
        yield render(history), history, error_line("type a question first"), ""
        return
    for chat, history_now, status in answer(backend, history, question, image, settings_from(*sliders)):
        yield chat, history_now, status, question if status else ""


def regenerate(backend: Backend, history: History, image: UploadedImage | None, *sliders) -> Iterator:
    """Regenerate: answer the last question again (``(chat, history, status)``)."""
    if not history:
        yield render(history), history, error_line("nothing to regenerate yet")
        return
    last = history[-1]["question"]
    yield from answer(backend, history[:-1], last, image, settings_from(*sliders), on_error=history)


def build_demo(
    backend: Backend, defaults: dict[str, float] | None = None, limits: ImageLimits | None = None, concurrency: int = 1
):
    """The Gradio ``Blocks`` page for ``backend``.

    Args:
        backend: Where the answers come from.
        defaults: The sliders' starting values by name (``SLIDERS``); LLaVA's where not given.
        limits: The image policy for uploads (default ``ImageLimits()``).
        concurrency: How many answers are generated at once, over all browser tabs.
    """
    defaults = {name: spec[4] for name, spec in SLIDERS.items()} | (defaults or {})
    limits = limits or ImageLimits()
    with gr.Blocks(title="LLaVA-STF", analytics_enabled=False) as demo:
        about = f" ({backend.details})" if backend.details else ""
        gr.Markdown(f"# LLaVA-STF\nChatting with **{backend.name}**{about}. Upload an image, ask about it.")
        history = gr.State([])
        uploaded = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                image = gr.Image(
                    type="filepath", label="Image", sources=["upload", "clipboard"], height=300, elem_id="image"
                )
                with gr.Accordion("Parameters", open=True):
                    sliders = [
                        gr.Slider(low, high, value=defaults[name], step=step, label=label)
                        for name, (label, low, high, step, _) in SLIDERS.items()
                    ]
            with gr.Column(scale=8):
                chat = gr.Chatbot(
                    label="LLaVA-STF", height=460, buttons=["copy_all"], feedback_options=None, elem_id="chat"
                )
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    question = gr.Textbox(
                        show_label=False, placeholder="Ask about the image and press Enter", scale=8, elem_id="question"
                    )
                    send_button = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    regenerate_button = gr.Button("Regenerate", elem_id="regenerate")
                    clear_button = gr.Button("Clear", elem_id="clear")
        image.upload(
            partial(on_upload, limits=limits), [image], [image, uploaded, history, chat, status], preprocess=False
        )
        image.clear(lambda: clear()[:5], None, [image, uploaded, history, chat, status])
        chat.clear(lambda: ([], ""), None, [history, status])  # the chat's own trash button: a new conversation
        # Answers share one queue: a question sent while another is answered waits for it, and then reads the
        # history with that answer in it (Gradio reads a State when the event runs, not when it was sent).
        queue = {"concurrency_id": "answer", "concurrency_limit": concurrency}
        ask = partial(send, backend)
        for trigger in (send_button.click, question.submit):
            trigger(ask, [question, history, uploaded, *sliders], [chat, history, status, question], **queue)
        again = partial(regenerate, backend)
        regenerate_button.click(again, [history, uploaded, *sliders], [chat, history, status], **queue)
        clear_button.click(clear, None, [image, uploaded, history, chat, status, question])
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llava_stf.serve.web", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-path", type=Path, help="checkpoint folder, run in this process")
    source.add_argument("--api", metavar="URL", help="an OpenAI-compatible server's base URL (…/v1) instead")
    parser.add_argument("--api-key", help="with --api: the server's key (Authorization: Bearer)")
    parser.add_argument("--model", help="with --api: the model name (default: the server's first model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="with --model-path")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: float16 on CUDA, else 32")
    for name, (_, low, high, _, default) in SLIDERS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=float, default=default, help=f"the slider's start ({low:g}..{high:g})")
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
    return parser


def check_port(host: str, port: int) -> None:
    """A one-line ``UserError`` unless ``host:port`` can be listened on now."""
    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err}): choose another --port") from None


def make_backend(args: argparse.Namespace) -> Backend:
    """The backend the flags ask for; a one-line ``UserError`` when it cannot be had."""
    if args.api is None:
        from .cli import check_model_path, load_generator, resolve_device

        check_model_path(args.model_path)
        generator = load_generator(args, resolve_device(args.device, None), None)
        path = args.model_path
        shown = "/".join(path.parts[-2:]) if path.is_absolute() else str(path)  # not the whole machine's layout
        config, processor = generator.model.config, generator.processor
        projector, reducer = getattr(config, "projector_type", "?"), getattr(config, "reducer_type", None) or "none"
        details = (
            f"projector {projector}, reducer {reducer}, {generator.describe_image_tokens()}, "
            f"template {processor.conversation_template}"
        )
        return LocalBackend(generator, shown, details)
    try:
        return ApiBackend(args.api, args.api_key, args.model)
    except BackendError as err:
        raise UserError(str(err)) from None


def run(args: argparse.Namespace) -> int:
    defaults = {name: getattr(args, name) for name in SLIDERS}
    for name, (_, low, high, _, _) in SLIDERS.items():
        if not low <= defaults[name] <= high:
            raise UserError(f"--{name.replace('_', '-')} must be in {low:g}..{high:g}, got {defaults[name]:g}")
    if args.model_path is not None and (args.api_key or args.model):
        raise UserError("--api-key and --model go with --api, not --model-path")
    check_port(args.host, args.port)  # before the model loads
    backend = make_backend(args)
    limits = ImageLimits()
    # In this process the model answers one question at a time; a server batches concurrent requests itself.
    demo = build_demo(backend, defaults, limits, concurrency=1 if isinstance(backend, LocalBackend) else 16)
    demo.queue()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {args.host}: anyone who can reach this machine can use the demo", file=sys.stderr)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        max_file_size=limits.max_bytes,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        show_error=True,
        css=CSS,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the demo until Ctrl-C; return the exit status (0 done, 1 error, 2 bad arguments, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    return run_main(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
