"""The feedback page end to end, with the keyboard alone: `tunelab serve` (the tiny chat Llama, an API key, a
feedback store in a temporary directory) in a subprocess, the page in headless Chromium. The test tabs through
the page, types the API key, asks a question with Enter, waits for the answer, rates it Bad, writes a critique
and a correction, submits, and then finds the record in the FeedbackStore with those fields."""

from __future__ import annotations

import httpx
import pytest

from tunelab.feedback import FeedbackStore

pytestmark = pytest.mark.slow  # a server in a subprocess and a browser: about 30 s

KEY = "k-page"
QUESTION = "Who art thou?"


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("feedback-page")


@pytest.fixture(scope="module")
def server(browser, chat_llama, store_dir, serve):
    yield from serve(chat_llama, store_dir, "--api-key", KEY, "--name", "tiny-chat", "--max-tokens", "64",
                     "--feedback-store", str(store_dir / "page.db"))


def focused(page) -> str:
    return page.evaluate("document.activeElement.id || document.activeElement.className || "
                         "document.activeElement.tagName.toLowerCase()")


def tab_to(page, element_id: str, *, most: int = 3) -> None:
    """Press Tab until `element_id` has the focus (at most `most` presses: the tab order is part of the test)."""
    seen = []
    for _ in range(most):
        page.keyboard.press("Tab")
        seen.append(focused(page))
        if seen[-1] == element_id:
            return
    pytest.fail(f"Tab did not reach #{element_id}; the focus went to {seen}")


def test_ask_rate_critique_correct_with_the_keyboard(browser, server, store_dir):
    from playwright.sync_api import expect  # here: the browser fixture skips (or fails on CI) without it

    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready=true]")
    assert page.inner_text("#model-name") == "tiny-chat"

    # the skip link first, then the settings, opened with Enter, where the API key goes
    tab_to(page, "skip", most=1)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.tagName") == "SUMMARY"
    page.keyboard.press("Enter")
    assert page.get_attribute("#settings", "open") is not None
    tab_to(page, "api-key", most=1)
    page.keyboard.type(KEY)
    assert page.evaluate("sessionStorage.getItem('tunelab-api-key')") == KEY
    tab_to(page, "max-tokens", most=1)
    page.keyboard.press("Control+A")
    page.keyboard.type("12")
    tab_to(page, "temperature", most=1)  # 0: the answer is the greedy one, which the test checks below
    tab_to(page, "system", most=1)
    # the model can chat and complete: the mode is a radio group, Chat checked; then the question box
    tab_to(page, "mode-chat", most=1)
    tab_to(page, "question", most=1)
    # the focus is visible
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"

    page.keyboard.type(QUESTION)
    page.keyboard.press("Enter")  # Enter sends
    page.wait_for_selector("#good:not([disabled])", timeout=120_000)
    assert page.get_attribute("#answer", "aria-live") == "polite"
    shown = page.inner_text("#answer")
    assert shown and shown != "No answer yet."
    assert page.input_value("#question") == ""  # the box is ready for the next turn
    assert page.inner_text("#conversation").startswith("You: " + QUESTION)

    # the answer is the model's greedy answer to the question
    reply = httpx.post(server + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                       json={"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12,
                             "temperature": 0}).json()
    answer = reply["choices"][0]["message"]["content"]
    assert shown == (answer or "(an empty answer)")

    # Send, New conversation, the answer (focusable, to scroll it), then Good and Bad
    tab_to(page, "send", most=1)
    tab_to(page, "new-conversation", most=1)
    tab_to(page, "answer", most=1)
    tab_to(page, "good", most=1)
    tab_to(page, "bad", most=1)
    page.keyboard.press("Space")
    assert page.get_attribute("#bad", "aria-pressed") == "true"
    assert page.get_attribute("#good", "aria-pressed") == "false"
    tab_to(page, "critique", most=1)
    page.keyboard.type("It does not say who it is.")
    tab_to(page, "correction", most=1)
    page.keyboard.type("I am a tiny test model.")
    tab_to(page, "submit", most=1)
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("Saved: record 1", timeout=30_000)
    assert focused(page) == "question"  # back to asking
    assert page.is_disabled("#good") and page.is_disabled("#submit")  # that answer is judged
    expect(page.locator("#saved li")).to_have_count(1)
    assert page.inner_text("#saved li").startswith("#1 bad: " + QUESTION)
    assert page.is_hidden("#error") and not errors

    page.close()
    with FeedbackStore(store_dir / "page.db") as store:
        (record,) = store.query(model="tiny-chat")
    assert record.input == [{"role": "user", "content": QUESTION}]
    assert record.output == answer
    assert (record.source, record.verdict, record.task) == ("person", "bad", "chat")
    assert record.critique == "It does not say who it is."
    assert record.correction == "I am a tiny test model."
    assert record.model_version  # the hash of the weight files, as `tunelab feedback collect` names it
    assert record.metadata["via"] == "feedback page" and record.metadata["max_tokens"] == 12
    assert record.metadata["temperature"] == 0 and record.metadata["finish_reason"] in ("stop", "length")


def test_without_the_key_the_page_asks_for_it(browser, server):
    page = browser.new_page()  # a new page: its session storage holds no key
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready=true]")
    page.focus("#question")
    page.keyboard.type("Hello")
    page.keyboard.press("Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "API key" in page.inner_text("#error")
    assert focused(page) == "api-key" and page.get_attribute("#settings", "open") is not None
    assert page.inner_text("#answer") == "No answer yet."
    page.close()


TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


@pytest.mark.parametrize("head", ["classifier", "tagger"])
def test_task_endpoint_answers_are_rated_too(browser, serve, tiny, tmp_path, head):
    """A model with a task head: the page asks its endpoint (the only mode, so no mode choice is shown), and the
    record holds what `tunelab feedback build relabel` reads: the label, or the tags with the words."""
    from playwright.sync_api import expect

    if head == "classifier":
        model = tiny.minilm_bert(tmp_path / "model", "BertForSequenceClassification", ["negative", "positive"])
        text, task = "a gentle and moving film", "classification"
    else:
        model = tiny.minilm_bert(tmp_path / "model", "BertForTokenClassification", TAGS)
        text, task = "John lives in Paris", "tagging"
    for url in serve(model, tmp_path, "--name", "tiny-task"):
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready=true]")
        assert page.is_hidden("#mode-field") and page.is_hidden("#new-conversation")
        page.focus("#question")
        page.keyboard.type(text)
        page.keyboard.press("Enter")
        page.wait_for_selector("#good:not([disabled])", timeout=60_000)
        shown = page.inner_text("#answer")
        page.focus("#correction")
        if head == "classifier":  # the other label
            correction = "negative" if shown.startswith("positive") else "positive"
        else:
            given = [pair.rsplit("/", 1)[1] for pair in shown.splitlines()[0].split()]
            correction = "B-PER O O B-LOC" if given != ["B-PER", "O", "O", "B-LOC"] else "O O O O"
        page.keyboard.type(correction)
        page.keyboard.press("Control+Enter")  # submits from the text box; the correction makes it bad
        expect(page.locator("#status")).to_contain_text("Saved: record 1")
        page.close()
    with FeedbackStore(tmp_path / "feedback.db") as store:  # the default store, in the server's directory
        (record,) = store.query()
    assert (record.model, record.task, record.verdict, record.correction) == ("tiny-task", task, "bad", correction)
    assert record.input == text and record.source == "person"
    if head == "classifier":
        assert record.output in ("negative", "positive") and shown.startswith(record.output)
        assert set(record.metadata["scores"]) == {"negative", "positive"}
    else:
        assert record.metadata["tokens"] == text.split() and len(record.output.split()) == 4
        assert shown.startswith(" ".join(f"{w}/{t}" for w, t in zip(text.split(), record.output.split())))
