"""`tunelab serve` end to end: the CLI starts uvicorn on a free port of 127.0.0.1 in a subprocess and the
official `openai` client talks to it (chat, streaming against non-streaming, completions, embeddings, the API
key, bad parameters), then the server is stopped."""

from __future__ import annotations

import time

import pytest

openai = pytest.importorskip("openai")

@pytest.fixture(scope="module")
def chat_server(chat_llama, serve):
    yield from serve(chat_llama, None, "--api-key", "k-123", "--name", "tiny-chat", "--max-tokens", "64")


@pytest.fixture(scope="module")
def client(chat_server):
    return openai.OpenAI(base_url=f"{chat_server}/v1", api_key="k-123", max_retries=0)


def test_chat_and_streaming_equal_at_temperature_zero(client):
    assert [m.id for m in client.models.list()] == ["tiny-chat"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    whole = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=16, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    assert len([p for p in pieces if p]) > 1  # token by token, not one piece at the end


def test_completions_seed_and_n(client):
    a = client.completions.create(model="tiny-chat", prompt="To be", max_tokens=8, temperature=0.9, seed=3, n=2)
    b = client.completions.create(model="tiny-chat", prompt="To be", max_tokens=8, temperature=0.9, seed=3, n=2)
    assert len(a.choices) == 2 and [c.text for c in a.choices] == [c.text for c in b.choices]


def test_wrong_key_and_bad_parameters_then_still_serving(chat_server, client):
    wrong = openai.OpenAI(base_url=f"{chat_server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert e.value.status_code == 401
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=-5)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                       temperature=7)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny-chat", input="a chat model does not embed")
    ok = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=3, temperature=0)
    assert ok.choices[0].message.content is not None


def test_concurrent_streams_and_a_client_that_goes_away(chat_server, client):
    """Streams decoded together equal their own non-streamed answers; a client that closes its stream early
    leaves nothing behind (nothing in flight, nothing in the decoding batch)."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    questions = ["Who art thou?", "Whence comest thou?", "What news?", "Speak, friend"]

    def ask(question: str, stream: bool) -> str:
        messages = [{"role": "user", "content": question}]
        if not stream:
            return client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12,
                                                  temperature=0).choices[0].message.content
        chunks = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12,
                                                temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(len(questions)) as pool:
        streamed = list(pool.map(lambda q: ask(q, True), questions))
    assert streamed == [ask(q, False) for q in questions]

    headers = {"Authorization": "Bearer k-123"}
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 64,
            "stream": True}
    with httpx.stream("POST", f"{chat_server}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first event, then the client hangs up
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(f"{chat_server}/metrics", timeout=10).text
        idle = ("tunelab_requests_in_flight 0" in text and 'tunelab_decode_requests{state="running"} 0' in text
                and 'tunelab_decode_requests{state="waiting"} 0' in text)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert idle, text
    assert int(re.search(r'tunelab_batches_total\{task="generate"\} (\d+)', text).group(1)) > 0


def test_embeddings_through_the_client(tiny, tmp_path, serve):
    import torch

    from tunelab import load
    from tunelab.generate import embed

    path = tiny.minilm_bert(tmp_path / "encoder", "BertModel")
    for url in serve(path, None):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        result = client.embeddings.create(model="encoder", input=["a cat", "a dog on a rug"])  # base64 on the wire
        model, tokenizer = load(str(path))
        expected = embed(model, tokenizer, ["a cat", "a dog on a rug"])
        got = torch.tensor([d.embedding for d in result.data])
        assert torch.allclose(got, expected, atol=1e-6)
        assert result.usage.prompt_tokens > 0
