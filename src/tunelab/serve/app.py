"""`create_app(engine, settings)`: the FastAPI application of `tunelab serve`.

Routes are thin: they check the request (pydantic schemas), call the engine and shape its answer the way the
OpenAI API does. The model is the one the server was started with; no request names a path to load.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from tunelab.evaluate.metrics import tag_entities
from tunelab.generate.decode import Completion, GenerationSettings
from tunelab.serve import schemas as S
from tunelab.serve.engine import Engine
from tunelab.serve.errors import APIError, error_body, install_error_handlers, unknown_model
from tunelab.serve.feedback_page import FeedbackSink, feedback_router, page_router
from tunelab.serve.metrics import AccountingMiddleware, Metrics


@dataclass
class ServerSettings:
    """Limits, access, batching and feedback. max_tokens caps a request's max_tokens (and is the default of a chat
    request); max_input_tokens caps prompts and inputs (the model's own limit applies too). max_concurrent requests
    are in the server at once, decoded or waiting for their turn; more get 429. max_batch: the most inputs of one
    encoder forward pass and the most sequences decoded together; batch_wait_ms: how long a batch waits for more
    requests (0: it takes those that queued while the model was busy). feedback_store: where the feedback page's
    records go (a path, an sqlite:/// URL or an open FeedbackStore; None: the page can ask but not save);
    model_version: the served model's version in those records (None: a hash of its parameters, computed at the
    first record)."""

    api_key: str | None = None
    max_tokens: int = 1024
    max_input_tokens: int | None = None
    max_n: int = 8
    max_batch_inputs: int = 256
    max_concurrent: int = 64
    max_batch: int = 32
    batch_wait_ms: float = 0.0
    feedback_store: str | Path | Any = None  # a path, an sqlite:/// URL, an open FeedbackStore, or None
    model_version: str | None = None


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    if settings.max_input_tokens is not None:
        limit = engine.max_input_tokens
        engine.max_input_tokens = min(settings.max_input_tokens, limit) if limit else settings.max_input_tokens
    if (engine.max_batch, engine.batch_wait) != (settings.max_batch, settings.batch_wait_ms / 1000):
        engine.configure_batching(max_batch=settings.max_batch, batch_wait_ms=settings.batch_wait_ms)
    metrics = Metrics()
    metrics.extra = engine.batch_metrics
    app = FastAPI(title="tunelab", summary=f"OpenAI-compatible server of {engine.name}", lifespan=_lifespan)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.state.started = int(time.time())
    install_error_handlers(app)
    app.add_middleware(AccountingMiddleware, metrics=metrics, max_concurrent=settings.max_concurrent)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": engine.name, "capabilities": engine.capabilities}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(openai_router(engine, settings, metrics, app.state.started),
                       dependencies=[Depends(_auth(settings.api_key))])
    sink = FeedbackSink(settings.feedback_store) if settings.feedback_store is not None else None
    app.state.feedback = sink
    app.include_router(feedback_router(engine, sink, _model_version(engine, settings)),
                       dependencies=[Depends(_auth(settings.api_key))])
    app.include_router(page_router())
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    if app.state.feedback is not None:  # the server stops: close the feedback store it opened
        app.state.feedback.close()


def _model_version(engine: Engine, settings: ServerSettings) -> Callable[[], str]:
    """The served model's version for feedback records: the one given, else (once) a hash of its parameters,
    as `tunelab feedback collect` versions a model given in memory."""
    known: list[str] = [settings.model_version] if settings.model_version else []

    def version() -> str:
        if not known:
            from tunelab.feedback.collect import parameters_fingerprint

            known.append(f"params-{parameters_fingerprint(engine.model)}")  # reads the weights, changes nothing
        return known[0]

    return version


def _auth(api_key: str | None) -> Callable:
    def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided" if header else
                           "Missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                           type="authentication_error", code="invalid_api_key")

    return check


def openai_router(engine: Engine, settings: ServerSettings, metrics: Metrics, created: int) -> APIRouter:
    router = APIRouter(prefix="/v1")

    def check_model(request: S.Request) -> None:
        if request.model is not None and request.model != engine.name:
            raise unknown_model(request.model, engine.name)

    def check_inputs(count: int) -> None:
        if count > settings.max_batch_inputs:
            raise APIError(400, f"{count} inputs; this server takes at most {settings.max_batch_inputs} per request",
                           param="input")

    def generation_settings(request: S.SamplingRequest, max_tokens: int | None) -> GenerationSettings:
        max_tokens = max_tokens if max_tokens is not None else settings.max_tokens
        if max_tokens > settings.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; this server generates at most {settings.max_tokens}",
                           param="max_tokens", code="invalid_value")
        if request.n > settings.max_n:
            raise APIError(400, f"n is {request.n}; this server takes at most {settings.max_n}", param="n")
        return GenerationSettings(max_new_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                                  seed=request.seed, stop=request.stop)

    @router.get("/models", response_model=S.ModelList)
    def list_models() -> S.ModelList:
        return S.ModelList(data=[S.ModelCard(id=engine.name, created=created, capabilities=engine.capabilities)])

    @router.get("/models/{model_id:path}", response_model=S.ModelCard)
    def get_model(model_id: str) -> S.ModelCard:
        if model_id != engine.name:
            raise unknown_model(model_id, engine.name)
        return S.ModelCard(id=engine.name, created=created, capabilities=engine.capabilities)

    @router.post("/chat/completions", response_model=S.ChatCompletion)
    def chat_completions(request: S.ChatCompletionRequest):
        check_model(request)
        gen = generation_settings(request, request.max_completion_tokens or request.max_tokens)
        prompt = engine.chat_prompt([m.plain() for m in request.messages])
        prompts = [prompt] * request.n
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            return _event_stream(_chat_chunks(engine, prompts, gen, rid, now, request.include_usage, metrics))
        completions = engine.generate(prompts, gen)
        usage = _usage(len(prompt), completions, metrics)
        return S.ChatCompletion(id=rid, created=now, model=engine.name, usage=usage, choices=[
            S.ChatChoice(index=i, message=S.ResponseMessage(content=c.text), finish_reason=c.finish_reason)
            for i, c in enumerate(completions)])

    @router.post("/completions", response_model=S.TextCompletion)
    def completions(request: S.CompletionRequest):
        check_model(request)
        texts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        check_inputs(len(texts) * request.n)
        gen = generation_settings(request, request.max_tokens)
        encoded = [engine.text_prompt(t) for t in texts]
        prompts = [ids for ids in encoded for _ in range(request.n)]  # choice index = prompt * n + sample
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            return _event_stream(_completion_chunks(engine, prompts, gen, rid, now, request.include_usage, metrics,
                                                    sum(len(p) for p in encoded)))
        done = engine.generate(prompts, gen)
        usage = _usage(sum(len(p) for p in encoded), done, metrics)
        return S.TextCompletion(id=rid, created=now, model=engine.name, usage=usage, choices=[
            S.CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason) for i, c in enumerate(done)])

    @router.post("/embeddings", response_model=S.EmbeddingList)
    def embeddings(request: S.EmbeddingRequest) -> S.EmbeddingList:
        check_model(request)
        texts = [request.input] if isinstance(request.input, str) else request.input
        check_inputs(len(texts))
        engine.require("embeddings")
        tokens = engine.count_tokens(texts)
        vectors = engine.embed(texts)
        if request.dimensions is not None and request.dimensions != len(vectors[0]):
            raise APIError(400, f"this model's embeddings have {len(vectors[0])} dimensions", param="dimensions")
        metrics.add_tokens(prompt=tokens)
        data = [S.Embedding(index=i, embedding=_base64(v) if request.encoding_format == "base64" else v)
                for i, v in enumerate(vectors)]
        return S.EmbeddingList(data=data, model=engine.name, usage=S.Usage(prompt_tokens=tokens, total_tokens=tokens))

    @router.post("/classify", response_model=S.TaskList)
    def classify(request: S.ClassifyRequest) -> S.TaskList:
        check_model(request)
        texts = [request.input] if isinstance(request.input, str) else request.input
        pairs = None
        if request.text_pair is not None:
            pairs = [request.text_pair] if isinstance(request.text_pair, str) else request.text_pair
            if len(pairs) != len(texts):
                raise APIError(400, f"{len(texts)} inputs but {len(pairs)} text pairs", param="text_pair")
        check_inputs(len(texts))
        engine.require("classify")
        results = engine.classify(texts, pairs)
        data = [S.Classification(index=i, **r) for i, r in enumerate(results)]
        return _task_list(data, engine.count_tokens(texts + (pairs or [])), metrics, engine)

    @router.post("/tag", response_model=S.TaskList)
    def tag(request: S.TagRequest) -> S.TaskList:
        check_model(request)
        sentences = request.sentences()
        check_inputs(len(sentences))
        engine.require("tag")
        data = []
        for i, (words, tags) in enumerate(zip(sentences, engine.tag(sentences))):
            entities = [S.Entity(type=t, text=" ".join(words[a:b + 1]), start=a, end=b)
                        for t, a, b in tag_entities(tags)]
            data.append(S.Tagging(index=i, tokens=words, tags=tags, entities=entities))
        return _task_list(data, engine.count_tokens([" ".join(s) for s in sentences]), metrics, engine)

    @router.post("/answer", response_model=S.AnswerResponse)
    def answer(request: S.AnswerRequest) -> S.AnswerResponse:
        check_model(request)
        engine.require("answer")
        result = engine.answer([(request.question, request.context)], max_answer_length=request.max_answer_length)[0]
        metrics.add_tokens(prompt=engine.count_tokens([request.question, request.context]))
        return S.AnswerResponse(model=engine.name, answer=result.text, start=result.start)

    @router.post("/fill-mask", response_model=S.FillMaskResponse)
    def fill_mask(request: S.FillMaskRequest) -> S.FillMaskResponse:
        check_model(request)
        results = engine.fill_mask(request.input, request.top_k)
        metrics.add_tokens(prompt=engine.count_tokens([request.input]))
        return S.FillMaskResponse(model=engine.name, data=[[S.MaskPrediction(**vars(p)) for p in preds]
                                                           for preds in results])

    def seq2seq(request: S.Seq2SeqRequest) -> S.TaskList:
        check_model(request)
        texts = [request.input] if isinstance(request.input, str) else request.input
        check_inputs(len(texts))
        if request.max_tokens is not None and request.max_tokens > settings.max_tokens:
            raise APIError(400, f"max_tokens is {request.max_tokens}; this server generates at most "
                           f"{settings.max_tokens}", param="max_tokens")
        outputs = engine.seq2seq(texts, max_new_tokens=request.max_tokens, beam_size=request.beam_size)
        data = [S.GeneratedText(index=i, text=t) for i, t in enumerate(outputs)]
        return _task_list(data, engine.count_tokens(texts), metrics, engine)

    # One encoder-decoder does what it was trained for: the two paths are the same endpoint under the name
    # a client expects.
    router.post("/translate", response_model=S.TaskList)(seq2seq)
    router.post("/summarize", response_model=S.TaskList)(seq2seq)
    return router


# -------------------------------------------------------------------------------------------------- helpers


def _usage(prompt_tokens: int, completions: list[Completion], metrics: Metrics) -> S.Usage:
    generated = sum(len(c.token_ids) for c in completions)
    metrics.add_tokens(prompt=prompt_tokens, completion=generated)
    return S.Usage(prompt_tokens=prompt_tokens, completion_tokens=generated, total_tokens=prompt_tokens + generated)


def _task_list(data: list, tokens: int, metrics: Metrics, engine: Engine) -> S.TaskList:
    metrics.add_tokens(prompt=tokens)
    return S.TaskList(model=engine.name, data=data, usage=S.Usage(prompt_tokens=tokens, total_tokens=tokens))


def _base64(vector: list[float]) -> str:
    """A vector as the OpenAI API's base64: the bytes of little-endian float32 values."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _event_stream(events: AsyncIterator[dict]) -> StreamingResponse:
    async def lines():
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _streamed(engine: Engine, prompts: list[list[int]], gen: GenerationSettings):
    """The engine's stream, run in a worker thread, as an async iterator: each step's pieces, then the
    Completions. A client that goes away sets `cancelled` and the generation stops at its next token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()

    def post(kind: str, item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, item))
        except RuntimeError:  # the response ended, and its event loop closed, before the stream did
            pass

    def work() -> None:
        try:
            for item in engine.stream(prompts, gen, cancelled):
                post("item", item)
        except Exception as e:  # reported to the client as an error event
            post("error", e)
        post("end", None)

    threading.Thread(target=work, name="tunelab-stream", daemon=True).start()
    try:
        while True:
            kind, item = await queue.get()
            if kind == "end":
                return
            yield kind, item
    finally:
        cancelled.set()


async def _chat_chunks(engine, prompts, gen, rid, created, include_usage, metrics) -> AsyncIterator[dict]:
    def chunk(choices: list[dict], **extra) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                "choices": choices, **extra}

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                 for i in range(len(prompts))])
    async for kind, item in _streamed(engine, prompts, gen):
        if kind == "error":
            yield error_body(str(item), "server_error")
            return
        if item and isinstance(item[0], Completion):
            yield chunk([{"index": i, "delta": {}, "finish_reason": c.finish_reason} for i, c in enumerate(item)])
            usage = _usage(len(prompts[0]), item, metrics)
            if include_usage:
                yield chunk([], usage=usage.model_dump())
            return
        pieces = [{"index": i, "delta": {"content": p}, "finish_reason": None} for i, p in enumerate(item) if p]
        if pieces:
            yield chunk(pieces)


async def _completion_chunks(engine, prompts, gen, rid, created, include_usage, metrics,
                             prompt_tokens: int) -> AsyncIterator[dict]:
    def chunk(choices: list[dict], **extra) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                "choices": choices, **extra}

    async for kind, item in _streamed(engine, prompts, gen):
        if kind == "error":
            yield error_body(str(item), "server_error")
            return
        if item and isinstance(item[0], Completion):
            yield chunk([{"index": i, "text": "", "finish_reason": c.finish_reason, "logprobs": None}
                         for i, c in enumerate(item)])
            usage = _usage(prompt_tokens, item, metrics)
            if include_usage:
                yield chunk([], usage=usage.model_dump())
            return
        pieces = [{"index": i, "text": p, "finish_reason": None, "logprobs": None} for i, p in enumerate(item) if p]
        if pieces:
            yield chunk(pieces)
