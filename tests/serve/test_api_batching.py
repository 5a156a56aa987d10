"""Batching, the bounded queue and cancellation: a full queue answers 429 with Retry-After, a client that disconnects
cancels its work (dropped while waiting, stopped while running), rows of one batch end on their own (their own
max_tokens and stop strings) with the answers of batches of one, and an adaptive reducer reports its own count."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from api_helpers import MODEL, TIMEOUT, GatedEngine, client, data_uri, running, user, wait_for
from serve_helpers import OK_PNG

from llava_stf.generation import GenerationSettings, Generator, Request
from llava_stf.reducer_choice import ReducerChoice
from llava_stf.serve.engine import Job, ServeEngine
from llava_stf.serve.images import open_image_source
from llava_stf.serve.text_stream import TextStream
from llava_stf.testing import save_tiny_checkpoint

pytestmark = pytest.mark.slow
IMAGE = data_uri(OK_PNG)


@pytest.fixture(scope="module")
def generator(serve_checkpoint) -> Generator:
    return Generator.from_pretrained(serve_checkpoint, "cpu")


def _background(fn) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(_outcome(fn)), daemon=True)
    thread.start()
    return thread, out


def _outcome(fn):
    try:
        return fn()
    except Exception as err:  # handed to the test
        return err


def test_a_full_queue_answers_429_with_retry_after(generator) -> None:
    engine = GatedEngine(generator)
    with running(engine, max_batch=1, max_queue=1) as (url, app):
        api = client(url)
        ask = lambda: api.chat.completions.create(model=MODEL, messages=[user("Hi")], max_tokens=2)  # noqa: E731
        first, first_out = _background(ask)
        wait_for(lambda: engine.entered == 1)  # running (held at the gate)
        second, second_out = _background(ask)
        wait_for(lambda: app.state.batcher.waiting == 1)  # the queue is full
        with pytest.raises(openai.RateLimitError) as err:
            ask()
        assert err.value.status_code == 429 and err.value.response.headers["Retry-After"] == "1"
        assert err.value.body["code"] == "rate_limit_exceeded"
        engine.gate.set()
        first.join(TIMEOUT), second.join(TIMEOUT)
        assert [type(o).__name__ for o in first_out + second_out] == ["ChatCompletion", "ChatCompletion"]


def test_a_client_that_leaves_while_waiting_is_dropped(generator) -> None:
    engine = GatedEngine(generator)
    with running(engine, max_batch=1) as (url, app):
        batcher = app.state.batcher
        holder, _ = _background(
            lambda: client(url).chat.completions.create(model=MODEL, messages=[user("Hi")], max_tokens=2)
        )
        wait_for(lambda: engine.entered == 1)
        body = {"model": MODEL, "messages": [user("Never answered")], "max_tokens": 2}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(TIMEOUT, read=0.5))
        waiting = list(batcher._waiting)
        wait_for(lambda: waiting[0].cancelled)  # the server noticed the disconnect
        engine.gate.set()
        holder.join(TIMEOUT)
        wait_for(lambda: batcher.counts["cancelled_waiting"] == 1)
        assert batcher.counts["answered"] == 1 and list(batcher.batch_sizes) == [1]


def test_a_streaming_client_that_leaves_stops_its_row(serve_checkpoint) -> None:
    with running(Generator.from_pretrained(serve_checkpoint, "cpu")) as (url, app):
        batcher, jobs = app.state.batcher, []
        batcher.on_batch = jobs.extend
        api = client(url)
        long = api.chat.completions.create(model=MODEL, messages=[user("Describe the image.")], max_tokens=64)
        assert long.usage.completion_tokens == 64  # this question runs to max_tokens: no early EOS to confuse us
        stream = api.chat.completions.create(
            model=MODEL, messages=[user("Describe the image.")], max_tokens=1000, stream=True
        )
        next(c for c in stream if c.choices and c.choices[0].delta.content)
        stream.close()
        wait_for(lambda: batcher.counts["cancelled_running"] == 1)
        job = jobs[-1]
        assert job.cancelled and not job.finished and job.generated < 1000  # stopped early, output discarded


def test_rows_of_one_batch_end_on_their_own(generator, image_file) -> None:
    engine, image = ServeEngine(generator), open_image_source(str(image_file))
    requests = [Request.single("What is shown?", image), Request.single("Hi there"), Request.single("Count them.")]
    limits, events = [3, 9, 6], [[] for _ in requests]
    full = [generator.generate([r], GenerationSettings(n))[0] for r, n in zip(requests, limits)]
    stop = full[1][4:6]
    jobs = [
        Job(r, n, 0, stops=(stop,) if i == 1 else (), stream=True, sink=lambda k, p, i=i: events[i].append((k, p)))
        for i, (r, n) in enumerate(zip(requests, limits))
    ]
    engine.run(jobs)
    results = [e[-1][1] for e in events]
    assert [r.content for r in results] == [full[0], full[1][: full[1].find(stop)].rstrip(), full[2]]
    assert results[1].finish_reason == "stop" and jobs[1].generated < limits[1]  # the stop string ended its row early
    assert [r.completion_tokens for r in results] == [j.generated for j in jobs]
    assert results[0].image_tokens == 16 and results[1].image_tokens == 0
    for row, result in zip(events, results):  # streamed deltas join to the content
        assert "".join(p for k, p in row if k == "delta") == result.content


def test_adaptive_reducer_reports_each_images_own_count(tmp_path) -> None:
    path = save_tiny_checkpoint(tmp_path / "mlp", projector_type="mlp2x_gelu")
    reduced = Generator.from_pretrained(path, "cpu", reducer=ReducerChoice("prumerge"))
    image = open_image_source(str(_png(tmp_path)))
    counted = int(
        (reduced.encode([Request.single("Hi", image)])["input_ids"] == reduced.processor.image_token_id).sum()
    )
    with running(reduced) as (url, _):
        reply = client(url).chat.completions.create(model=MODEL, messages=[user("Hi", IMAGE)], max_tokens=3)
    assert reply.usage.image_tokens == counted < reduced.processor.num_image_tokens
    assert reply.choices[0].message.content == reduced.generate([Request.single("Hi", image)], GenerationSettings(3))[0]


def _png(tmp_path):
    path = tmp_path / "ok.png"
    path.write_bytes(OK_PNG)
    return path


def test_groups_greedy_together_and_seeded_sampling_alone() -> None:
    request = Request.single("Hi")
    greedy = [Job(request, 4, 0), Job(request, 9, 0, seed=3)]  # a seed means nothing to greedy decoding
    seeded = [Job(request, 4, 0, temperature=0.7, seed=3), Job(request, 4, 0, temperature=0.7, seed=3)]
    sampled = [Job(request, 4, 0, temperature=0.7), Job(request, 8, 0, temperature=0.7)]
    assert greedy[0].group == greedy[1].group != Job(request, 4, 0, system="Be brief.").group
    assert seeded[0].group != seeded[1].group and sampled[0].group == sampled[1].group


@pytest.mark.parametrize(
    ("pieces", "stops", "shown", "rest"),
    [
        (["  Hello", " wor", "ld  ", "\n"], (), ["Hello", " wor", "ld"], ""),  # whitespace: stripped, as answers are
        (["The cat", " sat. E", "ND more"], ("END",), ["The cat", " sat."], ""),
        (["a</", "b", "</s"], ("</s>",), ["a", "</b"], "</s"),  # a stop string's prefix is held until it cannot be one
    ],
)
def test_text_stream_shows_only_what_stays(pieces, stops, shown, rest) -> None:
    stream = TextStream(stops)
    assert [piece for piece in (stream.feed(p) for p in pieces) if piece] == shown
    assert stream.close("".join(pieces)) == rest
    assert stream.content == "".join(shown) + rest
