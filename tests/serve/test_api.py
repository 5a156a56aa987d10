"""The OpenAI-compatible API through the official ``openai`` client (sync, streaming, async) against a real uvicorn
server on 127.0.0.1: answers equal the ``Generator``'s one at a time, the evaluation engine's and the chat CLI's for
the same input; usage counts; /v1/models, /health and the API key."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json

import httpx
import openai
import pytest
import torch
from api_helpers import MODEL, GatedEngine, async_client, client, data_uri, running, user, wait_for
from serve_helpers import OK_PNG

from llava_stf.data.conversation import HUMAN, IMAGE_TOKEN, Turn
from llava_stf.eval.engine import Sample, finalize, run_shard
from llava_stf.generation import GenerationSettings, Generator, Request
from llava_stf.serve.chat import ChatSession
from llava_stf.serve.images import open_image_source

pytestmark = pytest.mark.slow
IMAGE = data_uri(OK_PNG)
QUESTION = "What is shown in the image?"


@pytest.fixture(scope="module")
def generator(serve_checkpoint) -> Generator:
    """The reference: the checkpoint's ``Generator``, asked one request at a time (not the server's instance)."""
    return Generator.from_pretrained(serve_checkpoint, "cpu")


@pytest.fixture(scope="module")
def server(serve_checkpoint):
    with running(Generator.from_pretrained(serve_checkpoint, "cpu")) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def image(image_file):
    return open_image_source(str(image_file))


def reference(generator: Generator, request: Request, max_tokens: int) -> str:
    return generator.generate([request], GenerationSettings(max_new_tokens=max_tokens))[0]


def test_sync_answer_and_usage_equal_the_generator(server, generator, image) -> None:
    reply = client(server[0]).chat.completions.create(model=MODEL, messages=[user(QUESTION, IMAGE)], max_tokens=8)
    request = Request.single(QUESTION, image)
    assert reply.object == "chat.completion" and reply.model == MODEL and len(reply.choices) == 1
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == reference(generator, request, 8)
    prompt_ids = generator.processor.encode_prompt(generator.prompt(request))
    usage = reply.usage
    assert usage.prompt_tokens == len(prompt_ids) and usage.image_tokens == generator.processor.num_image_tokens == 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if reply.choices[0].finish_reason == "length":
        assert usage.completion_tokens == 8
    else:  # EOS: counted among the completion tokens
        assert reply.choices[0].finish_reason == "stop" and usage.completion_tokens <= 8


def test_stream_joins_to_the_same_answer_and_ends_with_done(server, generator, image) -> None:
    chunks = list(
        client(server[0]).chat.completions.create(
            model=MODEL,
            messages=[user(QUESTION, IMAGE)],
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference(generator, Request.single(QUESTION, image), 10)
    assert chunks[-1].choices == [] and chunks[-1].usage.image_tokens == 16  # the usage chunk comes last
    assert all(c.usage is None for c in chunks[:-1])
    body = {"model": MODEL, "messages": [user("Hi")], "max_tokens": 3, "stream": True}
    raw = httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=30)
    events = [line for line in raw.text.split("\n\n") if line]
    assert raw.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"


def test_concurrent_async_requests_are_batched_with_one_at_a_time_answers(serve_checkpoint, generator, image) -> None:
    engine = GatedEngine(Generator.from_pretrained(serve_checkpoint, "cpu"))
    asks = [("What is shown?", IMAGE, 6), ("How many shapes are there?", None, 9), ("Describe it.", IMAGE, 4)]
    asks += [("What color is the triangle?", None, 7), ("Is there a star?", IMAGE, 5), ("left or right?", None, 8)]
    with running(engine) as (url, app):

        async def ask_all():
            api = async_client(url)
            tasks = [
                asyncio.ensure_future(api.chat.completions.create(model=MODEL, messages=[user(q, i)], max_tokens=n))
                for q, i, n in asks
            ]
            batcher = app.state.batcher
            await asyncio.to_thread(wait_for, lambda: engine.entered == 1 and batcher.running + batcher.waiting == 6)
            engine.gate.set()  # the first batch was held until all six had arrived
            return await asyncio.gather(*tasks)

        replies = asyncio.run(ask_all())
        sizes = list(app.state.batcher.batch_sizes)
    assert sum(sizes) == 6 and len(sizes) <= 2  # batched: the first batch (held at the gate) and all who queued behind
    expected = [reference(generator, Request.single(q, image if i else None), n) for q, i, n in asks]
    assert [r.choices[0].message.content for r in replies] == expected
    assert [r.usage.completion_tokens <= n for r, (_, _, n) in zip(replies, asks)] == [True] * len(asks)


def test_same_answers_as_the_evaluation_engine(server, generator, image_file, tmp_path) -> None:
    questions = ["What is shown in the image?", "How many shapes are there?", "What color is the triangle?"]
    samples = [Sample(f"q{i}#0", i, q, q, image_file) for i, q in enumerate(questions)]
    answers_file = tmp_path / "answers.jsonl"
    settings = GenerationSettings(max_new_tokens=7)
    run_shard(samples, answers_file, lambda: generator, model_id="m", settings=settings, batch_size=2, progress=False)
    evaluated = [record["text"] for record in finalize(samples, answers_file)]
    api = client(server[0])
    served = [
        api.chat.completions.create(model=MODEL, messages=[user(q, IMAGE)], max_tokens=7).choices[0].message.content
        for q in questions
    ]
    assert served == evaluated


def test_multi_turn_equals_the_chat_cli_session(server, generator, image) -> None:
    session = ChatSession(generator, image, GenerationSettings(6))
    first, second = session.ask("What is shown?"), session.ask("What color is it?")
    api = client(server[0])
    messages = [user("What is shown?", IMAGE)]
    one = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=6).choices[0].message.content
    messages += [
        {"role": "assistant", "content": one},
        {"role": "user", "content": [{"type": "text", "text": "What color is it?"}]},
    ]
    two = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=6).choices[0].message.content
    assert (one, two) == (first, second)


def test_a_system_message_replaces_the_templates_system_prompt(server, generator) -> None:
    api = client(server[0])

    def ask(system: str | None) -> str:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [user("Hi there")]
        return api.chat.completions.create(model=MODEL, messages=messages, max_tokens=6).choices[0].message.content

    custom = copy.copy(generator)
    custom.template = dataclasses.replace(generator.template, system="You are a terse assistant.")
    assert ask("You are a terse assistant.") == reference(custom, Request.single("Hi there"), 6)
    assert ask(generator.template.system) == ask(None) == reference(generator, Request.single("Hi there"), 6)


def test_stop_sequences_cut_the_answer_streamed_or_not(server, generator) -> None:
    api = client(server[0])
    full = reference(generator, Request.single("Describe the image briefly."), 12)
    stop = next(full[i : i + 2] for i in range(2, len(full) - 2) if full[i : i + 2].strip() == full[i : i + 2])
    expected = full[: full.find(stop)].rstrip()
    kwargs = {"model": MODEL, "messages": [user("Describe the image briefly.")], "max_tokens": 12, "stop": [stop]}
    reply = api.chat.completions.create(**kwargs)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (expected, "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in api.chat.completions.create(**kwargs, stream=True))
    assert streamed == expected


def test_a_stop_string_ends_generation_at_the_token_that_completes_it(server, generator) -> None:
    """``completion_tokens`` is the shortest prefix whose text holds the stop string: no token is generated after it
    (the text streamer holds a word back until the next token, so the stop must not wait for the streamer)."""
    request = Request.single("Describe the image briefly.")
    full = reference(generator, request, 12)
    stop = next(full[i : i + 2] for i in range(2, len(full) - 2) if full[i : i + 2].strip() == full[i : i + 2])
    shortest = next(k for k in range(1, 13) if stop in reference(generator, request, k))
    kwargs = {"model": MODEL, "messages": [user("Describe the image briefly.")], "max_tokens": 12, "stop": [stop]}
    reply = client(server[0]).chat.completions.create(**kwargs)
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == shortest


def test_seeded_sampling_repeats_and_matches_the_generator(server, generator) -> None:
    api = client(server[0])
    kwargs = {"model": MODEL, "messages": [user("Hi there")], "max_tokens": 8, "temperature": 0.9, "seed": 5}
    first, second = (api.chat.completions.create(**kwargs).choices[0].message.content for _ in range(2))
    torch.manual_seed(5)
    sampled = generator.generate([Request.single("Hi there")], GenerationSettings(8, temperature=0.9))[0]
    assert first == second == sampled


def test_an_image_url_over_http_answers_as_its_bytes(server, image_server) -> None:
    api = client(server[0])
    by_url, by_bytes = (
        api.chat.completions.create(model=MODEL, messages=[user(QUESTION, url)], max_tokens=5)
        .choices[0]
        .message.content
        for url in (f"{image_server}/ok.png", IMAGE)
    )
    assert by_url == by_bytes


def test_no_image_urls_refuses_urls_without_fetching_and_still_takes_data_uris(serve_checkpoint, image_server):
    with running(Generator.from_pretrained(serve_checkpoint, "cpu"), image_urls=False) as (base, _):
        api = client(base)
        with pytest.raises(openai.BadRequestError) as refused:
            api.chat.completions.create(model=MODEL, messages=[user(QUESTION, f"{image_server}/ok.png")], max_tokens=2)
        reply = api.chat.completions.create(model=MODEL, messages=[user(QUESTION, IMAGE)], max_tokens=2)
    error = refused.value.body
    assert error["code"] == "invalid_image_url" and "does not fetch image URLs" in error["message"]
    assert reply.choices[0].message.content is not None


def test_models_and_health(server) -> None:
    url, app = server
    assert [m.id for m in client(url).models.list()] == [MODEL]
    assert client(url).models.retrieve(MODEL).id == MODEL
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["answered"] >= 0


def test_the_api_key_is_checked_on_v1_routes(serve_checkpoint) -> None:
    with running(Generator.from_pretrained(serve_checkpoint, "cpu"), api_key="secret") as (url, _):
        with pytest.raises(openai.AuthenticationError) as err:
            client(url, api_key="wrong").models.list()
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
        bare = httpx.post(f"{url}/v1/chat/completions", json={}, timeout=10)
        assert bare.status_code == 401 and set(bare.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        reply = client(url, api_key="secret").chat.completions.create(model=MODEL, messages=[user("Hi")], max_tokens=2)
        assert reply.choices[0].message.role == "assistant"


def test_a_stage_1_checkpoint_captions_the_image(serve_checkpoint, image) -> None:
    base = Generator.from_pretrained(serve_checkpoint, "cpu")
    processor = copy.copy(base.processor)
    processor.conversation_template = "plain"
    plain = Generator(base.model, processor)
    caption = reference(plain, Request((Turn(HUMAN, IMAGE_TOKEN),), image), 5)
    with running(plain) as (url, _):
        api = client(url)
        reply = api.chat.completions.create(model=MODEL, messages=[user("ignored words", IMAGE)], max_tokens=5)
        assert reply.choices[0].message.content == caption
        with pytest.raises(openai.BadRequestError, match="only captions an image"):
            api.chat.completions.create(model=MODEL, messages=[user("no image")], max_tokens=5)
