"""Batching of concurrent requests (serve/batching.py), through the app with httpx.AsyncClient on tiny random
models: concurrent task requests give what they give one at a time in fewer forward passes; concurrent chat and
completion requests are decoded together with the same greedy (and seeded) outputs; a full queue answers 429;
a request whose client went away leaves the batch."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from tunelab.generate import GenerationSettings, generate
from tunelab.serve import Engine, ServerSettings, create_app

CONLL_TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
SENTENCES = ["a fine film", "dull and long", "it is what it is", "the best thing I saw this year, truly",
             "no", "John lives in Paris", "Ann Smith met Bob in Rome yesterday", "why", "so so", "a b c d e f"]


def _counting(engine: Engine) -> list[int]:
    """A counter of the model's forward passes."""
    calls = [0]
    engine.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


async def _post(client: httpx.AsyncClient, request: tuple[str, dict]) -> httpx.Response:
    return await client.post(request[0], json=request[1])


async def _get(app, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.get(path)


async def _post_all(app, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
        return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))


def _task_requests(task: str) -> list[tuple[str, dict]]:
    if task == "classify":
        return [("/v1/classify", {"input": s}) for s in SENTENCES] + [("/v1/classify", {"input": SENTENCES[:3]})]
    if task == "tag":
        return [("/v1/tag", {"input": s}) for s in SENTENCES]
    if task == "embeddings":
        return [("/v1/embeddings", {"input": s}) for s in SENTENCES]
    if task == "fill-mask":
        return [("/v1/fill-mask", {"input": f"{s} [MASK] .", "top_k": 2 + i % 2}) for i, s in enumerate(SENTENCES)]
    return [("/v1/answer", {"question": f"Who is {s}?", "context": f"{s} lives in Paris. " * (1 + i % 3),
                            "max_answer_length": 10 + i % 2}) for i, s in enumerate(SENTENCES)]


def _close(a, b) -> None:
    """Equal, floats within 1e-5 (a padded pass differs from a one-row pass in the last bits)."""
    if isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-5)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            if k not in ("id", "created"):
                _close(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("task", ["classify", "tag", "embeddings", "fill-mask", "answer"])
def test_concurrent_task_requests_are_batched(tiny, tmp_path, task):
    cls, labels = {"classify": ("BertForSequenceClassification", ["negative", "positive"]),
                   "tag": ("BertForTokenClassification", CONLL_TAGS), "embeddings": ("BertModel", None),
                   "fill-mask": ("BertForMaskedLM", None), "answer": ("BertForQuestionAnswering", None)}[task]
    engine = Engine.load(str(tiny.minilm_bert(tmp_path / task, cls, labels)))
    app = create_app(engine, ServerSettings(batch_wait_ms=100, max_batch=64))
    requests = _task_requests(task)
    calls = _counting(engine)
    alone = [asyncio.run(_post_all(app, [r]))[0] for r in requests]  # one at a time: a pass each
    assert calls[0] == len(requests)
    calls[0] = 0
    together = asyncio.run(_post_all(app, requests))
    assert all(r.status_code == 200 for r in alone + together), [r.text for r in together]
    for a, b in zip(alone, together):
        _close(a.json(), b.json())
    # the requests arrive within the wait; only fill-mask's two top_k and answer's two lengths split them
    assert calls[0] <= (2 if task in ("fill-mask", "answer") else 1) < len(requests)
    metrics = asyncio.run(_get(app, "/metrics")).text
    assert f'tunelab_batches_total{{task="{task}"}} {len(requests) + calls[0]}' in metrics


def test_a_bad_input_fails_only_its_own_request(tiny, tmp_path):
    engine = Engine.load(str(tiny.minilm_bert(tmp_path / "mlm", "BertForMaskedLM")))
    app = create_app(engine, ServerSettings(batch_wait_ms=100))
    ok, bad = asyncio.run(_post_all(app, [("/v1/fill-mask", {"input": "Paris is the [MASK] of France."}),
                                          ("/v1/fill-mask", {"input": "no mask"})]))
    assert ok.status_code == 200 and bad.status_code == 400


@pytest.fixture(scope="module")
def chat_engine(chat_llama) -> Engine:
    return Engine.load(str(chat_llama), name="tiny-chat")


def _chat(content: str, **extra) -> tuple[str, dict]:
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


def _stream_text(response: httpx.Response) -> str:
    import json

    lines = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return "".join(c["delta"].get("content") or "" for line in lines[:-1] for c in json.loads(line)["choices"])


def test_concurrent_generation_is_decoded_together(chat_engine):
    engine, tok = chat_engine, chat_engine.tokenizer
    app = create_app(engine, ServerSettings(max_tokens=64, batch_wait_ms=50))
    contents = ["Hello there", "Who art thou, and whence comest thou?", "A", "To be or not to be", "Speak",
                "What light through yonder window breaks"]
    requests = [_chat(c, max_tokens=6 + 3 * i, stream=i % 2 == 1) for i, c in enumerate(contents)]
    requests.append(("/v1/completions", {"prompt": ["To be", "or not"], "max_tokens": 7, "temperature": 1.0,
                                         "seed": 11, "n": 2}))
    steps_before = engine.batches()["generate"]
    responses = asyncio.run(_post_all(app, requests))
    steps = engine.batches()["generate"] - steps_before
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    sequential_passes = 0
    for i, (c, r) in enumerate(zip(contents, responses)):
        prompt = tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=True)
        expected = generate(engine.model, tok, [prompt], GenerationSettings(max_new_tokens=6 + 3 * i))[0]
        sequential_passes += max(1, len(expected.token_ids))
        got = _stream_text(r) if i % 2 else r.json()["choices"][0]["message"]["content"]
        assert got == expected.text, i
    sampled = [tok.encode("To be"), tok.encode("To be"), tok.encode("or not"), tok.encode("or not")]
    expected = generate(engine.model, tok, sampled, GenerationSettings(max_new_tokens=7, temperature=1.0, seed=11))
    assert [c["text"] for c in responses[-1].json()["choices"]] == [e.text for e in expected]
    assert steps < sequential_passes  # the decoding steps were shared


def test_full_queue_answers_429_and_the_others_are_served(chat_engine):
    app = create_app(chat_engine, ServerSettings(max_tokens=64, max_concurrent=2, max_batch=1))
    metrics = app.state.metrics

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            with chat_engine.lock:  # the model is busy: the first two requests wait in the queue
                first = [asyncio.create_task(_post(client, _chat(f"Hi {i}", max_tokens=4))) for i in range(2)]
                while metrics.in_flight < 2:
                    await asyncio.sleep(0.01)
                third = await _post(client, _chat("one too many", max_tokens=4))
            return third, await asyncio.gather(*first)

    third, first = asyncio.run(scenario())
    assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
    assert [r.status_code for r in first] == [200, 200]


def test_a_cancelled_stream_leaves_the_batch(chat_engine):
    engine = Engine(chat_engine.model, chat_engine.tokenizer, "tiny-chat", max_batch=1)
    prompt = engine.tokenizer.encode("To be or not")
    endless = engine.stream([prompt], GenerationSettings(max_new_tokens=10**6, eos_token_ids=[]))
    assert next(endless)  # decoding; the batch (one row) is full
    done = []
    settings = GenerationSettings(max_new_tokens=3)
    waiter = threading.Thread(target=lambda: done.append(engine.generate([prompt], settings)))
    waiter.start()
    deadline = time.monotonic() + 30
    while engine.decoder.stats()["waiting"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert engine.decoder.stats() == {"running": 1, "waiting": 1, "rows": 1} and not done
    endless.close()  # the client went away
    waiter.join(timeout=60)
    assert done and len(done[0]) == 1 and engine.decoder.stats() == {"running": 0, "waiting": 0, "rows": 0}


def test_a_stream_whose_client_went_away_frees_its_rows(chat_engine):
    from tunelab.serve.app import _streamed

    engine = Engine(chat_engine.model, chat_engine.tokenizer, "tiny-chat", max_batch=1)
    prompt = engine.tokenizer.encode("To be or not")

    async def scenario():
        events = _streamed(engine, [prompt], GenerationSettings(max_new_tokens=10**6, eos_token_ids=[]))
        kind, _ = await events.__anext__()
        assert kind == "item" and engine.decoder.stats()["running"] == 1
        await events.aclose()  # what the streaming response does when the client disconnects
        deadline = time.monotonic() + 30
        while engine.decoder.stats()["running"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the stream's thread sees the end and stops

    asyncio.run(scenario())
    assert engine.decoder.stats() == {"running": 0, "waiting": 0, "rows": 0}
