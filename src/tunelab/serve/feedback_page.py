"""The feedback page of `tunelab serve` and the API it posts to.

`GET /` is a plain HTML page (static/feedback.html, .js, .css: no build step, nothing from another site) on
which a person asks the served model something (chat, or the task endpoint the model has), rates the answer
good or bad, writes a critique or the answer it should have given, and submits. The page posts to
`POST /v1/feedback`, which writes a FeedbackRecord (source "person", the served model's name and version)
into the feedback store that `tunelab feedback review / export / stats / build` read; `GET /v1/feedback`
lists the latest records of the served model. Both honour the server's API key like every /v1/ route.

The store is opened when the first record is written (or listed, if its file exists), so a server whose page
nobody uses leaves no file behind; its location is checked when the server starts.
"""

from __future__ import annotations

import threading
from importlib import resources
from pathlib import Path
from typing import Callable

from fastapi import APIRouter, Query
from fastapi.responses import Response

from tunelab.errors import FeedbackError
from tunelab.feedback.record import FeedbackRecord, FeedbackRecordError
from tunelab.feedback.store import FeedbackStore, store_path
from tunelab.serve import schemas as S
from tunelab.serve.engine import Engine
from tunelab.serve.errors import APIError, unknown_model

# The page's files, served at / and /static/NAME, with their media types.
PAGE_FILES = {"feedback.js": "text/javascript", "feedback.css": "text/css"}
# The page loads nothing from elsewhere and runs no inline script.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
}


class FeedbackSink:
    """The server's feedback store: its location checked now, the file opened (and created) at first use.
    One connection for the whole server (FeedbackStore is thread-safe); other processes may write the same
    file at the same time (WAL, see tunelab.feedback.store)."""

    def __init__(self, location: str | Path | FeedbackStore) -> None:
        self._store = location if isinstance(location, FeedbackStore) else None
        self._owned = self._store is None  # a store given open is the caller's to close
        self.path = self._store.path if self._store else store_path(location)
        self._lock = threading.Lock()
        if self._store is None and self.path != ":memory:":
            file = Path(self.path)
            if file.is_dir():
                raise FeedbackError(f"{file}: is a directory; the feedback store is a file (e.g. {file / 'feedback.db'})")
            if not file.parent.is_dir():
                raise FeedbackError(f"{file}: the directory {file.parent} does not exist")
            if file.exists():
                self.store()  # refuse another program's file, or a newer tunelab's store, at start

    def store(self) -> FeedbackStore:
        with self._lock:
            if self._store is None:
                self._store = FeedbackStore(self.path)
            return self._store

    def exists(self) -> bool:
        return self._store is not None or self.path == ":memory:" or Path(self.path).exists()

    def close(self) -> None:
        with self._lock:
            if self._store is not None and self._owned:
                self._store.close()
                self._store = None


def page_router() -> APIRouter:
    """GET / and the page's script and style sheet. No key is needed to load the page: it holds no data, and
    it sends the key (typed into it) with every request it makes."""
    router = APIRouter(include_in_schema=False)
    static = resources.files("tunelab.serve") / "static"

    def read(name: str) -> bytes:
        return (static / name).read_bytes()

    @router.get("/")
    def page() -> Response:
        return Response(read("feedback.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @router.get("/static/{name}")
    def asset(name: str) -> Response:
        if name not in PAGE_FILES:
            raise APIError(404, f"Unknown path: /static/{name}", type="not_found_error")
        return Response(read(name), media_type=f"{PAGE_FILES[name]}; charset=utf-8", headers=PAGE_HEADERS)

    return router


def feedback_router(engine: Engine, sink: FeedbackSink | None, model_version: Callable[[], str | None]) -> APIRouter:
    """POST /v1/feedback (store one judged answer) and GET /v1/feedback (the latest records of this model).
    `model_version` gives the served model's version (computed once, at the first record)."""
    router = APIRouter(prefix="/v1")

    def open_store() -> FeedbackStore:
        if sink is None:
            raise APIError(404, "This server keeps no feedback: start it with --feedback-store PATH",
                           type="not_found_error", code="feedback_disabled")
        try:
            return sink.store()
        except FeedbackError as err:
            raise APIError(500, f"The feedback store cannot be opened: {err}", type="server_error") from None

    @router.post("/feedback", response_model=S.FeedbackItem)
    def add_feedback(request: S.FeedbackRequest) -> S.FeedbackItem:
        if request.model is not None and request.model != engine.name:
            raise unknown_model(request.model, engine.name)
        verdict = request.verdict
        if request.correction is not None:
            if verdict == "good":
                raise APIError(400, "A corrected answer goes with the verdict 'bad' (or none): the answer was "
                                    "not right as it was", param="verdict", code="invalid_value")
            if request.correction == request.output:
                raise APIError(400, "The correction is the answer itself; write the answer it should have been, "
                                    "or rate the answer good", param="correction", code="invalid_value")
            verdict = "bad"
        if verdict is None and request.score is None:
            raise APIError(400, "Rate the answer: give 'verdict' ('good' or 'bad'), a 'score', or a 'correction'",
                           param="verdict", code="missing_verdict")
        store = open_store()
        try:
            record = FeedbackRecord(input=request.record_input(), output=request.output, model=engine.name,
                                    model_version=model_version(), source=request.source, verdict=verdict,
                                    score=request.score, critique=request.critique, correction=request.correction,
                                    task=request.task, reference=request.reference, metadata=request.metadata)
        except FeedbackRecordError as err:
            field = err.problems[0].split("'")[1] if err.problems and "'" in err.problems[0] else None
            raise APIError(400, "; ".join(err.problems), param=field, code="invalid_value") from None
        try:
            stored = store.add(record)
        except FeedbackError as err:
            raise APIError(503, f"The feedback store is busy or failed: {err}", type="server_error") from None
        return S.FeedbackItem(**stored.to_dict())

    @router.get("/feedback", response_model=S.FeedbackList)
    def list_feedback(limit: int = Query(default=10, ge=1, le=100)) -> S.FeedbackList:
        """The latest records of the served model (any version), newest first."""
        if sink is not None and not sink.exists():
            return S.FeedbackList(data=[], store=sink.path, total=0)
        store = open_store()
        records = store.query(model=engine.name, limit=limit, newest_first=True)
        return S.FeedbackList(data=[S.FeedbackItem(**r.to_dict()) for r in records], store=store.path,
                              total=store.count(model=engine.name))

    return router
