"""The server's routes through FastAPI's TestClient, on tiny random models: the chat Llama of tests/conftest.py
(chat_llama) and 2-layer BERTs with the real MiniLM tokenizer and each task head. OpenAI response shapes,
streaming, the task endpoints, errors as OpenAI error bodies, the API key, the limits and /metrics."""

from __future__ import annotations

import base64
import json
import struct

import pytest
import torch
from fastapi.testclient import TestClient

from tunelab.serve import Engine, ServerSettings, create_app

CONLL_TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def chat_engine(chat_llama) -> Engine:
    return Engine.load(str(chat_llama), name="tiny-chat")


@pytest.fixture(scope="module")
def chat(chat_engine) -> TestClient:
    return TestClient(create_app(chat_engine, ServerSettings(max_tokens=64, max_n=3)))


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory, tiny) -> dict:
    root = tmp_path_factory.mktemp("serve-bert")
    return {
        "classifier": tiny.minilm_bert(root / "cls", "BertForSequenceClassification", ["negative", "positive"]),
        "tagger": tiny.minilm_bert(root / "tagger", "BertForTokenClassification", CONLL_TAGS),
        "qa": tiny.minilm_bert(root / "qa", "BertForQuestionAnswering"),
        "mlm": tiny.minilm_bert(root / "mlm", "BertForMaskedLM"),
    }


def _client(path, **settings) -> TestClient:
    return TestClient(create_app(Engine.load(str(path)), ServerSettings(**settings)))


def _chat_body(**extra) -> dict:
    return {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
            "temperature": 0, **extra}


def _events(response) -> list:
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_models_health_and_capabilities(chat, chat_engine):
    assert chat_engine.capabilities == ["completions", "chat"]
    r = chat.get("/v1/models")
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == "tiny-chat" and r.json()["object"] == "list"
    assert chat.get("/v1/models/tiny-chat").json()["id"] == "tiny-chat"
    assert chat.get("/v1/models/other").status_code == 404
    assert chat.get("/health").json() == {"status": "ok", "model": "tiny-chat", "capabilities": ["completions", "chat"]}


def test_chat_completion_shape_and_usage(chat, chat_engine):
    r = chat.post("/v1/chat/completions", json=_chat_body())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-chat"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    prompt = chat_engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                                       add_generation_prompt=True, tokenize=True)
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(prompt)
    assert 1 <= usage["completion_tokens"] <= 8 and usage["total_tokens"] == len(prompt) + usage["completion_tokens"]
    # the same text as tunelab.generate with the same settings
    from tunelab.generate import GenerationSettings, generate

    expected = generate(chat_engine.model, chat_engine.tokenizer, [prompt], GenerationSettings(max_new_tokens=8))[0]
    assert choice["message"]["content"] == expected.text


def test_chat_streaming_equals_non_streaming(chat):
    whole = chat.post("/v1/chat/completions", json=_chat_body(max_tokens=12)).json()
    r = chat.post("/v1/chat/completions", json=_chat_body(max_tokens=12, stream=True,
                                                          stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    text = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


def test_stop_n_seed_and_completions(chat):
    whole = chat.post("/v1/completions", json={"prompt": "To be or not", "max_tokens": 10, "temperature": 0}).json()
    assert whole["object"] == "text_completion"
    text = whole["choices"][0]["text"]
    assert whole["usage"]["completion_tokens"] >= 1
    if len(text.strip()) > 2:  # a stop string taken from the greedy text cuts it just before
        stop = text.strip()[1:3]
        cut = chat.post("/v1/completions", json={"prompt": "To be or not", "max_tokens": 10, "temperature": 0,
                                                 "stop": stop}).json()["choices"][0]
        assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.index(stop)]
    sampled = {"prompt": ["To be", "or not"], "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 2}
    a = chat.post("/v1/completions", json=sampled).json()
    b = chat.post("/v1/completions", json=sampled).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # seed: repeatable
    r = chat.post("/v1/completions", json={"prompt": "To be", "max_tokens": 6, "temperature": 0, "stream": True})
    streamed = "".join(c["text"] for e in _events(r) for c in e["choices"])
    plain = chat.post("/v1/completions", json={"prompt": "To be", "max_tokens": 6, "temperature": 0}).json()
    assert streamed == plain["choices"][0]["text"]


@pytest.mark.parametrize("body, status, param", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 4}, 400, "n"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "model"),
    ({"model": "tiny-chat"}, 400, "messages"),
])
def test_bad_requests_get_openai_errors(chat, body, status, param):
    r = chat.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]


def test_malformed_json_oversize_prompt_wrong_endpoint_and_recovery(chat_engine):
    client = TestClient(create_app(chat_engine, ServerSettings(max_input_tokens=20)))
    r = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/completions", json={"prompt": "word " * 50})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "at most 20" in r.json()["error"]["message"]
    r = client.post("/v1/embeddings", json={"input": "a decoder does not embed"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_task"
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.post("/v1/completions", json={"prompt": "Still here", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None


def test_api_key(chat_engine):
    client = TestClient(create_app(chat_engine, ServerSettings(api_key="sekret")))
    assert client.get("/v1/models").status_code == 401
    r = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert client.get("/health").status_code == 200  # health checks need no key


def test_concurrency_limit_answers_429(chat_engine):
    client = TestClient(create_app(chat_engine, ServerSettings(max_concurrent=0)))
    r = client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert client.get("/v1/models").status_code == 200  # listing is never limited
    assert "tunelab_requests_rejected_total 1" in client.get("/metrics").text


def test_metrics_count_requests_latency_and_tokens(chat_engine):
    client = TestClient(create_app(chat_engine))
    usage = client.post("/v1/chat/completions", json=_chat_body(max_tokens=4)).json()["usage"]
    client.post("/v1/chat/completions", json={"messages": []})
    text = client.get("/metrics").text
    assert 'tunelab_requests_total{path="/v1/chat/completions",status="200"} 1' in text
    assert 'tunelab_requests_total{path="/v1/chat/completions",status="400"} 1' in text
    assert 'tunelab_request_duration_seconds_count{path="/v1/chat/completions"} 2' in text
    assert f'tunelab_tokens_total{{kind="prompt"}} {usage["prompt_tokens"]}' in text
    assert f'tunelab_tokens_total{{kind="completion"}} {usage["completion_tokens"]}' in text


def test_embeddings_float_and_base64(tiny, tmp_path):
    from tunelab.generate import embed

    path = tiny.minilm_bert(tmp_path / "enc", "BertModel")
    engine = Engine.load(str(path))
    client = TestClient(create_app(engine))
    assert engine.capabilities == ["embeddings"] and engine.name == "enc"
    r = client.post("/v1/embeddings", json={"model": "enc", "input": ["a cat", "a dog on a mat"]})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = embed(engine.model, engine.tokenizer, ["a cat", "a dog on a mat"])
    assert torch.allclose(torch.tensor([d["embedding"] for d in body["data"]]), expected, atol=1e-6)
    assert body["usage"]["prompt_tokens"] == engine.count_tokens(["a cat", "a dog on a mat"])
    b64 = client.post("/v1/embeddings", json={"input": "a cat", "encoding_format": "base64"}).json()["data"][0]
    raw = base64.b64decode(b64["embedding"])
    assert torch.allclose(torch.tensor(struct.unpack(f"<{len(raw) // 4}f", raw)), expected[0], atol=1e-6)
    assert client.post("/v1/embeddings", json={"input": []}).status_code == 400
    assert client.post("/v1/chat/completions", json=_chat_body(model=None)).json()["error"]["code"] == "unsupported_task"


def test_classify_matches_tunelab_predict_step(bert_dirs):
    client = _client(bert_dirs["classifier"])
    r = client.post("/v1/classify", json={"input": ["a fine film", "dull and long"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    for d in data:
        assert d["label"] in ("negative", "positive") and abs(sum(d["scores"].values()) - 1) < 1e-5
        assert d["score"] == max(d["scores"].values())
    pairs = client.post("/v1/classify", json={"input": ["a", "b"], "text_pair": ["c"]})
    assert pairs.status_code == 400 and pairs.json()["error"]["param"] == "text_pair"
    assert client.post("/v1/tag", json={"input": "no tagger"}).json()["error"]["code"] == "unsupported_task"


def test_tag_answer_and_fill_mask(bert_dirs):
    tagged = _client(bert_dirs["tagger"]).post("/v1/tag", json={"input": ["John lives in Paris", ["Ann", "Smith"]]})
    assert tagged.status_code == 200, tagged.text
    first, second = tagged.json()["data"]
    assert first["tokens"] == ["John", "lives", "in", "Paris"] and len(first["tags"]) == 4
    assert second["tokens"] == ["Ann", "Smith"] and set(first["tags"] + second["tags"]) <= set(CONLL_TAGS)
    for entity in first["entities"]:
        assert entity["text"] == " ".join(first["tokens"][entity["start"]: entity["end"] + 1])

    context = "The Eiffel Tower is in Paris. It was built in 1889."
    answered = _client(bert_dirs["qa"]).post("/v1/answer", json={"question": "Where is it?", "context": context})
    assert answered.status_code == 200, answered.text
    a = answered.json()
    assert a["answer"] == "" or context[a["start"]: a["start"] + len(a["answer"])] == a["answer"]

    mlm = _client(bert_dirs["mlm"])
    r = mlm.post("/v1/fill-mask", json={"input": "Paris is the [MASK] of France.", "top_k": 3})
    assert r.status_code == 200, r.text
    predictions = r.json()["data"]
    assert len(predictions) == 1 and len(predictions[0]) == 3
    assert predictions[0][0]["probability"] >= predictions[0][1]["probability"]
    r = mlm.post("/v1/fill-mask", json={"input": "no mask here"})
    assert r.status_code == 400 and "[MASK]" in r.json()["error"]["message"]


def test_translate_and_summarize_decode_as_the_run_was_trained_to(seq2seq_run):
    """An encoder-decoder run: /v1/translate and /v1/summarize are its beam search with the run's own
    task.generation (beam 2, 12 new tokens), as `tunelab predict` decodes."""
    from tunelab.generate.beam import BeamSettings, seq2seq_generate
    from tunelab.train.run import load_any

    client = _client(seq2seq_run, max_tokens=64)
    texts = ["A man rides a bike.", "Two dogs play in the snow."]
    model, tokenizer = load_any(str(seq2seq_run))
    expected = [t.strip() for t in seq2seq_generate(model, tokenizer, texts, BeamSettings(beam_size=2, max_new_tokens=12))]
    for path in ("/v1/translate", "/v1/summarize"):
        r = client.post(path, json={"input": texts})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [d["text"] for d in body["data"]] == expected and [d["index"] for d in body["data"]] == [0, 1]
        assert body["usage"]["prompt_tokens"] > 0
    greedy = client.post("/v1/translate", json={"input": texts[0], "beam_size": 1, "max_tokens": 5}).json()
    assert greedy["data"][0]["text"] == seq2seq_generate(model, tokenizer, texts[:1],
                                                         BeamSettings(beam_size=1, max_new_tokens=5))[0].strip()
    assert client.post("/v1/translate", json={"input": "x", "beam_size": 0}).status_code == 400
    assert client.post("/v1/translate", json={"input": "x", "max_tokens": 65}).json()["error"]["param"] == "max_tokens"
    chat = client.post("/v1/chat/completions", json=_chat_body(model="run"))
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "unsupported_task"
