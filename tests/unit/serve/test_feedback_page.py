"""The feedback page's routes through FastAPI's TestClient on the tiny chat Llama (tests/conftest.py): GET / and
its files, POST /v1/feedback storing a FeedbackRecord with the served model's name and version, bad bodies as
OpenAI error bodies, GET /v1/feedback, the API key, and a server that keeps no feedback."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tunelab.errors import FeedbackError
from tunelab.feedback import FeedbackStore
from tunelab.serve import Engine, ServerSettings, create_app


@pytest.fixture(scope="module")
def chat_engine(chat_llama) -> Engine:
    return Engine.load(str(chat_llama), name="tiny-chat")


def _client(engine, store, **settings) -> TestClient:
    return TestClient(create_app(engine, ServerSettings(feedback_store=store, **settings)))


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 17 + 25?"}]


def test_page_and_its_files_are_served(chat_engine, tmp_path):
    client = _client(chat_engine, tmp_path / "fb.db", api_key="k")
    page = client.get("/")  # no key needed to load the page itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for needle in ('src="/static/feedback.js"', 'href="/static/feedback.css"', 'id="question"', 'id="good"',
                   'id="bad"', 'id="critique"', 'id="correction"', 'id="submit"', 'aria-live="polite"',
                   'id="api-key"'):
        assert needle in html
    assert "http://" not in html and "https://" not in html  # nothing from another site
    assert "default-src 'self'" in page.headers["content-security-policy"]
    js = client.get("/static/feedback.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "/v1/feedback" in js.text and "innerHTML" not in js.text
    assert client.get("/static/feedback.css").headers["content-type"].startswith("text/css")
    missing = client.get("/static/other.js")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert not (tmp_path / "fb.db").exists()  # the store is created at the first record, not before


def test_feedback_is_stored_with_the_served_model(chat_engine, tmp_path):
    client = _client(chat_engine, tmp_path / "fb.db", model_version="v7")
    r = client.post("/v1/feedback", json={
        "input": CHAT, "output": "17 + 25 = 32.", "task": "chat", "verdict": "bad",
        "critique": "It added wrong.", "correction": "42", "metadata": {"temperature": 0}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "feedback" and body["id"] == 1 and body["source"] == "person"
    with FeedbackStore(tmp_path / "fb.db") as store:
        (record,) = store.query()
    assert record.input == CHAT and record.output == "17 + 25 = 32."
    assert (record.model, record.model_version, record.source) == ("tiny-chat", "v7", "person")
    assert (record.verdict, record.critique, record.correction, record.task) == ("bad", "It added wrong.", "42", "chat")
    assert record.metadata == {"temperature": 0} and record.created_at and record.updated_at


def test_verdicts_critiques_corrections_and_the_listing(chat_engine, tmp_path):
    client = _client(chat_engine, tmp_path / "fb.db")
    assert client.get("/v1/feedback").json() == {"object": "list", "data": [], "store": str(tmp_path / "fb.db"),
                                                 "total": 0}
    good = client.post("/v1/feedback", json={"input": "Classify: great film", "output": "positive",
                                             "task": "classification", "verdict": "good", "critique": "  ",
                                             "correction": ""}).json()
    assert good["verdict"] == "good" and good["critique"] is None and good["correction"] is None  # blank: none
    # a correction without a verdict makes it bad, as `tunelab feedback review` does
    fixed = client.post("/v1/feedback", json={"input": "2 + 2?", "output": "5", "correction": "4"}).json()
    assert fixed["verdict"] == "bad" and fixed["correction"] == "4"
    scored = client.post("/v1/feedback", json={"input": "hi", "output": "hello", "score": 4}).json()
    assert scored["verdict"] is None and scored["score"] == 4.0
    # without a version given, the version is a hash of the parameters, as feedback collect gives a loaded model
    assert good["model_version"].startswith("params-") and good["model_version"] == fixed["model_version"]
    listing = client.get("/v1/feedback", params={"limit": 2}).json()
    assert [r["id"] for r in listing["data"]] == [scored["id"], fixed["id"]] and listing["total"] == 3


@pytest.mark.parametrize("body, param", [
    ({"output": "x", "verdict": "good"}, "input"),
    ({"input": "q", "verdict": "good"}, "output"),
    ({"input": "", "output": "x", "verdict": "good"}, "input"),
    ({"input": [], "output": "x", "verdict": "good"}, "input"),
    ({"input": [{"role": "wizard", "content": "hi"}], "output": "x", "verdict": "good"}, "input"),
    ({"input": 7, "output": "x", "verdict": "good"}, "input"),
    ({"input": "q", "output": "x", "verdict": "great"}, "verdict"),
    ({"input": "q", "output": "x"}, "verdict"),  # no judgement at all
    ({"input": "q", "output": "x", "critique": "only words"}, "verdict"),
    ({"input": "q", "output": "x", "verdict": "good", "correction": "y"}, "verdict"),
    ({"input": "q", "output": "x", "correction": "x"}, "correction"),
    ({"input": "q", "output": "x", "verdict": "bad", "source": "someone"}, "source"),
    ({"input": "q", "output": "x", "verdict": "bad", "metadata": [1]}, "metadata"),
    ({"input": "q", "output": "x", "verdict": "bad", "score": "high"}, "score"),
    ({"input": "q", "output": "x", "verdict": "bad", "model": "other"}, "model"),
])
def test_bad_bodies_get_openai_errors_and_store_nothing(chat_engine, tmp_path, body, param):
    client = _client(chat_engine, tmp_path / "fb.db")
    r = client.post("/v1/feedback", json=body)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]
    assert client.get("/v1/feedback").json()["total"] == 0


def test_malformed_json_and_bad_limit(chat_engine, tmp_path):
    client = _client(chat_engine, tmp_path / "fb.db")
    r = client.post("/v1/feedback", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert client.get("/v1/feedback", params={"limit": 0}).status_code == 400
    assert client.get("/v1/feedback", params={"limit": 101}).status_code == 400


def test_api_key_required_when_set(chat_engine, tmp_path):
    client = _client(chat_engine, tmp_path / "fb.db", api_key="sekret")
    body = {"input": "q", "output": "a", "verdict": "good"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = client.post("/v1/feedback", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/feedback", headers=headers).status_code == 401
    assert not (tmp_path / "fb.db").exists()
    ok = client.post("/v1/feedback", json=body, headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200
    assert client.get("/v1/feedback", headers={"Authorization": "Bearer sekret"}).json()["total"] == 1


def test_without_a_store_the_page_asks_but_keeps_nothing(chat_engine):
    client = TestClient(create_app(chat_engine, ServerSettings()))
    assert client.get("/").status_code == 200
    r = client.post("/v1/feedback", json={"input": "q", "output": "a", "verdict": "good"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "feedback_disabled"
    assert "--feedback-store" in r.json()["error"]["message"]


def test_open_store_object_and_bad_locations(chat_engine, tmp_path):
    with FeedbackStore(":memory:") as store:
        client = _client(chat_engine, store, model_version="m1")
        client.post("/v1/feedback", json={"input": "q", "output": "a", "verdict": "good"})
        assert store.count(model="tiny-chat", model_version="m1") == 1
    with pytest.raises(FeedbackError, match="does not exist"):
        create_app(chat_engine, ServerSettings(feedback_store=tmp_path / "no" / "fb.db"))
    with pytest.raises(FeedbackError, match="is a directory"):
        create_app(chat_engine, ServerSettings(feedback_store=tmp_path))
    other = tmp_path / "other.db"
    other.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(FeedbackError, match="not a usable feedback store"):
        create_app(chat_engine, ServerSettings(feedback_store=other))
