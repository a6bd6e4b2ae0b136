"""Continuous batching (tunelab.generate.batch): requests that join and leave a running batch at different steps
get exactly what they get decoded one at a time, on tiny random decoders with rotary (Llama), learned (GPT-2)
positions and a sliding window (Mistral)."""

from __future__ import annotations

import shutil

import pytest

from tunelab import load
from tunelab.generate.batch import BatchJob, ContinuousBatch
from tunelab.generate.decode import GenerationSettings, generate


@pytest.fixture(params=["chat", "gpt2-lm", "mistral-window"])
def decoder(request, chat_llama, make_hf_model):
    """(model, tokenizer): the chat Llama, or a tiny HF decoder with the chat Llama's tokenizer files."""
    if request.param == "chat":
        return load(str(chat_llama))
    _, path = make_hf_model(request.param)
    for f in chat_llama.glob("tokenizer*"):
        shutil.copy(f, path / f.name)
    return load(str(path))


def _prompts(tokenizer, vocab: int) -> list[list[int]]:
    texts = ["To be or not", "Hello there my good friend, how", "A", "What light through yonder window breaks"]
    return [[t % vocab for t in tokenizer.encode(text)] or [3] for text in texts]  # ids the tiny model knows


def test_joining_and_leaving_equals_one_at_a_time(decoder):
    model, tokenizer = decoder
    prompts = _prompts(tokenizer, model.config.vocab_size)
    settings = [
        GenerationSettings(max_new_tokens=10, eos_token_ids=[]),
        GenerationSettings(max_new_tokens=5),
        GenerationSettings(max_new_tokens=12, eos_token_ids=[]),
        GenerationSettings(max_new_tokens=9, temperature=1.0, top_p=0.9, seed=4),
        GenerationSettings(max_new_tokens=0),
        GenerationSettings(max_new_tokens=1),
    ]
    requests = [[prompts[0]], [prompts[1]], [prompts[2]], [prompts[3], prompts[0]], [prompts[1]], [prompts[2]]]
    alone = [generate(model, tokenizer, p, s) for p, s in zip(requests, settings)]

    batch = ContinuousBatch(model, tokenizer, headroom=3)  # small: the cache grows and compacts on the way
    texts: dict[int, list[str]] = {}
    jobs = []
    for i, (p, s) in enumerate(zip(requests, settings)):
        texts[i] = [""] * len(p)
        jobs.append(BatchJob(p, s, emit=lambda pieces, i=i: texts.__setitem__(
            i, [t + piece for t, piece in zip(texts[i], pieces)])))
    ended = batch.add([jobs[0]])
    for _ in range(3):
        ended += batch.step()
    ended += batch.add(jobs[1:3])  # two join a running batch, with shorter and longer prompts
    ended += batch.step() + batch.step()
    ended += batch.add(jobs[3:])  # a sampled pair, and two that end at once
    while len(batch):
        ended += batch.step()
    assert sorted(map(id, ended)) == sorted(map(id, jobs)) and batch.rows == 0
    for i, (job, expected) in enumerate(zip(jobs, alone)):
        assert [c.token_ids for c in job.completions] == [c.token_ids for c in expected], i
        assert [c.text for c in job.completions] == [c.text for c in expected] == texts[i], i
        assert [c.finish_reason for c in job.completions] == [c.finish_reason for c in expected], i


def test_stop_strings_and_removal(chat_llama):
    model, tokenizer = load(str(chat_llama))
    prompt = tokenizer.encode("To be or not")
    greedy = generate(model, tokenizer, [prompt], GenerationSettings(max_new_tokens=12, eos_token_ids=[]))[0].text
    stop = greedy.strip()[2:4]
    assert stop
    batch = ContinuousBatch(model, tokenizer)
    cut = BatchJob([prompt], GenerationSettings(max_new_tokens=12, stop=[stop], eos_token_ids=[]))
    long = BatchJob([prompt], GenerationSettings(max_new_tokens=100, eos_token_ids=[]))
    batch.add([cut, long])
    while cut.completions is None:
        batch.step()
    assert cut.completions[0].text == greedy[: greedy.index(stop)] and cut.completions[0].finish_reason == "stop"
    assert batch.rows == 1
    batch.remove([long])  # a client that went away
    assert batch.rows == 0 and batch.cache is None and batch.step() == []
