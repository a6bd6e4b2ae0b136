"""Batching of concurrent requests, so that a busy server runs fewer, fuller forward passes.

- `EncoderBatcher` (dynamic batching, for single-pass tasks: classify, tag, embeddings, fill-mask, answer): a
  request's inputs join a queue; a worker thread takes the first request with those queued behind it (they
  arrived while the model was busy) and any arriving within `wait` seconds, up to `max_batch` inputs, runs them
  through the task in one padded forward pass and hands each request its own results. A request is never split;
  inputs with different options (`key`, e.g. fill-mask's top_k) never share a pass.
- `DecodeScheduler` (continuous batching, for chat and completions): a worker thread runs a
  `tunelab.generate.batch.ContinuousBatch`, admitting waiting requests between decoding steps while their rows
  fit in `max_batch` and streaming each request's text to its own queue. A cancelled request (the client went
  away) leaves the batch at the next step.

Both hold the engine's lock for each forward pass only, so an engine's tasks interleave. The number of requests
waiting is bounded by the server's in-flight limit (429 beyond it; see metrics.py).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator

import torch

from tunelab.generate.batch import BatchJob, ContinuousBatch
from tunelab.generate.decode import Completion, GenerationSettings


@dataclass(eq=False)
class _Pending:
    items: list
    key: Hashable
    future: Future = field(default_factory=Future)


class EncoderBatcher:
    """`batcher(items, key)` -> `run(key, items)`'s results for these items, computed in a batch with the items of
    other requests made at about the same time. `passes` counts the batches (calls of `run`)."""

    def __init__(self, run: Callable[[Hashable, list], list], lock: threading.Lock, *, max_batch: int = 32,
                 wait: float = 0.0, name: str = "task") -> None:
        self.run, self.lock, self.max_batch, self.wait, self.name = run, lock, max(1, max_batch), wait, name
        self.passes = 0
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._carry: deque[_Pending] = deque()  # taken from the queue but left for the next batch
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def __call__(self, items: list, key: Hashable = None) -> list:
        if not items:
            return []
        self._ensure_worker()
        pending = _Pending(list(items), key)
        self._queue.put(pending)
        return pending.future.result()

    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"tunelab-batch-{self.name}", daemon=True)
                self._thread.start()

    def _next(self, timeout: float | None) -> _Pending | None:
        if self._carry:
            return self._carry.popleft()
        try:
            return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _gather(self) -> list[_Pending]:
        """The first request, then those queued and arriving within `wait`, up to `max_batch` inputs."""
        first = self._next(None)
        batch, count = [first], len(first.items)
        deadline = time.monotonic() + self.wait
        while count < self.max_batch:
            more = self._next(deadline - time.monotonic())
            if more is None:
                break
            if count + len(more.items) > self.max_batch:
                self._carry.appendleft(more)
                break
            batch.append(more)
            count += len(more.items)
        return batch

    def _work(self) -> None:
        while True:
            batch = self._gather()
            groups: dict[Hashable, list[_Pending]] = {}
            for p in batch:
                groups.setdefault(p.key, []).append(p)
            for key, group in groups.items():
                self._run(key, group)

    def _run(self, key: Hashable, group: list[_Pending]) -> None:
        items = [item for p in group for item in p.items]
        try:
            with self.lock, torch.inference_mode():
                self.passes += 1
                results = self.run(key, items)
        except Exception as e:
            if len(group) > 1:  # one request's bad input must not fail the others: run each on its own
                for p in group:
                    self._run(key, [p])
                return
            group[0].future.set_exception(e)
            return
        start = 0
        for p in group:
            p.future.set_result(results[start:start + len(p.items)])
            start += len(p.items)


class Submission:
    """A request in the decode scheduler: iterate for each step's new text of its rows (lists of str), then the
    list of Completions (last). `cancel()` (or `cancelled` set by the caller) takes it out of the batch."""

    def __init__(self, prompts: list[list[int]], settings: GenerationSettings,
                 cancelled: threading.Event | None) -> None:
        self.events: queue.Queue = queue.Queue()
        self.cancelled = cancelled or threading.Event()
        self.job = BatchJob(prompts, settings, emit=lambda pieces: self.events.put(("pieces", pieces)))

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[list[str] | list[Completion]]:
        while True:
            kind, value = self.events.get()
            if kind == "pieces":
                yield value
            elif kind == "done":
                yield value
                return
            else:
                raise value

    def result(self) -> list[Completion]:
        completions: list[Completion] = []
        for item in self:
            if item and isinstance(item[0], Completion):
                completions = item
        return completions


class DecodeScheduler:
    """Continuous batching of the generation requests of one decoder (see the module docstring)."""

    def __init__(self, model, tokenizer, lock: threading.Lock, *, max_batch: int = 32, wait: float = 0.0) -> None:
        self.batch = ContinuousBatch(model, tokenizer)
        self.lock, self.max_batch, self.wait = lock, max(1, max_batch), wait
        self.waiting: deque[Submission] = deque()
        self.running: list[Submission] = []
        self.steps = 0  # batches: prefills and decoding steps, a forward pass each
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, prompts: list[list[int]], settings: GenerationSettings,
               cancelled: threading.Event | None = None) -> Submission:
        submission = Submission(prompts, settings, cancelled)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="tunelab-decode", daemon=True)
                self._thread.start()
            self.waiting.append(submission)
            self._cond.notify()
        return submission

    def _admit(self) -> list[Submission]:
        """Waiting requests, first come first served, while their rows fit (one always fits an empty batch)."""
        admitted, rows = [], self.batch.rows
        with self._cond:
            while self.waiting:
                head = self.waiting[0]
                if head.cancelled.is_set():
                    self.waiting.popleft()
                    head.events.put(("done", []))
                    continue
                if rows and rows + head.job.rows > self.max_batch:
                    break
                admitted.append(self.waiting.popleft())
                rows += head.job.rows
        return admitted

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self.waiting and not self.running:
                    self._cond.wait()
                idle = not self.running
            if idle and self.wait > 0:
                time.sleep(self.wait)  # let requests sent together start together
            self._drop_cancelled()
            admitted = self._admit()
            if admitted:
                self._start(admitted)
            if self.running:
                self._step()

    def _start(self, admitted: list[Submission]) -> None:
        try:
            with self.lock:
                self.steps += 1
                ended = self.batch.add([s.job for s in admitted])
        except Exception as e:
            if len(admitted) > 1:  # find the bad request: admit them one by one
                for s in admitted:
                    self._start([s])
                return
            admitted[0].events.put(("error", e))
            return
        self.running.extend(admitted)
        self._finish(ended)

    def _step(self) -> None:
        try:
            with self.lock:
                self.steps += 1
                ended = self.batch.step()
        except Exception as e:  # the whole batch is lost: tell every request
            for s in self.running:
                s.events.put(("error", e))
            self.batch.remove([s.job for s in self.running])
            self.running = []
            return
        self._finish(ended)

    def _finish(self, ended: list[BatchJob]) -> None:
        gone = {id(j) for j in ended}
        for s in [s for s in self.running if id(s.job) in gone]:
            s.events.put(("done", s.job.completions))
        self.running = [s for s in self.running if id(s.job) not in gone]

    def _drop_cancelled(self) -> None:
        cancelled = [s for s in self.running if s.cancelled.is_set()]
        if cancelled:
            self.batch.remove([s.job for s in cancelled])
            self.running = [s for s in self.running if not s.cancelled.is_set()]
            for s in cancelled:
                s.events.put(("done", []))

    def stats(self) -> dict[str, Any]:
        return {"running": len(self.running), "waiting": len(self.waiting), "rows": self.batch.rows}
